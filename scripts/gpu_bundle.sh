#!/usr/bin/env bash
# Pack what scripts/gpu_check.sh needs on the offline GPU host (Python 3.12; its image has torch,
# torchvision, numpy, numba, opencv, matplotlib, pillow, PyYAML, tqdm, filelock, psutil,
# cloudpickle, but at versions nobody pinned, and no submitit, FFCV or wandb) into .gpu/
# (ignored by git; it travels with `carry=[".gpu"]`):
#   site/  the packages the pipeline and the benchmarks import that the image lacks or may hold
#          at a version outside pyproject.toml's range, copied from this venv with their
#          dist-info (so the preflight reads their versions): the pure-Python and abi3 ones
#          (filelock, submitit and its cloudpickle and typing_extensions, tqdm, PyYAML's
#          Python part, psutil) and FFCV with its pure-Python deps. Not torch, torchvision,
#          numpy, pillow or matplotlib: built per Python and CUDA, they must be the image's
#          (the preflight checks their versions). Not wandb: the check runs with tracking off.
#   lib/   the native libraries FFCV's extension links against
#   cifar10-jpeg.tar.gz  the CIFAR-10 archive
# Prints what each part weighs and what the whole call would carry (limit: 64 MiB).
#
# FFCV 1.0.2 ships as an sdist only and the host can neither compile it (no OpenCV or
# libjpeg-turbo headers) nor download it, so the extension built here travels. It only
# holds C functions that FFCV calls through ctypes; its module init uses nothing that
# differs between CPython 3.11 and 3.12, so it is renamed for the host's interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY_TAG=${PY_TAG:-cpython-312-x86_64-linux-gnu}
CARRY_LIMIT_MB=64
rm -rf .gpu && mkdir -p .gpu/site .gpu/lib
# Each distribution's own files, as its RECORD lists them (its dist-info included), less
# bytecode, console scripts and extensions built for this Python (PyYAML's _yaml: it falls
# back to pure Python; FFCV's is renamed below).
.venv/bin/python - .gpu/site <<'EOF'
import shutil, sys
from importlib import metadata
from pathlib import Path

DISTS = ["filelock", "submitit", "cloudpickle", "typing_extensions", "tqdm", "pyyaml", "psutil",
         "ffcv", "fastargs", "terminaltables", "assertpy"]
dest = Path(sys.argv[1])
for name in DISTS:
    dist = metadata.distribution(name)
    size = 0
    for f in dist.files or []:
        rel = str(f)
        built_here = rel.endswith(".so") and "cpython-3" in rel and not rel.startswith("ffcv/")
        if rel.startswith("..") or "__pycache__" in rel or rel.endswith(".pyc") or built_here:
            continue
        src = Path(f.locate())
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
            size += src.stat().st_size
    print(f"  {name} {dist.version}: {size / 1024:.0f} KiB")
EOF
so=$(ls .gpu/site/ffcv/_libffcv.cpython-*.so)
[ "$so" = ".gpu/site/ffcv/_libffcv.$PY_TAG.so" ] || mv "$so" ".gpu/site/ffcv/_libffcv.$PY_TAG.so"
# The shared libraries it needs, less glibc and the C++ runtime (the host has newer ones).
ldd ".gpu/site/ffcv/_libffcv.$PY_TAG.so" | awk '/=>/ {print $3}' \
  | grep -vE '/(libc|libm|libstdc\+\+|libgcc_s|ld-linux[^/]*)\.so' | xargs -I{} cp -L {} .gpu/lib/
cp "${ARCHIVE:-../shared/data/cifar10-jpeg.tar.gz}" .gpu/cifar10-jpeg.tar.gz
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.gpu/' >> .git/info/exclude; }
du -sh .gpu/site .gpu/lib .gpu/cifar10-jpeg.tar.gz; du -sh .gpu
# What a device call sends: the tracked and untracked-not-ignored files, plus .gpu.
tree_kb=$(git ls-files -co --exclude-standard -z | du -ck --files0-from=- 2>/dev/null | tail -1 | cut -f1)
gpu_kb=$(du -sk .gpu | cut -f1)
total_mb=$(( (tree_kb + gpu_kb) / 1024 ))
echo "carried: working tree $((tree_kb / 1024)) MiB + .gpu $((gpu_kb / 1024)) MiB = ${total_mb} MiB of ${CARRY_LIMIT_MB} MiB"
[ "$total_mb" -lt "$CARRY_LIMIT_MB" ] || { echo "too large for one device call"; exit 1; }
