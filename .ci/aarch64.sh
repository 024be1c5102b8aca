#!/usr/bin/env bash
# aarch64 checks for cpulocal, run from an x86_64 host: type-check and lint the aarch64
# sequences, then run the library's unit tests under qemu-user.
#
# Under qemu-user the rseq syscall is ENOSYS, so the process runs the fallback; the
# `arch::` tests still execute every aarch64 sequence, on a fake `struct rseq` that no
# kernel watches. Installs what it needs when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET=aarch64-unknown-linux-gnu
SYSROOT=/usr/aarch64-linux-gnu

echo "== aarch64: toolchain"
if ! rustup target list --installed | grep -qx "$TARGET"; then
    rustup target add "$TARGET"
fi
if ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-gcc >/dev/null; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo=sudo; fi
    $sudo apt-get update
    $sudo apt-get install -y qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross
fi

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L $SYSROOT"

echo "== aarch64: cargo check (production build, and with the test hooks)"
cargo check -p cpulocal --target "$TARGET"
cargo check -p cpulocal --target "$TARGET" --all-features

echo "== aarch64: cargo clippy"
cargo clippy -p cpulocal --target "$TARGET" --all-targets --all-features -- -D warnings

echo "== aarch64: the sequences (arch::) under qemu-user, debug and optimised"
timeout 300 cargo test -p cpulocal --target "$TARGET" --lib -- arch::
timeout 300 cargo test -p cpulocal --target "$TARGET" --lib --release -- arch::

# qemu-user refuses rseq (ENOSYS), as valgrind does: CPULOCAL_TEST_VALGRIND=1 tells the
# tests to expect the fallback. Tests that need rseq itself, or that re-execute the test
# binary in a child (qemu-user does not follow exec without binfmt), stay on x86_64.
echo "== aarch64: the primitives' model and the structures' stress tests under qemu-user (fallback)"
export CPULOCAL_TEST_VALGRIND=1
# The pool's residency and signal tests run their bodies in a child process (an exec of
# the test binary), so they stay on x86_64 too.
timeout 300 cargo test -p cpulocal --target "$TARGET" --lib -- \
    arch:: sys:: tests::counter_basics tests::model tests::pool \
    --skip cpus_that_never_use_a_per_cpu_cost_no_resident_memory \
    --skip a_lazy_mm_cid_per_cpu_used_by_one_thread_populates_one_range \
    --skip a_counters_first_use_in_a_handler_that_interrupted_the_pool_does_not_wedge \
    --skip taking_a_counter_populates_no_cpu_that_never_added \
    --skip the_reserved_bytes_count_large_chunks
timeout 600 cargo test -p cpulocal --target "$TARGET" --all-features \
    --test stack_stress --test percpu_remote --test ring_stress -- \
    --skip locked --skip without_rseq --skip skip_the_fence --skip mm_cid_sequences
