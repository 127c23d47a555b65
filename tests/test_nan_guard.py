"""NaN/Inf guard: a step whose global loss or gradient norm is not finite is skipped on every rank (weights and
AdamW state untouched), counted in metrics.jsonl, and the run goes on; K such steps in a row stop it with an error
that names the fix. Real gloo ranks (dp=2); the batch is poisoned on one rank only, through a forward hook on the
token embedding, so the guard must act on the *global* values."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from engine_harness import spawn

from hpcmega.config import Config
from hpcmega.parallel.step_guard import NonFiniteStepsError, StepGuard


# -- the decision, pure ---------------------------------------------------------------------------------------------
def test_guard_counts_skips_and_stops_at_k_in_a_row():
    guard = StepGuard(max_consecutive=3)
    assert guard.check(1, 2.0, 1.0)
    assert not guard.check(2, math.nan, 1.0) and not guard.check(3, 2.0, math.inf)
    assert guard.check(4, 2.0, 1.0)  # a good step resets the run of skips, not the total
    assert (guard.skipped_steps, guard.consecutive) == (2, 0)
    assert not guard.check(5, math.nan, math.nan) and not guard.check(6, -math.inf, 1.0)
    with pytest.raises(NonFiniteStepsError, match=r"3 consecutive steps up to step 7 .* after step 4\b.*"
                                                  r"--max-consecutive-skips"):
        guard.check(7, math.nan, 1.0)


# -- a real run ---------------------------------------------------------------------------------------------------
def _cfg(max_skips: int, data_parallel: str = "fsdp") -> Config:
    cfg = Config()
    cfg.parallel.data_parallel = data_parallel
    m, t = cfg.model, cfg.train
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.max_seq_len = 128, 32, 2, 2, 32
    t.steps, t.global_batch, t.micro_batch, t.seq_len, t.max_consecutive_skips = 5, 4, 2, 16, max_skips
    cfg.logging.log_every = 5
    return cfg


def _local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if hasattr(t, "to_local") else t).detach().clone()


def _train_with_poison(max_skips: int, poison_steps: tuple[int, ...], run_dir: str, data_parallel: str) -> dict:
    """On every rank: train 5 steps; rank 1 turns its embeddings to NaN during the given (0-based) steps. Returns
    this rank's weights and AdamW state after each step (local shards), the records, or the error."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from hpcmega.training.train import Trainer

    mesh = init_device_mesh("cpu", (1, 2, 1), mesh_dim_names=("pp", "dp", "tp"))
    trainer = Trainer(_cfg(max_skips, data_parallel), mesh, run_dir)
    if dist.get_rank() == 1:
        def poison(_module, _inputs, output):
            return output * math.nan if trainer.step in poison_steps else None

        trainer.model_parts[0].tok_emb.register_forward_hook(poison)
    snapshots: list[dict] = []

    def snapshot(t: Trainer, record: dict) -> None:
        params = dict(t.model.named_parameters())
        state = t.optimizers[0].state
        snapshots.append({
            "record": record,
            "weights": {n: _local(p) for n, p in params.items()},
            "exp_avg": {n: _local(state[p]["exp_avg"]) for n, p in params.items() if p in state},
        })

    trainer.step_end_hooks.append(snapshot)
    try:
        trainer.fit()
        error = None
    except NonFiniteStepsError as e:
        error = str(e)
    return {"snapshots": snapshots, "error": error}


def _train_twice_with_a_huge_lr(run_dir: str) -> dict:
    """lr 1e30: step 1 throws the weights to ~1e30, so every later step's loss overflows and is skipped. Train 3
    steps (saved at the end), then resume the same run folder to 6 steps; the records of both and the errors."""
    from torch.distributed.device_mesh import init_device_mesh

    from hpcmega.runs.files import RunFolder
    from hpcmega.training.train import train

    errors = []
    for steps in (3, 6):
        cfg = _cfg(max_skips=4)
        cfg.train.steps, cfg.train.lr, cfg.train.min_lr = steps, 1e30, 1e30
        mesh = init_device_mesh("cpu", (1, 2, 1), mesh_dim_names=("pp", "dp", "tp"))
        try:
            train(cfg, mesh, run_dir)
        except NonFiniteStepsError as e:
            errors.append(str(e))
    return {"records": list(RunFolder(run_dir).steps()), "errors": errors}


def _all_cases(root: str) -> dict[str, dict]:
    """Every case of this module, one after the other in one 2-rank process group (one start-up for all)."""
    import torch.distributed as dist

    out = {}
    cases = {"one": (3, (2,), "fsdp"), "one-replicate": (3, (2,), "replicate"),
             "in_a_row": (2, (1, 2, 3, 4), "fsdp")}
    for name, (max_skips, poison_steps, data_parallel) in cases.items():
        out[name] = _train_with_poison(max_skips, poison_steps, f"{root}/{name}", data_parallel)
        dist.barrier()
    out["resume"] = _train_twice_with_a_huge_lr(f"{root}/resume")
    return out


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("nan_guard")
    return root, spawn(2, _all_cases, str(root))


@pytest.mark.parametrize("case", ["one", "one-replicate"])  # FSDP2 shards; DDP replicas (plain tensors)
def test_a_poisoned_batch_is_skipped_and_the_run_continues(cases, case):
    root, ranks = cases  # max 3 skips in a row; the third step poisoned
    for rank in (r[case] for r in ranks):
        assert rank["error"] is None
        snaps = rank["snapshots"]
        assert [s["record"]["skipped_steps"] for s in snaps] == [0, 0, 1, 1, 1]
        assert not math.isfinite(snaps[2]["record"]["loss"])  # the global loss: NaN on rank 1 reached rank 0
        before, skipped, after = snaps[1], snaps[2], snaps[3]
        for name, w in before["weights"].items():
            assert torch.equal(skipped["weights"][name], w), f"{name} changed in a skipped step"
            assert torch.isfinite(after["weights"][name]).all(), name
        for name, m in before["exp_avg"].items():
            assert torch.equal(skipped["exp_avg"][name], m), f"Adam state of {name} changed in a skipped step"
        assert any(not torch.equal(after["weights"][n], w) for n, w in before["weights"].items())  # training goes on
        assert all(math.isfinite(s["record"]["loss"]) for s in snaps[3:])
    records = [json.loads(line) for line in (root / case / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1]
    assert all(r["mem_peak_gib"] > 0 for r in records)  # peak memory in every record (max RSS on CPU)


def test_k_poisoned_steps_in_a_row_stop_the_run_on_every_rank(cases):
    root, ranks = cases  # max 2 skips in a row; steps 2-5 poisoned
    for rank in (r["in_a_row"] for r in ranks):
        assert rank["error"] is not None and "2 consecutive steps up to step 3" in rank["error"]
        assert "--max-consecutive-skips" in rank["error"]
        assert [s["record"]["skipped_steps"] for s in rank["snapshots"]] == [0, 1]  # step 3 raised, no record
    assert len((root / "in_a_row" / "metrics.jsonl").read_text().splitlines()) == 2


def test_skipped_steps_and_the_run_of_skips_survive_a_resume(cases):
    """Steps 2-3 are skipped before the checkpoint of step 3; the resumed run counts on (3 at step 4) and stops at
    the 4th skip in a row (step 5) -- before, a resume restarted both counts at zero and the run went on."""
    for result in (r["resume"] for r in cases[1]):
        assert [(r["step"], r["skipped_steps"]) for r in result["records"]] == [(1, 0), (2, 1), (3, 2), (4, 3)]
        assert len(result["errors"]) == 1 and "4 consecutive steps up to step 5" in result["errors"][0], result
