"""`python -m bianque serve`: an OpenAI-compatible HTTP API over the same doctors as the apps.

The HTTP layer translates and the doctors decide: a request becomes ``Turn``s and per-call params,
the reply is ``doctor.reply(turns, params)`` (or the Chain of Questioning for ``bianque-coq``), and
closing that iterator (client gone, stream cancelled) cancels the generation. Every bad input is
an OpenAI-style JSON error (400, 404 for an unknown model, 401 without the key), never 422/500.
Logs carry metadata only (model, stage, token counts, timings), never patient text; uvicorn's
access log is off and our own request log names the path and status only.
"""
from __future__ import annotations

import argparse
import hmac
import logging
import threading
import time
import uuid
from contextlib import aclosing
from dataclasses import replace
from typing import Any, Callable, Iterator, Literal, Optional

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..prompt import DOCTOR, PATIENT, Turn, validate_dialogue
from ..router import ChainOfQuestioning
from ..safety import flag_dict, red_flags

log = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 20_000  # the apps' cap (bianque.ui.MAX_MESSAGE_CHARS)
MODEL_IDS = {"bianque-1.0": "v1", "bianque-2.0": "v2", "bianque-coq": "coq"}
MODEL_NAMES = {"v1": "bianque-1.0", "v2": "bianque-2.0"}
ROLES = {"user": PATIENT, "assistant": DOCTOR}
SYSTEM_WARNING = "system message ignored: BianQue was not trained with one"
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "response_format")


# --- schemas -----------------------------------------------------------------------------------
class BianqueStage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    stage: Optional[Literal["question", "advice"]] = None
    model: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_MESSAGE_CHARS)
    bianque: Optional[BianqueStage] = None


class ModelOverrides(BaseModel):
    """bianque-coq only: settings for one of the two models, over the request's top-level ones."""
    model_config = ConfigDict(extra="forbid")
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    top_k: Optional[int] = Field(default=None, ge=0, le=100_000)
    max_tokens: Optional[int] = Field(default=None, ge=1, le=8192)
    seed: Optional[int] = Field(default=None, ge=0, lt=2**63)


class BianqueOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    advise_now: bool = False
    max_questions: Optional[int] = Field(default=None, ge=0, le=100)
    questioner: Optional[ModelOverrides] = None  # BianQue-1.0's settings
    advisor: Optional[ModelOverrides] = None  # BianQue-2.0's settings


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields are accepted and ignored
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    top_k: Optional[int] = Field(default=None, ge=0, le=100_000)  # an extension, as vLLM's (0: off)
    max_tokens: Optional[int] = Field(default=None, ge=1, le=8192)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1, le=8192)
    seed: Optional[int] = Field(default=None, ge=0, lt=2**63)
    stream: bool = False
    n: int = Field(default=1, ge=1)
    logprobs: Optional[bool] = None
    bianque: Optional[BianqueOptions] = None


class APIError(Exception):
    """An error answered as OpenAI's ``{"error": {...}}`` JSON."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def validation_message(exc: ValidationError) -> tuple[str, str | None]:
    """The first pydantic error as one readable sentence (never echoing the input)."""
    err = exc.errors(include_input=False)[0]
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "string_too_long":
        return f"{loc}: a message may have at most {MAX_MESSAGE_CHARS} characters", loc
    return f"{loc}: {err['msg']}", loc or None


# --- metrics -----------------------------------------------------------------------------------
class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("bianque_requests", "chat completion requests", ["model", "outcome"], registry=r)
        self.tokens = Counter("bianque_tokens", "tokens", ["model", "kind"], registry=r)
        self.queue = Gauge("bianque_queue_depth", "requests accepted and not yet finished", registry=r)
        self.batch = Gauge("bianque_batch_size", "requests generating at this moment", registry=r)
        buckets = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
        self.ttft = Histogram("bianque_time_to_first_token_seconds", "time to first token", ["model"],
                              buckets=buckets, registry=r)
        self.latency = Histogram("bianque_request_latency_seconds", "request latency", ["model"],
                                 buckets=buckets, registry=r)


# --- turning a request into a reply --------------------------------------------------------------
def to_turns(messages: list[ChatMessage]) -> tuple[list[Turn], bool]:
    """(dialogue turns, whether a system message was dropped); raises APIError on a bad dialogue."""
    dropped = any(m.role == "system" for m in messages)
    turns = []
    for m in messages:
        if m.role == "system":
            continue
        stage = m.bianque.stage if (m.role == "assistant" and m.bianque) else None
        turns.append(Turn(ROLES[m.role], m.content, stage))
    try:
        validate_dialogue(turns)
    except ValueError as exc:
        raise APIError(400, f"messages: {exc} (roles: user = patient, assistant = doctor)", "messages") from None
    return turns, dropped


def doctor_params(doctor: Any, req: ChatRequest, turns: list[Turn]) -> Any:
    """The doctor's default params with the request's sampling settings and length limit applied."""
    params = doctor.default_params
    sampling = params.sampling
    if req.temperature is not None:
        sampling = replace(sampling, do_sample=req.temperature > 0, temperature=req.temperature or 1.0)
    if req.top_p is not None:
        sampling = replace(sampling, top_p=req.top_p)
    if req.top_k is not None:
        sampling = replace(sampling, top_k=req.top_k)
    params = replace(params, sampling=sampling, seed=req.seed)
    limit = req.max_tokens or req.max_completion_tokens
    if limit is None:
        return params
    if hasattr(params, "max_new_tokens"):
        return replace(params, max_new_tokens=limit)
    # BianQue-2's limit counts prompt + reply: the prompt as the default budget fits it, plus the reply.
    return replace(params, max_length=prompt_tokens(doctor, turns, params) + limit, min_answer_tokens=limit)


def with_overrides(req: ChatRequest, overrides: ModelOverrides | None) -> ChatRequest:
    """The request as one model of bianque-coq sees it: its own settings win over the top-level ones."""
    if overrides is None:
        return req
    return req.model_copy(update=overrides.model_dump(exclude_none=True))


def prompt_tokens(doctor: Any, turns: list[Turn], params: Any) -> int:
    """Prompt length in the model's tokens."""
    if hasattr(doctor, "count_prompt_tokens"):  # a model elsewhere (Ray Serve) counts its own
        return doctor.count_prompt_tokens(turns, params)
    if hasattr(doctor, "prompt_ids"):
        return len(doctor.prompt_ids(turns, params))
    return len(doctor.tokenizer.encode(doctor.prompt(turns, params)))


def completion_tokens(doctor: Any, text: str) -> int:
    """The reply's length in the model's tokens (re-tokenised, without special tokens)."""
    if hasattr(doctor, "count_completion_tokens"):
        return doctor.count_completion_tokens(text)
    if hasattr(doctor, "prompt_ids"):
        return doctor.tokenizer.count(text) - 1  # count() includes </s>
    return len(doctor.tokenizer.encode(text, add_special_tokens=False))


def finish_reason(doctor: Any, params: Any, prompt: int, completion: int) -> str:
    if hasattr(params, "max_new_tokens"):
        return "length" if completion >= params.max_new_tokens else "stop"
    return "length" if prompt + completion >= params.max_length else "stop"


class Job:
    """One request in flight: the chosen doctor, its stage, and the text pieces to send."""

    def __init__(self, app_state: "Server", req: ChatRequest, turns: list[Turn]) -> None:
        self.server, self.req, self.turns = app_state, req, turns
        self.kind = MODEL_IDS[req.model]
        patients = [t.text for t in turns if t.role == PATIENT]
        self.flags = [flag_dict(f) for f in red_flags(patients[-1], earlier=patients[:-1])]
        self.started = time.perf_counter()
        self.first: float | None = None
        self.text: list[str] = []

    def start(self) -> Iterator[str]:
        """Pick the doctor (routing for coq) and start its reply; errors surface here."""
        doctors = self.server.doctors
        if self.kind != "coq":
            self.model, self.stage = self.kind, ("question" if self.kind == "v1" else "advice")
            self.doctor = doctors[self.kind]
            self.params = doctor_params(self.doctor, self.req, self.turns)
            return iter(self.doctor.reply(self.turns, self.params))
        opts = self.req.bianque or BianqueOptions()
        max_q = self.server.max_questions if opts.max_questions is None else opts.max_questions
        overrides = {"v1": opts.questioner, "v2": opts.advisor}
        params = {k: doctor_params(d, with_overrides(self.req, overrides[k]), self.turns) for k, d in doctors.items()}
        router = ChainOfQuestioning(doctors["v1"], doctors["v2"], max_questions=max_q)
        reply = router.respond(self.turns, advise_now=opts.advise_now, v1_params=params["v1"], v2_params=params["v2"])
        self.model, self.stage = reply.model, reply.stage
        self.doctor, self.params = doctors[reply.model], params[reply.model]
        return reply.chunks

    def bianque(self) -> dict[str, Any]:
        info = {"stage": self.stage, "model": MODEL_NAMES[self.model], "red_flags": self.flags}
        return info

    def usage(self) -> tuple[dict[str, int], str]:
        prompt = prompt_tokens(self.doctor, self.turns, self.params)
        completion = completion_tokens(self.doctor, "".join(self.text))
        reason = finish_reason(self.doctor, self.params, prompt, completion)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}, reason


class Server:
    """What the handlers share: the doctors (None while loading), the key, the metrics."""

    def __init__(self, load: Callable[[], dict], api_key: str | None, max_questions: int) -> None:
        self.load, self.api_key, self.max_questions = load, api_key, max_questions
        self.doctors: dict | None = None
        self.load_error: str | None = None
        self.metrics = Metrics()
        self.active = 0
        self.lock = threading.Lock()

    def load_now(self) -> None:
        try:
            self.doctors = self.load()
        except Exception as exc:  # shown by /health; the message names paths, never patient text
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("loading the models failed: %s", self.load_error)

    def models(self) -> list[str]:
        loaded = self.doctors or {}
        ids = [MODEL_NAMES[k] for k in ("v1", "v2") if k in loaded]
        return ids + (["bianque-coq"] if {"v1", "v2"} <= set(loaded) else [])

    def batching(self) -> dict[str, int]:
        """Replies each loaded model generates at once on its engine (0: one at a time)."""
        out = {}
        for kind, doctor in (self.doctors or {}).items():
            engine = getattr(doctor, "engine", None)
            out[MODEL_NAMES[kind]] = getattr(doctor, "max_batch", None) or (engine.runner.max_batch if engine else 0)
        return out

    def authorised(self, request: Request) -> bool:
        if not self.api_key:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())


# --- the app -----------------------------------------------------------------------------------
def create_app(load: Callable[[], dict], api_key: str | None = None, max_questions: int = 8,
               background: bool = True) -> FastAPI:
    """The FastAPI app. ``load()`` returns ``{"v1": questioner, "v2": advisor}`` (either may be
    absent); with ``background`` it runs in a thread at startup and /health says 503 until done."""
    server = Server(load, api_key, max_questions)

    async def lifespan(app: FastAPI):
        if background:
            threading.Thread(target=server.load_now, name="bianque-load", daemon=True).start()
        else:
            server.load_now()
        yield

    app = FastAPI(title="BianQue", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s: %s", request.url.path, type(exc).__name__)
        return APIError(500, f"internal error ({type(exc).__name__})", kind="server_error").response()

    @app.exception_handler(404)
    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return APIError(404, f"no such endpoint: {request.url.path}", code="not_found").response()

    @app.exception_handler(405)
    async def bad_method(request: Request, exc: Exception) -> JSONResponse:
        return APIError(405, f"{request.method} is not allowed on {request.url.path}").response()

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path != "/health" and not server.authorised(request):
            return APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                            kind="authentication_error", code="invalid_api_key").response()
        response = await call_next(request)
        log.info("%s %s -> %d", request.method, request.url.path, response.status_code)
        return response

    @app.get("/health")
    async def health() -> JSONResponse:
        if server.load_error:
            return JSONResponse({"status": "error", "error": server.load_error}, status_code=503)
        if server.doctors is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok", "models": server.models(), "max_batch": server.batching()})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "bianque"} for m in server.models()]
        return JSONResponse({"object": "list", "data": data})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = await parse_request(request)
        check_request(server, req)
        turns, dropped = to_turns(req.messages)
        job = Job(server, req, turns)
        headers = {"X-BianQue-Warning": SYSTEM_WARNING} if dropped else {}
        server.metrics.queue.inc()
        try:
            chunks = await anyio.to_thread.run_sync(job.start)
        except ValueError as exc:  # params the doctor refuses, e.g. max_tokens beyond its limits
            finished(server, job, "bad_request")
            raise APIError(400, str(exc)) from None
        except BaseException:
            finished(server, job, "error")
            raise
        if req.stream:
            return ClosingStreamingResponse(stream_events(server, job, chunks), media_type="text/event-stream",
                                     headers=headers | {"Cache-Control": "no-cache"})
        return JSONResponse(await whole_reply(server, job, chunks), headers=headers)

    return app


class ClosingStreamingResponse(StreamingResponse):
    """Closes its body generator when the response ends for any reason. Starlette leaves a stream
    whose client went away to the garbage collector, so the reply's ``finally`` (cancelling the
    generation, freeing its engine slot, counting the outcome) could wait for a GC cycle."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


async def parse_request(request: Request) -> ChatRequest:
    try:
        body = await request.json()
    except Exception:
        raise APIError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return ChatRequest.model_validate(body)
    except ValidationError as exc:
        message, param = validation_message(exc)
        raise APIError(400, message, param) from None


def check_request(server: Server, req: ChatRequest) -> None:
    if server.doctors is None:
        raise APIError(503, "the models are still loading; retry when GET /health says ok", kind="server_error")
    if req.model not in server.models():
        raise APIError(404, f"model {req.model!r} does not exist here; GET /v1/models lists "
                            f"{', '.join(server.models())}", "model", code="model_not_found")
    if req.n > 1:
        raise APIError(400, "n > 1 is not supported: send one request per completion", "n")
    if req.logprobs or (req.model_extra or {}).get("top_logprobs"):
        raise APIError(400, "logprobs are not supported", "logprobs")
    for name in UNSUPPORTED:
        if (req.model_extra or {}).get(name) not in (None, [], {}):
            raise APIError(400, f"{name} is not supported: BianQue has no tools or structured output", name)


def finished(server: Server, job: Job, outcome: str) -> None:
    m = server.metrics
    m.queue.dec()
    m.requests.labels(job.req.model, outcome).inc()
    m.latency.labels(job.req.model).observe(time.perf_counter() - job.started)


async def pieces(server: Server, job: Job, chunks: Iterator[str]):
    """The reply's text pieces, each pulled in a worker thread; closing this closes the doctor's
    iterator (its generation is cancelled)."""
    with server.lock:
        server.active += 1
        server.metrics.batch.set(server.active)
    try:
        while True:
            piece = await anyio.to_thread.run_sync(next, chunks, None)
            if piece is None:
                return
            if job.first is None:
                job.first = time.perf_counter()
                server.metrics.ttft.labels(job.req.model).observe(job.first - job.started)
            job.text.append(piece)
            yield piece
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
        with server.lock:
            server.active -= 1
            server.metrics.batch.set(server.active)


def count_tokens(server: Server, job: Job) -> dict[str, int]:
    usage, job.finish = job.usage()
    m = server.metrics
    m.tokens.labels(job.req.model, "prompt").inc(usage["prompt_tokens"])
    m.tokens.labels(job.req.model, "completion").inc(usage["completion_tokens"])
    return usage


async def whole_reply(server: Server, job: Job, chunks: Iterator[str]) -> dict[str, Any]:
    outcome = "error"
    try:
        async with aclosing(pieces(server, job, chunks)) as stream:
            async for _ in stream:
                pass
        usage = await anyio.to_thread.run_sync(count_tokens, server, job)
        outcome = "ok"
    finally:
        finished(server, job, outcome)
    log.info("reply: model=%s stage=%s tokens=%d", job.req.model, job.stage, usage["completion_tokens"])
    body = envelope(job, "chat.completion")
    body["choices"] = [{"index": 0, "message": {"role": "assistant", "content": "".join(job.text)},
                        "finish_reason": job.finish, "logprobs": None}]
    body["usage"] = usage
    return body


def envelope(job: Job, kind: str) -> dict[str, Any]:
    if not hasattr(job, "id"):
        job.id, job.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    body = {"id": job.id, "object": kind, "created": job.created, "model": job.req.model}
    if job.kind == "coq" or job.flags:
        body["bianque"] = job.bianque()
    return body


def sse(data: dict[str, Any]) -> str:
    import json

    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def stream_events(server: Server, job: Job, chunks: Iterator[str]):
    """SSE in OpenAI's format: a role chunk (with the ``bianque`` object), content chunks, a final
    chunk with ``finish_reason`` and ``usage``, then ``[DONE]``. A failure mid-stream is sent as an
    ``error`` event (no ``[DONE]``), so a client never mistakes a cut-off reply for a whole one."""
    outcome = "disconnected"

    def chunk(delta: dict, reason: str | None = None) -> dict[str, Any]:
        body = envelope(job, "chat.completion.chunk")
        if job.kind != "coq" and not job.flags and "bianque" in body:
            del body["bianque"]
        body["choices"] = [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]
        return body

    try:
        yield sse(chunk({"role": "assistant", "content": ""}))
        try:
            async with aclosing(pieces(server, job, chunks)) as stream:
                async for piece in stream:
                    yield sse(chunk({"content": piece}))
            usage = await anyio.to_thread.run_sync(count_tokens, server, job)
        except Exception as exc:
            outcome = "error"
            log.error("stream failed: model=%s %s", job.req.model, type(exc).__name__)
            yield sse({"error": {"message": f"generation failed ({type(exc).__name__})", "type": "server_error",
                                 "param": None, "code": None}})
            return
        last = chunk({}, job.finish)
        last["usage"] = usage
        yield sse(last)
        yield "data: [DONE]\n\n"
        outcome = "ok"
        log.info("stream: model=%s stage=%s tokens=%d", job.req.model, job.stage, usage["completion_tokens"])
    finally:
        finished(server, job, outcome)


# --- the command -------------------------------------------------------------------------------
def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    from ..settings import add_settings_arguments

    parser.add_argument("--mode", choices=("v1", "v2", "coq"), default="coq",
                        help="which models to load (coq: both, serving bianque-1.0, -2.0 and -coq)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $BIANQUE_API_KEY)")
    ray = parser.add_argument_group("Ray Serve (pip install 'bianque[ray]')")
    ray.add_argument("--ray", action="store_true", help="serve through Ray Serve: model replicas over GPUs and machines")
    ray.add_argument("--address", help="join this Ray cluster ('auto': the one `ray start` began here; "
                                       "default: start a local Ray instance)")
    ray.add_argument("--v1-replicas", type=int, default=1, help="BianQue-1.0 replicas (default 1)")
    ray.add_argument("--v2-replicas", type=int, default=1, help="BianQue-2.0 replicas (default 1)")
    ray.add_argument("--gpus-per-replica", type=float, default=None,
                     help="GPUs each replica reserves, fractions allowed (default: 1 when the device is CUDA, else 0)")
    ray.add_argument("--cpus-per-replica", type=float, default=1, help="CPUs each replica reserves (default 1)")
    add_settings_arguments(parser, remote=False)


def serve(args: argparse.Namespace) -> int:
    """Load the models in the background and serve until interrupted."""
    import os

    import torch
    import uvicorn

    from ..cli import load_doctors
    from ..settings import settings_from_args

    settings = settings_from_args(args)
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    api_key = args.api_key or os.environ.get("BIANQUE_API_KEY") or None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.ray:
        return serve_ray(args, settings, api_key)
    app = create_app(lambda: load_doctors(args.mode, settings), api_key, settings.max_questions)
    log.warning("serving on http://%s:%d (models load in the background; GET /health)", args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="warning")
    return 0


def serve_ray(args: argparse.Namespace, settings: Any, api_key: str | None) -> int:
    if min(args.v1_replicas, args.v2_replicas) < 1 or args.cpus_per_replica < 0 or (args.gpus_per_replica or 0) < 0:
        raise ValueError("--v1-replicas/--v2-replicas must be at least 1 and --cpus/--gpus-per-replica not negative")
    try:
        from .ray_serve import serve_on_ray
    except ImportError as exc:
        raise ValueError(f"--ray needs Ray Serve ({exc}): pip install 'ray[serve]>=2.60' "
                         "(or the project's extra: pip install -e '.[ray]')") from None
    if args.gpus_per_replica is None:
        on_cuda = any(str(m.device).startswith(("cuda", "auto")) for m in (settings.v1, settings.v2))
        args.gpus_per_replica = 1.0 if on_cuda else 0.0
    return serve_on_ray(args, settings, api_key)
