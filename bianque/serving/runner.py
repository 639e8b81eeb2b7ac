"""The contract between the model-agnostic engine and a model: slots in, float32 logits out."""
from __future__ import annotations

from typing import Protocol, Sequence

import torch


class Runner(Protocol):
    max_batch: int

    def prefill(self, slots: Sequence[int], prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Start requests in free slots from their prompt ids; float32 logits [len(slots), V] of each one's first new token."""

    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        """One step for running slots, feeding each its last chosen token; float32 logits [len(slots), V]."""

    def release(self, slot: int) -> None:
        """Forget a finished/cancelled slot's state so prefill can reuse it."""


# Of the memory free at load, the engine's KV cache may take this share; the rest is for a step's
# activations (and, on CPU, everything else the process still allocates).
KV_SHARE = 0.8


def free_memory(device: torch.device) -> int:
    """Bytes free on `device`: CUDA's own count, else the host's available memory (psutil)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def check_kv_memory(per_slot: dict[torch.device, int], max_batch: int, what: str, knob: str, extra_rows: int = 0) -> None:
    """Refuse, before allocating, a KV cache of `max_batch` slots (`per_slot` bytes on each device)
    that would take more than KV_SHARE of the free memory; the message names `knob` and what fits.
    `extra_rows`: cache rows allocated beyond the slots (a compiled runner's scratch row)."""
    from ..errors import ModelLoadError

    for device, nbytes in per_slot.items():
        free, need = free_memory(device), nbytes * (max_batch + extra_rows)
        if need > KV_SHARE * free:
            fits = max(0, int(KV_SHARE * free // max(nbytes, 1)) - extra_rows)
            gib = 2 ** 30
            raise ModelLoadError(
                f"{what}: the KV cache for {max_batch} concurrent replies needs {need / gib:.2f} GiB on {device} "
                f"({nbytes / gib:.3f} GiB per reply), but only {free / gib:.2f} GiB is free there (at most "
                f"{KV_SHARE:.0%} of it is used for the cache); set {knob} to {fits} or less "
                f"(0: one reply at a time, no cache up front)")
