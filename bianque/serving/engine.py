"""The loop: one thread owns the runner; each step admits newcomers (prefill) and advances the running batch (decode)."""
from __future__ import annotations

import atexit
import logging
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch

from .request import DONE, Request
from .runner import Runner
from .openmp import release_team, single_threaded
from .scheduler import Scheduler

log = logging.getLogger(__name__)

MAX_SAMPLING_THREADS = 4  # rows sampled at once after a step (at most torch's thread count)


class Stream:
    """A request's handle: iterate for token ids; close() cancels it within one step."""

    def __init__(self, engine: "Engine", request: Request):
        self._engine, self.request = engine, request

    def __iter__(self):
        try:
            while True:
                item = self.request.out.get()
                if item is DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # GeneratorExit included: the consumer went away
            self.close()

    def close(self) -> None:
        self._engine.cancel(self.request)

    def position(self) -> int:
        return self._engine.position(self.request)


class Engine:
    def __init__(self, runner: Runner):
        self.runner = runner
        self.scheduler = Scheduler(runner.max_batch)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._samplers: ThreadPoolExecutor | None = None

    def submit(self, request: Request) -> Stream:
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {request.max_new_tokens}")
        with self._cond:
            if self._closing:
                raise RuntimeError("the serving engine has been shut down")
            self.scheduler.add(request)
            if self._thread is None:  # started on first use: nothing runs at construction
                self._thread = threading.Thread(target=self._loop, name="bianque-engine", daemon=True)
                self._thread.start()
                # At exit, stop the loop before the interpreter does: a daemon thread killed inside a
                # torch call aborts the process ("terminate called without an active exception").
                atexit.register(_shutdown, weakref.ref(self))
            self._cond.notify()
        return Stream(self, request)

    def cancel(self, request: Request) -> None:
        with self._cond:
            request.cancelled = True
            if request.slot is None:  # still waiting: leave at once
                self.scheduler.retire(request)
                request.finish()
            self._cond.notify()

    def position(self, request: Request) -> int:
        with self._cond:
            return self.scheduler.position(request)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the loop after its current step; requests still waiting or running end with an error."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._samplers is not None:
            self._samplers.shutdown(wait=False)

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self.scheduler.idle() and not self._closing:
                    # Idle: hand this thread's OpenMP team back, so that another engine in this
                    # process (the CoQ app runs two) computes with the only team (serving/openmp.py).
                    release_team()
                while self.scheduler.idle() and not self._closing:
                    self._cond.wait()
                if self._closing:
                    for request in list(self.scheduler.running.values()) + list(self.scheduler.waiting):
                        self._retire(request, RuntimeError("the serving engine was shut down"))
                    return
            try:
                self.step()
            except Exception:  # a bug in the engine itself: fail everyone rather than hang them
                log.exception("engine step failed")
                with self._cond:
                    for request in list(self.scheduler.running.values()) + list(self.scheduler.waiting):
                        self._retire(request, RuntimeError("the serving engine failed; see the log"))

    def step(self) -> None:
        """Drop cancelled requests, prefill newcomers, decode the rest: one step boundary."""
        with self._cond:
            for request in list(self.scheduler.running.values()):
                if request.cancelled:
                    self._retire(request)
            running = list(self.scheduler.running.values())
            admitted = self.scheduler.admit()
        if admitted:
            self._prefill(admitted)
        if running:
            self._run(running, lambda: self.runner.decode([r.slot for r in running], [r.generated[-1] for r in running]))

    def _prefill(self, requests: Sequence[Request]) -> None:
        def prefill(batch):
            return lambda: self.runner.prefill([r.slot for r in batch], [r.prompt for r in batch])
        if len(requests) == 1 or not self._run(requests, prefill(requests), isolate=True):
            for request in requests:  # one bad prompt must not fail the others: retry one by one
                if not request.finished:
                    self._run([request], prefill([request]))

    def _run(self, requests: Sequence[Request], forward, isolate: bool = False) -> bool:
        """Run one forward and advance each request by its logits row; False if it raised and `isolate`."""
        try:
            logits = forward()
        except Exception as error:
            # A bad prompt, or newcomers too many for memory in one batched prefill: forget the
            # half-started batch; the caller retries each request alone (a solo prefill needs
            # no more memory than before batching).
            if isolate:
                for request in requests:
                    self.runner.release(request.slot)
                return False
            if isinstance(error, torch.OutOfMemoryError):
                log.warning("out of memory in a step of %d requests", len(requests))
            self._fail(requests, error)
            return True
        for request, choice in zip(requests, self._choose(requests, logits)):
            self._advance(request, choice)
        return True

    def _choose(self, requests: Sequence[Request], logits: torch.Tensor) -> list[int | BaseException]:
        """Each request's next token (or the exception its sampling raised). Sampling a row of a
        130k vocabulary costs ~2.5 ms on CPU (torch.multinomial draws one exponential per token),
        as much as a decode step for 8 rows: with several rows and torch threads to spare, the rows
        are sampled on a small pool (the heavy ops release the GIL). Each request draws from its
        own generator, so the pool changes no seeded result."""
        def one(pair: tuple[Request, torch.Tensor]) -> int | BaseException:
            request, row = pair
            try:
                return int(request.choose(row, request.generated))
            except Exception as error:  # noqa: BLE001 - handed to _advance, fails this request alone
                return error
        pairs = list(zip(requests, logits))
        workers = min(torch.get_num_threads(), MAX_SAMPLING_THREADS)
        if len(pairs) < 2 or workers < 2:
            return [one(pair) for pair in pairs]
        if self._samplers is None:
            self._samplers = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bianque-sampling",
                                                initializer=single_threaded)  # no OpenMP teams of their own
        return list(self._samplers.map(one, pairs))

    def _advance(self, request: Request, token: int | BaseException) -> None:
        if isinstance(token, BaseException):
            self._fail([request], token)
            return
        request.generated.append(token)
        if request.is_stop(token):
            self._locked_retire(request)
            return
        request.emit(token)
        if len(request.generated) >= request.max_new_tokens:
            self._locked_retire(request)

    def _fail(self, requests: Sequence[Request], error: BaseException) -> None:
        with self._cond:
            for request in requests:
                self._retire(request, error)

    def _locked_retire(self, request: Request) -> None:
        with self._cond:
            self._retire(request)

    def _retire(self, request: Request, error: BaseException | None = None) -> None:
        if self.scheduler.retire(request):
            self.runner.release(request.slot)
        request.finish(error)


def _shutdown(ref: "weakref.ref[Engine]") -> None:
    engine = ref()
    if engine is not None:
        engine.shutdown()
