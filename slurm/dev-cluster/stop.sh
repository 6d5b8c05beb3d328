#!/usr/bin/env bash
# Stop the dev cluster started by start.sh from STATE_DIR (default
# /tmp/kd-ddp-slurm; with --nodes N, /tmp/kd-ddp-slurm-Nnodes) and leave none
# of its processes running; a multi-node cluster's namespaces and links go
# too. State (job ids, accounting database) is kept for the next start;
# `rm -rf STATE_DIR` afterwards to wipe it. Idempotent.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=_common.sh
source "$HERE/_common.sh"

QUEUE_TIMEOUT=${KD_DDP_SLURM_STOP_QUEUE_TIMEOUT:-30}
DAEMON_TIMEOUT=${KD_DDP_SLURM_STOP_DAEMON_TIMEOUT:-20}

[[ $(id -u) -eq 0 ]] || die "must run as root"

exec 9>"$STATE_DIR/.lock"
flock -w 300 9 || die "timed out waiting for the lock on $STATE_DIR/.lock"

# kill_pids NAME TIMEOUT_S PID... : SIGTERM, bounded wait, then SIGKILL.
kill_pids() {
  local name=$1 timeout=$2
  shift 2
  (($#)) || return 0
  kill -TERM "$@" 2>/dev/null || true
  if ! wait_gone "$timeout" "$@"; then
    log "$name did not exit within ${timeout} s; sending SIGKILL"
    kill -KILL "$@" 2>/dev/null || true
    wait_gone 5 "$@" || log "WARNING: $name ($*) survived SIGKILL"
  fi
}

stop_daemon() {
  local name=$1 pid
  pid=$(daemon_pid "$name") || return 0
  log "stopping $name (pid $pid)"
  kill_pids "$name" "$DAEMON_TIMEOUT" "$pid"
}

# One slurmd, or one per node of a multi-node layout.
slurmd_names=()
for name in "${!PID_FILES[@]}"; do
  [[ $name == slurmd || $name == slurmd@* ]] && slurmd_names+=("$name")
done

# ------------------------------------------------------------ drain queue
# Jobs go first: `scontrol shutdown` with jobs still running leaves the node
# drained ("Kill task failed" etc.) in the saved state of the next start.
if daemon_pid slurmctld >/dev/null && slurm_env scontrol ping >/dev/null 2>&1; then
  mapfile -t jobs < <(slurm_env squeue -h -o %A 2>/dev/null || true)
  if ((${#jobs[@]})); then
    log "cancelling ${#jobs[@]} job(s)"
    slurm_env scancel "${jobs[@]}" 2>/dev/null || true
    deadline=$((SECONDS + QUEUE_TIMEOUT))
    while [[ -n $(slurm_env squeue -h -o %A 2>/dev/null || true) ]]; do
      if ((SECONDS >= deadline)); then
        log "queue not empty after ${QUEUE_TIMEOUT} s; shutting down anyway"
        break
      fi
      sleep 0.5
    done
  fi
  # Stops slurmctld and slurmd in the order Slurm wants.
  log "scontrol shutdown"
  slurm_env scontrol shutdown >/dev/null 2>&1 || true
  pids=()
  for name in slurmctld "${slurmd_names[@]}"; do
    pid=$(daemon_pid "$name") && pids+=("$pid")
  done
  if ((${#pids[@]})) && ! wait_gone "$DAEMON_TIMEOUT" "${pids[@]}"; then
    log "slurmctld/slurmd still up after scontrol shutdown"
  fi
fi

# Whatever is left, by PID. slurmdbd before MariaDB so it can flush pending
# records; munged last because every Slurm daemon authenticates through it.
for name in "${slurmd_names[@]}" slurmctld slurmdbd mariadbd munged; do
  stop_daemon "$name"
done

# Stragglers: jobs that did not end in time (or whose slurmd died),
# their slurmstepd, daemons whose pid file got lost.
mapfile -t left < <(cluster_pids)
if ((${#left[@]})); then
  log "killing leftover processes: $(for p in "${left[@]}"; do
    printf '%s(%s) ' "$p" "$(cat "/proc/$p/comm" 2>/dev/null)"; done)"
  # slurmstepd blocks SIGTERM, so do not wait long before SIGKILL.
  kill_pids leftovers 2 "${left[@]}"
fi

rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock" "$DB_SOCKET"

# ----------------------------------------------------------------- network
# Only the names the layout file records, each only if it exists, so this
# is a no-op the second time and never touches another cluster's network.
if [[ -n $BRIDGE ]]; then
  removed=()
  for i in "${!NODE_NETNS[@]}"; do
    ns=${NODE_NETNS[$i]}
    if [[ -e /run/netns/$ns ]]; then
      if ip netns del "$ns"; then removed+=("netns $ns"); else log "WARNING: could not delete network namespace $ns"; fi
    fi
    # Deleting the namespace deletes the veth pair, unless a process still
    # holds the namespace open; then the host end goes explicitly.
    if ip link show "${NODE_VETHS[$i]}" >/dev/null 2>&1; then
      if ip link del "${NODE_VETHS[$i]}"; then removed+=("veth ${NODE_VETHS[$i]}"); fi
    fi
  done
  if ip link show "$BRIDGE" >/dev/null 2>&1; then
    if ip link del "$BRIDGE"; then removed+=("bridge $BRIDGE"); else log "WARNING: could not delete bridge $BRIDGE"; fi
  fi
  ((${#removed[@]} == 0)) || log "removed ${removed[*]}"
fi
log "stopped (state kept in $STATE_DIR)"
