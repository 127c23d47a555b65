"""Throughput and utilisation numbers, the per-step ``metrics.jsonl`` record, and the console line.

Pure Python (no torch) so the formulas are cheap to test and to use from the CLI.

Model FLOPs follow Megatron (Korthikanti et al. 2022, appendix A): per optimizer step, forward + backward of a GPT
with L layers, hidden h, sequence s, vocabulary V on B sequences costs 72 B L s h^2 (1 + s/(6h) + V/(12 h L)).
Recompute is not counted (that would be *hardware* FLOPs), so MFU compares layouts and recompute modes fairly.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TextIO

from hpcmega.runs.progress import duration

def peak_tflops(device_name: str | None, precision: str) -> float | None:
    """Dense bf16 peak of one device, or None when unknown (CPU, unlisted GPU): then MFU is not reported. fp32 runs
    report no MFU either: their peak depends on whether matmuls run as TF32, FP32 or emulated."""
    if precision != "bf16":
        return None
    from hpcmega.gpus import gpu_for_device_name

    gpu = gpu_for_device_name(device_name)
    return gpu.bf16_tflops if gpu else None


def step_record(
    *,
    step: int,
    loss: float,
    lr: float,
    grad_norm: float,
    tokens_per_step: int,
    step_time_s: float,
    flops_per_step: float,
    world_size: int,
    peak: float | None,
    mem_peak_gib: float,
    skipped_steps: int,
) -> dict[str, Any]:
    """One metrics.jsonl line. ``step`` counts completed optimizer steps (1 = after the first). ``tokens`` is the
    running total; ``model_tflops`` is achieved model TFLOP/s *per device*; ``mfu`` only when the peak is known;
    ``mem_peak_gib`` is the logging rank's peak memory so far (CUDA max allocated on GPU, max RSS on CPU);
    ``skipped_steps`` counts steps skipped for a non-finite loss or gradient norm since the job started."""
    tflops = flops_per_step / step_time_s / world_size / 1e12
    record: dict[str, Any] = {
        "step": step,
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens": step * tokens_per_step,
        "step_time_s": step_time_s,
        "tokens_per_s": tokens_per_step / step_time_s,
        "model_tflops": tflops,
        "mem_peak_gib": mem_peak_gib,
        "skipped_steps": skipped_steps,
    }
    if peak:
        record["mfu"] = tflops / peak
    return record


class MetricsWriter:
    """Appends one JSON object per line and flushes, so a killed job leaves a readable file (resume appends)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def format_line(record: dict[str, Any], total_steps: int) -> str:
    """A compact one-line summary with rich markup; plain and readable when stdout is not a terminal."""
    parts = [
        f"[bold]step {record['step']}/{total_steps}[/bold]",
        f"loss [cyan]{record['loss']:.4f}[/cyan]",
        *([f"val_loss [magenta]{record['val_loss']:.4f}[/magenta]"] if "val_loss" in record else []),
        f"lr {record['lr']:.2e}",
        f"gnorm {record['grad_norm']:.3f}",
        f"{_si(record['tokens_per_s'])} tok/s",
        f"{record['model_tflops']:.3g} TFLOP/s/dev",
    ]
    if "mfu" in record:
        parts.append(f"MFU [green]{100 * record['mfu']:.1f}%[/green]")
    parts.append(f"mem {record['mem_peak_gib']:.2f} GiB")
    if record.get("skipped_steps"):
        parts.append(f"[red]skipped {record['skipped_steps']}[/red]")
    parts.append(f"{record['step_time_s'] * 1000:.0f} ms")
    if "elapsed_s" in record:
        parts.append(f"elapsed {duration(record['elapsed_s'])} ETA {duration(record.get('eta_s'))}")
    return " | ".join(parts)


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


class ConsoleLogger:
    """Rank 0's console output through rich; no escape codes, wrapping or progress bars when not on a TTY."""

    def __init__(self, total_steps: int) -> None:
        from rich.console import Console

        self.console = Console(highlight=False, soft_wrap=True)
        self.total_steps = total_steps

    def step(self, record: dict[str, Any]) -> None:
        self.console.print(format_line(record, self.total_steps))

    def info(self, message: str) -> None:
        self.console.print(message)
