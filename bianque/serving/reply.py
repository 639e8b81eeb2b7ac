"""A doctor's reply stream, served by the batching engine or one at a time, with its place in the queue.

`Reply` is what `T5Questioner.reply` and `GLMAdvisor.reply` return: iterate it for text pieces,
`close()` it to stop (an engine request leaves within one step; a queued one gives up its place),
and ask `ahead(timeout)` how many replies wait before it (None once it is being generated). Nothing
is queued until the first `next()` or `ahead()`, so a reply that is built and never read costs nothing.

Two lanes carry the tokens:
- `EngineLane`: a Request submitted to an Engine (continuous batching, `max_batch` > 0);
- `SoloLane`: `max_batch` 0; replies run one at a time in their callers' threads, in arrival order
  (`Turns`), as the apps' old per-model lock did, so the doctor stays safe to share between threads.
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Callable, Iterator, Protocol

from .engine import Engine, Stream
from .request import Request


class Lane(Protocol):
    def enter(self) -> None: """Join the queue (called once)."""
    def ahead(self, timeout: float | None) -> int | None: """Wait up to `timeout` s for a turn; None once it has one."""
    def tokens(self) -> Iterator[int]: """The token ids (waits for the turn first)."""
    def leave(self) -> None: """Give up the place or the turn (idempotent)."""


class Reply:
    """Text pieces of one reply; see the module docstring."""

    def __init__(self, lane: Lane, pieces: Callable[[Iterator[int]], Iterator[str]]):
        self._lane, self._pieces = lane, pieces
        self._entered, self._text = False, None

    def _enter(self) -> None:
        if not self._entered:
            self._entered = True
            self._lane.enter()

    def ahead(self, timeout: float | None = 0.0) -> int | None:
        """How many replies wait before this one after waiting up to `timeout` s for its turn;
        None once it is generating (or done)."""
        self._enter()
        return self._lane.ahead(timeout)

    def __iter__(self) -> "Reply":
        return self

    def __next__(self) -> str:
        if self._text is None:
            self._enter()
            self._text = self._pieces(self._lane.tokens())
        return next(self._text)

    def close(self) -> None:
        """Stop: safe from another thread while one is inside `next` (a server's worker thread
        reading the reply while its client disconnects); that `next` then ends the reply."""
        if self._entered:
            self._lane.leave()
        if self._text is not None:
            try:
                self._text.close()
            except ValueError:  # "generator already executing" in another thread: the lane stops it
                pass

    def __del__(self) -> None:  # an abandoned reply must not hold a slot or a turn
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class EngineLane:
    def __init__(self, engine: Engine, request: Request):
        self.engine, self.request = engine, request
        self.stream: Stream | None = None

    def enter(self) -> None:
        self.stream = self.engine.submit(self.request)

    def ahead(self, timeout: float | None) -> int | None:
        if self.request.started.wait(timeout):
            return None
        return self.stream.position()

    def tokens(self) -> Iterator[int]:
        return iter(self.stream)

    def leave(self) -> None:
        if self.stream is not None:
            self.stream.close()


class Turns:
    """One at a time, first come first served; a ticket may leave before its turn."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()
        self._holder: object | None = None

    def join(self, ticket: object) -> None:
        with self._cond:
            self._queue.append(ticket)

    def wait(self, ticket: object, timeout: float | None) -> bool:
        """Take the turn when it is `ticket`'s (True), or give up after `timeout` s (False)."""
        with self._cond:
            if self._holder is ticket:
                return True
            turn = lambda: self._holder is None and self._queue[0] is ticket  # noqa: E731
            if not self._cond.wait_for(lambda: ticket not in self._queue or turn(), timeout) or ticket not in self._queue:
                return False  # still waiting, or it left the queue meanwhile
            self._holder = self._queue.popleft()
            return True

    def ahead(self, ticket: object) -> int:
        with self._cond:
            return next((i for i, other in enumerate(self._queue) if other is ticket), 0)

    def leave(self, ticket: object) -> None:
        with self._cond:
            if self._holder is ticket:
                self._holder = None
            elif ticket in self._queue:
                self._queue.remove(ticket)
            self._cond.notify_all()


class SoloLane:
    """`generate()` runs in the caller's thread once it is this reply's turn; `leave()` from
    another thread stops it at the next token and the turn passes on when it has stopped."""

    def __init__(self, turns: Turns, generate: Callable[[], Iterator[int]]):
        self.turns, self.generate = turns, generate
        self.stopped = self.running = False

    def enter(self) -> None:
        self.turns.join(self)

    def ahead(self, timeout: float | None) -> int | None:
        return None if self.turns.wait(self, timeout) else self.turns.ahead(self)

    def tokens(self) -> Iterator[int]:
        if not self.turns.wait(self, None):  # it left (closed) before its turn came
            return
        self.running = True
        try:
            for token in self.generate():
                if self.stopped:
                    return
                yield token
        finally:
            self.running = False
            self.turns.leave(self)

    def leave(self) -> None:
        self.stopped = True
        if not self.running:
            self.turns.leave(self)
