#!/usr/bin/env bash
# bench/run.sh - set up (idempotent) and run the benchmarks, as root.
#   bench/run.sh                 overhead (A/B rounds, table per load), then tax
#   bench/run.sh tax             syscall tax of other processes, start, exit
#   bench/run.sh longrun         10^6 requests + 2000 processes: RSS, maps
#   bench/run.sh overhead --rounds 5 --requests 20000
#   bench/run.sh new_programs    exec -> attached, exec storm cost, start-up
set -euo pipefail
cd "$(dirname "$0")/.."
./install.sh --tests
# BCC's sslsniff as a peer, bpftool to count map entries.
for pkg in bpfcc-tools bpftool; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" ||
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends "$pkg" >/dev/null
done
what=${1:-all}
[ $# -gt 0 ] && shift
case $what in
    all) /usr/bin/python3 bench/overhead.py "$@"
         exec /usr/bin/python3 bench/tax.py ;;
    overhead) exec /usr/bin/python3 bench/overhead.py "$@" ;;
    tax) exec /usr/bin/python3 bench/tax.py "$@" ;;
    longrun) exec /usr/bin/python3 bench/longrun.py "$@" ;;
    new_programs) exec /usr/bin/python3 bench/new_programs.py "$@" ;;
    *) echo "usage: bench/run.sh [all|overhead|tax|longrun|new_programs] [options]" >&2
       exit 2 ;;
esac
