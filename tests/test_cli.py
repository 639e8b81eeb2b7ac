"""The terminal consultation: command handling with recording fake doctors, and the real CLI end to end."""
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bianque.cli import Reply, build_parser, handle_line, label, make_responder, run_json, session_params
from bianque.prompt import DOCTOR, PATIENT, Turn
from bianque.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class FakeParams:
    sampling: SamplingParams = SamplingParams(True, 0.7, 1.0, 50)
    max_new_tokens: int = 512


@dataclass
class FakeDoctor:
    answers: list
    default_params: FakeParams = FakeParams()
    calls: list = field(default_factory=list)

    def reply(self, turns, params=None):
        self.calls.append((list(turns), params))
        yield from self.answers.pop(0)


def fake_args(**kw):
    args = build_parser().parse_args(["chat", *kw.pop("argv", [])])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def test_session_params_apply_overrides():
    doc = FakeDoctor([])
    params = session_params(doc, fake_args(argv=["--greedy", "--v1-top-p", "0.9", "--max-new-tokens", "64"]), "v1")
    assert params == FakeParams(SamplingParams(False, 0.7, 0.9, 50), 64)
    assert session_params(doc, fake_args(), "v1") == FakeParams()


def test_json_mode_single_model_passes_dialogue_and_params():
    doc = FakeDoctor([["失眠", "多久了？"], ["睡前", "少看手机。"]])
    respond = make_responder("v1", {"v1": doc}, fake_args(argv=["--greedy"]), 8)
    out = io.StringIO()
    run_json(respond, io.StringIO("我失眠\n\n   \n两周了\n"), out)
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert lines == [
        {"stage": "question", "model": "v1", "text": "失眠多久了？", "red_flags": []},
        {"stage": "question", "model": "v1", "text": "睡前少看手机。", "red_flags": []},
    ]
    first, second = doc.calls
    assert first[0] == [Turn(PATIENT, "我失眠")]
    assert second[0] == [Turn(PATIENT, "我失眠"), Turn(DOCTOR, "失眠多久了？", "question"), Turn(PATIENT, "两周了")]
    assert first[1].sampling.do_sample is False


def test_commands_clear_and_advise():
    turns = []
    seen = []

    def respond(ts, advise_now):
        seen.append((list(ts), advise_now))
        return Reply("question", "v1", iter(["好"]))

    assert handle_line("/advise", turns, respond) == ("advise-empty", None)  # nothing to advise on yet
    assert turns == [] and seen == []
    action, reply = handle_line("  头疼  ", turns, respond)
    assert action == "reply" and turns == [Turn(PATIENT, "头疼")]
    turns.append(Turn(DOCTOR, "疼多久了？", "question"))
    action, _ = handle_line("/advise", turns, respond)
    # as the apps' button: a visible patient request, so the advisor reads what was asked
    asked = [Turn(PATIENT, "头疼"), Turn(DOCTOR, "疼多久了？", "question"), Turn(PATIENT, "请直接给我建议。")]
    assert action == "reply" and seen[-1] == (asked, True)
    turns.append(Turn(DOCTOR, "多休息。", "advice"))
    action, _ = handle_line("/advise 还有点发热", turns, respond)
    assert seen[-1][1] is True and seen[-1][0][-1] == Turn(PATIENT, "还有点发热")
    assert handle_line("/clear", turns, respond) == ("clear", None) and turns == []
    assert handle_line("/quit", turns, respond) == ("quit", None)


def test_labels():
    q = Reply("question", "v1", iter([]))
    a = Reply("advice", "v2", iter([]))
    history = [Turn(PATIENT, "a"), Turn(DOCTOR, "b？", "question")]
    assert label(q, history, 8, "coq") == "问询 2/8 · BianQue-1.0"
    assert label(a, history, 8, "coq") == "建议 · BianQue-2.0"
    assert label(q, history, 8, "v1") == "BianQue-1.0"


def run_cli(args, stdin, env_extra=None, timeout=240):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "bianque", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def tiny_v1(tmp_path_factory):
    from tests.tiny_t5 import build_tiny_t5

    return build_tiny_t5(tmp_path_factory.mktemp("v1"))


def test_cli_v1_json_end_to_end(tiny_v1):
    """The real CLI process prints, for each patient line, the reply the questioner gives in this
    process to the whole dialogue so far (greedy, so both are the same text)."""
    import dataclasses

    from bianque.t5 import load_questioner

    proc = run_cli(["chat", "--mode", "v1", "--v1-model", str(tiny_v1), "--json", "--greedy",
                    "--max-new-tokens", "12", "--device", "cpu"], "头疼三天了\n\n还有点恶心\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    questioner = load_questioner(str(tiny_v1), device="cpu")
    params = dataclasses.replace(questioner.default_params, max_new_tokens=12, sampling=SamplingParams(False))
    first = "".join(questioner.reply([Turn(PATIENT, "头疼三天了")], params))
    second = "".join(questioner.reply([Turn(PATIENT, "头疼三天了"), Turn(DOCTOR, first), Turn(PATIENT, "还有点恶心")], params))
    assert first and second and first != second
    assert lines == [{"stage": "question", "model": "v1", "text": first, "red_flags": []},
                     {"stage": "question", "model": "v1", "text": second, "red_flags": []}]
    assert "头疼" not in proc.stderr  # patient text never reaches the logs


def test_cli_missing_model_is_a_clear_error(tmp_path):
    proc = run_cli(["chat", "--mode", "v1", "--v1-model", str(tmp_path / "none"), "--json"], "hi\n")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "could not load" in proc.stderr and "BIANQUE_V1_MODEL" in proc.stderr and "Traceback" not in proc.stderr


def test_load_doctors_passes_the_v2_compile_and_max_batch_settings(monkeypatch):
    import bianque.glm
    from bianque.cli import load_doctors
    from bianque.settings import parse_settings

    seen = {}
    monkeypatch.setattr(bianque.glm, "load_advisor", lambda model, **kw: seen.update(kw, model=model) or "advisor")
    import torch

    assert load_doctors("v2", parse_settings(["--v2-compile", "--v2-model", "/m/v2"], {})) == {"v2": "advisor"}
    default = "cuda" if torch.cuda.is_available() else "cpu"  # the documented default device
    assert seen == {"model": "/m/v2", "device": default, "dtype": None, "quantize": None, "compile": True,
                    "max_batch": 8 if default == "cuda" else 4}
    seen.clear()
    load_doctors("v2", parse_settings(["--v2-model", "/m/v2", "--device", "cpu", "--v2-dtype", "bfloat16",
                                       "--v2-max-batch", "3"], {}))
    assert seen == {"model": "/m/v2", "device": "cpu", "dtype": "bfloat16", "quantize": None, "compile": False,
                    "max_batch": 3}


def test_chat_help_lists_the_environment_variables():
    out = build_parser()._subparsers._group_actions[0].choices["chat"].format_help()
    assert "environment variables (a flag wins over its variable):" in out
    assert "  BIANQUE_V1_DTYPE        dtype for BianQue-1.0 (--v1-dtype)" in out
    assert "  HF_HUB_OFFLINE          1: never contact the hub, use the local cache only" in out


def test_cli_dtype_typo_in_a_variable_is_named_before_any_model_loads(tmp_path):
    # the model directory does not exist: a load attempt would report that instead
    proc = run_cli(["chat", "--mode", "v1", "--v1-model", str(tmp_path / "none"), "--json"], "hi\n",
                   env_extra={"BIANQUE_V1_DTYPE": "bf61"})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == "error: BIANQUE_V1_DTYPE='bf61' is not a dtype: use float32, float16 or bfloat16"


def test_cli_cuda_on_a_cpu_machine_names_the_variable(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = run_cli(["chat", "--mode", "v1", "--v1-model", str(tmp_path / "none"), "--json"], "hi\n",
                   env_extra={"BIANQUE_DEVICE": "cuda"})
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: BIANQUE_DEVICE='cuda' asks for CUDA, but this machine has no usable CUDA")
    assert "set BIANQUE_DEVICE to cpu or unset it" in proc.stderr and "--device" not in proc.stderr


def test_advise_as_the_first_message_is_answered_not_ignored(monkeypatch, capsys):
    from bianque.cli import run_interactive

    seen = []

    def respond(ts, advise_now):
        seen.append((list(ts), advise_now))
        return Reply("advice", "v2", iter(["多喝水。"]))

    lines = iter(["/advise", "/advise 头疼三天了", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert run_interactive(respond, "coq", 8) == 0
    out = capsys.readouterr().out
    assert "（请先描述您的情况，再输入 /advise 请求建议；也可以一起输入：/advise 头疼三天了）" in out
    assert seen == [([Turn(PATIENT, "头疼三天了")], True)] and "多喝水。" in out


CHEST_NOTICE = (
    "【请立即拨打120或前往急诊】\n"
    "- 胸痛伴出汗、气短、放射到左臂/后背/下巴，或胸口像被重物压住、撕裂样疼，可能是心肌梗死或主动脉夹层。"
    "请立即拨打120，或马上去最近医院的急诊。\n"
    "  现在可以做：立即停止活动、坐下或半躺休息，不要自己开车去医院；有医生开过的硝酸甘油可按医嘱含服。"
)


def test_interactive_prints_the_emergency_notice_under_the_line_that_completes_it(monkeypatch, capsys):
    from bianque.cli import run_interactive

    def respond(ts, advise_now):
        return Reply("question", "v1", iter(["还有别的不舒服吗？"]))

    lines = iter(["胸口疼", "还出了好多冷汗", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert run_interactive(respond, "v1", 8) == 0
    out = capsys.readouterr().out
    assert out.count("【请立即拨打120或前往急诊】") == 1
    # after the second patient line, before the doctor's second reply
    first_reply = out.index("还有别的不舒服吗？")
    notice = out.index(CHEST_NOTICE)
    assert first_reply < notice < out.index("医生", notice)


def test_json_mode_returns_the_red_flags_of_the_patient_line():
    doc = FakeDoctor([["多久了？"], ["别紧张。"], ["好的。"]])
    respond = make_responder("v1", {"v1": doc}, fake_args(argv=["--greedy"]), 8)
    out = io.StringIO()
    run_json(respond, io.StringIO("胸口疼\n还出了好多冷汗\n今晚想从楼上跳下去\n"), out)
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [line["red_flags"] for line in lines[:2]] == [[], [{
        "name": "chest_pain",
        "message": "胸痛伴出汗、气短、放射到左臂/后背/下巴，或胸口像被重物压住、撕裂样疼，可能是心肌梗死或主动脉夹层。"
                   "请立即拨打120，或马上去最近医院的急诊。",
        "action": "立即停止活动、坐下或半躺休息，不要自己开车去医院；有医生开过的硝酸甘油可按医嘱含服。",
    }]]
    assert [f["name"] for f in lines[2]["red_flags"]] == ["self_harm"]
    assert "12356" in lines[2]["red_flags"][0]["message"]


def test_interactive_notice_lists_every_flag_with_its_explanation_and_action(monkeypatch, capsys):
    from bianque.cli import run_interactive

    lines = iter(["突然胸痛，出了一身冷汗，而且一侧肢体无力", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert run_interactive(lambda ts, advise_now: Reply("question", "v1", iter(["多久了？"])), "v1", 8) == 0
    out = capsys.readouterr().out
    assert CHEST_NOTICE + "\n" + (
        "- 口角歪斜、一侧肢体无力或麻木、说话不清、突然看不见，可能是脑卒中（中风），越早治疗越好。"
        "请立即拨打120，或马上去最近医院的急诊。\n"
        "  现在可以做：记下症状开始的时间，让患者躺下、头偏向一侧，不要喂水喂药。\n"
        "医生［BianQue-1.0］：多久了？"
    ) in out


def test_record_flag_stores_the_terminal_consultation(tmp_path, monkeypatch, capsys):
    """--record: the CLI says it records, stores each patient turn (with its red flags) and reply,
    and /clear starts a new consultation; `records show --json` gives them back as typed."""
    from bianque.cli import Recorder
    from bianque.records import open_store
    from bianque.settings import settings_from_args

    url = f"sqlite:///{tmp_path / 'r.db'}"
    monkeypatch.delenv("BIANQUE_RECORD", raising=False)
    settings = settings_from_args(fake_args(argv=["--record", url]), max_batch=1)
    assert settings.record == url
    recorder = Recorder.open(settings.record, "v1", settings)
    assert "本次问诊将被记录" in capsys.readouterr().err
    doc = FakeDoctor([["多久了？"], ["别紧张。"], ["好的。"]])
    respond = make_responder("v1", {"v1": doc}, fake_args(argv=["--greedy"]), 8)
    run_json(respond, io.StringIO("胸口疼，出了一身冷汗\n两天\n/clear\n头晕\n"), io.StringIO(), recorder)
    store = open_store(url)
    first, second = (store.get_consultation(i) for i in store.consultation_ids())
    assert [(t["role"], t["text"], t["stage"]) for t in first["turns"]] == [
        ("patient", "胸口疼，出了一身冷汗", None), ("doctor", "多久了？", "question"),
        ("patient", "两天", None), ("doctor", "别紧张。", "question")]
    assert first["turns"][0]["red_flags"] == ["chest_pain"] and first["app"] == "cli-v1"
    assert [(t["role"], t["text"]) for t in second["turns"]] == [("patient", "头晕"), ("doctor", "好的。")]


def test_record_database_that_cannot_be_opened_is_a_notice(tmp_path, capsys):
    from bianque.cli import Recorder
    from bianque.settings import settings_from_args

    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    url = f"sqlite:///{tmp_path / 'ro' / 'sub' / 'r.db'}"
    settings = settings_from_args(fake_args(argv=["--record", url]), max_batch=1)
    assert Recorder.open(url, "v1", settings) is None
    assert "本次问诊不记录" in capsys.readouterr().err
