"""`python -m bianque chat|download|convert|records`: terminal consultations and model housekeeping.

The chat shows the doctor's own reply to its user (that is the product); nothing else about the
dialogue is logged. Status lines go to stderr so ``--json`` output stays machine-readable.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Sequence, TextIO

import torch

from .errors import ModelLoadError
from .prompt import DOCTOR, PATIENT, Turn
from .session import ADVISE_NOW_TEXT, MODEL_NAMES
from .settings import (ENV_VARS, HUB_ENV_VARS, Settings, add_record_argument, add_settings_arguments, env_help,
                       settings_from_args)

MODES = ("v1", "v2", "coq")
ADVISE_EMPTY = "（请先描述您的情况，再输入 /advise 请求建议；也可以一起输入：/advise 头疼三天了）"
COMMANDS_HELP = "命令：/advise 直接给建议  /clear 新的问诊  /quit 退出  （Ctrl-C 停止当前回复）"


@dataclass
class Reply:
    """What a responder returns: the same shape as the router's reply."""

    stage: str
    model: str
    chunks: Iterator[str]


class WithParams:
    """A doctor bound to per-session generation settings, so the router can call ``reply(turns)``."""

    def __init__(self, doctor, params) -> None:
        self.doctor, self.params = doctor, params

    def reply(self, turns: Sequence[Turn]) -> Iterator[str]:
        return self.doctor.reply(turns, self.params)


Responder = Callable[[Sequence[Turn], bool], Reply]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bianque", description="BianQue (扁鹊) health consultation")
    sub = parser.add_subparsers(dest="command", required=True)
    raw = argparse.RawDescriptionHelpFormatter
    chat = sub.add_parser("chat", help="interactive consultation in the terminal", epilog=env_help(), formatter_class=raw)
    chat.add_argument("--mode", choices=MODES, default="coq", help="v1 asks, v2 advises, coq: v1 then v2")
    add_settings_arguments(chat)
    add_generation_arguments(chat)
    chat.add_argument("--json", action="store_true", help="stdin lines in, one JSON object per reply out")
    add_record_argument(chat)
    dl = sub.add_parser("download", help="fetch the checkpoints for offline use", epilog=env_help(list(HUB_ENV_VARS)),
                        formatter_class=raw)
    dl.add_argument("--to", help="directory to put them in (default: the Hugging Face cache)")
    dl.add_argument("--only", choices=("v1", "v2"))
    from .serving.api import add_serve_arguments

    serve_vars = [name for name in {**ENV_VARS, **HUB_ENV_VARS} if name != "BIANQUE_SERVER"]
    add_serve_arguments(sub.add_parser("serve", help="OpenAI-compatible HTTP API (FastAPI + uvicorn)",
                                       epilog=env_help(serve_vars), formatter_class=raw))
    conv = sub.add_parser("convert", help="rewrite a BianQue-2 checkpoint as (quantised) safetensors", add_help=False)
    conv.add_argument("args", nargs=argparse.REMAINDER)
    rec = sub.add_parser("records", help="recorded consultations: list|show|export|delete|purge", add_help=False)
    rec.add_argument("args", nargs=argparse.REMAINDER)
    ev = sub.add_parser("eval", help="replay real dialogues and score the replies (see eval --help)", add_help=False)
    ev.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """Decoding flags shared by `chat` and `eval` (read by ``session_params``)."""
    parser.add_argument("--greedy", action="store_true", help="deterministic decoding instead of sampling")
    parser.add_argument("--v1-temperature", type=float)
    parser.add_argument("--v1-top-p", type=float)
    parser.add_argument("--v2-temperature", type=float)
    parser.add_argument("--v2-top-p", type=float)
    parser.add_argument("--top-k", type=int, help="top-k for both models (default 50)")
    parser.add_argument("--max-new-tokens", type=int, help="BianQue-1.0 reply length limit (default 512)")
    parser.add_argument("--max-length", type=int, help="BianQue-2.0 prompt+reply token limit (default 2048)")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["convert"]:  # its own parser owns the flags
        from .convert import main as convert_main

        return convert_main(argv[1:])
    if argv[:1] == ["records"]:  # its own parser owns the flags
        from .records_cli import main as records_main

        return records_main(argv[1:])
    if argv[:1] == ["eval"]:  # its own parser owns the flags
        from .eval import main as eval_main

        return eval_main(argv[1:])
    args = build_parser().parse_args(argv)
    from .serving.remote import RemoteError

    try:
        if args.command == "download":
            return download(args)
        if args.command == "serve":
            from .serving.api import serve

            return serve(args)
        return chat(args)
    except ModelLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, RemoteError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def download(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .hub import V1_REPO, V2_REPO, download as fetch

    repos = {"v1": V1_REPO, "v2": V2_REPO}
    for key in [args.only] if args.only else ["v1", "v2"]:
        print(f"downloading {repos[key]} ...", file=sys.stderr)
        path = fetch(repos[key], Path(args.to) if args.to else None)
        print(f"{repos[key]} -> {path}", file=sys.stderr)
    return 0


def load_doctors(mode: str, settings: Settings) -> dict:
    """Load the models this mode needs, each on its own device/dtype."""
    doctors = {}
    if mode in ("v1", "coq"):
        from .t5 import load_questioner

        s = settings.v1
        print(f"loading BianQue-1.0 from {s.model} on {s.device} ...", file=sys.stderr)
        doctors["v1"] = load_questioner(s.model, device=s.device, dtype=s.dtype, max_batch=s.max_batch)
    if mode in ("v2", "coq"):
        from .glm import load_advisor

        s = settings.v2
        print(f"loading BianQue-2.0 from {s.model} on {s.device} ...", file=sys.stderr)
        doctors["v2"] = load_advisor(s.model, device=s.device, dtype=s.dtype, quantize=s.quantize, compile=s.compile,
                                     max_batch=s.max_batch)
    return doctors


def remote_doctors(mode: str, settings: Settings) -> dict:
    """The server's models in place of local ones (checked now: an unreachable server says so at once)."""
    from .serving.remote import MODELS, RemoteDoctor, ServerClient

    kinds = ("v1", "v2") if mode == "coq" else (mode,)
    client = ServerClient(settings.server, settings.api_key)
    client.check([MODELS[k] for k in kinds] + (["bianque-coq"] if mode == "coq" else []))
    print(f"answering through the BianQue server at {client.url}", file=sys.stderr)
    return {k: RemoteDoctor(client, k) for k in kinds}


def session_params(doctor, args: argparse.Namespace, version: str):
    """The doctor's default generation settings with the command-line overrides applied."""
    params = doctor.default_params
    sampling = params.sampling
    overrides = {
        "do_sample": False if args.greedy else None,
        "temperature": getattr(args, f"{version}_temperature"),
        "top_p": getattr(args, f"{version}_top_p"),
        "top_k": args.top_k,
    }
    sampling = replace(sampling, **{k: v for k, v in overrides.items() if v is not None})
    params = replace(params, sampling=sampling)
    limit = {"v1": ("max_new_tokens", args.max_new_tokens), "v2": ("max_length", args.max_length)}[version]
    if hasattr(params, "max_tokens"):  # a server's model: the OpenAI request's fields
        if version == "v2" and args.max_length is not None:
            raise ValueError("--max-length (prompt + reply) cannot be sent to a server: set it where the "
                             "server runs, or leave it out with --server")
        limit = ("max_tokens", args.max_new_tokens if version == "v1" else None)
    return replace(params, **{limit[0]: limit[1]}) if limit[1] is not None else params


def make_responder(mode: str, doctors: dict, args: argparse.Namespace, max_questions: int) -> Responder:
    bound = {v: WithParams(d, session_params(d, args, v)) for v, d in doctors.items()}
    server = getattr(doctors.get("v1"), "server", None)
    if mode == "coq" and server is not None:  # the server routes; its reply names the stage
        return lambda turns, advise_now: server.respond(turns, advise_now, max_questions, bound["v1"].params,
                                                        bound["v2"].params)
    if mode == "coq":
        from .router import ChainOfQuestioning

        router = ChainOfQuestioning(bound["v1"], bound["v2"], max_questions=max_questions)
        return lambda turns, advise_now: router.respond(turns, advise_now=advise_now)
    stage = "question" if mode == "v1" else "advice"
    return lambda turns, advise_now: Reply(stage, mode, iter(bound[mode].reply(turns)))


def chat(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, max_batch=1)  # one user: one engine slot unless asked for more
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    doctors = remote_doctors(args.mode, settings) if settings.server else load_doctors(args.mode, settings)
    respond = make_responder(args.mode, doctors, args, settings.max_questions)
    recorder = Recorder.open(settings.record, args.mode, settings) if settings.record else None
    if args.json:
        return run_json(respond, sys.stdin, sys.stdout, recorder)
    return run_interactive(respond, args.mode, settings.max_questions, recorder)


class Recorder:
    """Opt-in recording of terminal consultations (``--record [URL]``), as the apps record theirs: a
    consultation per dialogue (``/clear`` starts the next), each patient turn with its red flags and
    each reply with its stage, model and stopped flag. A database that cannot be written prints one
    notice and the consultation goes on unrecorded; nothing is logged."""

    def __init__(self, store, mode: str, settings: Settings) -> None:
        self.store, self.mode, self.consultation = store, mode, None
        self.models = {v: {"source": getattr(settings, v).model, "device": getattr(settings, v).device,
                           "dtype": getattr(settings, v).dtype} for v in ("v1", "v2") if mode in (v, "coq")}

    @classmethod
    def open(cls, url: str, mode: str, settings: Settings) -> "Recorder | None":
        from .records import RecordsError, open_store

        try:
            recorder = cls(open_store(url), mode, settings)
        except RecordsError as exc:
            print(f"（记录数据库不可用：{exc}；本次问诊不记录）", file=sys.stderr)
            return None
        print("（本次问诊将被记录，用于医生评估；不想记录请去掉 --record / BIANQUE_RECORD）", file=sys.stderr)
        return recorder

    def clear(self) -> None:
        if self.consultation is not None and self.store is not None:
            self._safely(lambda: self.store.finish_consultation(self.consultation))
        self.consultation = None

    def reply(self, patient: str, flags: Sequence, stage: str, model: str, text: str, stopped: bool) -> None:
        def write() -> None:
            if self.consultation is None:
                self.consultation = self.store.start_consultation(f"cli-{self.mode}", models=self.models)
            self.store.add_turn(self.consultation, PATIENT, patient, red_flags=[f.name for f in flags])
            self.store.add_turn(self.consultation, DOCTOR, text, stage=stage, model=model, stopped=stopped)
        if self.store is not None:
            self._safely(write)

    def _safely(self, write) -> None:
        from sqlalchemy.exc import SQLAlchemyError

        from .records import RecordsError

        try:
            write()
        except (RecordsError, SQLAlchemyError, OSError) as exc:
            print(f"（记录失败：{type(exc).__name__}；之后的对话不再记录）", file=sys.stderr)
            self.store = None


def handle_line(text: str, turns: list[Turn], respond: Responder) -> tuple[str, Reply | None]:
    """Apply one input line to the dialogue: ('quit'|'clear'|'skip'|'advise-empty'|'reply', reply)."""
    text = text.strip()
    if not text:
        return "skip", None
    if text == "/quit":
        return "quit", None
    if text == "/clear":
        turns.clear()
        return "clear", None
    advise_now = text.split(maxsplit=1)[0] == "/advise"
    if advise_now:
        if not turns and text == "/advise":  # nothing to advise on: say so (see ADVISE_EMPTY)
            return "advise-empty", None
        # As the apps' "直接给建议" button: the request is a visible patient turn, so the dialogue
        # still alternates and the advisor reads what was asked ("/advise 还有点发热" adds that text).
        text = text[len("/advise"):].strip() or ADVISE_NOW_TEXT
    turns.append(Turn(PATIENT, text))
    return "reply", respond(list(turns), advise_now)


def patient_flags(turns: Sequence[Turn]) -> list:
    """The emergency flags of the last patient turn, read with the patient's earlier turns."""
    from .safety import red_flags

    said = [t.text for t in turns if t.role == PATIENT]
    return red_flags(said[-1], said[:-1]) if said else []


def emergency_notice(flags: Sequence) -> str:
    """The notice the terminal prints under a patient line (the apps show the same text)."""
    lines = ["【请立即拨打120或前往急诊】"]
    for flag in flags:
        lines += [f"- {flag.message}", f"  现在可以做：{flag.action}"]
    return "\n".join(lines)


def run_json(respond: Responder, stdin: TextIO, stdout: TextIO, recorder: Recorder | None = None) -> int:
    turns: list[Turn] = []
    for line in stdin:
        action, reply = handle_line(line, turns, respond)
        if action == "quit":
            break
        if action == "clear" and recorder is not None:
            recorder.clear()
        if action == "advise-empty":
            print(ADVISE_EMPTY, file=sys.stderr)
        if reply is None:
            continue
        from .safety import flag_dict

        raw_flags = patient_flags(turns)  # before the reply joins the turns
        flags = [flag_dict(f) for f in raw_flags]
        text = "".join(reply.chunks)
        if recorder is not None:
            recorder.reply(turns[-1].text, raw_flags, reply.stage, reply.model, text, False)
        turns.append(Turn(DOCTOR, text, reply.stage))
        obj = {"stage": reply.stage, "model": reply.model, "text": text, "red_flags": flags}
        stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
        stdout.flush()
    return 0


def label(reply: Reply, turns: Sequence[Turn], max_questions: int, mode: str) -> str:
    name = MODEL_NAMES[reply.model]
    if mode != "coq":
        return name
    if reply.stage == "question":
        asked = sum(t.stage == "question" for t in turns if t.role == DOCTOR) + 1
        return f"问询 {asked}/{max_questions} · {name}"
    return f"建议 · {name}"


def stream_reply(reply: Reply, out: TextIO) -> tuple[str, bool]:
    """Print chunks as they come; Ctrl-C stops this reply only. Returns (text, stopped)."""
    parts: list[str] = []
    try:
        for chunk in reply.chunks:
            parts.append(chunk)
            out.write(chunk)
            out.flush()
    except KeyboardInterrupt:
        close = getattr(reply.chunks, "close", None)
        if close:
            close()
        return "".join(parts), True
    return "".join(parts), False


def run_interactive(respond: Responder, mode: str, max_questions: int, recorder: Recorder | None = None) -> int:
    from .router import GREETING
    from .serving.remote import RemoteError

    out = sys.stdout
    print(f"扁鹊：{GREETING}\n{COMMANDS_HELP}", file=out)
    turns: list[Turn] = []
    while True:
        try:
            line = input("病人：")
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return 0
        try:
            action, reply = handle_line(line, turns, respond)
        except torch.OutOfMemoryError:
            turns.pop()
            print("（内存不足，这条消息未能回复，请重试或输入 /clear）", file=sys.stderr)
            continue
        except RemoteError as exc:  # the message is kept out of the dialogue: send it again
            turns.pop()
            print(f"error: {exc}（这条消息未能回复，可以再发一次）", file=sys.stderr)
            continue
        if action == "quit":
            return 0
        if action == "clear":
            print("（已开始新的问诊）", file=out)
            if recorder is not None:
                recorder.clear()
        if action == "advise-empty":
            print(ADVISE_EMPTY, file=out)
        if reply is None:
            continue
        flags = patient_flags(turns)
        if flags:
            print(emergency_notice(flags), file=out)
        out.write(f"医生［{label(reply, turns[:-1], max_questions, mode)}］：")
        try:
            text, stopped = stream_reply(reply, out)
        except torch.OutOfMemoryError:
            turns.pop()
            print("\n（内存不足，这条消息未能回复，请重试或输入 /clear）", file=sys.stderr)
            continue
        except RemoteError as exc:
            turns.pop()
            print(f"\nerror: {exc}（这条消息未能回复，可以再发一次）", file=sys.stderr)
            continue
        print(" ［已停止］" if stopped else ("" if text else "（模型没有生成内容，请再试一次）"), file=out)
        if text and recorder is not None:
            recorder.reply(turns[-1].text, flags, reply.stage, reply.model, text, stopped)
        if text:
            turns.append(Turn(DOCTOR, text, reply.stage))
        else:
            turns.pop()  # nothing was said: keep the dialogue valid for the next message
