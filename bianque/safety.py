"""Red flags: patient messages that describe an emergency, whatever the models go on to say.

The rules are data (``RULES``): each names a situation, the phrases that reveal it and the message
the UI shows. A rule fires when, for any one of its ``when`` alternatives, every phrase group is
found AFFIRMED somewhere in the message: "没有胸痛" / "不胸痛" / "无呼吸困难" / "没有胸痛、气短和出汗"
/ "胸痛已经好了" do not count. The matcher errs towards warning: a hypothetical ("如果胸痛出汗怎么办")
still fires, because a needless notice costs far less than a missed heart attack.
Patient text is never logged here.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

CALL_120 = "请立即拨打120，或马上去最近医院的急诊。"


@dataclass(frozen=True)
class RedFlag:
    """One emergency rule. ``when``: alternatives, each a tuple of regexes that must all match."""

    name: str
    message: str
    when: tuple[tuple[str, ...], ...]
    supersedes: tuple[str, ...] = ()  # narrower notices this one makes redundant
    action: str = CALL_120  # one-line safe first-aid action


def flag_dict(flag: RedFlag) -> dict[str, str]:
    """The JSON-able form of a flag (API responses, recorded consultations)."""
    return {"name": flag.name, "message": flag.message, "action": flag.action}


# --- phrase groups (regex alternations) -------------------------------------------------------
CHEST_PAIN = r"胸(口|部|前|前区|骨后)?(剧痛|痛|疼|绞痛|压榨|压迫感|闷痛|憋痛|发紧|闷)|心口(痛|疼)|心绞痛|心前区(痛|疼)"
SWEAT_BREATH_RADIATING = (
    r"出汗|大汗|冷汗|虚汗|出了很多汗|呼吸困难|喘不上气|喘不过气|透不过气|憋气|气短|气促|气急|"
    r"(左|左边的?)(臂|肩|手臂|胳膊)|下巴|下颌|濒死感"
)
STROKE_SIGNS = (
    r"口角(歪斜|歪)|嘴角?歪|口眼歪斜|脸(突然)?歪|面部歪斜|半身不遂|偏瘫|"
    r"(一侧|一边|半边|单侧|左侧|右侧|左边|右边)的?(肢体|身体|身子|手脚|胳膊|手臂|腿|上肢|下肢|脸)"
    r"(突然)?(无力|麻木|发麻|不能动|没力气|没劲|动不了|抬不起来)|"
    r"(言语|说话|讲话|口齿|吐字)(突然)?(不清|含糊|不利索)|突然(说不出话|说不清|说话不清)|"
    r"突然(看不见|看不清|失明|一只眼(睛)?看不见)"
)
SEVERE_BLEEDING = (
    r"大出血|大量出血|出血(很多|不止)|流血不止|血流不止|止不住血|血(怎么也)?止不住|喷血|血往外喷|"
    r"大口(吐|咯|咳|呕)血|吐血|呕血|咯血不止|大量咯血|大量便血|便血很多|柏油样便|黑便"
)
SELF_HARM = (
    r"想死|不想活|活不下去|活着没(有)?(意思|意义)|自杀|轻生|结束(自己的)?生命|了结自己|自残|自伤|"
    r"割腕|伤害自己|跳楼|寻死|离开这个世界"
)
CHILD = r"孩子|宝宝|小孩|儿子|女儿|婴儿|新生儿|幼儿|小朋友|宝贝|个(多)?月大"
CHILD_EMERGENCY = (
    r"抽搐|抽风|惊厥|(?<![腿脚])抽筋|翻白眼|口吐白沫|呼吸困难|喘不上气|喘不过气|呼吸(很|特别|非常)?(急促|快)|"
    r"憋(得|的)?(脸|嘴唇)?(发紫|发青)|嘴唇(发紫|青紫|发青|发绀)|鼻翼扇动|三凹征|昏迷|叫不醒"
)
BREATHING = r"呼吸困难|喘不上气|喘不过气|透不过气|嘴唇(发紫|青紫|发绀)|窒息|卡住.{0,4}(喘不|说不出话)"
ALLERGEN = r"过敏|蜂蜇|蜂蛰|被蜇|被蛰|打针后|打完针|输液后|青霉素|头孢|吃了?海鲜|花生"
AIRWAY_SWELLING = (
    r"喉咙(发紧|肿|堵)|嗓子(发紧|肿)|喉头水肿|呼吸困难|喘不上气|喘不过气|嘴唇(肿|发紫)|舌头(肿|发麻)|"
    r"脸(肿|全肿)|全身(起|出)?(疹子|风团|荨麻疹)"
)
UNCONSCIOUS = r"昏迷|晕倒|昏倒|晕过去|昏过去|失去意识|意识不清|神志不清|不省人事|叫不醒|喊不醒|晕厥|突然倒地|休克"
SUDDEN = r"突然|突发"
WORST_HEADACHE = r"剧烈(的)?头(痛|疼)|头(痛|疼)欲裂|头(痛|疼)得(要)?(炸|裂)|爆炸(样|一样|似)(的)?头(痛|疼)|最(严重|厉害|痛)的(一次)?头(痛|疼)"
POISON = (
    r"误服|误食|喝了?农药|吃了?老鼠药|服毒|中毒|一氧化碳|煤气|百草枯|敌敌畏|吞了?(纽扣)?电池|吞了?磁铁|"
    r"(吃|吞|喝)了?(一整瓶|一瓶|一大把|很多|大量)的?(药|安眠药|药片|消毒液)"
)
PREGNANT = r"怀孕|孕(早期|中期|晚期|期|妇)|停经|妊娠"
PREGNANCY_DANGER = r"大量出血|流血很多|出血很多|剧烈腹痛|肚子剧痛|腹痛剧烈|肚子疼得厉害|晕倒|昏倒"
# An age, not a duration: "两个月大" / "三个月的宝宝" / "宝宝才两个月", never "发烧三个月了".
MONTHS_1_3 = r"(?<![0-9十])[1-3一二两三]个(多)?月"
INFANT = (
    rf"新生儿|满月|{MONTHS_1_3}大|{MONTHS_1_3}的(宝宝|孩子|婴儿|小孩|女儿|儿子)|"
    rf"(宝宝|孩子|婴儿|女儿|儿子)(才|刚|刚刚)?(出生)?{MONTHS_1_3}"
)
FEVER = r"发烧|发热|高烧|高热|体温(3[89]|4[0-2])"

RULES: tuple[RedFlag, ...] = (
    RedFlag(
        "chest_pain",
        "胸痛伴出汗、气短或放射到左臂/下巴，可能是心肌梗死等危急情况。" + CALL_120 + "请保持安静休息，不要自己开车。",
        ((CHEST_PAIN, SWEAT_BREATH_RADIATING),),
        supersedes=("breathing_difficulty",),
    ),
    RedFlag(
        "stroke",
        "口角歪斜、一侧肢体无力或言语不清可能是脑卒中（中风），越早治疗越好。" + CALL_120 + "请记下症状开始的时间。",
        ((STROKE_SIGNS,),),
    ),
    RedFlag(
        "severe_bleeding",
        "大量或止不住的出血很危险。请用干净的布用力按压出血处，" + CALL_120,
        ((SEVERE_BLEEDING,),),
    ),
    RedFlag(
        "self_harm",
        "你的安全最重要。如果你有伤害自己或结束生命的想法，请立即拨打120或110，或去最近医院的急诊；"
        "也可以拨打心理援助热线12356，并告诉身边信任的人，不要独自一人。",
        ((SELF_HARM,),),
    ),
    RedFlag(
        "child_emergency",
        "孩子抽搐、呼吸困难或叫不醒需要马上救治。请立即拨打120，或马上去最近医院的儿科急诊；"
        "抽搐时让孩子侧躺，不要往嘴里塞任何东西。",
        ((CHILD, CHILD_EMERGENCY),),
        supersedes=("breathing_difficulty", "unconsciousness"),
    ),
    RedFlag(
        "anaphylaxis",
        "过敏后喉咙发紧、呼吸困难或面部嘴唇肿胀，可能是严重过敏反应（过敏性休克）。"
        + CALL_120 + "如随身带有肾上腺素笔，请马上使用。",
        (("过敏性休克",), (ALLERGEN, AIRWAY_SWELLING)),
        supersedes=("breathing_difficulty", "unconsciousness"),
    ),
    RedFlag(
        "breathing_difficulty",
        "严重的呼吸困难可能危及生命。" + CALL_120,
        ((BREATHING,),),
    ),
    RedFlag(
        "unconsciousness",
        "晕倒、失去意识或叫不醒是急症。请立即拨打120；让患者侧躺保持呼吸道通畅，没有呼吸时开始心肺复苏。",
        ((UNCONSCIOUS,),),
    ),
    RedFlag(
        "sudden_severe_headache",
        "突然发生的剧烈头痛可能是脑出血等急症。" + CALL_120,
        ((SUDDEN, WORST_HEADACHE),),
    ),
    RedFlag(
        "poisoning",
        "误服药物或毒物需要尽快救治。" + CALL_120 + "请带上药瓶或包装，不要自行催吐。",
        ((POISON,),),
    ),
    RedFlag(
        "pregnancy_emergency",
        "怀孕期间大量出血、剧烈腹痛或晕倒，可能是宫外孕、流产等急症。" + CALL_120,
        ((PREGNANT, PREGNANCY_DANGER),),
        supersedes=("unconsciousness",),
    ),
    RedFlag(
        "infant_fever",
        "三个月以下的婴儿发烧需要尽快由医生检查。请马上去最近医院的儿科急诊；如精神差、吃奶差请拨打120。",
        ((INFANT, FEVER),),
    ),
)

# --- negation ---------------------------------------------------------------------------------
# A phrase is negated when its clause, up to the phrase, is a negator, optional filler words and
# optionally a list of other negated items: "没有胸痛、气短和出汗", "也没有明显的呼吸困难", "不胸痛".
# Contrast words end a negation's reach too ("没有咳嗽但是胸痛"); not 不过, which is inside 喘不过气.
CLAUSE_SEPARATORS = re.compile(r"[,，.。!！?？;；:：\n]|但是|但|可是|然而")
NEGATORS = r"(没有|没|无|不是|不|未|否认|并无|从未|从没|从来没有?)"
NEGATION_FILLERS = r"(明显的?|任何|什么|出现过?|感到|感觉|觉得|发生过?|想过|想要|打算|要|过|有|再|太)*"
NEGATION_LIST = r"([^、和或及]{1,8}(、|和|或者|或|及|以及|也没有|也没|也无))*"
NEGATED_BEFORE = re.compile(NEGATORS + NEGATION_FILLERS + NEGATION_LIST + r"$")
NEGATED_AFTER = re.compile(r"^(不明显|没有了|已经(好了|消失|缓解)|消失了|好了)")
MAX_NEGATION_PREFIX = 24  # characters of a clause examined before a phrase


@lru_cache(maxsize=None)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _clauses(text: str) -> list[str]:
    """NFKC, whitespace removed, split into clauses so negation never reaches across a comma."""
    flat = unicodedata.normalize("NFKC", text)
    flat = "".join(ch if not ch.isspace() else ("\n" if ch == "\n" else "") for ch in flat)
    return [c for c in CLAUSE_SEPARATORS.split(flat) if c]


def _affirmed(pattern: str, clauses: list[str]) -> bool:
    """Whether ``pattern`` occurs in some clause without a negation in front of or right after it."""
    for clause in clauses:
        for match in _compiled(pattern).finditer(clause):
            before = clause[max(0, match.start() - MAX_NEGATION_PREFIX):match.start()]
            after = clause[match.end():]
            if not NEGATED_BEFORE.search(before) and not NEGATED_AFTER.match(after):
                return True
    return False


def red_flags(text: str, earlier: Sequence[str] = ()) -> list[RedFlag]:
    """The emergency rules ``text`` triggers, in ``RULES`` order, without superseded ones."""
    if not isinstance(text, str):
        raise TypeError(f"red_flags expects the patient's message as a string, got {type(text).__name__}")
    clauses = _clauses(text)
    fired = [rule for rule in RULES
             if any(all(_affirmed(p, clauses) for p in group) for group in rule.when)]
    redundant = {name for rule in fired for name in rule.supersedes}
    return [rule for rule in fired if rule.name not in redundant]
