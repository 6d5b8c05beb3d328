#!/usr/bin/env bash
# Install what the dev cluster needs (Debian/Ubuntu, as root). A no-op when
# all binaries are already there, so CI can call it unconditionally.
set -euo pipefail

# ip (iproute2), nsenter and unshare (util-linux): the nodes of `start.sh
# --nodes N`, which a minimal Debian image does not have.
needed=(slurmctld slurmd slurmdbd munged sacct mariadb-admin mariadb-install-db ip nsenter unshare)
missing=()
for bin in "${needed[@]}"; do
  command -v "$bin" >/dev/null || missing+=("$bin")
done
# Older MariaDB packages ship only the mysqld name.
command -v mariadbd >/dev/null || command -v mysqld >/dev/null || missing+=(mariadbd)

if ((${#missing[@]} == 0)); then
  echo "[dev-cluster] slurm, munge and mariadb already installed" >&2
  exit 0
fi
echo "[dev-cluster] installing (missing: ${missing[*]})" >&2

[[ $(id -u) -eq 0 ]] || { echo "[dev-cluster] ERROR: run as root" >&2; exit 1; }

# Keep the distro's own munge/mariadb/slurm services from being started by
# the postinst scripts: they would grab the default ports (3306, 6817-6819)
# and /run/munge, and start.sh runs private instances anyway. Only a
# policy-rc.d that we created ourselves is removed again.
policy=/usr/sbin/policy-rc.d
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod 755 "$policy"
  trap 'rm -f "$policy"' EXIT
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends \
  slurm-wlm munge slurmdbd mariadb-server mariadb-client util-linux iproute2
