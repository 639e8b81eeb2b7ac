"""Front ends answered by a running server (`--server URL`): the CLI in a subprocess and the apps
under AppTest, against a real `python -m bianque serve` on tiny models; the server's routing and
replies must equal what the same front end gives with the models loaded locally."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace

import httpx
import pytest
from streamlit.testing.v1 import AppTest

from bianque.prompt import PATIENT, Turn
from bianque.serving.remote import RemoteDoctor, RemoteError, ServerClient
from tests.test_api import KEY, ROOT, free_port, metric, running_server

DIALOGUE = "我头疼三天了\n晚上睡不好，一周了\n/advise\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory) as s:
        yield s


def chat(*args: str, stdin: str = DIALOGUE) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BIANQUE_")}
    env |= {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "bianque", "chat", "--json", "--greedy", "--max-new-tokens", "8",
                           *args], input=stdin, env=env, capture_output=True, text=True, timeout=300)


def replies(done: subprocess.CompletedProcess) -> list[dict]:
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_cli_through_the_server_equals_the_cli_with_local_models(server):
    remote = replies(chat("--server", server["url"], "--api-key", KEY))
    local = replies(chat("--v1-model", str(server["v1"]), "--v2-model", str(server["v2"]), "--device", "cpu"))
    assert len(remote) == 3 and all(r["text"] for r in remote)
    assert remote == local  # same stages (the server's router decided), models, texts, red flags
    assert remote[-1]["stage"] == "advice" and remote[-1]["model"] == "v2"


def test_a_wrong_key_says_which_setting_to_fix(server):
    with pytest.raises(RemoteError, match="answered 401: .*set --api-key or BIANQUE_API_KEY"):
        ServerClient(server["url"], "wrong").check(["bianque-2.0"])


def test_cli_takes_server_and_key_from_the_environment(server):
    env = {k: v for k, v in os.environ.items() if not k.startswith("BIANQUE_")}
    done = subprocess.run([sys.executable, "-m", "bianque", "chat", "--json", "--greedy", "--mode", "v2"], input="头晕\n",
                          env=env | {"PYTHONPATH": str(ROOT), "BIANQUE_SERVER": server["url"], "BIANQUE_API_KEY": KEY},
                          capture_output=True, text=True, timeout=300)
    assert replies(done)[0]["model"] == "v2"


def test_cli_with_an_unreachable_server_names_it_and_what_to_start():
    url = f"http://127.0.0.1:{free_port()}"
    done = chat("--server", url)
    assert done.returncode == 2
    assert f"the BianQue server at {url} is unreachable" in done.stderr
    assert "python -m bianque serve" in done.stderr and "Traceback" not in done.stderr


def test_a_server_that_is_not_a_url_is_refused_before_anything_runs():
    from bianque.settings import parse_settings

    with pytest.raises(ValueError, match="--server='localhost:8000' is not a server URL"):
        parse_settings(["--server", "localhost:8000"], env={})
    with pytest.raises(ValueError, match="BIANQUE_SERVER='8000' is not a server URL"):
        parse_settings([], env={"BIANQUE_SERVER": "8000"})
    settings = parse_settings(["--api-key", "k"], env={"BIANQUE_SERVER": "http://10.0.0.2:8000"})
    assert (settings.server, settings.api_key) == ("http://10.0.0.2:8000", "k") and "'k'" not in repr(settings)


def test_closing_a_reply_cancels_it_on_the_server(server):
    before = metric(server, "bianque_requests_total", model="bianque-1.0", outcome="disconnected")
    doctor = RemoteDoctor(ServerClient(server["url"], KEY), "v1")
    long = replace(doctor.default_params, max_tokens=4000)  # the tiny T5 writes all 4000: still running when closed
    chunks = doctor.reply([Turn(PATIENT, "发烧两天了")], long)
    assert next(chunks) and next(chunks)
    chunks.close()
    deadline = time.time() + 30
    while metric(server, "bianque_requests_total", model="bianque-1.0", outcome="disconnected") == before:
        assert time.time() < deadline, "the closed reply was never cancelled"
        time.sleep(0.2)


def fake_server(body: str, status: int = 200) -> ServerClient:
    """A client whose every request gets ``body`` (for the endings a healthy server never sends)."""
    transport = httpx.MockTransport(lambda request: httpx.Response(status, text=body))
    return ServerClient("http://bianque.test", transport=transport)


def test_a_stream_that_breaks_off_is_an_error_never_a_short_reply():
    piece = 'data: {"choices": [{"delta": {"content": "您好"}}]}\n\n'
    chunks = fake_server(piece).reply("bianque-2.0", [Turn(PATIENT, "头晕")])
    assert next(chunks) == "您好"
    with pytest.raises(RemoteError, match="ended the reply before it was complete"):
        next(chunks)
    error = piece + 'data: {"error": {"message": "generation failed (RuntimeError)"}}\n\n'
    with pytest.raises(RemoteError, match=r"could not finish the reply: generation failed \(RuntimeError\)"):
        list(fake_server(error).reply("bianque-2.0", [Turn(PATIENT, "头晕")]))
    whole = piece + "data: [DONE]\n\n"
    assert list(fake_server(whole).reply("bianque-2.0", [Turn(PATIENT, "头晕")])) == ["您好"]


def test_a_refusal_carries_the_servers_message():
    refusal = json.dumps({"error": {"message": "messages: too long"}})
    with pytest.raises(RemoteError, match="answered 400: messages: too long"):
        list(fake_server(refusal, 400).reply("bianque-2.0", [Turn(PATIENT, "头晕")]))


# ---------------------------------------------------------------- the apps

@pytest.fixture
def app_env(monkeypatch):
    from bianque import ui

    for name in [k for k in os.environ if k.startswith("BIANQUE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(sys, "argv", ["app.py"])
    clear = ui._server_client.clear  # the test may patch the cached function itself
    clear()
    yield monkeypatch
    clear()


def start(script: str, monkeypatch, **env: str) -> AppTest:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    at = AppTest.from_file(str(ROOT / script), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    return at


def test_coq_app_answers_through_the_server_with_its_stage(server, app_env):
    at = start("bianque_v1_v2_app.py", app_env, BIANQUE_SERVER=server["url"], BIANQUE_API_KEY=KEY)
    assert any(server["url"] in c.value for c in at.sidebar.caption)
    for kind in ("v1", "v2"):
        at.toggle(key=f"{kind}.do_sample").set_value(False)
    at.number_input(key="v1.max_tokens").set_value(8)
    at.chat_input(key="prompt").set_value("我头疼三天了").run()
    assert not at.exception, at.exception
    reply = at.session_state["consultation"].messages[-1]
    expected = httpx.post(server["url"] + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, json={
        "model": "bianque-coq", "messages": [{"role": "user", "content": "我头疼三天了"}], "temperature": 0,
        "bianque": {"questioner": {"max_tokens": 8}}}, timeout=120).json()
    assert reply.text == expected["choices"][0]["message"]["content"]
    stage, model = expected["bianque"]["stage"], {"bianque-1.0": "v1", "bianque-2.0": "v2"}[expected["bianque"]["model"]]
    assert (reply.stage, reply.model) == (stage, model)
    assert reply.label == {"question": "问询 1/8 · BianQue-1.0", "advice": "建议 · BianQue-2.0"}[stage]
    assert reply.params["max_tokens"] == (8 if model == "v1" else None)

    at.button(key="advise").click().run()
    assert not at.exception, at.exception
    advice = at.session_state["consultation"].messages[-1]
    assert (advice.stage, advice.model, advice.label) == ("advice", "v2", "建议 · BianQue-2.0")
    assert [c.value for c in at.chat_message[-1].caption][0] == "建议 · BianQue-2.0"


def test_app_with_an_unreachable_server_is_a_page_naming_it(app_env):
    url = f"http://127.0.0.1:{free_port()}"
    at = start("bianque_v1_app.py", app_env, BIANQUE_SERVER=url)
    assert "BianQue 服务器不可用" in at.error[0].value and f"the BianQue server at {url} is unreachable" in at.error[0].value
    assert "python -m bianque serve" in at.info[0].value
    assert not at.chat_input


def test_app_reply_broken_off_by_the_server_is_an_error_and_keeps_the_dialogue(app_env):
    from bianque import ui

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200, json={"status": "ok"})
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "bianque-2.0"}]})
        return httpx.Response(200, text='data: {"choices": [{"delta": {"content": "您好，"}}]}\n\n')  # no [DONE]

    fake = ServerClient("http://bianque.test", transport=httpx.MockTransport(answer))
    app_env.setattr(ui, "_server_client", lambda url, key: fake)
    at = start("bianque_v2_app.py", app_env, BIANQUE_SERVER="http://bianque.test")
    at.chat_input(key="prompt").set_value("头晕").run()
    assert not at.exception, at.exception
    consultation = at.session_state["consultation"]
    assert [m.role for m in consultation.messages] == [PATIENT]  # the cut-off reply is not kept as if whole
    assert "ended the reply before it was complete" in consultation.error
    assert consultation.error in [e.value for e in at.error]
    assert [b.label for b in at.button if b.key == "retry"] == ["重试"]
