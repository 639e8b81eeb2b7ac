"""Where checkpoints come from: a local directory, the local Hugging Face cache, or the hub."""
from __future__ import annotations

import logging
import re
from pathlib import Path

from .errors import ModelLoadError

log = logging.getLogger(__name__)

V1_REPO = "scutcyr/BianQue-1.0"
V2_REPO = "scutcyr/BianQue-2"
# Remote code (*.py) is never fetched: the project runs the checkpoints with its own code.
ALLOW_PATTERNS = ["*.json", "*.model", "*.safetensors", "*.bin", "*.txt", "*.md"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_repo_id(name: str) -> bool:
    return bool(_REPO_ID.match(name)) and not name.startswith((".", "/", "~"))


def resolve_checkpoint(name_or_path: str, knob: str) -> Path:
    """A local directory as is; else the offline HF cache; else a download from the hub.

    ``knob`` names what the user set to choose this checkpoint (a flag, a variable or both, e.g.
    "--v1-model / BIANQUE_V1_MODEL"): every error tells them to change exactly that.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelLoadError(_message(name_or_path, f"{path} is a file, not a checkpoint directory", knob))
    if not looks_like_repo_id(name_or_path) or _meant_as_local_path(path):
        raise ModelLoadError(_message(name_or_path, f"no such directory {path.absolute()}", knob))
    try:
        return Path(_snapshot(name_or_path, local_files_only=True))
    except Exception:  # not in the cache: fall through to the hub
        pass
    try:
        log.info("downloading %s from the hub", name_or_path)
        return Path(_snapshot(name_or_path, local_files_only=False))
    except Exception as exc:  # no network, unknown repo, disk full, ...
        reason = f"not a local directory, not in the local cache, and the hub failed ({_first_line(exc)})"
        raise ModelLoadError(_message(name_or_path, reason, knob)) from exc


def _meant_as_local_path(path: Path) -> bool:
    """`models/BianQue-2` is shaped like a hub id, but when ./models exists it is a mistyped local path."""
    return path.parent != Path(".") and path.parent.is_dir()


def _message(name: str, reason: str, knob: str) -> str:
    return (
        f"could not load {name}: {reason}; set {knob} to a checkpoint directory or a hub id "
        "(`python -m bianque download` fetches the default ones)"
    )


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _snapshot(repo_id: str, local_files_only: bool, local_dir: Path | None = None) -> str:
    from huggingface_hub import snapshot_download  # imported lazily: no hub code at import time

    return snapshot_download(
        repo_id,
        local_files_only=local_files_only,
        local_dir=local_dir,
        allow_patterns=ALLOW_PATTERNS,
        etag_timeout=10,
    )


def download(repo_id: str, to: Path | None = None) -> Path:
    """Fetch one checkpoint (with huggingface_hub's progress bars) for later offline use."""
    local_dir = None if to is None else Path(to) / repo_id.split("/")[-1]
    try:
        return Path(_snapshot(repo_id, local_files_only=False, local_dir=local_dir))
    except Exception as exc:
        raise ModelLoadError(
            f"could not download {repo_id}: {_first_line(exc)}. "
            "Check the network connection (or HF_ENDPOINT / HF_HUB_OFFLINE) and try again"
        ) from exc
