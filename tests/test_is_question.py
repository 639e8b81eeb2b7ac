"""The question detector against a labeled table of doctor turns, compared with the 2023 rule.

Labels say what the Chain of Questioning needs: True when the turn asks the patient something
(so v1 may keep questioning), False when it is a statement or advice. The table mixes the short
history-taking lines BianQue-1.0 produces (with and without "？") with BianQue-2-style advice that
uses 那么/这么/什么的/怎么办 in statements and poses rhetorical questions it then answers.
"""
from __future__ import annotations

import logging
import re

import pytest

from bianque import router

from bianque.router import is_question, is_question_original

ASKS = True
STATES = False

# Follow-up questions ending in a question mark.
MARKED_QUESTIONS = [
    "失眠多久了？",
    "你好，请问头痛多长时间了？",
    "咳嗽有痰吗？",
    "孩子多大了？",
    "发烧最高到多少度？",
    "大便是什么颜色的？",
    "疼痛是持续性的还是一阵一阵的？",
    "平时有没有熬夜的习惯？",
    "最近饮食怎么样？",
    "之前去医院检查过吗？",
    "有没有做过胃镜？",
    "吃了什么药？",
    "一天拉几次？",
    "月经规律吗？",
    "除了咳嗽，还有其他不舒服吗？",
    "你好，宝宝现在精神状态怎么样？",
    "是左边疼还是右边疼？",
    "睡前会玩手机吗？",
    "有家族史吗？",
    "血压平时控制得怎么样？",
    "是饭前疼还是饭后疼？",
    "皮疹痒不痒？",
    "这种情况持续多久了？有没有加重？",
    "您好，请问您今年多大年龄？",
    "那你的睡眠呢？",
    "以前有过类似的情况吗？",
    "喉咙痛不痛?",
    "请问您平时如何缓解疼痛？",
    "头晕的时候会不会恶心想吐？",
    "你觉得是什么原因引起的？",
    "您平时都是怎么处理的？",
    "疼痛严重的时候会影响睡眠吗？",
    "孩子为什么会哭闹，是饿了还是哪里不舒服？",
]

# Follow-up questions without a question mark, as BianQue-1.0 often writes them.
UNMARKED_QUESTIONS = [
    "是否伴有发热",
    "是否伴有咳嗽",
    "有无过敏史",
    "请描述一下疼痛的部位",
    "请问孩子咳嗽几天了",
    "失眠多久了",
    "有没有拉肚子",
    "是不是经常熬夜",
    "大便是否成形",
    "有无胸闷、心慌等症状",
    "请详细说一下您的症状",
    "你好，头痛多长时间了",
    "体温多少度",
    "哪里疼",
    "平时吃饭怎么样",
    "咳嗽有痰吗",
    "说一下你最近的饮食情况",
    "具体是哪个部位痒",
    "最近有没有服用什么药物",
    "是否有高血压、糖尿病病史",
    "孩子精神状态好不好",
    "请告诉我您的年龄和性别",
    "有无家族遗传病史。",
    "疼痛是刺痛还是胀痛",
    "月经量多么",
    "描述一下皮疹的样子",
    "你好，请问咳嗽有多长时间了",
    "你好，是什么时候开始出现这种症状的",
    "除了头痛还有什么症状",
]

# A short remark and then a question: still a question.
REMARK_THEN_QUESTION = [
    "根据你的描述，可能是胃炎，请问有没有反酸烧心？",
    "嗯，这种情况需要进一步了解。疼痛是在饭前还是饭后？",
    "这个可能和饮食有关。最近有没有吃生冷的东西？",
    "了解了。孩子有没有流鼻涕、打喷嚏？",
    "有没有发热？我需要了解一下，以便判断病情。",
    "好的，那咳嗽有痰吗？痰是什么颜色的？",
    "你好，根据你的描述，可能是颈椎病引起的头晕，是否伴有手臂发麻",
    "从你说的情况看，可能是普通感冒，先多喝水休息。还有其他症状吗？",
    "你这种情况建议去医院做个B超，看看是否有胆结石。平时吃油腻的东西后会不会疼得厉害？",
]

# Greetings and acknowledgements.
REMARKS = [
    "你好",
    "好的，我明白了。",
    "不客气，祝您早日康复。",
    "嗯，这种情况比较常见。",
    "明白了，那我给你一些建议。",
    "谢谢你的信任。",
]

# Advice using 那么/这么/什么的/怎么办/多少/吗啡 in statements (the original rule fires on these).
ADVICE_WITH_MARKER_WORDS = [
    "不用那么担心，这是常见的胃肠型感冒，注意多喝水，清淡饮食。",
    "你这么年轻，血压这么高，要注意低盐饮食，适当运动，定期监测血压。",
    "平时少吃辛辣、油炸、烧烤什么的，多吃蔬菜水果。",
    "如果实在不知道怎么办，可以先去医院消化内科就诊。",
    "那么建议你先去医院做个血常规检查，明确有没有感染。",
    "那么从你的描述来看，可能是神经性头痛，建议注意休息，避免劳累。",
    "失眠了不要着急，很多人都不知道怎么办，其实调整作息是最重要的。",
    "咖啡、浓茶、可乐什么的最好都不要喝了。",
    "既然这么长时间了，建议到医院做个详细检查。",
    "孩子发烧时不知道怎么办的家长很多，体温超过38.5度可以服用退烧药。",
    "那么就先观察几天，如果症状加重要及时就医。",
    "这么大年纪了要注意保暖，避免受凉。",
    "多喝温水，多休息，吃点清淡的东西什么的，一般一周左右就好了。",
    "吃完药后什么时候都可以喝水的，没什么禁忌。",
    "需要注意的是，不是什么大问题，别太紧张。",
    "没有多大关系，放心吧。",
    "那么严重的话还是要去医院看看。",
    "要想睡得好，睡前不要想那么多，放松心情最重要。",
    "癌痛可以在医生指导下使用吗啡类止痛药。",
    "多少会有一点影响，但不大，注意休息就好。",
    "一般几天就会好转，不用担心。",
]

# Advice that poses a question and answers it itself.
ADVICE_WITH_RHETORICAL_QUESTIONS = [
    "怎么办呢？其实也不难，只要坚持锻炼，控制饮食，血糖就能慢慢降下来。",
    "为什么会失眠呢？失眠的原因有很多，比如精神压力大、作息不规律等，建议你睡前避免使用手机，保持规律作息。",
    "胃痛该怎么办？首先要规律饮食，少吃多餐，避免辛辣刺激的食物，必要时可以服用奥美拉唑。",
    "感冒需要吃抗生素吗？一般不需要，病毒性感冒多喝水、多休息就可以自愈。",
    "高血压患者要注意什么？低盐低脂饮食，戒烟限酒，规律服药，定期监测血压。",
    "难道熬夜对身体没有影响吗？长期熬夜会导致免疫力下降，建议尽量在11点前入睡。",
    "那么如何预防呢？勤洗手、戴口罩、避免去人群密集的地方。",
    "根据你的描述，考虑是过敏性鼻炎。为什么会反复发作呢？主要是接触了过敏原，建议查一下过敏原，避免接触，可以使用鼻喷激素。",
    "孩子咳嗽吃什么好？可以喝点梨水，饮食清淡，多喝温水，如果咳嗽超过两周要去医院。",
    "你知道吗？每天喝足够的水对肾脏很重要，建议每天饮水1500到2000毫升。",
    "这不就是典型的颈椎病吗？建议你少低头，多做颈部活动，必要时做理疗。",
    "很多人会问，痔疮要不要手术？其实大多数痔疮通过保守治疗就可以缓解，只有反复出血、脱出的才需要手术。",
    "湿疹为什么反复发作？主要和皮肤屏障受损有关，所以保湿非常重要。",
    "您是否经常熬夜？如果是的话，建议您调整作息，睡前避免使用电子产品，保持规律的生活习惯。",
    "有没有觉得压力很大？如果有，可以试着通过运动、听音乐等方式放松，必要时寻求心理医生的帮助。",
    "咳嗽的时候怎么办？可以喝点蜂蜜水缓解，如果咳得厉害可以用止咳药。",
    "高烧不退怎么办？要及时去医院，不要自行服用过多退烧药。",
]

# Advice that mentions checking whether something is present (an embedded question).
ADVICE_WITH_EMBEDDED_QUESTIONS = [
    "建议你到医院做个心电图，看看是否有心律失常。",
    "可以去医院查一下血常规，明确有没有细菌感染。",
    "是否需要手术要看具体的检查结果，先不要太担心。",
    "需要观察孩子是否有发热、呕吐等情况，如有加重及时就医。",
    "无论有没有症状，都应该定期复查。",
    "平时注意观察大便是否带血，定期复查肠镜。",
    "建议做个胃镜，排除是否有溃疡。",
]

# Plain advice.
ADVICE = [
    "根据您的描述，考虑是急性胃肠炎，建议清淡饮食，注意补充水分，可以口服补液盐，如果出现脱水或高热请及时就医。",
    "孩子反复咳嗽可能与过敏有关，建议到儿科就诊，必要时做过敏原检测。",
    "失眠可以尝试睡前用温水泡脚，避免喝咖啡和浓茶，保持卧室安静、黑暗。",
    "你的血糖偏高，需要控制饮食，减少精制米面和甜食的摄入，增加运动量，并定期监测血糖。",
    "这种情况一般不严重，多休息就可以了。",
    "湿疹要注意保湿，避免搔抓，洗澡水温不要太高。",
    "建议去皮肤科就诊，根据医生的指导用药。",
    "腰痛的话可以先热敷，避免久坐和弯腰提重物。",
    "怀孕期间用药要谨慎，一定要在医生指导下使用。",
    "您好，您的情况属于正常的生理现象，不必过于担心。",
    "这个药一天吃三次，每次两片，饭后服用。",
]

TABLE = (
    [(t, ASKS) for t in MARKED_QUESTIONS + UNMARKED_QUESTIONS + REMARK_THEN_QUESTION]
    + [(t, STATES) for t in REMARKS + ADVICE_WITH_MARKER_WORDS + ADVICE_WITH_RHETORICAL_QUESTIONS]
    + [(t, STATES) for t in ADVICE_WITH_EMBEDDED_QUESTIONS + ADVICE]
)

# Written after the detector was frozen and never used to tune it: an out-of-sample check of the
# rules above (the main TABLE was written alongside them, so its score is in-sample).
HELD_OUT = [
    ("腹痛是从什么时候开始的？", True),
    ("有没有恶心呕吐", True),
    ("是否有过手术史", True),
    ("小便颜色正常吗", True),
    ("请问你的身高体重是多少", True),
    ("你好，请问孩子发烧几天了？", True),
    ("皮肤瘙痒是全身的还是局部的", True),
    ("晚上睡觉时咳嗽会加重吗？", True),
    ("怀孕了吗？", True),
    ("请说一下具体的用药情况", True),
    ("平常抽烟喝酒吗", True),
    ("头痛的位置是在前额还是后脑勺？", True),
    ("有无头晕、黑蒙", True),
    ("最近体重有没有明显变化", True),
    ("嗯嗯，眼睛红不红？", True),
    ("那腿部有浮肿吗？", True),
    ("你说的胸闷一般持续多久", True),
    ("之前做过哪些检查", True),
    ("吃东西会不会噎住", True),
    ("您好，是第一次出现这种情况吗？", True),
    ("打呼噜严重吗？白天会犯困吗？", True),
    ("痰里有没有血丝？", True),
    ("疼痛程度能不能忍受", True),
    ("请问近期有没有接触过发热病人", True),
    ("是持续性发热吗", True),
    ("那么平时要多注意休息，避免熬夜，饮食清淡。", False),
    ("出现这么多症状，建议尽快到医院做全面检查。", False),
    ("水果可以吃苹果、香蕉什么的，不要吃太凉的。", False),
    ("遇到这种情况不用慌，先让孩子侧躺，保持呼吸道通畅。", False),
    ("鼻炎怎么办？可以用生理盐水洗鼻，减少过敏原的接触，症状重的时候用鼻喷剂。", False),
    ("为什么血压会升高？和高盐饮食、肥胖、精神紧张都有关系，所以要从生活方式入手。", False),
    ("建议先到医院查一下甲状腺功能，看看是否有甲亢。", False),
    ("口腔溃疡一般一到两周可以自愈，可以多吃维生素丰富的食物。", False),
    ("这个情况不算严重，不用太在意。", False),
    ("你这个情况考虑是腰肌劳损，注意休息，可以配合理疗。", False),
    ("孩子拉肚子怎么办？要注意补液，防止脱水，可以口服补液盐，大便次数多要及时就医。", False),
    ("可以吃一些益生菌调理肠道，饮食上少油少辣。", False),
    ("如果有没有缓解都要来复查一下。", False),
    ("那么这种情况下，最好还是去医院做个检查。", False),
    ("胃胀吃什么药好呢？可以在医生指导下服用促胃动力药，比如多潘立酮，同时注意少食多餐。", False),
    ("具体用什么药需要医生面诊后决定。", False),
    ("祝你早日康复！", False),
]

# The cases the issue names explicitly: each must be right, not just on average.
REQUIRED = [
    ("是否伴有咳嗽", ASKS),
    ("有无过敏史", ASKS),
    ("请描述一下疼痛的部位", ASKS),
    ("失眠多久了？", ASKS),
    ("是否伴有发热", ASKS),
    ("不用那么担心，这是常见的胃肠型感冒，注意多喝水，清淡饮食。", STATES),
    ("你这么年轻，血压这么高，要注意低盐饮食，适当运动，定期监测血压。", STATES),
    ("平时少吃辛辣、油炸、烧烤什么的，多吃蔬菜水果。", STATES),
    ("如果实在不知道怎么办，可以先去医院消化内科就诊。", STATES),
    (ADVICE_WITH_RHETORICAL_QUESTIONS[1], STATES),
    (ADVICE_WITH_RHETORICAL_QUESTIONS[2], STATES),
]


def accuracy(detector, table) -> float:
    return sum(detector(text) == label for text, label in table) / len(table)


def test_table_is_large_balanced_and_unique():
    texts = [t for t, _ in TABLE]
    assert len(TABLE) >= 100
    assert len(set(texts)) == len(texts)
    questions = sum(label for _, label in TABLE)
    assert 0.35 <= questions / len(TABLE) <= 0.65


@pytest.mark.parametrize(("text", "label"), REQUIRED)
def test_required_cases(text, label):
    assert is_question(text) is label


def test_new_detector_accuracy(record_property):
    misses = [(t, label) for t, label in TABLE if is_question(t) is not label]
    acc = accuracy(is_question, TABLE)
    record_property("is_question_accuracy", acc)
    print(f"\nis_question accuracy: {acc:.3f} on {len(TABLE)} turns; misses: {misses}")
    # Measured: 130 of 133 (0.977). Without the rhetorical check it is 129, without the tail limit 127.
    assert len(TABLE) - len(misses) >= 130, misses


def test_new_detector_beats_original(record_property):
    new, old = accuracy(is_question, TABLE), accuracy(is_question_original, TABLE)
    record_property("is_question_original_accuracy", old)
    print(f"\naccuracy on {len(TABLE)} turns: is_question {new:.3f}, is_question_original {old:.3f}")
    assert new > old + 0.2


def test_held_out_accuracy(record_property):
    new, old = accuracy(is_question, HELD_OUT), accuracy(is_question_original, HELD_OUT)
    record_property("held_out_accuracy", new)
    print(f"\nheld-out accuracy on {len(HELD_OUT)} turns: is_question {new:.3f}, original {old:.3f}")
    # Measured: 40 of 42 (0.952); the original rule 24 of 42. Without the tail limit: 39.
    assert round(new * len(HELD_OUT)) >= 40 and new > old + 0.3


def test_original_rule_is_the_2023_substring_list():
    assert is_question_original("不用那么担心")  # fires on 那么: the bug being fixed
    assert is_question_original("少吃辛辣什么的")
    assert not is_question_original("是否伴有咳嗽")  # and misses questions without markers
    assert not is_question_original("有无过敏史")
    assert is_question_original("有没有发热") and is_question_original("一天几次")


def test_empty_and_whitespace_are_not_questions():
    assert not is_question("")
    assert not is_question("   \n ")
    assert not is_question("。？")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("咳嗽多久了？", (True, "question_mark")),
        ("有没有发烧", (True, "asking_phrase")),
        ("平时吃辣的吗", (True, "final_particle")),
        ("建议多喝水，注意休息。", (False, "no_asking_sentence")),
        ("难道不该早点去医院吗？", (False, "no_asking_sentence")),
        ("发烧了吗？建议您尽快到医院做血常规检查，必要时遵医嘱使用退烧药物，并注意多喝水休息。", (False, "long_tail")),
    ],
)
def test_question_reason_names_the_deciding_rule(text, expected):
    assert router.question_reason(text) == expected
    assert router.is_question(text) is expected[0]


def test_is_question_logs_the_reason_never_the_text(caplog):
    caplog.set_level(logging.DEBUG, logger="bianque.router")
    router.is_question("咳嗽多久了？")
    assert "reason=question_mark" in caplog.text
    assert "咳嗽" not in caplog.text


# --- the development set of real doctor turns (tests/data/question_dev.md) ---------------------
DEV_SET = router.load_labelled(str(__import__("pathlib").Path(__file__).parent / "data" / "question_dev.jsonl"))


def test_dev_set_is_real_labelled_and_mixed():
    assert len(DEV_SET) >= 300
    assert {r["label"] for r in DEV_SET} == {"question", "statement"}
    assert all(r["source"]["repo"] and r["source"]["commit"] and r["source"]["id"] for r in DEV_SET)
    assert all(len(r["text"]) <= 400 for r in DEV_SET)
    short = sum(len(r["text"]) <= 60 for r in DEV_SET)
    assert 100 <= short <= len(DEV_SET) - 100
    assert len({r["text"] for r in DEV_SET}) == len(DEV_SET)


def test_dev_set_figures_and_floors(record_property):
    """Floors at the measured figures (420 turns: accuracy 0.981 = 412/420, precision 0.933 = 83/89,
    recall 0.976 = 83/85; short 0.980, long 0.982; the original rule 0.898): dropping the tail limit
    (accuracy 0.960, precision 0.840), the addressed-question rule (recall 0.788) or the embedding
    markers (accuracy 0.921) fails this."""
    scores = router.evaluate(DEV_SET)
    original = router.evaluate(DEV_SET, is_question_original)
    for subset in scores:
        record_property(f"dev_{subset}_accuracy", scores[subset]["accuracy"])
    print(f"\ndev set: new {scores}\noriginal {original}")
    assert scores["overall"]["accuracy"] >= 0.980
    assert scores["overall"]["precision"] >= 0.932
    assert scores["overall"]["recall"] >= 0.976
    assert scores["short"]["accuracy"] >= 0.979
    assert scores["long"]["accuracy"] >= 0.982
    assert scores["overall"]["accuracy"] > original["overall"]["accuracy"] + 0.08


def test_detector_is_fast_enough(record_property):
    """Issue #12 asks for <= 1 ms per turn on CPU; measured about 0.06 ms on the 420 dev turns
    (2-core Xeon VM, shared), so the bound leaves room for a busy machine."""
    ms = router.ms_per_turn([r["text"] for r in DEV_SET])
    record_property("ms_per_turn", ms)
    assert 0 < ms <= 1.0


def test_score_counts_by_hand():
    pairs = [(True, True), (True, False), (False, True), (False, False), (True, True)]
    assert router.score(pairs) == {"n": 5, "accuracy": 0.6, "precision": 2 / 3, "recall": 2 / 3}
    assert router.score([]) == {"n": 0, "accuracy": 0.0, "precision": 0.0, "recall": 0.0}


# One table per category of the labelling rule (issue #12); labels written here, by hand.
CATEGORY_TABLES = {
    "plain follow-up questions": [
        ("失眠多久了", ASKS),
        ("是否伴有发热", ASKS),
        ("大便颜色正常吗", ASKS),
        ("宝宝今年几岁了？", ASKS),
    ],
    "advice followed by, or around, a question": [
        ("多喝温水，注意休息。咳嗽有痰吗？", ASKS),
        ("请问现在有什么症状？平时注意饮食清淡，不要熬夜，避免受凉感冒，规律服用降压药物。", ASKS),
        ("您好，目前有什么不舒服吗？单源早搏相对较轻，一般不需要特别处理，注意休息即可。", ASKS),
        ("睡眠质量怎么样啊？睡眠不好的话血压也不容易控制，颈椎病关系倒不大。", ASKS),
    ],
    "polite or indirect requests for information": [
        ("请您提供一下最近的血常规结果", ASKS),
        ("请告诉我您的年龄和既往病史。", ASKS),
        ("我想了解一下您平时的饮食习惯。", ASKS),
        ("为了更准确地判断病情，我需要进一步了解您的症状持续时间。", ASKS),
        ("您可以把检查结果发给我，我帮您看一下。", ASKS),
        ("你好，把心电图报告拍一下发过来看看", ASKS),
    ],
    "confirmation, consent and offer questions": [
        ("您是想咨询孩子的情况，是吗？", ASKS),
        ("您需要知道这个药的具体用法吗？", ASKS),
        ("现在还在吃阿司匹林么", ASKS),
    ],
    "closing questions that invite a reply": [
        ("还有其他问题吗？", ASKS),
        ("请问还有什么需要帮助的吗？", ASKS),
    ],
    "trigger words used as words": [
        ("没什么大问题，注意休息就好。", STATES),
        ("不用那么担心，这个病很常见。", STATES),
        ("少吃辛辣油腻什么的。", STATES),
        ("我打字也打不了多少，您可以自己先了解一下相关知识。", STATES),
    ],
    "embedded or indefinite questions in a statement": [
        ("回家后观察宝宝有没有咳嗽、发烧。", STATES),
        ("建议先抽血化验，检查是否需空腹请咨询当地医院。", STATES),
        ("需要看看颈动脉超声，再决定下一步是否做造影。", STATES),
        ("胸闷可能与其他原因有关，比如有没有贫血、低血压、过度劳累。", STATES),
        ("是否需要住院治疗还需要进一步评估。", STATES),
        ("这些指标可以帮助我们了解您的激素水平是否正常。", STATES),
        ("具体使用哪种药物，需要根据您的情况来确定。", STATES),
        ("要根据病人的具体情况确定用什么药。", STATES),
    ],
    "drug names": [
        ("疼得厉害时医生可能会用吗啡止痛。", STATES),
        ("饭前半小时吃吗丁啉，一次一片。", STATES),
    ],
    "closing offers that are not questions": [
        ("如果您还有其他问题，请随时告诉我。", STATES),
        ("不客气，有问题随时再咨询。", STATES),
        ("祝您早日康复，以后有什么事情欢迎咨询我！", STATES),
    ],
    "instructions that ask for nothing": [
        ("请及时就医。", STATES),
        ("请遵医嘱按时服药，定期复查。", STATES),
    ],
}


@pytest.mark.parametrize(
    ("category", "text", "label"),
    [(c, t, label) for c, rows in CATEGORY_TABLES.items() for t, label in rows],
)
def test_labelling_rule_categories(category, text, label):
    assert is_question(text) is label, router.question_reason(text)


# Each safeguard decides cases nothing else decides: turning it off flips exactly these.
TAIL_ONLY = [
    "高血压能吃党参吗？高血压病人可以口服党参的，党参有降血脂、降血压的作用。",
    "糖尿病能不能吃葡萄糖？不建议吃，葡萄糖是单糖，会很快升高血糖。",
]
RHETORICAL_ONLY = [
    "为什么会失眠呢？",
    "难道不该早点去医院吗？",
    "那么该怎么办呢？",
]
ADDRESSING_ONLY = [
    "请问现在有什么症状？平时注意饮食清淡，不要熬夜，避免受凉感冒，规律服用降压药物。",
    "血压最高多少？一般情况下降压药需要长期服用，不能自行停药，否则血压容易反弹。",
]


@pytest.mark.parametrize("text", TAIL_ONLY)
def test_tail_limit_alone_decides(text, monkeypatch):
    assert router.question_reason(text) == (False, "long_tail")
    monkeypatch.setattr(router, "MAX_TAIL_CHARS", 10**6)
    assert is_question(text)


@pytest.mark.parametrize("text", RHETORICAL_ONLY)
def test_rhetorical_safeguard_alone_decides(text, monkeypatch):
    assert router.question_reason(text) == (False, "no_asking_sentence")
    monkeypatch.setattr(router, "_is_rhetorical", lambda sentence: False)
    assert is_question(text)


@pytest.mark.parametrize("text", ADDRESSING_ONLY)
def test_addressed_question_alone_survives_the_tail(text, monkeypatch):
    assert router.question_reason(text) == (True, "addressed_question")
    monkeypatch.setattr(router, "_ADDRESSING_RE", __import__("re").compile(r"(?!x)x"))
    assert router.question_reason(text) == (False, "long_tail")


def test_eval_command_prints_both_detectors(tmp_path):
    import subprocess
    import sys

    data = tmp_path / "dev.jsonl"
    data.write_text(
        '{"text": "失眠多久了", "label": "question"}\n'
        '{"text": "不用那么担心", "label": "statement"}\n'
        '{"text": "' + "多喝水，注意休息，" * 8 + '有没有发烧？", "label": "question"}\n',
        encoding="utf-8",
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(__import__("pathlib").Path(router.__file__).parents[1])}
    out = subprocess.run([sys.executable, "-m", "bianque.router", "--eval", str(data)],
                         capture_output=True, text=True, env=env, check=True).stdout
    assert "is_question          overall  3    1.000    1.000     1.000" in out
    assert "is_question_original overall  3    0.333    0.500     0.500" in out
    assert "is_question          short    2    1.000" in out
    assert "is_question          long     1    1.000" in out
    assert re.search(r"speed: is_question \d+\.\d{3} ms per turn \(mean of 3 turns", out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x", "label": "question"}\nnot json\n', encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "bianque.router", "--eval", str(bad)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "bad.jsonl:2:" in proc.stderr
