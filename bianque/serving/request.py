"""One request's state: its prompt, the doctor's choices (sampling, stop), its tokens and its stream."""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

DONE = object()  # end of a stream


@dataclass(eq=False)
class Request:
    prompt: list[int]
    choose: Callable[[torch.Tensor, list[int]], int]  # logits row [V], tokens so far -> next token
    is_stop: Callable[[int], bool]
    max_new_tokens: int
    generated: list[int] = field(default_factory=list)
    slot: int | None = None
    cancelled: bool = False
    finished: bool = False
    out: queue.Queue = field(default_factory=queue.Queue)  # token ids, then DONE or an exception
    started: threading.Event = field(default_factory=threading.Event)  # set once it holds a slot or is done

    def emit(self, token: int) -> None:
        self.out.put(token)

    def finish(self, error: BaseException | None = None) -> None:
        if not self.finished:
            self.finished = True
            self.out.put(DONE if error is None else error)
            self.started.set()
