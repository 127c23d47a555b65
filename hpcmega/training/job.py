"""The per-rank entry point, the same for a SLURM task (submitit calls ``run_rank``; one task per GPU, no torchrun)
and a local rank (``hpcmega run`` starts ``python -m hpcmega.training.job``).

Steps on every rank: read the rank environment -> init torch.distributed -> gather where every rank really runs
-> compute the layout from that placement -> build the ("pp", "dp", "tp") DeviceMesh -> rank 0 writes the run
folder's ``config.toml`` and ``layout.json`` -> a collectives self-test on every group -> training.

The layout comes from the real placement, not from rank arithmetic: SLURM may place tasks cyclically or unevenly,
and the groups must follow where ranks are (TP inside a node / NVLink domain). Any refusal is raised on every rank
from the same gathered data, so all ranks fail together with the same message instead of some of them hanging.
"""
from __future__ import annotations

import argparse
import atexit
import datetime
import faulthandler
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from hpcmega.config import Config, load_config
from hpcmega.errors import ConfigError
from hpcmega.cluster.distenv import DistEnv, flight_recorder_env, from_environment
from hpcmega.cluster.launcher import free_port
from hpcmega.planning.dims import ParallelDims
from hpcmega.planning.layout import layout_of, natural_key, planned_layout
from hpcmega.parallel.timeouts import CollectiveTimeouts
from hpcmega.runs.files import CONFIG, DEBUG, LAYOUT, LOCAL_JOB_ENV, RunFolder, attempt_marker, job_key
from hpcmega.runs.lock import acquire
from hpcmega.training.hang_evidence import HangEvidence



def _say(env: DistEnv, msg: str, all_ranks: bool = False) -> None:
    if all_ranks or env.rank == 0:
        print(f"[rank {env.rank} {env.node}] {msg}", flush=True)


def _as_config(cfg: Config | dict[str, Any]) -> Config:
    if isinstance(cfg, Config):
        return cfg
    if isinstance(cfg, dict):
        return Config.from_dict(cfg)
    raise TypeError(f"run_rank needs a Config or a dict, got {type(cfg).__name__}")


def _select_device(cfg: Config, env: DistEnv):
    """-> (device_type, backend, torch.device). One task per GPU: the local rank picks the GPU."""
    import torch

    if cfg.cluster.cpu:
        return "cpu", "gloo", torch.device("cpu")
    if not torch.cuda.is_available():  # never fall back to CPU: a GPU job on CPU is a wrong, silent 100x slowdown
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise ConfigError(
            f"{env.node}: rank {env.rank} of a GPU job sees no CUDA device (CUDA_VISIBLE_DEVICES="
            f"{visible if visible is not None else 'unset'}); check that the partition's nodes have GPUs and a "
            "working driver, or submit with --cpu"
        )
    count = torch.cuda.device_count()
    if count >= env.local_world_size:
        index = env.local_rank  # every task sees all of the node's GPUs
    elif count == 1:
        index = 0  # the site binds one GPU per task (--gpus-per-task=1 / --gpu-bind)
    else:
        raise ConfigError(
            f"{env.node}: {env.local_world_size} tasks on this node but {count} visible GPUs; "
            "use --gpus-per-node equal to the node's GPU count (one task per GPU)"
        )
    torch.cuda.set_device(index)
    # fp32 matmuls (master-weight math, fp32 runs) on tensor cores as TF32, as Megatron does; bf16 is unaffected.
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    return "cuda", "nccl", torch.device("cuda", index)


def gather_placement(env: DistEnv) -> list[Any]:
    """Every rank's (node, local rank), indexed by global rank."""
    import torch.distributed as dist

    from hpcmega.planning.layout import RankPlacement

    gathered: list[Any] = [None] * env.world_size
    dist.all_gather_object(gathered, (env.node, env.local_rank))
    return [RankPlacement(str(node), int(local)) for node, local in gathered]


def collectives_self_test(mesh, layout, rank: int, device) -> dict[str, Any]:
    """All-reduce (rank + 1) over each of this rank's tp/pp/dp groups and the world; check the sums.

    Catches a mesh whose groups disagree with the layout (or a broken fabric) before the model is built, with a
    message that names the group instead of a wrong loss later.
    """
    import torch
    import torch.distributed as dist

    report: dict[str, Any] = {}
    for dim in ("tp", "pp", "dp"):
        group = mesh[dim].get_group()
        members = sorted(dist.get_process_group_ranks(group))
        expected_members = next(sorted(g) for g in getattr(layout, f"{dim}_groups") if rank in g)
        if members != expected_members:
            raise RuntimeError(f"rank {rank}: mesh {dim} group {members} != layout {dim} group {expected_members}")
        t = torch.tensor([float(rank + 1)], device=device)
        dist.all_reduce(t, group=group)
        want = float(sum(r + 1 for r in members))
        if t.item() != want:
            raise RuntimeError(f"rank {rank}: all-reduce over {dim} group {members} gave {t.item()}, expected {want}")
        report[dim] = {"ranks": members, "sum": t.item()}
    t = torch.tensor([float(rank + 1)], device=device)
    dist.all_reduce(t)
    world = dist.get_world_size()
    if t.item() != world * (world + 1) / 2:
        raise RuntimeError(f"rank {rank}: world all-reduce gave {t.item()}, expected {world * (world + 1) / 2}")
    report["world_sum"] = t.item()
    return report


class TrainingUnfinished(RuntimeError):
    """The job stopped before its last step (a stop signal; no requeue left). Exit status EXIT_UNFINISHED."""


def _stop_for_requeue(cfg: Config, env: DistEnv, train: dict[str, Any], signum: int | None) -> None:
    """After the agreed save: rank 0 requeues the job (USR2, within cluster.max_requeues); every rank then waits for
    SLURM to end this attempt, so no attempt is reported as finished while its requeue is under way. Without a
    requeue (local run, SIGTERM, budget spent) the attempt ends with TrainingUnfinished, never as a success."""
    import signal

    import torch.distributed as dist

    from hpcmega.training.preemption import decide_requeue, requeue
    from hpcmega.runs.files import slurm_job_id

    job_id = slurm_job_id() if env.job_id else None
    requeues = env.restart_count - (RunFolder(cfg.run_dir).crash_restarts(job_id) if job_id else 0)  # not crashes
    decision = decide_requeue(job_id, requeues, cfg.cluster.max_requeues if cfg.cluster.requeue else 0,
                              signum or signal.SIGUSR2)
    _say(env, f"stop signal: checkpoint saved; {decision.reason}")
    if env.rank == 0:  # the job's wrapper must not mistake the end of this attempt for a crash to restart
        RunFolder(cfg.run_dir).record_event("stop", {"job_id": job_key(), "restart_count": env.restart_count,
                                                     "signal": signal.Signals(signum or signal.SIGUSR2).name,
                                                     "step": train.get("final_step")})
    if not (decision.requeue or decision.slurm_ends):
        raise TrainingUnfinished(
            f"stopped at step {train.get('final_step')} of {cfg.train.steps} ({decision.reason}); run the same "
            "command again to continue from the last checkpoint")
    if env.rank == 0 and decision.requeue:
        requeue(job_id)
    dist.barrier()
    time.sleep(600)  # SLURM stops the tasks of a requeued / preempted job; waking up here means it did not
    raise TrainingUnfinished(f"job {job_id}: {decision.reason}, but SLURM did not end this attempt within 600 s")


def failure_line(error: BaseException) -> str | None:
    """One line for a failure the user can act on -- storage (disk full, read-only, quota, I/O), a damaged
    checkpoint, too many non-finite steps -- found in ``error``, its causes, or DCP's per-rank failures; None for
    anything else (a bug: its traceback is what helps)."""
    from hpcmega.parallel.step_guard import NonFiniteStepsError
    from hpcmega.checkpoint.store import CheckpointDamaged

    pending, seen = [error], []
    while pending:
        e = pending.pop(0)
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        if isinstance(e, (OSError, NonFiniteStepsError, CheckpointDamaged)):
            return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint's CheckpointException: rank -> error
        if isinstance(failures, dict):
            pending += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        pending += [e.__cause__, e.__context__]
    return None


def exit_now(code: int) -> NoReturn:
    """End this rank process without interpreter finalization. torch leaves gloo's C++ threads (and the TCPStore's)
    running after destroy_process_group; finalizing the interpreter and running C++ static destructors around live
    native threads is the usual cause of aborts after a finished run (``terminate called without an active
    exception``, heap corruption at exit)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def run_rank(cfg: Config | dict[str, Any], run_dir: str) -> dict[str, Any]:
    """Run this rank's part of the job; returns a summary (and the training result when training ran). Under
    SLURM (submitit calls this) a failure the user can act on ends the task with one line instead of a traceback;
    a finished task skips interpreter finalization (see exit_now)."""
    slurm_task = bool(os.environ.get("SLURM_JOB_ID")) and not os.environ.get(LOCAL_JOB_ENV)  # not `hpcmega run`
    try:
        result = _run_rank(cfg, run_dir)
    except BaseException as e:  # DCP's CheckpointException is a BaseException; failure_line passes on the rest
        line = failure_line(e)
        if line is None or not slurm_task:
            raise
        print(f"[rank {os.environ.get('SLURM_PROCID', '?')}] error: {line}", file=sys.stderr, flush=True)
        exit_now(1)
    if slurm_task:
        atexit.register(exit_now, 0)  # runs once submitit has written the result
    return result


def _run_rank(cfg: Config | dict[str, Any], run_dir: str) -> dict[str, Any]:
    import torch.distributed as dist

    from hpcmega.training.preemption import StopFlag, stop_signals

    # A native crash (SIGSEGV, SIGABRT from a heap check) leaves every thread's Python stack in this rank's log.
    faulthandler.enable(all_threads=True)
    folder = RunFolder(run_dir)  # the entry protocol hands the folder beside the config (bound to it already)
    cfg, run_path = folder.bind(_as_config(cfg)), folder.path
    env = from_environment(master_port=cfg.cluster.master_port)
    # First thing: a stop signal during start-up is remembered (and acted on at the first step), not fatal.
    stop_flag = StopFlag().install(stop_signals(under_slurm=bool(env.job_id)))
    _print_attempt_marker(env)
    _check_world(cfg, env)
    device_type, backend, device = _select_device(cfg, env)
    port = _init_distributed(cfg, env, run_path, backend, device)
    store = dist.TCPStore(env.master_addr, port, is_master=False) if env.world_size > 1 else None
    evidence = HangEvidence(run_path, env.rank, env.world_size, store)  # RUN_DIR/debug/ when a rank fails or hangs
    ok = False
    try:
        layout, nodes = _place(cfg, env)
        mesh = ParallelDims(pp=layout.pp, dp=layout.dp, tp=layout.tp).build_mesh(device_type, layout.mesh_grid())
        timeouts = CollectiveTimeouts(mesh, cfg.cluster.first_step_timeout_s, cfg.cluster.collective_timeout_s)
        attempt = _claim_and_record(cfg, env, run_path, layout, nodes) if env.rank == 0 else 0
        selftest = collectives_self_test(mesh, layout, env.rank, device)
        _say(env, f"collectives self-test passed on tp/pp/dp groups and world (sum {selftest['world_sum']:.0f})")
        result: dict[str, Any] = {"rank": env.rank, "node": env.node, "local_rank": env.local_rank,
                                  "world_size": env.world_size, "coords": layout.coords[env.rank].to_dict(),
                                  "selftest": selftest, "train": None}
        if cfg.train.steps > 0:
            info = {"world_size": env.world_size, "nodes": nodes, "slurm_job_id": env.job_id and job_key(),
                    "attempt": attempt, "restart_count": env.restart_count,
                    "layout": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp}}
            result["train"] = _train(cfg, env, run_path, mesh, timeouts, stop_flag, info)
        dist.barrier()
        if env.rank == 0:  # every rank trained and saved (a stop never gets here: _stop_for_requeue raises)
            RunFolder(run_path).record_event("finished", {"job_id": job_key(), "restart_count": env.restart_count})
        ok = True
        return result
    except Exception as e:
        if not isinstance(e, (ConfigError, TrainingUnfinished)):  # the same refusal on every rank, or a stop
            evidence.on_failure(e)
        raise
    finally:
        evidence.stop()
        # On success leave cleanly; on error with NCCL a destroy could block on a peer stuck in a collective, so
        # let process exit tear it down (the launcher / srun ends the peers).
        if ok or backend == "gloo":
            dist.destroy_process_group()


def _print_attempt_marker(env: DistEnv) -> None:
    """Every rank's log starts the attempt's section with this line (`hpcmega logs --attempt K` cuts there); stderr
    too: under SLURM it is a file of its own, where hpcmega.cluster.restarts looks for a failure's first lines."""
    marker = attempt_marker(str(job_key()), env.restart_count, env.rank)
    print(marker, flush=True)
    if env.job_id:
        print(marker, file=sys.stderr, flush=True)


def _check_world(cfg: Config, env: DistEnv) -> None:
    if env.world_size != cfg.world_size:
        raise ConfigError(
            f"the job has {env.world_size} ranks but the config expects nodes={cfg.cluster.nodes} x "
            f"gpus_per_node={cfg.cluster.gpus_per_node} = {cfg.world_size}; submit with matching --nodes and "
            "--gpus-per-node (one task per GPU) and no task-count options in --sbatch"
        )


def _init_distributed(cfg: Config, env: DistEnv, run_path: Path, backend: str, device) -> int:
    """Start the process group (flight-recorder dumps into RUN_DIR/debug/); -> the rendezvous port."""
    import torch.distributed as dist

    port = env.master_port or (free_port() if env.world_size == 1 else 0)
    for name, value in flight_recorder_env(run_path).items():  # NCCL dumps there by itself; the user's value wins
        os.environ.setdefault(name, value)
    if backend == "nccl":  # NCCL writes into an existing folder only (hang_evidence makes it for gloo when needed)
        (run_path / DEBUG).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dist.init_process_group(
        backend,
        init_method=f"tcp://{env.master_addr}:{port}",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=max(cfg.cluster.first_step_timeout_s, cfg.cluster.collective_timeout_s)),
        device_id=device if device.type == "cuda" else None,
    )
    _say(env, f"torch.distributed up: {backend}, world {env.world_size}, rendezvous "
              f"{env.master_addr}:{port} ({time.perf_counter() - t0:.1f}s)"
              + (f", SLURM job {env.job_id} attempt {env.restart_count + 1}" if env.job_id else ""))
    return port


def _place(cfg: Config, env: DistEnv):
    """-> (layout, node names): the real placement through the same sequence `plan` and `submit` ran, with a
    notice where it differs from the planned block layout."""
    placement = gather_placement(env)
    layout = layout_of(cfg, placement)
    nodes = sorted({p.node for p in placement}, key=natural_key)
    try:
        diffs = layout.differences(planned_layout(cfg, nodes))
    except ConfigError as e:
        diffs = [f"no block layout to compare with ({e})"]
    if diffs:
        _say(env, "notice: the real placement gives different groups than the planned block layout "
                  f"(real vs planned: {'; '.join(diffs)}); TP groups still stay inside one node/NVLink domain")
    for w in layout.warnings:
        _say(env, f"notice: {w}")
    return layout, nodes


def _claim_and_record(cfg: Config, env: DistEnv, run_path: Path, layout, nodes: list[str]) -> int:
    """Rank 0: (re)claim the run folder for a SLURM job, write config and layout, record the attempt; -> its
    number (1 = the first)."""
    if env.job_id:  # every attempt of a SLURM job (re)claims its run folder; another live holder refuses
        acquire(run_path, job_id=job_key())  # the id jobs.jsonl and `submit` use (an array task: 12_3)
    folder = RunFolder(run_path)
    folder.write_config(cfg.to_toml())
    folder.write_layout(layout.to_json())
    folder.record_attempt({"job_id": job_key(), "restart_count": env.restart_count,  # requeues are visible
                           "world_size": env.world_size, "nodes": nodes,
                           "layout": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp}})
    attempt = len(folder.attempts())
    if attempt > 1:  # metrics.jsonl says where an attempt starts; a step repeated after it replaces the old one
        folder.mark_restart({"attempt": attempt, "job_id": job_key(), "restart_count": env.restart_count,
                             "last_step_before": max((r["step"] for r in folder.steps()), default=0)})
    _say(env, f"wrote {folder / CONFIG} and {folder / LAYOUT} ({len(nodes)} node(s): {', '.join(nodes)})")
    return attempt


def _train(cfg: Config, env: DistEnv, run_path: Path, mesh, timeouts: CollectiveTimeouts, stop_flag,
           info: dict[str, Any]) -> dict[str, Any]:
    """The training loop with rank 0's W&B logger; a preempted run saves, then requeues or stops here."""
    from hpcmega.training.train import train
    from hpcmega.training.wandb_logger import WandbLogger

    logger = WandbLogger(cfg, str(run_path), info) if env.rank == 0 else None
    if logger is not None and logger.describe():
        _say(env, logger.describe())

    def on_step(record: dict[str, Any]) -> None:
        if timeouts.in_first_step and env.rank == 0:  # a crash from now on is worth a restart
            RunFolder(run_path).record_event("trained", {"job_id": job_key(), "step": record["step"],
                                                         "restart_count": env.restart_count})
        timeouts.first_step_done()  # compile and checkpoint load are behind us: hangs end sooner
        if logger is not None:
            logger.log(record)

    try:
        result = train(cfg, mesh, str(run_path), stop_flag=stop_flag, on_step=on_step)
    finally:
        if logger is not None:
            logger.finish()
    if result.get("preempted"):
        _stop_for_requeue(cfg, env, result, stop_flag.agreed_signum)
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m hpcmega.training.job --config FILE --run-dir DIR``: one rank of a local run (see hpcmega.cluster.launcher)."""
    parser = argparse.ArgumentParser(prog="python -m hpcmega.training.job", description=main.__doc__)
    parser.add_argument("--config", required=True, help="resolved config TOML (written by the launcher)")
    parser.add_argument("--run-dir", required=True)
    args = parser.parse_args(argv)
    from hpcmega.cluster.process import die_with_launcher

    die_with_launcher()
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "?"))
    try:
        run_rank(load_config(args.config), args.run_dir)
    except ConfigError as e:
        print(f"[rank {rank}] error: {e}", file=sys.stderr, flush=True)
        return 2
    except TrainingUnfinished as e:
        from hpcmega.errors import EXIT_UNFINISHED

        print(f"[rank {rank}] {e}", flush=True)
        return EXIT_UNFINISHED
    except BaseException as e:  # as in run_rank: KeyboardInterrupt, SystemExit and bugs keep their traceback
        line = failure_line(e)
        if line is None:
            raise
        print(f"[rank {rank}] error: {line}", file=sys.stderr, flush=True)  # rank 0's reaches the console
        return 1
    return 0


if __name__ == "__main__":
    exit_now(main())
