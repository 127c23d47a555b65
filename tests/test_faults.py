"""Faults and hostile input, one test (or corpus) per finding of issue 10's fault-injection pass.

Each test fails on the code before the hardening and passes after. Multi-process tests stay tiny (2 CPU ranks,
d 64, few steps); the SLURM preemption test lives in test_preemption.py.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import rank_pids

from hpcmega.cli import main
from hpcmega.errors import ConfigError
from hpcmega.config import load_config
from hpcmega.cluster.slurm import sbatch_script

SUBMIT = ["submit", "--nodes", "1", "--gpus-per-node", "2", "--cpu", "--global-batch", "4", "--seq-len", "32",
          "--wandb", "disabled", "--time", "00:10:00", "--dry-run"]

# -- 1. nothing a user types reaches the job script as a command ------------------------------------------------------
# (flags, expected fragment of the exit-2 message, or None when the value is legal and must render harmlessly).
# {M} is replaced by a marker file an injected command would create.
HOSTILE: list[tuple[list[str], str | None]] = [
    (["--partition", "gpu\ntouch {M} #"], "contains '\\n'"),
    (["--qos", "normal\ntouch {M}"], "contains '\\n'"),
    (["--constraint", "h100\rtouch {M}"], "contains '\\r'"),
    (["--account", "acct\n\ntouch {M}"], "contains '\\n'"),
    (["--mem", "64G\n"], "contains '\\n'"),
    (["--job-name", "x\ntouch {M}"], "contains '\\n'"),
    (["--job-name", "a\tb"], "contains '\\t'"),
    (["--time", "00:10:00\ntouch {M}"], "contains '\\n'"),
    (["--sbatch", "--comment=a\ntouch {M}"], "contains '\\n'"),
    (["--sbatch", "--comment\ntouch {M}"], "contains '\\n'"),
    (["--sbatch", "--reservation=r\x00x"], "contains '\\x00'"),
    (["--sbatch", "--export=ALL\x1b[2J"], "contains '\\x1b'"),
    (["--sbatch", "--ntasks 4"], "sets --ntasks itself"),
    (["--sbatch", "--ntasks=4"], "sets --ntasks itself"),
    (["--sbatch", "--ntasks-per-gpu=1"], "sets --ntasks-per-gpu itself"),
    (["--sbatch", "--gres=gpu:8"], "sets --gres itself"),
    (["--sbatch", "--nodes 3"], "sets --nodes itself"),
    (["--sbatch", "--gpus-per-task=1"], "sets --gpus-per-task itself"),
    (["--sbatch", "--output=/tmp/elsewhere"], "sets --output itself"),
    (["--sbatch", "--wrap=touch {M}"], "sets --wrap itself"),
    (["--sbatch", "--signal=USR1@60"], "sets --signal itself"),
    (["--sbatch", "--no-requeue"], "sets --no-requeue itself"),
    (["--sbatch", "-N 2"], "long form"),
    (["--sbatch", "-N2"], "long form"),
    (["--sbatch", "--ntasks-per-n=3"], "unknown sbatch option --ntasks-per-n"),
    (["--sbatch", "--$(touch {M})=1"], "unknown sbatch option"),
    (["--sbatch", "reservation=x"], "write it as --reservation=x"),
    (["--run-dir", "run\ntouch {M} #"], "contains '\\n'"),
    (["--run-dir", "run-%j"], "contains '%'"),
    (["--run-name", "x\ntouch {M}"], "contains '\\n'"),
    # legal values full of shell syntax: quoted, so they stay data
    (["--partition", "gpu;touch {M}"], None),
    (["--qos", "$(touch {M})"], None),
    (["--constraint", "h100&ib|`touch {M}`"], None),
    (["--account", "a' ; touch {M} ; echo '"], None),
    (["--sbatch", "--comment=$(touch {M})"], None),
    (["--sbatch", "--reservation r1 ; touch {M}"], None),
    (["--sbatch", '--comment="; touch {M}; "'], None),
    (["--sbatch", "--mail-user=a@b;touch {M}"], None),
    (["--run-dir", "run $(touch {M})"], None),
    (["--run-dir", "run'; touch {M}; '"], None),
    (["--job-name", "`touch${{IFS}}{M}`"], None),
]

TOML_HOSTILE = [
    ('[cluster]\npartition = "gpu\\ntouch {M} #"\n', "contains '\\n'"),
    ('[cluster]\nsbatch_extra = ["--gres=gpu:1"]\n', "sets --gres itself"),
    ('[cluster]\nsbatch_extra = ["--comment=x\\ntouch {M}"]\n', "contains '\\n'"),
    ('[logging]\nrun_name = "r\\ntouch {M}"\n', "contains '\\n'"),
]


def test_hostile_corpus_is_large_enough():
    assert len(HOSTILE) + len(TOML_HOSTILE) >= 30


def _stub_bin(tmp_path: Path) -> Path:
    """srun and scontrol that only record their arguments (one per line) and succeed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("srun", "scontrol", "sbatch"):
        exe = bin_dir / name
        exe.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > "{tmp_path}/{name}.args"\n')
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def _check_script_is_inert(script: str, tmp_path: Path, marker: Path) -> None:
    path = tmp_path / "job.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0, script
    for line in script.splitlines():  # sbatch sees exactly one known option per #SBATCH line
        if line.startswith("#SBATCH"):
            words = shlex.split(line[len("#SBATCH"):])
            assert len(words) == 1 and words[0].startswith("--"), line
    env = {**os.environ, "PATH": f"{_stub_bin(tmp_path)}:{os.environ['PATH']}"}
    run = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert not marker.exists(), f"an injected command ran:\n{script}"
    srun_args = (tmp_path / "srun.args").read_text().splitlines()
    assert srun_args[-3:-1] == ["-m", "submitit.core._submit"] or "submitit.core._submit" in srun_args, srun_args


@pytest.mark.parametrize("flags,refusal", HOSTILE, ids=[repr(f[-1])[:40] for f, _ in HOSTILE])
def test_hostile_values_never_run_in_the_job_script(tmp_path, flags, refusal):
    marker = tmp_path / "INJECTED"
    work = tmp_path / "cwd"
    work.mkdir()
    args = [a.replace("{M}", str(marker)) for a in flags]
    if "--run-dir" in args:
        i = args.index("--run-dir") + 1
        args[i] = str(work / args[i])
    old = os.getcwd()
    os.chdir(work)
    try:
        result = CliRunner().invoke(main, SUBMIT + args)
    finally:
        os.chdir(old)
    if refusal is not None:
        assert result.exit_code == 2, (args, result.output)
        assert refusal in result.stderr and "Traceback" not in result.output, result.stderr
        assert list(work.iterdir()) == [] and not marker.exists()
        return
    assert result.exit_code == 0, (args, result.output, result.stderr)
    script = result.stdout.split("nothing submitted):\n\n", 1)[1]
    _check_script_is_inert(script, tmp_path, marker)
    assert not marker.exists() and list(work.iterdir()) == []


@pytest.mark.parametrize("toml,refusal", TOML_HOSTILE)
def test_hostile_site_profile_is_refused(tmp_path, toml, refusal):
    marker = tmp_path / "INJECTED"
    profile = tmp_path / "site.toml"
    profile.write_text(toml.replace("{M}", str(marker)))
    result = CliRunner().invoke(main, SUBMIT + ["--config", str(profile), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 2 and refusal in result.stderr, result.output
    assert not (tmp_path / "run").exists() and not marker.exists()


def test_script_renderer_refuses_unchecked_values_itself(tmp_path):
    """Defence in depth: code that skips validate() still cannot render an injected script."""
    cfg = load_config(None, {"cluster.partition": "gpu\ntouch /tmp/x #"})
    with pytest.raises(ConfigError, match="contains"):
        sbatch_script(cfg, tmp_path / "s")
    with pytest.raises(ConfigError, match="contains"):
        sbatch_script(load_config(), tmp_path / "a\nb")


# -- 2-4. checkpoints: a timeline, a verified manifest, fallback past damage, refusals -------------------------------
@pytest.fixture
def one_rank():
    """torch.distributed with one gloo rank in this process, and a tiny trainer factory."""
    from datetime import timedelta

    import torch.distributed as dist
    from engine_harness import free_port
    from torch.distributed.device_mesh import init_device_mesh

    from hpcmega.checkpoint.store import ModelOptimizerState, TrainState
    from hpcmega.training.train import Trainer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=timedelta(seconds=60))
    cfg = load_config(overrides={"train.steps": 20, "train.global_batch": 2, "train.seq_len": 16,
                                 "model.n_layers": 4})
    mesh = init_device_mesh("cpu", (1, 1, 1), mesh_dim_names=("pp", "dp", "tp"))

    def make(tmp_path, name="t"):
        t = Trainer(cfg, mesh, str(tmp_path / name))
        return t, {"model": ModelOptimizerState(t.model_parts, t.optimizers), "train": TrainState(t)}

    yield make, cfg
    dist.destroy_process_group()


def _save_steps(manager, trainer, app, steps):
    for s in steps:
        trainer.step = s
        manager.save(s, app, {"config": {"model": {"n_layers": 4}}})


def test_pruning_after_resuming_an_older_step_keeps_the_new_timeline(tmp_path, one_rank):
    """Timeline A saves 2, 4, 6; a new attempt resumes step 2 and saves 3 and 4 with keep=1. The new saves survive
    (main pruned them by step number), A's complete step 4 is not deleted by B's save at step 4, the checkpoint
    resumed from is kept, and `latest` is B's step 4 -- `--resume auto` continues the new timeline, not A's 6."""
    from hpcmega.checkpoint.store import CheckpointManager

    make, _ = one_rank
    url = str(tmp_path / "ckpt")
    trainer, app = make(tmp_path)
    a = CheckpointManager(url, keep=3)
    a.begin(None)
    _save_steps(a, trainer, app, [2, 4, 6])
    a_step4 = {c.name: c for c in a.list()}["step-00000004"]

    b = CheckpointManager(url, keep=1)
    step2 = {c.name: c for c in b.list()}["step-00000002"]
    message = b.begin(step2)
    assert message and "new lineage" in message and "step-00000006" in message
    _save_steps(b, trainer, app, [3, 4])
    infos = b.list()
    by_lineage = {}
    for c in infos:
        by_lineage.setdefault(c.lineage, []).append(c.step)
    assert by_lineage[a.lineage] == [2, 4, 6]  # A untouched, incl. the step-4 folder B's save did not overwrite
    assert by_lineage[b.lineage] == [4]  # keep=1 of B's own saves
    assert {c.name: c for c in infos}["step-00000004"].meta["lineage"] == a_step4.lineage
    latest = b.latest()
    assert latest.lineage == b.lineage and latest.step == 4 and latest.meta["parent"].endswith("step-00000003")
    first_b = [c for c in infos if c.lineage == b.lineage]
    assert first_b[0].meta["attempt"] == 0
    assert all(c.usable for c in infos)


def _damage(folder: Path, how: str) -> str:
    shard = sorted(folder.glob("__0_*.distcp"))[0]
    data = bytearray(shard.read_bytes())
    if how == "truncate":
        shard.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "delete":
        shard.unlink()
    elif how == "bitflip":
        data[len(data) // 2] ^= 0x40
        shard.write_bytes(bytes(data))
    elif how == "marker":  # what an in-place meta.json write torn by a crash leaves
        (folder / "meta.json").write_text('{"step": 4, "manif')
    return shard.name


@pytest.mark.parametrize("how", ["truncate", "delete", "bitflip", "marker"])
def test_damaged_latest_checkpoint_is_reported_and_auto_resume_falls_back(tmp_path, one_rank, how):
    from hpcmega.checkpoint.store import CheckpointDamaged, CheckpointManager, verify_checkpoint

    make, cfg = one_rank
    url = str(tmp_path / "ckpt")
    trainer, app = make(tmp_path)
    manager = CheckpointManager(url, keep=3)
    manager.begin(None)
    _save_steps(manager, trainer, app, [2, 4])
    shard = _damage(tmp_path / "ckpt" / "step-00000004", how)

    listed = {c.step: c for c in manager.list()}
    if how != "bitflip":  # sizes (and a readable marker) are checked by every listing
        assert listed[4].state == "DAMAGED" and listed[2].state == "complete"
    ls = CliRunner().invoke(main, ["ckpt", "ls", url])
    assert ls.exit_code == 0 and "Traceback" not in ls.output, ls.output
    if how != "bitflip":
        assert "DAMAGED" in ls.output
    verify = CliRunner().invoke(main, ["ckpt", "verify", f"{url}/step-00000004"])
    assert verify.exit_code == 1 and "DAMAGED" in verify.stderr, verify.output
    if how != "marker":
        assert shard in verify.stderr
    assert CliRunner().invoke(main, ["ckpt", "verify", f"{url}/step-00000002"]).exit_code == 0
    assert verify_checkpoint(f"{url}/step-00000002") == []

    fresh, fresh_app = make(tmp_path, "fresh")
    if how != "marker":
        with pytest.raises(CheckpointDamaged, match=shard if how != "bitflip" else "SHA-256"):
            manager.load(f"{url}/step-00000004", fresh_app)
    said = []
    loaded = manager.resume_auto(fresh_app, said.append)
    assert loaded.step == 2 and fresh.step == 2
    assert any("step-00000004 is DAMAGED" in s and "falling back" in s for s in said), said


def test_checksums_can_be_skipped_for_huge_checkpoints(tmp_path, one_rank):
    from hpcmega.checkpoint.store import CheckpointManager

    make, _ = one_rank
    url = str(tmp_path / "ckpt")
    trainer, app = make(tmp_path)
    manager = CheckpointManager(url, keep=3)
    manager.begin(None)
    _save_steps(manager, trainer, app, [2])
    _damage(tmp_path / "ckpt" / "step-00000002", "bitflip")
    sizes_only = CheckpointManager(url, keep=3, checksums=False)
    _, fresh_app = make(tmp_path, "fresh")
    sizes_only.load(f"{url}/step-00000002", fresh_app)  # the flag really skips the (costly) hashing
    meta = sizes_only.list()[0].meta
    assert set(meta["manifest"]) >= {".metadata", "__0_0.distcp"}
    assert all(len(sha) == 64 for _, sha in meta["manifest"].values())
    assert not list((tmp_path / "ckpt" / "step-00000002").glob("*.tmp*"))  # the marker was renamed into place


def test_resume_refuses_another_model_naming_the_fields(tmp_path, one_rank):
    """A 4-layer checkpoint resumed by a 2-layer run: refused on the ranks (and by the pre-flight, below) with the
    differing field, instead of loading silently."""
    import dataclasses

    from hpcmega.checkpoint.store import CheckpointManager
    from hpcmega.training.train import resume

    make, cfg = one_rank
    url = str(tmp_path / "ckpt")
    trainer, app = make(tmp_path)
    manager = CheckpointManager(url, keep=3)
    manager.begin(None)
    trainer.step = 2
    manager.save(2, app, {"config": cfg.to_dict()})
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_layers=2))
    with pytest.raises(ConfigError, match=r"n_layers=4 \(this run: 2\).*--layers 4"):
        resume(other, CheckpointManager(url), app, print)
    llama = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, family="llama", n_kv_heads=2))
    with pytest.raises(ConfigError, match=r"family=gpt2 \(this run: llama\).*--family gpt2 --kv-heads 0"):
        resume(llama, CheckpointManager(url), app, print)
    assert resume(cfg, CheckpointManager(url), app, print).step == 2

    run = ["run", "--nproc", "1", "--cpu", "--wandb", "disabled", "--global-batch", "2", "--seq-len", "16"]
    out = CliRunner().invoke(main, run + ["--layers", "2", "--ckpt-url", url, "--run-dir", str(tmp_path / "r")])
    assert out.exit_code == 2 and "n_layers=4 (this run: 2)" in out.stderr and not (tmp_path / "r").exists()
    # a checkpoint from outside the run's own location is unpickled: it must be trusted explicitly
    step = f"{url}/step-00000002"
    out = CliRunner().invoke(main, run + ["--resume", step, "--run-dir", str(tmp_path / "r")])
    assert out.exit_code == 2 and "--trust-checkpoint" in out.stderr and "unpickles" in out.stderr, out.output
    with pytest.raises(ConfigError, match="--trust-checkpoint"):
        resume(dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume=step)),
               CheckpointManager(str(tmp_path / "own")), app, print)
    trusted = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume=step, trust=True))
    assert resume(trusted, CheckpointManager(str(tmp_path / "own")), app, print).step == 2



def test_after_resuming_an_older_step_every_reader_names_the_same_latest_checkpoint(tmp_path, one_rank):
    """Rollback: a run saves steps 2 and 4, is resumed from step 2 and saves step 3. The highest step is 4, but the
    job continues from the newest save, step 3 -- and `resume --dry-run`, `status`, `ckpt ls` and the ranks'
    auto-resume all name that one (before, `resume` and `status` named step 4 while the job loaded step 3). A local
    resume also runs the pre-flight (a checkpoint of another model is refused, dry run included) and respects the
    run-folder lock."""
    import dataclasses

    from hpcmega.checkpoint.store import CheckpointManager
    from hpcmega.runs import lock as run_lock
    from hpcmega.runs.files import RunFolder
    from hpcmega.training.train import resume

    make, cfg = one_rank
    run = RunFolder(tmp_path / "run")
    local = dataclasses.replace(cfg, run_dir=str(run.path), cluster=dataclasses.replace(cfg.cluster, cpu=True,
                                                                                        gpus_per_node=1))
    run.write_config(local.to_toml())
    run.record_job({"job_id": "local-1", "kind": "local", "host": "elsewhere", "pid": 1, "exit_code": 0})
    url = run.checkpoint_url(local)
    trainer, app = make(tmp_path)
    first = CheckpointManager(url)
    first.begin(None)
    _save_steps(first, trainer, app, [2, 4])
    again = CheckpointManager(url)
    again.begin(again.info(f"{url}/step-00000002"))
    _save_steps(again, trainer, app, [3])
    latest = f"{url}/step-00000003"

    auto = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume="auto"))
    assert resume(auto, CheckpointManager(url), app, print).url == latest  # what the ranks load
    cli = CliRunner()
    dry = cli.invoke(main, ["resume", str(run.path), "--dry-run"])
    assert dry.exit_code == 0 and f"resume from: {latest} (step 3," in dry.output, dry.output
    status = cli.invoke(main, ["status", str(run.path)])
    assert "checkpoint step 3 (" in status.output and latest in status.output, status.output
    listing = cli.invoke(main, ["ckpt", "ls", str(run.path)]).output
    assert [line.split()[0] for line in listing.splitlines() if line.endswith("<- latest")] == ["3"], listing

    other = cli.invoke(main, ["resume", str(run.path), "--dry-run", "--layers", "2"])
    assert other.exit_code == 2 and "n_layers=4 (this run: 2)" in other.stderr, other.output
    claim = run_lock.acquire(run.path)  # a live local run (this process) holds the folder
    busy = cli.invoke(main, ["resume", str(run.path), "--dry-run"])
    run_lock.release(run.path, claim)
    assert busy.exit_code == 2 and "is in use by" in busy.stderr, busy.output


# -- 8. late failures are found before anything is queued or written -------------------------------------------------
RUN = ["run", "--nproc", "1", "--cpu", "--wandb", "disabled"]


@pytest.mark.parametrize("args,words", [
    (["--data", "{T}/no-such-data"], ["no prepared dataset", "hpcmega data prepare"]),
    (["--data", "{T}/bigvocab"], ["50257 tokens", "--vocab-size 50257"]),
    (["--resume", "{T}/runs/a/checkpoints/step-00000007"], ["does not exist", "ckpt ls"]),
    (["--ckpt-url", "bogus://bucket/ckpt"], ["unknown storage protocol 'bogus://'", "file:// or s3://"]),
    (["--ckpt-url", "memory://ckpt"], ["'memory://' does not outlive the rank processes", "shared disk"]),
    (["--ckpt-url", "s3://bucket/ckpt"], ["no AWS credentials", "AWS_ACCESS_KEY_ID"]),
    (["--ckpt-url", "/proc/hpcmega-ckpt"], ["cannot write checkpoints to /proc/hpcmega-ckpt"]),
    (["--ckpt-url", "{T}/a-file/ckpt"], ["cannot write checkpoints", "NotADirectoryError"]),
])
def test_late_failures_are_refused_before_anything_is_written(tmp_path, monkeypatch, args, words):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "bigvocab").mkdir()
    (tmp_path / "bigvocab" / "index.json").write_text('{"vocab_size": 50257, "shards": []}')
    (tmp_path / "a-file").write_text("")
    args = [a.replace("{T}", str(tmp_path)) for a in args]
    before = sorted(tmp_path.iterdir())
    for command in (RUN, ["submit", "--nodes", "1", "--gpus-per-node", "1", "--cpu", "--wandb", "disabled"]):
        out = CliRunner().invoke(main, command + args + ["--run-dir", str(tmp_path / "run")])
        assert out.exit_code == 2, (command, out.output)
        assert all(w in out.stderr for w in words) and "Traceback" not in out.output, out.stderr
        assert len(out.stderr.strip().splitlines()[-1]) > 20
    assert sorted(tmp_path.iterdir()) == before  # no run folder, no probe file left


# -- 5, 7. stop signals, exit codes, the launcher ----------------------------------------------------------------------
TINY_RUN = ["run", "--cpu", "--wandb", "disabled", "--global-batch", "2", "--seq-len", "16", "--layers", "2"]


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _wait_for(predicate, timeout: float = 240.0, what: str = "") -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _steps_logged(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return sum(1 for line in metrics.read_text().splitlines() if '"event"' not in line) if metrics.exists() else 0


def _saved_steps(run_dir: Path) -> list[int]:
    ckpts = run_dir / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in ckpts.iterdir() if (p / "meta.json").exists()) \
        if ckpts.exists() else []


def test_sigterm_ctrl_c_and_cancel_each_save_and_resume_continues_with_the_losses_of_an_uninterrupted_run(
        tmp_path):
    """A stop is a save, locally too. One run is stopped by SIGTERM, then (resumed) by Ctrl-C, then by `hpcmega
    cancel`, then aborted by Ctrl-C twice while starting, and resumed to its end: each stop leaves a checkpoint of the step it
    reached and exits 75 saying so; the abort exits 130 at once; the merged losses equal an uninterrupted run's.
    (main: SIGTERM / Ctrl-C / cancel exited 143 / 130 without saving, and `resume` found no checkpoint.)"""
    import signal

    from conftest import popen_cli, run_cli

    from hpcmega.runs.files import RunFolder

    steps = 60  # each stop comes 2 steps into its segment and takes effect at the next step boundary
    args = [*TINY_RUN, "--nproc", "2", "--steps", str(steps)]
    ref = run_cli([*args, "--run-dir", tmp_path / "reference"], timeout=600)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    want = {r["step"]: r["loss"] for r in RunFolder(tmp_path / "reference").steps()}

    run_dir = tmp_path / "run"
    log = tmp_path / "out.txt"

    def cancel(proc) -> None:  # in this process: a CLI start-up of its own would let the run finish first
        out = CliRunner().invoke(main, ["cancel", str(run_dir)])
        assert out.exit_code == 0 and "save at its next step boundary" in out.stdout, out.output

    stops = [("SIGTERM", lambda proc: proc.send_signal(signal.SIGTERM)),
             ("Ctrl-C", lambda proc: proc.send_signal(signal.SIGINT)),
             ("cancel", cancel)]
    for i, (how, stop) in enumerate(stops):
        start = _steps_logged(run_dir)
        command = [*args, "--run-dir", run_dir] if i == 0 else ["resume", run_dir]
        proc = popen_cli(command, log)
        try:
            _wait_for(lambda: _steps_logged(run_dir) >= start + 2 or proc.poll() is not None, what="two steps")
            stop(proc)
            code = proc.wait(timeout=240)
        finally:
            if proc.poll() is None:
                proc.kill()
        out = log.read_text()
        assert code == 75, (how, out)
        assert "saving at the next step boundary" in out and "stopped at step" in out and "Traceback" not in out
        assert "done." not in out, out
        reached = max(r["step"] for r in RunFolder(run_dir).steps())
        assert start + 2 <= reached < steps and _saved_steps(run_dir)[-1] == reached, (how, reached)
        if i:
            assert f"resume from: {run_dir}/checkpoints/step-{start:08d}" in out, out

    proc = popen_cli(["resume", run_dir], log)  # Ctrl-C twice while the ranks start: abort now, nothing saved
    try:
        _wait_for(lambda: len(rank_pids(run_dir)) == 2 or proc.poll() is not None, what="ranks to start")
        proc.send_signal(signal.SIGINT)
        _wait_for(lambda: "saving at the next step boundary" in log.read_text() or proc.poll() is not None,
                  what="the first Ctrl-C to be taken")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "aborted by a second SIGINT" in log.read_text() and not rank_pids(run_dir)

    final = run_cli(["resume", run_dir], timeout=600)
    assert final.returncode == 0, final.stdout + final.stderr
    got = {r["step"]: r["loss"] for r in RunFolder(run_dir).steps()}
    assert sorted(got) == list(range(1, steps + 1))
    for step in got:
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, got[step], want[step])


def test_failures_inside_ranks_are_named_in_one_line():
    """Disk full inside DCP's per-rank failures, a read-only filesystem behind a RuntimeError, too many non-finite
    steps: one line each (a rank prints it instead of its traceback); an unknown error keeps its traceback."""
    import errno

    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    from hpcmega.parallel.step_guard import NonFiniteStepsError
    from hpcmega.training.job import failure_line

    try:
        raise OSError(errno.ENOSPC, "No space left on device", "/ckpt/step-00000004/__1_0.distcp")
    except OSError as e:
        full = CheckpointException("CheckpointException ranks:dict_keys([1])", {1: _wrap_exception(e)})
    assert failure_line(full) == ("OSError: [Errno 28] No space left on device: "
                                  "'/ckpt/step-00000004/__1_0.distcp'")
    assert not isinstance(full, Exception)  # why the ranks catch BaseException (then pass on what is not named)
    assert failure_line(KeyboardInterrupt()) is None and failure_line(SystemExit(3)) is None
    try:
        try:
            raise OSError(errno.EROFS, "Read-only file system")
        except OSError as e:
            raise RuntimeError("save failed") from e
    except RuntimeError as e:
        assert failure_line(e) == "OSError: [Errno 30] Read-only file system"
    assert failure_line(NonFiniteStepsError("3 consecutive steps\nmore")) == "NonFiniteStepsError: 3 consecutive steps"
    assert failure_line(RuntimeError("a bug")) is None


def test_a_stop_signal_during_start_up_is_deferred_not_fatal(tmp_path):
    """USR2 while the ranks are still importing torch: remembered and acted on at the first step boundary (main:
    the ranks died of the signal)."""
    import signal

    from conftest import popen_cli

    run_dir, log = tmp_path / "run", tmp_path / "out.txt"
    proc = popen_cli([*TINY_RUN, "--nproc", "2", "--steps", "3", "--run-dir", run_dir], log)
    try:
        _wait_for(lambda: len(rank_pids(run_dir)) == 2 or proc.poll() is not None, what="ranks to start")
        proc.send_signal(signal.SIGUSR2)
        code = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    assert "killed by SIGUSR2" not in out and "Traceback" not in out, out
    assert code == 75 and "stopped at step 0 of 3" in out, out


def test_ranks_die_with_a_killed_launcher(tmp_path):
    """`kill -9` of `hpcmega run`: its ranks end too (main: they kept training as orphans)."""
    import os
    import signal

    from conftest import popen_cli

    run_dir, log = tmp_path / "run", tmp_path / "out.txt"
    proc = popen_cli([*TINY_RUN, "--nproc", "2", "--steps", "100000", "--run-dir", run_dir], log)
    metrics = run_dir / "metrics.jsonl"
    try:
        _wait_for(lambda: metrics.exists() and metrics.read_text().strip(), what="training")
        assert len(rank_pids(run_dir)) == 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        _wait_for(lambda: not rank_pids(run_dir), timeout=20, what="orphaned ranks to end")
    finally:
        for pid in rank_pids(run_dir):
            os.kill(pid, signal.SIGKILL)


def test_a_closed_console_pipe_neither_kills_nor_fails_training(tmp_path):
    """`hpcmega run ... | head -2`: training finishes, exit 0, no BrokenPipe traceback."""
    from conftest import CLI_ENV, hpcmega_exe

    run_dir = tmp_path / "run"
    cmd = " ".join(shlex.quote(str(a)) for a in [hpcmega_exe(), *TINY_RUN, "--nproc", "1", "--steps", "6",
                                                  "--run-dir", run_dir])
    r = subprocess.run(["bash", "-c", f"{cmd} 2>{tmp_path}/err | head -2; exit ${{PIPESTATUS[0]}}"],
                       env=CLI_ENV, capture_output=True, text=True, timeout=300)
    err = (tmp_path / "err").read_text()
    assert r.returncode == 0 and "Traceback" not in err and "BrokenPipe" not in err, err
    assert len(r.stdout.splitlines()) == 2
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 6
    assert (run_dir / "checkpoints" / "step-00000006" / "meta.json").exists()


def test_a_console_nobody_reads_does_not_block_training(tmp_path):
    """stdout is a 4 KiB pipe nobody reads: training still finishes (main: rank 0 blocked on the full pipe)."""
    import fcntl

    from conftest import CLI_ENV, hpcmega_exe

    run_dir = tmp_path / "run"
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, 1031, 4096)  # F_SETPIPE_SZ
    proc = subprocess.Popen([hpcmega_exe(), *TINY_RUN, "--nproc", "1", "--steps", "80", "--run-dir", str(run_dir)],
                            env=CLI_ENV, stdout=write_end, stderr=subprocess.DEVNULL)
    os.close(write_end)
    try:
        metrics = run_dir / "metrics.jsonl"
        _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) == 80, timeout=300,
                  what="all 80 steps with an unread console")
        _wait_for(lambda: (run_dir / "checkpoints" / "step-00000080" / "meta.json").exists(), what="the final save")
    finally:
        os.close(read_end)  # now the launcher's pending writes fail (EPIPE), which must not fail the run
    try:
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


# -- 6. one job per run folder -------------------------------------------------------------------------------------
def test_a_second_run_on_a_busy_run_folder_is_refused_naming_the_holder(tmp_path):
    """While `hpcmega run` trains in a folder, a second `run` or `submit` on it exits 2 naming the holder (main:
    both proceeded, sharing checkpoints and metrics). Once the holder is killed, its lock is stale and taken over."""
    import signal

    from conftest import popen_cli

    run_dir, log = tmp_path / "run", tmp_path / "out.txt"
    proc = popen_cli([*TINY_RUN, "--nproc", "1", "--steps", "100000", "--run-dir", run_dir], log)
    try:
        metrics = run_dir / "metrics.jsonl"
        _wait_for(lambda: metrics.exists() and metrics.read_text().strip(), what="training")
        for command in ([*TINY_RUN, "--nproc", "1", "--steps", "3"],
                        ["submit", "--nodes", "1", "--gpus-per-node", "1", "--cpu", "--wandb", "disabled"]):
            out = CliRunner().invoke(main, command + ["--run-dir", str(run_dir)])
            assert out.exit_code == 2, out.output
            assert f"in use by hpcmega run pid {proc.pid}" in out.stderr and "Traceback" not in out.output
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _wait_for(lambda: not rank_pids(run_dir), timeout=20, what="ranks to end")
    finally:
        if proc.poll() is None:
            proc.kill()
    from hpcmega.runs.lock import check_free, read

    assert read(run_dir)["pid"] == proc.pid  # the killed run's lock is still there, but stale
    check_free(run_dir)  # ... so a new run may take the folder over


# -- 9. one line instead of a traceback --------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [b"model = 5\n", b"[[model]]\nn_layers = 2\n", b"[model]\nn_layers = 2 # \xff\n",
                                     b"[train\nsteps = 3\n"])
def test_malformed_config_files_give_one_line_exit_2(tmp_path, content):
    path = tmp_path / "bad.toml"
    path.write_bytes(content)
    out = CliRunner().invoke(main, ["plan", "--config", str(path)])
    assert out.exit_code == 2 and "Traceback" not in out.output and str(path) in out.stderr, out.output


@pytest.mark.parametrize("meta", [b"", b"[]", b"null", b'{"step": 3, "manif', b"\xff\xfe", b'{"layout": 5}',
                                  b'{"manifest": 5}', b'{"manifest": {"a": 5}}', b'{"seq": "x", "time": "y"}',
                                  b'{"layout": {"pp": 1}, "manifest": {"f": [1, 2]}}'])
def test_ckpt_ls_lists_damaged_markers_without_a_traceback(tmp_path, meta):
    folder = tmp_path / "ckpt" / "step-00000003"
    folder.mkdir(parents=True)
    (folder / "meta.json").write_bytes(meta)
    for args in (["ckpt", "ls", str(tmp_path / "ckpt")], ["ckpt", "ls", "--json", str(tmp_path / "ckpt")],
                 ["ckpt", "verify", str(folder)]):
        out = CliRunner().invoke(main, args)
        assert out.exit_code in (0, 1) and out.exception is None or isinstance(out.exception, SystemExit), out.output
        assert "Traceback" not in out.output


def test_a_marker_without_a_manifest_is_not_a_usable_checkpoint(tmp_path):
    from hpcmega.checkpoint.store import list_checkpoints

    folder = tmp_path / "ckpt" / "step-00000003"
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text('{"step": 3, "seq": 1}')
    (info,) = list_checkpoints(str(tmp_path / "ckpt"))
    assert not info.usable and info.state == "DAMAGED" and "no manifest" in info.damage
    out = CliRunner().invoke(main, ["ckpt", "verify", str(folder)])
    assert out.exit_code == 1 and "no manifest" in out.output, out.output


def test_ckpt_ls_on_s3_without_credentials_is_one_line(tmp_path, monkeypatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    out = CliRunner().invoke(main, ["ckpt", "ls", "s3://some-bucket/ckpt"])
    assert out.exit_code == 1 and "AWS credentials" in out.stderr and len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("out_url,code,words", [("bogus://x/data", 2, "unknown storage protocol"),
                                                ("/proc/hpcmega-data", 1, "cannot write the dataset")])
def test_data_prepare_to_a_bad_target_is_one_line(tmp_path, out_url, code, words):
    src = tmp_path / "a.txt"
    src.write_text("To be, or not to be.\n")
    out = CliRunner().invoke(main, ["data", "prepare", "--source", str(src), "--out", out_url])
    assert out.exit_code == code and words in out.stderr and "Traceback" not in out.output, out.output


def test_data_prepare_of_empty_files_is_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n")
    out = CliRunner().invoke(main, ["data", "prepare", "--source", str(tmp_path), "--out", str(tmp_path / "o")])
    assert out.exit_code == 2 and "holds no text" in out.stderr and not (tmp_path / "o").exists(), out.output


@pytest.mark.parametrize("nodelist", ["node[1-", "node[a-b]", "node[3-1]", ",,", "x[[1]]"])
def test_a_bad_slurm_nodelist_is_one_line(tmp_path, nodelist):
    import sys

    cfg = tmp_path / "c.toml"
    cfg.write_text("[train]\nsteps = 1\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "RANK", "WORLD_SIZE"))}
    env.update(SLURM_PROCID="0", SLURM_JOB_ID="7", SLURM_NTASKS="1", SLURM_LOCALID="0", SLURM_JOB_NODELIST=nodelist,
               SLURMD_NODENAME="node1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "hpcmega.training.job", "--config", str(cfg), "--run-dir", str(tmp_path / "r")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "SLURM node list" in r.stderr and "Traceback" not in r.stderr, r.stderr


# -- 10. every check before anything is written (issue 19): huge, non-finite and malformed values ------------------
BIG = str(10**30)
DEEP_TOML = "[train]\nsteps = " + "[" * 600 + "]" * 600 + "\n"
# (command line, fragment of the one-line refusal). Each is refused in-process with exit 2, within a hang guard, and
# writes nothing; {T} is the test's folder.
REFUSED_UP_FRONT: list[tuple[list[str], str]] = [
    (["plan", "--nodes", "1", "--gpus-per-node", "8", "--tp", "8", "--pp", "0"], "parallel.pp (--pp)=0 must be positive"),
    (["plan", "--nodes", BIG], "cluster.nodes (--nodes)=" + BIG + " must be at most 100000"),
    (["plan", "--gpus-per-node", BIG], "must be at most 1024"),
    (["plan", "--nodes", "100000", "--gpus-per-node", "1024"], "hpcmega plans at most 262144 ranks"),
    (["plan", "--nvlink-domain-nodes", "100000"], "nvlink_domain_nodes=100000 x gpus_per_node=8"),
    (["plan", "--layers", "100000000"], "model.n_layers (--layers)=100000000 must be at most 10000"),
    (["plan", "--layers", BIG], "must be at most 10000"),
    (["plan", "--heads", BIG], "must be at most 131072"),
    (["plan", "--d-model", str(2**40)], "must be at most 131072"),
    (["plan", "--vocab-size", str(2**40)], "must be at most 16777216"),
    (["plan", "--seq-len", str(2**40)], "must be at most 4194304"),
    (["plan", "--global-batch", BIG], "must be at most 16777216"),
    (["plan", "--micro-batch", BIG], "must be at most 16777216"),
    (["plan", "--pp", BIG], "must be at most 10000"),
    (["plan", "--tp", BIG], "must be at most"),
    (["plan", "--steps", "100000000"], "train.steps (--steps)=100000000 must be at most 99999999"),
    (["plan", "--set", "train.seed=" + str(2**70)], "must be at most 9223372036854775807"),
    (["plan", "--set", "cluster.collective_timeout_s=1e14"], "collective_timeout_s (--collective-timeout-s)=" 
     "100000000000000 must be at most 604800"),
    (["plan", "--set", "cluster.first_step_timeout_s=1e14"], "must be at most 604800"),
    (["plan", "--ckpt-timeout", BIG], "checkpoint.timeout_s (--ckpt-timeout)"),
    (["plan", "--set", "cluster.signal_grace_s=70000"], "must be at most 65535"),
    (["plan", "--set", "train.lr=nan"], "train.lr (--lr)=nan must be positive"),
    (["plan", "--set", "cluster.gpu_mem_gib=inf"], "cluster.gpu_mem_gib"),
    (["plan", "--set", "train.steps=1e400"], "cannot read inf as int"),
    # W&B names W&B would refuse only when the ranks start logging
    (["plan", "--wandb-project", "team/project"], "logging.project (--wandb-project)='team/project' contains '/'"),
    (["plan", "--wandb-project", "a#b"], "contains '#'"),
    (["plan", "--wandb-project", "p" * 129], "has 129 characters; W&B takes at most 128"),
    (["plan", "--wandb-entity", "me:you"], "contains ':'"),
    (["plan", "--wandb-tags", "ok", "--wandb-tags", "t" * 65], "has 65 characters; W&B takes 1 to 64"),
    (["plan", "--wandb-tags", ""], "has 0 characters; W&B takes 1 to 64"),
    (["plan", "--wandb-group", "g" * 129], "logging.group (--wandb-group)"),
    (["plan", "--run-name", "n" * 129], "logging.run_name (--run-name)"),
    # deeply nested values: a RecursionError in the TOML parser
    (["plan", "--config", "{T}/deep.toml"], "nested too deeply"),
    (["plan", "--set", "train.steps=" + "[" * 600 + "]" * 600], "nested too deeply"),
    # pass-through sbatch options that break reading the job id; mount lists that cannot hold the run folder
    (["submit", *SUBMIT[1:], "--sbatch=--parsable"], "--parsable would break reading the job id"),
    (["submit", *SUBMIT[1:], "--sbatch=--quiet"], "--quiet would break reading the job id"),
    (["submit", *SUBMIT[1:], "--sbatch", "--wait"], "hpcmega submit --wait"),
    (["submit", *SUBMIT[1:], "--sbatch=--test-only"], "--dry-run"),
    (["submit", *SUBMIT[1:], "--container", "img", "--run-dir", "{T}/a,b"], "contains ','"),
    (["submit", *SUBMIT[1:], "--container", "img", "--run-dir", "{T}/a:b"], "contains ':'"),
    (["submit", *SUBMIT[1:], "--container", "img", "--container-mount", "/a:/a,/b:/b"], "without ','"),
    # run folders the filesystem cannot hold
    (["submit", *SUBMIT[1:], "--run-dir", "{T}/" + "r" * 300], "is 300 bytes; the filesystem takes 255"),
    (["submit", *SUBMIT[1:], "--run-dir", "{T}/" + "/".join(["d" * 200] * 20)], "the files inside need 200 more"),
    (["submit", *SUBMIT[1:], "--run-dir", "{T}/loop/run"], "Symlink loop"),
    (["submit", *SUBMIT[1:], "--run-dir", "{T}/bad\udcff"], "is not UTF-8 text"),
    (["submit", *SUBMIT[1:], "--run-dir", "{T}/file/run"], "is a file, not a folder"),
    ([*RUN, "--run-dir", "{T}/" + "r" * 300], "is 300 bytes; the filesystem takes 255"),
    ([*RUN, "--run-dir", "{T}/loop/run"], "Symlink loop"),
    ([*RUN, "--run-dir", "{T}/bad\udcff"], "is not UTF-8 text"),
    (["run", "--nproc", BIG, "--cpu"], "is not in the range 1<=x<=1024"),
    (["resume", "{T}/runs/done", "--nproc", BIG], "is not in the range 1<=x<=1024"),
    (["ls", "{T}/" + "r" * 300], "File name too long"),
    (["bench", "--steps", BIG], "is not in the range 1<=x<=1000000"),
    (["bench", "--repeats", BIG], "is not in the range 1<=x<=1000"),
    # sample / ckpt export / plot
    (["sample", "bogus://bucket/run"], "unknown storage protocol 'bogus://'"),
    (["sample", "s3://bucket/run"], "no AWS credentials"),
    (["ckpt", "export", "bogus://bucket/run", "--to", "hf", "{T}/out"], "unknown storage protocol 'bogus://'"),
    (["ckpt", "export", "s3://bucket/run", "--to", "hf", "{T}/out"], "no AWS credentials"),
    (["sample", "{T}/runs/done", "--temperature", "nan"], "'nan' is not a finite number"),
    (["sample", "{T}/runs/done", "--temperature", "inf"], "'inf' is not a finite number"),
    (["sample", "{T}/runs/done", "--seed", str(2**70)], "is not in the range 0<=x<=9223372036854775807"),
    (["sample", "{T}/runs/done", "--max-new-tokens", BIG], "is not in the range 1<=x<=4194304"),
    (["plot", "{T}/runs/done", "--out", "{T}/no-such-folder/loss.png"], "no-such-folder does not exist"),
    (["plot", "{T}/runs/done", "--out", "{T}/loss.txt"], "name a .png"),
    # data prepare
    (["data", "prepare", "--source", "shakespeare", "--out", "{T}/d", "--workers", BIG], "0<=x<=1024"),
    (["data", "prepare", "--source", "shakespeare", "--out", "{T}/d", "--val-fraction", "nan"],
     "'nan' is not a finite number"),
    (["data", "prepare", "--source", "shakespeare", "--out", "{T}/d", "--shard-tokens", BIG], "1024<=x<="),
    (["data", "prepare", "--source", "shakespeare", "--out", "{T}/d", "--piece-bytes", BIG], "4096<=x<="),
]


def _hostile_folder(tmp_path: Path) -> None:
    """What the corpus refers to: a deep TOML file, a symlink loop, a file where a folder would go, a finished run."""
    (tmp_path / "deep.toml").write_text(DEEP_TOML)
    (tmp_path / "loop").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop")
    (tmp_path / "file").write_text("")
    done = tmp_path / "runs" / "done"
    done.mkdir(parents=True)
    (done / "jobs.jsonl").write_text('{"job_id": "local-1", "kind": "local", "pid": 1, "exit_code": 0}\n')
    (done / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0, "step_time_s": 0.1}\n')


@pytest.mark.parametrize("args,words", REFUSED_UP_FRONT, ids=[" ".join(a)[:60] for a, _ in REFUSED_UP_FRONT])
def test_bad_values_are_refused_in_one_line_before_anything_is_written(tmp_path, monkeypatch, args, words):
    import time

    for key in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    _hostile_folder(tmp_path)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    before = sorted(tmp_path.rglob("*"))
    start = time.monotonic()
    out = CliRunner().invoke(main, [a.replace("{T}", str(tmp_path)) for a in args])
    took = time.monotonic() - start
    assert out.exit_code == 2, (args, out.output, out.exception)
    errors = [line for line in out.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and words in errors[0] and "Traceback" not in out.output, out.stderr
    assert took < 10, f"{took:.1f} s: a hang guard (these answer in well under a second)"
    assert sorted(tmp_path.rglob("*")) == before  # no run folder, no file


def test_hostile_corpus_of_issue_19_covers_every_command():
    commands = {args[0] for args, _ in REFUSED_UP_FRONT}
    assert commands == {"plan", "submit", "run", "resume", "ls", "bench", "sample", "ckpt", "plot", "data"}
    assert len(REFUSED_UP_FRONT) >= 66


def test_bounds_are_declared_with_the_fields():
    """Every count that sizes a loop or an allocation, and every timeout, carries an upper bound in its declaration
    (hpcmega.config), so no check elsewhere can forget one."""
    from hpcmega.config import FIELDS

    unbounded = [k for k, f in FIELDS.items() if f.type is int and f.spec.le is None]
    assert unbounded == [], unbounded
    assert all(FIELDS[k].spec.le <= 7 * 24 * 3600 for k in
               ("cluster.collective_timeout_s", "cluster.first_step_timeout_s", "checkpoint.timeout_s"))


def test_largest_allowed_values_plan_quickly():
    """At the bounds (and one past them) `plan` answers: the per-rank pipeline loops are O(pp), not O(pp^2)."""
    import time

    for args in (["--nodes", "1250", "--gpus-per-node", "8", "--pp", "10000", "--layers", "10000",
                  "--global-batch", "10000", "--json"],):
        start = time.monotonic()
        out = CliRunner().invoke(main, ["plan", *args])
        assert out.exit_code == 0, out.output
        assert time.monotonic() - start < 60  # minutes before (pp_sends rebuilt the stage map per rank)


# -- 11. one damaged run folder, a dead SLURM controller, a local run inside an allocation --------------------------
def _run_folder(path: Path, jobs: str, metrics: str = "") -> None:
    path.mkdir(parents=True)
    (path / "jobs.jsonl").write_text(jobs)
    if metrics:
        (path / "metrics.jsonl").write_text(metrics)


def test_ls_skips_a_damaged_run_folder_with_a_warning(tmp_path):
    runs = tmp_path / "runs"
    _run_folder(runs / "good", '{"job_id": "local-1", "kind": "local", "pid": 1, "exit_code": 0}\n',
                '{"step": 1, "loss": 2.5, "step_time_s": 0.1}\n')
    _run_folder(runs / "bad-jobs", '{"job_id": "local-2", "kind": "local", "exit_code": "boom"}\n')
    _run_folder(runs / "bad-metrics", '[1]\n5\n{"job_id": "local-3", "kind": "local", "exit_code": 0}\n',
                '{"step": "x"}\n"text"\n{"step": 2, "loss": 1.5, "step_time_s": "slow"}\n' + "[" * 5000 + "\n")
    out = CliRunner().invoke(main, ["ls", str(runs)])
    assert out.exit_code == 0 and "Traceback" not in out.output, out.output
    assert re.search(r"^good +local-1 +COMPLETED +1/0 +2\.5000", out.stdout, re.M), out.stdout
    assert re.search(r"^bad-metrics +local-3 +COMPLETED +2/0 +1\.5000", out.stdout, re.M), out.stdout
    assert out.stderr.splitlines() == ["warning: skipping bad-jobs: damaged run folder (ValueError: invalid literal "
                                       "for int() with base 10: 'boom'); check its jobs.jsonl and metrics.jsonl"]
    status = CliRunner().invoke(main, ["status", str(runs / "bad-jobs")])
    assert status.exit_code == 1 and len(status.stderr.splitlines()) == 1 and "damaged run folder" in status.stderr
    assert CliRunner().invoke(main, ["status", str(runs / "bad-metrics")]).exit_code == 0


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="needs the SLURM client commands")
@pytest.mark.parametrize("ports,warning", [("SlurmctldPort|AccountingStoragePort", "SLURM controller unreachable: "),
                                           ("AccountingStoragePort", "SLURM accounting unreachable: ")])
def test_status_with_the_slurm_controller_down_is_one_line(tmp_path, ports, warning):
    """A real SLURM client talking to a controller (or slurmdbd) that does not answer (the dev cluster's config,
    its ports moved): one warning line and the run's own facts, in seconds (before: sacct's and submitit's errors,
    and with the controller down squeue's 18 s of retries)."""
    import time

    from conftest import hpcmega_exe

    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
    dead = tmp_path / "slurm.conf"
    dead.write_text(re.sub(rf"(?m)^({ports})=.*$", r"\1=1", conf.read_text()))
    run = tmp_path / "runs" / "r"
    _run_folder(run, json.dumps({"job_id": "123", "kind": "slurm", "folder": str(run / "slurm" / "x"), "tasks": 1})
                + "\n", '{"step": 3, "loss": 2.0, "step_time_s": 0.1}\n')
    for args in (["status", str(run)], ["ls", str(run.parent)]):
        start = time.monotonic()
        out = subprocess.run([hpcmega_exe(), *args], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "SLURM_CONF": str(dead)})
        assert out.returncode == 0, out.stderr
        assert len(out.stderr.splitlines()) == 1, out.stderr
        assert out.stderr.startswith(f"warning: {warning}"), out.stderr
        assert "UNKNOWN" in out.stdout and "3/0" in out.stdout, out.stdout
        assert time.monotonic() - start < 15


@pytest.mark.slurm
def test_logs_of_a_local_run_inside_a_slurm_allocation(slurm_cluster, tmp_path):
    """`hpcmega run` inside `salloc`: its ranks inherit SLURM_JOB_ID, and their attempt markers named the SLURM job
    instead of the local launch jobs.jsonl records, so `logs` printed nothing."""
    from conftest import CLI_ENV, hpcmega_exe

    run_dir = tmp_path / "run"
    cmd = [hpcmega_exe(), *TINY_RUN, "--nproc", "1", "--steps", "2", "--run-dir", str(run_dir)]
    r = subprocess.run(["salloc", "-N", "1", "--time", "5", *cmd], env=CLI_ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    logs = CliRunner().invoke(main, ["logs", str(run_dir)])
    assert logs.exit_code == 0 and "checkpoint step 2" in logs.stdout, logs.output
    job = json.loads((run_dir / "jobs.jsonl").read_text().splitlines()[0])["job_id"]
    assert f"==> hpcmega attempt: job={job} restart=0 rank=0 <==" in logs.stdout
