"""`hpcmega bench --gpu`: one GPU, GPT-2 124M and 350M, bf16, compiled blocks, sequence 1024 -- tokens/s, MFU and
peak memory from the run's own ``metrics.jsonl`` (MFU against the card's bf16 peak, ``hpcmega.training.metrics``).

The goal (issue 11) is >= 45% MFU for gpt2-350m on an H100. Each model runs as a one-process local job on
``cuda:0``; the first ``warmup`` steps (compilation) are not counted. Nothing here runs without a CUDA device:
the command refuses before starting anything.
"""
from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

GPU_CASES = (("gpt2-124m", 16), ("gpt2-350m", 8))  # (preset, micro-batch) at seq 1024, one microbatch per step


def gpu_config(preset: str, micro_batch: int, steps: int):
    from hpcmega.config import load_config
    from hpcmega.cluster.launcher import local_config

    overrides = {"model.preset": preset, "train.seq_len": 1024, "train.micro_batch": micro_batch,
                 "train.global_batch": micro_batch, "train.precision": "bf16", "parallel.compile": True,
                 "train.steps": steps, "train.warmup_steps": 1, "logging.wandb": "disabled",
                 "checkpoint.resume": "none", "train.data": "synthetic"}  # throughput: no reads, nothing to prepare
    return local_config(load_config(None, overrides), 1, cpu=False)


def run_gpu_bench(steps: int = 10, warmup: int = 5, workdir: Path | None = None) -> list[dict[str, Any]]:
    import torch

    from hpcmega.bench.runner import run_job

    workdir = workdir or Path(tempfile.mkdtemp(prefix="hpcmega-bench-gpu-"))
    device = torch.cuda.get_device_name(0)
    rows = []
    for preset, micro_batch in GPU_CASES:
        records = run_job(gpu_config(preset, micro_batch, steps + warmup), 1, preset, workdir)[warmup:]
        rows.append({
            "name": preset, "device": device, "micro_batch": micro_batch, "seq_len": 1024, "steps": len(records),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
            "mfu": statistics.median(r["mfu"] for r in records) if "mfu" in records[0] else None,
            "peak_mem_gib": max(r["mem_peak_gib"] for r in records),
            "ms_median": statistics.median(r["step_time_s"] for r in records) * 1e3,
        })
    return rows
