"""The one Streamlit render module the three BianQue apps share; the apps differ by an AppConfig.

Models are loaded once per process through ``st.cache_resource`` and so are shared by every
browser session; each doctor serves concurrent sessions itself (the batching engine, or one at a
time with ``--max-batch 0``), each session reading its own reply stream, so streams never mix; a
waiting session sees its place in the queue. Each session keeps its
own :class:`~bianque.session.Consultation` in ``st.session_state``. Patient text is never logged:
log lines carry only metadata (stage, model, lengths, timings).
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import streamlit as st
import torch

from .errors import ModelLoadError
from .prompt import PATIENT, Turn
from .sampling import SamplingParams
from .serving.remote import RemoteError
from .session import (
    ADVISE_NOW_TEXT, MODEL_NAMES, Consultation, Message, fit_note, params_dict, reply_label,
)
from .settings import Settings, parse_settings
from .transcript import DISCLAIMER, TranscriptInfo, to_json, to_markdown
from . import review
from .records_session import RecordingSession, settings_info

log = logging.getLogger(__name__)

EMERGENCY = "请立即拨打120或前往急诊"
OOM_MESSAGE = "生成回复时内存/显存不足，回复未完成。对话已保留：可以点击「重试」，或在侧栏调小生成长度后再试。"
FAILED_MESSAGE = "生成回复时出错（{kind}）。对话已保留，可以点击「重试」。"
# Material icons ship with Streamlit's frontend, so they render offline and without emoji fonts.
AVATARS = {"assistant": ":material/stethoscope:", "user": ":material/person:"}
STOPPED_NOTE = ":material/stop_circle: 已停止：以上是停止前生成的部分回复"
EMPTY_REPLY = "*（模型没有生成内容，可以点击「重新生成」）*"
ENV_VARS = {"v1": "BIANQUE_V1_MODEL", "v2": "BIANQUE_V2_MODEL"}
FLAGS = {"v1": "--v1-model", "v2": "--v2-model"}
INT_LABELS = {
    "max_new_tokens": "最多生成 token 数",
    "max_length": "最大总长度 max_length（对话 + 回复的 token 数）",
    "no_repeat_ngram_size": "禁止重复的 n-gram 长度（0 关闭）",
    "max_input_tokens": "最多输入 token 数",
    "min_answer_tokens": "为回答预留的最少 token 数",
    "max_tokens": "最多生成 token 数",
}
# Far beyond either model's budget (a longer message is kept and fitted, see fit_note); the cap
# only stops a runaway paste from bloating the page and the transcript.
MAX_MESSAGE_CHARS = 20_000
STATE_KEY = "consultation"
REQUEST_KEY = "request"
SESSION_LOCK_KEY = "session_lock"


@dataclass(frozen=True)
class AppConfig:
    """What distinguishes the three apps. ``mode`` is "v1", "v2" or "coq" (both, Chain of Questioning)."""

    mode: str
    title: str
    caption: str
    page_title: str
    placeholder: str = "请描述您的症状，或回答医生的问题…"
    icon: str = ":material/stethoscope:"

    @property
    def kinds(self) -> tuple[str, ...]:
        return {"v1": ("v1",), "v2": ("v2",), "coq": ("v1", "v2")}[self.mode]


@dataclass
class Served:
    """A loaded (or remote) doctor, shared by every session: its replies may run at once."""

    doctor: Any


class Status:
    """The line under a reply's label: "排队中" and the place while the reply waits for the model, progress
    while a model writes a reply that is not shown yet (the router judges v1's whole reply).

    Each update is a Streamlit call, and Streamlit can only interrupt a run (Stop, a new message)
    at such calls, never inside a model's forward pass; so updates are also the Stop points.
    """

    INTERVAL_S = 0.2

    def __init__(self, slot: Any) -> None:
        self._slot, self._last, self.live = slot, 0.0, True

    def queued(self, ahead: int | None) -> None:
        """`ahead` replies wait before this one; None: its turn has come."""
        if ahead is not None:
            self._slot.info(f"排队中：前面还有 {ahead} 位", icon=":material/hourglass_top:")
        else:
            self._slot.empty()

    def progress(self, name: str, chars: int) -> None:
        now = time.perf_counter()
        if self.live and now - self._last >= self.INTERVAL_S:
            self._last = now
            self._slot.caption(f"{name} 正在生成… 已写 {chars} 字")

    def done(self) -> None:
        self.live = False
        self._slot.empty()


class Serialised:
    """A per-run view of a shared doctor: replies use this session's settings and show their place in the queue."""

    ADMIT_GRACE_S = 0.3

    def __init__(self, served: Served, params: Any, status: Status):
        self._served, self._params, self._status = served, params, status

    def __getattr__(self, name: str) -> Any:  # name, source, device, dtype, default_params, fit
        return getattr(self._served.doctor, name)

    def reply(self, turns: Sequence[Turn], params: Any = None) -> Iterator[str]:
        stream = self._served.doctor.reply(turns, self._params if params is None else params)
        try:
            ahead = getattr(stream, "ahead", None)  # a local doctor's Reply; a server queues on its side
            # A free slot is taken at the engine's next step boundary: wait that long before saying
            # "排队中", so that a reply that is not really queued does not flash the notice.
            if ahead is not None and (place := ahead(self.ADMIT_GRACE_S)) is not None:
                # Others come first: say where this reply stands, and keep calling into Streamlit
                # while waiting so that Stop (a rerun request) can still interrupt this session.
                while place is not None:
                    self._status.queued(place)
                    place = ahead(0.25)
                self._status.queued(None)
            chars = 0
            for piece in stream:
                chars += len(piece)
                self._status.progress(self._served.doctor.name, chars)
                yield piece
        finally:
            getattr(stream, "close", lambda: None)()  # gives up the place or the engine slot


@dataclass(frozen=True)
class Controls:
    """The sidebar's choices for this run."""

    params: dict[str, Any]
    max_questions: int


# ---------------------------------------------------------------- loading (cached per process)

def _loader(kind: str) -> Callable[..., Any]:
    """The library loader; imported lazily so a missing backend is a page, not an import error."""
    if kind == "v1":
        from .t5 import load_questioner

        return load_questioner
    from .glm import load_advisor

    return load_advisor


@st.cache_resource(show_spinner=False)
def _serve(kind: str, model: str, device: str, dtype: str | None, quantize: int | None,
           compile: bool = False, max_batch: int = 0) -> Served:
    extra = {"quantize": quantize, "compile": compile} if kind == "v2" else {}
    extra["max_batch"] = max_batch
    started = time.perf_counter()
    doctor = _loader(kind)(model, device=device, dtype=dtype, **extra)
    log.info("loaded %s on %s (%s) in %.1f s", kind, device, doctor.dtype, time.perf_counter() - started)
    _freeze_heap()
    return Served(doctor)


def _freeze_heap() -> None:
    """Exempt everything alive now (torch, the libraries, the model) from the garbage collector.

    Streamlit runs a full collection after every script run (``runner.postScriptGC``) and holds
    the GIL throughout: over the libraries' objects that took 0.3-0.5 s on our 2-core machine,
    during which no queued message reached the browser, so a short reply's first characters
    (already sent by the script) appeared up to a second late. Frozen objects are never scanned
    again; what later runs create is still collected as usual.
    """
    gc.collect()  # do not freeze the loader's garbage
    gc.freeze()


@st.cache_resource(show_spinner=False)
def _seed_once(seed: int) -> int:
    torch.manual_seed(seed)  # once per process: regenerating must still give a new reply
    return seed


@st.cache_resource(show_spinner=False)
def _server_client(url: str, api_key: str | None) -> Any:
    from .serving.remote import ServerClient

    return ServerClient(url, api_key)


def _remote(config: AppConfig, settings: Settings) -> dict[str, Served]:
    """The server's models in place of local ones; checked on every run, so a page that said the
    server was down answers once it is up."""
    from .serving.remote import MODELS, RemoteDoctor

    client = _server_client(settings.server, settings.api_key)
    needed = [MODELS[k] for k in config.kinds] + (["bianque-coq"] if config.mode == "coq" else [])
    try:
        client.check(needed)
    except RemoteError as exc:
        log.warning("server %s not usable", settings.server)
        st.error(f"**BianQue 服务器不可用**\n\n{exc}", icon=":material/cloud_off:")
        st.info(f"在服务器上启动：`python -m bianque serve --v1-model DIR --v2-model DIR --host 0.0.0.0 "
                f"--port 8000`；或修改启动参数 `--server URL` / 环境变量 `BIANQUE_SERVER`（现为 {settings.server}）。")
        st.stop()
    return {k: Served(RemoteDoctor(client, k)) for k in config.kinds}


def _load(config: AppConfig, settings: Settings) -> dict[str, Served]:
    if settings.server:
        return _remote(config, settings)
    served, failed = {}, {}
    for kind in config.kinds:
        s = getattr(settings, kind)
        with st.spinner(f"正在加载 {MODEL_NAMES[kind]}（{s.model} → {s.device}）…", show_time=True):
            try:
                served[kind] = _serve(kind, s.model, s.device, s.dtype, s.quantize, s.compile, s.max_batch)
            except ModelLoadError as exc:  # try the others too: one page names every missing model
                failed[kind] = str(exc)
            except ImportError as exc:
                _unavailable_page(kind, exc)
    if failed:
        _load_error_page(failed)
    if settings.seed is not None:
        _seed_once(settings.seed)
    return served


# ---------------------------------------------------------------- error pages (never a traceback)

def _load_error_page(failed: dict[str, str]) -> None:
    """One page for every model that failed to load, each with the variable and flag that choose it."""
    for kind, message in failed.items():
        log.warning("could not load %s", kind)
        st.error(f"**{MODEL_NAMES[kind]} 加载失败**\n\n{message}", icon=":material/error:")
        st.info(
            f"指定本地模型目录：设置环境变量 `{ENV_VARS[kind]}=DIR`，或启动时传参 "
            f"`streamlit run <app>.py -- {FLAGS[kind]} DIR`；也可以先运行 `python -m bianque download` 下载模型。"
        )
    st.stop()


def _unavailable_page(kind: str, exc: ImportError) -> None:
    log.warning("backend for %s not importable: %s", kind, type(exc).__name__)
    st.error(f"**{MODEL_NAMES[kind]} 暂不可用**\n\n此版本缺少 {MODEL_NAMES[kind]} 的后端（{exc}）。", icon=":material/construction:")
    st.stop()


def _settings(argv: Sequence[str] | None) -> Settings:
    try:
        return parse_settings(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        st.error(f"**启动参数有误**\n\n{exc}", icon=":material/error:")
        st.stop()


# ---------------------------------------------------------------- sidebar

def _params_widgets(kind: str, defaults: Any) -> Any:
    """Widgets for a doctor's params dataclass, starting from its defaults (the originals)."""
    s: SamplingParams = defaults.sampling
    do_sample = st.toggle("采样（关闭则贪心解码）", value=s.do_sample, key=f"{kind}.do_sample")
    sampling = SamplingParams(
        do_sample=do_sample,
        temperature=st.slider("temperature", 0.05, 2.0, float(s.temperature), 0.05,
                              key=f"{kind}.temperature", disabled=not do_sample),
        top_p=st.slider("top_p", 0.05, 1.0, float(s.top_p), 0.05, key=f"{kind}.top_p", disabled=not do_sample),
        top_k=int(st.number_input("top_k（0 关闭）", 0, 1000, int(s.top_k), key=f"{kind}.top_k",
                                  disabled=not do_sample)),
    )
    extra = {}
    for f in dataclasses.fields(defaults):
        value = getattr(defaults, f.name)
        if f.name != "sampling" and isinstance(value, int) and not isinstance(value, bool):
            low = 0 if f.name == "no_repeat_ngram_size" else 1
            extra[f.name] = int(st.number_input(INT_LABELS.get(f.name, f.name), low, max(8192, value), value,
                                                key=f"{kind}.{f.name}"))
    try:
        return dataclasses.replace(defaults, sampling=sampling, **extra)
    except ValueError as exc:  # e.g. a max_length the model cannot work with: say so, keep the defaults
        st.error(f"设置无效，暂用默认值：{exc}", icon=":material/error:")
        return defaults


def _sidebar(config: AppConfig, served: dict[str, Served], settings: Settings) -> Controls:
    with st.sidebar:
        st.button("新的问诊", on_click=_new_consultation, width="stretch", key="new", icon=":material/add_comment:")
        max_questions = settings.max_questions
        if config.mode == "coq":
            max_questions = int(st.number_input("最多问询次数（之后由 BianQue-2.0 给建议）", 0, 20,
                                                settings.max_questions, key="max_questions"))
        params = {}
        for kind, item in served.items():
            with st.expander(f"{MODEL_NAMES[kind]} 生成设置"):
                params[kind] = _params_widgets(kind, item.doctor.default_params)
        st.markdown("**已加载模型**")
        for kind, item in served.items():
            d = item.doctor
            st.caption(f"{MODEL_NAMES[kind]}：`{d.source}` · {d.device} · {d.dtype}")
    return Controls(params, max_questions)


def _downloads(config: AppConfig, served: dict[str, Served], consultation: Consultation, controls: Controls) -> None:
    info = transcript_info(config, served, controls.max_questions)
    recording = _current_recording()
    feedback = recording.feedback_by_index(consultation) if recording is not None else None
    with st.sidebar:
        st.markdown("**下载问诊记录**")
        left, right = st.columns(2)
        left.download_button("Markdown", to_markdown(consultation, info, feedback=feedback), "bianque-transcript.md",
                             "text/markdown", key="download_md", on_click="ignore", icon=":material/description:")
        right.download_button("JSON", to_json(consultation, info, feedback=feedback), "bianque-transcript.json",
                              "application/json", key="download_json", on_click="ignore", icon=":material/data_object:")


def transcript_info(config: AppConfig, served: dict[str, Served], max_questions: int) -> TranscriptInfo:
    models = {
        kind: {"name": MODEL_NAMES[kind], "source": str(s.doctor.source), "device": str(s.doctor.device),
               "dtype": str(s.doctor.dtype)}
        for kind, s in served.items()
    }
    return TranscriptInfo(config.title, greeting(), models, max_questions if config.mode == "coq" else None)


# ---------------------------------------------------------------- the chat

def greeting() -> str:
    from .router import GREETING

    return GREETING


def _consultation() -> Consultation:
    if STATE_KEY not in st.session_state:
        st.session_state[STATE_KEY] = Consultation()
    consultation = st.session_state[STATE_KEY]
    if consultation.pending is not None:  # the last run was interrupted before it could finish
        consultation.finish_reply(stopped=True)
    return consultation


@contextmanager
def one_run_at_a_time(state: Any) -> Iterator[None]:
    """Let one run of a browser session at a time touch its consultation.

    With Streamlit's fast reruns (the default), a new message or a Stop click starts the next run
    at once in a new thread, while the interrupted run is still unwinding: it only stops at its
    next Streamlit call, then its ``finally`` files the partial reply. Waiting for that keeps the
    partial reply and the new request from racing (a run that is waited for stops within one
    chunk or one progress update, see :class:`Status`).
    """
    lock = state.setdefault(SESSION_LOCK_KEY, threading.Lock())
    with lock:
        yield


def _new_consultation() -> None:
    st.session_state[STATE_KEY] = Consultation()
    st.session_state.pop(REQUEST_KEY, None)


def _request(kind: str) -> None:
    st.session_state[REQUEST_KEY] = kind


def red_flag_notice(text: str, earlier: Sequence[str] = ()) -> str | None:
    """The emergency notice for a patient message, decided by rules alone (never by the models).

    ``earlier``: the patient's previous messages, oldest first (an emergency told in pieces)."""
    from .safety import red_flags

    flags = red_flags(text, earlier)
    if not flags:
        return None
    reasons = "\n".join(f"- {flag.message}\n  现在可以做：{flag.action}" for flag in flags)
    return f"**{EMERGENCY}**\n\n{reasons}"


def _render_message(message: Message, earlier: Sequence[str] = ()) -> None:
    if message.role == PATIENT:
        with st.chat_message("user", avatar=AVATARS["user"]):
            st.markdown(message.text)
        notice = red_flag_notice(message.text, earlier)
        if notice:
            st.error(notice, icon=":material/emergency:")
        return
    with st.chat_message("assistant", avatar=AVATARS["assistant"]):
        st.caption(message.label or "")
        st.markdown(message.text or EMPTY_REPLY)
        _reply_footer(message)
        review.reply_feedback(_current_recording(), message)


def _reply_footer(message: Message) -> None:
    if message.stopped:
        st.caption(STOPPED_NOTE)
    if message.note:
        st.caption(f":material/info: {message.note}")


def _render_history(consultation: Consultation) -> None:
    with st.chat_message("assistant", avatar=AVATARS["assistant"]):
        st.markdown(greeting())
    said: list[str] = []  # the patient's messages so far: a notice may need the earlier ones
    for message in consultation.messages:
        _render_message(message, said)
        if message.role == PATIENT:
            said = said + [message.text]


def _take_request(prompt: str | None, consultation: Consultation) -> bool | None:
    """Apply this run's request to the dialogue; returns advise_now for a reply to make, else None."""
    request = st.session_state.pop(REQUEST_KEY, None)
    if prompt is not None:
        if not prompt.strip():
            st.toast("消息为空，未发送。", icon=":material/edit_note:")
            return None
        consultation.add_patient(prompt)
        return False
    if request == "regenerate":
        consultation.drop_last_reply()
        return False if consultation.awaiting_reply else None
    if request == "advise" and consultation.messages:
        if not consultation.awaiting_reply:
            consultation.add_patient(ADVISE_NOW_TEXT)
        return True
    if request == "retry" and consultation.awaiting_reply:
        return False
    return None


def _controls(config: AppConfig, consultation: Consultation) -> None:
    if consultation.error:
        st.error(consultation.error, icon=":material/error:")
    st.caption(DISCLAIMER)
    if not consultation.messages:
        return
    buttons = st.columns([1, 1, 3])
    if consultation.awaiting_reply:
        buttons[0].button("重试", on_click=_request, args=("retry",), key="retry", icon=":material/replay:")
    else:
        buttons[0].button("重新生成", on_click=_request, args=("regenerate",), key="regenerate",
                          icon=":material/refresh:")
    if config.mode == "coq":
        buttons[1].button("直接给建议", on_click=_request, args=("advise",), key="advise", icon=":material/lightbulb:",
                          help="不再追问，由 BianQue-2.0 根据目前的对话给出建议")


# ---------------------------------------------------------------- one reply

@dataclass
class _Timing:
    run_started: float  # when this script run began (a message's rerun): the app's own overhead
    started: float  # when the reply was asked for
    first_chunk: float | None = None


def _tee(chunks: Iterator[str], message: Message, timing: _Timing) -> Iterator[str]:
    """Keep the partial reply in session state as it streams, so an interrupted run still has it."""
    for chunk in chunks:
        if timing.first_chunk is None:
            timing.first_chunk = time.perf_counter()
        message.text += chunk
        yield chunk


def _start(config: AppConfig, doctors: dict[str, Serialised], consultation: Consultation,
           controls: Controls, advise_now: bool) -> tuple[str, str | None, Iterator[str]]:
    """Which model answers, at which stage, and its stream (the router decides in the combined app)."""
    turns = consultation.turns()
    if config.mode != "coq":
        kind = config.kinds[0]
        return kind, None, doctors[kind].reply(turns)
    server = getattr(doctors["v1"], "server", None)
    if server is not None:  # the server routes; its reply names the stage
        reply = server.respond(turns, advise_now, controls.max_questions, controls.params["v1"], controls.params["v2"])
        return reply.model, reply.stage, reply.chunks
    from .router import ChainOfQuestioning

    router = ChainOfQuestioning(doctors["v1"], doctors["v2"], max_questions=controls.max_questions)
    reply = router.respond(turns, advise_now=advise_now)
    return reply.model, reply.stage, iter(reply.chunks)


def _answer(config: AppConfig, served: dict[str, Served], consultation: Consultation,
            controls: Controls, advise_now: bool, run_started: float) -> None:
    timing = _Timing(run_started, time.perf_counter())
    with st.chat_message("assistant", avatar=AVATARS["assistant"]):
        label, status = st.empty(), Status(st.empty())
        label.caption("思考中…")
        doctors = {k: Serialised(s, controls.params[k], status) for k, s in served.items()}
        message = consultation.start_reply()
        body = st.container()  # the reply streams here, above Stop, so Stop stays in view under a long reply
        stop = st.empty()
        stop.button("停止生成", key="stop", icon=":material/stop_circle:")  # a click reruns the script, which interrupts this one
        chunks: Iterator[str] = iter(())
        completed = False
        try:
            kind, stage, chunks = _start(config, doctors, consultation, controls, advise_now)
            _describe(message, kind, stage, consultation, controls, served[kind].doctor)
            label.caption(message.label)
            status.done()
            body.write_stream(_tee(chunks, message, timing))
            completed = True
        except torch.OutOfMemoryError:
            _free_memory()
            consultation.fail_reply(OOM_MESSAGE)
        except RemoteError as exc:  # says which server and what to do; never quotes the patient
            log.error("reply failed: server error")
            consultation.fail_reply(f"{exc}。对话已保留，可以点击「重试」。")
        except Exception as exc:  # noqa: BLE001 - any model failure is a message, not a traceback
            log.error("reply failed: %s", type(exc).__name__)  # the exception text may quote the patient
            consultation.fail_reply(FAILED_MESSAGE.format(kind=type(exc).__name__))
        finally:
            getattr(chunks, "close", lambda: None)()  # free the engine slot even when interrupted
            if consultation.pending is not None:
                consultation.finish_reply(stopped=not completed)
            _log_reply(message, timing, completed)
            _record_reply(consultation, message, timing)
    stop.empty()


def _describe(message: Message, kind: str, stage: str | None, consultation: Consultation,
              controls: Controls, doctor: Any) -> None:
    params = controls.params[kind]
    message.model, message.stage, message.params = kind, stage, params_dict(params)
    message.label = reply_label(kind, stage, consultation.questions_asked() + 1, controls.max_questions)
    message.note = fit_note(doctor.fit(consultation.turns(), params))


def _free_memory() -> None:
    log.error("reply failed: out of memory")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _log_reply(message: Message, timing: _Timing, completed: bool) -> None:
    def ms(since: float) -> float:
        return (timing.first_chunk - since) * 1000 if timing.first_chunk else -1.0

    log.info("reply model=%s stage=%s chars=%d run_to_first_chunk_ms=%.0f first_chunk_ms=%.0f total_ms=%.0f "
             "completed=%s", message.model, message.stage, len(message.text), ms(timing.run_started),
             ms(timing.started), (time.perf_counter() - timing.started) * 1000, completed)


# ---------------------------------------------------------------- the page

def configure_logging() -> None:
    """Metadata logs to stderr for the operator (once per process; never patient text)."""
    logger = logging.getLogger("bianque")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def run_app(config: AppConfig, argv: Sequence[str] | None = None) -> None:
    """Render one run of an app; an unexpected failure is a page with a message, never a traceback."""
    st.set_page_config(page_title=config.page_title, page_icon=config.icon, layout="centered")
    try:
        with one_run_at_a_time(st.session_state):
            _pages(config, argv)
    except Exception as exc:  # noqa: BLE001 - Streamlit's rerun/stop are BaseExceptions and pass through
        # The traceback's frames only: an exception's message may quote the patient.
        log.error("app run failed: %s\n%s", type(exc).__name__, "".join(traceback.format_tb(exc.__traceback__)))
        st.error(f"**出错了**（{type(exc).__name__}）。本会话的对话仍然保留，可以稍后重试。", icon=":material/error:")


def _run(config: AppConfig, argv: Sequence[str] | None) -> None:
    started = time.perf_counter()
    st.title(config.title)  # first, so that loading and error pages say which app this is
    st.caption(config.caption)
    settings = _settings(argv)
    served = _load(config, settings)
    consultation = _consultation()
    controls = _sidebar(config, served, settings)
    recording = _recording(config, served, settings, controls, consultation)
    prompt = st.chat_input(config.placeholder, key="prompt", max_chars=MAX_MESSAGE_CHARS)
    review.recording_banner(recording, bool(consultation.messages))
    advise_now = _take_request(prompt, consultation)
    if recording is not None:
        recording.patient_turns(consultation)
    _render_history(consultation)
    if advise_now is not None:
        _answer(config, served, consultation, controls, advise_now, started)
        st.rerun()  # redraw controls and downloads for the finished dialogue
    _controls(config, consultation)
    _downloads(config, served, consultation, controls)


# ---------------------------------------------------------------- recording (opt-in: --record / BIANQUE_RECORD)

REVIEW_PAGE = "bianque_records_page.py"  # next to the app scripts: the page "问诊记录"


def _pages(config: AppConfig, argv: Sequence[str] | None) -> None:
    """The chat alone, or, in an app that records, the chat and the review page "问诊记录"."""
    try:
        record = parse_settings(sys.argv[1:] if argv is None else argv).record
    except ValueError:
        record = None  # the chat page shows the error
    if record is None:
        _run(config, argv)
        return

    def chat() -> None:
        _run(config, argv)

    st.navigation([
        st.Page(chat, title="问诊", icon=":material/chat:", default=True),
        st.Page(REVIEW_PAGE, title=review.PAGE_TITLE, icon=":material/fact_check:", url_path="records"),
    ]).run()


def _recording(config: AppConfig, served: dict[str, Served], settings: Settings, controls: Controls,
               consultation: Consultation) -> RecordingSession | None:
    info = transcript_info(config, served, controls.max_questions)
    max_questions = controls.max_questions if config.mode == "coq" else None
    return review.recording_session(consultation, settings.record, config.mode, info.models,
                                    settings_info(settings, config.kinds, max_questions))


def _current_recording() -> RecordingSession | None:
    found = st.session_state.get(review.RECORDING_KEY)
    if found is None or found[0] is not st.session_state.get(STATE_KEY):
        return None
    return found[1]


def _record_reply(consultation: Consultation, message: Message, timing: _Timing) -> None:
    """Write the reply as it ended (no Streamlit call: this may run while a Stop unwinds the run)."""
    recording = _current_recording()
    if recording is None:
        return
    now = time.perf_counter()
    finished = datetime.now(timezone.utc).replace(tzinfo=None)
    started = finished - timedelta(seconds=now - timing.started)
    first = None if timing.first_chunk is None else (timing.first_chunk - timing.started) * 1000
    shown = any(m is message for m in consultation.messages)
    recording.doctor_turn(message, shown=shown, failed=not shown and consultation.error is not None,
                          started_at=started, finished_at=finished, first_chunk_ms=first)
