"""The learned safety backstop (bianque/safety_model.py): reproducible training, a fast bounded
``suspect``, and a hook in ``red_flags`` that only speaks when switched on and no rule fired."""
from __future__ import annotations

import hashlib
import time

import pytest
import torch
from safetensors import safe_open

from bianque import safety, safety_model
from bianque.safety import red_flags
from tests.test_safety import DEV, INDEP, KNOWN_FALSE_ALARMS, NEGATIVE, POSITIVE, REAL, names


@pytest.fixture(scope="module")
def fresh():
    """A fresh training run on the committed tables (about a second or two)."""
    return safety_model.fit(safety_model.training_rows())


@pytest.fixture
def backstop_on(monkeypatch):
    monkeypatch.setattr(safety, "MODEL_BACKSTOP", True)


def test_training_is_deterministic():
    rows = safety_model.training_rows()[::3]
    w1, b1 = safety_model.fit(rows, steps=40)
    w2, b2 = safety_model.fit(rows, steps=40)
    assert torch.equal(w1, w2) and torch.equal(b1, b2)
    assert w1.abs().sum() > 0  # it learned something


def test_committed_weights_are_a_fresh_training_run_on_the_committed_data(fresh):
    meta = safety_model.metadata()
    with safe_open(str(safety_model.WEIGHTS), framework="pt") as f:
        weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
    rows = safety_model.training_rows()
    assert meta["data_sha256"] == safety_model.data_hash(rows), "tables changed: python -m bianque.safety_model train"
    # bit for bit on one machine; another CPU's vector width may round a sum's last bit differently
    torch.testing.assert_close(weight, fresh[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(bias, fresh[1].reshape(1), rtol=1e-4, atol=1e-6)
    assert safety_model.WEIGHTS.stat().st_size <= 1 << 20


def test_train_command_writes_the_same_file_twice(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert safety_model.main(["train", "--out", str(a)]) == 0
    safety_model.train(path=b)
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    assert safety_model.load(a) == safety_model.load(b)


def test_suspect_is_a_probability_and_reads_the_window():
    for text in ["", "头疼", "突然胸口疼，出了一身冷汗", "😀" * 50, "头痛三天了。" * 5000]:
        assert 0.0 <= safety_model.suspect(text) <= 1.0
    assert safety_model.suspect("突然胸口疼，出了一身冷汗") > 0.9 > 0.1 > safety_model.suspect("怎么预防感冒")
    # the window is the last WINDOW messages: older ones do not count
    earlier = ["我爸突然倒在地上叫不醒", "嗯", "好的"]
    assert safety_model.features("谢谢", earlier) == safety_model.features("谢谢", earlier[1:])
    assert safety_model.features("谢谢", earlier) != safety_model.features("谢谢", earlier[2:])


def test_suspect_is_bounded_and_fast():
    huge = "头痛三天了，一阵一阵的。" * 5000
    buckets, value = safety_model.features(huge, [huge, huge])
    assert len(buckets) <= len(safety_model.ORDERS) * safety_model.MAX_CHARS and value > 0
    texts = ["我头疼三天了，一阵一阵的，晚上睡不好。", "孩子发烧38度5，精神还可以，吃饭少。" * 4, huge]
    safety_model.fires(texts[0], texts)
    start = time.process_time()
    for _ in range(100):
        for text in texts:
            safety_model._bucket.cache_clear()
            safety_model._normalise.cache_clear()
            safety_model.fires(text, ["我最近胃不太舒服。", "吃了饭以后更明显，有时候反酸。"])
    per_message_ms = (time.process_time() - start) * 1000 / 300
    assert per_message_ms < 2.0  # about 0.2 ms measured; the budget is 1 ms, with room for a busy CI machine


# emergencies in words the rules did not know when this was written (they may learn some later)
RULE_MISSES = ["我爸吃完饭突然整个人不对劲，眼睛直勾勾的，叫他名字也不理，嘴里吐泡泡",
               "我妈刚才突然一头栽下去了", "孩子把洗碗块含嘴里了，现在一直流口水哭",
               "我妈突然人往后一仰就没动静了", "老公在车库里待了半天出来站不稳，脸红扑扑的，车没熄火"]


def test_hook_is_on_by_default_and_speaks_only_when_no_rule_fired(monkeypatch):
    assert safety.MODEL_BACKSTOP is True  # switched on after blind scoring (sets 15-16)
    monkeypatch.setattr(safety, "MODEL_BACKSTOP", False)
    probe = "他说胸口像被大石头压着，透不过气，浑身是汗"  # the rules fire
    expected = names(red_flags(probe))
    assert expected
    calls = []
    monkeypatch.setattr(safety_model, "backstop", lambda t, e=(): calls.append(t) or [safety_model.MODEL_FLAG])
    assert red_flags("头疼") == [] and calls == []  # switched off: never asked
    monkeypatch.setattr(safety, "MODEL_BACKSTOP", True)
    assert names(red_flags(probe)) == expected and calls == []  # a rule fired: not asked
    assert red_flags("头疼", ["嗯"]) == [safety_model.MODEL_FLAG] and calls == ["头疼"]


def test_hook_adds_the_generic_notice_when_no_rule_fires(monkeypatch):
    monkeypatch.setattr(safety, "MODEL_BACKSTOP", True)
    # every example gets a notice: from the rules if they learned its words meanwhile, else from the model
    assert [t for t in RULE_MISSES if not red_flags(t)] == []
    monkeypatch.setattr(safety, "_fired", lambda found: [])  # rules that know no words at all
    assert red_flags("突然胸口疼，出了一身冷汗") == [safety_model.MODEL_FLAG]
    assert red_flags("怎么预防感冒") == [] and red_flags("头疼三天了，一阵一阵的") == []
    d = safety.flag_dict(safety_model.MODEL_FLAG)
    assert d["name"] == "model_suspected" and "120" in d["message"] and d["action"].endswith("。")


class _Keywords:
    """A stand-in model: certain when its window holds both words."""

    def probability(self, text, earlier=()):
        window = "".join([*list(earlier)[-(safety.WINDOW - 1):], text])
        return float("胸口疼" in window and "冷汗" in window)


def test_model_notice_appears_under_the_message_that_completes_it_once():
    k = _Keywords()
    assert not safety_model.fires("胸口疼", [], 0.5, k)
    assert safety_model.fires("还出了好多冷汗", ["胸口疼"], 0.5, k)  # completed by the window
    assert not safety_model.fires("嗯", ["胸口疼", "还出了好多冷汗"], 0.5, k)  # already shown
    assert safety_model.fires("胸口疼，冷汗", ["胸口疼", "还出了好多冷汗"], 0.5, k)  # said again alone
    assert not safety_model.fires("还出了好多冷汗", ["胸口疼", "嗯", "好"], 0.5, k)  # out of the window


# --- with the switch ON, the committed tables still behave as tests/test_safety.py expects --------
@pytest.mark.usefixtures("backstop_on")
def test_switched_on_positive_table_is_unchanged():
    assert [names(red_flags(text)) for text, _ in POSITIVE] == [expected for _, expected in POSITIVE]


@pytest.mark.usefixtures("backstop_on")
def test_switched_on_no_table_negative_gets_a_notice():
    alarms = [t for t in NEGATIVE if red_flags(t)]
    alarms += [t for label, t in DEV if label == "none" and red_flags(t.split(" || ")[-1], t.split(" || ")[:-1])]
    # the sets the model was trained on (all of them so far); later sets are scored blind by `eval` first
    alarms += [t for s, label, _, t in INDEP if label == "0" and s in safety_model.TRAIN_SETS
               and t not in KNOWN_FALSE_ALARMS and red_flags(t.split(" || ")[-1], t.split(" || ")[:-1])]
    alarms += [t for _, label, c, t in REAL if label == "0" and c != "still_false_alarm"
               and red_flags(t.split(" || ")[-1], t.split(" || ")[:-1])]
    assert alarms == []


@pytest.mark.usefixtures("backstop_on")
def test_switched_on_dev_split_emergencies_still_wait_for_the_last_message():
    early = []
    for label, text in DEV:
        messages = text.split(" || ")
        if label != "none" and len(messages) > 1:
            early += [m for i, m in enumerate(messages[:-1]) if red_flags(m, messages[:i])]
    assert early == []


def test_eval_command_prints_the_three_scorers(tmp_path, capsys):
    table = tmp_path / "blind.tsv"
    table.write_text("# a blind set\n"
                     "b\t1\tchest_pain\t突然胸口疼，出了一身冷汗\n"
                     "b\t1\tchest_pain\t胸口疼 || 还出了好多冷汗\n"
                     "b\t0\tnone\t头疼三天了，一阵一阵的\n", encoding="utf-8")
    assert safety_model.main(["eval", "--data", str(table)]) == 0
    out = capsys.readouterr().out
    assert "model alone" in out and "rules alone" in out and "rules OR model" in out and "ms per message" in out
    assert "rules alone      recall 1.000 (2/2)   false alarms 0.000 (0/1)" in out
    bad = tmp_path / "bad.tsv"
    bad.write_text("x\t2\tc\td\te\n", encoding="utf-8")
    assert safety_model.main(["eval", "--data", str(bad)]) == 1
    assert "expected SET" in capsys.readouterr().err
