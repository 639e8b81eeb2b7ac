"""Red flags: patient messages that describe an emergency, whatever the models go on to say.

A safety net, not triage: it never says a message is safe, it only adds a "call 120" notice.

The catalogue (``RULES``) follows the conditions that public emergency guidance treats as
immediate: the 120 dispatch criteria of China's pre-hospital emergency services (国家卫生健康委
《院前医疗急救管理办法》 and the 120 call-taking questions), the Chinese emergency pre-triage standard
(《急诊预检分诊专家共识》, level 1-2: cardiac arrest, airway/breathing, shock, coma, seizures, acute
chest pain, stroke signs, major bleeding, poisoning, major trauma and burns, obstetric
emergencies) and the WHO/ICRC Emergency Triage Assessment and Treatment (ETAT) signs for children.
The one-line actions follow the Red Cross Society of China first-aid training material and the
WHO/IFRC first-aid guidelines (pressure on bleeding wounds, recovery position, no food or drink,
keep the poison's container, cool burns with running water, keep a bitten limb still, note when
stroke signs began). The self-harm notice names 12356, the national unified psychological
assistance hotline set up by the National Health Commission (notice of Dec 2024; every region
connected by 1 May 2025), as well as 120/110.

Matching works on clauses (split at punctuation and at 但是/可是): each rule is a list of
alternatives, each alternative a list of findings that must all be AFFIRMED somewhere in the text.
Findings are gap-tolerant regexes ("吐了好多血", "咳出一大口鲜血", "胸口像压了块大石头"). A finding is
not affirmed when its clause negates it right before ("没有胸痛", "也没有明显的呼吸困难", "差点晕倒")
or after ("胸痛已经好了"), when it is said to be past history ("以前中风过", "有心梗病史",
"以前…现在好了"), or when its sentence asks about prevention or general knowledge ("怎么预防中风").
Hypotheticals and other people ("如果胸痛出汗怎么办", "我爸…") still fire: a needless notice costs far
less than a missed heart attack.

Dialogue level: ``red_flags(text, earlier)`` also reads the last ``WINDOW - 1`` earlier patient
messages. Three messages because an emergency told in pieces ("胸口疼" … "还出了好多冷汗") is
completed within one or two doctor questions; a longer window would join complaints that are no
longer current and raise false alarms. A flag found only by joining is returned when the current
message completes it (it did not fire on the window ending at the previous message), so the notice
appears under the message that completed the picture, once.

Two generic flags (``GENERIC``: two danger signs together, a cry for help) are shown only when no
specific one applies. A few Cantonese function words (唔, 咗, 佢, 冇…) are read as their Mandarin
equivalents. Before a finding's regex runs, a quick test of the characters its matches can start
with rules most findings out, which keeps a message at about 2 ms of CPU.

Patient text is never logged here. ``python -m bianque.safety --bench`` prints the speed.
"""
from __future__ import annotations

import os
import re
import sys
import time
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

CALL_120 = "请立即拨打120，或马上去最近医院的急诊。"
WINDOW = 3  # patient messages read together: the current one and the two before it
# Issue #14's learned backstop (bianque/safety_model.py): when no rule fires, a model's probability
# >= its threshold adds one generic notice. Off until scored on blind sets; tests switch it on.
MODEL_BACKSTOP = False


@dataclass(frozen=True)
class RedFlag:
    """One emergency category. ``when``: alternatives, each a tuple of findings that must all hold."""

    name: str  # stable ASCII id
    message: str  # the explanation shown to the user
    when: tuple[tuple[str, ...], ...]
    supersedes: tuple[str, ...] = ()  # narrower notices this one makes redundant
    action: str = CALL_120  # one-line safe first-aid action


def flag_dict(flag: RedFlag) -> dict[str, str]:
    """The JSON-able form of a flag (API responses, recorded consultations)."""
    return {"name": flag.name, "message": flag.message, "action": flag.action}


GAP_NEGATORS = r"不(?!少|停|行|断|住|了|醒|动|上|过|出|清|见)|没(?!劲|力|反应)|无(?!力|法)|未"


def gap(n: int, banned: str = "") -> str:
    """Up to ``n`` characters between two parts of a finding (never crossing a clause or a negator:
    "脖子也不硬" is no stiff neck)."""
    banned = f"{banned}|{GAP_NEGATORS}" if banned else GAP_NEGATORS
    return rf"(?:(?!{banned}).){{0,{n}}}"


# A finding may carry words that cancel it within its clause: "finding@@unless".
U = "@@"

# --- findings (regex alternations) ------------------------------------------------------------
SEIZE = r"(?<![腿脚])抽(?!筋|血|烟|空|屉|出|时间|水|动症|动障碍)"
# an acid, not a drug salt ("盐酸氨基葡萄糖片", "硫酸亚铁"): real questions about medicines name these salts
ACID = r"(硫酸|盐酸)(?!\w{0,12}(片|胶囊|颗粒|注射液|口服液|缓释|溶液|滴|喷|膏|凝胶|栓|粉|丸|亚铁|镁|锌|钡|羟氯喹|氨基))"
NUM = r"[0-9一二三四五六七八九十两几半]"
SEVERE = (r"(?<!不)(?<!不太)(?<!没那么)(厉害|剧烈|剧痛|要命|受不了|遭不住|扛不住|吃不消|忍不了|难以忍受|撕心裂肺|钻心|刀割|刀绞|"
          r"撕裂|要炸|炸开|裂开|死去活来|打滚|直不起腰|疼死|痛死|喘不|冒冷汗|出冷汗|大汗)")
SUDDEN = r"突然|突发|一下子|猛地|瞬间|忽然"
CHEST = r"(胸口|胸部|胸前|胸骨|前胸|胸膛|心口|心窝|心前区|心脏(那|这)?(块|里|儿|边|部位)?|胸)"
CHEST_PAIN = CHEST + gap(8) + r"(痛|疼|闷|压|堵|紧|揪|绞|憋|沉|刺|石头)"
CHEST_SEVERE = CHEST + gap(10) + "(" + SEVERE + r"|像" + gap(6) + r"(石头|压|勒|捏|攥|绑|箍|撕|刀|锤|大象|重物))"
TEARING = (r"撕裂(样|一样|似的?|般)" + gap(4) + r"(痛|疼)|(背|后背|胸口|胸)" + gap(6) + r"(撕着|撕扯|像刀割|刀割一样|像有东西" + gap(4) + r"撕)|"
           r"(左右|两边|两只|两侧)" + gap(6) + r"血压" + gap(4) + r"差|(疼|痛)" + gap(4) + r"(穿|窜|放射|连)到?" + gap(2) + r"(后背|背)")
PAIN_SEVERE = r"(疼|痛)得?" + gap(4) + r"(受不了|要命|忍不了|打滚|撕心裂肺|死去活来)"
HEART_ATTACK = r"(?<!得)(?<!得我)(?<!的我)心梗|心肌梗|心绞痛发作|急性冠脉|主动脉夹层"
# a squeezing simile anywhere in the message ("胸口好紧，像有根绳子勒着")
CHEST_SIMILE = r"像" + gap(6) + r"(石头|勒|捏|攥|绑|箍|撕|刀|锤|大象|重物|压着|掐)"
CHEST_DISCOMFORT = CHEST + gap(4) + r"(不太舒服|不舒服|难受|压得慌|堵得慌|踩着|攥着)|心里像" + gap(6) + r"(攥|捏|压|勒|揪|绞|踩)"
CHEST_STRONG = r"冷汗|汗" + gap(4) + r"(一直冒|往下|直流|淌|掉)|汗珠|一身汗|左" + gap(2) + r"(胳膊|臂|肩)|濒死|脸" + gap(2) + r"白得"
PERSISTENT = r"不管用|没用|(半个?多?小时|[二三四五]十多?分钟|一个多?小时)|不缓解|没缓解|不见好|不减轻|还(在)?疼|还(在)?痛"
CARDIAC_HISTORY = r"支架|搭桥|冠心病|心脏病|心梗过|犯病一样|跟上次一样|和上次一样"
ACS_SIGNS = (r"出汗|冷汗|大汗|虚汗|汗" + gap(3) + r"(湿|透|直流|往下)|(浑身|全身|衣服|一身)" + gap(2) + r"湿透|出了?" + gap(3) + r"汗|汗" + gap(4) + r"(淌|像水|跟水)|想吐|恶心|(?<!喝)吐了|喘不|气短|气促|气急|呼吸困难|上不来气|透不过气|憋气|"
             r"左" + gap(2) + r"(肩|臂|胳膊|手)|后背|背部|下巴|下颌|牙" + gap(2) + r"(疼|痛)|濒死|要死了|快死了|"
             r"脸色" + gap(2) + r"(苍白|发白|煞白|发青)|嘴唇发紫")

FACE = (r"(嘴|口角|嘴角|脸|面部|眼角|半边脸)" + gap(4) + r"(歪|斜|耷拉|下垂|垂下)|(一边|半边|一侧)" + gap(2) + r"(脸|嘴角|嘴)" + gap(6) + r"(不动|动不了|麻|僵)|"
        r"嘴角" + gap(2) + r"(流口水|漏|流)")
WEAK = r"(软了|无力|冇力|冇劲|麻木|发麻|麻了|不能动|没力气|没劲|动不了|抬不起|像不是自己的|不是自己的|举不起|抬不动|举不动|筷子掉|不听使唤|不灵|拿不住|使不上劲|握不住|瘫|垂着|耷拉着)"
LIMB = r"(肢体|身体|身子|手脚|胳膊|手臂|手|腿|脚|上肢|下肢)"
ONE_SIDE = (r"(一侧|一边|半边|单侧|(?<![上下])半身|偏身|左半|右半)" + gap(8) + WEAK + r"|半身不遂|偏瘫|口眼歪斜|往一边(倒|歪)|"
            r"(左|右)(边|侧)?的?(手脚|手和脚|胳膊和腿|手和腿|半身)" + gap(4) + WEAK + r"|(左手左脚|右手右脚|左胳膊左腿|右胳膊右腿|左手左腿|右手右腿)" + gap(4) + WEAK)
ONE_LIMB = r"((左|右)(边|侧)?的?|一(只|条|边|侧))" + gap(2) + LIMB + gap(6) + WEAK
APHASIA = r"(说的话|讲的话)" + gap(4) + r"听不懂|看不懂" + gap(6) + r"(消息|字)|乱七八糟的词|听不懂" + gap(4) + r"(说话|讲话|说的|的话)|答非所问|(讲|说)(话)?" + gap(2) + r"唔清"
SPEECH = (r"(说话|讲话|口齿|吐字|言语|舌头)" + gap(4) + r"(不清|含糊|不利索|大舌头|发硬|不灵|颠三倒四|语无伦次)|"
          r"(说|讲)(话)?(也|都)?(不利索|不清楚|不清|含糊|不出来)|前言不搭后语|含含糊糊|话" + gap(2) + r"含(含)?糊|舌头" + gap(2) + r"大了|"
          r"(说不出话|不会说话|说不了话|话都说不)")
VISION_LOSS = r"(一只眼|一边眼|眼睛|左眼|右眼|看东西)?" + gap(3) + r"(看不见|失明|重影|什么都看不到)"
STROKE_NAMES = r"(?<!术)(?<!其)(?<!集)中风(?!险)|脑梗|脑卒中|卒中|脑出血|脑溢血"
DRAG_LEG = r"(腿|脚)" + gap(4) + r"拖着|拖着" + gap(2) + r"(腿|走)|走路" + gap(4) + r"(拖|往一边)"
# confusion, unresponsiveness: an emergency whatever the cause; DROWSY only with another danger sign
DROWSY = r"迷迷瞪瞪|迷瞪|眼神发直|不吭声|变了个人|乱发脾气|打晃|(讲|说)话乱|迷迷糊糊|迷糊|糊涂|糊里糊涂|昏昏(沉沉|欲睡)|昏睡|嗜睡|反应(慢|迟钝|差)|呆呆|眼神发直|答非所问|哼一声|只哼"
ALTERED = (r"不(怎么|太)醒|(叫|喊)不(太)?醒|交不醒|(叫|喊)(也|都)不醒|只(会|是)?哼|(叫|喊|拍|摇)" + gap(4) + r"没(有)?反应|(不咋个?|不怎么|不太)(睁眼|搭理)|不理人|叫" + gap(3) + r"(只哼哼|不(太)?应)|(怎么|咋)(叫|喊|拍|摇)都" + gap(4) + r"(哼|不醒|不应)|没醒过来|醒不过来|喊" + gap(3) + r"不(太)?应|只(会)?哼哼|不睁眼|睁不开眼|"
           r"(怎么|咋)(叫|喊|拍|摇|弄)都(不醒|没反应|不睁眼|不应)|拍都拍不醒|不认识(人|家人|我)|认不出(人|家人|我)|"
           r"颠三倒四|语无伦次|胡言乱语|说胡话|(一直|反复)重复(问|说)|问" + gap(4) + r"不(回答|答|理|应)|头一歪|"
           r"(突然|一下)" + gap(3) + r"不动了|反应" + gap(2) + r"(很|特别|越来越)?差")

BLEED = "|".join((
    r"(?<!气得)(?<!气的)(?<!得快)(?<!到快)(?<!得要)(?<!到要)(?<!追到)(?<!累到)(?<!忙到)(?<!累得)(?<!忙得)(?<!熬到)(?<!玩到)(?<!加班到)(?<!得我)(?<!气我)(吐|呕|咳|咯)(了|出)?" + gap(8, "痰|刷牙|牙") + r"血(?!丝|点|迹|星|压|糖|管|常规|型|检查|价)",
    r"血" + gap(8) + r"(止不住|停不下|不停地?流|一直(流|冒|往外)|往外(冒|涌|喷|流|淌)|哗哗|直流|喷|湿透|浸透)",
    r"(流|出|淌)(了)?" + gap(4) + r"(好多|很多|大量|一大滩|一地|一盆|一大片|满地|一摊|一身)的?血",
    r"一直(在)?(流血|出血)|(垫子|衣服|裤子|床单|毛巾|卫生巾)" + gap(4) + r"(湿透|浸透|全是血)",
    r"血" + gap(4) + r"流得" + gap(2) + r"(厉害|很多|好多|很猛|止不住)|大量出血|出血不止|流血不止|血流不止|血流如注|止不住血|喷血|(?<!月经)(?<!例假)(?<!经期)(出血|流血|出的血)" + gap(4) + r"(很多|好多|特别多|非常多|量大|量很大|不止|止不住|不停)",
    r"柏油样?便|黑便|拉" + gap(4) + r"(黑色|柏油)|便血" + gap(4) + r"(很多|不止|一直)|拉" + gap(4) + r"(好多|很多|一马桶|大量)" + gap(4) + r"血|马桶(里)?" + gap(2) + r"(全是|都是|一片)(血|红)",
    r"割" + gap(6) + r"动脉",
    r"(吐|呕)" + gap(8) + r"(咖啡渣|咖啡色|酱油色)|(全是|都是|满是|一大口|一大摊|一大滩)" + gap(3) + r"(?<!鱼)(?<!猪)(?<!鸡)(?<!鸭)血(?!丝|压|糖|管)|满嘴(是)?血|(小半|半|一)盆" + gap(2) + r"血?|果酱(样|一样|色)",
    r"鼻血" + gap(8) + r"(止不住|不停|一直|好久|" + NUM + r"+个?多?小时|半个?小时|两个鼻孔|([二三四五六七八九]十|[2-9][0-9])多?分钟)",
))
BLACK_STOOL = r"(大便|便|屎|拉)" + gap(6) + r"(黑|柏油|血)|黑便|柏油"
PIERCED = r"(扎|刺|捅|戳)(到|进|伤|穿|了)"
HEAVY_FLOW = r"(湿透|浸透)|(月经|经量|例假|出血|流血)" + gap(4) + r"(特别多|特别大|很大|很多|好多|多得)"
BIG_BLEED = r"大出血|大量出血" + U + r"工资|钱包|荷包|花钱|消费|剁手|购物|信用卡|花呗|买了"
STOP_FAILS = r"止不住|止不了|没止住|按不住|捏着也|压不住|还在(往外)?(冒|流)|往外冒|往外涌"
LOW_BP = r"血压" + gap(8) + r"(?<![0-9])([3-8][0-9]|90)/|血压" + gap(4) + r"(很低|测不到|量不到|测不出)"
COLD_LIMBS = r"(手脚|四肢|手|脚|身上)" + gap(2) + r"(冰凉|发凉|冰冷|冰)"
PALLOR = r"脸(色)?" + gap(2) + r"(煞白|惨白|苍白|发白|发灰|灰白|铁青|白得)"
PROFUSE_SWEAT = r"一身汗|满头(大)?汗|冷汗|大汗|(一直|直)(流|冒|出)虚汗|汗" + gap(4) + r"(淌|直流|往下|湿透|像水|跟水)|出了?" + gap(3) + r"(好多|很多|一身)汗|浑身湿透"
UNBEARABLE = r"受不了|遭不住|扛不住|要命|刀割|刀绞|剧痛|剧烈|打滚|一动不敢动|不敢动|疼得" + gap(2) + r"(哭|叫|喊)"
VERY_FAST_HR = (r"(心跳|心率|脉搏)" + gap(6) + r"(1[5-9][0-9]|2[0-9]{2}|一百[五六七八九]十|两百|二百)|"
                r"一分钟" + gap(3) + r"(1[5-9][0-9]|2[0-9]{2}|一百[五六七八九]十|两百|二百)多?(下|次)")
FAINT_SIGNS = r"眼前(发黑|一黑)|站不住|站(都)?站不稳|头晕心慌|心慌头晕|晕倒|晕过去|昏倒|嘴唇发白"
TACHY = (r"心跳" + gap(4) + r"(1[2-9][0-9]|[2-9][0-9]{2}|一百[二三四五六七八九]十|很快|特别快|飞快)|喘得?" + gap(3) + r"(快|急)|"
         r"一分钟" + gap(4) + r"([5-9][0-9]|[五六七八九]十)多?(次|下)")
HIGH_FEVER = r"烧到?" + gap(2) + r"(39|4[0-2]|三十九|四十)|(39|4[0-2])(\.[0-9])?度|高烧|高热"
DARK_URINE = r"尿" + gap(4) + r"(酱油色|茶色|可乐色|像酱油)"
SHOCK_SIGNS = (r"头晕|眼前发黑|眼前一黑|心慌|手(脚)?" + gap(2) + r"(凉|冰)|站不住|站不起来|人" + gap(2) + r"(虚|软)|软得|"
               r"脸色" + gap(2) + r"(苍白|发白|煞白)|冷汗|晕倒|晕过去")
BREATHING = "|".join((
    r"呼吸困难|喘不(上|过|了)来?气|上不来气|透不过气|喘不动|没法喘气|不能呼吸|(?<!到快)(?<!得快)(?<!感觉要)(?<!感觉快)窒息|大口喘气|不能平躺",
    r"憋" + gap(4) + r"(说不出话|发紫|发青|紫了)|嘴唇" + gap(3) + r"(发紫|青紫|发青|发绀|紫了)",
    r"(卡|噎|呛)(住|到|着)?" + gap(8) + r"(喘不|说不出|不能呼吸|没法呼吸|发紫|咳不出|上不来气|出不来|憋)",
    r"(卡在|卡到|卡住)" + gap(4) + r"(喉咙|嗓子|气管)|喘得" + gap(4) + r"(说不出话|躺不下|不行)",
    r"喘不匀|呼吸" + gap(4) + r"一分钟" + gap(2) + r"([3-9][0-9]|[三四五六七八九]十)多?次|吸气" + gap(6) + r"(声音|尖|哨|呼噜|嘶)|犬吠|狗叫|(坐起来|坐着)(也|都)喘|(喘气|呼吸)" + gap(3) + r"费劲|口水" + gap(2) + r"咽不下|越来越喘|喘得(很|特别|非常)?厉害|坐着都喘|张着?嘴" + gap(2) + r"(大口)?(吸|喘)|吸不(进|上)(去)?气|憋醒|一躺(下)?就(喘|憋)|躺不下去?",
    r"(嘴唇|嘴|指甲|脸)" + gap(4) + r"(乌紫|发乌|乌青|青紫|发青|发紫)|血氧" + gap(6) + r"(8[0-9]|[4-7][0-9]|掉|低)|粉红色?" + gap(2) + r"泡沫",
    r"(喷雾|吸入剂|喷剂|气雾剂|喷了)" + gap(8) + r"(没用|不管用|不顶用|没效果|都不行)|像被" + gap(4) + r"(掐|勒|堵|捂)住?",
))
CHOKE = r"(哽住|卡了|卡住|卡到|噎住|噎到|呛到|呛着|呛了|被呛|卡在|堵住)|(果冻|花生|坚果|鱼刺|糖果|枣|硬币|葡萄)" + gap(6) + r"(卡|噎|呛)"
CHOKE_SIGNS = (r"咝咝|嘶嘶|哨|声音" + gap(2) + r"变了|嘶哑|喊不出|叫不出|面" + gap(2) + r"(青|紫)|咳不出|憋得|憋红|憋紫|脸" + gap(3) + r"(红|紫|青)|喘|说不出|发不出声|哭不出|呼噜|呼吸" + gap(4) + r"(困难|不上|费劲)|"
               r"上不来气|透不过气|吸不进")
BREATH_UNLESS = r"压力|工作|学习|作业|生活|心里|憋屈"
ALLERGEN = (r"过敏|蜂(?!蜜|王浆|胶|窝煤)|蜇|蛰|肾上腺素|坚果|染发|染完头发|染头|(换|吃|服|用|打)(了|完|过)" + gap(10) + r"(药|布洛芬|阿司匹林|青霉素|头孢|抗生素|消炎药)|打(了)?" + gap(4) + r"针|输液|(吃|喝)(了|完|过)" + gap(6) +
            r"(海鲜|花生|虾|蟹|芒果|坚果|药)|青霉素|头孢|造影")
# the same, but a medicine taken for days or months is no sudden exposure: only with airway signs
ALLERGEN_RECENT = ALLERGEN.replace(r"(换|吃|服|用|打)(了|完|过)" + gap(10), r"(换|吃|服|用|打)(了|完|过)" + gap(10, r"天|周|月|年|段时间"))
AIRWAY = (r"(喉咙|嗓子|喉头|气管)" + gap(4) + r"(发紧|肿|堵|紧|卡)|胸口憋|憋得慌|嘶哑|哑了|吹哨|哨音|胸口?发?闷|心慌|一直咳|肾上腺素笔|头晕眼花|眼前发黑|" + LOW_BP + "|呼吸困难|喘不|上不来气|透不过气|"
          r"(嘴唇|舌头|脸|眼皮|眼睛|嘴)" + gap(3) + r"(肿(?!了?一?点|了?一些|了?些)|大了)|(喉咙|嗓子)" + gap(4) + r"(掐|勒|堵住|锁住|捏住)|舌头" + gap(3) + r"麻|血压" + gap(2) + r"(低|掉|下降)|晕倒|站不住")
# Someone known to have epilepsy: a fit that stops by itself is their illness, not an emergency
# (first-aid guidance: call 120 when it lasts over 5 minutes, repeats, or they do not come round).
EPILEPSY = r"癫痫|羊癫疯|羊角风"
EPILEPSY_KNOWN = (r"(有|患有?|患上了?|得(了|过)|确诊|诊断)(的)?(是|为)?" + gap(2) + r"(" + EPILEPSY + r")(?!吗)|(" + EPILEPSY + r")" + gap(2) +
                  r"(病史|患者|病人|又犯|又发|复发|发作的?频率|好几年|多年|很多年|几年了|的毛病|老毛病|的护理|日常护理)|抽动症")
SEIZURE_LONG = (r"又" + gap(4) + r"抽|第二次|反复抽|一直抽|抽个不停|还没停|停不下来|没停|连着|接着抽|没醒|醒不过来|叫不醒|" + NUM + r"+多?分钟")
SEIZURE = (r"(?<!眼皮)(?<!眼睛)(?<!嘴角)(?<!肌肉)(?<!腿)(?<!胃)(?<!脸)抽搐|抽风|癫痫发作|羊癫疯|口吐白沫|浑身抽|四肢抽"
           r"@@眼皮|肌肉跳|小腿|腿肚|嘴角|面肌")
UNCONSCIOUS = "|".join((
    r"昏迷|(?<!得要)(?<!得快)(?<!累得)(?<!饿得)晕倒|昏倒|晕过去|昏过去|晕了过去|倒地不起|倒在地上|倒地上|倒地(了|后)|(突然|一下子?)" + gap(2) + r"(倒下|倒了|栽倒)|失去意识|没(有)?了?意识|意识(不清|模糊)|神志不清",
    r"不省人事|人事不省|叫不醒|喊不醒|叫" + gap(4) + r"没(有)?反应|没(有)?反应了|晕厥|休克|呼之不应",
    r"没(有)?了?(呼吸|心跳|脉搏)(?!困难|急促|不畅|道)|不喘气了|心跳停|心脏骤停|摸不到脉",
    r"瘫(下去|倒|在地)|软(下去|倒)了?|呼吸" + gap(2) + r"(很|特别)?(弱|微弱)|(眼前一黑|眼前发黑)" + gap(4) + r"(倒|摔|晕)|(倒了|摔倒了?|晕了)" + gap(2) + r"(醒来|醒过来)|晕在" + gap(4) + r"(里|地上|厕所|浴室|卫生间)|眼睛" + gap(2) + r"(往上翻|上翻)",
    ALTERED,
))
CHILD = r"崽|细路|细佬|娃儿|小娃|孩子|宝宝|小孩|儿子|女儿|婴儿|新生儿|幼儿|小朋友|宝贝|娃|闺女|小儿|个(多)?月大|岁的(男孩|女孩|孩)"
CHILD_DANGER = (SEIZE + r"|" + ALTERED + r"|惊厥|翻白眼|口吐白沫|呼吸" + gap(4) + r"(急|快|费劲|困难)|喘" + gap(3) + r"(快|急)|"
                r"(肋骨|胸口|肋|锁骨|脖子)" + gap(4) + r"(凹|陷)|(抱起来|浑身|全身|身子)" + gap(2) + r"软(软|绵绵|塌塌)|喘" + gap(2) + r"(厉害|不上|不过)|"
                r"鼻翼|三凹|嘴唇" + gap(3) + r"(紫|青)|叫不醒|怎么叫都|软绵绵|昏睡|哭声" + gap(2) + r"(微弱|很弱)|"
                r"不会哭|没(有)?反应|眼神发直|前囟" + gap(3) + r"(鼓|凸)|吞" + gap(6) + r"(硬币|纽扣|珠子|钉子|别针|异物|玩具|磁)|哭声" + gap(4) + r"弱|"
                r"(硬币|纽扣|珠子|磁力珠|磁珠|磁铁|钉子|别针|电池|异物)" + gap(8) + r"(吞|咽)")
OTHERS_MEDS = r"(爷爷|奶奶|外公|外婆|姥姥|姥爷|爸爸|妈妈|大人|老人|别人|家里)的" + gap(6) + r"(药|片|胶囊)"
SWALLOW = r"吃|吞|咽|误服|喝"
SMALL_OBJECT = r"纽扣电池|电池|磁力珠|磁珠|磁铁|硬币|钉子|别针|刀片|洗衣凝珠|干燥剂"
POISON = "|".join((
    r"(喝|吃|服|误|吞|沾|溅|吸|闻|打)(了|下|入)?" + gap(6) + r"(农药|敌敌畏|滴滴畏|百草枯|草甘膦|老鼠药|鼠药|杀虫剂|除草剂|蟑螂药)",
    r"(农药|敌敌畏|滴滴畏|百草枯|老鼠药|鼠药|杀虫剂)" + gap(6) + r"(中毒|喝|吃|服|吞)",
    r"(吃|吞|服|喝)(了|下)?" + gap(6) + r"(一整瓶|整瓶|一瓶|半瓶|一大把|一把|几十|[1-9][0-9]+|十几|二十|三十|一板|整板|一盒|整盒)" +
    gap(4) + r"(药|片|粒|颗|胶囊|安眠|安定)",
    r"(食|吃)了?(成樽|成瓶|成盒|一樽)|(很多|好多|大量|一堆)的?(安眠药|安定|药片|药丸|降压药|降糖药|退烧药|止痛药|胰岛素|感冒药)",
    r"(一整瓶|整瓶|一整盒|整盒|一盒|一瓶|半瓶|一大把|一把|一板|整板|几十|好几十|十几)" + gap(4) + r"\w{0,6}(药|片|粒|颗|丸|胶囊|安眠|安定|芬|酚|西泮|唑仑)" + gap(6) + r"(吃|吞|服|喝)(了|下|掉)",
    r"(吃|吞|服|喝)(了|下)?" + gap(6) + r"(一整瓶|整瓶|一整盒|整盒|一盒|一瓶|半瓶|一大把|一板|整板|几十|好几十|十几)" + gap(4) + r"\w{0,6}(药|片|粒|颗|丸|胶囊|安眠|安定|芬|酚|西泮|唑仑)",
    r"(药|片|胶囊)" + gap(4) + r"(吃|吞)了" + gap(2) + r"(好几|十几|几十|一把|一堆|很多|好多|一整)|不知道(吃|吞)了(几|多少)",
    r"(好几|十几|几十|一把|一堆|很多|好多)(片|粒|颗)的?" + gap(2) + r"(安定|安眠|药|地西泮|艾司唑仑|阿普唑仑|扑热息痛|布洛芬|对乙酰氨基酚|降压|降糖)",
    r"(?<![0-9.])([1-9][0-9]|[1-9][0-9]{2})(片|粒|颗)|(一整板|一整瓶|一整盒)" + gap(2) + r"(扑热息痛|对乙酰氨基酚|布洛芬|阿司匹林|安定|安眠药|地西泮|艾司唑仑|阿普唑仑|降压药|降糖药|二甲双胍|感冒药|退烧药|止痛药)",
    r"(消毒液|消毒水|消毒剂|84|洗洁精|洁厕|漂白|清洁剂|洗衣液|农药|敌敌畏|百草枯|老鼠药|汽油|煤油|甲醇)" + gap(8) + r"(喝|吃|吞|咽)(了|下|进)|(喝|吃|吞|误)(了|下)?" + gap(12) + r"(消毒液|84消毒|洁厕|漂白水|农药|敌敌畏|百草枯|老鼠药)",
    r"偷吃|误吃|误服|误食|误喝|误吞|当(成)?糖" + gap(2) + r"吃|(药|药片|药丸)" + gap(6) + r"被" + gap(6) + r"(吃|吞)",
    r"(喝|吃|吞|误)(了|下)?" + gap(6) + r"(消毒液|消毒水|消毒剂|84|洗洁精|洁厕|漂白|清洁剂|洗衣液|洗衣凝珠|" + ACID + r"|汽油|煤油|火碱|烧碱|干燥剂|水银|甲醇|工业酒精|假酒|疏通剂|除垢剂|纽扣电池|电池|磁铁)",
    r"(84|消毒液|漂白)" + gap(8) + r"(洁厕|混)",
    r"当(成|作)" + gap(6) + r"(喝|吃)|(一百|几十|[二三四五六七八九]十)多?(片|粒|颗)|(药|片|胶囊|布洛芬|扑热息痛|对乙酰氨基酚|阿司匹林|安眠药|降压药|降糖药|感冒药)" + gap(4) + r"(吃|吞)了" + gap(2) + r"(半盒|半瓶|一盒|一瓶|一板|整盒|整瓶)",
    r"一氧化碳|煤气中毒|煤气泄漏|燃气泄漏|烧炭|酒精中毒|食物中毒|(?<!铅)(?<!像)(?<!跟)(?<!难吃到)中毒(?!性)",
    r"(毒|野)蘑菇|吃了" + gap(4) + r"蘑菇" + gap(8) + r"(吐|拉|晕|难受|看东西)",
))
HEAD_HIT = (r"头" + gap(4) + r"(大包|鼓包|起包|鼓个|肿了个包|破了)|(头|脑袋|后脑|额头|脑门)" + gap(8) + r"(撞|磕|摔|砸|碰|打|着地|受伤|挨)|"
            r"(撞|磕|摔|砸|碰|打)(到|了|在|伤|破)?" + gap(6) + r"(头|脑袋|后脑|额头|脑门)|"
            r"(摔倒|摔了一?跤|跌倒|车祸|被车撞|(摔|掉|跌|滚|栽)下(来|去))")
EAR_NOSE_FLUID = r"(耳朵|鼻子)" + gap(6) + r"(流|出)" + gap(6) + r"(血|水|液)"
HEAD_SIGNS = (EAR_NOSE_FLUID + r"|记不得|同样的话|一样的话|同一个问题|软软的|软绵绵|不哭了|不吃奶|说不上来|同一句话|问了好几遍|越来越没劲|" + DROWSY + r"|昏昏欲睡|叫醒" + gap(3) + r"又睡|又睡着|" + r"(?<!喝)吐|呕|恶心|昏睡|嗜睡|迷糊|犯困|想睡|睡不醒|叫不醒|不认识人|认不出|说胡话|糊涂|反应" + gap(2) + r"(慢|迟钝)|"
              r"记不起|想不起|不记得|意识|晕过去|昏迷|耳朵" + gap(4) + r"(出血|流血|流水)|鼻子" + gap(4) + r"流" + gap(2) + r"(清水|水)|"
              r"颠三倒四|语无伦次|重复(问|说)|含糊|说话不清|呆|" + ALTERED + "|"
              + SEIZE + r"|瞳孔|头(痛|疼)" + gap(4) + r"(越来越|加重|厉害)|走路不稳|站不稳|一直睡")
HIGH_PLACE = (r"(楼|楼上|楼梯|梯子|高处|树|屋顶|房顶|脚手架|阳台|窗台|窗户|楼顶|天台|山|崖|" + NUM + r"+楼|" +
              NUM + r"+(米|层))")
FALL = "|".join((
    r"(房顶|屋顶|梯子|树上|脚手架|阁楼|楼梯|架子)" + gap(8) + r"(摔|掉|跌|坠|栽|踩空)",
    r"(从|在)" + gap(8) + HIGH_PLACE + gap(6) + r"(摔|掉|跌|坠|滚|栽)",
    r"坠落|坠楼|高空坠|(摔|掉|跌|坠|滑)下(来|去)?" + gap(4) + NUM + r"+(米|层|楼)",
    r"爬" + gap(4) + r"(树|梯|墙|屋顶|房顶|电线杆|杆|脚手架|架子)" + gap(12) + r"(摔|掉|跌|坠|栽)|(上铺|高低床)" + gap(6) + r"(摔|掉|跌)",
))
BURN = "|".join((
    r"(烧伤|烫伤|烧着|着火|火烧|开水|热水|热油|滚油|油锅|蒸汽|火焰|爆炸|硫酸|强酸|强碱|石灰|烫)" + gap(12) +
    r"(大面积|一大片|一大块|半个|整个|整条|整只|全身|满身|胸口|后背|脸上|面部|肚子|大腿|好几处|" +
    r"起了(好多|很多|一片|大)|皮都(掉|脱|烂|没)|发黑|发白|焦|烧焦)",
    r"(大面积|全身|整条|半身|一大片)" + gap(6) + r"(烧伤|烫伤|烫|烧)",
    r"(脸|面部|头面部|眼睛|会阴|胸口|后背|大腿|手臂|全身|半身)(上|部)?" + gap(3) + r"(烧伤|烧焦|烧烂|炸伤|烫烂)",
    r"(洁厕灵|洁厕|84|消毒液|漂白|清洁剂|石灰|硫酸|盐酸|强酸|强碱|火碱|烧碱|生石灰|化学品)" + gap(6) + r"(溅|进)" + gap(2) + r"眼|(硫酸|盐酸|强酸|强碱|火碱|烧碱|生石灰|化学品)" + gap(6) + r"(溅|泼|洒|进|烧|弄到)",
    r"(?<!像)(?<!想)(?<!如)触电(?!一样|一般|般|似的|的感觉|感)|(?<!静)(?<!静电)被电(打|击|到|了)|(?<!静)(?<!静电)电(到|了)一下|插座" + gap(6) + r"(电|麻)|电击|雷劈|被雷|(火灾|着火|失火)" + gap(8) + r"(吸|呛|烟)|烧伤面积" + gap(4) + r"大",
))
INJURY = r"滑下|滑倒|绊倒|踩空|摔|跌|撞|车祸|砸|掉下|滚下|栽下"
INJURY_SIGNS = (r"躺了" + gap(6) + r"(多久|一晚|一夜|好久|几个小时)|人冰凉|大腿根|髋|起不来|搬不动|歪了|咔嚓|往外撇|没(有)?知觉|没感觉了|抬不起|不能动|瘫|弯得不对|畸形|错位|动不了|站不起来|爬不起来|变形|外翻|弯成|骨头" + gap(2) + r"(露|戳|出来)|(喘气|呼吸|吸气)" + gap(2) + r"(很|特别)?(疼|痛)|"
                r"胸廓|一边胸" + gap(4) + r"不动")
FIRE = r"爆炸|着火|火灾|失火|烟|烧"
INHALATION = r"嘶哑|哑了|黑痰|痰" + gap(3) + r"黑|咳" + gap(6) + r"黑|吸了" + gap(4) + r"烟|鼻毛" + gap(2) + r"烧"
STINGS = r"一群|一窝|好多只|几十|二三十|三四十|[2-9][0-9]个|十几|满身|全身|好几十"
IMMUNE_LOW = r"化疗|白细胞" + gap(2) + r"(很低|低|少)|粒细胞" + gap(4) + r"(减少|缺乏|很低|低|少)|免疫抑制|器官移植|移植后"
SCALD = r"滚汤|汤|粥|泼|炸了|爆了|(?<![发高低退])烧(?!烤|饭|菜|香|钱|纸|水|退|到?[0-9三四])|着火|火(?!锅|车|气|腿)|烫|烧伤|开水|热水|热油|滚油|热汤|油锅|蒸汽|火焰|爆炸"
BURN_EXTENT = (r"皮(是)?白的|皮发白|好大的?(水)?泡|泼" + gap(4) + r"(脸|胸|身上|腿)|烧到" + gap(4) + r"(脖子|脸|胸|和)|好多地方|好几处|烧黑|烧焦|两条腿|一片一片|全烫|脱皮|起晒泡|成块|成片|大块|一大片|大面积|一大块|全身|满身|从" + gap(6) + r"到|(胸口|肚子|后背|脸|大腿)和|起泡" + gap(4) + r"(一大片|好多|很多|一片)|"
               r"(好多|很多|一片|大)的?(水)?泡|皮" + gap(2) + r"(掉|脱|烂|没)了?")
HEAT = r"中暑|大中午|地里干活|干农活|大太阳|半马|全马|跑完|越野|马拉松|长跑|跑步|军训|训练|高温|太阳底下|暴晒|工地|桑拿|闷热|大热天|烈日|晒了|热得|车里|天太热|热射|(没|不)开空调|空调坏|屋里" + gap(2) + r"热|蒸笼"
HEAT_DANGER = (DROWSY + r"|反应" + gap(2) + r"(慢|迟钝|差)|不怎么出汗|不太出汗|昏|晕倒|叫不醒|神志|意识|说胡话|胡言乱语|" + SEIZE + r"|不出汗|皮肤" + gap(3) + r"(烫|干)|"
               r"(体温|烧到|烧)" + gap(4) + r"(4[0-2]|四十)|糊涂|迷糊|没反应|倒下|滚烫|浑身" + gap(2) + r"烫|" + ALTERED)
CO_SOURCE = r"烧" + gap(2) + r"炭|炭" + gap(2) + r"取暖|烤火|炭盆|炭火|炭炉|煤炉|炉子|热水器|烧煤|蜂窝煤|门窗紧闭|(关|闭)(着|紧)?门窗|火锅.{0,4}炭|煤气|燃气"
CO_SIGNS = r"头晕|头疼|头痛|恶心|想吐|(?<!喝)吐|晕倒|晕在|倒在|没力气|迷糊|昏|叫不醒|嘴唇" + gap(2) + r"(红|樱桃)"
ANIMAL_BITE = r"(狗|猫|猴|狼|熊|野猪|马|驴|牛|动物|藏獒)" + gap(6) + r"(咬|拱|顶|踩|抓|撞)"
DEEP_BITE = (r"大口子|看(到|得见)里面|肠子|很深|好深|深可见|肉都|撕|一大块|血" + gap(4) + r"(流|止|一直|冒)|好多血|很多血|骨头|见骨|翻出|多处|好几口|好几处|"
             r"咬" + gap(4) + r"(脸|脖子|头)")
BITE = "|".join((
    r"蛇" + gap(6) + r"(咬|伤)|被" + gap(4) + r"蛇|毒蛇",
    r"(一群|好多|很多|一窝)?(马蜂|黄蜂|胡蜂|蜂)" + gap(6) + r"(蜇|蛰|叮)" + gap(8) + r"(几十|很多|好多|十几|满身|全身|好几十)",
))
PREGNANT = (r"羊水|脐带|怀" + gap(2) + r"胎|(月经|例假|大姨妈)" + gap(4) + r"(推迟|没来|晚了)|验孕棒|两条杠|(?i:hcg)|怀孕|孕(早期|中期|晚期|期|妇|" + NUM + r"+周|" + NUM + r"+个月)|停经|妊娠|怀了|身孕|胎动|预产期|"
            r"怀着|快生了|待产|" + NUM + r"+周的?(孕|身孕)")
PREG_DANGER = "|".join((
    r"(出血|流血|见红|阴道" + gap(4) + r"血)" + gap(6) + r"(很多|好多|不止|大量|湿透|一大片|止不住|像来月经一样)|大量出血|大出血",
    r"(肚子|腹|小腹|下腹)(部)?" + gap(6) + r"(" + SEVERE + r"|绞痛|一阵比一阵)|剧烈的?(腹痛|肚子疼|肚子痛)",
    r"(一侧|一边|左边|右边|左下|右下|左侧|右侧)" + gap(4) + r"(肚子|腹|小腹|下腹)" + gap(6) + r"(疼|痛)|(肚子|小腹|下腹)" + gap(4) + r"(一侧|一边|左边|右边)" + gap(4) + r"(疼|痛)",
    r"羊水" + gap(4) + r"(绿|黄|浑|破)|流了?" + gap(3) + r"(一大股|一股|好多)水|脐带" + gap(4) + r"(掉|脱|出来)|一闪一闪|闪光|" + SEIZE + r"|(摔|撞|跌|踢)" + gap(6) + r"(肚子|腹部)|肚子着地|眼睛" + gap(2) + r"(往上翻|上翻)|翻白眼|(?<![腿脚])抽筋|全身抖|浑身抖|抖个不停|迷糊|(下面|下身|阴道)" + gap(6) + r"(流水|哗哗|流出水|流出" + gap(3) + r"水)",
    r"模模糊糊|模糊|看东西" + gap(3) + r"(花|模糊)|眼花|看不清|视物模糊|看东西模糊|眼前发黑|冒金星|重影|抽搐|晕倒|昏倒",
    r"(感觉不到|摸不到|没有了?)胎动|没(有)?感觉到" + gap(4) + r"(孩子|宝宝|胎儿)" + gap(2) + r"动|没(有)?感觉到" + gap(2) + r"胎动|胎动" + gap(4) + r"没(有)?感觉|感觉不到" + gap(4) + r"(宝宝|胎儿|孩子)?" + gap(2) + r"动|(宝宝|胎儿)" + gap(4) + r"(不动了|没动静|不怎么动)|胎动" + gap(6) + r"(少|减少|变少|不明显)|羊水破|破水|胎动" + gap(4) + r"(消失|没了|感觉不到|明显减少|不动了)|宫外孕|血压" + gap(4) + r"(很高|1[6-9][0-9]|2[0-9][0-9])",
))
PREG_BLEED = r"出血|流血|见红|血"
PREG_PAIN = r"(?<!不)(疼|痛|硬|发紧|紧|下坠|坠)"
HEADACHE = r"(头|后脑勺?|脑袋|脑子)(痛|疼)|(头|后脑勺?|脑袋)" + gap(6) + r"(痛|疼)"
HEADACHE_SEVERE = (r"(头|后脑勺?|脑袋)" + gap(6) + r"(剧烈|剧痛|炸|裂|爆|要命|受不了|从来没有|从没这么|这辈子最|最厉害|最严重|最痛|最疼|"
                   r"像被" + gap(3) + r"(锤|打|砸|劈)|撕裂|疼死|痛死|欲裂)|剧烈的?头(痛|疼)|最(严重|厉害|痛|疼)的(一次)?头(痛|疼)")
HEADACHE_WORST = (r"(头|后脑勺?|脑袋)" + gap(6) + r"(像(被|有)" + gap(6) + r"(锤|砸|打|劈|雷|敲|抡|棍)|这辈子最|从来没(有)?(这么|这样|那么)|从没这么|最厉害的一次|"
                  r"最严重的一次)|(?<!一)生中最" + gap(4) + r"头(痛|疼)|(几秒|一秒|一瞬间|一下子)" + gap(6) + r"((疼|痛)到(顶|最)|最(疼|痛))")
HEADACHE_UNLESS = r"偏头痛|老毛病|又犯了|经常|感冒|熬夜"
HEAD_ACCOMP = (DROWSY + "|" + ALTERED + r"|重影|手" + gap(2) + r"麻|(?<!喝)吐|呕|脖子" + gap(4) + r"(硬|僵|发紧|转不动|不能动|低不下|弯不下)|颈" + gap(2) + r"(硬|强直)|"
               r"意识|迷糊|" + SEIZE + r"|看不清|说话不清")
STIFF_NECK = r"脖子" + gap(4) + r"(发硬|硬|僵硬|僵|强直|低不下|弯不下|不能低头)|颈" + gap(2) + r"强直"
NECK_UNLESS = r"落枕|颈椎|睡姿|枕头|电脑|手机|低头|久坐"
ABDOMEN = r"(肚子|腹部|腹|肚皮|小腹|上腹|下腹)"
RIGID = (ABDOMEN + gap(6) + r"(硬得|硬邦邦|板一样|像木板|像石头|绷得|发硬|变硬|硬了|很硬)|板状腹|腹肌紧张|" +
         ABDOMEN + gap(8) + r"(碰都不能碰|一碰就|按一下|不敢碰|不让碰|一按就)" + gap(4) + r"(疼|痛|叫)|" +
         ABDOMEN + gap(6) + r"(疼|痛)得?" + gap(6) + r"(打滚|直不起腰|满头大汗|出冷汗|冒冷汗|受不了|要命|死去活来)")
ABDOMEN_UNLESS = r"痛经|月经(来|期|第)|来月经|经期|例假(来|期)|来例假|大姨妈来|孕|怀|宫缩|胎|吃多|胀气"
ABDOMEN_PAIN = ABDOMEN + gap(6) + r"(疼|痛|绞)"
PAIN_EXTREME = (r"捅了?一刀|像刀|不敢喘|弯起|弯腰|一碰就疼|刀割|刀绞|刀扎|剧痛|剧烈|(疼|痛)得" + gap(4) + r"(打滚|站不起来|站不住|直不起腰|满头大汗|冒冷汗|出冷汗|要命|死去活来|不能动|走不了)|"
                r"弯着腰|(疼|痛)到" + gap(2) + r"(后背|背)")
OBSTRUCTION = (r"(不|没)(有)?(排气|放屁)|不拉" + gap(4) + r"不放|肚子" + gap(4) + r"胀得" + gap(4) + r"(鼓|球|石头)|吐" + gap(6) + r"(绿|黄绿|胆汁|粪)")
TESTIS = r"(蛋蛋|睾丸|阴囊)" + gap(6) + r"(剧痛|突然|肿|疼|痛)"
LOW_SUGAR = r"低血糖|血糖" + gap(8) + r"(低|掉|测不出|(?i:lo)(?![a-z])|(?<![0-9])[0-2]\.[0-9])|糖尿病|胰岛素|降糖药"
REDUCED = (DROWSY + r"|不理(我|人)|傻笑|光笑|冷汗|大汗|叫不醒|喊不醒|昏迷|意识|神志|迷糊|糊涂|说胡话|胡言乱语|答非所问|反应" + gap(2) + r"(慢|迟钝)|不认人|认不出|呆|" + ALTERED + "|"
           + SEIZE + r"|晕倒|昏倒|晕过去|没反应|呼之不应|嗜睡|昏睡|喂不进|咽不下")
NO_URINE = (r"只有" + gap(2) + r"(一片|一次)" + gap(2) + r"尿布|换了?" + gap(2) + r"一次尿布|尿" + gap(6) + r"(一点点|很少|深褐|褐色)|(一天|一整天|大半天|" + NUM + r"+个?小时|一晚上|整晚|好久|半天|从早上|昨天|一上午)" + gap(6) +
            r"(没|没有|不)(有)?(尿|小便|撒尿|尿尿|排尿)|尿(量)?" + gap(3) + r"(很少|特别少|几乎没有|没了|都没有)|"
            r"没(有)?(尿|小便)了?|尿不湿" + gap(6) + r"(干|没湿)|尿布" + gap(4) + r"干")
FLUID_LOSS = r"淘米水|没(好好)?喝水|喝水" + gap(2) + r"少|不喝水|米汤(样|一样)|(?<!喝)吐(?!泡|痰|口水|舌)|呕|拉|腹泻|泻|喝不进|不吃不喝|喝水" + gap(2) + r"吐|脱水|吃不下|喝不下|吃不进|滴水不进"
DRY_SIGNS = (DROWSY + r"|蔫|没精神|嘴巴" + gap(2) + r"干|有气无力|半天不回去|囟门" + gap(3) + r"(凹|陷)|哭声" + gap(6) + r"弱|嘴唇" + gap(2) + r"干(裂|起皮)|嗜睡|不回弹|弹不回来|回弹" + gap(2) + r"慢|昏昏欲睡|眼窝" + gap(3) + r"(凹|陷)|前囟" + gap(3) + r"(凹|陷)|哭" + gap(3) + r"没(有)?眼泪|皮肤" + gap(4) + r"(回弹|弹不回|皱)|"
             r"叫不醒|没反应|昏睡|精神" + gap(4) + r"(萎靡|很差|极差)|软绵绵")
SELF_HARM = "|".join((
    r"(?<!累得)(?<!热得)(?<!饿得)(?<!困得)(?<!烦得)(?<!笑得)(?<!疼得)(?<!痒得)(?<!累的)(?<!疼的)(?<!吃到)(?<!难吃得)(?<!丑到)(?<!尴尬到)(?<!尴尬得)(?<!无聊到)(?<!无聊得)(?<!得我)(?<!得人)想死(?!你|我|他|她|了你|人|孙|外孙|儿子|女儿|闺女|宝宝|孩子|妈|爸|老公|老婆|媳妇|爷爷|奶奶|姥|家|大家)",
    r"不想活|活不下去|活着(没|没有)?(什么)?(意思|意义)|活够了|自杀|轻生|寻死|结束(自己的?)?(生命|一切|这一切)|了结(自己|一切)",
    r"(吃|喝)多少" + gap(4) + r"(能|会|才)" + gap(2) + r"(死|睡过去|醒不过来|不醒)|睡过去不醒|一睡不醒|如果我" + gap(4) + r"不在了|我不在了以后|"
    r"(药|安眠药)" + gap(6) + r"(攒|囤|找出来|数出来|数了|够了|凑够)(好|够|齐)?了?|(划|割|切)" + gap(4) + r"(手腕|手臂|胳膊|自己|血管)|(手腕|手臂|胳膊)" + gap(4) + r"(划|割|切)(了|开|破)|结束自己|一起死|同归于尽|"
    r"(开|拧|放)煤气" + gap(8) + r"死|自残|自伤|割腕|割(自己|手腕|手臂)|伤害自己|跳楼(?!价|大甩卖)|跳河|跳江|跳海|跳桥|卧轨|上吊",
    r"(从|往)" + gap(8) + r"(楼|桥|天台|阳台|窗|顶楼|楼顶)" + gap(6) + r"跳|(楼|桥|天台|阳台|窗户|楼顶)" + gap(4) + r"跳下去",
    r"遗书|遗言|绝笔|写好了" + gap(6) + r"(信|遗)|交代" + gap(3) + r"后事|(告别|永别)" + gap(6) + r"(家人|大家|所有人|世界)|"
    r"(家人|大家|所有人|世界|朋友|爸妈)" + gap(4) + r"(告别|永别|道别|说再见|说了再见|说声再见|说一声再见)|不会再麻烦|不再麻烦|不给" + gap(4) + r"添麻烦了",
    r"(攒|存|囤)(了|够)?" + gap(6) + r"(安眠药|药)|(安眠药|药)" + gap(6) + r"(攒|存|囤)(好|够|齐)?了?|一了百了|离开这个世界|没有我" + gap(6) + r"更好|不(想|要)(再)?醒来|再也不(用|要|想)?醒",
    r"下辈子|来世|来生|(想|在想|琢磨)" + gap(6) + r"(怎么|怎样|如何)死|(怎么|怎样|如何)死(最|才|比较)|(选|看|找)好了?" + gap(4) + r"(地方|日子)|"
    r"(要不要|想|准备|打算)(往下)?跳(下去)?$|往下跳|故意" + gap(6) + r"(吃|吞|喝|割|撞)",
    r"(?<!你)去死|死了算了|死了就好|不如死了|想不开|想(要)?(彻底)?解脱(?!出来)",
    r"(现在|此刻|正)" + gap(2) + r"(站|坐)在" + gap(6) + r"(桥|楼顶|天台|江边|河边|悬崖|窗台)|脚" + gap(4) + r"悬在|"
    r"(吃|喝)" + gap(4) + r"(死人|会死|能死)|致死量|多少片" + gap(4) + r"(死|致命)|站在" + gap(4) + r"(天台|楼顶|顶楼|桥|窗台|阳台|江边|河边|楼边)" + gap(10) + r"跳|死给" + gap(4) + r"看|跳下去" + gap(6) + r"解脱",
))
SELF_HARM_UNLESS = r"开玩笑|一边笑|笑着说|新闻|电视|电影|小说|剧里|报道|书里|游戏里"
WATER = r"(河|湖|池|塘|井|海|江|水里|水中|水缸|水桶|泳池|游泳池|水库|澡盆|浴缸|粪坑)"
DROWNING = (r"(脸|头|口鼻)" + gap(2) + r"(埋|扎|泡|浸|闷)(在|进)" + gap(2) + r"水|溺水|溺亡|落水|呛水|淹(着|到|了)|(趴|栽|倒|扎)(在|进|到)" + gap(4) + r"(水|" + WATER[1:-1] + r")|(掉|跌|摔|栽|滑)(进|到|入|在|下)?" + gap(4) + WATER + r"|"
            r"从" + gap(2) + WATER + gap(4) + r"(捞|救|拉)(上来|出来)|(捞|救)上来")
CHOKING_NOW = r"(被|突然)?(噎住|卡住喉咙|卡住了喉咙)了?@@经常|容易|老是|总是|有时"
BP_HIGH = r"血压" + gap(6) + r"(1[89][0-9]|2[0-9][0-9])"
BP_EXTREME = r"(血压|高压|收缩压)" + gap(6) + r"(2[2-9][0-9])(?![0-9])"  # 220 and over: the emergency department whatever else
BP_MEASURED = r"(测|量)(了|出)?" + gap(4) + r"(1[89][0-9]|2[0-9]{2})"
BP_SIGNS = r"胸口" + gap(2) + r"(痛|疼|闷)|头(痛|疼)|头" + gap(3) + r"(痛|疼|晕)|胸(痛|疼|闷)|看不清|眼花|视物模糊|恶心|(?<!喝)吐|说话不清|手脚" + gap(2) + r"麻|心慌"
FEVER_ANY = r"发烧|发热|高烧|高热|烧到|体温" + gap(4) + r"(3[89]|4[0-2])"
PURPLE_RASH = r"(紫色|紫红|紫黑|暗红)" + gap(4) + r"(斑|点|疹|块)|出血点|瘀斑|淤斑|紫癜|按" + gap(4) + r"不(褪|退|消)"
HELP = r"救命(啊|呀)?$|快救|救救(我|他|她|孩子|我的|我爸|我妈|我老|宝宝)|快来人"
DESPAIR = r"不想(再)?(拖累|连累|撑)|撑不住了|拖累|连累|成了负担|撑不下去|熬不下去|坚持不下去|活着太累|没有希望|绝望"
MEANS = (r"(药|安眠药)" + gap(4) + r"(都在|摆在|放在|摆好)|(药|绳子|绳|刀|炭|农药)" + gap(6) + r"(准备好|买好|备好|攒|数出来)|(买好|准备好|备好)了?" + gap(4) + r"(炭|木炭|绳|药|刀|农药|胶带)|"
         r"(窗户|门窗|门缝)" + gap(4) + r"(封|贴)|药" + gap(2) + r"((都|全部?)(吞)(了|掉|光)|(都|全部?)吃(掉|光)|全部?吃了)|"
         r"把" + gap(8) + r"药" + gap(2) + r"(都|全部?)(吃|吞)(了|掉|光)")
PLAN = MEANS + r"|今晚" + gap(4) + r"结束|结束吧|了结|最后一天"
FAREWELL = r"谢谢" + gap(4) + r"(这些年|照顾)|别找(我|他|她)|不要找(我|他|她)|谢谢你" + gap(2) + r"陪我|对不起(大家|你们|爸妈|爸爸妈妈|所有人)|不想回去了|永别|下辈子|再见了|最后一天|托付给"
EDGE = r"(桥|楼顶|天台|顶楼|窗台|阳台|江边|河边|悬崖)"
JUMP = r"跳下去|往下跳|跳了算了|跳楼|跳河|跳江|解脱|结束|不想活"
GIVE_AWAY = r"(东西|存款|钱|宠物|猫|狗|遗物)" + gap(6) + r"(分给|送给|留给|交给|送人|送出去)"
NO_FUTURE = r"(以后|再也|反正)" + gap(4) + r"(用不上|用不着|不需要了)|再见|不会再"
INFANT_FEVER = r"烧到?" + gap(2) + r"(3[89]|4[0-2]|三十[八九]|四十)"
INFANT_MONTHS = r"(?<![0-9十])[1-3一二两三]个(多)?月"
INFANT = (rf"新生儿|满月|(宝宝|孩子|婴儿|女儿|儿子)(才|刚|刚刚)?(出生)?(?<![0-9])([1-9][0-9]?|[一二三四五六七八]十[一二三四五六七八九]?|[一二三四五六七八九十])天|{INFANT_MONTHS}大|{INFANT_MONTHS}的(宝宝|孩子|婴儿|小孩|女儿|儿子)|"
          rf"(宝宝|孩子|婴儿|女儿|儿子)(才|刚|刚刚)?(出生)?{INFANT_MONTHS}|(出生|生下来)" + gap(2) + NUM + r"+天")
FEVER = r"发烧|发热|高烧|高热|体温" + gap(2) + r"(3[89]|4[0-2])|" + INFANT_FEVER


RULES: tuple[RedFlag, ...] = (
    RedFlag("chest_pain", "胸痛伴出汗、气短、放射到左臂/后背/下巴，或胸口像被重物压住、撕裂样疼，可能是心肌梗死或主动脉夹层。" + CALL_120,
            ((CHEST_PAIN, ACS_SIGNS), (CHEST_SEVERE,), (CHEST_PAIN, PAIN_SEVERE), (TEARING,), (HEART_ATTACK,),
             (CHEST_PAIN, CHEST_SIMILE), (CHEST_PAIN, CARDIAC_HISTORY), (CHEST_PAIN, LOW_BP),
             (r"(背|胸)" + gap(4) + r"(疼|痛)", r"像" + gap(8) + r"撕|撕扯|撕开"),
             (CHEST_DISCOMFORT, CHEST_STRONG), (CARDIAC_HISTORY, PROFUSE_SWEAT), (CHEST_PAIN, PERSISTENT), (r"硝酸甘油|速效救心", PERSISTENT + r"|不管用|没用"),
             (r"(胃|上腹)" + gap(4) + r"(不舒服|难受|疼|痛)", r"冷汗|大汗", PALLOR)),
            supersedes=("breathing_difficulty",),
            action="立即停止活动、坐下或半躺休息，不要自己开车去医院；有医生开过的硝酸甘油可按医嘱含服。"),
    RedFlag("stroke", "口角歪斜、一侧肢体无力或麻木、说话不清、突然看不见，可能是脑卒中（中风），越早治疗越好。" + CALL_120,
            ((FACE,), (ONE_SIDE,), (ONE_LIMB, SUDDEN), (SPEECH,), (SUDDEN, VISION_LOSS), (STROKE_NAMES,), (DRAG_LEG, SUDDEN),
             (DRAG_LEG, ALTERED), (APHASIA, SUDDEN), (APHASIA, WEAK), (ONE_LIMB, HEADACHE)),
            action="记下症状开始的时间，让患者躺下、头偏向一侧，不要喂水喂药。"),
    RedFlag("severe_bleeding", "大量或止不住的出血、吐血、咯血或黑便可能危及生命。" + CALL_120,
            ((BLEED,), (BLACK_STOOL, SHOCK_SIGNS), (r"血", STOP_FAILS), (HEAVY_FLOW, FAINT_SIGNS + "|" + COLD_LIMBS + "|" + PALLOR), (PIERCED, r"血"),
             (r"(?<!喝)吐|呕", r"红色|鲜红|暗红", r"一大(碗|口|盆|摊)|好多血|很多血|好几口|半盆|一盆"), (STOP_FAILS, r"华法林|抗凝|阿司匹林|利伐沙班|血友病|划|割|切|伤口|扎"),
             (r"伤口|口子", r"很深|好深|大口子|看(到|得见)里面|见骨|露出|肠子"),
             (BIG_BLEED,)),
            action="用干净的布或纱布用力按压出血处不要松开；吐血时侧躺防止呛咳，不要进食。"),
    RedFlag("self_harm", "你的安全最重要。如果你有伤害自己或结束生命的想法或计划，请立即拨打120或110，或去最近医院的急诊；"
            "也可以拨打全国心理援助热线12356。",
            ((SELF_HARM + U + SELF_HARM_UNLESS,), (GIVE_AWAY, NO_FUTURE), (DESPAIR, PLAN), (EDGE, JUMP + U + SELF_HARM_UNLESS),
             (MEANS, PLAN), (EDGE, FAREWELL + "|" + DESPAIR), (FAREWELL, MEANS), (DESPAIR, MEANS), (GIVE_AWAY, FAREWELL),
             (FAREWELL, r"对不起|电话打不通|联系不上|失联|关机")),
            action="现在就告诉身边信任的人，不要独自一人，把药物、刀具等危险物品移开；拨打12356心理援助热线或120。"),
    RedFlag("child_emergency", "孩子抽搐、呼吸急促费力、嘴唇发紫、叫不醒或吞了异物需要马上救治。请立即拨打120，或马上去最近医院的儿科急诊。",
            ((CHILD, CHILD_DANGER), (CHILD, CHOKE, CHOKE_SIGNS), (CHILD, SMALL_OBJECT, r"吞|咽")),
            supersedes=("breathing_difficulty", "unconsciousness"),
            action="抽搐时让孩子侧躺，不要往嘴里塞任何东西、不要掐人中，记下抽搐持续的时间。"),
    RedFlag("anaphylaxis", "过敏后喉咙发紧、呼吸困难、嘴唇或面部肿胀、头晕站不住，可能是严重过敏反应（过敏性休克）；用药后全身起泡、脱皮、口眼溃烂是严重药疹。" + CALL_120,
            (("过敏性休克",), (ALLERGEN_RECENT, AIRWAY),
             (ALLERGEN, r"(嘴|眼睛|口腔)" + gap(4) + r"(起泡|溃烂|烂了)|皮" + gap(4) + r"(一块块|一碰就|大片)" + gap(2) + r"掉|全身起泡")),
            supersedes=("breathing_difficulty", "unconsciousness"),
            action="远离过敏原，随身有肾上腺素笔立即使用；让患者平躺抬高双腿，呼吸困难时可坐起。"),
    RedFlag("breathing_difficulty", "严重的呼吸困难或被异物噎住可能危及生命。" + CALL_120,
            ((BREATHING + U + BREATH_UNLESS,), (CHOKE, CHOKE_SIGNS), (CHOKING_NOW,)),
            action="让患者坐起、松开衣领；被异物噎住不能说话时立即用海姆立克法（腹部冲击）。"),
    RedFlag("unconsciousness", "晕倒、失去意识、叫不醒、抽搐或没有呼吸是急症。请立即拨打120。",
            ((UNCONSCIOUS + U + EPILEPSY_KNOWN,), (SEIZURE + U + EPILEPSY_KNOWN,), (SEIZE + r"|" + EPILEPSY, SEIZURE_LONG)),
            action="让患者侧躺保持呼吸道通畅，不要喂水；没有呼吸或心跳时立即开始心肺复苏。"),
    RedFlag("sudden_severe_headache", "突然发生的剧烈头痛（一生中最严重的头痛）伴呕吐或脖子发硬，可能是脑出血或脑膜炎等急症。" + CALL_120,
            ((HEADACHE_WORST,), (HEADACHE_SEVERE + U + HEADACHE_UNLESS, SUDDEN), (HEADACHE_SEVERE + U + HEADACHE_UNLESS, HEAD_ACCOMP),
             (HEADACHE, STIFF_NECK + U + NECK_UNLESS), (r"(头|后脑勺?|脑袋)", r"剧痛|剧烈", STIFF_NECK + U + NECK_UNLESS),
             (HEADACHE, r"越来越(厉害|重|疼|痛)|加重", r"(?<!喝)吐|呕"), (HEADACHE, r"意识(不太|不)清|" + DROWSY + "|" + ALTERED),
             (r"眼(睛|球)?" + gap(4) + r"(剧痛|胀痛|疼得)", r"彩虹|虹视|光圈|看不清|恶心|(?<!喝)吐"),
             (HEADACHE, r"炸开|要炸|炸了|爆了|要爆|裂开|劈开", SUDDEN + r"|(?<!喝)吐|呕|" + ALTERED)),
            action="让患者安静躺下，不要自行服用止痛药掩盖症状，记下头痛开始的时间。"),
    RedFlag("poisoning", "误服或过量服用药物、喝了农药或清洁剂、一氧化碳（烧炭、煤气）中毒需要尽快救治。" + CALL_120,
            ((POISON,), (CO_SOURCE, CO_SIGNS), (OTHERS_MEDS, SWALLOW, CHILD), (r"酒", r"安定|安眠|镇静|地西泮|艾司唑仑|阿普唑仑|氯硝西泮"),
             (CHILD, r"药(盒|瓶)" + gap(2) + r"(空|少了|不见)", DROWSY + r"|站不稳|困|晃|" + ALTERED),
             (r"除草剂|农药|敌敌畏|百草枯|老鼠药|杀虫剂|消毒液|洁厕|清洁剂|漂白|84", r"(?<!喝)吐|嘴(边|里|上)" + gap(6) + r"(味|白|红)|刺鼻", CHILD),
             (r"蘑菇|野生菌|菌子|野菌|菌汤|菌火锅", r"(?<!喝)吐|拉|泻|晕|重影|看东西|幻觉|小人"), (r"草乌|川乌|附子|乌头|断肠草|钩吻", r"麻|心跳|吐|晕"), (CHILD, r"洗衣凝珠|消毒|清洁剂|洁厕|洗厕所|通厕所|马桶|漂白|除草剂|农药|杀虫", r"咬|喝|吃|吞|舔")),
            action="带上药瓶、农药瓶或包装；不要自行催吐；一氧化碳中毒先打开门窗、把人移到空气新鲜处。"),
    RedFlag("head_injury", "头部受到撞击或摔伤后呕吐、嗜睡、意识模糊或耳鼻流液，可能是颅内出血。" + CALL_120,
            ((HEAD_HIT, HEAD_SIGNS), (HEAD_HIT, r"阿司匹林|氯吡格雷|华法林|利伐沙班|达比加群|抗凝|抗血小板|血友病"),
             (HEAD_HIT, ONE_LIMB),
             (r"瞳孔" + gap(4) + r"(一大一小|不一样大|不等大|放大)",), (r"头盔" + gap(4) + r"(裂|碎|破)", HEAD_SIGNS)),
            supersedes=("unconsciousness",),
            action="让患者平躺少动，不要摇晃头部；怀疑颈部受伤时不要搬动，呕吐时整体侧翻。"),
    RedFlag("fall_from_height", "从高处坠落可能有内脏出血、脊柱骨折等看不见的重伤。" + CALL_120,
            ((FALL,), (INJURY, INJURY_SIGNS),
             (r"(脖子|颈|后背|腰|脊)" + gap(4) + r"(着地|摔|撞|砸)", r"麻|没(有)?知觉|动不了|不能动|不敢动")),
            action="不要随意搬动伤者，尤其是头颈和腰背，按压止住外出血，等待急救人员。"),
    RedFlag("burns", "大面积或面部、深度烧烫伤、化学烧伤和触电都需要急救。" + CALL_120,
            ((BURN,), (SCALD, BURN_EXTENT), (FIRE, INHALATION), (SCALD, CHILD, r"起泡|水泡|泡"),
             (r"漏电|电线|插座|电门", r"碰|摸|触|电到|电了")),
            action="触电先切断电源再接触；烧烫伤用流动的凉水冲至少20分钟，不要涂牙膏酱油，不要挑破水泡。"),
    RedFlag("heat_stroke", "高温下出现意识不清、抽搐、高热不出汗，可能是热射病（重症中暑），死亡率很高。" + CALL_120,
            (("热射病",), (HEAT, HEAT_DANGER)),
            supersedes=("unconsciousness",),
            action="立即移到阴凉处，脱去多余衣物，用凉水擦身、扇风降温；神志不清时不要喂水。"),
    RedFlag("bite", "被蛇咬伤、被动物咬出深伤口或被成群蜂蜇，需要尽快急诊处理（抗蛇毒血清、清创、狂犬病处置）。" + CALL_120,
            ((BITE + U + r"梦|属蛇|蛇年",), (r"马蜂|黄蜂|胡蜂|蜂", r"蜇|蛰|叮", STINGS + "|" + DARK_URINE), (ANIMAL_BITE, DEEP_BITE), (r"咬", r"蛇" + U + r"梦|属蛇|蛇年|蛇皮|蛇果"),
             (r"咬", r"牙印|牙痕", r"肿|发黑|发紫|麻"), (r"毒舌咬|被毒舌",),
             (r"咬", r"发紫|发黑|血泡|整条(腿|胳膊)"),
             (r"蝎子|蜈蚣|毒蜘蛛|水母|黑寡妇", r"蜇|咬|叮|扎|蛰"), (r"咬", HIGH_FEVER + r"|寒战|红线|发烧"),
             (r"咬|被" + gap(4) + r"(刺|扎|叮)了", r"牙印|牙痕|两个小点|两个小孔|两个洞", r"肿|发黑|发紫|麻")),
            action="保持安静、咬伤的肢体放低少动，摘下戒指手表；不要用嘴吸、不要切开伤口；动物咬伤用肥皂水和流水冲洗15分钟。"),
    RedFlag("pregnancy_emergency", "怀孕期间大量出血、剧烈或一侧腹痛、头痛眼花、抽搐、破水或胎动消失，可能是宫外孕、胎盘早剥、子痫等急症。" + CALL_120,
            ((PREGNANT, PREG_DANGER), (PREGNANT, PREG_BLEED, PREG_PAIN), (r"宫外孕", PREG_BLEED), (r"宫外孕", PREG_PAIN), (r"宫外孕" + gap(2) + r"(破|裂)",),
             (r"(产后|生完|刚生|分娩后|剖腹产后|顺产后)", PREG_BLEED + U + r"少量|一点点|正常"),
             (r"产后|生完|刚生|分娩|剖腹产|剖宫产|顺产|月子", HIGH_FEVER)),
            supersedes=("unconsciousness",),
            action="立即左侧卧休息，不要进食，带上孕检资料去有产科的医院。"),
    RedFlag("acute_abdomen", "肚子硬得像木板、一碰就剧痛或疼得打滚，可能是腹膜炎、消化道穿孔等急腹症。" + CALL_120,
            ((RIGID + U + ABDOMEN_UNLESS,), (ABDOMEN_PAIN + U + ABDOMEN_UNLESS, PAIN_EXTREME), (OBSTRUCTION, r"(?<!喝)吐|呕"),
             (TESTIS,), (ABDOMEN_PAIN, r"便血|大便带血|拉血|黑便"), (ABDOMEN_PAIN, LOW_BP + r"|血压低"), (r"动脉瘤", r"疼|痛"),
             (r"(全肚子|整个肚子|满肚子|全腹)" + gap(4) + r"(疼|痛)", FEVER_ANY), (r"右下", r"疼|痛", FEVER_ANY), (ABDOMEN_PAIN, r"硬得|硬邦邦|像石头|石头样|板一样"), (r"右上腹|胆", FEVER_ANY + r"|寒战|打摆子", r"(眼睛|皮肤|脸|眼白)" + gap(4) + r"(发黄|黄了|变黄)|黄疸"), (r"右下(腹|肚子)" + gap(6) + r"(疼|痛)", r"厉害|发烧|发热|弯着腰|走路"),
             (r"疝气|包" + gap(4) + r"(推不回去|回不去|鼓出来)", r"疼|痛|吐"), (r"(肚子|腹)" + gap(4) + r"(被)?(撞|踢|砸|顶)|撞" + gap(4) + r"肚子", FAINT_SIGNS + "|" + PALLOR + r"|越来越(疼|痛)")),
            action="不要吃喝，不要自行服用止痛药，保持能让疼痛减轻的体位。"),
    RedFlag("hypoglycaemia", "糖尿病患者意识模糊、说胡话、抽搐或叫不醒（严重低血糖），或呕吐、呼吸深快、呼气有烂苹果味（酮症酸中毒），是急症。" + CALL_120,
            ((LOW_SUGAR, REDUCED),
             (LOW_SUGAR, r"血糖" + gap(6) + r"(往下掉|还在降|(?<![0-9])[0-2]\.[0-9]|测不出)"), (r"胰岛素|降糖药", r"两遍|打了两次|多打|打重|打多|吃了两次|吃重"),
             (r"糖尿病|血糖", r"烂苹果|喘" + gap(2) + r"大气|(喘气|呼吸)" + gap(4) + r"(深|大口)")),
            supersedes=("unconsciousness",),
            action="能吞咽时立即喂糖水或含糖饮料；叫不醒或不能吞咽时不要喂，让患者侧躺。"),
    RedFlag("severe_dehydration", "上吐下泻后长时间没有尿、精神萎靡或叫不醒、眼窝凹陷，是严重脱水。" + CALL_120,
            ((NO_URINE, FLUID_LOSS), (FLUID_LOSS, DRY_SIGNS),
             (FLUID_LOSS, FAINT_SIGNS + "|" + LOW_BP + "|" + TACHY),
             (DRY_SIGNS, NO_URINE),
             (FLUID_LOSS, COLD_LIMBS + r"|脉搏" + gap(4) + r"(弱|摸不到|很快)|摸不到" + gap(2) + r"(跳|脉)|起不来")),
            action="能喝就少量多次喂口服补液盐，叫不醒时不要喂水，尽快去医院输液。"),
    RedFlag("infant_fever", "三个月以下的婴儿发烧需要尽快由医生检查。请马上去最近医院的儿科急诊；如精神差、吃奶差请拨打120。",
            ((INFANT, FEVER), (INFANT, r"(手心|脚心)" + gap(4) + r"黄|黄(得|的)(厉害|很)|吃奶" + gap(4) + r"(没劲|无力|不吃|很差)")),
            action="不要捂热，减少衣物，不要自行给退烧药，记录体温后马上就医。"),
    RedFlag("drowning", "溺水或落水后，即使已经救上来、看起来清醒，也可能在几小时内出现呼吸困难（迟发性肺水肿）。" + CALL_120,
            ((DROWNING,),),
            supersedes=("unconsciousness", "breathing_difficulty", "child_emergency"),
            action="清理口鼻，没有呼吸立即做心肺复苏；已经清醒的也要去医院观察，注意保暖。"),
    RedFlag("sepsis_meningitis", "发烧伴紫色皮疹（按压不褪色）、脖子发硬或意识不清，可能是脑膜炎或脓毒症，进展很快。" + CALL_120,
            ((FEVER_ANY, PURPLE_RASH), (FEVER_ANY, STIFF_NECK + U + NECK_UNLESS), (FEVER_ANY, ALTERED), (FEVER_ANY, DROWSY), (FEVER_ANY, IMMUNE_LOW), (HIGH_FEVER, LOW_BP)),
            supersedes=("unconsciousness",),
            action="记下体温和皮疹出现的时间，不要等退烧再去医院。"),
    RedFlag("hypertensive_crisis", "血压极高（180以上）并伴头痛、胸痛、视物模糊、恶心或说话不清，可能是高血压急症。" + CALL_120,
            ((BP_HIGH, BP_SIGNS), (r"血压", BP_MEASURED, BP_SIGNS), (BP_EXTREME,)),
            action="安静坐下或半躺，不要剧烈活动，不要自行加量服降压药，带上平时吃的药。"),
    RedFlag("heart_rhythm", "心跳极快（每分钟150次以上）或伴眼前发黑、站不住、晕倒，可能是危险的心律失常。" + CALL_120,
            ((VERY_FAST_HR,), (TACHY, FAINT_SIGNS), (CHEST_PAIN, r"(晕倒|晕过去|昏倒|眼前一黑)")),
            action="立即坐下或躺下，不要走动；有人晕倒且没有反应、没有正常呼吸时立即做心肺复苏。"),
    RedFlag("danger_signs", "描述中有危险信号（意识改变、休克表现如血压很低、手脚冰凉、脸色苍白、大汗，或无法忍受的疼痛）。" + CALL_120,
            ((DROWSY, LOW_BP), (DROWSY, TACHY), (DROWSY, COLD_LIMBS), (DROWSY, UNBEARABLE), (DROWSY, HIGH_FEVER),
             (LOW_BP, COLD_LIMBS), (LOW_BP, PALLOR), (LOW_BP, PROFUSE_SWEAT), (LOW_BP, TACHY), (LOW_BP, UNBEARABLE),
             (UNBEARABLE, PALLOR), (UNBEARABLE, COLD_LIMBS), (UNBEARABLE, PROFUSE_SWEAT), (DARK_URINE,),
             (PALLOR, PROFUSE_SWEAT, r"痛苦|疼|痛|痉挛|抽|吐|拉")),
            action="让病人躺下、保暖，不要进食进水，记下症状开始的时间和量到的血压、体温。"),
    RedFlag("call_for_help", "听起来情况紧急。" + CALL_120,
            ((HELP,),),
            action="说清地址和病人现在的情况，保持电话畅通，等待急救人员。"),
)
GENERIC = ("danger_signs", "call_for_help")  # shown only when no specific notice applies

# --- negation, past and general questions -----------------------------------------------------
# A finding is negated when its clause, up to the finding, is a negator, optional filler words and
# optionally a list of other negated items: "没有胸痛、气短和出汗", "也没有明显的呼吸困难", "不胸痛".
# Contrast words end a negation's reach too ("没有胸痛，但是喘不上气"); not 不过, which is in 喘不过气.
CLAUSE_SEPARATORS = re.compile(r"[,，。!！?？;；:：\n]|(?<![0-9])\.|\.(?![0-9])|但是|可是|然而|不过(?!气)")
SENTENCE_END = re.compile(r"[。!！?？\n]")
NEGATORS = r"((没|未)被.{0,4}|没有|没|无|不是|不|未|否认|并无|从未|从没|从来没有?|差点|差一点|险些|别)"
NEGATION_FILLERS = r"(那种|这种|明显的?|任何|什么|出现过?|感到|感觉|觉得|发生过?|想过|想要|想|打算|要|过|有|再|太|怎么|一直|也)*"
NEGATION_LIST = r"([^、和或及]{1,8}(和|或者|或|及|以及|也没有|也没|也无))*"
NEGATED_BEFORE = re.compile(NEGATORS + NEGATION_FILLERS + NEGATION_LIST + r"$")
PAST_BEFORE = re.compile(r"(以前|曾经|得过|患过|去年|前年|小时候|年前|那年|多年前|年轻时|" + NUM + r"+岁(时|的时候))" + gap(8) + "$")
NEGATED_AFTER = re.compile(r"^(住过院|住院过|治好了?|看好了?|是" + gap(4) + r"(年前|年以前|以前|之前)|不明显|没有了|已经(好了|消失|缓解|没事)|消失了|好了|的?病史|史)")
PAST_START = re.compile(r"前几年|早年|的时候|以前|之前|曾经|去年|前年|小时候|年前|上次|那次|那年|上周|上个?月|前几天|前天|那天")
RESOLVED = re.compile(r"(也|都|已经)恢复(了|得)|痊愈了|(现在|目前|已经|早就|后来)(基本|完全|都|也|差不多|已经|彻底|全)*(好了|没事|恢复|正常|痊愈|不疼|不痛|好多了|治好)")
GENERAL_QUESTION = re.compile(
    r"预防|防止|防范|避免|科普|有什么症状|有哪些症状|什么症状|哪些表现|什么表现|前兆|是什么病|遗传|平时要?注意|要注意什么|"
    r"怎么(跟|和|教|告诉).{0,4}(孩子|小孩|宝宝|儿子|女儿)|会引起|会导致|是真的吗|怎么防|如何防|视频里|刷到|哪些" + gap(2) + r"症状|早期症状|怎么识别|如何识别|口诀|是什么意思|(正确的)?处理方法是什么|关于.{0,8}的(电影|电视剧|小说|书|纪录片)|小说里|电视剧|电影里|纪录片|新闻里|话剧|演一个|剧里|游戏里|会不会中毒|会中毒吗|能中毒吗|才能不|才不会|才可以不|怎样才能|需要注意|注意事项|急救知识|学习急救|的原因是什么|怎么判断|如何判断|会不会得|风险大吗|风险高吗|提前了解|先了解|提前准备|以防万一")
PREPARING = re.compile(r"提前学|学一下|提前了解|先了解|提前准备|以防万一|想了解一下|学习一下|科普一下")
CURRENT = re.compile(r"刚|现在|正在|突然|已经|一直|今天")
ASKING_HOW = re.compile(r"怎么|如何|怎样|什么|哪些|吗|呢")
CANTONESE = str.maketrans({"唔": "不", "咗": "了", "佢": "他", "冇": "没", "嘅": "的", "喺": "在", "哋": "们", "嗰": "那", "啲": "些"})
# Hyperbole: an emotion or chore "得/到" a finding ("气到心肌梗塞", "笑到抽搐", "做得我脑溢血"), or a
# clause in internet slang; physical causes ("疼得晕过去", "吐得站不住") are not listed.
FIGURATIVE_BEFORE = re.compile(r"(多|忙|气|虐|折磨|笑|哭|做|改|卷|烦|丑|难吃|尴尬|无聊|心碎|感动|帅|美|甜|酸|emo|干)(得|到)(我|人)?(直接|都|快|要)?$"
                               r"|我直接$|给我干$")
SLANG = re.compile(r"级别|家人们|爱豆|甲方|副本|连跪|彩票|期末|emo|(?i:bug)|(?i:cue)|哈哈哈|xswl|想死的心都有|吐血三升|心碎了?一地|编剧")
MAX_NEGATION_PREFIX = 24  # characters of a clause examined before a finding
# Real consultations (tests/data/safety_real.tsv) mostly tell an illness, not an event: a finding
# said to come and go ("偶尔胸闷", "最近总是头晕、上不来气") is a complaint, not an emergency now
# (not for thoughts of self-harm: "老是想死" is the warning sign itself).
HABITUAL_BEFORE = re.compile(r"(偶尔|偶然|有时候?|时不时|时常|经常|常常|老是|总是|间断|间歇|阵发)(?!不停|不断|一直|持续)")
# A disease's name is an emergency only as something happening now ("我爸可能心梗了"), not as the
# topic of a question ("血压低会引起心梗吗", "心梗患者吃什么"), a diagnosis ("检查发觉是脑梗") or history.
NAME_SUSPECTED = re.compile(r"可能|是不是|怀疑|好像|像是|会不会是|估计|突发|突然|刚|正在|现在|快点|赶紧|怎么办")
NAME_TOPIC = re.compile(r"吗|么|呢|什么|怎么|如何|哪|能否|是否|会不会|严重|治疗|医治|用药|药物|引起|引来|导致|诱发|症状|表现|"
                        r"原因|病人|患者|病史|后遗症|手术|术后|恢复|康复|检查|病症|几种病|这种病|死亡率|致命")
NAME_DIAGNOSED = re.compile(r"(发觉|发现|诊断|确诊|查出|检查出|说是|说|患有|患了|患上|有|轻微|轻度|陈旧|腔隙|多发|因)(为|是|了|过|性)?(的|急性|轻微|轻度|陈旧性?|多发性?|腔隙性?|大面积|小面积)*$")
# An episode the message says was already taken to a doctor ("突然晕倒，送到医院，医生说是癫痫") is
# history: the clauses up to the last such report are dropped unless one of them says it is now.
ATTENDED = re.compile(r"送(去|到|往|进)?了?(医院|急诊|抢救)|(去|到|上|带到|带去)了?" + gap(4) + r"(医院|急诊|诊所|卫生院)" + gap(6) +
                      r"(检查|查|看|拍|做|就诊|诊断|确诊|说)|住院|入院|抢救(过来|回来)|(医生|大夫)(说|诊断|确诊|告诉|讲)|"
                      r"(检查|诊断|确诊|化验)(出|为|是|结果|后|说|发现|发觉)|查出|发觉是|发现是|去(做)?了?检查|(才|后来)(发现|发觉|知道|知晓)" + gap(4) + r"(是|患|得了)")
STILL_NOW = re.compile(r"刚才|刚刚|现在|正在|目前|今天|今晚|此刻|还在|仍然|一直在|到现在")
# A form's field answered "none" ("【放化疗】：没有") names nothing the patient has.
FIELD_NONE = re.compile(r"[^，。；;,!！?？\n:：]{1,14}[:：]\s*(无|没有|否|暂无|未)(?=[（(，。；;,!！\s]|$)")


@lru_cache(maxsize=None)
def _finding(pattern: str) -> tuple[re.Pattern[str], re.Pattern[str] | None]:
    body, _, unless = pattern.partition(U)
    return re.compile(body), (re.compile(unless) if unless else None)


def _first_chars(items) -> tuple[frozenset[str] | None, bool]:
    """(characters one of which every match of the parsed sequence starts with, or None when any
    character may start it; whether the sequence can match the empty string)."""
    found: set[str] = set()
    for op, av in items:
        name = str(op)
        if name == "LITERAL":
            first, empty = frozenset(chr(av)), False
        elif name in ("ASSERT", "ASSERT_NOT", "AT"):
            first, empty = frozenset(), True
        elif name == "IN" and all(str(o) == "LITERAL" or (str(o) == "RANGE" and v[1] - v[0] < 64) for o, v in av):
            first = frozenset(chr(c) for o, v in av for c in ((v,) if str(o) == "LITERAL" else range(v[0], v[1] + 1)))
            empty = False
        elif name == "BRANCH":
            parts = [_first_chars(branch) for branch in av[1]]
            if any(f is None for f, _ in parts):
                return None, False
            first, empty = frozenset().union(*(f for f, _ in parts)), any(e for _, e in parts)
        elif name == "SUBPATTERN" and not av[1] and not av[2]:
            first, empty = _first_chars(av[3])
        elif name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            first, empty = _first_chars(av[2])
            empty = empty or av[0] == 0
        else:
            return None, False
        if first is None:
            return None, False
        found |= first
        if not empty:
            return frozenset(found), False
    return frozenset(found), True


@lru_cache(maxsize=None)
def _starts(pattern: str) -> frozenset[str] | None:
    """The characters a finding's match must start with (a quick test before the regex runs), or
    None when that cannot be told."""
    try:
        from re import _parser as parser  # Python 3.11+
    except ImportError:  # pragma: no cover
        import sre_parse as parser  # type: ignore[no-redef]
    first, empty = _first_chars(parser.parse(pattern.partition(U)[0]))
    return None if first is None or empty else first


def _clauses(text: str) -> list[str]:
    """NFKC, spaces removed, general-knowledge sentences and resolved past episodes dropped, split."""
    flat = unicodedata.normalize("NFKC", text).translate(CANTONESE)
    flat = "".join(ch for ch in flat if ch == "\n" or not ch.isspace())
    sentences = [s for s in SENTENCE_END.split(flat) if s and not GENERAL_QUESTION.search(s)]
    if PREPARING.search(flat):  # "农药中毒一般该怎么急救？想提前了解一下": asking ahead, about nobody now
        sentences = [s for s in sentences if not (ASKING_HOW.search(s) and not CURRENT.search(s))]
    clauses = [c for s in sentences for c in CLAUSE_SEPARATORS.split(FIELD_NONE.sub("", s)) if c]
    return _drop_attended(_drop_resolved_past(clauses))


def _drop_attended(clauses: list[str]) -> list[str]:
    """"前几天突然晕倒，送到医院，医生说是癫痫，怎么治": what came before the report of a visit is history."""
    last = None
    for i, clause in enumerate(clauses):
        match = ATTENDED.search(clause)
        if match:
            last = (i, match.end())
    if last is None:
        return clauses
    i, end = last
    if any(STILL_NOW.search(c) for c in clauses[:i + 1]):
        return clauses
    rest = clauses[i][end:]
    return ([rest] if rest else []) + clauses[i + 1:]


def _drop_resolved_past(clauses: list[str]) -> list[str]:
    """"以前胸口疼出汗，后来治好了": the clauses from the past marker to the resolution are history."""
    kept, start = [], None
    for clause in clauses:
        if start is None and PAST_START.search(clause):
            start = len(kept)
        kept.append(clause)
        if RESOLVED.search(clause):
            del kept[start if start is not None else len(kept) - 1:]
            start = None
    return kept


def _affirmed(regex: re.Pattern[str], unless: re.Pattern[str] | None, clauses: Sequence[str], pattern: str = "") -> bool:
    """Whether the finding occurs in some clause, not negated, not past, not cancelled by its message."""
    if unless is not None and any(unless.search(c) for c in clauses):
        return False
    for clause in clauses:
        for match in regex.finditer(clause):
            before = clause[max(0, match.start() - MAX_NEGATION_PREFIX):match.start()]
            after = clause[match.end():]
            past = after.startswith("过") and PAST_START.search(clause)  # "上个月晕倒过一次"
            figurative = FIGURATIVE_BEFORE.search(before) or SLANG.search(clause)  # "做得我脑溢血", "心梗了家人们"
            habitual = pattern not in NOT_HABITUAL and HABITUAL_BEFORE.search(before)
            named = pattern in NAMES and not NAME_SUSPECTED.search(clause) and (
                NAME_TOPIC.search(clause) or NAME_DIAGNOSED.search(before))
            if not (NEGATED_BEFORE.search(before) or PAST_BEFORE.search(before) or NEGATED_AFTER.match(after) or past
                    or figurative or habitual or named):
                return True
    return False


FINDINGS = tuple(dict.fromkeys(p for rule in RULES for group in rule.when for p in group))
NAMES = frozenset((STROKE_NAMES, HEART_ATTACK))  # findings that are a disease's name
NOT_HABITUAL = frozenset(p for rule in RULES if rule.name == "self_harm" for group in rule.when for p in group)


@lru_cache(maxsize=128)
def _findings(text: str) -> frozenset[str]:
    """The findings one message affirms (cached: a dialogue's earlier messages are read again)."""
    clauses = _clauses(text)
    joined = "\n".join(clauses)  # no finding spans a newline (gaps are "." runs), so one search rules most out
    chars = set(joined)
    return frozenset(p for p in FINDINGS
                     if (_starts(p) is None or not _starts(p).isdisjoint(chars)) and _finding(p)[0].search(joined)
                     and _affirmed(*_finding(p), clauses, p))


def _fired(found: frozenset[str]) -> list[RedFlag]:
    return [rule for rule in RULES if any(all(p in found for p in group) for group in rule.when)]


def red_flags(text: str, earlier: Sequence[str] = ()) -> list[RedFlag]:
    """The emergencies ``text`` reveals, alone or completed by the patient's ``earlier`` messages.

    ``earlier``: the patient's previous messages, oldest first; the last ``WINDOW - 1`` are read.
    Returns the flags in ``RULES`` order, without those a broader flag supersedes.
    """
    if not isinstance(text, str) or isinstance(earlier, str):
        raise TypeError(f"red_flags expects the patient's message as a string and earlier messages as a "
                        f"sequence of strings, got {type(text).__name__} and {type(earlier).__name__}")
    earlier = [m for m in earlier if isinstance(m, str)]
    own = _findings(text)
    fired = _fired(own)
    recent = earlier[len(earlier) - (WINDOW - 1):] if WINDOW > 1 and earlier else []
    if recent:
        before = [_findings(m) for m in recent]
        joined = _fired(own.union(*before))
        previous = {r.name for r in _fired(frozenset().union(*before, *[_findings(m) for m in earlier[-WINDOW:-(WINDOW - 1)]]))}
        fired = [r for r in RULES if r in fired or (r in joined and r.name not in previous)]
    redundant = {name for rule in fired for name in rule.supersedes}
    if any(rule.name not in GENERIC for rule in fired):
        redundant.update(GENERIC)
    flags = [rule for rule in fired if rule.name not in redundant]
    if MODEL_BACKSTOP and not flags:
        from bianque.safety_model import backstop  # imported only when switched on

        flags = backstop(text, earlier)
    return flags


def bench(repeats: int = 200) -> dict[str, tuple[float, float]]:
    """Milliseconds per message, (wall, CPU), over a fixed mix of short and long messages, alone and
    with context. CPU time is this process's own: on a busy machine wall time also counts waiting.

    The per-message cache is cleared before every call: the figures are for messages never seen."""
    texts = ["我头疼三天了，一阵一阵的，晚上睡不好。", "突然胸痛，出了一身冷汗，喘不上气。",
             "孩子发烧38度5，精神还可以，吃饭少。" * 4, "没有胸痛，也没有呼吸困难，就是有点咳嗽。" * 10]
    earlier = ["我最近胃不太舒服。", "吃了饭以后更明显，有时候反酸。"]
    out = {}
    for label, ctx in (("alone", ()), ("with_2_earlier", earlier)):
        red_flags(texts[0], ctx)
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(repeats):
            for t in texts:
                _findings.cache_clear()
                red_flags(t, ctx)
        n = repeats * len(texts)
        out[label] = ((time.perf_counter() - start) * 1000 / n, (time.process_time() - cpu) * 1000 / n)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv != ["--bench"]:
        sys.stderr.write("usage: python -m bianque.safety --bench\n")
        return 2
    import platform

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    machine = f"{model}, {os.cpu_count()} CPUs, 1 thread"
    for label, (wall, cpu) in bench().items():
        sys.stdout.write(f"red_flags {label}: {wall:.3f} ms per message wall, {cpu:.3f} ms CPU ({machine})\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
