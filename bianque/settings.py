"""Model locations, devices and dtypes, from CLI arguments and BIANQUE_* environment variables.

Chosen once by the caller (CLI or app) and passed down; nothing here touches the environment or
CUDA_VISIBLE_DEVICES. Precedence: a model-specific flag, then the general flag, then the
model-specific variable, then the general variable, then the default.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from .hub import V1_REPO, V2_REPO

DEFAULT_MAX_QUESTIONS = 8
# Recording is opt-in: --record alone or BIANQUE_RECORD=1 means this SQLite file in the working
# directory (the same default as bianque.records.DEFAULT_URL, kept here so settings stay light).
DEFAULT_RECORD_URL = "sqlite:///bianque-records.db"
# Replies one loaded model generates at once (the serving engine's slots; 0: one at a time, no
# engine). More wait in arrival order. Each slot's KV cache is allocated at load.
DEFAULT_MAX_BATCH = {"cpu": 4, "cuda": 8}
MAX_MAX_BATCH = 256
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


@dataclass(frozen=True)
class ModelSettings:
    model: str
    device: str
    dtype: str | None = None  # None: the per-model default for the device (see torch_dtype)
    quantize: int | None = None
    compile: bool = False  # v2 only: static KV cache + torch.compile'd decode step (CUDA graphs on CUDA)
    max_batch: int = 0  # concurrent replies on the serving engine; 0: one at a time (see DEFAULT_MAX_BATCH)


@dataclass(frozen=True)
class Settings:
    v1: ModelSettings
    v2: ModelSettings
    seed: int | None = None
    max_questions: int = DEFAULT_MAX_QUESTIONS
    server: str | None = None  # a running `python -m bianque serve` answers instead of local models
    api_key: str | None = field(default=None, repr=False)
    record: str | None = None  # a SQLAlchemy URL while consultations are recorded, else None


def add_settings_arguments(parser: argparse.ArgumentParser, remote: bool = True) -> None:
    """The flags shared by the CLI and the apps (all default to None: env/defaults fill in);
    ``remote`` adds --server/--api-key (`serve` itself takes its own --api-key)."""
    if remote:
        parser.add_argument("--server", help="URL of a running `python -m bianque serve` to answer instead of "
                                             "loading models here, e.g. http://127.0.0.1:8000")
        parser.add_argument("--api-key", help="the server's key (with --server)")
    parser.add_argument("--v1-model", help=f"BianQue-1.0 hub id or directory (default {V1_REPO})")
    parser.add_argument("--v2-model", help=f"BianQue-2.0 hub id or directory (default {V2_REPO})")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... for both models (default: cuda if available)")
    parser.add_argument("--v1-device")
    parser.add_argument("--v2-device", help="also a list cuda:0,cuda:1 or 'auto' to split BianQue-2")
    parser.add_argument("--dtype", help="float32, float16 or bfloat16 for both models")
    parser.add_argument("--v1-dtype")
    parser.add_argument("--v2-dtype")
    parser.add_argument("--quantize", type=int, choices=(4, 8), help="weight-only int4/int8 for BianQue-2")
    parser.add_argument("--max-batch", help="replies each model generates at once on the batching engine "
                                            "(default 4 on CPU, 8 on CUDA; 0: one at a time)")
    parser.add_argument("--v1-max-batch")
    parser.add_argument("--v2-max-batch")
    parser.add_argument("--v2-compile", action="store_true", default=None,
                        help="BianQue-2: static KV cache and a torch.compile'd decode step (CUDA graphs on CUDA)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--max-questions", type=int)


def add_record_argument(parser: argparse.ArgumentParser) -> None:
    """``--record [URL]``: record consultations (the apps; see bianque.records)."""
    parser.add_argument("--record", nargs="?", const=DEFAULT_RECORD_URL, metavar="URL",
                        help=f"record consultations in this SQLAlchemy database (alone: {DEFAULT_RECORD_URL})")


# Every environment variable the CLI and the apps read, for `--help` (new settings join here).
ENV_VARS = {
    "BIANQUE_V1_MODEL": "BianQue-1.0 hub id or directory (--v1-model)",
    "BIANQUE_V2_MODEL": "BianQue-2.0 hub id or directory (--v2-model)",
    "BIANQUE_DEVICE": "device for both models (--device)",
    "BIANQUE_V1_DEVICE": "device for BianQue-1.0 (--v1-device)",
    "BIANQUE_V2_DEVICE": "device(s) for BianQue-2.0 (--v2-device)",
    "BIANQUE_DTYPE": "dtype for both models (--dtype)",
    "BIANQUE_V1_DTYPE": "dtype for BianQue-1.0 (--v1-dtype)",
    "BIANQUE_V2_DTYPE": "dtype for BianQue-2.0 (--v2-dtype)",
    "BIANQUE_QUANTIZE": "4 or 8: weight-only int4/int8 BianQue-2.0 (--quantize)",
    "BIANQUE_MAX_BATCH": "replies each model generates at once; 0: one at a time (--max-batch)",
    "BIANQUE_V1_MAX_BATCH": "the same for BianQue-1.0 (--v1-max-batch)",
    "BIANQUE_V2_MAX_BATCH": "the same for BianQue-2.0 (--v2-max-batch)",
    "BIANQUE_V2_COMPILE": "1: compiled BianQue-2.0 decode step (--v2-compile)",
    "BIANQUE_SEED": "random seed (--seed)",
    "BIANQUE_MAX_QUESTIONS": "questions before the advice (--max-questions)",
    "BIANQUE_SERVER": "URL of a running `bianque serve` to answer instead of local models (--server)",
    "BIANQUE_API_KEY": "the server's API key (--api-key)",
    "BIANQUE_RECORD": f"1 or a database URL: record consultations (--record; 1 means {DEFAULT_RECORD_URL})",
}
# Read by huggingface_hub wherever a hub id is resolved or downloaded.
HUB_ENV_VARS = {
    "HF_HOME": "where the Hugging Face cache lives (default ~/.cache/huggingface)",
    "HF_HUB_OFFLINE": "1: never contact the hub, use the local cache only",
    "HF_ENDPOINT": "a hub mirror to download from",
}


def env_help(names: Sequence[str] | None = None) -> str:
    """An argparse epilog (use RawDescriptionHelpFormatter) listing the environment variables a
    command reads: by default every BIANQUE_* setting and the hub's variables."""
    known = {**ENV_VARS, **HUB_ENV_VARS}
    rows = [f"  {name:<24}{known[name]}" for name in (names or known)]
    return "environment variables (a flag wins over its variable):\n" + "\n".join(rows)


def settings_from_args(ns: argparse.Namespace, env: Mapping[str, str] | None = None,
                       max_batch: int | None = None) -> Settings:
    """Resolve every setting, then validate each one naming the flag or variable it came from,
    before any model is loaded. `max_batch`: the default when no flag or variable sets it (None:
    DEFAULT_MAX_BATCH for the device; the one-user CLI passes 1)."""
    env = os.environ if env is None else env

    def pick(*candidates: tuple[str, object]) -> tuple[object, str | None]:
        """The first set (value, knob) among flag/variable candidates, in precedence order."""
        return next(((v, k) for k, v in candidates if v not in (None, "")), (None, None))

    def flag(name: str) -> tuple[str, object]:
        return "--" + name.replace("_", "-"), getattr(ns, name)

    def var(name: str) -> tuple[str, object]:
        return name, env.get(name)

    def model(v: str, repo: str, quantize: int | None, compile: bool = False) -> ModelSettings:
        up = v.upper()
        device, device_knob = pick(flag(f"{v}_device"), flag("device"), var(f"BIANQUE_{up}_DEVICE"), var("BIANQUE_DEVICE"))
        dtype, dtype_knob = pick(flag(f"{v}_dtype"), flag("dtype"), var(f"BIANQUE_{up}_DTYPE"), var("BIANQUE_DTYPE"))
        check_device(device, device_knob)
        _check_dtype(dtype, dtype_knob)
        device = device or default_device()
        batch = _max_batch(*pick(flag(f"{v}_max_batch"), flag("max_batch"), var(f"BIANQUE_{up}_MAX_BATCH"),
                                 var("BIANQUE_MAX_BATCH")))
        return ModelSettings(
            model=pick(flag(f"{v}_model"), var(f"BIANQUE_{up}_MODEL"))[0] or repo,
            device=device, dtype=dtype, quantize=quantize, compile=compile,
            max_batch=batch if batch is not None else max_batch if max_batch is not None else default_max_batch(device),
        )

    quantize = _int(*pick(flag("quantize"), var("BIANQUE_QUANTIZE")))
    if quantize not in (None, 4, 8):
        raise ValueError(f"BIANQUE_QUANTIZE must be 4 or 8, got {quantize}; set it to 4, 8 or unset it")
    max_q = _int(*pick(flag("max_questions"), var("BIANQUE_MAX_QUESTIONS")))
    compile = ns.v2_compile or _flag(env.get("BIANQUE_V2_COMPILE"), "BIANQUE_V2_COMPILE")
    return Settings(
        v1=model("v1", V1_REPO, None),
        v2=model("v2", V2_REPO, quantize, compile),
        seed=_int(*pick(flag("seed"), var("BIANQUE_SEED"))),
        max_questions=DEFAULT_MAX_QUESTIONS if max_q is None else max_q,
        server=check_server(*pick(("--server", getattr(ns, "server", None)), var("BIANQUE_SERVER"))),
        api_key=pick(("--api-key", getattr(ns, "api_key", None)), var("BIANQUE_API_KEY"))[0],
        record=record_url(getattr(ns, "record", None), env.get("BIANQUE_RECORD")),
    )


def check_server(url: str | None, knob: str | None) -> str | None:
    if url is not None and not str(url).startswith(("http://", "https://")):
        raise ValueError(f"{knob}={url!r} is not a server URL: use http://HOST:PORT, e.g. http://127.0.0.1:8000")
    return url


def record_url(flag: str | None, variable: str | None) -> str | None:
    """The records database from ``--record [URL]`` or ``BIANQUE_RECORD`` (1/true/on: the default
    file; 0/false/off or unset: not recording); None when consultations are not recorded."""
    value = flag if flag not in (None, "") else (variable or "").strip()
    if not value or value.lower() in ("0", "false", "no", "off"):
        return None
    if value.lower() in ("1", "true", "yes", "on"):
        return DEFAULT_RECORD_URL
    if "://" not in value and ":///" not in value:
        raise ValueError(f"{'--record' if flag else 'BIANQUE_RECORD'}={value!r} is not a database URL: use 1 "
                         f"(for {DEFAULT_RECORD_URL}), sqlite:///path.db or postgresql://user@host/db")
    return value


def check_device(name: str | None, knob: str | None = None) -> None:
    """A device (list) torch understands and this machine has, else an error naming ``knob``."""
    if name in (None, "", "auto"):
        return
    where = f"{knob}={name!r}" if knob else f"device {name!r}"
    for part in str(name).split(","):
        try:
            device = torch.device(part.strip())
        except RuntimeError:
            raise ValueError(f"{where} is not a device: use cpu, cuda, cuda:1, a list cuda:0,cuda:1 or auto") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{where} asks for CUDA, but this machine has no usable CUDA (torch "
                             f"{torch.__version__}); set {knob or 'the device'} to cpu or unset it")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{where}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                             f"set {knob or 'the device'} to cuda:0 ... cuda:{torch.cuda.device_count() - 1}")


def parse_settings(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``argv`` (the arguments after ``--`` of ``streamlit run``) and ``env``."""
    parser = argparse.ArgumentParser(prog="bianque", add_help=False)
    add_settings_arguments(parser)
    add_record_argument(parser)
    ns, unknown = parser.parse_known_args(list(argv or []))
    if unknown:
        raise ValueError(f"unknown arguments: {' '.join(unknown)}")
    return settings_from_args(ns, env)


def _int(value: object, knob: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{knob} must be an integer, got {value!r}") from None


def _max_batch(value: object, knob: str | None) -> int | None:
    batch = _int(value, knob)
    if batch is not None and not 0 <= batch <= MAX_MAX_BATCH:
        raise ValueError(f"{knob} must be between 0 (one reply at a time) and {MAX_MAX_BATCH}, got {batch}")
    return batch


def default_max_batch(device: str) -> int:
    """DEFAULT_MAX_BATCH for the model's (first) device; a GPU list or "auto" means CUDA."""
    first = str(device).split(",")[0].strip()
    return DEFAULT_MAX_BATCH["cuda" if first == "auto" or torch.device(first).type == "cuda" else "cpu"]


def _flag(value: str | None, name: str) -> bool:
    """An on/off environment variable: 1/true/yes/on or 0/false/no/off (unset or empty: off)."""
    text = (value or "").strip().lower()
    if text in ("", "0", "false", "no", "off"):
        return False
    if text in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{name} must be 1 or 0 (true/false), got {value!r}")


def _check_dtype(name: str | None, knob: str | None = None) -> None:
    if name not in (None, "", "auto") and name.lower() not in DTYPES:
        where = f"{knob}={name!r}" if knob else f"dtype {name!r}"
        raise ValueError(f"{where} is not a dtype: use float32, float16 or bfloat16")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_device(name: str | None) -> torch.device:
    return torch.device(name or default_device())


def torch_dtype(name: str | None, device: str | torch.device, version: str) -> torch.dtype:
    """The compute dtype: as named, or the model's default for the device.

    v1 (T5, 0.8B): float32 on CPU, float16 on CUDA. v2 (GLM-6B): bfloat16 on CPU (float32 6B does
    not fit in 24 GB), float16 on CUDA.
    """
    if name not in (None, "", "auto"):
        _check_dtype(name)
        return DTYPES[name.lower()]
    first = str(device).split(",")[0]  # a multi-GPU list or "auto" means CUDA
    on_cuda = first == "auto" or torch.device(first).type == "cuda"
    if version == "v1":
        return torch.float16 if on_cuda else torch.float32
    if version == "v2":
        return torch.float16 if on_cuda else torch.bfloat16
    raise ValueError(f"version must be 'v1' or 'v2', got {version!r}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
