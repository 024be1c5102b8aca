#!/bin/busybox sh
# /init of the VM lane's guests (packed by .ci/vm.sh with busybox and static test
# binaries). Runs the steps of the plan named on the kernel command line
# (cpulocal.plan=fast|full|sets), prints "=== VM-STEP-OK/FAILED/SKIPPED <step>" lines and
# one "CPULOCAL-VM-RESULT ... passed=N failed=N" line, then powers off.
#
# `sh /init --call FUNCTION ARGS...` runs one function of this file (how `step` puts a
# shell function under `timeout`).
export PATH=/bin
if [ "$1" != --call ]; then
    /bin/busybox --install -s /bin
    mount -t proc proc /proc
    mount -t sysfs sysfs /sys
    mount -t devtmpfs devtmpfs /dev 2>/dev/null
    mount -t tmpfs tmpfs /tmp
fi
export RUST_BACKTRACE=1 HOME=/tmp TMPDIR=/tmp
cd /tmp

arg() { sed -n "s/.*cpulocal\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
PLAN=$(arg plan)
NAME=$(arg name)
PASSED=0
FAILED=0
FAILED_STEPS=""
CPU=/sys/devices/system/cpu

# The CPUs of a kernel CPU list, one a line ("0-2,5" -> 0 1 2 5).
expand_cpus() {
    echo "$1" | tr ',' '\n' | awk -F- 'NF == 2 { for (c = $1; c <= $2; c++) print c } NF == 1 && $1 != "" { print $1 }'
}
# Number of CPUs in a kernel CPU list ("0-3,6,8-9" -> 7).
count_cpus() { expand_cpus "$1" | wc -l; }
# Highest CPU of a list + 1 ("0-11" -> 12).
list_end() { expand_cpus "$1" | sort -n | tail -n 1 | awk '{ print $1 + 1 }'; }
# A top-level value of a one-line JSON object (strings keep their quotes).
jget() { sed -n "s/.*\"$1\":\(\"[^\"]*\"\|[^,}]*\).*/\1/p" | head -n 1; }

POSSIBLE=$(cat $CPU/possible)
PRESENT=$(cat $CPU/present)
ONLINE=$(cat $CPU/online)
NCPU=$(count_cpus "$ONLINE")
KREL=$(uname -r)
KMAJ=${KREL%%.*}
KMIN=$(echo "$KREL" | cut -d. -f2)
# mm_cid arrived in 6.3, AT_RSEQ_FEATURE_SIZE too.
if [ "$KMAJ" -gt 6 ] || { [ "$KMAJ" -eq 6 ] && [ "$KMIN" -ge 3 ]; }; then MM_CID=true; else MM_CID=false; fi
[ "$1" = --call ] || echo "CPULOCAL-VM-GUEST name=$NAME plan=$PLAN kernel=$KREL arch=$(uname -m) possible=$POSSIBLE present=$PRESENT online=$ONLINE"

step_ok() { PASSED=$((PASSED + 1)); echo "=== VM-STEP-OK $1 ($2 s)"; }
step_failed() { FAILED=$((FAILED + 1)); FAILED_STEPS="$FAILED_STEPS $1"; echo "=== VM-STEP-FAILED $1 ($2)"; }

# step NAME LIMIT-SECONDS FUNCTION-OR-COMMAND...: runs one checked step; on a timeout,
# what it started is killed too.
step() {
    name=$1 limit=$2
    shift 2
    echo "=== VM-STEP $name: $*"
    t0=$(date +%s)
    timeout "$limit" sh /init --call "$@"
    rc=$?
    t=$(($(date +%s) - t0))
    if [ "$rc" -ne 0 ]; then
        killall -9 cpulocal 2>/dev/null
        for bin in /tests/*; do killall -9 "${bin##*/}" 2>/dev/null; done
    fi
    if [ "$rc" -eq 0 ]; then step_ok "$name" "$t"; else step_failed "$name" "exit $rc after $t s"; fi
}

# A test harness binary, with its name; the test threads default to the vCPUs.
tests() { bin=/tests/$1; shift; "$bin" "$@"; }

# The library's unit tests as a dynamic glibc binary (loader and libraries packed in
# /lib): glibc registers each thread's rseq area, and the registration tests assert that
# cpulocal uses glibc's (a gnu build expects `Registrar::Glibc`).
glibc_lib_tests() {
    LD_LIBRARY_PATH=/lib/$(uname -m)-linux-gnu /tests/glibc-cpulocal-lib \
        --skip tests::stress --skip "$1"
}

# cpulocal info: CPU counts, features, mechanism against what /sys and the kernel say.
check_info() {
    cpulocal info || return 1
    json=$(cpulocal info --json) || return 1
    echo "$json"
    bad=0
    expect() {
        got=$(echo "$json" | jget "$1")
        if [ "$got" != "$2" ]; then
            echo "info: $1 is $got, expected $2"
            bad=1
        fi
    }
    expect possible_cpus "$(list_end "$POSSIBLE")"
    expect online_cpus "$(count_cpus "$(cat $CPU/online)")"
    expect mechanism_kind '"rseq"'
    expect thread_registered true
    expect private_expedited_rseq true
    expect mm_cid_filled "$MM_CID"
    if [ "$MM_CID" = false ]; then
        expect rseq_feature_size 20
        expect rseq_feature_size_raw null
    fi
    # The musl build registers its own area, max(32, feature size) bytes: the V2 mode on
    # kernels whose feature size goes beyond 32 (7.x), legacy before.
    fs=$(echo "$json" | jget rseq_feature_size)
    if [ "${fs:-0}" -gt 32 ]; then expect rseq_mode '"V2"'; else expect rseq_mode '"legacy"'; fi
    expect registration_len "$([ "${fs:-0}" -gt 32 ] && echo "$fs" || echo 32)"
    cpu=$(echo "$json" | jget cpu)
    [ "$cpu" -lt "$(list_end "$POSSIBLE")" ] || { echo "info: cpu $cpu out of range"; bad=1; }
    return $bad
}

# cpulocal stress with --json; passes when the run passed and, with a minimum, at least
# that many kernel aborts were counted.
stress() {
    min_aborts=$1
    shift
    out=$(cpulocal stress --json "$@")
    rc=$?
    echo "$out"
    [ "$rc" -eq 0 ] || return "$rc"
    [ "$(echo "$out" | jget passed)" = true ] || return 1
    aborts=$(echo "$out" | jget kernel_aborts)
    if [ "$min_aborts" -gt 0 ] && [ "${aborts:-0}" -lt "$min_aborts" ]; then
        echo "only ${aborts:-0} kernel aborts (expected >= $min_aborts)"
        return 1
    fi
    return 0
}

# Every structure under signals, affinity churn and thread churn.
stress_all() {
    secs=$1
    for s in counter stack lock ring remote mix; do
        echo "--- stress $s"
        stress 0 --structure "$s" --threads $((2 * NCPU)) --duration "$secs" --signals \
            --affinity-churn --thread-churn --churn-ops 2000 --yield --delay 20 || return 1
    done
}

# Same-CPU preemption: every thread pinned to CPU 0, sequences held open by the delay
# hook, no signals: only preemption by the other threads can abort them (the shape of
# the 2026 arm64 regression). Exact totals and at least one kernel abort.
same_cpu() {
    secs=$1
    for s in counter stack lock ring mix; do
        echo "--- same-CPU $s"
        taskset -c 0 cpulocal stress --json --structure "$s" --threads 4 \
            --duration "$secs" --delay 2000 >/tmp/same.json
        rc=$?
        cat /tmp/same.json
        [ "$rc" -eq 0 ] || return 1
        aborts=$(jget kernel_aborts </tmp/same.json)
        [ "${aborts:-0}" -gt 0 ] || { echo "no kernel abort on one CPU"; return 1; }
    done
}

# CPU hotplug under load: every structure stressed (mix) while each CPU but 0 goes
# offline and comes back; exact totals.
hotplug() {
    secs=$1
    [ -w $CPU/cpu1/online ] || { echo "no hotpluggable CPU 1"; return 0; }
    cpulocal stress --json --structure mix --threads $((2 * NCPU)) --duration "$secs" \
        --signals --affinity-churn --thread-churn --churn-ops 2000 --delay 20 >/tmp/hp.json &
    pid=$!
    rounds=0
    while kill -0 $pid 2>/dev/null; do
        for c in $(seq 1 $((NCPU - 1))); do
            kill -0 $pid 2>/dev/null || break
            [ -w $CPU/cpu$c/online ] || continue
            echo 0 >$CPU/cpu$c/online && rounds=$((rounds + 1))
            usleep 200000
            echo 1 >$CPU/cpu$c/online
        done
    done
    wait $pid
    rc=$?
    cat /tmp/hp.json
    echo "hotplug: $rounds CPU offline/online rounds during the run; online now $(cat $CPU/online)"
    [ "$rc" -eq 0 ] && [ "$(jget passed </tmp/hp.json)" = true ]
}

# A vCPU hot-added while every structure is under load (x86_64 guests started with CPUs
# possible but not present): the host adds it over QMP when this asks on the console
# (.ci/vm.sh). The new CPU comes online, runs pinned threads of a second stress (exact
# totals; `current_cpu()` names it), and the first stress, which runs throughout, passes.
hotadd() {
    expand_cpus "$(cat $CPU/present)" >/tmp/present.before
    cpulocal stress --json --structure mix --threads $((2 * NCPU)) --duration 20 \
        --signals --affinity-churn --thread-churn --churn-ops 2000 --delay 20 >/tmp/ha.json &
    pid=$!
    sleep 2
    echo CPULOCAL-VM-HOTADD-REQUEST
    i=0
    while [ "$(cat $CPU/present)" = "$PRESENT" ]; do
        i=$((i + 1))
        [ $i -le 240 ] || { echo "hotadd: no CPU arrived in 120 s"; kill $pid; return 1; }
        usleep 500000
    done
    new=$(expand_cpus "$(cat $CPU/present)" | grep -vxF -f /tmp/present.before | head -n 1)
    echo "hotadd: present $PRESENT -> $(cat $CPU/present): cpu$new"
    # No udev here: a hot-added CPU stays offline until someone writes its switch.
    [ "$(cat $CPU/cpu$new/online)" = 1 ] || echo 1 >$CPU/cpu$new/online || return 1
    echo "hotadd: online $(cat $CPU/online)"
    got=$(taskset -c "$new" cpulocal info --json | jget cpu)
    [ "$got" = "$new" ] || { echo "hotadd: a thread pinned to cpu$new reads cpu $got"; return 1; }
    taskset -c "0,$new" sh /init --call stress 0 --structure mix --threads 4 --duration 3 \
        --signals --affinity-churn || return 1
    wait $pid
    rc=$?
    cat /tmp/ha.json
    [ "$rc" -eq 0 ] && [ "$(jget passed </tmp/ha.json)" = true ]
}

# Stress on whatever CPU set the guest has (possible != present != online).
sets() {
    check_info || return 1
    stress 0 --structure mix --threads $((2 * NCPU)) --duration 5 --signals --affinity-churn
}

if [ "$1" = --call ]; then
    shift
    "$@"
    exit $?
fi

LIB=cpulocal-cpulocal
ABORT=tests::abort_path::a_signal_inside_a_sequence_restarts_it_and_the_retry_lands_once
case "$PLAN" in
    fast | full)
        step info 120 check_info
        step abort-path 300 tests $LIB --exact $ABORT --nocapture
        step counter-storm 600 tests $LIB tests::stress
        step lib-tests 900 tests $LIB --skip tests::stress --skip $ABORT
        step lib-tests-glibc 900 glibc_lib_tests $ABORT
        step stress-all 600 stress_all 3
        step same-cpu 300 same_cpu 3
        step hotplug-under-load 300 hotplug 10
        # x86_64 guests started with fewer vCPUs than they may have (qemu's maxcpus=).
        if [ "$(uname -m)" = x86_64 ] && [ "$PRESENT" != "$POSSIBLE" ]; then
            step hotadd 300 hotadd
        fi
        step hotplug-offline-slots 300 env CPULOCAL_TEST_HOTPLUG=1 /tests/cpulocal-hotplug --nocapture
        if [ "$PLAN" = full ]; then
            for t in counter_take percpu_locking percpu_remote ring_stress ring_lifecycle ring_wait \
                ring_memory stack_stress alloc_stress alloc_global single_step; do
                step "$t" 900 tests cpulocal-$t
            done
            step cli-unit 600 tests cpulocal-cli-cpulocal_cli
            step cli-tests 900 tests cpulocal-cli-cli
            step cli-stress-tests 900 tests cpulocal-cli-stress
        fi
        ;;
    sets)
        step sets 300 sets
        ;;
    *)
        step_failed plan "unknown plan '$PLAN'"
        ;;
esac

echo "CPULOCAL-VM-RESULT name=$NAME kernel=$KREL arch=$(uname -m) cpus=$NCPU passed=$PASSED failed=$FAILED${FAILED_STEPS:+ failed_steps=$FAILED_STEPS}"
sync
reboot -f
