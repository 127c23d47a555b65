"""Evidence of a hang (or any failure) in the run folder, from every rank, whatever the backend: RUN_DIR/debug/.

NCCL: torch's flight recorder keeps each rank's last collectives (hpcmega.cluster.distenv.JOB_ENV) and dumps them
itself when a collective times out -- into the file ``TORCH_FR_DUMP_TEMP_FILE`` names, which every rank points at
RUN_DIR/debug/fr_trace_rank_<rank> (:func:`hpcmega.cluster.distenv.flight_recorder_env`) instead of node-local
/tmp, which vanishes with the allocation.

Gloo, and any error that reaches Python: the flight recorder records gloo's collectives too, but nothing dumps it,
and the rank that hangs raises nothing -- the others time out waiting for it. So the first rank that fails writes
its evidence and tells the others through the job's store; every rank's watcher thread (polling the store) then
writes its own. Per rank: ``fr_trace_rank_<rank>`` (the flight-recorder entries in torch's own pickle format: the
rank whose last collective sequence number is behind the others' never reached the next one; docs/runtime.md) and
``stacks_rank_<rank>.txt`` (why it dumped, and every thread's Python stack from faulthandler: the hung rank's shows
where it is stuck). The failing rank waits for the others' dumps (bounded) before it exits: the
store lives with rank 0, and the launcher or srun ends the peers once a rank has exited.

The flight recorder's dump function is private (``torch._C._distributed_c10d._dump_fr_trace``); :func:`fr_dump` is
the one seam, pinned by tests/test_job_runtime.py.
"""
from __future__ import annotations

import faulthandler
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from hpcmega.runs.files import DEBUG, fr_trace_name, stacks_name

_ASKED = "hpcmega/debug/dump"  # set (to the reason) by the first rank that fails
_DONE = "hpcmega/debug/dumped"  # one count per rank that wrote its evidence


def fr_dump() -> bytes:
    """This process's flight-recorder entries (every process group), in torch's pickle format."""
    import torch._C._distributed_c10d as c10d

    return c10d._dump_fr_trace()


class HangEvidence:
    """Started on every rank once the process group is up; :meth:`on_failure` from the rank whose collective timed
    out (or that failed otherwise), :meth:`stop` at the end of a healthy run. ``store``: a client of the job's
    rendezvous store (a ``torch.distributed.Store``; None for a single rank)."""

    def __init__(self, run_dir: str | Path, rank: int, world_size: int, store: Any,
                 poll_s: float | None = None) -> None:
        self.folder = Path(run_dir) / DEBUG
        self.rank, self.world_size, self.store = rank, world_size, store
        self.poll_s = poll_s or max(1.0, world_size / 256)  # a few hundred store checks per second at most
        self._dumped = threading.Lock()
        self._done = False
        self._stop = threading.Event()
        self._watcher = None
        if store is not None and world_size > 1:
            self._watcher = threading.Thread(target=self._watch, name="hpcmega-hang-evidence", daemon=True)
            self._watcher.start()

    def on_failure(self, error: BaseException) -> None:
        """Write this rank's evidence, ask every other rank for theirs and wait (bounded) until they wrote it."""
        reason = f"rank {self.rank} failed: {type(error).__name__}: {error}"
        self._dump(reason, "".join(traceback.format_exception(error)))
        if self.store is None or self.world_size == 1:
            return
        try:
            self.store.set(_ASKED, reason)
            deadline = time.monotonic() + 2 * self.poll_s + 10
            while self.store.add(_DONE, 0) < self.world_size and time.monotonic() < deadline:
                time.sleep(0.2)
        except Exception:  # noqa: BLE001 -- the store may be gone with rank 0; this rank's evidence is written
            pass

    def stop(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=2 * self.poll_s)

    def _watch(self) -> None:
        try:
            while not self._stop.wait(self.poll_s):
                if self.store.check([_ASKED]):
                    self._dump(f"asked by the job's store: {self.store.get(_ASKED).decode(errors='replace')}")
                    return
        except Exception:  # noqa: BLE001 -- the store went away (rank 0 ended): nothing left to serve
            return

    def _dump(self, reason: str, details: str = "") -> None:
        with self._dumped:
            if self._done:
                return
            self._done = True
            self.folder.mkdir(parents=True, exist_ok=True)
            try:
                trace = fr_dump()
                with open(self.folder / fr_trace_name(self.rank), "xb") as f:  # NCCL's own dump wins
                    f.write(trace)
                recorder = f"flight recorder: {fr_trace_name(self.rank)}"
            except Exception as e:  # noqa: BLE001 -- said in the stacks file; the stacks are still worth writing
                recorder = f"flight recorder: not written ({type(e).__name__}: {e})"
            with open(self.folder / stacks_name(self.rank), "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {reason}\n{recorder}\n{details}\n"
                        "Python stacks of every thread:\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
            if self.store is not None:
                try:
                    self.store.add(_DONE, 1)
                except Exception:  # noqa: BLE001 -- the store may be gone; the files are written
                    pass
