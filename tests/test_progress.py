"""Elapsed/ETA, sparklines and shell completion: pure pieces, checked directly."""
from __future__ import annotations

import subprocess

from conftest import CLI_ENV, hpcmega_exe

from hpcmega.runs.progress import Progress, duration, eta_s, sparkline


def test_eta_uses_the_recent_step_times_and_duration_reads_well():
    assert eta_s([1.0] * 30 + [2.0] * 20, steps_left=10) == 20.0  # only the last 20 steps count
    assert eta_s([], 5) is None
    assert [duration(s) for s in (None, 5, 65, 3725)] == ["-", "0:05", "1:05", "1:02:05"]
    p = Progress(total_steps=4)
    rec = p.stamp({"step": 1, "step_time_s": 0.5})
    assert rec["eta_s"] == 1.5 and rec["elapsed_s"] >= 0


def test_sparkline_spans_lowest_to_highest_and_fits_the_width():
    assert sparkline([3, 2, 1, 0]) == "█▆▃▁"
    assert len(sparkline(list(range(1000)), width=50)) == 50
    assert sparkline([1.0, 1.0]) == "▁▁" and sparkline([]) == ""


def test_shell_completion_completes_commands_without_heavy_imports():
    env = {**CLI_ENV, "_HPCMEGA_COMPLETE": "bash_complete", "COMP_WORDS": "hpcmega st", "COMP_CWORD": "1"}
    out = subprocess.run([hpcmega_exe()], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "plain,status" in out.stdout.split(), out.stdout + out.stderr
    env.update(COMP_WORDS="hpcmega submit --wandb-g", COMP_CWORD="2")
    out = subprocess.run([hpcmega_exe()], env=env, capture_output=True, text=True, timeout=60)
    assert "plain,--wandb-group" in out.stdout.split(), out.stdout
