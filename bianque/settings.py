"""Model locations, devices and dtypes, from CLI arguments and BIANQUE_* environment variables.

Chosen once by the caller (CLI or app) and passed down; nothing here touches the environment or
CUDA_VISIBLE_DEVICES. Precedence: a model-specific flag, then the general flag, then the
model-specific variable, then the general variable, then the default.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from .hub import V1_REPO, V2_REPO

DEFAULT_MAX_QUESTIONS = 8
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


@dataclass(frozen=True)
class Settings:
    v1: ModelSettings
    v2: ModelSettings
    seed: int | None = None
    max_questions: int = DEFAULT_MAX_QUESTIONS


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags shared by the CLI and the apps (all default to None: env/defaults fill in)."""
    parser.add_argument("--v1-model", help=f"BianQue-1.0 hub id or directory (default {V1_REPO})")
    parser.add_argument("--v2-model", help=f"BianQue-2.0 hub id or directory (default {V2_REPO})")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... for both models (default: cuda if available)")
    parser.add_argument("--v1-device")
    parser.add_argument("--v2-device", help="also a list cuda:0,cuda:1 or 'auto' to split BianQue-2")
    parser.add_argument("--dtype", help="float32, float16 or bfloat16 for both models")
    parser.add_argument("--v1-dtype")
    parser.add_argument("--v2-dtype")
    parser.add_argument("--quantize", type=int, choices=(4, 8), help="weight-only int4/int8 for BianQue-2")
    parser.add_argument("--v2-compile", action="store_true", default=None,
                        help="BianQue-2: static KV cache and a torch.compile'd decode step (CUDA graphs on CUDA)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--max-questions", type=int)


def settings_from_args(ns: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env

    def pick(*candidates: str | None) -> str | None:
        return next((c for c in candidates if c not in (None, "")), None)

    def model(v: str, repo: str, quantize: int | None, compile: bool = False) -> ModelSettings:
        up = v.upper()
        return ModelSettings(
            model=pick(getattr(ns, f"{v}_model"), env.get(f"BIANQUE_{up}_MODEL")) or repo,
            device=pick(getattr(ns, f"{v}_device"), ns.device, env.get(f"BIANQUE_{up}_DEVICE"),
                        env.get("BIANQUE_DEVICE")) or default_device(),
            dtype=pick(getattr(ns, f"{v}_dtype"), ns.dtype, env.get(f"BIANQUE_{up}_DTYPE"), env.get("BIANQUE_DTYPE")),
            quantize=quantize,
            compile=compile,
        )

    quantize = _int(pick(ns.quantize, env.get("BIANQUE_QUANTIZE")), "quantize")
    if quantize not in (None, 4, 8):
        raise ValueError(f"quantize must be 4 or 8, got {quantize}")
    max_q = _int(pick(ns.max_questions, env.get("BIANQUE_MAX_QUESTIONS")), "max-questions")
    for s in (ns.dtype, ns.v1_dtype, ns.v2_dtype, env.get("BIANQUE_DTYPE")):
        _check_dtype(s)
    return Settings(
        v1=model("v1", V1_REPO, None),
        v2=model("v2", V2_REPO, quantize, ns.v2_compile or _flag(env.get("BIANQUE_V2_COMPILE"), "BIANQUE_V2_COMPILE")),
        seed=_int(pick(ns.seed, env.get("BIANQUE_SEED")), "seed"),
        max_questions=DEFAULT_MAX_QUESTIONS if max_q is None else max_q,
    )


def parse_settings(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``argv`` (the arguments after ``--`` of ``streamlit run``) and ``env``."""
    parser = argparse.ArgumentParser(prog="bianque", add_help=False)
    add_settings_arguments(parser)
    ns, unknown = parser.parse_known_args(list(argv or []))
    if unknown:
        raise ValueError(f"unknown arguments: {' '.join(unknown)}")
    return settings_from_args(ns, env)


def _int(value: object, name: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _flag(value: str | None, name: str) -> bool:
    """An on/off environment variable: 1/true/yes/on or 0/false/no/off (unset or empty: off)."""
    text = (value or "").strip().lower()
    if text in ("", "0", "false", "no", "off"):
        return False
    if text in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{name} must be 1 or 0 (true/false), got {value!r}")


def _check_dtype(name: str | None) -> None:
    if name not in (None, "", "auto") and name.lower() not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use float32, float16 or bfloat16")


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
