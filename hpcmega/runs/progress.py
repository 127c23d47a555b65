"""Progress a person can read: elapsed time, ETA and sparklines, from step records. Pure Python: the training
loop's step line, `hpcmega ls/status` and `hpcmega plot` share these."""
from __future__ import annotations

import math
import time
from typing import Any

# ETA from the mean of the last this many step times: recent enough to follow a slowdown, smooth enough to read.
ETA_WINDOW = 20
_BARS = "▁▂▃▄▅▆▇█"


def eta_s(step_times: list[float], steps_left: int) -> float | None:
    recent = [t for t in step_times[-ETA_WINDOW:] if t > 0]
    return steps_left * sum(recent) / len(recent) if recent else None


def duration(seconds: float | None) -> str:
    """'4:05', '1:02:03'; '-' when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """Adds ``elapsed_s`` (wall time since this attempt's loop started) and ``eta_s`` to each step record."""

    def __init__(self, total_steps: int) -> None:
        self.total, self.start, self.times = total_steps, time.monotonic(), []

    def stamp(self, record: dict[str, Any]) -> dict[str, Any]:
        self.times.append(float(record.get("step_time_s", 0.0)))
        record["elapsed_s"] = time.monotonic() - self.start
        eta = eta_s(self.times, self.total - int(record["step"]))
        if eta is not None:
            record["eta_s"] = eta
        return record


def sparkline(values: list[float], width: int = 60) -> str:
    """The values (averaged into at most ``width`` buckets) as block characters, lowest to highest."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return ""
    if len(vals) > width:
        per = len(vals) / width
        vals = [sum(chunk) / len(chunk) for chunk in
                (vals[int(i * per):max(int((i + 1) * per), int(i * per) + 1)] for i in range(width))]
    low, high = min(vals), max(vals)
    span = high - low or 1.0
    return "".join(_BARS[min(len(_BARS) - 1, int((v - low) / span * len(_BARS)))] for v in vals)
