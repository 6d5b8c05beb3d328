#!/usr/bin/env bash
# Start a real single-node Slurm cluster (with accounting) on localhost.
#
#   slurm/dev-cluster/start.sh [STATE_DIR]       # default /tmp/kd-ddp-slurm
#   eval "$(slurm/dev-cluster/start.sh)"          # or: source STATE_DIR/env.sh
#
# Progress goes to stderr; stdout carries only the `export SLURM_CONF=...`
# line so that callers can eval it. Must run as root (no systemd needed).
# Idempotent: if the cluster of STATE_DIR is already up it just says so.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=_common.sh
source "$HERE/_common.sh"

START_TIMEOUT=${KD_DDP_SLURM_START_TIMEOUT:-120}
CLUSTER_NAME=kd_ddp_dev   # no '-': Slurm uses it in MariaDB table names
NODE_NAME=$(hostname -s)

[[ $(id -u) -eq 0 ]] || die "must run as root (the daemons use SlurmUser=root)"
for bin in munged mungekey mariadbd mariadb-install-db mariadb-admin slurmdbd \
           slurmctld slurmd sacctmgr sinfo scontrol flock setsid; do
  command -v "$bin" >/dev/null || die "$bin not found; run $HERE/install.sh first"
done

# Unix socket paths are limited to 107 bytes; a deep STATE_DIR (pytest's
# tmp_path, say) would otherwise fail later with an obscure bind error.
for sock in "$MUNGE_SOCKET" "$DB_SOCKET"; do
  ((${#sock} < 100)) || die "STATE_DIR too long for a unix socket path: $sock"
done

# Serialise concurrent start/stop on the same STATE_DIR (e.g. several test
# workers). Every daemon below is started with 9>&- so none of them inherits
# (and keeps holding) the lock.
exec 9>"$STATE_DIR/.lock"
flock -w 300 9 || die "timed out waiting for the lock on $STATE_DIR/.lock"

print_env() {
  log "ready. Use the cluster with:  source $ENV_FILE"
  echo "export SLURM_CONF=$SLURM_CONF_FILE"
}

# ---------------------------------------------------------------- already up?
running=()
for name in "${!PID_FILES[@]}"; do
  daemon_pid "$name" >/dev/null && running+=("$name")
done
if ((${#running[@]} == ${#PID_FILES[@]})) && [[ -f $ENV_FILE ]]; then
  state=$(slurm_env sinfo -h -n "$NODE_NAME" -o %T 2>/dev/null || true)
  # Any state in which the node takes jobs counts as "up".
  if [[ $state == @(idle|mixed|allocated|completing) ]]; then
    log "already running from $STATE_DIR (node $state)"
    print_env
    exit 0
  fi
fi
if ((${#running[@]})); then
  # A half-running cluster (crash, killed daemon, node down) is easier to
  # restart than to repair; its persistent state is kept.
  log "running but not healthy (up: ${running[*]}); restarting it"
  flock -u 9
  "$HERE/stop.sh" "$STATE_DIR"
  flock -w 300 9 || die "timed out waiting for the lock on $STATE_DIR/.lock"
fi

t0=$SECONDS
mkdir -p "$ETC_DIR" "$RUN_DIR" "$LOG_DIR" "$MUNGE_DIR" "$CTLD_DIR" "$SLURMD_DIR"
# munged refuses group/world-writable dirs; clients (job steps, possibly not
# root) need to traverse to the munge socket, hence 755 all the way.
chmod 755 "$STATE_DIR" "$ETC_DIR" "$RUN_DIR" "$LOG_DIR" "$MUNGE_DIR"

# ------------------------------------------------------------------- ports
# Print N TCP ports that nothing on this host uses (any state, v4 and v6),
# starting at a random offset so that parallel clusters rarely collide.
free_ports() {
  local n=$1 port tries=0 line
  local -A used=()
  # Column 2 of /proc/net/tcp{,6} is LOCAL_ADDR:PORT with the port in hex.
  while read -r _ line _; do
    [[ $line == *:* ]] && used[$((16#${line##*:}))]=1
  done < <(tail -q -n +2 /proc/net/tcp /proc/net/tcp6 2>/dev/null)
  port=$((20000 + RANDOM % 20000))
  while ((n > 0)); do
    ((tries++ < 20000)) || return 1
    port=$((port >= 60000 ? 20000 : port + 1))
    [[ -n ${used[$port]:-} ]] && continue
    echo "$port"
    n=$((n - 1))
  done
}
ports=$(free_ports 3 | xargs) || die "no free TCP ports found"
read -r CTLD_PORT SLURMD_PORT DBD_PORT <<<"$ports"
[[ -n $DBD_PORT ]] || die "no free TCP ports found"

# launch NAME CMD... : start a daemon that stays in the foreground, so that
# its PID is known at once ($!) and wait_for can fail fast when it dies
# instead of sitting out the timeout. Details that matter:
#  - a clean environment: a caller inside a venv or inside another Slurm job
#    must not leak PATH/SLURM_* into the daemons; the marker lets stop.sh
#    find every process of this cluster (see _common.sh);
#  - setsid: the caller's Ctrl-C or exit must not take the daemons down
#    (it does not fork here: a background job of a non-interactive shell is
#    not a process group leader, so $! stays the daemon's PID);
#  - stdio to a log file, fd 9 (the lock) closed: nothing may keep the
#    caller's pipes or our lock open.
launch() {
  local name=$1
  shift
  env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME="$STATE_DIR" LANG=C.UTF-8 \
    "$MARKER_VAR=$STATE_DIR" SLURM_CONF="$SLURM_CONF_FILE" \
    MYSQL_UNIX_PORT="$DB_SOCKET" \
    setsid "$@" </dev/null >>"$LOG_DIR/$name.out" 2>&1 9>&- &
  LAUNCHED_PID=$!
  log "started $name (pid $LAUNCHED_PID)"
}

# wait_for WHAT TIMEOUT_S CMD... : poll CMD until it succeeds, giving up
# early if the process started last by launch() has died.
wait_for() {
  local what=$1 timeout=$2 deadline=$((SECONDS + $2))
  shift 2
  until "$@" >/dev/null 2>&1; do
    if [[ ! -e /proc/$LAUNCHED_PID/exe ]]; then
      tail_logs
      die "$what exited during start-up (logs above, full logs in $LOG_DIR)"
    fi
    if ((SECONDS >= deadline)); then
      tail_logs
      die "timed out after $timeout s waiting for $what (logs above, full logs in $LOG_DIR)"
    fi
    sleep 0.2
  done
}

# ------------------------------------------------------------------- munge
# A private key and socket: the host's munged (if any) and its key are
# neither needed nor touched.
if [[ ! -s $MUNGE_DIR/munge.key ]]; then
  mungekey --create --keyfile="$MUNGE_DIR/munge.key" 9>&-
fi
chmod 600 "$MUNGE_DIR/munge.key"
# --force: munged also vets the permissions of every parent directory, and a
# STATE_DIR under e.g. a group-writable CI workspace is fine for a dev cluster.
launch munged munged --foreground --force \
  --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" \
  --pid-file="${PID_FILES[munged]}" --seed-file="$MUNGE_DIR/munged.seed" \
  --log-file="$LOG_DIR/munged.log"
wait_for munged 20 munge --socket="$MUNGE_SOCKET" --no-input

# ----------------------------------------------------------------- MariaDB
# Private datadir, unix socket only (skip-networking): no clash with a system
# MariaDB or anything on 3306. slurmdbd has no socket option, but it links
# libmariadb, which honours MYSQL_UNIX_PORT for host "localhost".
mariadb_opts=(
  --no-defaults --user=root --datadir="$DB_DIR"
  --socket="$DB_SOCKET" --skip-networking
  --pid-file="${PID_FILES[mariadbd]}" --log-error="$LOG_DIR/mariadb.log"
  # Slurm's recommended values; the lock timeout avoids spurious rollbacks
  # of slurmdbd's long transactions.
  --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900
)
if [[ ! -d $DB_DIR/mysql ]]; then
  log "initialising MariaDB datadir"
  rm -rf "$DB_DIR"
  # root authenticates through the socket's peer credentials (unix_socket):
  # slurmdbd runs as root, so no password needs to be stored anywhere.
  mariadb-install-db --no-defaults --user=root --datadir="$DB_DIR" \
    --auth-root-authentication-method=socket --skip-test-db \
    >"$LOG_DIR/mariadb-install-db.log" 2>&1 9>&- ||
    { tail -n 30 "$LOG_DIR/mariadb-install-db.log" >&2; die "mariadb-install-db failed"; }
fi
rm -f "$DB_SOCKET"
launch mariadb mariadbd "${mariadb_opts[@]}"
wait_for mariadbd 60 mariadb-admin --no-defaults --socket="$DB_SOCKET" -u root ping

# ------------------------------------------------------------ Slurm config
# CPUs/sockets/memory exactly as slurmd will detect them; a mismatch would
# make slurmctld drain the node.
hw=$(slurmd -C 9>&- | head -n 1 | sed -E 's/^NodeName=[^ ]+ //; s/ ?UpTime=.*//')
[[ $hw == *CPUs=* ]] || die "unexpected 'slurmd -C' output: $hw"

cat >"$SLURM_CONF_FILE" <<EOF
# Generated by $HERE/start.sh -- regenerated on every start.
ClusterName=$CLUSTER_NAME
SlurmctldHost=$NODE_NAME(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT

# Private munged: the socket is passed to both auth and the slurmdbd link.
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10 (default 120) lets a requeued job restart in ~11 s, not ~150.
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
AccountingStoragePass=$MUNGE_SOCKET

StateSaveLocation=$CTLD_DIR
SlurmdSpoolDir=$SLURMD_DIR
SlurmctldPidFile=${PID_FILES[slurmctld]}
SlurmdPidFile=${PID_FILES[slurmd]}
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true

# No systemd/cgroups here (containers, CI): track processes via /proc.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none

# sacct (and hence submitit's job states) needs accounting via slurmdbd.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT

# Fast turnaround for tests: schedule every second, requeue allowed,
# cancelled jobs release the node quickly, a node that was down comes back
# by itself, jobs whose afterok can never be met are cancelled, not left
# pending forever. MinJobAge keeps finished jobs visible to scontrol and to
# dependency checks for a while, but not for the default 5 minutes.
SchedulerParameters=bf_interval=1,sched_interval=1
JobRequeue=1
KillWait=5
MinJobAge=30
ReturnToService=2
DependencyParameters=kill_invalid_depend
InactiveLimit=0
SlurmdTimeout=300

NodeName=$NODE_NAME NodeAddr=127.0.0.1 $hw State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

# slurmdbd looks for slurmdbd.conf next to SLURM_CONF and insists on 600.
cat >"$SLURMDBD_CONF_FILE" <<EOF
# Generated by $HERE/start.sh -- regenerated on every start.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=${PID_FILES[slurmdbd]}
LogFile=$LOG_DIR/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
# "localhost" makes libmariadb use the unix socket from MYSQL_UNIX_PORT.
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF
chmod 600 "$SLURMDBD_CONF_FILE"

cat >"$ENV_FILE" <<EOF
# source me to use the dev cluster started from $STATE_DIR
export SLURM_CONF=$SLURM_CONF_FILE
EOF

# ------------------------------------------------------------------ Slurm
launch slurmdbd slurmdbd -D
wait_for slurmdbd 60 slurm_env sacctmgr -n list cluster

# slurmctld would register the cluster itself, but doing it up front means
# the very first jobs are already recorded under a known cluster.
if ! slurm_env sacctmgr -n -P list cluster format=Cluster | grep -qxF "$CLUSTER_NAME"; then
  log "registering cluster $CLUSTER_NAME in accounting"
  slurm_env sacctmgr -i add cluster "$CLUSTER_NAME" >&2
fi

launch slurmctld slurmctld -D -f "$SLURM_CONF_FILE"
wait_for slurmctld 30 slurm_env scontrol ping
launch slurmd slurmd -D -f "$SLURM_CONF_FILE"

# --------------------------------------------------------- wait for idle
deadline=$((SECONDS + START_TIMEOUT))
last_resume=-1
while :; do
  state=$(slurm_env sinfo -h -n "$NODE_NAME" -o %T 2>/dev/null || true)
  # Not just idle: jobs requeued from an earlier run may start at once.
  [[ $state == @(idle|mixed|allocated|completing) ]] && break
  # State saved by an earlier, unclean stop (slurmd killed first, say) can
  # leave the node drained; ReturnToService does not undo a drain. RESUME is
  # refused until slurmd has registered, hence the retries.
  if [[ $state == drain* ]] && ((SECONDS > last_resume)); then
    ((last_resume >= 0)) || log "node is $state from an earlier run; resuming it"
    slurm_env scontrol update NodeName="$NODE_NAME" State=RESUME >/dev/null 2>&1 || true
    last_resume=$SECONDS
  fi
  if ((SECONDS >= deadline)) || [[ ! -e /proc/$LAUNCHED_PID/exe ]]; then
    slurm_env sinfo -N -l >&2 || true
    slurm_env scontrol show node "$NODE_NAME" >&2 || true
    tail_logs
    [[ -e /proc/$LAUNCHED_PID/exe ]] || die "slurmd exited during start-up (logs above)"
    die "node $NODE_NAME not idle after ${START_TIMEOUT} s (state: '${state:-?}'); logs in $LOG_DIR"
  fi
  sleep 0.2
done

log "cluster $CLUSTER_NAME up in $((SECONDS - t0)) s (state dir $STATE_DIR, ports ctld=$CTLD_PORT slurmd=$SLURMD_PORT dbd=$DBD_PORT)"
print_env
