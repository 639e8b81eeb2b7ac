"""Who runs: a FIFO waiting queue and at most max_batch running slots."""
from __future__ import annotations

from collections import deque

from .request import Request


class Scheduler:
    def __init__(self, max_batch: int):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.max_batch = max_batch
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}
        self.free = list(range(max_batch - 1, -1, -1))  # pop() hands out slot 0 first

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def admit(self) -> list[Request]:
        """Move waiting requests (arrival order) into free slots; the newly admitted ones."""
        admitted = []
        while self.waiting and self.free:
            request = self.waiting.popleft()
            request.slot = self.free.pop()
            self.running[request.slot] = request
            request.started.set()
            admitted.append(request)
        return admitted

    def retire(self, request: Request) -> bool:
        """Take a request out (running or waiting); True when it held a slot that must be released."""
        if request.slot is not None and self.running.get(request.slot) is request:
            del self.running[request.slot]
            self.free.append(request.slot)
            return True
        if request in self.waiting:
            self.waiting.remove(request)
        return False

    def position(self, request: Request) -> int:
        """How many requests wait ahead of this one (0 once running or done)."""
        for i, other in enumerate(self.waiting):
            if other is request:
                return i
        return 0

    def idle(self) -> bool:
        return not self.waiting and not self.running
