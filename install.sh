#!/usr/bin/env bash
# install.sh - set this host up to run s3slower.py (and, with --tests, its
# test suite). Idempotent: a second run checks and changes nothing.
#
#   sudo ./install.sh            # BCC, kernel headers, tracefs, prometheus_client
#   sudo ./install.sh --tests    # ... plus the clients and tools the tests use
#
# Debian/Ubuntu (apt). BCC comes from the distribution (python3-bpfcc), so
# the Python packages are installed for the interpreter that has BCC.
set -euo pipefail

want_tests=0
for arg in "$@"; do
    case "$arg" in
        --tests) want_tests=1 ;;
        -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown option $arg (try --help)" >&2; exit 2 ;;
    esac
done

say() { echo "install.sh: $*" >&2; }
die() { say "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (sudo ./install.sh)"
command -v apt-get >/dev/null || die "needs apt-get (Debian/Ubuntu); install BCC and kernel headers by hand"
export DEBIAN_FRONTEND=noninteractive

apt_updated=0
apt_update_once() {
    if [ "$apt_updated" -eq 0 ]; then
        say "apt-get update"
        apt-get update -qq >/dev/null
        apt_updated=1
    fi
}

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"; }

has_candidate() {
    apt_update_once
    local c
    c=$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}')
    [ -n "$c" ] && [ "$c" != "(none)" ]
}

apt_install() {
    local missing=()
    for pkg in "$@"; do installed "$pkg" || missing+=("$pkg"); done
    [ "${#missing[@]}" -eq 0 ] && return 0
    apt_update_once
    say "installing ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# --- BCC and the metrics library, for the distribution's python3 ----------
# python3-capstone: finds the return instructions of Go programs' crypto/tls Read.
apt_install python3-bpfcc python3-prometheus-client python3-capstone

# --- kernel headers --------------------------------------------------------
release=$(uname -r)
moddir=/lib/modules/$release
if [ -e "$moddir/build/include" ] || [ -e /sys/kernel/kheaders.tar.xz ]; then
    :
elif has_candidate "linux-headers-$release"; then
    apt_install "linux-headers-$release"
else
    arch=$(dpkg --print-architecture)
    flavour="cloud-$arch"
    has_candidate "linux-headers-$flavour" || flavour=$arch
    has_candidate "linux-headers-$flavour" ||
        die "no kernel headers package for $release; install headers and link them as $moddir/build"
    apt_install "linux-headers-$flavour"
    dir=$(ls -d /usr/src/linux-headers-*-"$flavour" 2>/dev/null | sort -V | tail -n 1)
    [ -n "$dir" ] || die "linux-headers-$flavour installed no /usr/src/linux-headers-*-$flavour"
    common=${dir%-"$flavour"}-common
    [ -d "$common" ] || common=$dir
    say "warning: no headers package matches kernel $release; linking the distribution's generic $(basename "$dir") (enough for uprobe programs)"
    mkdir -p "$moddir"
    ln -sfn "$dir" "$moddir/build"
    ln -sfn "$common" "$moddir/source"
fi

# --- tracefs (BCC reads tracepoint ids there) ------------------------------
if [ ! -e /sys/kernel/tracing/events ] && [ ! -e /sys/kernel/debug/tracing/events ]; then
    mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null ||
        mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null ||
        say "warning: could not mount tracefs; tracepoints may fail"
fi

# --- test dependencies -----------------------------------------------------
if [ "$want_tests" -eq 1 ]; then
    apt_install python3-pytest python3-boto3 python3-hypothesis curl wget awscli s3cmd \
        openssl ca-certificates procps prometheus \
        gcc libc6-dev pkg-config libssl-dev libnss3-dev libnspr4-dev nginx \
        golang-go
    # tests/test_new_programs.py: a real Go S3 client started after the
    # tracer (Debian's rclone keeps its Go symbols, so crypto/tls is found).
    apt_install rclone
    # The VM stage (tests/vm/kvm-run.sh): a stock kernel under qemu, booted
    # from a busybox initramfs, with the io_uring kTLS client's library.
    apt_install qemu-system-x86 busybox-static kmod cpio liburing-dev
fi

python=$(command -v /usr/bin/python3 || true)
[ -n "$python" ] && "$python" -c 'import bcc, prometheus_client' 2>/dev/null ||
    die "BCC or prometheus_client still not importable by /usr/bin/python3"
say "ready: run ./s3slower.py as root"
