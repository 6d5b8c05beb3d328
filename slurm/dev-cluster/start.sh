#!/usr/bin/env bash
# Start a real Slurm cluster (with accounting) on this machine: one node on
# localhost, or with --nodes N (2..9) N slurmd "nodes", each in a network
# namespace of its own with its own address and hostname.
#
#   slurm/dev-cluster/start.sh [STATE_DIR]            # default /tmp/kd-ddp-slurm
#   slurm/dev-cluster/start.sh --nodes 2 [STATE_DIR]  # default /tmp/kd-ddp-slurm-2nodes
#   eval "$(slurm/dev-cluster/start.sh)"               # or: source STATE_DIR/env.sh
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
CTLD_NAME=$(hostname -s)
FAKE_GPUS=2       # per node: GRES gpu:fake:2, see the node lines
SHORT_MAX_MIN=2   # MaxTime of partition "short", in minutes

[[ $(id -u) -eq 0 ]] || die "must run as root (the daemons use SlurmUser=root)"
for bin in munged mungekey mariadbd mariadb-install-db mariadb-admin slurmdbd \
           slurmctld slurmd sacctmgr sinfo scontrol flock setsid; do
  command -v "$bin" >/dev/null || die "$bin not found; run $HERE/install.sh first"
done
if ((REQUESTED_NODES > 1)); then
  for bin in ip nsenter unshare mount hostname; do
    command -v "$bin" >/dev/null || die "$bin not found (needed for --nodes); run $HERE/install.sh first"
  done
  # Fail early and recognisably (exit 3) where namespaces cannot be made
  # (no CAP_NET_ADMIN/CAP_SYS_ADMIN, a locked-down container): callers such
  # as the tests skip on 3 instead of failing.
  probe=$NET_PREFIX-probe-$$
  if ! err=$(ip netns add "$probe" 2>&1); then
    log "ERROR: cannot create a network namespace (ip netns add: $err)"
    exit 3
  fi
  ip netns del "$probe"
fi

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

# nodes_usable: true when every node of the layout takes jobs.
nodes_usable() {
  local states
  # sort -u: sinfo -N prints a node once per partition it is in.
  states=$(slurm_env sinfo -h -N -n "$(IFS=,; echo "${NODE_NAMES[*]}")" -o '%N %T' 2>/dev/null | sort -u) ||
    return 1
  (($(wc -l <<<"$states") == ${#NODE_NAMES[@]})) || return 1
  ! grep -qvE ' (idle|mixed|allocated|completing)$' <<<"$states"
}

# network_exists: anything left of the layout's namespaces or bridge.
network_exists() {
  local ns
  [[ -n $BRIDGE ]] || return 1
  ip link show "$BRIDGE" >/dev/null 2>&1 && return 0
  for ns in "${NODE_NETNS[@]}"; do
    [[ -e /run/netns/$ns ]] && return 0
  done
  return 1
}

# ---------------------------------------------------------------- already up?
running=()
for name in "${!PID_FILES[@]}"; do
  daemon_pid "$name" >/dev/null && running+=("$name")
done
if ((LAYOUT_NODES == REQUESTED_NODES && ${#running[@]} == ${#PID_FILES[@]})) && [[ -f $ENV_FILE ]]; then
  # Any state in which the nodes take jobs counts as "up".
  if nodes_usable; then
    log "already running from $STATE_DIR ($NODES node(s): ${NODE_NAMES[*]})"
    print_env
    exit 0
  fi
fi
if ((${#running[@]})) || network_exists; then
  # A half-running cluster (crash, killed daemon, node down), or one with
  # another number of nodes, is easier to restart than to repair; its
  # persistent state is kept.
  log "running but not healthy or not with $REQUESTED_NODES node(s) (up: ${running[*]:-none}); restarting it"
  flock -u 9
  "$HERE/stop.sh" "$STATE_DIR"
  flock -w 300 9 || die "timed out waiting for the lock on $STATE_DIR/.lock"
fi

t0=$SECONDS
mkdir -p "$ETC_DIR" "$RUN_DIR" "$LOG_DIR" "$MUNGE_DIR" "$CTLD_DIR" "$SLURMD_DIR"
# munged refuses group/world-writable dirs; clients (job steps, possibly not
# root) need to traverse to the munge socket, hence 755 all the way.
chmod 755 "$STATE_DIR" "$ETC_DIR" "$RUN_DIR" "$LOG_DIR" "$MUNGE_DIR"

# ----------------------------------------------------------------- network
# One node: nothing to do. N nodes: a bridge in the root namespace (the
# controller's side) and per node a namespace joined to it by a veth pair.
# No route leaves the subnet and nothing is forwarded, so the traffic stays
# between these namespaces and the bridge.
#
# subnet_free K: nothing on this host uses 10.213.K.0/24 or the names of K.
subnet_free() {
  local k=$1
  ! ip link show "$NET_PREFIX$k" >/dev/null 2>&1 &&
    ! compgen -G "/run/netns/$NET_PREFIX$k-n*" >/dev/null &&
    [[ -z $(ip -4 -o addr show to "10.213.$k.0/24" 2>/dev/null) ]] &&
    [[ -z $(ip -4 route show to match "10.213.$k.1" 2>/dev/null | awk '$1 != "default"') ]]
}

# The hosts file each node's slurmd sees as /etc/hosts (a bind mount in its
# own mount namespace): every node name resolves to its namespace address.
# submitit's MASTER_ADDR is the first node's name, and gloo binds to the
# address its own hostname resolves to. The host's /etc/hosts is not touched.
write_hosts() {
  local i
  {
    cat /etc/hosts
    echo "# kd-ddp dev cluster $STATE_DIR: its nodes"
    for i in "${!NODE_NAMES[@]}"; do
      printf '%s\t%s\n' "${NODE_ADDRS[$i]}" "${NODE_NAMES[$i]}"
    done
  } >"$NODE_HOSTS_FILE"
}

setup_network() {
  local k i ns
  # Reuse this STATE_DIR's subnet when it is free, else the first free one.
  # `ip link add` of the bridge is what claims a subnet: it fails if a
  # concurrent start took the same one, and the loop moves on.
  for k in "$LAYOUT_NET_ID" $(seq 1 254); do
    ((k >= 1)) && subnet_free "$k" && ip link add "$NET_PREFIX$k" type bridge 2>/dev/null && break
    k=
  done
  [[ -n $k ]] || die "no free subnet 10.213.K.0/24 (K = 1..254) for the node namespaces"
  set_layout "$REQUESTED_NODES" "$k"
  # Written before anything else is created, so that stop.sh can undo a
  # set-up that fails half-way.
  printf 'LAYOUT_NODES=%s\nLAYOUT_NET_ID=%s\n' "$NODES" "$NET_ID" >"$LAYOUT_FILE"
  ip addr add "$CTLD_ADDR/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for i in "${!NODE_NAMES[@]}"; do
    ns=${NODE_NETNS[$i]}
    ip netns add "$ns"
    ip link add "${NODE_VETHS[$i]}" type veth peer name eth0 netns "$ns"
    ip link set "${NODE_VETHS[$i]}" master "$BRIDGE" up
    ip -n "$ns" addr add "${NODE_ADDRS[$i]}/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
  done
  write_hosts
  log "network: bridge $BRIDGE ($CTLD_ADDR), nodes $(for i in "${!NODE_NAMES[@]}"; do
    printf '%s=%s(netns %s) ' "${NODE_NAMES[$i]}" "${NODE_ADDRS[$i]}" "${NODE_NETNS[$i]}"; done)"
}

if ((REQUESTED_NODES == 1)); then
  set_layout 1 0
  printf 'LAYOUT_NODES=1\nLAYOUT_NET_ID=0\n' >"$LAYOUT_FILE"
else
  setup_network
fi

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

# One slurmd: the paths as they always were. Several share this filesystem,
# so each gets its own spool dir, pid file and log through %n (its NodeName).
# NodeAddr is what slurmctld and srun connect to; NodeHostname is the
# hostname each slurmd gets in its UTS namespace (slurmd is started with -N,
# so Slurm itself would accept the host's name for all of them, but then
# every rank would report the same host).
# Every node also offers FAKE_GPUS fake GPUs (GRES gpu, type "fake"): a count
# with no device file (gres.conf below), so that jobs asking for GPUs as on a
# real cluster (--gpus-per-node, --gres, --gpus-per-task) are scheduled, and
# then find no CUDA device when they start.
gres="Gres=gpu:fake:$FAKE_GPUS"
if ((NODES == 1)); then
  slurmd_spool=$SLURMD_DIR slurmd_pid=${PID_FILES[slurmd]} slurmd_log=$LOG_DIR/slurmd.log
  node_lines="NodeName=${NODE_NAMES[0]} NodeAddr=127.0.0.1 $hw $gres State=UNKNOWN"
else
  slurmd_spool=$SLURMD_DIR/%n slurmd_pid=$RUN_DIR/slurmd-%n.pid slurmd_log=$LOG_DIR/slurmd-%n.log
  node_lines=$(for i in "${!NODE_NAMES[@]}"; do
    echo "NodeName=${NODE_NAMES[$i]} NodeHostname=${NODE_NAMES[$i]} NodeAddr=${NODE_ADDRS[$i]} $hw $gres State=UNKNOWN"
  done)
fi

cat >"$SLURM_CONF_FILE" <<EOF
# Generated by $HERE/start.sh -- regenerated on every start.
ClusterName=$CLUSTER_NAME
# The controller's address is one every node can reach: 127.0.0.1 for one
# node, the bridge's address when the nodes are network namespaces.
SlurmctldHost=$CTLD_NAME($CTLD_ADDR)
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
SlurmdSpoolDir=$slurmd_spool
SlurmctldPidFile=${PID_FILES[slurmctld]}
SlurmdPidFile=$slurmd_pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$slurmd_log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true

# No systemd/cgroups here (containers, CI): track processes via /proc.
# task/affinity binds each task to its CPUs with sched_setaffinity, as on a
# real cluster, and needs no cgroups.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
GresTypes=gpu
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none

# sacct (and hence submitit's job states) needs accounting via slurmdbd.
AccountingStorageType=accounting_storage/slurmdbd
# GPUs in sacct's AllocTRES, as GPU sites keep them
AccountingStorageTRES=gres/gpu
AccountingStorageHost=$CTLD_ADDR
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

$node_lines
# Preemption by partition priority tier, as many sites set it up: a job of
# "short" (tier 2, at most $SHORT_MAX_MIN min) that needs CPUs takes them from
# running jobs of "debug" (tier 1: requeued) and "scavenger" (tier 0: cancelled).
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE
PartitionName=short Nodes=ALL MaxTime=$SHORT_MAX_MIN State=UP PriorityTier=2 PreemptMode=OFF
PartitionName=scavenger Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=0 PreemptMode=CANCEL
EOF

# The fake GPUs. Slurm 22.05 drops a GPU without File= ("Removing file-less
# GPU"), so each one names a placeholder: an empty regular file, no device
# (nothing is bound or hidden without cgroups). A job that asks for them gets
# them counted (SLURM_GPUS_ON_NODE) but no CUDA_VISIBLE_DEVICES and no GPU.
mkdir -p "$STATE_DIR/fake-gpus"
for ((i = 0; i < FAKE_GPUS; i++)); do touch "$STATE_DIR/fake-gpus/gpu$i"; done
cat >"$ETC_DIR/gres.conf" <<EOF
# Generated by $HERE/start.sh -- regenerated on every start.
Name=gpu Type=fake File=$STATE_DIR/fake-gpus/gpu[0-$((FAKE_GPUS - 1))]
EOF

# slurmdbd looks for slurmdbd.conf next to SLURM_CONF and insists on 600.
cat >"$SLURMDBD_CONF_FILE" <<EOF
# Generated by $HERE/start.sh -- regenerated on every start.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=$CTLD_ADDR
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
slurmd_pids=()
if ((NODES == 1)); then
  launch slurmd slurmd -D -f "$SLURM_CONF_FILE"
  slurmd_pids+=("$LAUNCHED_PID")
else
  for i in "${!NODE_NAMES[@]}"; do
    node=${NODE_NAMES[$i]}
    mkdir -p "$SLURMD_DIR/$node"
    # Not `ip netns exec`: it remounts /sys for the namespace, which hides
    # /sys/fs/cgroup, and slurmd 22.05 then refuses to start ("Unable to
    # initialize cgroup plugin") even with proctrack/linuxproc. nsenter only
    # switches the network namespace; unshare adds a mount namespace (for
    # the hosts file) and a UTS namespace, so that the job's processes,
    # submitit and gloo all see the node's name as the hostname. None of the
    # three forks, so $! is slurmd's PID.
    # shellcheck disable=SC2016  # $1..$3 are for the inner sh
    launch "slurmd-$node" nsenter --net="/run/netns/${NODE_NETNS[$i]}" unshare --mount --uts -- \
      sh -c 'mount --bind "$3" /etc/hosts && hostname "$1" && exec slurmd -D -N "$1" -f "$2"' \
      sh "$node" "$SLURM_CONF_FILE" "$NODE_HOSTS_FILE"
    slurmd_pids+=("$LAUNCHED_PID")
  done
fi
node_list=$(IFS=,; echo "${NODE_NAMES[*]}")

# --------------------------------------------------------- wait for idle
deadline=$((SECONDS + START_TIMEOUT))
last_resume=-1
while :; do
  states=$(slurm_env sinfo -h -N -n "$node_list" -o '%N %T' 2>/dev/null | sort -u || true)
  # Not just idle: jobs requeued from an earlier run may start at once.
  nodes_usable && break
  # State saved by an earlier, unclean stop (slurmd killed first, say) can
  # leave a node drained; ReturnToService does not undo a drain. RESUME is
  # refused until slurmd has registered, hence the retries.
  drained=$(awk '$2 ~ /^drain/ { print $1 }' <<<"$states" | paste -sd, -)
  if [[ -n $drained ]] && ((SECONDS > last_resume)); then
    ((last_resume >= 0)) || log "node(s) $drained drained from an earlier run; resuming"
    slurm_env scontrol update NodeName="$drained" State=RESUME >/dev/null 2>&1 || true
    last_resume=$SECONDS
  fi
  dead=()
  for pid in "${slurmd_pids[@]}"; do
    [[ -e /proc/$pid/exe ]] || dead+=("$pid")
  done
  if ((SECONDS >= deadline || ${#dead[@]})); then
    slurm_env sinfo -N -l >&2 || true
    slurm_env scontrol show node "$node_list" >&2 || true
    tail_logs
    ((${#dead[@]} == 0)) || die "slurmd (pid ${dead[*]}) exited during start-up (logs above)"
    die "node(s) $node_list not idle after ${START_TIMEOUT} s (states: '${states//$'\n'/, }'); logs in $LOG_DIR"
  fi
  sleep 0.2
done

log "cluster $CLUSTER_NAME up in $((SECONDS - t0)) s ($NODES node(s): ${NODE_NAMES[*]}; state dir $STATE_DIR, ports ctld=$CTLD_PORT slurmd=$SLURMD_PORT dbd=$DBD_PORT)"
print_env
