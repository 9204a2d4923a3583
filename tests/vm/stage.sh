#!/usr/bin/env bash
# tests/vm/stage.sh - the test suite's VM stage (run by tests/run.sh after the
# host's pytest run): boots a stock distribution kernel once under qemu
# (tests/vm/kvm-run.sh) and runs, inside it, with real BPF:
#   tests/vm                  kernel TLS: sendfile, io_uring splice, kTLS receive
#   + a smoke check of two host e2e tests (curl keep-alive; the kTLS test
#     that skips on a host without kernel TLS)
# all under one tracer started once (1.5-3.5 min under emulation). Whole
# stage: 5-7 min on a 2-core host under TCG.
#
#   sudo tests/vm/stage.sh
#
# Exit status: the guest pytest's (non-zero also if the guest gave none).
# If qemu cannot run here at all it says why and skips (exit 0) - except
# with S3SLOWER_REQUIRE_BPF=1 (CI), where that is a failure.
#
# Environment:
#   S3SLOWER_VM=0                    skip the stage (says so)
#   S3SLOWER_VM_TESTS                guest pytest selection (default above)
#   S3SLOWER_VM_TIMEOUT              guest hard time limit, s (1200)
#   S3SLOWER_TRACER_START_TIMEOUT    tracer start-up limit in the guest, s (420)
#   S3SLOWER_VM_TOOL                 another s3slower.py to test (copied over the
#                                    checkout's in the guest's overlay only; it
#                                    must take the options tests/conftest.py uses)
#   KVM_*                            see tests/vm/kvm-run.sh
set -uo pipefail
cd "$(dirname "$0")/../.."

if [ "${S3SLOWER_VM:-1}" = 0 ]; then
    echo "VM stage: skipped (S3SLOWER_VM=0)"
    exit 0
fi
if ! why=$(bash tests/vm/kvm-run.sh --check 2>&1); then
    if [ "${S3SLOWER_REQUIRE_BPF:-}" = 1 ]; then
        echo "VM stage: FAILED: qemu cannot run here: $why"
        exit 1
    fi
    echo "VM stage: SKIPPED: qemu cannot run here: $why"
    exit 0
fi

swap=
if [ -n "${S3SLOWER_VM_TOOL:-}" ]; then
    tool=$(readlink -f "$S3SLOWER_VM_TOOL")
    [ -f "$tool" ] || { echo "VM stage: FAILED: no S3SLOWER_VM_TOOL file $S3SLOWER_VM_TOOL"; exit 1; }
    swap="cp $(printf %q "$tool") s3slower.py && echo \"guest: testing $tool\""
fi
tests=${S3SLOWER_VM_TESTS:-"tests/vm tests/test_e2e.py::test_curl_keepalive_requests_each_reported_once tests/test_plain.py::test_ktls_sendfile_upload_reported_once tests/test_plain.py::test_plain_http_curl_and_python tests/test_plain.py::test_sendfile_body_counted"}
log=$(mktemp /tmp/s3slower-vm-stage.XXXXXX)
trap 'rm -f "$log"' EXIT
echo "VM stage: booting a stock kernel under qemu; in the guest: pytest $tests"
start=$(date +%s.%N)
KVM_TIMEOUT=${S3SLOWER_VM_TIMEOUT:-1200} bash tests/vm/kvm-run.sh "
echo \"guest: kernel \$(uname -r), up after \$(cut -d' ' -f1 /proc/uptime) s\"
$swap
# What a syscall costs before any tracer runs (tests/vm/test_plain_tcp.py).
export S3SLOWER_VM_DD_NS=\$(/usr/bin/python3 -c 'import sys; sys.path.insert(0, \"bench\"); from tax import dd_ns_per_syscall as d; print(min(d(200000) for _ in range(3)))')
S3SLOWER_VM_GUEST=1 S3SLOWER_REQUIRE_BPF=1 \
S3SLOWER_TRACER_START_TIMEOUT=${S3SLOWER_TRACER_START_TIMEOUT:-420} \
/usr/bin/python3 -m pytest -v -ra -p no:cacheprovider --durations=5 $tests
" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN{printf "%.0f", b-a}')
summary=$(grep -E '^=+ .*(passed|failed|error|skipped|deselected|no tests ran).* in [0-9.]+s' "$log" | tail -n 1 |
    sed -E 's/^=+ //; s/ =+$//')
grep -E '^guest: |^\[vm\] ' "$log" | sed 's/^/VM stage: /'
echo "VM stage: ${summary:-no pytest summary (guest exit status $rc)}; stage took ${secs} s"
if [ "$rc" -eq 0 ]; then echo "VM stage: passed"; else echo "VM stage: FAILED (exit status $rc)"; fi
exit "$rc"
