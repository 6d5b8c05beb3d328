# shellcheck shell=bash
# shellcheck disable=SC2034  # the variables are used by the sourcing scripts
# Shared by start.sh and stop.sh (sourced, not executed).
#
# Everything the dev cluster owns lives under one STATE_DIR so that several
# clusters (e.g. a developer's and a test run's) can coexist on one host and
# `rm -rf STATE_DIR` after stop.sh is a complete cleanup.

# parse_args "$@": [--nodes N] [STATE_DIR] -> REQUESTED_NODES, STATE_ARG. Both
# scripts take the same arguments; for stop.sh --nodes only picks the default
# STATE_DIR (what to tear down is read from the STATE_DIR's layout file).
parse_args() {
  REQUESTED_NODES=${KD_DDP_SLURM_NODES:-1}
  STATE_ARG=
  while (($#)); do
    case $1 in
      --nodes) (($# >= 2)) || { echo "[dev-cluster] ERROR: --nodes needs a value" >&2; exit 2; }
               REQUESTED_NODES=$2; shift 2 ;;
      --nodes=*) REQUESTED_NODES=${1#--nodes=}; shift ;;
      -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 0 ;;
      -*) echo "[dev-cluster] ERROR: unknown option $1" >&2; exit 2 ;;
      *) [[ -z $STATE_ARG ]] || { echo "[dev-cluster] ERROR: more than one STATE_DIR" >&2; exit 2; }
         STATE_ARG=$1; shift ;;
    esac
  done
  # 2..9: one digit keeps every interface name below the kernel's 15 bytes.
  [[ $REQUESTED_NODES =~ ^[1-9]$ ]] || { echo "[dev-cluster] ERROR: --nodes must be 1..9" >&2; exit 2; }
}
parse_args "$@"

# A multi-node cluster gets its own default STATE_DIR (and with it its own
# ports, munge key and database), so it never replaces a running one-node
# cluster at the old default.
if ((REQUESTED_NODES == 1)); then
  STATE_DIR=${STATE_ARG:-${KD_DDP_SLURM_STATE_DIR:-/tmp/kd-ddp-slurm}}
else
  STATE_DIR=${STATE_ARG:-${KD_DDP_SLURM_STATE_DIR:-/tmp/kd-ddp-slurm-${REQUESTED_NODES}nodes}}
fi
# Absolute path: it ends up in config files read by daemons whose cwd differs.
mkdir -p "$STATE_DIR"
STATE_DIR=$(cd "$STATE_DIR" && pwd -P)

ETC_DIR=$STATE_DIR/etc
RUN_DIR=$STATE_DIR/run
LOG_DIR=$STATE_DIR/log
MUNGE_DIR=$STATE_DIR/munge
DB_DIR=$STATE_DIR/mariadb
CTLD_DIR=$STATE_DIR/slurmctld
SLURMD_DIR=$STATE_DIR/slurmd

SLURM_CONF_FILE=$ETC_DIR/slurm.conf
SLURMDBD_CONF_FILE=$ETC_DIR/slurmdbd.conf
MUNGE_SOCKET=$MUNGE_DIR/munge.socket.2
DB_SOCKET=$RUN_DIR/mariadb.sock
ENV_FILE=$STATE_DIR/env.sh

# Every daemon is started with this variable in its environment. stop.sh
# uses it (plus the checks in cluster_pids) to find stragglers belonging to
# *this* STATE_DIR without touching other clusters or the host's daemons.
MARKER_VAR=KD_DDP_SLURM_DEV_CLUSTER

# What start.sh set up last time (node count, network); stop.sh tears down
# exactly that, whatever it is asked for.
LAYOUT_FILE=$STATE_DIR/layout.env
# Prefix of every network namespace, bridge and veth this tool creates.
NET_PREFIX=kdslurm
# /etc/hosts as the nodes of a multi-node cluster see it.
NODE_HOSTS_FILE=$ETC_DIR/hosts

# daemon name -> pid file. The name is /proc/PID/comm, optionally followed by
# @NODE when there is one daemon per node (slurmd@kdslurm-n1).
declare -A PID_FILES=(
  [munged]=$RUN_DIR/munged.pid
  [mariadbd]=$RUN_DIR/mariadbd.pid
  [slurmdbd]=$RUN_DIR/slurmdbd.pid
  [slurmctld]=$RUN_DIR/slurmctld.pid
)

# set_layout NODES NET_ID: the node names, namespaces and addresses of a
# cluster with NODES nodes. One node: the host itself on 127.0.0.1, as always.
# More: node i is namespace ${NET_PREFIX}${NET_ID}-n<i> with address
# 10.213.NET_ID.(10+i) on a bridge whose own address (10.213.NET_ID.1) is
# where the root namespace's daemons (slurmctld, slurmdbd) are reached.
set_layout() {
  NODES=$1 NET_ID=$2
  NODE_NAMES=() NODE_NETNS=() NODE_ADDRS=() NODE_VETHS=()
  local i name
  for name in "${!PID_FILES[@]}"; do
    [[ $name == slurmd || $name == slurmd@* ]] && unset "PID_FILES[$name]"
  done
  if ((NODES == 1)); then
    NODE_NAMES=("$(hostname -s)")
    NODE_ADDRS=(127.0.0.1)
    CTLD_ADDR=127.0.0.1
    BRIDGE=
    PID_FILES[slurmd]=$RUN_DIR/slurmd.pid
    return
  fi
  BRIDGE=$NET_PREFIX$NET_ID
  CTLD_ADDR=10.213.$NET_ID.1
  for ((i = 1; i <= NODES; i++)); do
    # Node names are per cluster (each namespace has its own hosts file), so
    # they need no NET_ID; the namespaces and links are host-wide, so they do.
    name=$NET_PREFIX-n$i
    NODE_NAMES+=("$name")
    NODE_NETNS+=("$NET_PREFIX$NET_ID-n$i")
    NODE_ADDRS+=("10.213.$NET_ID.$((10 + i))")
    NODE_VETHS+=("kds$NET_ID-n$i")
    PID_FILES[slurmd@$name]=$RUN_DIR/slurmd-$name.pid
  done
}

load_layout() {
  # Globals on purpose: set_layout's NODES/NET_ID would otherwise land in
  # locals of this function and vanish with it.
  LAYOUT_NODES=1 LAYOUT_NET_ID=0
  # shellcheck disable=SC1090
  if [[ -s $LAYOUT_FILE ]]; then source "$LAYOUT_FILE"; fi
  set_layout "$LAYOUT_NODES" "$LAYOUT_NET_ID"
}
load_layout

log() { printf '[dev-cluster] %s\n' "$*" >&2; }
die() { printf '[dev-cluster] ERROR: %s\n' "$*" >&2; exit 1; }

# Print the PID of a daemon if its pid file points at a live process of that
# name. Checking the name guards against a stale pid file whose PID has since
# been reused by an unrelated process.
daemon_pid() {
  local name=$1 file=${PID_FILES[$1]} pid
  [[ -s $file ]] || return 1
  pid=$(tr -dc '0-9' <"$file")
  # No exe link: gone or a zombie (this VM's init reaps orphans lazily).
  [[ -n $pid && -e /proc/$pid/exe ]] || return 1
  [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "${name%%@*}" ]] || return 1
  echo "$pid"
}

# PIDs of all processes of this cluster except the caller and its ancestors
# (stop.sh may be run from inside one of the cluster's own jobs):
#  - daemons: environment carries the marker set by start.sh;
#  - slurmstepd: its process title overwrites its environment, but it keeps
#    slurmd's log file (under STATE_DIR) open;
#  - job processes: SLURM_JOB_ID plus this cluster's SLURM_CONF.
cluster_pids() {
  local -A spare=()
  local pid=$$ env_file env fd
  while [[ $pid =~ ^[0-9]+$ ]] && ((pid > 1)); do
    spare[$pid]=1
    pid=$(awk '/^PPid:/ { print $2 }' "/proc/$pid/status" 2>/dev/null)
  done
  for env_file in /proc/[0-9]*/environ; do
    pid=${env_file#/proc/}; pid=${pid%/environ}
    [[ -n ${spare[$pid]:-} || $pid == "$BASHPID" ]] && continue
    # Kernel threads and processes that exit meanwhile have no readable
    # environ; 2>/dev/null must come first to silence the redirect error.
    env=$(tr '\0' '\n' 2>/dev/null <"$env_file") || continue
    if grep -qxF "$MARKER_VAR=$STATE_DIR" <<<"$env" ||
       { grep -qx 'SLURM_JOB_ID=[0-9]*' <<<"$env" &&
         grep -qxF "SLURM_CONF=$SLURM_CONF_FILE" <<<"$env"; }; then
      echo "$pid"
      continue
    fi
    if [[ $(cat "/proc/$pid/comm" 2>/dev/null) == slurmstepd ]]; then
      for fd in "/proc/$pid/fd/"*; do
        if [[ $(readlink "$fd" 2>/dev/null) == "$STATE_DIR"/* ]]; then
          echo "$pid"
          break
        fi
      done
    fi
  done
}

# wait_gone TIMEOUT_S PID... : true once none of the PIDs exists any more.
wait_gone() {
  local deadline=$((SECONDS + $1)) pid alive
  shift
  while :; do
    alive=0
    for pid in "$@"; do
      # A zombie has no exe link; it is as good as gone for our purposes.
      if [[ -e /proc/$pid/exe ]]; then alive=1; break; fi
    done
    ((alive)) || return 0
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}

# Slurm client commands used by these scripts must talk to this cluster
# only, whatever the caller's environment says.
slurm_env() {
  env -u SLURM_JOB_ID -u SLURM_JOBID SLURM_CONF="$SLURM_CONF_FILE" "$@"
}

tail_logs() {
  local f
  for f in "$LOG_DIR"/*.log "$LOG_DIR"/*.out; do
    [[ -s $f ]] || continue
    printf '\n===== tail -n 25 %s =====\n' "$f" >&2
    tail -n 25 "$f" >&2
  done
}
