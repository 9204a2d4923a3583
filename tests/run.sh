#!/usr/bin/env bash
# tests/run.sh - set up this host for the tests and run the whole suite,
# real-BPF end-to-end tests included (they need root), then the VM stage:
# tests/vm inside a stock distribution kernel under qemu (tests/vm/stage.sh;
# S3SLOWER_VM=0 leaves it out, and says so).
#   sudo ./tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
./install.sh --tests
# BCC lives with the distribution's interpreter: run the suite there.
rc=0
/usr/bin/python3 -m pytest tests -ra "$@" || rc=$?
case "$rc" in
    0|1) ;;
    *) echo "tests/run.sh: pytest exited $rc; VM stage not run" >&2; exit "$rc" ;;
esac
vm=0
bash tests/vm/stage.sh || vm=$?
[ "$rc" -ne 0 ] && exit "$rc"
exit "$vm"
