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
