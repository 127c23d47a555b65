"""The bottom floor: the errors and exit statuses every layer shares (imports nothing from hpcmega).

``ConfigError`` is what a user must fix -- the message names the fix; the CLI turns it into one line and exit
status 2 before anything is queued or written. ``EXIT_UNFINISHED`` is the status of a run that stopped early but
saved: the launcher, the ranks and `status` all read it from here.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration the user must fix; the message names the fix. The CLI exits with status 2."""


# A rank's exit status when training stopped before its last step (stop signal, no requeue): the checkpoint is
# saved and the same command continues. EX_TEMPFAIL from sysexits.h.
EXIT_UNFINISHED = 75
