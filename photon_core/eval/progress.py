"""A line on stderr as an evaluation goes: a run of thousands of questions on an official model takes
hours, and one that says nothing cannot be told from one that hangs."""
from __future__ import annotations

import sys
import time


class Progress:
    """``done(questions)`` after each scan of this process's shard: a line after the first scan, then
    at most every ``every`` seconds, and after the last ("rank R: " in front under torchrun)."""

    def __init__(self, scans: int, rank: int = 0, world: int = 1, every: float = 30.0, stream=None):
        self.total = len(range(rank, scans, world))         # this shard's scans
        self.prefix = f"rank {rank}: " if world > 1 else ""
        self.every, self.stream = every, stream
        self.start = self.last = time.monotonic()
        self.scans = self.questions = 0

    def done(self, questions: int) -> None:
        self.scans += 1
        self.questions += questions
        now = time.monotonic()
        if self.scans == 1 or self.scans == self.total or now - self.last >= self.every:
            self.last = now
            print(f"{self.prefix}{self.scans} of {self.total} scans evaluated ({self.questions} questions), "
                  f"{now - self.start:.0f} s", file=self.stream or sys.stderr, flush=True)
