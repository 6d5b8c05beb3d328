#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian machine (run as root) or a prepared one:
# system packages FFCV and the dev Slurm need, the venv, the Python dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

need_apt=()
pkg-config --exists opencv4 2>/dev/null || need_apt+=(libopencv-dev pkg-config)
[ -e /usr/include/turbojpeg.h ] || need_apt+=(libturbojpeg0-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "setup: apt-get install ${need_apt[*]}" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
    else
        echo "setup: missing ${need_apt[*]} and not root: FFCV will not build (data.loader=torch still works)" >&2
    fi
fi
if [ "$(id -u)" = 0 ]; then
    bash slurm/dev-cluster/install.sh  # real Slurm for the launcher tests; skips when present
fi

[ -x "$VENV/bin/python" ] || python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
stamp="$VENV/.kd-ddp-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
    # torch 2.14.1 for x86_64 on PyPI is a CUDA build: with its nvidia-* wheels the venv
    # takes ~6.2 GB (measured: torch 1.2, nvidia 3.2, triton 0.9). pip on a full disk dies
    # minutes in with a bare ENOSPC and a half-installed venv, so refuse up front instead.
    need_mb=${KD_DDP_SETUP_NEED_MB:-6600}
    if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
        free_mb=$(df -Pm "$VENV" | awk 'NR==2 {print $4}')
        if [ "$free_mb" -lt "$need_mb" ]; then
            echo "setup: $free_mb MB free under $VENV, the install needs ~$need_mb MB (torch is a CUDA build); free some space or set VENV=/a/roomier/path" >&2
            exit 1
        fi
    fi
    "$VENV/bin/pip" install -q --upgrade pip
    # Exact versions from constraints.txt (pyproject.toml only declares ranges). torch first,
    # alone: with its version pinned pip takes the wheel from the local disk.
    "$VENV/bin/pip" install -q -c constraints.txt torch torchvision
    "$VENV/bin/pip" install -q -c constraints.txt -e ".[ffcv,dev,vision]" || {
        echo "setup: FFCV failed to build; installing without it (data.loader=torch)" >&2
        "$VENV/bin/pip" install -q -c constraints.txt -e ".[dev,vision]"
    }
    touch "$stamp"
fi
