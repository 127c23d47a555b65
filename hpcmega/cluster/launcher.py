"""`hpcmega run --nproc N`: the job on this machine, N rank processes with the same entry point as a SLURM task.

Why our own launcher and not torchrun: a SLURM task runs ``hpcmega.training.job.run_rank`` directly (one task per GPU), and
a local run must exercise the same code path, environment reading included. The launcher only does what srun
does for a job step: start the ranks with their environment, collect their output, and end all of them as soon as
one fails (srun's ``--kill-on-bad-exit``), so a dead rank never leaves its peers waiting in a collective.

A stop is a save: the first SIGINT (Ctrl-C) or SIGTERM (`kill`, `hpcmega cancel`) is passed on to the ranks as USR2,
their stop signal, so they agree on a step boundary, save it and exit with EXIT_UNFINISHED; a second one aborts at
once without saving. SIGTERM itself stays the launcher's way to end ranks (after a failure, or on that abort).
"""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import IO

from hpcmega.config import Config, resolve_defaults
from hpcmega.cluster.distenv import JOB_ENV
from hpcmega.errors import EXIT_UNFINISHED
from hpcmega.cluster.console import Console
from hpcmega.cluster.process import LAUNCHER_PID_ENV, block_stop_signals
from hpcmega.runs.files import CONFIG, LOCAL_JOB_ENV, RunFolder

# After the first rank fails, how long the others get to exit on SIGTERM before SIGKILL.
TERMINATE_GRACE_S = 5.0
# What a user stops `hpcmega run` with: the first one saves and stops, a second one aborts.
USER_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def local_config(cfg: Config, nproc: int, cpu: bool) -> Config:
    """The config a local run really uses: one node with ``nproc`` ranks (GPUs, or CPU processes with gloo), its
    unset values resolved for that machine (bf16 + selective recompute on GPUs, fp32 on CPU)."""
    out = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster), train=dataclasses.replace(cfg.train),
                              parallel=dataclasses.replace(cfg.parallel))
    out.cluster.nodes = 1
    out.cluster.gpus_per_node = nproc
    out.cluster.nvlink_domain_nodes = 1
    out.cluster.cpu = cpu
    resolve_defaults(out)
    return out


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host`` (the rendezvous binds it a moment later)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def rank_env(rank: int, nproc: int, port: int, node: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of local rank ``rank``: what hpcmega.cluster.distenv reads in launcher mode."""
    env = dict(os.environ if base is None else base)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        HPCMEGA_NODE=node,
        PYTHONUNBUFFERED="1",
    )
    env[LAUNCHER_PID_ENV] = str(os.getpid())  # the rank dies with this process (hpcmega.cluster.process)
    env.setdefault("OMP_NUM_THREADS", "1")  # N ranks on one machine must not each start one thread per core
    for name, value in JOB_ENV.items():  # the same job environment as under SLURM; the user's values win
        env.setdefault(name, value)
    return env


def _tail(path: Path, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(deque(f, maxlen=lines))
    except OSError:
        return ""


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class LocalLauncher:
    """Start ``nproc`` ranks of ``python -m hpcmega.training.job``; stream rank 0; stop everything when one rank fails."""

    def __init__(self, config_path: Path, run_dir: Path, nproc: int, out: IO[str] | None = None) -> None:
        self.config_path, self.run_dir, self.nproc = config_path, run_dir, nproc
        self.console = Console(out or sys.stdout)  # never blocks or fails training (hpcmega.cluster.console)
        self.folder = RunFolder(run_dir)
        self.job_id = f"local-{os.getpid()}"
        self.procs: list[subprocess.Popen] = []
        self._stream_thread: threading.Thread | None = None

    def log_path(self, rank: int) -> Path:
        return self.folder.local_log(rank)

    def _spawn(self) -> None:
        """Start the ranks with the stop signals blocked (inherited): one sent while a rank is still starting
        waits until the rank's StopFlag is installed, instead of killing it."""
        previous = block_stop_signals()
        try:
            self._spawn_ranks()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def _spawn_ranks(self) -> None:
        self.log_path(0).parent.mkdir(parents=True, exist_ok=True)
        port = free_port()
        node = socket.gethostname()
        cmd = [sys.executable, "-u", "-m", "hpcmega.training.job", "--config", str(self.config_path),
               "--run-dir", str(self.run_dir)]
        for rank in range(self.nproc):
            env = {**rank_env(rank, self.nproc, port, node), LOCAL_JOB_ENV: self.job_id}
            if rank == 0:
                proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        errors="replace", start_new_session=True)
                self._stream_thread = threading.Thread(target=self._stream, args=(proc,), daemon=True)
                self._stream_thread.start()
            else:
                with open(self.log_path(rank), "a") as log:  # appended across attempts (see runs.files)
                    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
            self.procs.append(proc)

    def _stream(self, proc: subprocess.Popen) -> None:
        """Rank 0's output goes to the console and to logs/rank0.log."""
        assert proc.stdout is not None
        with open(self.log_path(0), "a") as log:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                self.console.write(line)

    def _signal_all(self, sig: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, sig)  # the rank's own session: also reaches its helper processes
                except ProcessLookupError:
                    pass

    def _stop_all(self) -> None:
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + TERMINATE_GRACE_S
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.05)
        self._signal_all(signal.SIGKILL)
        for proc in self.procs:
            proc.wait()

    def run(self) -> int:
        """Run to completion; returns 0 when every rank succeeded, else the first failure's status (>= 1). The
        launch and its end are recorded in the run folder's jobs.jsonl (`hpcmega ls/status` read them)."""
        self.folder.record_job({"job_id": self.job_id, "kind": "local", "pid": os.getpid(),
                                "host": socket.gethostname(), "nproc": self.nproc})
        code = 1
        try:
            code = self._run()
        finally:
            self.folder.record_job({"job_id": self.job_id, "end": time.time(), "exit_code": code})
        return code

    def _run(self) -> int:
        stops: list[int] = []

        def on_stop(signum: int, _frame: object) -> None:
            stops.append(signum)
            if len(stops) == 1:
                self.console.write(f"hpcmega run: {signal.Signals(signum).name}: saving at the next step boundary, "
                                   "then stopping (Ctrl-C again to abort without saving)\n")
                self._signal_all(signal.SIGUSR2)

        previous = {sig: signal.signal(sig, on_stop) for sig in USER_STOP_SIGNALS}
        previous[signal.SIGUSR2] = signal.signal(signal.SIGUSR2, lambda *_: self._signal_all(signal.SIGUSR2))
        failed: tuple[int, int] | None = None
        try:
            self._spawn()
            if stops:  # a stop that came while the ranks were being started reaches the late ones too
                self._signal_all(signal.SIGUSR2)
            failed = self._wait(lambda: len(stops) > 1)
            if failed is not None or len(stops) > 1:
                self._stop_all()
            if self._stream_thread is not None:
                self._stream_thread.join(timeout=10)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if any(p.poll() is None for p in self.procs):
                self._stop_all()

        status = self._report(stops[1] if len(stops) > 1 else None, failed)
        self.console.close()
        return status

    def _wait(self, aborted) -> tuple[int, int] | None:
        """Until every rank has ended, one has failed (returned as (rank, code)) or ``aborted()``. A rank that
        stopped unfinished (EXIT_UNFINISHED, after the agreed save) is not a failure: its peers end the same way."""
        while not aborted():
            codes = [p.poll() for p in self.procs]
            bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0, EXIT_UNFINISHED)]
            if bad:
                # A rank killed by a signal (OOM killer, segfault) is the cause; its peers then fail with
                # "connection reset" errors, possibly before we look again.
                return min(bad, key=lambda rc: (rc[1] > 0, rc[0]))
            if all(c is not None for c in codes):
                return None
            time.sleep(0.05)
        return None

    def _report(self, abort_signal: int | None, failed: tuple[int, int] | None) -> int:
        if abort_signal is not None:
            self.console.write(f"hpcmega run: aborted by a second {signal.Signals(abort_signal).name}; all ranks "
                               "ended without saving (the last checkpoint is kept)\n")
            return 128 + abort_signal
        if failed is not None:
            rank, code = failed
            if self.folder.finished(self.job_id):
                self.console.write(f"hpcmega run: rank {rank} ended badly ({_describe(code)}) after the run had "
                                   "finished and saved; the run is complete\n")
                return 0
            self.console.write(f"hpcmega run: rank {rank} failed ({_describe(code)}); stopped the other ranks\n")
            if rank != 0:
                tail = _tail(self.log_path(rank))
                if tail:
                    self.console.write(f"--- last lines of {self.log_path(rank)} ---\n{tail}")
            return code if code > 0 else 1
        if any(p.returncode == EXIT_UNFINISHED for p in self.procs):
            self.console.write("hpcmega run: training stopped before its last step (a stop signal); the "
                               "checkpoint is saved -- `hpcmega resume` (or the same command) continues\n")
            return EXIT_UNFINISHED
        return 0


def launch_local(cfg: Config, nproc: int, out: IO[str] | None = None) -> int:
    """Write the resolved config into its run folder (``cfg`` is bound to it: RunFolder.bind) and run ``nproc``
    local ranks on it."""
    folder = RunFolder.of(cfg)
    folder.path.mkdir(parents=True, exist_ok=True)
    folder.write_config(cfg.to_toml())
    return LocalLauncher(folder / CONFIG, folder.path, nproc, out).run()
