"""Ray Serve on a real local Ray instance (2 CPUs): the same OpenAI API through the ingress,
replicas of each model, and a replica killed mid-run. One application for the whole module:
Ray's start-up is the slow part."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

serve = pytest.importorskip("ray.serve")
ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")

from bianque.settings import parse_settings  # noqa: E402
from tests.test_api import free_port  # noqa: E402

PROMPTS = [f"{s}{d}" for s in ("头疼", "咳嗽", "失眠", "腹痛") for d in ("三天了", "两个月了")]


@pytest.fixture(scope="session")
def ray_server(tmp_path_factory):
    import os

    from bianque.serving.ray_serve import build_app
    from tests.tiny_glm import build_tiny_glm
    from tests.tiny_t5 import build_tiny_t5

    v1 = build_tiny_t5(tmp_path_factory.mktemp("ray_v1"))
    v2 = build_tiny_glm(tmp_path_factory.mktemp("ray_v2"))
    settings = parse_settings(["--v1-model", str(v1), "--v2-model", str(v2), "--device", "cpu"], env={})
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # a short path: Ray's socket names must fit in 107 bytes
    temp = tmp_path_factory.getbasetemp() / "ray"
    for attempt in range(2):  # Ray gives its raylet a fixed 30 s to register: on a busy machine, try again
        try:
            ray.init(num_cpus=2, _temp_dir=str(temp), include_dashboard=False, logging_level="warning",
                     runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
            break
        except Exception as exc:
            ray.shutdown()
            if attempt or "timed out during startup" not in str(exc):
                raise
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # 4 requests at most per replica: 6 long streams must use both BianQue-1.0 replicas
        serve.run(build_app("coq", settings, v1_replicas=2, v2_replicas=2, cpus_per_replica=0.4, max_ongoing=4),
                  name="bianque", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while httpx.get(url + "/health").status_code != 200:
            assert time.time() < deadline, httpx.get(url + "/health").text
            time.sleep(0.2)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture
def client(ray_server):
    return openai.OpenAI(base_url=ray_server + "/v1", api_key="none", max_retries=0, timeout=120)


def user(text):
    return [{"role": "user", "content": text}]


def running_replicas(deployment: str) -> list[str]:
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    return [n for n in names if n.startswith(f"SERVE_REPLICA::bianque#{deployment}#")]


def wait_for_replicas(deployment: str, n: int, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while True:
        status = serve.status().applications["bianque"].deployments[deployment]
        if status.replica_states.get("RUNNING", 0) == n and status.status == "HEALTHY":
            return
        assert time.time() < deadline, f"{deployment}: {status}"
        time.sleep(0.5)


def test_models_and_coq_through_the_ingress(client, ray_server):
    assert [m.id for m in client.models.list().data] == ["bianque-1.0", "bianque-2.0", "bianque-coq"]
    from bianque.settings import DEFAULT_MAX_BATCH

    batch = DEFAULT_MAX_BATCH["cpu"]  # each replica batches on the same engine as the plain server
    assert httpx.get(ray_server + "/health").json()["max_batch"] == {"bianque-1.0": batch, "bianque-2.0": batch}
    reply = httpx.post(ray_server + "/v1/chat/completions", json={
        "model": "bianque-coq", "messages": user("我胸口疼"), "temperature": 0, "max_tokens": 8,
        "bianque": {"advise_now": True}}, timeout=120).json()
    assert reply["bianque"]["stage"] == "advice" and reply["bianque"]["model"] == "bianque-2.0"
    assert reply["usage"]["completion_tokens"] >= 1 and reply["choices"][0]["finish_reason"] in ("stop", "length")


def test_two_v2_replicas_answer_eight_concurrent_clients_each_its_own(client):
    assert len(running_replicas("bianque-2.0")) == 2
    args = [dict(model="bianque-2.0", messages=user(p), temperature=0.9, seed=i, max_tokens=16)
            for i, p in enumerate(PROMPTS)]

    def stream(kw) -> str:
        return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw))

    solo = [client.chat.completions.create(**kw).choices[0].message.content for kw in args]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(stream, args))
    assert together == solo and all(solo)
    assert len(set(solo)) >= 4  # distinct seeds and prompts: a mix-up would show


def read_stream(url: str, body: dict, started: list) -> tuple[str, str]:
    """(how the stream ended: "done" | "error" | "cut", text)."""
    text = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return "done", "".join(text)
            event = json.loads(line[6:])
            if "error" in event:
                return "error", "".join(text)
            piece = event["choices"][0]["delta"].get("content")
            if piece:
                if not text:
                    started.append(1)
                text.append(piece)
    return "cut", "".join(text)


def test_a_killed_replica_breaks_its_streams_loudly_and_requests_keep_succeeding(ray_server):
    url = ray_server
    wait_for_replicas("bianque-1.0", 2)
    # long greedy BianQue-1.0 replies (the tiny T5 writes all 400 tokens): streams in flight on both
    # replicas (each takes 4 at most), so the killed one breaks some and the other finishes its own
    long = [{"model": "bianque-1.0", "messages": user(p), "temperature": 0, "max_tokens": 400, "stream": True}
            for p in PROMPTS[:6]]
    started: list = []
    with ThreadPoolExecutor(6) as pool:
        streams = [pool.submit(read_stream, url, body, started) for body in long]
        deadline = time.time() + 60
        while len(started) < 6:
            assert time.time() < deadline, "the streams did not start"
            time.sleep(0.05)
        victim = running_replicas("bianque-1.0")[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        # while Ray replaces it, short requests still get whole answers (sent again to a live replica)
        short = {"model": "bianque-1.0", "messages": user("头晕"), "temperature": 0, "max_tokens": 4}
        for _ in range(6):
            reply = httpx.post(url + "/v1/chat/completions", json=short, timeout=120)
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["message"]["content"]
        ends = [s.result() for s in streams]
    kinds = [kind for kind, _ in ends]
    assert "cut" not in kinds  # a broken stream always ends in an error event, never a silent truncation
    assert kinds.count("error") >= 1 and kinds.count("done") >= 1, kinds
    wait_for_replicas("bianque-1.0", 2)
    assert victim not in running_replicas("bianque-1.0")
    again = httpx.post(url + "/v1/chat/completions", json={**long[0], "stream": False}, timeout=120).json()
    finished = [text for kind, text in ends if kind == "done"]
    assert again["choices"][0]["message"]["content"] and all(finished)
