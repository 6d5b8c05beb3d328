#!/usr/bin/env bash
# What .ci/run sees: a clean clone of HEAD, ../shared beside it, CI=true, a venv of its own.
# Each clone's venv is ~6 GB, and the disk may be shared with the CI machines: the clone is
# removed on exit (pass KEEP=1 to keep it for a post-mortem).
set -euo pipefail
cd "$(dirname "$0")/.."
d=$(mktemp -d "${TMPDIR:-/tmp}/kd-ddp-ci.XXXXXX")
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$d"' EXIT
git clone -q . "$d/repo"
cp -r ../shared "$d/shared"
echo "fresh clone of $(git rev-parse --short HEAD) in $d" >&2
start=$(date +%s)
rc=0
(cd "$d/repo" && CI=true bash .ci/run) || rc=$?
echo "fresh-clone CI: exit $rc after $(( $(date +%s) - start )) s" >&2
exit "$rc"
