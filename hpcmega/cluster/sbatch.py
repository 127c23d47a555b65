"""What may reach the sbatch script, checked before anything is rendered, written or queued (pure Python).

``#SBATCH`` lines are bash comments: a value that contains a newline ends the comment and its next line runs as a
command inside the job, whatever quoting the value gets. So every user value that reaches the script (scheduler
flags, ``--sbatch`` pass-through options, the run folder, names from a shared TOML profile) must be free of
control characters, pass-through option names must come from a known set (they are written unquoted), and the
options hpcmega sets itself are refused in every spelling sbatch accepts (``--ntasks=4``, ``--ntasks 4``,
``--ntasks-per-gpu``, ``--gres``), because sbatch would let a later line override the job's shape. One-letter
spellings (``-N 2``) and abbreviations (``--ntasks-per-n``) are refused: only full names are checked.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from hpcmega.errors import ConfigError

_LOGS = "the run folder (logs are written there)"
# sbatch options hpcmega sets from its own flags -> the flag to use instead.
MANAGED: dict[str, str] = {
    "nodes": "--nodes",
    "ntasks": "--nodes and --gpus-per-node", "ntasks-per-node": "--gpus-per-node (one task per GPU)",
    "ntasks-per-gpu": "--gpus-per-node (one task per GPU)", "ntasks-per-socket": "--gpus-per-node (one task per GPU)",
    "ntasks-per-core": "--gpus-per-node (one task per GPU)",
    "gpus": "--gpus-per-node", "gpus-per-node": "--gpus-per-node", "gpus-per-task": "--gpus-per-node",
    "gpus-per-socket": "--gpus-per-node", "gres": "--gpus-per-node",
    "time": "--time", "partition": "--partition", "account": "--account", "qos": "--qos",
    "constraint": "--constraint", "exclusive": "--exclusive", "mem": "--mem", "cpus-per-task": "--cpus-per-task",
    "job-name": "--job-name", "signal": "cluster.signal_grace_s",
    "output": _LOGS, "error": _LOGS, "input": _LOGS, "open-mode": "nothing (logs are appended across requeues)",
    "array": "--sweep (one array task per sweep point)", "dependency": "--after JOBID",
    "wrap": "nothing (hpcmega writes the script)",
    "requeue": "--requeue/--no-requeue", "no-requeue": "--requeue/--no-requeue",
}

# sbatch 22.05+ options that may be passed through unchanged.
PASS_THROUGH = frozenset("""
    batch bb bbf begin chdir cluster-constraint clusters comment container contiguous core-spec cores-per-socket
    cpu-freq cpus-per-gpu deadline delay-boot distribution exclude export export-file get-user-env
    gpu-bind gpu-freq gres-flags hint hold ignore-pbs kill-on-invalid-dep licenses mail-type mail-user mcs-label
    mem-bind mem-per-cpu mem-per-gpu mincpus network nice no-kill nodefile nodelist overcommit oversubscribe
    power prefer priority profile propagate reboot reservation sockets-per-node spread-job
    switches thread-spec threads-per-core time-min tmp use-min-nodes verbose wckey
""".split())
# sbatch options that change what sbatch prints or when it returns: submitit reads the job id from sbatch's
# "Submitted batch job N" line, right away -> what to do instead.
BREAKS_SUBMIT: dict[str, str] = {
    "parsable": "hpcmega reads the job id itself (`hpcmega status RUN` shows it)",
    "quiet": "hpcmega needs sbatch's 'Submitted batch job N' line to know the job",
    "wait": "use `hpcmega submit --wait` (blocks until the job ends)",
    "test-only": "use `hpcmega submit --dry-run` to see the job script without queueing it",
}

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_text(name: str, value: str, extra_forbidden: str = "") -> None:
    """Refuse a value that would break out of its ``#SBATCH`` line (any control character, e.g. a newline)."""
    bad = _CONTROL.search(value) or (extra_forbidden and re.search(f"[{re.escape(extra_forbidden)}]", value))
    if bad:
        raise ConfigError(f"{name}={value!r} contains {bad.group()!r}, which is not allowed in a SLURM job script; "
                          "remove it")


def _split(arg: str) -> tuple[str, str | None]:
    """One ``--sbatch`` argument -> (option name, value or None) for ``--name=value``, ``--name value``, ``--flag``."""
    text = arg.strip(" ")
    if not text.startswith("-"):
        raise ConfigError(f"--sbatch {arg!r} is not an sbatch option; write it as --{text}")
    m = re.fullmatch(r"--([^=\s]+)(?:(?:=|\s+)(.*))?", text, re.DOTALL)
    if not m:  # one-letter spellings (-N 2, -n4, ...) are refused rather than decoded
        raise ConfigError(f"--sbatch {arg!r}: write sbatch options in long form, e.g. --sbatch=--reservation=foo")
    return m.group(1), m.group(2)


def parse_sbatch_extra(extra: list[str]) -> dict[str, Any]:
    """``["--reservation=foo", "--requeue"]`` -> ``{"reservation": "foo", "requeue": True}``; ConfigError (naming the flag to use) for managed, unknown or unsafe options."""
    out: dict[str, Any] = {}
    for arg in extra:
        check_text("--sbatch", arg)
        key, value = _split(arg)
        if key in MANAGED:
            raise ConfigError(f"--sbatch {arg!r}: hpcmega sets --{key} itself; use {MANAGED[key]} instead")
        if key in BREAKS_SUBMIT:
            raise ConfigError(f"--sbatch {arg!r}: --{key} would break reading the job id from sbatch; "
                              f"{BREAKS_SUBMIT[key]}")
        if key not in PASS_THROUGH:
            raise ConfigError(f"--sbatch {arg!r}: unknown sbatch option --{key} (abbreviations are not accepted); "
                              "write the full option name, see `sbatch --help`")
        out[key] = value if value is not None else True
    return out


def check_cluster_values(cluster: Any) -> None:
    """Every cluster.* string that reaches the sbatch script, plus the pass-through options."""
    for key in ("partition", "account", "qos", "constraint", "mem", "time", "job_name", "container_image"):
        check_text(f"cluster.{key}", str(getattr(cluster, key)))
    for key in ("setup", "container_mounts"):
        for line in getattr(cluster, key):
            check_text(f"cluster.{key}", line)
    for name, value in cluster.env.items():
        check_text(f"cluster.env.{name}", f"{name}={value}")
    parse_sbatch_extra(list(cluster.sbatch_extra))


def check_run_folder(path: str) -> None:
    """The run folder appears in ``#SBATCH --output`` (where SLURM also expands ``%j``-style patterns)."""
    check_text("run folder", path, extra_forbidden="%")


_TIME = re.compile(r"^(?:(?P<days>\d+)-)?(?P<parts>\d+(?::\d+){0,2})$")


def parse_slurm_time(text: str) -> int:
    """Minutes in a SLURM ``--time`` value, rounded up like SLURM does.

    Accepts ``minutes``, ``minutes:seconds``, ``hours:minutes:seconds``, ``days-hours``, ``days-hours:minutes`` and
    ``days-hours:minutes:seconds``. Zero / UNLIMITED are refused: preemption handling needs a finite limit.
    """
    raw = str(text).strip()
    bad = (f"cluster.time={raw!r} is not a SLURM time limit; write minutes, MM:SS, HH:MM:SS or D-HH:MM:SS, "
           "e.g. 01:00:00")
    if raw.lower() in ("unlimited", "infinite"):
        raise ConfigError(f"cluster.time={raw!r}: give a finite time limit such as 24:00:00 "
                          "(the job saves and requeues before it)")
    m = _TIME.match(raw)
    if not m:
        raise ConfigError(bad)
    nums = [int(x) for x in m.group("parts").split(":")]
    if m.group("days") is not None:
        hours, minutes, seconds = (nums + [0, 0])[:3]
        days = int(m.group("days"))
        if hours >= 24 or (len(nums) > 1 and minutes >= 60) or (len(nums) > 2 and seconds >= 60):
            raise ConfigError(bad)
    else:
        days = 0
        if len(nums) == 1:
            hours, minutes, seconds = 0, nums[0], 0
        elif len(nums) == 2:
            hours, (minutes, seconds) = 0, nums
            if seconds >= 60:
                raise ConfigError(bad)
        else:
            hours, minutes, seconds = nums
            if minutes >= 60 or seconds >= 60:
                raise ConfigError(bad)
    total_s = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total_s == 0:
        raise ConfigError(f"cluster.time={raw!r} means no limit to SLURM; give a finite time limit such as 01:00:00")
    return math.ceil(total_s / 60)


def container_mounts(cluster: Any, run_dir: str) -> list[str]:
    """The bind mounts of a container job, ``SRC:DST[:FLAGS]`` each: the run folder and cluster.container_mounts.
    pyxis (--container-mounts) and apptainer (--bind) split the list at ',' and each mount at ':', with no way to
    escape either, so a run folder holding one of them, or a mount holding a ',', is refused."""
    run = str(Path(run_dir).absolute()) if run_dir else ""
    if run and ("," in run or ":" in run):
        raise ConfigError(f"run folder {run!r} contains {',' if ',' in run else ':'!r}, which the container's "
                          "mount list cannot hold; choose a run folder without ',' and ':' (or run without "
                          "--container)")
    for mount in cluster.container_mounts:
        if "," in mount or not mount.split(":")[0]:
            raise ConfigError(f"cluster.container_mounts {mount!r}: write one SRC:DST[:FLAGS] per "
                              "--container-mount, without ','")
    return ([f"{run}:{run}"] if run else []) + list(cluster.container_mounts)
