#!/usr/bin/env bash
# tests/vm/kvm-run.sh - run a command inside a stock Debian kernel under qemu.
#
#   sudo tests/vm/kvm-run.sh 'uname -r; modprobe tls && cat /proc/net/tls_stat'
#   sudo tests/vm/kvm-run.sh /usr/bin/python3 -m pytest tests/vm
#   sudo tests/vm/kvm-run.sh --check     # can qemu run here? (reason on stderr)
#
# Boots Debian's linux-image-cloud-amd64 (a 6.1 kernel with kprobes, kernel
# TLS, BTF: what this host's kernel may lack) with this machine's root file
# system as the guest's root: read-only over virtiofs, with a tmpfs overlay on
# top, so the guest can write anywhere and nothing reaches the host. The
# command runs as root in the current directory; its stdout and stderr come
# out on this script's stdout, and its exit status is this script's. Host
# environment variables are not passed: put VAR=value in the command.
#
# Exit status: the command's; 124 if the guest gave none (timeout, crash:
# the kernel log's tail is printed); 125 for an error of this script.
#
# The kernel, its modules and headers are fetched with `apt-get download`
# (Debian's archive only) into $KVM_CACHE and unpacked there; nothing is
# installed on the host. Packages (./install.sh --tests): qemu-system-x86
# (with its C virtiofsd), busybox-static, kmod (depmod), cpio.
#
# Where /dev/kvm is PVM (software nested virtualisation, /sys/module/kvm_pvm)
# a stock kernel cannot run on it, so qemu emulates (TCG): ~10 s to boot.
#
# Environment:
#   KVM_CACHE   kernel cache, survives between runs  (/var/cache/s3slower-kvm)
#   KVM_META    kernel metapackage                   (linux-image-cloud-amd64)
#   KVM_ACCEL   kvm | tcg | auto                     (auto: tcg on a PVM host)
#   KVM_FSCACHE virtiofsd cache mode                 (always; auto is ~4x slower)
#   KVM_MEM     guest memory                         (2G)
#   KVM_CPUS    guest vCPUs                          (1: faster under TCG on 2 cores)
#   KVM_TIMEOUT seconds before the guest is killed   (600)
#   KVM_CWD     working directory in the guest       (the current one)
#   KVM_APPEND  extra kernel command line
# Runs may overlap: each has its own directory under $KVM_CACHE/runs; the
# download and unpacking are serialised by a lock. To take a newer kernel,
# remove $KVM_CACHE/kver.
set -euo pipefail

CACHE=${KVM_CACHE:-/var/cache/s3slower-kvm}
META=${KVM_META:-linux-image-cloud-amd64}
ACCEL=${KVM_ACCEL:-auto}
MEM=${KVM_MEM:-2G}
CPUS=${KVM_CPUS:-1}
TIMEOUT=${KVM_TIMEOUT:-600}
GCWD=${KVM_CWD:-$PWD}
VIRTIOFSD=${KVM_VIRTIOFSD:-/usr/lib/qemu/virtiofsd}
MODULES="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci fuse virtiofs overlay"

say() { echo "kvm-run: $*" >&2; }
die() { say "error: $*"; exit 125; }

# Why qemu cannot run a stock kernel here, or nothing.
cannot_run() {
    [ "$(uname -m)" = x86_64 ] || { echo "not an x86_64 machine ($(uname -m))"; return; }
    [ "$(id -u)" -eq 0 ] || { echo "needs root (virtiofsd)"; return; }
    command -v qemu-system-x86_64 >/dev/null || { echo "no qemu-system-x86_64 (./install.sh --tests)"; return; }
    qemu-system-x86_64 -version >/dev/null 2>&1 || { echo "qemu-system-x86_64 does not run"; return; }
    [ -x "$VIRTIOFSD" ] || { echo "no $VIRTIOFSD (qemu-system-common)"; return; }
    case "$(ldd /bin/busybox 2>&1 || true)" in
        *"not a dynamic"*) ;;
        *) echo "/bin/busybox is not the static one (busybox-static)"; return ;;
    esac
    command -v depmod >/dev/null || { echo "no depmod (kmod)"; return; }
    command -v cpio >/dev/null || { echo "no cpio"; return; }
    [ -s "$CACHE/kver" ] || command -v apt-get >/dev/null ||
        { echo "no cached kernel in $CACHE and no apt-get to fetch one"; return; }
}

if [ "${1:-}" = --check ]; then
    why=$(cannot_run)
    [ -z "$why" ] || { echo "$why" >&2; exit 1; }
    exit 0
fi
[ $# -ge 1 ] || die "usage: $0 COMMAND [ARGS...] | --check"
why=$(cannot_run)
[ -z "$why" ] || die "$why"

mkdir -p "$CACHE/debs" "$CACHE/runs"
exec 9> "$CACHE/lock"
flock 9

# --- kernel, modules, headers (apt-get download + dpkg-deb -x) -------------
if [ ! -s "$CACHE/kver" ]; then
    apt-cache policy "$META" 2>/dev/null | grep -q 'Candidate: [0-9]' || apt-get update -qq >/dev/null
    img=$(apt-cache depends "$META" | awk '/Depends: linux-image-/ {print $2; exit}')
    [ -n "$img" ] || die "cannot resolve $META"
    kver=${img#linux-image-}
    flav=${kver#*-*-}                       # 6.1.0-57-cloud-amd64 -> cloud-amd64
    abi=${kver%-"$flav"}                    # 6.1.0-57
    kb=$(apt-cache depends "linux-headers-$kver" | awk '/Depends: linux-kbuild-/ {print $2; exit}')
    pkgs=("$img" "linux-headers-$kver" "linux-headers-$abi-common" $kb)
    rm -f "$CACHE"/debs/*.deb
    say "downloading ${pkgs[*]} into $CACHE/debs"
    (cd "$CACHE/debs" && apt-get download -q "${pkgs[@]}" 2>&1 |
        grep -v 'Download is performed unsandboxed' >&2) || true
    [ "$(ls "$CACHE"/debs/*.deb 2>/dev/null | wc -l)" -eq "${#pkgs[@]}" ] ||
        die "apt-get download did not fetch ${pkgs[*]}"
    rm -rf "$CACHE/root"; mkdir -p "$CACHE/root"
    for d in "$CACHE"/debs/*.deb; do dpkg-deb -x "$d" "$CACHE/root"; done
    depmod -b "$CACHE/root" "$kver"
    rm -f "$CACHE"/initrd-*
    echo "$kver" > "$CACHE/kver"
fi
kver=$(cat "$CACHE/kver")
KIMG=$CACHE/root/boot/vmlinuz-$kver
MODS=$CACHE/root/lib/modules/$kver
[ -f "$KIMG" ] || die "missing $KIMG (rm $CACHE/kver to fetch it again)"

# --- initramfs: static busybox + the virtio, virtiofs and overlay modules ---
INITRD=$CACHE/initrd-$kver.cpio.gz
initver=2       # bump when the init script below changes
if [ ! -s "$INITRD" ] || [ "$(cat "$INITRD.ver" 2>/dev/null)" != "$initver" ]; then
    t=$(mktemp -d); mkdir -p "$t"/{bin,mods,proc,sys,dev,lower,cache,rw,newroot}
    cp /bin/busybox "$t/bin/busybox"
    for m in $MODULES; do
        f=$(awk -F: -v m="$m" '{n=$1; sub(/.*\//,"",n); sub(/\.ko.*/,"",n); gsub(/-/,"_",n)} n==m {print $1; exit}' "$MODS/modules.dep")
        [ -n "$f" ] || die "module $m not in $MODS/modules.dep"
        cp "$MODS/$f" "$t/mods/$m.ko"
    done
    cat > "$t/init" <<INIT
#!/bin/busybox sh
MODULES="$MODULES"
INIT
    cat >> "$t/init" <<'INIT'
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
RUN=; for w in $(cat /proc/cmdline); do case $w in s3kvm.run=*) RUN=${w#s3kvm.run=} ;; esac; done
for m in $MODULES; do insmod /mods/$m.ko || echo "initramfs: insmod $m failed" > /dev/ttyS1; done
fail() { echo "initramfs: $*" > /dev/ttyS1; dmesg | tail -n 15 > /dev/ttyS1; echo o > /proc/sysrq-trigger; sleep 10; }
i=0; until mount -t virtiofs -o ro hostroot /lower 2>/dev/null; do
    i=$((i+1)); [ $i -lt 50 ] || fail "cannot mount virtiofs hostroot"; sleep 0.1; done
mount -t virtiofs kvmcache /cache || fail "cannot mount virtiofs kvmcache"
mount -t tmpfs -o mode=755 tmpfs /rw; mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot ||
    fail "overlay mount failed"
echo "initramfs: overlay at $(cat /proc/uptime)"
mkdir -p /newroot/kvmcache; mount --move /cache /newroot/kvmcache
umount /proc /sys; umount /dev 2>/dev/null
exec switch_root /newroot /bin/bash /kvmcache/runs/$RUN/stage2.sh
INIT
    chmod +x "$t/init"
    (cd "$t" && find . | cpio -o -H newc --quiet | gzip -1) > "$INITRD.tmp" && mv "$INITRD.tmp" "$INITRD"
    echo "$initver" > "$INITRD.ver"
    rm -rf "$t"
fi
flock -u 9

# --- this run's directory: stage 2, the command, its exit status ------------
RUNDIR=$(mktemp -d "$CACHE/runs/run.XXXXXX")
RUN=$(basename "$RUNDIR")
cat > "$RUNDIR/stage2.sh" <<EOF
#!/bin/bash
# stage 2: PID 1 in the guest's real root
KVER=$kver
RUNDIR=/kvmcache/runs/$RUN
EOF
cat >> "$RUNDIR/stage2.sh" <<'EOF'
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb LANG=C.UTF-8
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run   # no tmpfs on /tmp: it would hide the host's (the overlay makes it writable)
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
# The guest kernel's modules and headers over the host's paths (bind mounts:
# deleting a big tree on overlay-over-virtiofs takes a minute).
R=/kvmcache/root
mkdir -p /lib/modules/$KVER; mount --bind $R/lib/modules/$KVER /lib/modules/$KVER
for d in $R/usr/src/* $R/usr/lib/linux-kbuild-*; do
    t=${d#$R}; mkdir -p "$t"; mount --bind "$d" "$t"
done
ip link set lo up 2>/dev/null || busybox ip link set lo up
hostname kvm-guest
echo "stage2: ready at $(cat /proc/uptime)" > /dev/ttyS0
stty -F /dev/ttyS1 raw -echo 2>/dev/null
cd "$(cat $RUNDIR/cwd)" 2>/dev/null || cd /
bash $RUNDIR/cmd.sh > /dev/ttyS1 2>&1 < /dev/null
echo $? > $RUNDIR/rc
sync
echo o > /proc/sysrq-trigger
sleep 30
EOF
if [ $# -eq 1 ]; then printf '%s\n' "$1"; else printf '%q ' "$@"; echo; fi > "$RUNDIR/cmd.sh"
echo "$GCWD" > "$RUNDIR/cwd"

# --- two virtiofsd (host root, cache) and qemu -------------------------------
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    if [ -s "$RUNDIR/console.log" ]; then cp "$RUNDIR/console.log" "$CACHE/last-console.log"; fi
    rm -rf "$RUNDIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
start_fsd() { # tag dir
    "$VIRTIOFSD" --socket-path="$RUNDIR/$1.sock" -o source="$2" -o cache="${KVM_FSCACHE:-always}" \
        -o sandbox=chroot >> "$RUNDIR/virtiofsd.log" 2>&1 &
    pids+=($!)
}
start_fsd hostroot /
start_fsd kvmcache "$CACHE"
for _ in $(seq 100); do
    [ -S "$RUNDIR/hostroot.sock" ] && [ -S "$RUNDIR/kvmcache.sock" ] && break; sleep 0.1
done
[ -S "$RUNDIR/hostroot.sock" ] && [ -S "$RUNDIR/kvmcache.sock" ] ||
    die "virtiofsd did not start: $(cat "$RUNDIR/virtiofsd.log")"

if [ "$ACCEL" = auto ]; then
    # /dev/kvm on a PVM (software nested virtualisation) host cannot run a
    # stock kernel: "failed to set MSR 0x10a", or a hang after EDD probing.
    if [ -w /dev/kvm ] && ! [ -d /sys/module/kvm_pvm ]; then ACCEL=kvm; else ACCEL=tcg; fi
fi
if [ "$ACCEL" = kvm ]; then
    accel=(-accel kvm -cpu host,-arch-capabilities)
else
    accel=(-accel tcg,thread=multi,tb-size=512 -cpu max)
fi
say "booting $kver ($ACCEL, $CPUS cpu, $MEM, timeout ${TIMEOUT}s)"
start=$(date +%s.%N)
timeout -k 5 "$TIMEOUT" qemu-system-x86_64 "${accel[@]}" -smp "$CPUS" -m "$MEM" \
    -object memory-backend-memfd,id=mem,size="$MEM",share=on -numa node,memdev=mem \
    -machine q35 -nographic -nodefaults -no-reboot -display none \
    -kernel "$KIMG" -initrd "$INITRD" \
    -append "console=ttyS0 quiet loglevel=4 panic=-1 rdinit=/init tsc=reliable mitigations=off s3kvm.run=$RUN s3kvm.accel=$ACCEL ${KVM_APPEND:-}" \
    -chardev file,id=con,path="$RUNDIR/console.log" -serial chardev:con \
    -chardev stdio,id=out,signal=off -serial chardev:out \
    -chardev socket,id=fs0,path="$RUNDIR/hostroot.sock" -device vhost-user-fs-pci,chardev=fs0,tag=hostroot \
    -chardev socket,id=fs1,path="$RUNDIR/kvmcache.sock" -device vhost-user-fs-pci,chardev=fs1,tag=kvmcache \
    -device virtio-rng-pci </dev/null &
pids=("$!" "${pids[@]}")
qrc=0; wait "${pids[0]}" || qrc=$?
say "guest exited after $(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}') s (qemu rc=$qrc)"
if [ -s "$RUNDIR/rc" ]; then exit "$(cat "$RUNDIR/rc")"; fi
[ "$qrc" -ne 124 ] || say "killed after KVM_TIMEOUT=${TIMEOUT}s"
say "no exit status from the guest; the kernel log's tail ($CACHE/last-console.log):"
tail -n 20 "$RUNDIR/console.log" >&2 || true
exit 124
