#!/bin/bash
# Stop what start-cluster.sh started, by the PIDs it recorded under $HPCMEGA_SLURM_DIR/run (never by name), and
# undo its /etc/hosts and /etc/slurm changes. Safe to run when nothing is running.
# --keep-munge: leave munged, /etc/hosts and the /etc/slurm links alone (used by start-cluster.sh on restart).
set -uo pipefail
LAB=${HPCMEGA_SLURM_DIR:-/tmp/hpcmega-slurm}; KEEP=0; [ "${1:-}" = --keep-munge ] && KEEP=1
MARK="# hpcmega-slurm"
log() { echo "[stop-cluster $(date +%T)] $*"; }
shopt -s nullglob

stop_pids() {  # SIGTERM every PID in the given pid files, wait up to 15 s, then SIGKILL
  local f pid live=() any
  for f in "$@"; do
    if [ -s "$f" ]; then
      pid=$(cat "$f")
      if kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid"; live+=("$pid"); log "SIGTERM $(basename "$f" .pid) $pid"; fi
    fi
    rm -f "$f"
  done
  [ "${#live[@]}" = 0 ] && return 0
  for _ in $(seq 1 150); do
    any=0; for pid in "${live[@]}"; do kill -0 "$pid" 2>/dev/null && any=1; done
    [ "$any" = 0 ] && return 0; sleep 0.1
  done
  for pid in "${live[@]}"; do kill -0 "$pid" 2>/dev/null && { log "SIGKILL $pid"; kill -KILL "$pid"; }; done; return 0
}

# Cancel jobs first, while slurmctld is up, so their slurmstepd processes end by themselves.
if [ -s "$LAB/run/slurmctld.pid" ] && kill -0 "$(cat "$LAB/run/slurmctld.pid")" 2>/dev/null; then
  jobs=$(squeue -h -o %i 2>/dev/null)
  if [ -n "$jobs" ]; then
    log "scancel $(echo $jobs)"; scancel $jobs
    for _ in $(seq 1 150); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi
rm -f "$LAB/run/settings"
stop_pids "$LAB"/run/slurmd-*.pid
stop_pids "$LAB/run/slurmctld.pid"
stop_pids "$LAB/run/slurmdbd.pid"
stop_pids "$LAB/run/mysqld/mysqld.pid"
[ "$KEEP" = 1 ] && exit 0
stop_pids "$LAB/run/munged.pid"
for f in slurm.conf slurmdbd.conf; do
  [ "$(readlink -f "/etc/slurm/$f" 2>/dev/null)" = "$LAB/etc/$f" ] && rm -f "/etc/slurm/$f"
done
if grep -q "$MARK\$" /etc/hosts; then
  grep -v "$MARK\$" /etc/hosts > "$LAB/run/hosts.clean"; cat "$LAB/run/hosts.clean" > /etc/hosts
fi
log "stopped"
exit 0
