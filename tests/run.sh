#!/usr/bin/env bash
# tests/run.sh - set up this host for the tests and run the whole suite,
# real-BPF end-to-end tests included (they need root).
#   sudo ./tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
./install.sh --tests
# BCC lives with the distribution's interpreter: run the suite there.
exec /usr/bin/python3 -m pytest tests -ra "$@"
