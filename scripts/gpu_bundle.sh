#!/usr/bin/env bash
# Pack what scripts/gpu_check.sh needs on an offline GPU host whose Python already has
# torch, numpy, numba, opencv and matplotlib (the lent H100/H200 image: Python 3.12):
# FFCV and its pure-Python deps from this venv, the native libraries FFCV's extension links
# against, and the CIFAR-10 archive. Writes .gpu/ (ignored by git; about 45 MB).
#
# FFCV 1.0.2 ships as an sdist only and the host can neither compile it (no OpenCV or
# libjpeg-turbo headers) nor download it, so the extension built here travels. It only
# holds C functions that FFCV calls through ctypes; its module init uses nothing that
# differs between CPython 3.11 and 3.12, so it is renamed for the host's interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY_TAG=${PY_TAG:-cpython-312-x86_64-linux-gnu}
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
rm -rf .gpu && mkdir -p .gpu/site .gpu/lib
for pkg in ffcv fastargs terminaltables assertpy submitit; do
  cp -r "$site/$pkg" .gpu/site/
done
find .gpu/site -name __pycache__ -prune -exec rm -rf {} +
so=$(ls .gpu/site/ffcv/_libffcv.cpython-*.so)
[ "$so" = ".gpu/site/ffcv/_libffcv.$PY_TAG.so" ] || mv "$so" ".gpu/site/ffcv/_libffcv.$PY_TAG.so"
# The shared libraries it needs, less glibc and the C++ runtime (the host has newer ones).
ldd ".gpu/site/ffcv/_libffcv.$PY_TAG.so" | awk '/=>/ {print $3}' \
  | grep -vE '/(libc|libm|libstdc\+\+|libgcc_s|ld-linux[^/]*)\.so' | xargs -I{} cp -L {} .gpu/lib/
cp "${ARCHIVE:-../shared/data/cifar10-jpeg.tar.gz}" .gpu/cifar10-jpeg.tar.gz
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.gpu/' >> .git/info/exclude; }
du -sh .gpu
