"""Red-flag rules: a table of patient messages with the emergencies they must (and must not) raise."""
from __future__ import annotations

import re

import pytest

from pathlib import Path

from bianque.safety import RULES, WINDOW, RedFlag, flag_dict, red_flags

# (patient message, names of the flags it must raise — exactly these, in RULES order)
POSITIVE = [
    ("突然胸痛，还出了一身冷汗", ["chest_pain"]),
    ("胸口疼得厉害，喘不上气", ["chest_pain"]),
    ("胸闷痛半小时了，大汗淋漓", ["chest_pain"]),
    ("心口痛，疼到左臂，有点濒死感", ["chest_pain"]),
    ("我爸胸骨后压榨样疼痛，出汗很多", ["chest_pain"]),
    ("胸痛，没有咳嗽，但是呼吸困难", ["chest_pain"]),  # the negation covers 咳嗽 only
    ("我妈早上起来口角歪斜，说话不清楚", ["stroke"]),
    ("爷爷突然一侧肢体无力", ["stroke"]),
    ("右边手脚突然麻木，抬不起来", ["stroke"]),
    ("他讲话含糊，嘴歪了", ["stroke"]),
    ("左眼突然看不见了", ["stroke"]),
    ("我妈说话突然说不清了", ["stroke"]),
    ("切菜切到手，血流不止", ["severe_bleeding"]),
    ("今天吐血了，有小半碗", ["severe_bleeding"]),
    ("产后大出血怎么办", ["severe_bleeding", "pregnancy_emergency"]),
    ("这两天拉柏油样便，头晕乏力", ["severe_bleeding"]),
    ("鼻子出血止不住，已经二十分钟了", ["severe_bleeding"]),
    ("我不想活了，活着没意思", ["self_harm"]),
    ("最近总想自杀", ["self_harm"]),
    ("昨天晚上割腕了", ["self_harm"]),
    ("压力太大，有时候想结束自己的生命", ["self_harm"]),
    ("孩子发烧抽搐了，翻白眼", ["child_emergency"]),
    ("宝宝呼吸很急促，嘴唇发紫", ["child_emergency"]),  # not also breathing_difficulty
    ("三岁的儿子高热惊厥", ["child_emergency"]),
    ("小孩喘不上气，鼻翼扇动", ["child_emergency"]),
    ("吃了海鲜以后喉咙发紧，全身起疹子", ["anaphylaxis"]),
    ("打了青霉素后呼吸困难，嘴唇肿了", ["anaphylaxis"]),
    ("他吃药后过敏性休克了", ["anaphylaxis"]),
    ("被蜂蜇了，现在舌头发麻", ["anaphylaxis"]),
    ("哮喘发作，喘不过气来", ["breathing_difficulty"]),
    ("我爸刚才在厕所晕倒了", ["unconsciousness"]),
    ("老人叫不醒，怎么办", ["unconsciousness"]),
    ("突然剧烈头痛，像要炸开一样", ["sudden_severe_headache"]),
    ("下午突发头痛欲裂，还吐了", ["sudden_severe_headache"]),
    ("孩子误服了奶奶的降压药", ["poisoning"]),  # poisoning is about the substance, not the age
    ("他喝了农药", ["poisoning"]),
    ("在浴室洗澡，怀疑煤气中毒", ["poisoning"]),
    ("怀孕六周，突然剧烈腹痛", ["pregnancy_emergency"]),
    ("停经两个月，现在阴道大量出血", ["severe_bleeding", "pregnancy_emergency"]),
    ("两个月大的宝宝发烧38.5度", ["infant_fever"]),
    ("吐了好多血", ["severe_bleeding"]),
    ("血一直往外冒止不住", ["severe_bleeding"]),
    ("咳出一大口鲜血", ["severe_bleeding"]),
    ("心口压着疼，后背也疼", ["chest_pain"]),
    ("胸口像压了块大石头", ["chest_pain"]),
    ("撕裂一样疼，疼到后背", ["chest_pain"]),
    ("没有胸痛，但是喘不上气", ["breathing_difficulty"]),
    ("今晚想从楼上跳下去", ["self_harm"]),
    ("抽屉里攒了一瓶安眠药", ["self_harm"]),
    ("两岁的孩子偷吃了一板降压药", ["poisoning"]),
    ("屋里烧炭取暖，一家人都头晕", ["poisoning"]),
    ("不小心喝了洁厕灵", ["poisoning"]),
    ("头撞到墙上以后吐了两次，老想睡觉", ["head_injury"]),
    ("我爸从三楼摔下来了", ["fall_from_height"]),
    ("被开水烫了一大片，后背全是泡", ["burns"]),
    ("在工地中暑了，人已经神志不清", ["heat_stroke"]),
    ("被毒蛇咬了一口", ["bite"]),
    ("怀孕七周，右边小腹突然剧痛", ["pregnancy_emergency"]),
    ("孕34周，头疼，看东西模糊，脚肿", ["pregnancy_emergency"]),
    ("突然剧烈头痛，吐了，脖子发硬", ["sudden_severe_headache"]),
    ("肚子硬得像木板，碰都不能碰", ["acute_abdomen"]),
    ("打了胰岛素没吃饭，现在说胡话", ["hypoglycaemia"]),
    ("孩子上吐下泻，一天没尿了", ["severe_dehydration"]),
    ("以前胸口疼过，现在好了，但是今天喘不上气", ["breathing_difficulty"]),
    ("我爸可能心梗了", ["chest_pain"]),
    ("宝宝才一个月，今天体温38度", ["infant_fever"]),
    ("胸痛出汗，而且一侧肢体无力", ["chest_pain", "stroke"]),
    ("孩子掉进池塘里，刚捞上来，一直咳", ["drowning"]),
    ("发烧39度，腿上出了好多紫色的斑点", ["sepsis_meningitis"]),
    ("化疗后第十天，今天烧到38.8度", ["sepsis_meningitis"]),
    ("血压量了200/120，头痛得厉害，看东西模糊", ["hypertensive_crisis"]),
    ("心率一直180多，停不下来", ["heart_rhythm"]),
    ("心跳特别快，眼前发黑站不住", ["heart_rhythm"]),
    ("人迷迷糊糊的，量血压只有80/50", ["danger_signs"]),
    ("疼得受不了，手脚冰凉", ["danger_signs"]),
    ("救命啊", ["call_for_help"]),
    ("快救救我爸", ["call_for_help"]),
]

NEGATIVE = [
    "没有胸痛，也没有出汗",
    "不胸痛，就是有点咳嗽",
    "无呼吸困难，无胸闷",
    "胸痛，没有出汗也没有气短",  # chest pain alone, sweating and breathlessness denied
    "没有胸痛、气短和出汗",
    "胸口不痛，只是胃有点胀",
    "胸痛已经好了，就是有点累",
    "出汗很多，可能是天太热",  # sweating without chest pain
    "最近嘴角起了个泡",
    "说话声音有点沙哑",
    "腿抽筋，晚上睡觉时更明显",
    "刷牙时牙龈有点出血",
    "痰里偶尔有血丝",
    "月经量比平时多一点",
    "我没有想过自杀",
    "从来没有过轻生的念头",
    "孩子咳嗽三天了，没有发烧",
    "宝宝没有抽搐，精神还好",
    "孩子呼吸平稳，就是流鼻涕",
    "我有过敏性鼻炎，经常打喷嚏",
    "吃了海鲜有点拉肚子",
    "头痛三天了，一阵一阵的",
    "发烧三个月了，一直低热",  # a duration, not an infant's age
    "怀孕三个月，孕吐很厉害",
    "早上起来有点头晕，没有晕倒",
    "失眠很严重，每天都很累",
    "血压有点高，平时吃药控制",
    "我爸以前中风过，现在恢复得不错",
    "饿死了，能吃点什么",
    "以前胸口疼出冷汗，后来治好了",
    "怎么预防中风",
    "累得想死",
    "商场跳楼价",
    "头疼，没有吐，脖子也不硬",
    "蔬菜上的农药残留怎么洗",
    "",
]


def names(flags: list[RedFlag]) -> list[str]:
    return [f.name for f in flags]


@pytest.mark.parametrize(("text", "expected"), POSITIVE)
def test_emergencies_are_flagged(text, expected):
    assert names(red_flags(text)) == expected


@pytest.mark.parametrize("text", NEGATIVE)
def test_non_emergencies_and_negations_are_not_flagged(text):
    assert red_flags(text) == []


def test_table_size_and_rule_coverage():
    assert len(POSITIVE) >= 40 and len(NEGATIVE) >= 25
    covered = {name for _, expected in POSITIVE for name in expected}
    assert covered == {rule.name for rule in RULES}


def test_every_message_sends_the_patient_to_emergency_care():
    for rule in RULES:
        assert "120" in rule.message or "急诊" in rule.message, rule.name
        assert rule.message.endswith("。"), rule.name


def test_rules_are_data_with_valid_patterns_and_unique_names():
    assert len({rule.name for rule in RULES}) == len(RULES)
    known = {rule.name for rule in RULES}
    for rule in RULES:
        assert rule.when and all(group for group in rule.when)
        for group in rule.when:
            for pattern in group:
                re.compile(pattern)
        assert set(rule.supersedes) <= known - {rule.name}


def test_whitespace_width_and_newlines_do_not_hide_or_invent_flags():
    assert names(red_flags("胸 痛 ，  出 冷 汗")) == ["chest_pain"]
    assert names(red_flags("胸痛\n出汗")) == ["chest_pain"]
    assert red_flags("没有胸痛\n出汗很多") == []  # sweating alone; the chest pain was denied
    # NFKC folds full-width digits and punctuation: "３８度" reads as 38.
    assert names(red_flags("两个月大的宝宝体温３８度")) == ["infant_fever"]


def test_huge_message_is_fine():
    text = "头痛三天了，一阵一阵的。" * 5000 + "突然胸痛，出冷汗。"
    assert names(red_flags(text)) == ["chest_pain"]


# --- dialogue level -------------------------------------------------------------------------------
def test_a_split_emergency_is_flagged_under_the_message_that_completes_it():
    assert red_flags("胸口疼") == []
    assert names(red_flags("还出了好多冷汗", ["胸口疼"])) == ["chest_pain"]
    # once shown, the next message does not repeat it unless it says it again itself
    assert red_flags("出汗", ["胸口疼", "还出了好多冷汗"]) == []
    assert names(red_flags("胸口还是疼，冷汗一直出", ["胸口疼", "还出了好多冷汗"])) == ["chest_pain"]


def test_the_window_is_the_current_message_and_the_two_before(monkeypatch):
    import bianque.safety as safety

    monkeypatch.setattr(safety, "MODEL_BACKSTOP", False)  # the rules' window (the model reads "好多冷汗" alone as 0.81)
    assert WINDOW == 3
    assert names(red_flags("还出了好多冷汗", ["胸口疼", "昨天睡得不好"])) == ["chest_pain"]
    assert red_flags("还出了好多冷汗", ["胸口疼", "昨天睡得不好", "今天吃了粥"]) == []


def test_earlier_negations_stay_negated():
    assert red_flags("出了好多汗", ["没有胸痛"]) == []


def test_flag_dict_is_json_ready():
    import json

    flag = red_flags("突然胸痛，出冷汗")[0]
    d = flag_dict(flag)
    assert set(d) == {"name", "message", "action"}
    assert d["name"] == "chest_pain" and d["message"] == flag.message and d["action"] == flag.action
    assert json.loads(json.dumps(d, ensure_ascii=False)) == d


def test_every_category_has_a_one_line_action_and_self_harm_names_the_hotline():
    for rule in RULES:
        assert rule.action and "\n" not in rule.action and rule.action.endswith("。"), rule.name
        assert rule.name.isascii() and rule.name.replace("_", "").isalpha(), rule.name
    self_harm = next(r for r in RULES if r.name == "self_harm")
    assert "12356" in self_harm.message and "120" in self_harm.message and "12356" in self_harm.action


# --- labelled development set (tests/data/safety_dev.tsv) -----------------------------------------
DEV = [tuple(line.split("\t")) for line in
       (Path(__file__).parent / "data" / "safety_dev.tsv").read_text(encoding="utf-8").splitlines()
       if line.strip() and not line.startswith("#")]


def _dev_flags(text: str) -> list[str]:
    messages = text.split(" || ")
    return names(red_flags(messages[-1], messages[:-1]))


@pytest.mark.parametrize(("label", "text"), [row for row in DEV if row[0] != "none"])
def test_dev_set_emergency(label, text):
    assert label in _dev_flags(text)


@pytest.mark.parametrize("text", [text for label, text in DEV if label == "none"])
def test_dev_set_non_emergency(text):
    assert _dev_flags(text) == []


def test_dev_set_split_emergencies_fire_on_the_last_message_only():
    splits = [(label, text.split(" || ")) for label, text in DEV if " || " in text and label != "none"]
    assert len(splits) >= 15
    for label, messages in splits:
        for i in range(len(messages) - 1):
            assert red_flags(messages[i], messages[:i]) == [], messages


def test_dev_set_size_and_coverage():
    negatives = [text for label, text in DEV if label == "none"]
    assert len(DEV) >= 300 and len(negatives) >= 150
    counts = {rule.name: sum(label == rule.name for label, _ in DEV) for rule in RULES}
    assert all(n >= 4 for n in counts.values()), counts
    assert {label for label, _ in DEV} == set(counts) | {"none"}


def test_non_text_input_is_rejected_clearly():
    with pytest.raises(TypeError, match="string"):
        red_flags(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="sequence of strings"):
        red_flags("胸痛", "出汗")  # type: ignore[arg-type]


# --- the independent check sets (tests/data/safety_indep.tsv): any notice for 1, none for 0 ------
INDEP = [tuple(line.split("\t")) for line in
         (Path(__file__).parent / "data" / "safety_indep.tsv").read_text(encoding="utf-8").splitlines()
         if line.strip() and not line.startswith("#")]


def _sequence_flags(text: str) -> tuple[list[str], list[str]]:
    """(flags under any message of a " || " sequence, flags under its last message)."""
    messages = text.split(" || ")
    each = [names(red_flags(m, messages[:k])) for k, m in enumerate(messages)]
    return [name for flags in each for name in flags], each[-1]


KNOWN_FALSE_ALARMS = {"对象不回消息 我要窒息了"}  # slang the net cannot tell from a real "我要窒息了"


def test_known_false_alarms_still_fire():  # erring towards warning, on purpose
    assert all(red_flags(text) for text in KNOWN_FALSE_ALARMS)


def test_independent_sets_have_both_kinds():
    sizes = {}
    for s, label, _, _ in INDEP:
        sizes[s, label] = sizes.get((s, label), 0) + 1
    assert sizes == {("1", "1"): 200, ("1", "0"): 150, ("2", "1"): 160, ("2", "0"): 120,
                     ("3", "1"): 130, ("3", "0"): 100, ("4", "1"): 140, ("4", "0"): 110,
                     ("5", "1"): 151, ("5", "0"): 99, ("6", "1"): 140, ("6", "0"): 100, ("7", "1"): 130, ("7", "0"): 100,
                     ("8", "1"): 140, ("8", "0"): 100, ("9", "1"): 140, ("9", "0"): 100, ("10", "1"): 121, ("10", "0"): 99,
                     ("11", "1"): 100, ("11", "0"): 80, ("12", "1"): 131, ("12", "0"): 101, ("13", "1"): 128, ("13", "0"): 108,
                     ("14", "1"): 134, ("14", "0"): 103, ("15", "1"): 120, ("15", "0"): 102, ("16", "1"): 125, ("16", "0"): 89,
                     ("17", "1"): 120, ("17", "0"): 100, ("18", "1"): 130, ("18", "0"): 100}
    assert sum(" || " in text for s, _, _, text in INDEP if s == "6") == 100


@pytest.mark.parametrize("number", ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16", "17", "18"])
def test_independent_set_every_emergency_gets_a_notice(number):
    missed = [(c, t) for s, label, c, t in INDEP if s == number and label == "1" and not _sequence_flags(t)[0]]
    assert missed == []


@pytest.mark.parametrize("number", ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16", "17", "18"])
def test_independent_set_no_ordinary_message_gets_a_notice(number):
    alarms = [(c, t, _sequence_flags(t)[1]) for s, label, c, t in INDEP
              if s == number and label == "0" and t not in KNOWN_FALSE_ALARMS and _sequence_flags(t)[1]]
    assert alarms == []


# --- real consultations (tests/data/safety_real.tsv): public medical dialogue collections --------
REAL = [tuple(line.split("\t")) for line in
        (Path(__file__).parent / "data" / "safety_real.tsv").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")]


def test_real_set_has_every_source_and_both_kinds():
    sources = {s for s, _, _, _ in REAL}
    assert sources == {"real-toyhom", "real-medicalgpt", "real-mie", "real-covid"}
    assert sum(label == "1" for _, label, _, _ in REAL) >= 15 and sum(label == "0" for _, label, _, _ in REAL) >= 200
    assert all(len(text) <= 150 for _, _, _, text in REAL)


def test_real_set_every_emergency_gets_a_notice():
    missed = [(c, t) for _, label, c, t in REAL if label == "1" and not _sequence_flags(t)[0]]
    assert missed == []


def test_real_set_false_alarms_only_where_still_listed():
    """Ordinary real messages raise no notice, except those listed as still doing so (whose number may
    only fall: the header gives 35 of the sample's 2074 ordinary messages, 1.7%, down from 110, 5.3%)."""
    alarms = [(c, t) for _, label, c, t in REAL if label == "0" and _sequence_flags(t)[1]]
    assert [a for a in alarms if a[0] != "still_false_alarm"] == []
    assert len(alarms) <= 37
