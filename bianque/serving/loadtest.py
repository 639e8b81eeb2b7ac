"""A load test for a running BianQue server: `python -m bianque.bench api --url URL`.

``concurrency`` workers send ``requests`` streamed chat completions in all, each a different
patient message, and time every one of them: latency (request sent to ``[DONE]``), time to first
token (request sent to the first content chunk) and completion tokens (the final chunk's
``usage``). A request counts as an error unless it ends with ``[DONE]`` after a 200; errors are
counted by kind, never raised, so one bad reply does not hide the figures of the others.
"""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

SYMPTOMS = ("头疼", "咳嗽", "失眠", "腹痛", "发烧", "胸闷", "腰疼", "头晕")
DURATIONS = ("三天了", "一周了", "两个月了", "半年了", "好几年了", "刚开始")


def patient_message(i: int) -> str:
    """The i-th test message: 48 distinct ones, then repeated with a number so each stays distinct."""
    base = f"{SYMPTOMS[i % len(SYMPTOMS)]}{DURATIONS[i // len(SYMPTOMS) % len(DURATIONS)]}"
    rounds = i // (len(SYMPTOMS) * len(DURATIONS))
    return base if rounds == 0 else f"{base}，第{rounds + 1}次了"


@dataclass
class Outcome:
    """One request's timings; ``error`` is None when it ended with ``[DONE]``."""
    latency: float
    ttft: float | None = None
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class LoadConfig:
    url: str
    concurrency: int = 8
    requests: int = 64
    model: str | None = None  # None: the first model the server lists
    api_key: str | None = None
    max_tokens: int = 64
    temperature: float | None = None  # None: the server's default sampling
    timeout: float = 300.0
    headers: dict[str, str] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        if self.api_key:
            self.headers["Authorization"] = f"Bearer {self.api_key}"


def pick_model(client: httpx.Client, cfg: LoadConfig) -> str:
    """The model to test: as configured, else the first one ``GET /v1/models`` lists."""
    if cfg.model:
        return cfg.model
    reply = client.get(cfg.url + "/v1/models", headers=cfg.headers)
    reply.raise_for_status()
    models = [m["id"] for m in reply.json()["data"]]
    if not models:
        raise RuntimeError(f"{cfg.url} serves no models yet (GET /health says whether they are loading)")
    return models[0]


def one_request(client: httpx.Client, cfg: LoadConfig, model: str, i: int) -> Outcome:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": patient_message(i)}],
                            "max_tokens": cfg.max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    if cfg.temperature is not None:
        body["temperature"] = cfg.temperature
    start = time.perf_counter()
    out = Outcome(latency=0.0)
    try:
        with client.stream("POST", cfg.url + "/v1/chat/completions", json=body, headers=cfg.headers) as r:
            if r.status_code != 200:
                r.read()
                out.error = f"HTTP {r.status_code}"
            else:
                out.error = read_stream(r, out, start)
    except httpx.HTTPError as exc:
        out.error = type(exc).__name__
    out.latency = time.perf_counter() - start
    return out


def read_stream(r: httpx.Response, out: Outcome, start: float) -> str | None:
    """Fill ``out`` from the SSE lines; the error kind, or None when the stream reached ``[DONE]``."""
    for line in r.iter_lines():
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            return None
        event = json.loads(data)
        if "error" in event:
            return "stream error"
        if event.get("usage"):
            out.completion_tokens = event["usage"]["completion_tokens"]
        delta = event["choices"][0]["delta"] if event.get("choices") else {}
        if delta.get("content") and out.ttft is None:
            out.ttft = time.perf_counter() - start
    return "stream cut off"


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) by linear interpolation between closest ranks; None if empty."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarise(cfg: LoadConfig, model: str, outcomes: list[Outcome], wall: float) -> dict[str, Any]:
    ok = [o for o in outcomes if o.error is None]
    errors: dict[str, int] = {}
    for o in outcomes:
        if o.error is not None:
            errors[o.error] = errors.get(o.error, 0) + 1
    tokens = sum(o.completion_tokens for o in ok)
    latencies, ttfts = [o.latency for o in ok], [o.ttft for o in ok if o.ttft is not None]
    return {
        "url": cfg.url, "model": model, "concurrency": cfg.concurrency, "requests": len(outcomes),
        "max_tokens": cfg.max_tokens, "ok": len(ok), "errors": len(outcomes) - len(ok), "error_kinds": errors,
        "wall_s": wall, "completion_tokens": tokens,
        "requests_per_s": len(ok) / wall, "tokens_per_s": tokens / wall,
        "latency_p50_s": percentile(latencies, 50), "latency_p95_s": percentile(latencies, 95),
        "ttft_p50_s": percentile(ttfts, 50), "ttft_p95_s": percentile(ttfts, 95),
    }


def run_load(cfg: LoadConfig) -> dict[str, Any]:
    """Send the requests ``cfg.concurrency`` at a time and return the summary."""
    limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
    with httpx.Client(timeout=cfg.timeout, limits=limits) as client:
        model = pick_model(client, cfg)
        counter = iter(range(cfg.requests))
        lock = threading.Lock()

        def worker() -> list[Outcome]:
            done = []
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return done
                done.append(one_request(client, cfg, model, i))

        start = time.perf_counter()
        with ThreadPoolExecutor(cfg.concurrency) as pool:
            outcomes = [o for part in pool.map(lambda _: worker(), range(cfg.concurrency)) for o in part]
        wall = time.perf_counter() - start
    return summarise(cfg, model, outcomes, wall)


def report(r: dict[str, Any]) -> str:
    def ms(v: float | None) -> str:
        return "n/a" if v is None else f"{v * 1000:.0f} ms"

    kinds = ", ".join(f"{k}: {n}" for k, n in sorted(r["error_kinds"].items()))
    return "\n".join([
        f"{r['url']} model {r['model']}: {r['requests']} streamed requests, {r['concurrency']} at a time, "
        f"max_tokens {r['max_tokens']}",
        f"  throughput {r['requests_per_s']:.2f} req/s, {r['tokens_per_s']:.1f} completion tokens/s "
        f"({r['completion_tokens']} tokens in {r['wall_s']:.1f} s)",
        f"  latency p50 {ms(r['latency_p50_s'])}, p95 {ms(r['latency_p95_s'])}",
        f"  time to first token p50 {ms(r['ttft_p50_s'])}, p95 {ms(r['ttft_p95_s'])}",
        f"  errors {r['errors']}" + (f" ({kinds})" if kinds else ""),
    ])
