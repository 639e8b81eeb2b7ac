"""`python -m bianque serve` as users run it: a real server process on tiny models, the real
`openai` client and raw HTTP for what the client cannot send."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key-123"
GREEDY = {"temperature": 0, "max_tokens": 12}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(tmp_path_factory, *extra: str, env: dict | None = None, models: dict | None = None,
                   key: str | None = KEY):
    """`python -m bianque serve` on tiny models (built here unless `models` gives {"v1", "v2"}
    paths) in a subprocess, until the block ends: yields {"url", "log", "v1", "v2"} once /health
    says ok. `key=None`: a server without an API key."""
    from tests.tiny_glm import build_tiny_glm
    from tests.tiny_t5 import build_tiny_t5

    v1 = models["v1"] if models else build_tiny_t5(tmp_path_factory.mktemp("v1"))
    v2 = models["v2"] if models else build_tiny_glm(tmp_path_factory.mktemp("v2"))
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1") | (env or {})
    env.pop("BIANQUE_API_KEY", None)
    if key is not None:
        env["BIANQUE_API_KEY"] = key
    log = tmp_path_factory.mktemp("log") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "bianque", "serve", "--v1-model", str(v1), "--v2-model", str(v2),
                                 "--device", "cpu", "--port", str(port), *extra], env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server did not become ready"
            time.sleep(0.3)
        yield {"url": url, "log": log, "v1": v1, "v2": v2}
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory, "--v1-max-batch", "3") as s:
        yield s


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def post(server, body, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        return httpx.post(server["url"] + "/v1/chat/completions", content=raw, headers=headers, timeout=120)
    return httpx.post(server["url"] + "/v1/chat/completions", json=body, headers=headers, timeout=120)


def metric(server, name: str, **labels) -> float:
    text = httpx.get(server["url"] + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" ([0-9.e+-]+)"
    found = re.search(pattern, text)
    return float(found.group(1)) if found else 0.0


def user(text):
    return [{"role": "user", "content": text}]


def test_models_lists_the_three_loaded_models(client):
    assert [m.id for m in client.models.list().data] == ["bianque-1.0", "bianque-2.0", "bianque-coq"]


def test_health_names_each_models_engine_batch(server):
    from bianque.settings import DEFAULT_MAX_BATCH

    # --v1-max-batch 3 reached BianQue-1.0's engine; BianQue-2.0 has the CPU default
    assert httpx.get(server["url"] + "/health").json()["max_batch"] == {"bianque-1.0": 3,
                                                                        "bianque-2.0": DEFAULT_MAX_BATCH["cpu"]}


@pytest.mark.parametrize("model", ["bianque-1.0", "bianque-2.0", "bianque-coq"])
def test_streamed_equals_whole_greedy_answer(client, model):
    messages = user("我头疼三天了，晚上睡不好")
    whole = client.chat.completions.create(model=model, messages=messages, **GREEDY)
    text = whole.choices[0].message.content
    assert text and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens > 5 and whole.usage.completion_tokens >= 1
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    chunks = list(client.chat.completions.create(model=model, messages=messages, stream=True, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_max_tokens_gives_length(client):
    reply = client.chat.completions.create(model="bianque-1.0", messages=user("咳嗽一周了"), temperature=0, max_tokens=3)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens <= 4


def test_coq_carries_the_stage_object(server):
    body = {"model": "bianque-coq", "messages": user("我胸口疼，还出冷汗"), "bianque": {"advise_now": True}, **GREEDY}
    reply = post(server, body).json()
    assert reply["bianque"]["stage"] == "advice" and reply["bianque"]["model"] == "bianque-2.0"
    assert [f["name"] for f in reply["bianque"]["red_flags"]] == ["chest_pain"]
    first = None
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", json=body | {"stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    first = json.loads(lines[0][6:])
    assert first["bianque"]["stage"] == "advice" and first["bianque"]["model"] == "bianque-2.0"
    assert [f["name"] for f in first["bianque"]["red_flags"]] == ["chest_pain"]
    assert lines[-1] == "data: [DONE]"


def test_coq_with_no_questions_left_advises_and_keeps_sent_stages(server):
    messages = [{"role": "user", "content": "失眠"},
                {"role": "assistant", "content": "多久了？", "bianque": {"stage": "question", "model": "bianque-1.0"}},
                {"role": "user", "content": "一个月了"}]
    reply = post(server, {"model": "bianque-coq", "messages": messages, "bianque": {"max_questions": 1}, **GREEDY})
    assert reply.status_code == 200
    assert reply.json()["bianque"]["stage"] == "advice"
    assert reply.json()["bianque"]["model"] == "bianque-2.0"


def test_system_message_is_ignored_with_a_warning(server):
    body = {"model": "bianque-2.0", "messages": [{"role": "system", "content": "你是医生"}] + user("头晕"), **GREEDY}
    reply = post(server, body)
    assert reply.status_code == 200
    assert "system message ignored" in reply.headers["x-bianque-warning"]
    assert reply.json()["choices"][0]["message"]["content"] == post(server, {**body, "messages": user("头晕")}).json()[
        "choices"][0]["message"]["content"]


def test_auth(server):
    no_key = openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        no_key.models.list()
    assert post(server, {"model": "bianque-2.0", "messages": user("头晕")}, key=None).status_code == 401
    assert httpx.get(server["url"] + "/metrics").status_code == 401
    assert httpx.get(server["url"] + "/health").json()["status"] == "ok"


BAD = [
    ("malformed json", None, b"{not json", "not valid JSON"),
    ("not an object", None, b"[1, 2]", "JSON object"),
    ("no messages", {"model": "bianque-2.0", "messages": []}, None, "messages"),
    ("no model", {"messages": user("头晕")}, None, "model"),
    ("two users in a row", {"model": "bianque-2.0", "messages": user("a") + user("b")}, None, "alternates"),
    ("ends with assistant", {"model": "bianque-2.0", "messages": user("a") + [{"role": "assistant", "content": "b"}]},
     None, "end with a patient"),
    ("starts with assistant", {"model": "bianque-2.0", "messages": [{"role": "assistant", "content": "b"}] + user("a")},
     None, "turn 0"),
    ("bad role", {"model": "bianque-2.0", "messages": [{"role": "tool", "content": "a"}]}, None, "role"),
    ("non-string content", {"model": "bianque-2.0", "messages": [{"role": "user", "content": 5}]}, None, "content"),
    ("list content", {"model": "bianque-2.0", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]},
     None, "content"),
    ("too long", {"model": "bianque-2.0", "messages": user("痛" * 20_001)}, None, "20000"),
    ("temperature", {"model": "bianque-2.0", "messages": user("a"), "temperature": 3}, None, "temperature"),
    ("negative temperature", {"model": "bianque-2.0", "messages": user("a"), "temperature": -1}, None, "temperature"),
    ("top_p", {"model": "bianque-2.0", "messages": user("a"), "top_p": 0}, None, "top_p"),
    ("max_tokens", {"model": "bianque-2.0", "messages": user("a"), "max_tokens": 0}, None, "max_tokens"),
    ("seed", {"model": "bianque-2.0", "messages": user("a"), "seed": "x"}, None, "seed"),
    ("n", {"model": "bianque-2.0", "messages": user("a"), "n": 2}, None, "n > 1"),
    ("tools", {"model": "bianque-2.0", "messages": user("a"), "tools": [{"type": "function"}]}, None, "tools"),
    ("logprobs", {"model": "bianque-2.0", "messages": user("a"), "logprobs": True}, None, "logprobs"),
    ("bianque options", {"model": "bianque-coq", "messages": user("a"), "bianque": {"max_questions": -1}}, None,
     "max_questions"),
    ("top_k", {"model": "bianque-2.0", "messages": user("a"), "top_k": -1}, None, "top_k"),
    ("model overrides", {"model": "bianque-coq", "messages": user("a"), "bianque": {"advisor": {"top_p": 2}}}, None,
     "bianque.advisor.top_p"),
]


@pytest.mark.parametrize("name,body,raw,hint", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_an_openai_400(server, name, body, raw, hint):
    reply = post(server, body, raw=raw)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert hint in error["message"] and error["type"] == "invalid_request_error"
    assert "痛痛痛" not in reply.text


def test_unknown_model_is_404_and_clients_raise(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=user("头晕"))
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="bianque-2.0", messages=user("a"), n=2)


def test_control_tokens_are_plain_text(client):
    reply = client.chat.completions.create(model="bianque-2.0", messages=user("[gMASK]<sop>头晕<eop>"), **GREEDY)
    assert reply.choices[0].finish_reason in ("stop", "length")


PROMPTS = [f"{s}{d}" for s in ("头疼", "咳嗽", "失眠", "腹痛") for d in ("三天了", "一周了", "两个月了", "半年了")]


def test_sixteen_concurrent_streams_each_get_their_solo_answer(server, client):
    # v1 greedy; v2 sampled with a seed per request (the tiny GLM answers every prompt alike greedily)
    jobs = [("bianque-1.0", p, {}) if i % 2 else ("bianque-2.0", p, {"temperature": 0.9, "seed": i})
            for i, p in enumerate(PROMPTS)]

    def ask(job, stream: bool) -> str:
        model, prompt, extra = job
        args = {**GREEDY, **extra}
        if not stream:
            return client.chat.completions.create(model=model, messages=user(prompt), **args).choices[0].message.content
        return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=model, messages=user(prompt), stream=True, **args))

    solo = [ask(j, False) for j in jobs]
    ok = lambda: sum(metric(server, "bianque_requests_total", model=m, outcome="ok")  # noqa: E731
                     for m in ("bianque-1.0", "bianque-2.0"))
    before = ok()
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda j: ask(j, True), jobs))
    assert together == solo
    assert len(set(solo)) >= 8  # distinct prompts, distinct answers: a mix-up would show
    assert ok() - before == 16
    assert metric(server, "bianque_time_to_first_token_seconds_count", model="bianque-2.0") >= 8
    assert metric(server, "bianque_queue_depth") == 0


def test_disconnect_cancels_and_frees_the_slot(server, client):
    before = metric(server, "bianque_requests_total", model="bianque-1.0", outcome="disconnected")
    body = {"model": "bianque-1.0", "messages": user("发烧两天了"), "temperature": 0, "max_tokens": 4000,
            "stream": True}
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as r:
        lines = r.iter_lines()
        next(lines), next(lines)  # the role chunk and the first content
    deadline = time.time() + 30
    while metric(server, "bianque_requests_total", model="bianque-1.0", outcome="disconnected") == before:
        assert time.time() < deadline, "the disconnected request was never finished"
        time.sleep(0.2)
    assert metric(server, "bianque_batch_size") == 0
    assert client.chat.completions.create(model="bianque-1.0", messages=user("头晕"), **GREEDY).choices[0].message.content


def test_logs_carry_no_patient_text(server):
    secret = "我的秘密症状是左脚小趾发麻"
    post(server, {"model": "bianque-2.0", "messages": user(secret), **GREEDY})
    assert "发麻" not in server["log"].read_text()


def run_bench(server, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("BIANQUE_API_KEY", None)
    return subprocess.run([sys.executable, "-m", "bianque.bench", "api", "--url", server["url"], *args],
                          env=env, capture_output=True, text=True, timeout=300)


def test_load_benchmark_counts_every_request_and_token(server, client):
    from bianque.serving.loadtest import patient_message

    ok_before = metric(server, "bianque_requests_total", model="bianque-1.0", outcome="ok")
    done = run_bench(server, "--concurrency", "4", "--requests", "10", "--model", "bianque-1.0", "--api-key", KEY,
                     "--max-tokens", "6", "--temperature", "0", "--json")
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    assert (r["requests"], r["ok"], r["errors"], r["error_kinds"]) == (10, 10, 0, {})
    assert (r["model"], r["concurrency"], r["max_tokens"]) == ("bianque-1.0", 4, 6)
    assert metric(server, "bianque_requests_total", model="bianque-1.0", outcome="ok") - ok_before == 10
    # the same greedy requests one by one: the benchmark counted exactly their tokens
    solo = [client.chat.completions.create(model="bianque-1.0", messages=user(patient_message(i)), temperature=0,
                                           max_tokens=6).usage.completion_tokens for i in range(10)]
    assert r["completion_tokens"] == sum(solo) > 0
    assert r["requests_per_s"] == pytest.approx(10 / r["wall_s"])
    assert r["tokens_per_s"] == pytest.approx(sum(solo) / r["wall_s"])
    assert 0 < r["ttft_p50_s"] <= r["ttft_p95_s"] <= r["wall_s"]
    assert r["ttft_p50_s"] <= r["latency_p50_s"] <= r["latency_p95_s"] <= r["wall_s"]


def test_load_benchmark_reports_errors_in_text(server):
    done = run_bench(server, "--concurrency", "2", "--requests", "3", "--model", "bianque-2.0", "--api-key", "wrong")
    assert done.returncode == 1
    assert "errors 3 (HTTP 401: 3)" in done.stdout
    assert "3 streamed requests, 2 at a time" in done.stdout
    assert "throughput 0.00 req/s" in done.stdout and "latency p50 n/a" in done.stdout


def test_load_benchmark_default_model_is_the_first_listed(server):
    done = run_bench(server, "--concurrency", "1", "--requests", "1", "--api-key", KEY, "--max-tokens", "2", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["model"] == "bianque-1.0"


def test_serve_help_lists_the_variables_it_reads(capsys):
    from bianque.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    for name in ("BIANQUE_API_KEY", "BIANQUE_V1_MODEL", "BIANQUE_V2_DEVICE", "BIANQUE_QUANTIZE", "HF_HUB_OFFLINE"):
        assert name in text
    assert "BIANQUE_SERVER" not in text and "--server" not in text


def test_percentile():
    from bianque.serving.loadtest import percentile

    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile(list(map(float, range(101))), 95) == 95.0
