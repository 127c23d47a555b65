"""`hpcmega bench` machinery on its smallest selection: real runs, a ratio against the baseline it measured."""
from __future__ import annotations

import json

from conftest import run_cli


def test_bench_measures_a_ratio_against_its_own_baseline():
    r = run_cli(["bench", "--only", "tp=2 (DTensor", "--steps", "1", "--warmup", "1", "--json"], timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert set(rows) == {"single B=4", "tp=2 (DTensor TP+SP)"}  # the baseline is kept
    tp = rows["tp=2 (DTensor TP+SP)"]
    assert tp["procs"] == 2 and tp["goal"] == 0.66 and tp["ms_per_step"] > 0
    assert abs(tp["ratio"] - tp["ms_per_step"] / rows["single B=4"]["ms_per_step"]) < 1e-9
    assert rows["single B=4"]["ratio"] is None


def test_bench_rejects_an_unknown_selection():
    r = run_cli(["bench", "--only", "nothing-like-this"])
    assert r.returncode == 2 and "matches no case" in r.stderr
