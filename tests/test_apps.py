"""The three app scripts run headless with AppTest against tiny local models (built here, pointed to
by BIANQUE_* variables or CLI arguments). Each test checks what was rendered AND what the app passed
to the real loaders and doctors (recorded by a thin wrapper around them)."""
from __future__ import annotations

import gc
import logging
import os
import sys
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from bianque.prompt import PATIENT, Turn
from bianque.session import Consultation

# What the user reads, written here (not imported from the code under test).
GREETING = "我是利用人工智能技术，结合大数据训练得到的智能医疗问答模型扁鹊，你可以向我提问。"
DISCLAIMER = "以下回答由扁鹊健康模型自动生成，仅供参考！"
ADVISE_NOW_TEXT = "请直接给我建议。"
EMPTY_REPLY = "*（模型没有生成内容，可以点击「重新生成」）*"

ROOT = Path(__file__).resolve().parents[1]
V1_APP, V2_APP, COQ_APP = "bianque_v1_app.py", "bianque_v2_app.py", "bianque_v1_v2_app.py"
TIMEOUT = 60


class Recorder:
    """A loaded doctor, unchanged, that remembers how it was loaded and every reply() call."""

    def __init__(self, doctor, load_args, load_kwargs):
        self.doctor, self.load_args, self.load_kwargs = doctor, load_args, load_kwargs
        self.calls: list[tuple[tuple[Turn, ...], object]] = []
        self.fail: BaseException | None = None
        self.script: list[str] = []  # replies to give instead of the tiny model's (random) text

    def __getattr__(self, name):
        return getattr(self.doctor, name)

    def reply(self, turns, params=None):
        self.calls.append((tuple(turns), params))
        if self.fail is not None:
            raise self.fail
        if self.script:
            return iter([self.script.pop(0)])
        return self.doctor.reply(turns, params)


@pytest.fixture(scope="module")
def v1_dir(tmp_path_factory) -> Path:
    from tiny_t5 import build_tiny_t5

    return build_tiny_t5(tmp_path_factory.mktemp("tiny_v1"))


@pytest.fixture(scope="module")
def v2_dir(tmp_path_factory) -> Path:
    from tiny_glm import build_tiny_glm

    return build_tiny_glm(tmp_path_factory.mktemp("tiny_v2"))


@pytest.fixture
def backend(monkeypatch) -> dict[str, Recorder]:
    """Wrap the library loaders the apps use; models are loaded afresh for each test."""
    from bianque import ui

    real = ui._loader
    loaded: dict[str, Recorder] = {}

    def loader(kind):
        def load(*args, **kwargs):
            loaded[kind] = Recorder(real(kind)(*args, **kwargs), args, kwargs)
            return loaded[kind]
        return load

    ui._serve.clear()
    monkeypatch.setattr(ui, "_loader", loader)
    for name in [k for k in os.environ if k.startswith("BIANQUE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("BIANQUE_DEVICE", "cpu")
    monkeypatch.setattr(sys, "argv", ["app.py"])  # not pytest's own arguments
    yield loaded
    ui._serve.clear()


def start(script: str, monkeypatch, argv: tuple[str, ...] = (), **env: str) -> AppTest:
    monkeypatch.setattr(sys, "argv", [script, *argv])
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    at = AppTest.from_file(str(ROOT / script), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, at.exception
    return at


def quick(at: AppTest, kind: str, tokens: int = 12) -> None:
    """Greedy and short: tiny random models would otherwise ramble for hundreds of tokens."""
    at.toggle(key=f"{kind}.do_sample").set_value(False)
    key = "v1.max_new_tokens" if kind == "v1" else "v2.max_length"
    at.number_input(key=key).set_value(tokens if kind == "v1" else 96)


def send(at: AppTest, text: str) -> AppTest:
    at.chat_input(key="prompt").set_value(text).run()
    assert not at.exception, at.exception
    return at


def bubbles(at: AppTest) -> list[tuple[str, list[str], list[str]]]:
    """(avatar name, captions, markdown) of every chat bubble, top to bottom."""
    return [(cm.name, [c.value for c in cm.caption], [m.value for m in cm.markdown]) for cm in at.chat_message]


def consultation(at: AppTest) -> Consultation:
    return at.session_state["consultation"]


# ---------------------------------------------------------------- BianQue-1.0 app

def test_v1_app_greets_answers_the_first_message_and_labels_it(backend, v1_dir, monkeypatch):
    at = start(V1_APP, monkeypatch, BIANQUE_V1_MODEL=v1_dir)
    assert bubbles(at) == [("assistant", [], [GREETING])]
    assert DISCLAIMER in [c.value for c in at.caption]
    assert backend["v1"].load_args == (str(v1_dir),)
    assert backend["v1"].load_kwargs == {"device": "cpu", "dtype": None, "max_batch": 4}  # the CPU default
    assert backend["v1"].calls == []  # the greeting is never sent to a model
    quick(at, "v1")
    send(at, "我头疼三天了")

    (turns, params), = backend["v1"].calls
    assert turns == (Turn(PATIENT, "我头疼三天了"),)
    assert params.max_new_tokens == 12 and not params.sampling.do_sample
    assert params.sampling.temperature == 0.7 and params.sampling.top_p == 1.0  # the original defaults
    reply = consultation(at).messages[-1]
    assert reply.model == "v1" and reply.text and reply.label == "BianQue-1.0"
    assert bubbles(at)[1:] == [("user", [], ["我头疼三天了"]), ("assistant", ["BianQue-1.0"], [reply.text])]
    assert [b.label for b in at.button if b.key == "regenerate"] == ["重新生成"]
    assert not [b for b in at.button if b.key == "advise"]  # advice-now is the combined app's


def test_v1_app_regenerates_and_starts_a_new_consultation(backend, v1_dir, monkeypatch):
    at = start(V1_APP, monkeypatch, BIANQUE_V1_MODEL=v1_dir)
    quick(at, "v1")
    send(at, "咳嗽一周了")
    at.number_input(key="v1.max_new_tokens").set_value(5)
    at.button(key="regenerate").click().run()
    assert [call[0] for call in backend["v1"].calls] == [(Turn(PATIENT, "咳嗽一周了"),)] * 2
    assert backend["v1"].calls[1][1].max_new_tokens == 5
    assert [m.role for m in consultation(at).messages] == ["patient", "doctor"]

    at.button(key="new").click().run()
    assert consultation(at).messages == [] and bubbles(at) == [("assistant", [], [GREETING])]
    send(at, "失眠")
    assert backend["v1"].calls[-1][0] == (Turn(PATIENT, "失眠"),)  # nothing from before


def test_v1_app_sends_the_whole_dialogue_and_ignores_empty_messages(backend, v1_dir, monkeypatch):
    at = start(V1_APP, monkeypatch, BIANQUE_V1_MODEL=v1_dir)
    quick(at, "v1")
    send(at, "   \n ")
    assert backend["v1"].calls == [] and consultation(at).messages == []
    send(at, "头晕")
    send(at, "两天了")
    turns = backend["v1"].calls[-1][0]
    first_reply = consultation(at).messages[1].text
    assert [t.text for t in turns] == ["头晕", first_reply, "两天了"]
    assert [t.role for t in turns] == ["patient", "doctor", "patient"]


def test_v1_app_keeps_an_over_long_message_and_notes_the_fit(backend, v1_dir, monkeypatch):
    at = start(V1_APP, monkeypatch, BIANQUE_V1_MODEL=v1_dir)
    quick(at, "v1")
    at.number_input(key="v1.max_input_tokens").set_value(24)
    long_text = "我最近经常头疼，晚上失眠，" * 40
    send(at, long_text)
    assert backend["v1"].calls[-1][0] == (Turn(PATIENT, long_text),)  # kept whole; the doctor fits it
    reply = consultation(at).messages[-1]
    assert reply.note.startswith("对话超出模型长度：最新消息过长，只保留了结尾部分（截去开头 ")
    assert f":material/info: {reply.note}" in bubbles(at)[-1][1]
    assert consultation(at).messages[0].text == long_text


def test_v1_app_takes_cli_arguments(backend, v1_dir, monkeypatch):
    at = start(V1_APP, monkeypatch, argv=("--v1-model", str(v1_dir), "--device", "cpu", "--dtype", "float32",
                                          "--max-batch", "0"))
    assert backend["v1"].load_args == (str(v1_dir),)
    assert backend["v1"].load_kwargs == {"device": "cpu", "dtype": "float32", "max_batch": 0}
    assert f"BianQue-1.0：`{v1_dir}` · cpu · float32" in [c.value for c in at.sidebar.caption]


def test_v1_app_missing_model_is_an_error_page_not_a_traceback(backend, tmp_path, monkeypatch):
    at = start(V1_APP, monkeypatch, BIANQUE_V1_MODEL=tmp_path / "no-such-model")
    message = at.error[0].value
    assert "BianQue-1.0 加载失败" in message and "could not load" in message
    assert "BIANQUE_V1_MODEL" in message and "python -m bianque download" in message
    assert "--v1-model DIR" in at.info[0].value
    assert not at.chat_input and not at.exception


def test_coq_app_with_both_models_missing_names_both(backend, tmp_path, monkeypatch):
    at = start(COQ_APP, monkeypatch, BIANQUE_V1_MODEL=tmp_path / "no-v1", BIANQUE_V2_MODEL=tmp_path / "no-v2")
    errors = [e.value for e in at.error]
    assert len(errors) == 2
    assert errors[0].startswith("**BianQue-1.0 加载失败**") and f"no such directory {tmp_path}/no-v1" in errors[0]
    assert errors[1].startswith("**BianQue-2.0 加载失败**") and f"no such directory {tmp_path}/no-v2" in errors[1]
    infos = [i.value for i in at.info]
    assert "`BIANQUE_V1_MODEL=DIR`" in infos[0] and "--v1-model DIR" in infos[0]
    assert "`BIANQUE_V2_MODEL=DIR`" in infos[1] and "--v2-model DIR" in infos[1]
    assert not at.chat_input and not at.exception


def test_bad_arguments_are_an_error_page(backend, v1_dir, monkeypatch):
    at = start(V1_APP, monkeypatch, argv=("--dtype", "float8"), BIANQUE_V1_MODEL=v1_dir)
    assert "启动参数有误" in at.error[0].value and "float8" in at.error[0].value
    assert not at.chat_input


def test_out_of_memory_keeps_the_dialogue_and_retry_answers_it(backend, v1_dir, monkeypatch):
    at = start(V1_APP, monkeypatch, BIANQUE_V1_MODEL=v1_dir)
    quick(at, "v1")
    backend["v1"].fail = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    send(at, "肚子疼")
    assert any("内存/显存不足" in e.value for e in at.error)
    assert [m.text for m in consultation(at).messages] == ["肚子疼"] and consultation(at).pending is None
    assert bubbles(at)[-1] == ("user", [], ["肚子疼"])

    backend["v1"].fail = None
    at.button(key="retry").click().run()
    assert [m.role for m in consultation(at).messages] == ["patient", "doctor"]
    assert not any("内存/显存不足" in e.value for e in at.error)
    assert [c[0] for c in backend["v1"].calls] == [(Turn(PATIENT, "肚子疼"),)] * 2


def test_a_reply_interrupted_by_stop_is_kept_and_marked(backend, v1_dir, monkeypatch):
    at = start(V1_APP, monkeypatch, BIANQUE_V1_MODEL=v1_dir)
    c = Consultation()  # the state a Stop click leaves: the run died while the reply streamed
    c.add_patient("发烧")
    c.start_reply(model="v1", label="BianQue-1.0").text = "体温多"
    at.session_state["consultation"] = c
    at.run()
    assert c.pending is None and c.messages[-1].stopped and c.messages[-1].text == "体温多"
    assert bubbles(at)[-1] == ("assistant", ["BianQue-1.0", ":material/stop_circle: 已停止：以上是停止前生成的部分回复"], ["体温多"])
    assert backend["v1"].calls == []


def test_red_flags_get_an_emergency_notice_whatever_the_model_says(backend, v1_dir, monkeypatch):
    pytest.importorskip("bianque.safety", reason="the red-flag rules (bianque.safety) are not importable")
    at = start(V1_APP, monkeypatch, BIANQUE_V1_MODEL=v1_dir)
    quick(at, "v1")
    send(at, "我头疼")
    assert not at.error
    send(at, "突然胸痛，满头大汗，喘不上气")
    notices = [e.value for e in at.error]
    assert len(notices) == 1 and notices[0].startswith("**请立即拨打120或前往急诊**")


def test_the_notice_shows_every_flag_with_its_full_explanation_and_action(backend, v1_dir, monkeypatch):
    at = start(V1_APP, monkeypatch, BIANQUE_V1_MODEL=v1_dir)
    quick(at, "v1")
    send(at, "突然胸痛，出了一身冷汗，而且一侧肢体无力")
    assert [e.value for e in at.error] == [
        "**请立即拨打120或前往急诊**\n\n"
        "- 胸痛伴出汗、气短、放射到左臂/后背/下巴，或胸口像被重物压住、撕裂样疼，可能是心肌梗死或主动脉夹层。"
        "请立即拨打120，或马上去最近医院的急诊。\n"
        "  现在可以做：立即停止活动、坐下或半躺休息，不要自己开车去医院；有医生开过的硝酸甘油可按医嘱含服。\n"
        "- 口角歪斜、一侧肢体无力或麻木、说话不清、突然看不见，可能是脑卒中（中风），越早治疗越好。"
        "请立即拨打120，或马上去最近医院的急诊。\n"
        "  现在可以做：记下症状开始的时间，让患者躺下、头偏向一侧，不要喂水喂药。"
    ]


def test_a_split_emergency_gets_its_notice_under_the_completing_message(backend, v1_dir, monkeypatch):
    at = start(V1_APP, monkeypatch, BIANQUE_V1_MODEL=v1_dir)
    quick(at, "v1")
    send(at, "我想了很久")
    send(at, "遗书已经写好放在桌上了")
    send(at, "我头疼")
    notices = [e.value for e in at.error]
    assert notices == [
        "**请立即拨打120或前往急诊**\n\n"
        "- 你的安全最重要。如果你有伤害自己或结束生命的想法或计划，请立即拨打120或110，或去最近医院的急诊；"
        "也可以拨打全国心理援助热线12356。\n"
        "  现在可以做：现在就告诉身边信任的人，不要独自一人，把药物、刀具等危险物品移开；拨打12356心理援助热线或120。"
    ]
    at2 = start(V1_APP, monkeypatch, BIANQUE_V1_MODEL=v1_dir)
    quick(at2, "v1")
    send(at2, "胸口疼")
    assert not at2.error
    send(at2, "还出了好多冷汗")
    assert len(at2.error) == 1 and "心肌梗死" in at2.error[0].value


def test_v1_sidebar_shows_the_original_defaults(backend, v1_dir, monkeypatch):
    at = start(V1_APP, monkeypatch, BIANQUE_V1_MODEL=v1_dir)
    assert at.slider(key="v1.temperature").value == 0.7 and at.slider(key="v1.top_p").value == 1.0
    assert at.toggle(key="v1.do_sample").value is True and at.number_input(key="v1.top_k").value == 50
    assert at.number_input(key="v1.max_new_tokens").value == 512


def test_loaded_models_are_left_out_of_the_per_run_garbage_collection(backend, v1_dir, monkeypatch):
    """Streamlit collects all generations after every run (runner.postScriptGC), holding the GIL;
    over torch and the model that stalled the sending of a reply's first characters by 0.3-1 s.
    The loader freezes the heap, so those collections no longer scan the model or the libraries."""
    at = start(V1_APP, monkeypatch, BIANQUE_V1_MODEL=v1_dir)
    assert gc.get_freeze_count() > 0
    model = backend["v1"].doctor.model
    scanned = {id(o) for o in gc.get_objects()}  # every generation the collector scans, not the frozen
    assert id(backend["v1"]) not in scanned and id(model) not in scanned
    assert not any(id(m) in scanned for m in model.modules())
    quick(at, "v1")
    send(at, "我头疼三天了")  # later runs still work and their objects are collected as usual
    assert consultation(at).messages[-1].text


def test_served_apps_do_not_watch_their_sources():
    """With watching on, each run that imports something new rescans all of sys.modules on the
    event-loop thread, holding back every queued message (the first reply's first characters)."""
    import tomllib

    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text(encoding="utf-8"))
    assert config["server"]["fileWatcherType"] == "none"


def test_patient_text_never_reaches_logs_or_stdout(backend, v1_dir, monkeypatch, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    at = start(V1_APP, monkeypatch, BIANQUE_V1_MODEL=v1_dir)
    quick(at, "v1", tokens=24)
    secret = "我叫张三，身份证号110101199001011234，胸闷两周了"
    send(at, secret)
    backend["v1"].fail = RuntimeError(f"model crashed on: {secret}")  # an exception that quotes the patient
    at.button(key="regenerate").click().run()
    assert any("生成回复时出错（RuntimeError）" in e.value for e in at.error)
    records = "\n".join(r.getMessage() for r in caplog.records)
    out, err = capfd.readouterr()
    assert "reply model=v1" in records  # metadata is logged
    for text in [secret, "110101199001011234"]:
        assert text not in records and text not in out and text not in err


# ---------------------------------------------------------------- BianQue-2.0 app

def test_v2_app_without_its_backend_says_so(backend, monkeypatch):
    from bianque import ui

    def unavailable(kind):
        raise ModuleNotFoundError("No module named 'bianque.glm.chat'")

    monkeypatch.setattr(ui, "_loader", unavailable)
    at = start(V2_APP, monkeypatch)
    assert "BianQue-2.0 暂不可用" in at.error[0].value and not at.chat_input


def test_v2_compile_setting_reaches_the_loader(backend, v2_dir, monkeypatch):
    from bianque.glm.advisor import GLMAdvisor

    warmed = []  # the real warm-up compiles (tested in test_glm_static); here: that loading asks for it
    monkeypatch.setattr(GLMAdvisor, "warm_up", lambda self: warmed.append(self.compile))
    start(V2_APP, monkeypatch, BIANQUE_V2_MODEL=v2_dir, BIANQUE_V2_COMPILE="1", BIANQUE_V2_MAX_BATCH="0")
    assert backend["v2"].load_kwargs["compile"] is True and backend["v2"].doctor.compile is True
    assert warmed == [True] and backend["v2"].doctor.engine is None
    # On the batching engine (the default max_batch) too: its batched steps are compiled at load.
    monkeypatch.delenv("BIANQUE_V2_MAX_BATCH")
    start(V2_APP, monkeypatch, BIANQUE_V2_MODEL=v2_dir, BIANQUE_V2_COMPILE="1")
    assert backend["v2"].load_kwargs["compile"] is True and backend["v2"].load_kwargs["max_batch"] == 4
    assert backend["v2"].doctor.compile is True and backend["v2"].doctor.engine is not None
    assert warmed == [True, True]


def test_v2_app_answers_with_its_defaults_and_label(backend, v2_dir, monkeypatch):
    at = start(V2_APP, monkeypatch, BIANQUE_V2_MODEL=v2_dir, BIANQUE_V2_MAX_BATCH="2")
    assert at.slider(key="v2.temperature").value == 0.95 and at.slider(key="v2.top_p").value == 0.7
    assert at.number_input(key="v2.max_length").value == 2048
    assert backend["v2"].load_kwargs == {"device": "cpu", "dtype": None, "quantize": None, "compile": False,
                                         "max_batch": 2}
    quick(at, "v2")
    send(at, "最近总是失眠怎么办")
    (turns, params), = backend["v2"].calls
    assert turns == (Turn(PATIENT, "最近总是失眠怎么办"),) and params.max_length == 96
    reply = consultation(at).messages[-1]
    assert reply.model == "v2" and reply.label == "BianQue-2.0"
    assert bubbles(at)[-1] == ("assistant", ["BianQue-2.0"], [reply.text or EMPTY_REPLY])


def test_v2_app_missing_model_names_its_variable(backend, tmp_path, monkeypatch):
    at = start(V2_APP, monkeypatch, BIANQUE_V2_MODEL=tmp_path / "missing")
    assert "BIANQUE_V2_MODEL" in at.error[0].value and "--v2-model DIR" in at.info[0].value


def test_invalid_settings_are_reported_and_the_defaults_used(backend, v2_dir, monkeypatch):
    at = start(V2_APP, monkeypatch, BIANQUE_V2_MODEL=v2_dir)
    at.number_input(key="v2.max_length").set_value(2).run()
    assert any("设置无效，暂用默认值" in e.value and "max_length" in e.value for e in at.sidebar.error)
    at.number_input(key="v2.max_length").set_value(96).run()
    send(at, "头晕")
    assert backend["v2"].calls[-1][1].max_length == 96 and not at.sidebar.error


# ---------------------------------------------------------------- Chain of Questioning app

def test_coq_app_labels_stages_and_advises_now(backend, v1_dir, v2_dir, monkeypatch):
    at = start(COQ_APP, monkeypatch, BIANQUE_V1_MODEL=v1_dir, BIANQUE_V2_MODEL=v2_dir)
    assert bubbles(at) == [("assistant", [], [GREETING])]
    assert at.number_input(key="max_questions").value == 8
    quick(at, "v1")
    quick(at, "v2")
    backend["v1"].script = ["头疼是哪个部位？"]
    send(at, "我头疼三天了")
    first = consultation(at).messages[-1]
    assert backend["v1"].calls[0][0] == (Turn(PATIENT, "我头疼三天了"),)  # v1 is always asked first
    assert (first.stage, first.model, first.text) == ("question", "v1", "头疼是哪个部位？")
    assert first.label == "问询 1/8 · BianQue-1.0"
    assert bubbles(at)[-1] == ("assistant", ["问询 1/8 · BianQue-1.0"], ["头疼是哪个部位？"])

    at.button(key="advise").click().run()
    assert not at.exception
    messages = consultation(at).messages
    advice = messages[-1]
    assert (advice.stage, advice.model, advice.label) == ("advice", "v2", "建议 · BianQue-2.0")
    assert bubbles(at)[-1][1][0] == "建议 · BianQue-2.0"
    turns, params = backend["v2"].calls[-1]
    assert turns[-1] == Turn(PATIENT, ADVISE_NOW_TEXT) and params.max_length == 96
    assert [t.text for t in turns[:-1]] == [m.text for m in messages[:-2]]


def test_coq_app_gives_advice_after_max_questions(backend, v1_dir, v2_dir, monkeypatch):
    at = start(COQ_APP, monkeypatch, BIANQUE_V1_MODEL=v1_dir, BIANQUE_V2_MODEL=v2_dir, BIANQUE_MAX_QUESTIONS=0)
    assert at.number_input(key="max_questions").value == 0
    quick(at, "v2")
    send(at, "孩子发烧了")
    reply = consultation(at).messages[-1]
    assert (reply.stage, reply.model, reply.label) == ("advice", "v2", "建议 · BianQue-2.0")
    assert backend["v1"].calls == [] and len(backend["v2"].calls) == 1
    assert at.caption[0].value and any(c.value == DISCLAIMER for c in at.caption)


def test_coq_app_counts_questions_then_hands_over_to_advice(backend, v1_dir, v2_dir, monkeypatch):
    at = start(COQ_APP, monkeypatch, BIANQUE_V1_MODEL=v1_dir, BIANQUE_V2_MODEL=v2_dir, BIANQUE_MAX_QUESTIONS=2)
    quick(at, "v2")
    backend["v1"].script = ["头疼多久了？", "疼痛在什么部位？"]  # what the router must see as questions
    send(at, "我头疼")
    send(at, "三天了")
    send(at, "额头")
    doctor = [m for m in consultation(at).messages if m.role == "doctor"]
    assert [m.label for m in doctor] == ["问询 1/2 · BianQue-1.0", "问询 2/2 · BianQue-1.0", "建议 · BianQue-2.0"]
    assert [b[1][0] for b in bubbles(at)[1:] if b[0] == "assistant"] == [m.label for m in doctor]
    assert len(backend["v1"].calls) == 2  # the cap is reached: v1 is not asked a third time
    (turns, _), = backend["v2"].calls
    assert turns == (Turn(PATIENT, "我头疼"), Turn("doctor", "头疼多久了？", "question"), Turn(PATIENT, "三天了"),
                     Turn("doctor", "疼痛在什么部位？", "question"), Turn(PATIENT, "额头"))


def test_coq_app_obeys_the_sidebar_max_questions_box(backend, v1_dir, v2_dir, monkeypatch):
    at = start(COQ_APP, monkeypatch, BIANQUE_V1_MODEL=v1_dir, BIANQUE_V2_MODEL=v2_dir)
    quick(at, "v2")
    at.number_input(key="max_questions").set_value(1).run()  # the default is 8
    backend["v1"].script = ["头疼多久了？", "疼痛在什么部位？"]
    send(at, "我头疼")
    send(at, "三天了")
    doctor = [m for m in consultation(at).messages if m.role == "doctor"]
    assert [m.label for m in doctor] == ["问询 1/1 · BianQue-1.0", "建议 · BianQue-2.0"]
    assert [b[1][0] for b in bubbles(at)[1:] if b[0] == "assistant"] == ["问询 1/1 · BianQue-1.0", "建议 · BianQue-2.0"]
    assert len(backend["v1"].calls) == 1 and len(backend["v2"].calls) == 1


def test_every_sidebar_generation_control_reaches_the_models(backend, v1_dir, v2_dir, monkeypatch):
    from bianque.glm.advisor import V2Params
    from bianque.sampling import SamplingParams
    from bianque.t5 import V1Params

    at = start(COQ_APP, monkeypatch, BIANQUE_V1_MODEL=v1_dir, BIANQUE_V2_MODEL=v2_dir)
    for key, value in {"v1.temperature": 0.3, "v1.top_p": 0.8, "v2.temperature": 0.5, "v2.top_p": 0.6}.items():
        at.slider(key=key).set_value(value)
    for key, value in {"v1.top_k": 7, "v1.max_new_tokens": 6, "v1.no_repeat_ngram_size": 2, "v1.max_input_tokens": 300,
                       "v2.top_k": 9, "v2.max_length": 96, "v2.min_answer_tokens": 20}.items():
        at.number_input(key=key).set_value(value)
    backend["v1"].script = ["头疼多久了？"]
    send(at, "我头疼")
    at.button(key="advise").click().run()
    assert not at.exception
    assert backend["v1"].calls[-1][1] == V1Params(SamplingParams(True, 0.3, 0.8, 7), max_new_tokens=6,
                                                  no_repeat_ngram_size=2, max_input_tokens=300)
    assert backend["v2"].calls[-1][1] == V2Params(SamplingParams(True, 0.5, 0.6, 9), max_length=96, min_answer_tokens=20)
    at.toggle(key="v1.do_sample").set_value(False).run()  # greedy: the sampling sliders are disabled
    assert at.slider(key="v1.temperature").disabled and at.number_input(key="v1.top_k").disabled
