"""SLURM submission through submitit: executor parameters from the config, the exact sbatch script, waiting.

One task per GPU (``--ntasks-per-node = gpus_per_node``) and no torchrun: every task runs
``hpcmega.training.job.run_rank`` and reads its rank from SLURM's environment (hpcmega.cluster.distenv). ``srun`` runs with
``--kill-on-bad-exit=1`` so one failed rank ends the step instead of leaving the others blocked in a collective.

The sbatch script shown by ``--dry-run`` is rendered by submitit's own script builder from the same parameters
the executor gets, so the preview is the script that would be queued (tests compare the two).
"""
from __future__ import annotations

import pickle
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcmega.cluster.distenv import JOB_ENV
from hpcmega.cluster.sbatch import check_cluster_values, check_run_folder, container_mounts, parse_sbatch_extra, \
    parse_slurm_time
from hpcmega.config import Config
from hpcmega.runs.files import RunFolder

# What every task of a submitted job runs: entry(cfg_dict, run_dir). Handed in by the commands (the rank entry
# point lives above this floor, in hpcmega.training.job).
Entry = Callable[[dict, str], Any]

# sacct states after which a job will not run again (a requeued job shows REQUEUED/PENDING instead).
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED", "REVOKED", "SPECIAL_EXIT"}

SETUP_LINES = [
    # One thread per rank unless the site or the user says otherwise (ranks share the node's cores).
    'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"',
    # NCCL error handling, flight recorder, allocator (hpcmega.cluster.distenv.JOB_ENV); a value the user exports wins.
    *(f'export {name}="${{{name}:-{value}}}"' for name, value in JOB_ENV.items()),
]


def gres_gpus(gres: str) -> int | None:
    """GPUs per node in a SLURM GRES string: 'gpu:8', 'gpu:h100:8(S:0-1)', 'gpu:a100:4,shard:8' -> 8, 8, 4;
    None when it names no GPU ('(null)', '', 'shard:2')."""
    total = 0
    for item in gres.split(","):
        parts = item.strip().split("(")[0].split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total or None


def partition_gpus(partition: str = "") -> tuple[int, str] | None:
    """(GPUs per node, description) of ``partition`` (default: SLURM's default partition) from ``sinfo``'s GRES;
    the smallest count when node types differ. None without sinfo, without an answer, or without GPU GRES."""
    out = _run(["sinfo", "-h", "-o", "%P|%G"] + (["-p", partition] if partition else []), timeout=10)
    counts: dict[str, list[int]] = {}
    default = ""
    for line in out.splitlines():
        name, _, gres = line.partition("|")
        if name.endswith("*"):
            name = default = name[:-1]
        count = gres_gpus(gres)
        if count:
            counts.setdefault(name, []).append(count)
    name = partition or default
    if name not in counts:
        return None
    return min(counts[name]), f"partition {name}'s GRES gpu:{min(counts[name])} (sinfo)"


def executor_parameters(cfg: Config, root: Path) -> dict[str, Any]:
    """Keyword arguments for ``submitit.SlurmExecutor.update_parameters`` (its native sbatch names) for a job whose
    run folders live under ``root`` (the run folder, or a sweep's folder)."""
    c = cfg.cluster
    check_cluster_values(c)  # validate() already refused these; a script is never rendered from unchecked values
    params: dict[str, Any] = {
        "job_name": c.job_name or root.name,
        "time": parse_slurm_time(c.time),
        "nodes": c.nodes,
        "ntasks_per_node": c.gpus_per_node,  # one task per GPU (with --cpu: per CPU rank)
        "signal_delay_s": c.signal_grace_s,  # -> --signal=USR2@<grace>: time to save before the limit
        "srun_args": ["--kill-on-bad-exit=1", *container_srun_args(cfg, root)],
        "setup": job_setup(cfg),
        "wckey": None,  # submitit would tag every job "submitit"; leave the site's default
    }
    if not c.cpu:
        params["gpus_per_node"] = c.gpus_per_node
    for key in ("partition", "account", "qos", "constraint", "mem"):
        if getattr(c, key):
            params[key] = getattr(c, key)
    if c.cpus_per_task > 0:
        params["cpus_per_task"] = c.cpus_per_task
    if c.exclusive:
        params["exclusive"] = True
    params["additional_parameters"] = {"requeue" if c.requeue else "no-requeue": True,
                                       **parse_sbatch_extra(c.sbatch_extra)}
    return params


def job_teardown(cfg: Config, root: Path, folder: Path) -> list[str]:
    """The script's last lines: after a failed job step, hpcmega.cluster.restarts records the failure and says
    whether the job requeues itself (a crash after training and saving), ends as a success (every rank had
    finished) or fails with the step's status."""
    c = cfg.cluster
    python = python_command(cfg, root)
    if c.container_image and c.container_runtime == "pyxis":  # the helper runs where the ranks do
        python = shlex.join(["srun", "--nodes=1", "--ntasks=1", *container_srun_args(cfg, root), "python3"])
    decide = f"{python} -u -m hpcmega.cluster.restarts {shlex.quote(str(Path(folder).absolute()))}"
    return [
        "hpcmega_status=$?",
        'if [ "$hpcmega_status" -ne 0 ]; then',
        f'  hpcmega_action=$({decide} "$hpcmega_status" | tail -n 1)',
        '  hpcmega_job="${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}"',
        '  if [ "$hpcmega_action" = requeue ] && scontrol requeue "${hpcmega_job:-$SLURM_JOB_ID}"; then',
        "    sleep 600  # SLURM ends this attempt and queues the job again",
        "  fi",
        '  if [ "$hpcmega_action" = finished ]; then exit 0; fi',
        "fi",
        'exit "$hpcmega_status"',
    ]


def job_setup(cfg: Config) -> list[str]:
    """The script's set-up: ``[cluster.env]`` exports, then the user's lines (module loads, venv activation; they
    may use those variables), then hpcmega's defaults (which keep a value already set). srun passes the batch
    script's environment on to every task."""
    exports = [f"export {key}={shlex.quote(value)}" for key, value in cfg.cluster.env.items()]
    return [*exports, *cfg.cluster.setup, *SETUP_LINES]


def container_srun_args(cfg: Config, root: Path) -> list[str]:
    """pyxis: srun runs every task in the image, with ``root`` (and the given mounts) bind-mounted."""
    c = cfg.cluster
    if not c.container_image or c.container_runtime != "pyxis":
        return []
    mounts = ",".join(container_mounts(c, str(root)))
    return [f"--container-image={c.container_image}", f"--container-mounts={mounts}",
            f"--container-workdir={Path.cwd()}"]


def python_command(cfg: Config, root: Path) -> str:
    """What runs submitit's entry point: this interpreter, or the container's ``python3`` (apptainer wraps it,
    with ``root`` bound)."""
    c = cfg.cluster
    if not c.container_image:
        return shlex.quote(sys.executable)
    if c.container_runtime == "pyxis":
        return "python3"
    binds = "".join(f" --bind {shlex.quote(m)}" for m in container_mounts(c, str(root)))
    return f"apptainer exec{'' if c.cpu else ' --nv'}{binds} {shlex.quote(c.container_image)} python3"


def submission_folder(run_dir: str | Path) -> Path:
    """A fresh submitit folder inside ``run_dir`` (RUN/slurm/<stamp>: its run folder is two levels up)."""
    return RunFolder(run_dir).submission_folder()


def submitit_command(folder: Path, python: str | None = None) -> str:
    """The command submitit's SlurmExecutor puts after ``srun`` (it unpickles and calls the submitted function)."""
    return " ".join([python or shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])


def sbatch_script(cfg: Config, folder: Path, count: int = 1, after: str | None = None) -> str:
    """The sbatch script ``submit`` would queue (a job array of ``count`` tasks when count > 1) from submitit folder
    ``folder`` (submission_folder), rendered by submitit's script builder from the parameters the executor gets.
    Writes nothing."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = Path(folder).absolute()
    check_run_folder(str(folder))  # it appears in #SBATCH --output; the one check of a dry run's folder
    root = folder.parents[1]
    params = array_parameters(cfg, root, after, folder)
    if count > 1:
        params["map_count"] = count
    python = python_command(cfg, root)
    return _make_sbatch_string(command=submitit_command(folder, python), folder=folder, **params)


class SubmitError(RuntimeError):
    """sbatch refused the job (bad partition, account, ...): the message is SLURM's; or there is no srun here."""


@dataclass(frozen=True)
class SubmittedJob:
    job_id: str
    folder: Path  # submitit's folder: <jobid>_submission.sh, <jobid>_<task>_log.out/.err, result pickles

    def log(self, task: int = 0, stream: str = "out") -> Path:
        return self.folder / f"{self.job_id}_{task}_log.{stream}"

    def result_pickle(self, task: int = 0) -> Path:
        return self.folder / f"{self.job_id}_{task}_result.pkl"

    def result(self, task: int = 0) -> tuple[str, Any] | None:
        """submitit's ("success", value) or ("error", traceback) for one task, None if it wrote none."""
        try:
            with open(self.result_pickle(task), "rb") as f:
                return pickle.load(f)
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError):
            return None


def submit(entry: Entry, cfg: Config, after: str | None = None) -> SubmittedJob:
    """Queue the job for the run folder ``cfg`` is bound to (RunFolder.bind): every task calls
    ``entry(cfg_dict, run_dir)`` (the commands pass ``hpcmega.training.job.run_rank``). The config travels as a
    plain dict (the resolved Config, which holds no secrets: API keys stay in the environment)."""
    return submit_array(entry, [cfg], RunFolder.of(cfg).path, after)[0]


def array_parameters(cfg: Config, root: Path, after: str | None = None,
                     folder: Path | None = None) -> dict[str, Any]:
    """The executor parameters of a submission whose run folders live under ``root`` (a sweep folder for an
    array): the job name and container mounts follow ``root``; ``after`` adds ``--dependency=afterok:<id>``;
    ``folder`` (submitit's) adds the restart-after-a-crash teardown."""
    params = executor_parameters(cfg, root)
    if after:
        params["dependency"] = f"afterok:{after}"
    if folder is not None:
        params["teardown"] = job_teardown(cfg, root, folder)
    return params


def submit_array(entry: Entry, points: list[Config], root: Path, after: str | None = None) -> list[SubmittedJob]:
    """One sbatch from ``root`` (the run folder, or a sweep's folder): a single job, or -- for several points,
    each bound to its own run folder -- one job array with one array task per point (submitit's
    ``executor.batch()``), all with the first point's executor parameters (the caller checks that every point has
    the same ones). Each point's run folder gets its config and its job record."""
    import submitit

    root = Path(root).absolute()
    folder = submission_folder(root)
    check_run_folder(str(folder))  # it appears in #SBATCH --output; the one check of a submission's folder
    first = points[0]
    calls = [(cfg.to_dict(), str(RunFolder.of(cfg).path)) for cfg in points]
    try:
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=first.cluster.max_requeues,
                                          python=python_command(first, root))
    except RuntimeError as e:  # no srun on PATH
        raise SubmitError(f"{e} -- run `hpcmega submit` on a SLURM login node, or `hpcmega run` locally") from None
    executor.update_parameters(**array_parameters(first, root, after, folder))
    try:
        if len(calls) == 1:
            jobs = [executor.submit(entry, *calls[0])]
        else:
            with executor.batch():
                jobs = [executor.submit(entry, *call) for call in calls]
    except (submitit.core.utils.FailedJobError, subprocess.CalledProcessError) as e:
        message = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        _remove_empty_submission(folder, root)
        raise SubmitError(f"sbatch refused the job: {message}") from None
    for cfg, job in zip(points, jobs):
        run = RunFolder.of(cfg)
        run.write_config(cfg.to_toml())  # readable while queued
        run.record_job({"job_id": str(job.job_id), "kind": "slurm", "folder": str(folder),
                        "tasks": cfg.world_size, **({"after": after} if after else {})})
    return [SubmittedJob(str(job.job_id), folder) for job in jobs]


def _remove_empty_submission(folder: Path, run_dir: Path) -> None:
    """After sbatch refused a job: drop the submission folder (only submitit's pickle and script are in it) and
    the run folder's directories if that leaves them empty, so a refused submit leaves nothing behind."""
    shutil.rmtree(folder, ignore_errors=True)
    for path in (folder.parent, run_dir):
        try:
            path.rmdir()  # only if empty
        except OSError:
            break


# -- job state ---------------------------------------------------------------------------------------------------
def _run(cmd: list[str], timeout: float = 60) -> str:
    if not shutil.which(cmd[0]):
        return ""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout if out.returncode == 0 else ""


def job_state(job_id: str) -> str:
    """The job's state: sacct's (accounting) for the allocation, else squeue's while it is queued or running.
    'CANCELLED by 0' -> 'CANCELLED'; 'UNKNOWN' when neither knows it yet."""
    lines = _run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"]).split()
    state = lines[0] if lines else ""
    if not state:
        state = _run(["squeue", "-h", "-j", job_id, "-o", "%T"]).strip()
    return normalise_state(state)


def normalise_state(state: str) -> str:
    """A SLURM state as sacct/squeue/submitit print it -> its name: 'CANCELLED by 1000' -> 'CANCELLED',
    'COMPLETED+' -> 'COMPLETED', '' -> 'UNKNOWN'."""
    return state.split()[0].rstrip("+") if state.strip() else "UNKNOWN"


def _ask(name: str, cmd: list[str], timeout: float) -> subprocess.CompletedProcess | str | None:
    """Run a SLURM client probe: None when it succeeded, a one-line reason when it could not run, else its result."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"{name} gave no answer in {timeout:g} s"
    except OSError as e:
        return f"{name}: {e}"
    return None if out.returncode == 0 else out


def controller_problem(timeout: float = 15) -> str | None:
    """None when slurmctld answers ``scontrol ping`` (in ~20 ms, where a squeue against a dead controller retries
    for ~18 s); else what is wrong, in one line."""
    if not shutil.which("scontrol"):
        return "scontrol not found (no SLURM client on this machine)"
    out = _ask("scontrol ping", ["scontrol", "ping"], timeout)
    if out is None or isinstance(out, str):
        return out
    lines = [line.strip() for line in (out.stdout + out.stderr).splitlines() if line.strip("* \n")]
    return lines[0] if lines else f"scontrol ping exited with {out.returncode}"


def accounting_problem(job_ids: list[str], timeout: float = 30) -> str | None:
    """None when sacct answers for ``job_ids``; else its error, in one line (slurmdbd down, accounting off)."""
    if not shutil.which("sacct"):
        return "sacct not found"
    out = _ask("sacct", ["sacct", "-n", "-X", "-o", "JobID", "-j", ",".join(job_ids)], timeout)
    if out is None or isinstance(out, str):
        return out
    lines = [line.strip() for line in out.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else f"sacct exited with {out.returncode}"


def job_exit_code(job_id: str) -> str:
    out = _run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "ExitCode"]).split()
    return out[0] if out else ""


def wait_for_job(job_id: str, poll_s: float = 2.0, on_change: Callable[[str], None] | None = None,
                 on_poll: Callable[[], None] | None = None, unknown_grace_s: float = 120.0) -> str:
    """Block until the job reaches a state it will not leave (a requeue is not the end); return that state.

    Returns 'UNKNOWN' if neither sacct nor squeue has known the job for ``unknown_grace_s`` (a cluster without
    accounting forgets finished jobs after MinJobAge); the caller then reads the tasks' result files.
    """
    last, unknown_since = None, None
    while True:
        state = job_state(job_id)
        if state != last and on_change:
            on_change(state)
        last = state
        if on_poll:
            on_poll()
        if state in TERMINAL_STATES and not _run(["squeue", "-h", "-j", job_id, "-o", "%T"]).strip():
            return state
        if state == "UNKNOWN":
            unknown_since = unknown_since or time.monotonic()
            if time.monotonic() - unknown_since > unknown_grace_s:
                return state
        else:
            unknown_since = None
        time.sleep(poll_s)


class LogFollower:
    """Prints the lines appended to a log file since the last call (``tail -f`` for --wait)."""

    def __init__(self, path: Path, write: Callable[[str], None]) -> None:
        self.path, self.write, self.offset = path, write, 0

    def __call__(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return
        end = chunk.rfind(b"\n") + 1  # whole lines only; a partial last line waits for the next call
        if end:
            self.write(chunk[:end].decode(errors="replace"))
            self.offset += end
