"""Progress lines on stderr (human), JSON lines (--json), or nothing (--quiet)."""
from __future__ import annotations

import json
import sys
import time


class Progress:
    def __init__(self, mode: str = "human", stream=None):
        self.mode = mode  # human | json | quiet
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        self.stage = ""

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def start(self, stage: str, msg: str = "") -> None:
        self.stage = stage
        self.emit(msg or "started", event="stage")

    def __call__(self, msg: str) -> None:
        self.emit(msg)

    def emit(self, msg: str, event: str = "progress", **extra) -> None:
        if self.mode == "quiet":
            return
        if self.mode == "json":
            rec = {"event": event, "stage": self.stage, "message": msg, "elapsed_s": round(self.elapsed(), 2), **extra}
            print(json.dumps(rec), file=self.stream, flush=True)
        else:
            print(f"[{self.elapsed():7.1f}s] {self.stage:>10}: {msg}", file=self.stream, flush=True)
