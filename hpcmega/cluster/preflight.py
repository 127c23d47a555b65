"""Checks made on the login node before anything is queued or written (no torch): the things that used to fail
only inside every rank -- after the queue wait, with a traceback per rank, or (an unwritable checkpoint folder) at
the first save after all the training. Each failure is one ConfigError line naming the fix (exit 2).
"""
from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

from hpcmega.config import SYNTHETIC, Config
from hpcmega.errors import ConfigError
from hpcmega.checkpoint.locate import resume_target
from hpcmega.checkpoint.rules import check_model_matches, check_trusted
from hpcmega.checkpoint.store import latest_checkpoint, list_checkpoints
from hpcmega.data.demo import is_demo, provide_demo_data
from hpcmega.data.index import check_dataset
from hpcmega.runs.files import RunFolder

# Where a run may keep its checkpoints: storage that outlives the rank processes (a path or file:// on a local or
# shared disk, object stores, HDFS). memory:// and other in-process filesystems vanish with the rank that wrote
# them, and every rank has its own: a save "succeeds" and nothing is left to resume from.
DURABLE_PROTOCOLS = ("file", "local", "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "hdfs", "webhdfs")
# Environment and files from which s3fs/botocore take credentials.
_AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI")


def checkpoint_location(cfg: Config, run_dir: str | Path) -> str:
    """Where this run's checkpoints go (checkpoint.url, else RUN_DIR/checkpoints): the one owner of that rule."""
    return RunFolder(run_dir).checkpoint_url(cfg)


def storage_filesystem(url: str, what: str):
    """(fs, path) for ``url``; ConfigError naming ``what`` (the flag) for an unknown protocol, a missing package or
    missing s3 credentials."""
    import fsspec

    protocol = url.split("://", 1)[0] if "://" in url else "file"
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise ConfigError(f"{what} {url!r}: unknown storage protocol '{protocol}://'; use a path, file:// or "
                          "s3://") from None
    except ImportError as e:
        raise ConfigError(f"{what} {url!r}: the '{protocol}://' protocol needs a package that is not installed "
                          f"({e}); install it or use another location") from None
    if protocol in ("s3", "s3a") and not _aws_credentials():
        raise ConfigError(f"{what} {url!r}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
                          "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment that submits and runs the job")
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def check_durable(url: str) -> None:
    """A checkpoint location must outlive the ranks (DURABLE_PROTOCOLS)."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol not in DURABLE_PROTOCOLS:
        raise ConfigError(f"--ckpt-url {url!r}: '{protocol}://' does not outlive the rank processes, so every "
                          "checkpoint would vanish; use a path on a shared disk, file:// or s3://")


def _aws_credentials() -> bool:
    if any(os.environ.get(k) for k in _AWS_ENV):
        return True
    files = [os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
             os.environ.get("AWS_CONFIG_FILE", "~/.aws/config")]
    return any(os.path.isfile(os.path.expanduser(f)) for f in files)


def check_data(cfg: Config, provide: bool = True) -> None:
    """Prepared data: its index's fields, every shard's size, vocabulary and splits (hpcmega.data.index). The demo
    corpus is prepared first if it is not yet (hpcmega.data.demo); a dry run (``provide=False``) writes nothing and
    leaves that to the real run."""
    if cfg.train.data == SYNTHETIC:
        return
    if is_demo(cfg.train.data):
        if not provide:
            return
        provide_demo_data(say=lambda line: print(line, file=sys.stderr))
    fs, root = storage_filesystem(cfg.train.data, "--data")
    check_dataset(cfg.train.data, fs, root, cfg.model.vocab_size, cfg.train.seq_len, cfg.train.eval_every)


def check_resume(cfg: Config, location: str) -> None:
    """An explicit --resume must be a complete checkpoint, trusted and of this model; with `auto`, the newest
    intact checkpoint in the location must be of this model."""
    target = cfg.checkpoint.resume
    if target == "none":
        return
    if target == "auto":
        fs, root = storage_filesystem(location, "--ckpt-url")
        latest = latest_checkpoint(list_checkpoints(location)) if fs.exists(root) else None
        if latest:
            check_model_matches(latest.meta, cfg, latest.url)
        return
    target = resume_target(target)
    fs, path = storage_filesystem(target, "--resume")
    if not fs.exists(path.rstrip("/") + "/meta.json"):
        what = "is not a complete checkpoint (no meta.json)" if fs.exists(path) else "does not exist"
        raise ConfigError(f"--resume {target} {what}; pick one listed complete by `hpcmega ckpt ls`, or --resume "
                          "auto / none")
    check_trusted(target, location, cfg.checkpoint.trust)
    try:
        meta = json.loads(fs.cat_file(path.rstrip("/") + "/meta.json"))
    except ValueError:
        raise ConfigError(f"--resume {target}: its meta.json is damaged; pick another checkpoint") from None
    check_model_matches(meta, cfg, target)


def probe_writable(location: str) -> None:
    """Write and delete a probe file where checkpoints will go (or the nearest existing folder above it)."""
    fs, path = storage_filesystem(location, "--ckpt-url")
    probe_dir = path.rstrip("/")
    if "://" not in location or location.startswith("file://"):
        while probe_dir and not os.path.exists(probe_dir):
            parent = os.path.dirname(probe_dir)
            if parent == probe_dir:
                break
            probe_dir = parent
    probe = f"{probe_dir}/.hpcmega-write-probe-{uuid.uuid4().hex[:8]}"
    try:
        fs.pipe_file(probe, b"probe")
        fs.rm(probe)
    except Exception as e:  # PermissionError, read-only FS, S3 AccessDenied, ...
        raise ConfigError(f"cannot write checkpoints to {location} ({type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0]}); choose a writable --ckpt-url or --run-dir") from None


# Bytes the files hpcmega writes inside a run folder add to its path (slurm/<stamp>/<job>_<rank>_log.out,
# checkpoints/step-N-<id>/__R_0.distcp, ...), kept free below the system's PATH_MAX.
_INSIDE_RUN_DIR = 200


def check_run_dir(run_dir: str | Path) -> None:
    """A run folder the filesystem can hold, refused in one line instead of an OSError after the first write:
    UTF-8 text, no name longer than NAME_MAX bytes, room below PATH_MAX for the files inside, no symlink loop, and
    no file where a folder must be."""
    path = Path(run_dir).absolute()
    try:
        encoded = str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"run folder {str(path)!r} is not UTF-8 text; choose a --run-dir of UTF-8 characters") \
            from None
    existing = next(p for p in (path, *path.parents) if os.path.lexists(p))
    name_max = os.pathconf(existing, "PC_NAME_MAX") if os.path.isdir(existing) else 255
    long = next((part for part in path.parts if len(part.encode()) > name_max), None)
    if long is not None:
        raise ConfigError(f"run folder name {long[:40]!r}... is {len(long.encode())} bytes; the filesystem takes "
                          f"{name_max}: choose a shorter --run-dir")
    path_max = os.pathconf(existing, "PC_PATH_MAX") if os.path.isdir(existing) else 4096
    if len(encoded) + _INSIDE_RUN_DIR > path_max:
        raise ConfigError(f"run folder {str(path)[:60]!r}... is {len(encoded)} bytes long; the files inside need "
                          f"{_INSIDE_RUN_DIR} more within {path_max}: choose a shorter --run-dir")
    try:
        path.resolve()
        os.stat(existing)
    except (OSError, RuntimeError) as e:  # symlink loop: RuntimeError before Python 3.13, OSError (ELOOP) after
        raise ConfigError(f"run folder {path}: {getattr(e, 'strerror', None) or e}; choose another --run-dir") \
            from None
    if not os.path.isdir(existing) and existing != path:
        raise ConfigError(f"run folder {path}: {existing} is a file, not a folder; choose another --run-dir")


def preflight(cfg: Config, run_dir: str | Path, probe: bool = True) -> None:
    """Everything above, in the order a user would fix it. ``probe=False`` for dry runs (they write nothing)."""
    check_run_dir(run_dir)
    location = checkpoint_location(cfg, run_dir)
    check_data(cfg, provide=probe)
    storage_filesystem(location, "--ckpt-url")
    check_durable(location)
    check_resume(cfg, location)
    if probe:
        probe_writable(location)
