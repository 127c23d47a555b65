"""Rank 0's console output through a sink that can never stop training.

The launcher copies rank 0's output to the user's terminal. If that terminal is a pipe whose reader went away
(``hpcmega run ... | head -2``) a write raises BrokenPipeError; if the reader stops reading, the pipe fills and a
write blocks -- and with it the launcher's reader of rank 0's stdout, then rank 0's own prints, then every rank in
the next collective. So console lines go through a bounded queue drained by a separate thread: a full queue drops
lines (and says how many once the console drains again), and a failed write turns the console off. The rank's log
file in the run folder always gets every line.
"""
from __future__ import annotations

import os
import queue
import threading
from typing import IO

QUEUE_LINES = 10_000


class Console:
    def __init__(self, out: IO[str], max_lines: int = QUEUE_LINES) -> None:
        self.out, self.broken, self.dropped = out, False, 0
        self._queue: queue.Queue[str | None] = queue.Queue(max_lines)
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def write(self, text: str) -> None:
        """Never blocks and never raises."""
        if self.broken:
            return
        try:
            self._queue.put_nowait(text)
        except queue.Full:
            self.dropped += 1

    def _drain(self) -> None:
        while (text := self._queue.get()) is not None:
            if self.broken:
                continue
            try:
                if self.dropped:
                    self.out.write(f"[console: {self.dropped} line(s) dropped while it was not read; the rank logs "
                                   "have them]\n")
                    self.dropped = 0
                self.out.write(text)
                self.out.flush()
            except (OSError, ValueError):  # BrokenPipeError, a closed stream
                self._give_up()

    def _give_up(self) -> None:
        """Stop writing; point the file descriptor at /dev/null so the interpreter's exit flush cannot fail."""
        self.broken = True
        try:
            fd = os.open(os.devnull, os.O_WRONLY)
            os.dup2(fd, self.out.fileno())
            os.close(fd)
        except (OSError, ValueError, AttributeError):  # not a real file (a test's StringIO)
            pass

    def close(self, timeout: float = 5.0) -> None:
        """Flush what is queued (waiting at most ``timeout`` for a slow reader)."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)
