#!/bin/bash
# A real SLURM 22.05 cluster on 127.0.0.1 for development and tests: munged, MariaDB + slurmdbd (accounting, so
# `sacct` and `hpcmega submit --wait` work), slurmctld and one slurmd per fake node (`slurmd -N nodeX`).
#
# Idempotent: if the cluster this script started is up with the same settings, it does nothing; otherwise it
# stops what a previous run started (by recorded PID, never by name), wipes the state and starts fresh.
# Concurrent callers (several pytest sessions) are serialised with a lock. Needs root.
#
#   bash slurm/start-cluster.sh            # start (or keep) the cluster
#   bash slurm/start-cluster.sh --restart  # always start fresh
#
# Settings (environment): HPCMEGA_SLURM_DIR=/tmp/hpcmega-slurm  HPCMEGA_SLURM_NODES=4  HPCMEGA_SLURM_CPUS=4
#                         HPCMEGA_SLURM_CRED_EXPIRE=10 (seconds; short so a requeued job can start again quickly)
set -euo pipefail
LAB=${HPCMEGA_SLURM_DIR:-/tmp/hpcmega-slurm}
NODES=${HPCMEGA_SLURM_NODES:-4}
CPUS=${HPCMEGA_SLURM_CPUS:-4}
CRED_EXPIRE=${HPCMEGA_SLURM_CRED_EXPIRE:-10}
RESTART=0; [ "${1:-}" = --restart ] && RESTART=1
HERE=$(cd "$(dirname "$0")" && pwd)
MARK="# hpcmega-slurm"
log() { echo "[start-cluster $(date +%T)] $*"; }
die() { echo "[start-cluster] error: $*" >&2; exit 1; }
wait_for() { local n=$(($1 * 10)); shift; for _ in $(seq 1 "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done; return 1; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
[ "$(id -u)" = 0 ] || die "must run as root (it installs packages, edits /etc/hosts and starts daemons)"

# -- packages ------------------------------------------------------------------------------------------------------
PKGS="munge slurmctld slurmd slurm-client slurmdbd mariadb-server"
installed=$(dpkg-query -W -f='${Status}\n' $PKGS 2>/dev/null | grep -c 'ok installed' || true)
if [ "$installed" != "$(echo $PKGS | wc -w)" ]; then
  log "apt-get install $PKGS"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends $PKGS >/dev/null \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $PKGS >/dev/null; } \
    || die "could not install $PKGS with apt-get"
fi

mkdir -p "$LAB"
exec 9>"$LAB/.lock"
flock -w 300 9 || die "another start-cluster.sh holds $LAB/.lock for more than 5 minutes"

PREEMPT_NODES="node[$((NODES - 1))-$NODES]"   # the preemption test's partitions: the last two nodes
SETTINGS="nodes=$NODES cpus=$CPUS cred_expire=$CRED_EXPIRE preempt=partition_prio/requeue/grace30 $PREEMPT_NODES"
healthy() {
  alive "$LAB/run/slurmctld.pid" && alive "$LAB/run/slurmdbd.pid" && alive "$LAB/run/mysqld/mysqld.pid" || return 1
  for i in $(seq 1 "$NODES"); do alive "$LAB/run/slurmd-node$i.pid" || return 1; done
  [ "$(cat "$LAB/run/settings" 2>/dev/null)" = "$SETTINGS" ] || return 1
  getent hosts node1 >/dev/null || return 1
  # every node answers (idle, allocated or mixed; not down/drained)
  [ "$(sinfo -h -N -t idle,alloc,mix,comp -o %N 2>/dev/null | sort -u | wc -l)" -ge "$NODES" ]
}
if [ "$RESTART" = 0 ] && healthy; then
  log "already up: node[1-$NODES] x $CPUS CPUs, partition debug ($LAB)"
  exit 0
fi

HPCMEGA_SLURM_DIR="$LAB" bash "$HERE/stop-cluster.sh" --keep-munge >/dev/null 2>&1 || true
rm -rf "$LAB/state" "$LAB/log" "$LAB/run/settings"
mkdir -p "$LAB"/{etc,run,log,state/ctld} /etc/slurm
for i in $(seq 1 "$NODES"); do mkdir -p "$LAB/state/d/node$i"; done

# Node names must resolve: the job uses the first node's name as MASTER_ADDR. Rewrite /etc/hosts in place
# (it may be a bind mount, so no rename).
{ grep -v "$MARK\$" /etc/hosts || true; echo "127.0.0.1 $(seq -f 'node%g' -s ' ' 1 "$NODES") $MARK"; } > "$LAB/run/hosts.new"
cat "$LAB/run/hosts.new" > /etc/hosts

# munge: the package created /etc/munge/munge.key; munged runs as the munge user.
[ -s /etc/munge/munge.key ] || runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
if ! (munge -n | unmunge) >/dev/null 2>&1; then
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged 9>&-
  wait_for 5 test -s /run/munge/munged.pid || die "munged did not start"
  cat /run/munge/munged.pid > "$LAB/run/munged.pid"   # we started it, so stop-cluster.sh may stop it
  wait_for 5 sh -c 'munge -n | unmunge' || die "munge does not work"
fi

# MariaDB on 127.0.0.1:3306 with its own data directory, slurmdbd on 127.0.0.1:6819.
SOCK="$LAB/run/mysqld/mysqld.sock"
install -d -o mysql -g mysql "$LAB/state/mysql" "$LAB/run/mysqld" "$LAB/log/mysqld"
mariadb-install-db --no-defaults --user=mysql --datadir="$LAB/state/mysql" --skip-test-db \
  --auth-root-authentication-method=socket > "$LAB/log/mysql-install.log" 2>&1 \
  || die "mariadb-install-db failed, see $LAB/log/mysql-install.log"
log "starting mariadbd"
setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$LAB/state/mysql" --socket="$SOCK" \
  --pid-file="$LAB/run/mysqld/mysqld.pid" --bind-address=127.0.0.1 --port=3306 --skip-log-bin \
  --innodb-buffer-pool-size=64M --log-error="$LAB/log/mysqld/mysqld.err" </dev/null >/dev/null 2>&1 9>&- &
wait_for 60 mariadb --no-defaults -S "$SOCK" -uroot -e 'select 1' || die "mariadbd did not start, see $LAB/log/mysqld"
DBPASS=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')   # local throw-away password, never printed
for h in 127.0.0.1 localhost; do
  mariadb --no-defaults -S "$SOCK" -uroot -e \
    "CREATE USER 'slurm'@'$h' IDENTIFIED BY '$DBPASS'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'$h';"
done
umask 077
cat > "$LAB/etc/slurmdbd.conf" <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
LogFile=$LAB/log/slurmdbd.log
PidFile=$LAB/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3306
StorageUser=slurm
StoragePass=$DBPASS
StorageLoc=slurm_acct_db
CONF
umask 022
ln -sfn "$LAB/etc/slurmdbd.conf" /etc/slurm/slurmdbd.conf
log "starting slurmdbd"
slurmdbd 9>&-   # daemons must not inherit the lock's file descriptor
wait_for 30 sh -c "ss -ltn | grep -q ':6819 '" || die "slurmdbd did not start, see $LAB/log/slurmdbd.log"

cat > "$LAB/etc/slurm.conf" <<CONF
ClusterName=hpcmega-dev
SlurmctldHost=localhost
SlurmctldPort=6817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=$CRED_EXPIRE
CredType=cred/munge
CommunicationParameters=NoInAddrAny
StateSaveLocation=$LAB/state/ctld
SlurmdSpoolDir=$LAB/state/d/%n
SlurmctldPidFile=$LAB/run/slurmctld.pid
SlurmdPidFile=$LAB/run/slurmd-%n.pid
SlurmctldLogFile=$LAB/log/slurmctld.log
SlurmdLogFile=$LAB/log/slurmd-%n.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
MpiDefault=none
JobRequeue=1
# Real preemption: a job in a higher PriorityTier partition preempts lower-tier jobs on the nodes it needs; they
# get SIGTERM, GraceTime seconds to save, then SIGKILL, and SLURM requeues them. Only "preemptible" jobs can be
# preempted (debug and urgent have PreemptMode=OFF), so the preemption test never disturbs other jobs.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
ReturnToService=2
SlurmdParameters=config_overrides
InactiveLimit=0
MinJobAge=600
KillWait=5
NodeName=node[1-$NODES] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[17001-$((17000 + NODES))] CPUs=$CPUS RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=OFF
PartitionName=preemptible Nodes=$PREEMPT_NODES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=30
PartitionName=urgent Nodes=$PREEMPT_NODES MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
CONF
if [ -e /etc/slurm/slurm.conf ] && [ "$(readlink -f /etc/slurm/slurm.conf)" != "$LAB/etc/slurm.conf" ]; then
  mv /etc/slurm/slurm.conf "/etc/slurm/slurm.conf.bak.$(date +%s)"
fi
ln -sfn "$LAB/etc/slurm.conf" /etc/slurm/slurm.conf   # the default path: clients need no SLURM_CONF

log "starting slurmctld and $NODES slurmd"   # both daemonize
slurmctld 9>&-
for i in $(seq 1 "$NODES"); do slurmd -N "node$i" 9>&-; done
wait_for 60 sh -c "[ \$(sinfo -h -N -t idle -o %N | sort -u | wc -l) -ge $NODES ]" \
  || { sinfo -N >&2 || true; die "nodes did not become idle, see $LAB/log"; }
echo "$SETTINGS" > "$LAB/run/settings"
sinfo
log "up: node[1-$NODES] x $CPUS CPUs, partitions debug, preemptible/urgent ($PREEMPT_NODES), accounting on ($LAB)"
