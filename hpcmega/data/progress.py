"""Progress of a long prepare: a bar redrawn in place on a terminal, a plain line every ``every_s`` in a log.

It counts what finished pieces report (documents, tokens, input bytes), so the rate is the whole pool's.
"""
from __future__ import annotations

import sys
import time


def _fmt(n: float) -> str:
    for unit in ("", "k", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}P"


class Progress:
    def __init__(self, total_bytes: int, enabled: bool = True, done_bytes: int = 0, label: str = "tokenizing",
                 stream=None, every_s: float = 10.0) -> None:
        self.total, self.base, self.label = max(1, total_bytes), done_bytes, label
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and getattr(self.stream, "isatty", lambda: False)()
        self.every_s = 0.2 if self.tty else every_s
        self.docs = self.tokens = self.bytes = 0
        self.start = self.last = time.monotonic()

    def update(self, stats: dict) -> None:
        self.docs += stats["documents"]
        self.tokens += stats["tokens"]
        self.bytes += stats["bytes"]
        now = time.monotonic()
        if self.enabled and now - self.last >= self.every_s:
            self.last = now
            self._show(now)

    def line(self, now: float | None = None) -> str:
        elapsed = max(1e-9, (now or time.monotonic()) - self.start)
        rate = self.bytes / elapsed
        done = self.base + self.bytes
        eta = (self.total - done) / rate if rate else float("inf")
        frac = min(1.0, done / self.total)
        bar = "#" * int(frac * 24) + "." * (24 - int(frac * 24))
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta != float("inf") else "--:--:--"
        return (f"{self.label} [{bar}] {frac:4.0%}  {_fmt(self.docs)} docs  {_fmt(self.tokens)} tokens  "
                f"{rate / 1e6:.1f} MB/s  ETA {eta_s}")

    def _show(self, now: float) -> None:
        if self.tty:
            self.stream.write("\r" + self.line(now))
        else:
            self.stream.write(self.line(now) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.bytes:
            self._show(time.monotonic())
            if self.tty:
                self.stream.write("\n")
            self.stream.flush()
