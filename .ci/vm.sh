#!/usr/bin/env bash
# The VM lane: cpulocal's tests inside qemu guests that boot real kernels (x86_64 and
# aarch64, Debian's 6.1, 6.12 and 7.x, PREEMPT_RT), with CPU hotplug and CPU sets where
# possible != present != online. qemu-user has no rseq; these guests have the kernel's own.
#
#   bash .ci/vm.sh            the fast subset (what .ci/run runs): x86_64 and aarch64 on 6.1
#   bash .ci/vm.sh --full     the whole matrix (kernels x vCPUs x flavours)
#   bash .ci/vm.sh --only NAME[,NAME]   some guests of the matrix by name (see `--list`)
#
# On a fresh Debian 12 machine, as root: installs qemu (bookworm-backports), busybox-static
# and cpio with a private apt configuration (the system's sources and architectures stay
# as they are), downloads kernels with `apt-get download` (never installed), builds static
# musl test binaries and the `cpulocal` binary for both architectures, packs one busybox
# initramfs per architecture and boots each guest with TCG (`-accel tcg,thread=multi`;
# this machine's /dev/kvm cannot run stock kernels). The guest's /init (.ci/vm-guest.sh)
# runs the steps its kernel command line names and prints one result line on the
# console; a guest that does not print it in time (timeout per boot) fails the lane.
# Downloads and builds are cached in $CPULOCAL_VM_CACHE (default /var/cache/cpulocal-vm).
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
REPO=$PWD

CACHE=${CPULOCAL_VM_CACHE:-/var/cache/cpulocal-vm}
QEMU_NICE=${CPULOCAL_VM_NICE:-5}
MODE=fast
ONLY=""
LIST=0
while [ $# -gt 0 ]; do
    case "$1" in
        --full) MODE=full ;;
        --only) ONLY=$2; shift ;;
        --list) LIST=1 ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "vm.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

# The matrix: name arch kernel-series flavour smp(qemu) extra-kernel-args plan timeout-s.
# kernel series: 6.1 (Debian 12: no mm_cid, feature size 20), 6.12 (bookworm-backports:
# mm_cid), 7 (the newest 7.x in trixie-backports/sid: V2 rseq mode at the feature size).
# Plans (what the guest runs, see .ci/vm-guest.sh): fast = the library's tests, the abort
# path, info, every structure's stress, same-CPU preemption, hotplug under load;
# full = fast + the integration tests and the CLI's tests; sets = CPU sets only.
# Only the 6.1 guests hot-add a vCPU: 6.12 and 7.3.4 count no absent qemu slot as a
# possible CPU (possible = present with maxcpus=), and since the x86 topology rework
# (6.9) possible_cpus= can only lower the count (tried: 24 and 40, no effect), so their
# hot-add step finds no slot to fill and is skipped.
MATRIX_FAST="
x86-6.1-8       x86_64  6.1   cloud-amd64 8,maxcpus=12  -              fast 900
arm-6.1-8       aarch64 6.1   arm64       8             -              fast 900
"
MATRIX_FULL="
x86-6.1-16      x86_64  6.1   cloud-amd64 16,maxcpus=32 -              full 1500
x86-6.1-sets    x86_64  6.1   cloud-amd64 6,maxcpus=24  maxcpus=3      sets 600
x86-6.1-poss    x86_64  6.1   cloud-amd64 4             possible_cpus=8 sets 600
x86-6.12-16     x86_64  6.12  cloud-amd64 16,maxcpus=24 -              full 1500
x86-7-32        x86_64  7     cloud-amd64 32,maxcpus=40 -              fast 1800
x86-7-16        x86_64  7     cloud-amd64 16            -              full 1500
x86-7rt-16      x86_64  7     rt-amd64    16            -              full 1500
arm-6.1-16      aarch64 6.1   arm64       16            -              full 1500
arm-6.12-8      aarch64 6.12  arm64       8             -              fast 900
arm-7-16        aarch64 7     arm64       16            -              full 1500
arm-7rt-8       aarch64 7     rt-arm64    8             -              fast 900
"

matrix() {
    case "$MODE" in
        fast) echo "$MATRIX_FAST" ;;
        full) echo "$MATRIX_FAST"; echo "$MATRIX_FULL" ;;
    esac | awk 'NF == 8' | if [ -n "$ONLY" ]; then
        grep -E "^($(echo "$ONLY" | tr , '|'))[[:space:]]"
    else
        cat
    fi
}
if [ -n "$ONLY" ]; then MODE=full; fi
if [ "$LIST" = 1 ]; then MODE=full; matrix; exit 0; fi

log() { echo "== vm: $*"; }
started=$(date +%s)

# ---------------------------------------------------------------- host packages
APT_HOST="$CACHE/apt/host"
APT_DL="$CACHE/apt/dl"
apt_host() {
    apt-get -q -o Dir::Etc::SourceList="$APT_HOST/sources.list" \
        -o Dir::Etc::SourceParts="$CACHE/apt/empty" -o APT::Sandbox::User=root -o Dir::State::Lists="$APT_HOST/lists" \
        -o Dir::Cache="$APT_HOST/cache" "$@"
}
apt_dl() {
    apt-get -q -o Dir::Etc::SourceList="$APT_DL/sources.list" \
        -o Dir::Etc::SourceParts="$CACHE/apt/empty" -o APT::Sandbox::User=root -o Dir::State::Lists="$APT_DL/lists" \
        -o Dir::Cache="$APT_DL/cache" -o Dir::Etc::Preferences=/nonexistent \
        -o Dir::Etc::PreferencesParts="$CACHE/apt/empty" \
        -o APT::Architectures::=amd64 -o APT::Architectures::=arm64 "$@"
}
apt_dl_cache() {
    apt-cache -o Dir::Etc::SourceList="$APT_DL/sources.list" \
        -o Dir::Etc::SourceParts="$CACHE/apt/empty" -o APT::Sandbox::User=root -o Dir::State::Lists="$APT_DL/lists" \
        -o Dir::Cache="$APT_DL/cache" -o Dir::Etc::Preferences=/nonexistent \
        -o Dir::Etc::PreferencesParts="$CACHE/apt/empty" \
        -o APT::Architectures::=amd64 -o APT::Architectures::=arm64 "$@"
}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
MIRROR=http://deb.debian.org/debian

install_host_tools() {
    mkdir -p "$CACHE/apt/empty"
    local missing=0
    for tool in qemu-system-x86_64 qemu-system-aarch64 cpio aarch64-linux-gnu-gcc; do
        command -v "$tool" >/dev/null || missing=1
    done
    [ -x /bin/busybox ] && file_is_static /bin/busybox || missing=1
    if [ "$missing" = 0 ]; then return; fi
    log "installing qemu (bookworm-backports), busybox-static, cpio, the aarch64 glibc cross linker"
    mkdir -p "$APT_HOST/lists/partial" "$APT_HOST/cache/archives/partial"
    cat >"$APT_HOST/sources.list" <<EOF
deb [signed-by=$KEYRING] $MIRROR bookworm main
deb [signed-by=$KEYRING] $MIRROR bookworm-updates main
deb [signed-by=$KEYRING] $MIRROR bookworm-backports main
deb [signed-by=$KEYRING] http://deb.debian.org/debian-security bookworm-security main
EOF
    apt_host update >/dev/null
    # bookworm's qemu 7.2 would remove a preinstalled qemu-utils from backports (10.x).
    DEBIAN_FRONTEND=noninteractive apt_host install -y --no-install-recommends \
        -t bookworm-backports qemu-system-x86 qemu-system-arm busybox-static cpio \
        gcc-aarch64-linux-gnu libc6-dev-arm64-cross >/dev/null
}

file_is_static() {
    # A static ELF has no PT_INTERP: no "/lib" loader path in its first bytes.
    ! grep -qa 'ld-linux\|ld-musl' <(head -c 4096 "$1")
}

# The package indices the guests' kernels need (the series named in $1): bookworm for
# 6.1 (and busybox-static:arm64), bookworm-backports for 6.12, trixie-backports and sid
# for 7.x. The fast subset needs bookworm alone, which keeps a cold run short.
update_download_index() {
    local series=" $1 " suites="bookworm"
    case "$series" in *" 6.12 "*) suites+=" bookworm-backports" ;; esac
    case "$series" in *" 7 "*) suites+=" trixie-backports sid" ;; esac
    mkdir -p "$APT_DL/lists/partial" "$APT_DL/cache/archives/partial"
    for suite in $suites; do
        echo "deb [arch=amd64,arm64 signed-by=$KEYRING] $MIRROR $suite main"
    done >"$APT_DL/sources.list.new"
    # Refreshed when the suites change, and otherwise at most once a day: the kernels of
    # a day stay the same.
    if ! cmp -s "$APT_DL/sources.list.new" "$APT_DL/sources.list" ||
        [ -z "$(find "$APT_DL/stamp" -mmin -1440 2>/dev/null)" ]; then
        mv "$APT_DL/sources.list.new" "$APT_DL/sources.list"
        log "apt-get update ($suites: kernel and arm64 package indices, private configuration)"
        apt_dl update >/dev/null
        touch "$APT_DL/stamp"
    else
        rm "$APT_DL/sources.list.new"
    fi
}

# The newest package of the series for a flavour; prints its name.
kernel_package() {
    local series=$1 flavour=$2 re
    case "$series" in
        6.1) re="^linux-image-6\.1\.0-[0-9]+-$flavour\$" ;;
        6.12) re="^linux-image-6\.12\.[0-9]+\+deb1[23]-$flavour\$" ;;
        7) re="^linux-image-7\.[0-9]+\.[0-9]+\+deb1[3-9]-$flavour\$" ;;
        *) echo "unknown kernel series $series" >&2; return 1 ;;
    esac
    apt_dl_cache pkgnames linux-image- | grep -E "$re" | sort -V | tail -n 1
}

# Downloads and unpacks a kernel; prints the directory holding `kernel` and `config`.
fetch_kernel() {
    local arch=$1 series=$2 flavour=$3 debarch pkg dir
    debarch=$([ "$arch" = x86_64 ] && echo amd64 || echo arm64)
    pkg=$(kernel_package "$series" "$flavour")
    if [ -z "$pkg" ]; then
        echo "no kernel package for $series $flavour" >&2
        return 1
    fi
    dir="$CACHE/kernels/$pkg"
    if [ -s "$dir/kernel" ] && [ -s "$dir/config" ]; then
        echo "$dir"
        return
    fi
    log "downloading $pkg:$debarch" >&2
    rm -rf "$dir" && mkdir -p "$dir/deb" "$dir/root"
    (cd "$dir/deb" && apt_dl download "$pkg:$debarch" >/dev/null)
    # From 7.x the image package is a shell: vmlinuz is in linux-binary-*, the config
    # in linux-base-*.
    local deps
    deps=$(apt_dl_cache show "$pkg:$debarch" | sed -n 's/^Depends: //p' | sed -n 1p |
        tr ',' '\n' | sed -n 's/^ *\(linux-\(binary\|base\)-[^ ]*\).*/\1/p')
    for dep in $deps; do
        (cd "$dir/deb" && apt_dl download "$dep:$debarch" >/dev/null)
    done
    # The image and its config only (up to 6.x in /boot, named with the version; from
    # 7.x in /usr/lib/modules/<version>/): the modules are not needed (the guests load
    # none).
    for deb in "$dir"/deb/*.deb; do
        dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$dir/root" --wildcards './boot/*' \
            './usr/lib/modules/*/vmlinuz' './usr/lib/modules/*/config' 2>/dev/null || true
    done
    local vmlinuz config
    vmlinuz=$(find "$dir/root" -name 'vmlinuz*' -type f -print -quit)
    config=$(find "$dir/root" \( \( -name 'config-*' -path '*boot*' \) -o \
        \( -name config -path '*/usr/lib/modules/*' \) \) -print -quit)
    if [ -z "$vmlinuz" ] || [ -z "$config" ]; then
        echo "$pkg: no vmlinuz or config in the packages" >&2
        return 1
    fi
    cp "$config" "$dir/config"
    if [ "$arch" = x86_64 ]; then
        # An unpacked vmlinux (PVH entry) boots much faster under TCG than the bzImage,
        # which would decompress itself in emulation.
        extract_vmlinux "$vmlinuz" "$dir/kernel" || cp "$vmlinuz" "$dir/kernel"
    else
        # arm64: vmlinuz is a gzip-compressed Image.
        if gzip -t "$vmlinuz" 2>/dev/null; then
            gzip -dc "$vmlinuz" >"$dir/kernel"
        else
            cp "$vmlinuz" "$dir/kernel"
        fi
    fi
    rm -rf "$dir/deb" "$dir/root"
    echo "$dir"
}

# The ELF vmlinux inside a bzImage: the payload after the first compression magic that
# decompresses to an ELF file.
extract_vmlinux() {
    local in=$1 out=$2 magic tool offset
    for pair in '\xfd7zXZ\x00:xz' '\x28\xb5\x2f\xfd:zstd' '\x1f\x8b\x08:gzip' \
        '\x02\x21\x4c\x18:lz4'; do
        magic=${pair%:*}
        tool=${pair##*:}
        command -v "$tool" >/dev/null || continue
        for offset in $(LC_ALL=C grep -obUaP -m 4 "$magic" "$in" | cut -d: -f1 || true); do
            tail -c "+$((offset + 1))" "$in" | "$tool" -dc 2>/dev/null >"$out.tmp" || true
            if [ "$(head -c 4 "$out.tmp" | od -An -tx1 | tr -d ' ')" = 7f454c46 ]; then
                mv "$out.tmp" "$out"
                return 0
            fi
        done
    done
    rm -f "$out.tmp"
    return 1
}

# busybox-static for the guest's architecture.
guest_busybox() {
    local arch=$1 dir
    if [ "$arch" = x86_64 ]; then
        echo /bin/busybox
        return
    fi
    dir="$CACHE/busybox-arm64"
    if [ ! -x "$dir/busybox" ]; then
        log "downloading busybox-static:arm64" >&2
        rm -rf "$dir" && mkdir -p "$dir/deb" "$dir/root"
        (cd "$dir/deb" && apt_dl download busybox-static:arm64 >/dev/null)
        dpkg-deb -x "$dir"/deb/*.deb "$dir/root"
        cp "$(find "$dir/root" -type f -name busybox -path '*bin/*' -print -quit)" "$dir/busybox"
        rm -rf "$dir/deb" "$dir/root"
    fi
    echo "$dir/busybox"
}

# ---------------------------------------------------------------- builds
export CARGO_TARGET_DIR="$CACHE/target"
# Static binaries for the guests: small (no debug info, symbols kept for backtraces) and
# optimised a little (TCG runs them 10-50x slower than the host would).
export CARGO_PROFILE_DEV_DEBUG=false
export CARGO_PROFILE_DEV_STRIP=debuginfo
export CARGO_PROFILE_DEV_OPT_LEVEL=1
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=rust-lld

# Builds every test binary and the CLI for a target; writes "<name> <path>" lines to
# $CACHE/build/<arch>.list.
build_for() {
    local arch=$1 target="$1-unknown-linux-musl" list="$CACHE/build/$1.list"
    mkdir -p "$CACHE/build"
    if ! rustup target list --installed | grep -qx "$target"; then
        rustup target add "$target"
    fi
    log "building the test binaries and cpulocal for $target"
    local json="$CACHE/build/$arch.json" what
    # The fast plan needs the library's unit tests and tests/hotplug.rs only; the full
    # plan every test harness of the workspace.
    # Every feature but the CLI's default `peer-allocators`: mimalloc and jemalloc build C
    # code, and there is no musl C compiler here (the guests never run `bench`).
    local lib_features=cpulocal/metrics,cpulocal/prometheus-client,cpulocal/tracing
    lib_features+=,cpulocal/__test-hooks,cpulocal/__global-cpu-cache
    if [ "$BUILD_ALL" = 1 ]; then
        what=(--workspace --no-default-features
            --features "$lib_features,cpulocal-cli/test-hooks,cpulocal-cli/global-cpu-cache")
    else
        what=(-p cpulocal --lib --test hotplug --features "$lib_features")
    fi
    nice -n 10 cargo test "${what[@]}" --no-run --target "$target" \
        --message-format=json-render-diagnostics >"$json"
    nice -n 10 cargo build -p cpulocal-cli --no-default-features --features test-hooks \
        --target "$target"
    # The library's unit tests once more as a dynamic glibc binary, which the guest runs
    # with the loader and libraries packed beside it: there glibc registers the thread's
    # rseq area and cpulocal uses it (the musl build registers its own).
    local gnu_target="$1-unknown-linux-gnu" gnu_json="$CACHE/build/$arch-gnu.json"
    if ! rustup target list --installed | grep -qx "$gnu_target"; then
        rustup target add "$gnu_target"
    fi
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
        nice -n 10 cargo test -p cpulocal --lib --features "$lib_features" --no-run \
        --target "$gnu_target" --message-format=json-render-diagnostics >"$gnu_json"
    # "<crate>-<target> <executable>" for every test harness ("<crate>-bin-<target>" for
    # a binary's unit tests), from cargo's JSON messages.
    sed -n 's/.*"package_id":"[^"]*\/\([^/#"]*\)#[^"]*".*"target":{"kind":\["\([a-z-]*\)"\][^}]*"name":"\([^"]*\)".*"profile":{[^}]*"test":true}.*"executable":"\([^"]*\)".*/\1 \2 \3 \4/p' \
        "$json" | awk '{ print ($2 == "bin") ? $1 "-bin-" $3 : $1 "-" $3, $4 }' |
        sort -u >"$list.tmp"
    echo "cpulocal-bin $CARGO_TARGET_DIR/$target/debug/cpulocal" >>"$list.tmp"
    sed -n 's/.*"executable":"\([^"]*\)".*/glibc-cpulocal-lib \1/p' "$gnu_json" >>"$list.tmp"
    mv "$list.tmp" "$list"
}

# Copies the dynamic loader and the shared libraries a glibc binary needs, from the
# host (x86_64) or the cross sysroot that .ci/aarch64.sh installs (aarch64), to the paths
# the binary names, under the initramfs root $3.
pack_glibc() {
    local arch=$1 bin=$2 root=$3 libdir interp lib
    case "$arch" in
        x86_64) libdir=/lib/x86_64-linux-gnu ;;
        aarch64) libdir=/usr/aarch64-linux-gnu/lib ;;
    esac
    interp=$(readelf -l "$bin" | sed -n 's/.*interpreter: \([^]]*\)].*/\1/p')
    mkdir -p "$root$(dirname "$interp")" "$root/lib/$arch-linux-gnu"
    cp -L "$libdir/$(basename "$interp")" "$root$interp"
    for lib in $(readelf -d "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
        cp -L "$libdir/$lib" "$root/lib/$arch-linux-gnu/$lib"
    done
}

# Packs the initramfs of an architecture; prints its path.
pack_initramfs() {
    local arch=$1 root="$RUN/initramfs-$arch" out="$RUN/$arch.cpio"
    rm -rf "$root" && mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp,tests,etc}
    cp "$(guest_busybox "$arch")" "$root/bin/busybox"
    cp .ci/vm-guest.sh "$root/init"
    chmod 755 "$root/init"
    local name path
    while read -r name path; do
        if [ "$name" = glibc-cpulocal-lib ]; then
            cp "$path" "$root/tests/$name"
            pack_glibc "$arch" "$path" "$root"
        elif [ "$name" = cpulocal-bin ]; then
            cp "$path" "$root/bin/cpulocal"
            # The CLI's tests run the binary from the path cargo compiled into them.
            mkdir -p "$root$(dirname "$path")"
            ln -f "$root/bin/cpulocal" "$root$path"
        else
            cp "$path" "$root/tests/$name"
        fi
    done <"$CACHE/build/$arch.list"
    (cd "$root" && find . | cpio -o -H newc --quiet) >"$out"
    rm -rf "$root"
    echo "$out"
}

# ---------------------------------------------------------------- boots
# x86_64 guests with vCPUs possible but not present (`-smp N,maxcpus=M`) get a QMP
# socket: when the guest prints CPULOCAL-VM-HOTADD-REQUEST on its console (the hot-add
# step of .ci/vm-guest.sh), this adds one vCPU with `device_add`, as a cloud host plugs
# a CPU into a running machine. One hot-add per boot; the reply goes to $3.
hotadd_on_request() {
    local logf=$1 sock=$2 out=$3
    # Polls the console until the request (the caller kills this when qemu exits).
    while ! grep -qa '^CPULOCAL-VM-HOTADD-REQUEST' "$logf" 2>/dev/null; do
        sleep 1
    done
    python3 - "$sock" >"$out" 2>&1 <<'PY'
import json, socket, sys

sock = socket.socket(socket.AF_UNIX)
sock.connect(sys.argv[1])
stream = sock.makefile("rw")

def command(name, **arguments):
    stream.write(json.dumps({"execute": name, "arguments": arguments}) + "\n")
    stream.flush()
    while True:  # events may come before the reply
        reply = json.loads(stream.readline())
        if "return" in reply or "error" in reply:
            return reply

json.loads(stream.readline())  # the greeting
command("qmp_capabilities")
slots = command("query-hotpluggable-cpus")["return"]
free = [s for s in slots if "qom-path" not in s]
if not free:
    sys.exit("no possible-but-absent vCPU slot")
slot = min(free, key=lambda s: sorted(s["props"].items()))
reply = command("device_add", driver=slot["type"], id="hotadded0", **slot["props"])
print("device_add", slot["type"], slot["props"], "->", reply)
sys.exit(1 if "error" in reply else 0)
PY
}

# Boots one guest; its console goes to $CACHE/logs/<name>.log. Returns non-zero unless
# the guest printed a result line with no failed step.
boot() {
    local name=$1 arch=$2 series=$3 flavour=$4 smp=$5 extra=$6 plan=$7 limit=$8
    local kdir initrd logf qemu console cpus mem
    kdir=$(fetch_kernel "$arch" "$series" "$flavour")
    initrd="$RUN/$arch.cpio"
    logf="$RUN/$name.log"
    cpus=${smp%%,*}
    mem=$((1024 + 64 * cpus))
    [ "$extra" = - ] && extra=""
    if [ "$arch" = x86_64 ]; then
        qemu=(qemu-system-x86_64 -M q35 -cpu max)
        console=ttyS0
    else
        # pauth-impdef: the architected pointer-authentication algorithm is slow in TCG.
        qemu=(qemu-system-aarch64 -M virt,gic-version=3 -cpu max,pauth-impdef=on)
        console=ttyAMA0
    fi
    local qmp=() watcher=""
    if [ "$arch" = x86_64 ] && [[ $smp == *maxcpus=* ]]; then
        qmp=(-qmp "unix:$RUN/$name.qmp,server=on,wait=off")
        hotadd_on_request "$logf" "$RUN/$name.qmp" "$RUN/$name.hotadd" &
        watcher=$!
    fi
    log "boot $name: $arch $(basename "$kdir") -smp $smp ${extra:+($extra) }plan $plan, limit ${limit}s"
    local t0 rc=0
    t0=$(date +%s)
    timeout -s KILL "$limit" nice -n "$QEMU_NICE" "${qemu[@]}" "${qmp[@]}" \
        -accel tcg,thread=multi -smp "$smp" -m "$mem" \
        -kernel "$kdir/kernel" -initrd "$initrd" \
        -append "console=$console panic=-1 quiet loglevel=4 rdinit=/init $extra cpulocal.plan=$plan cpulocal.name=$name" \
        -nographic -no-reboot -nodefaults -serial stdio -monitor none \
        </dev/null >"$logf" 2>&1 || rc=$?
    local secs=$(($(date +%s) - t0))
    if [ -n "$watcher" ]; then
        kill "$watcher" 2>/dev/null || true
        wait "$watcher" 2>/dev/null || true
        if [ -s "$RUN/$name.hotadd" ]; then sed "s/^/   [$name] qmp: /" "$RUN/$name.hotadd"; fi
        rm -f "$RUN/$name.qmp"
    fi
    local result
    result=$(grep -a '^CPULOCAL-VM-RESULT' "$logf" | tail -n 1 | tr -d '\r')
    grep -a -E '^(=== VM-STEP-(OK|FAILED|SKIPPED)|CPULOCAL-VM-)' "$logf" | tr -d '\r' | sed "s/^/   [$name] /"
    if [ -z "$result" ]; then
        echo "   [$name] no result line (qemu exit $rc after ${secs}s: timeout or panic); last lines:"
        tail -n 30 "$logf" | tr -d '\r' | sed "s/^/   [$name] | /"
        return 1
    fi
    echo "   [$name] ${secs}s: $result"
    case "$result" in
        *" failed=0"*) return 0 ;;
        *)
            # The failing tests' own words, then the end of the console.
            { grep -a -E -A3 'panicked at|^---- ' "$logf" || true; } | tr -d '\r' |
                sed -n '1,80p' | sed "s/^/   [$name] ! /"
            return 1
            ;;
    esac
}

# ---------------------------------------------------------------- main
if [ "$(id -u)" -ne 0 ]; then
    echo "vm.sh: run as root (installs packages)" >&2
    exit 2
fi
mkdir -p "$CACHE"
# Runs of this script may overlap (several worktrees' CI on one machine): the installs,
# downloads and builds take a lock; each run packs and logs into its own directory.
exec 9>"$CACHE/lock"
flock 9
find "$CACHE" -maxdepth 1 -name 'run.*' -mtime +1 -exec rm -rf {} +
RUN=$(mktemp -d "$CACHE/run.XXXXXX")
install_host_tools
guests=$(matrix)
update_download_index "$(echo "$guests" | awk '{print $3}' | sort -u | tr '\n' ' ')"
BUILD_ALL=$(echo "$guests" | awk '$7 == "full" { all = 1 } END { print all + 0 }')
archs=$(echo "$guests" | awk '{print $2}' | sort -u)
for arch in $archs; do
    build_for "$arch"
    initramfs=$(pack_initramfs "$arch")
    log "initramfs for $arch: $initramfs ($(du -m "$initramfs" | cut -f1) MB)"
done
# Kernels first, so that a download failure shows before any boot.
while read -r name arch series flavour rest; do
    kdir=$(fetch_kernel "$arch" "$series" "$flavour")
    log "kernel for $name: $kdir"
done <<<"$guests"

flock -u 9
log "consoles in $RUN"

failed=()
while read -r name arch series flavour smp extra plan limit; do
    boot "$name" "$arch" "$series" "$flavour" "$smp" "$extra" "$plan" "$limit" ||
        failed+=("$name")
done <<<"$guests"

rm -f "$RUN"/*.cpio
total=$(echo "$guests" | wc -l)
log "$((total - ${#failed[@]})) passed, ${#failed[@]} failed (guests; $(($(date +%s) - started)) s)"
if [ ${#failed[@]} -gt 0 ]; then
    log "failed: ${failed[*]} (consoles in $RUN)"
    exit 1
fi
