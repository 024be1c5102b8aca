use super::*;
use tracing_core::Dispatch;
use tracing_subscriber::prelude::*;

/// Runs `f` on `threads` threads, each with `layer` as its subscriber.
fn on_threads(layer: RingLayer, threads: usize, f: impl Fn(usize) + Sync) {
    let dispatch = Dispatch::new(tracing_subscriber::registry().with(layer));
    std::thread::scope(|s| {
        for t in 0..threads {
            let (dispatch, f) = (&dispatch, &f);
            s.spawn(move || tracing_core::dispatcher::with_default(dispatch, || f(t)));
        }
    });
}

#[test]
fn every_event_is_written_once_from_many_threads() {
    let out = SharedBuffer::default();
    // Room for every event (4 MiB per CPU), so that none should be dropped; a loaded
    // machine may still starve the writer, and then the counts must add up.
    let ring = RingConfig {
        sub_buffer_size: 64 << 10,
        sub_buffers: 64,
        ..RingConfig::default()
    };
    let (layer, guard) = Builder::new()
        .ring(ring)
        .format(Format::Json)
        .build(out.clone())
        .unwrap();
    // Fewer under valgrind, which runs the threads one at a time, slowly.
    let per_thread = if crate::tests::under_valgrind() {
        200
    } else {
        5_000
    };
    on_threads(layer, 4, |t| {
        for i in 0..per_thread {
            tracing::info!(thread = t as u64, seq = i, name = "x", "event");
        }
    });
    guard.sync();
    let stats = guard.stats();
    drop(guard);
    let mut seen = std::collections::HashSet::new();
    for line in out.text().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["target"] == "cpulocal::tracing" {
            continue; // a drop report
        }
        assert_eq!(v["fields"]["message"], "event", "{line}");
        assert_eq!(v["fields"]["name"], "x", "{line}");
        let key = (
            v["fields"]["thread"].as_u64().unwrap(),
            v["fields"]["seq"].as_u64().unwrap(),
        );
        assert!(seen.insert(key), "written twice: {line}");
    }
    assert_eq!(seen.len() as u64, stats.written, "{stats:?}");
    assert_eq!(stats.written + stats.dropped(), 4 * per_thread, "{stats:?}");
}

#[test]
fn full_rings_drop_events_counted_and_reported() {
    let out = SharedBuffer::default();
    // Two sub-buffers of 256 bytes per CPU, flushed rarely.
    let ring = RingConfig {
        sub_buffer_size: 256,
        sub_buffers: 2,
        ..RingConfig::default()
    };
    let (layer, guard) = Builder::new()
        .ring(ring)
        .flush_interval(Duration::from_secs(1))
        .build(out.clone())
        .unwrap();
    on_threads(layer, 2, |_| {
        for i in 0..400u64 {
            tracing::warn!(seq = i, "burst");
        }
    });
    guard.sync();
    let stats = guard.stats();
    drop(guard);
    assert!(stats.dropped_full > 0, "{stats:?}");
    assert_eq!(stats.written + stats.dropped(), 800, "{stats:?}");
    let text = out.text();
    let records = text.lines().filter(|l| l.contains(" burst seq=")).count() as u64;
    assert_eq!(records, stats.written);
    assert!(
        text.contains(&format!(
            "events dropped (in total: {} ring full, 0 too large",
            stats.dropped_full
        )),
        "{text}"
    );
}

#[test]
fn an_event_larger_than_a_sub_buffer_is_counted() {
    let out = SharedBuffer::default();
    let ring = RingConfig {
        sub_buffer_size: 128,
        sub_buffers: 2,
        ..RingConfig::default()
    };
    let (layer, guard) = Builder::new().ring(ring).build(out.clone()).unwrap();
    on_threads(layer, 1, |_| {
        tracing::info!(big = "y".repeat(500).as_str(), "too big");
        tracing::info!("small");
    });
    guard.sync();
    assert_eq!(guard.stats().dropped_too_large, 1);
    assert_eq!(guard.stats().written, 1);
    drop(guard);
    assert!(
        out.text().contains("0 ring full, 1 too large"),
        "{}",
        out.text()
    );
}

/// An output that fails: every write, or (with `writes_succeed`) only every flush, as a
/// buffered output does when what it buffered cannot be passed on.
struct FailingOutput {
    writes_succeed: bool,
}

impl io::Write for FailingOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.writes_succeed {
            Ok(buf.len())
        } else {
            Err(io::Error::other("disk full"))
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Err(io::Error::other("disk full"))
    }
}

/// Records whose bytes never reach the output count as write errors, not as written:
/// when the write fails, and when the write is accepted but the flush after it fails
/// (before the fix both counted as written: the writer counted a record once its own
/// buffer took it, and dropped the flush's error).
#[test]
fn records_that_do_not_reach_a_failing_output_count_as_write_errors() {
    for writes_succeed in [false, true] {
        let (layer, guard) = Builder::new()
            .build(FailingOutput { writes_succeed })
            .unwrap();
        on_threads(layer, 1, |_| {
            for i in 0..100u64 {
                tracing::info!(i, "event");
            }
        });
        guard.sync();
        let stats = guard.stats();
        drop(guard);
        assert_eq!(
            stats.written, 0,
            "writes succeed: {writes_succeed}, {stats:?}"
        );
        assert_eq!(
            stats.write_errors, 100,
            "writes succeed: {writes_succeed}, {stats:?}"
        );
    }
}

/// A `tracing_subscriber::fmt` writer into a `SharedBuffer`.
impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for SharedBuffer {
    type Writer = SharedBuffer;
    fn make_writer(&'a self) -> SharedBuffer {
        self.clone()
    }
}

/// The lines our layer (Full format) and `tracing_subscriber::fmt`'s layer (without
/// colours) write for the events of `emit`, recorded through both at once, each line
/// without its timestamp (checked to be RFC 3339).
fn ours_and_fmts_lines(emit: impl Fn()) -> (Vec<String>, Vec<String>) {
    let ours = SharedBuffer::default();
    let theirs = SharedBuffer::default();
    // No periodic flush: the events reach the writer in one batch (the guard's drop),
    // ordered by time. With one, a thread that migrated between two events could see
    // the second flushed first from its new CPU's ring, and written first, as the module
    // docs allow (seen in the VM lane's arm64 guest).
    let (layer, guard) = Builder::new()
        .flush_interval(Duration::from_secs(3600))
        .build(ours.clone())
        .unwrap();
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(theirs.clone())
        .with_ansi(false);
    let subscriber = tracing_subscriber::registry().with(layer).with(fmt);
    tracing::subscriber::with_default(subscriber, emit);
    drop(guard);
    let without_timestamps = |text: String| -> Vec<String> {
        text.lines()
            .map(|line| {
                let (timestamp, rest) = line.split_once(' ').unwrap();
                assert!(humantime::parse_rfc3339(timestamp).is_ok(), "{line}");
                rest.to_owned()
            })
            .collect()
    };
    (
        without_timestamps(ours.text()),
        without_timestamps(theirs.text()),
    )
}

#[test]
fn fields_format_as_the_fmt_layer_formats_them() {
    let (ours, theirs) = ours_and_fmts_lines(|| {
        let shown = vec![1, 2];
        let _outer = tracing::info_span!("outer", a = 1_u64, s = "x y", d = ?shown).entered();
        let _plain = tracing::info_span!("plain").entered();
        let inner = tracing::debug_span!("inner", b = -2_i64, later = tracing::field::Empty);
        inner.record("later", true);
        let _inner = inner.entered();
        tracing::warn!(
            target: "app::db",
            n = 3_u64,
            neg = -4_i64,
            f = 0.5,
            yes = false,
            s = "quo\"ted",
            dbg = ?shown,
            disp = %"as is",
            big = 1_u128 << 100,
            "message {}",
            7
        );
        tracing::error!("no fields");
    });
    assert_eq!(ours, theirs);
    assert_eq!(
        ours[0],
        " WARN outer{a=1 s=\"x y\" d=[1, 2]}:plain:inner{b=-2 later=true}: app::db: message 7 \
         n=3 neg=-4 f=0.5 yes=false s=\"quo\\\"ted\" dbg=[1, 2] disp=as is \
         big=1267650600228229401496703205376"
    );
}

/// An error whose text is `.0` and whose source is `.1`.
#[derive(Debug)]
struct ChainedError(&'static str, Option<Box<ChainedError>>);

impl fmt::Display for ChainedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for ChainedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.1
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// The fmt layer writes an error's source chain (`error.sources=[..]`) and escapes the
/// control characters of messages and errors that a terminal would act on; our Full
/// format writes the same bytes (before the fix it wrote the error's text alone and the
/// control characters raw).
#[test]
fn errors_and_control_characters_format_as_the_fmt_layer_formats_them() {
    let (ours, theirs) = ours_and_fmts_lines(|| {
        let inner = ChainedError("no space \x07left", None);
        let middle = ChainedError("write failed", Some(Box::new(inner)));
        let outer = ChainedError("\x1b[31msave\x1b[0m failed", Some(Box::new(middle)));
        tracing::error!(
            error = &outer as &(dyn std::error::Error + 'static),
            "with sources"
        );
        let alone = ChainedError("alone \u{9b}", None);
        tracing::warn!(
            cause = &alone as &(dyn std::error::Error + 'static),
            "without"
        );
        tracing::info!("literal \x1b[1mbold\x1b[0m \x08\x0c\x7f\u{85} tab\tend");
        tracing::info!(
            s = "\x1b[2m",
            shown = %"\x1b[3m",
            "args {} {:?}",
            "\x1b[4m",
            "\x1b"
        );
        let _span = tracing::info_span!("span", message = "in \x1b span").entered();
        tracing::info!("inside");
    });
    assert_eq!(ours, theirs);
    assert_eq!(
        ours[0],
        "ERROR cpulocal::tracing::tests: with sources error=\\x1b[31msave\\x1b[0m failed \
         error.sources=[write failed, no space \\x07left]"
    );
    assert_eq!(ours.len(), 5, "{ours:?}");
}

/// The JSON format writes an error as its text alone, as tracing-subscriber's JSON
/// format does (tracing-core's default `record_error`): no sources, no escaping but
/// JSON's own.
#[test]
fn an_error_in_json_is_its_text() {
    let out = SharedBuffer::default();
    let (layer, guard) = Builder::new()
        .format(Format::Json)
        .build(out.clone())
        .unwrap();
    let error = ChainedError("\x1b[31mouter", Some(Box::new(ChainedError("inner", None))));
    let subscriber = tracing_subscriber::registry().with(layer);
    tracing::subscriber::with_default(subscriber, || {
        tracing::error!(
            error = &error as &(dyn std::error::Error + 'static),
            "failed"
        );
    });
    drop(guard);
    let text = out.text();
    let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(line["fields"]["error"], "\x1b[31mouter", "{text}");
    assert_eq!(line["fields"]["message"], "failed", "{text}");
}

#[test]
fn sync_waits_for_what_was_recorded_before_it() {
    let out = SharedBuffer::default();
    let (layer, guard) = Builder::new()
        .flush_interval(Duration::from_secs(10))
        .build(out.clone())
        .unwrap();
    let dispatch = Dispatch::new(tracing_subscriber::registry().with(layer));
    tracing_core::dispatcher::with_default(&dispatch, || tracing::info!("one"));
    guard.sync();
    assert!(out.text().contains(" one\n"), "{}", out.text());
    assert_eq!(guard.stats().written, 1);
}

/// The CPU time the writer thread of `guard` used so far, and the times it went to
/// sleep (its voluntary context switches).
fn writer_usage(guard: &WriterGuard) -> (Duration, u64) {
    use std::os::unix::thread::JoinHandleExt;
    let thread = guard
        .thread
        .as_ref()
        .expect("a running writer")
        .as_pthread_t();
    // std's raw handle is an integer; musl's `pthread_t` is a pointer.
    #[allow(clippy::unnecessary_cast, reason = "a no-op on glibc, needed on musl")]
    let thread = thread as libc::pthread_t;
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `thread` is a live thread (the guard has not joined it); `clock` is a
    // valid place for the result.
    let found = unsafe { libc::pthread_getcpuclockid(thread, &mut clock) };
    assert_eq!(found, 0);
    // SAFETY: all-zero is a valid timespec.
    let mut ts: libc::timespec = unsafe { core::mem::zeroed() };
    // SAFETY: `clock` names the writer's CPU-time clock; `ts` is a valid place.
    let read = unsafe { libc::clock_gettime(clock, &mut ts) };
    assert_eq!(read, 0);
    let cpu = Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
    // Acquire: pairs with the writer's Release store of its id.
    let tid = guard.shared.writer_tid.load(Ordering::Acquire);
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
    let sleeps = status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .map(|n| n.trim().parse().unwrap())
        .expect("voluntary_ctxt_switches in /proc/self/task/TID/status");
    (cpu, sleeps)
}

#[test]
fn an_idle_writer_sleeps_until_its_flush_interval() {
    if crate::tests::under_valgrind() {
        return; // valgrind's scheduler makes the writer's sleeps and CPU time meaningless
    }
    let (layer, guard) = layer(SharedBuffer::default());
    let dispatch = Dispatch::new(tracing_subscriber::registry().with(layer));
    tracing_core::dispatcher::with_default(&dispatch, || tracing::info!("before"));
    guard.sync();
    // Acquire: pairs with the writer's Release store of its id (set before any sync).
    assert_ne!(guard.shared.writer_tid.load(Ordering::Acquire), 0);
    // Acquire: as above.
    let stat = format!(
        "/proc/self/task/{}/stat",
        guard.shared.writer_tid.load(Ordering::Acquire)
    );
    let (cpu_before, sleeps_before) = writer_usage(&guard);
    let started = std::time::Instant::now();
    // The writer's scheduler state, sampled every 10 ms ("S": blocked, "R": running or
    // runnable). The state is the first field after the parenthesised thread name.
    let mut seen_asleep = 0;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(10));
        let line = std::fs::read_to_string(&stat).unwrap();
        let state = line.rsplit_once(") ").map(|(_, rest)| &rest[..1]);
        seen_asleep += usize::from(state == Some("S"));
    }
    let (cpu_after, sleeps_after) = writer_usage(&guard);
    let window = started.elapsed();
    let (cpu, sleeps) = (cpu_after - cpu_before, sleeps_after - sleeps_before);
    eprintln!(
        "the idle writer over {window:?}: {sleeps} sleeps, {cpu:?} of CPU, \
         seen asleep in {seen_asleep} of 20 samples"
    );
    // With the default 100 ms flush interval the writer goes to sleep about once per
    // 100 ms of the window, and is asleep nearly all the time (it uses well under a
    // millisecond of CPU in 200 ms on this machine). A writer that polls every few ms goes
    // to sleep dozens of times; one that spins or yields is never seen asleep (and a
    // `sched_yield` is no voluntary switch). The window is measured, not assumed: under
    // the VM lane's emulation 20 sleeps of 10 ms take far longer than 200 ms, and one
    // flush of every CPU's ring costs 60-140 ms of CPU, so the CPU time is reported, not
    // asserted.
    let flushes = (window.as_millis() / 100) as u64;
    assert!(
        sleeps <= 2 * flushes + 4,
        "the idle writer went to sleep {sleeps} times in {window:?}"
    );
    assert!(
        seen_asleep >= 1,
        "the idle writer was never seen asleep in {window:?} ({cpu:?} of CPU)"
    );
    assert_eq!(guard.stats().written, 1);
}

#[test]
fn json_lines_carry_the_spans_and_their_fields() {
    let out = SharedBuffer::default();
    // One batch, ordered by time (see `fields_format_as_the_fmt_layer_formats_them`).
    let (layer, guard) = Builder::new()
        .format(Format::Json)
        .flush_interval(Duration::from_secs(3600))
        .build(out.clone())
        .unwrap();
    let subscriber = tracing_subscriber::registry().with(layer);
    tracing::subscriber::with_default(subscriber, || {
        let _outer = tracing::info_span!("outer", a = 1_u64, s = "x").entered();
        let inner = tracing::info_span!("inner", b = ?[2], late = tracing::field::Empty);
        inner.record("late", 0.5);
        let _inner = inner.entered();
        tracing::info!(n = 3_u64, "inside");
        drop(_inner);
        drop(_outer);
        tracing::info!("outside");
    });
    drop(guard);
    let text = out.text();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    let inner = serde_json::json!({ "b": "[2]", "late": 0.5, "name": "inner" });
    assert_eq!(
        lines[0]["spans"],
        serde_json::json!([{ "a": 1, "s": "x", "name": "outer" }, inner]),
        "{text}"
    );
    assert_eq!(lines[0]["span"], inner, "{text}");
    assert_eq!(lines[0]["fields"]["n"], 3, "{text}");
    assert!(
        lines[1].get("spans").is_none() && lines[1].get("span").is_none(),
        "{text}"
    );
}

/// A layer whose `register_callsite` holds the callsites of `target` until `release`
/// is set, after saying so through `entered`.
struct SlowRegistration {
    target: &'static str,
    entered: std::sync::mpsc::SyncSender<()>,
    release: Arc<std::sync::atomic::AtomicBool>,
}

impl<S: tracing_core::Subscriber> tracing_subscriber::Layer<S> for SlowRegistration {
    fn register_callsite(
        &self,
        metadata: &'static tracing_core::Metadata<'static>,
    ) -> tracing_core::subscriber::Interest {
        if metadata.target() == self.target {
            let _ = self.entered.try_send(());
            while !self.release.load(std::sync::atomic::Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        tracing_core::subscriber::Interest::always()
    }
}

/// Runs `emit("first")` on a thread that registers the callsites of `target` (and is
/// held there), then `emit("second")` on another while the registration lasts, and a
/// `sync` before the first thread is let go: the output. `warm_up` runs first, to
/// register the callsites the race is not about.
///
/// The held thread holds tracing-core's lock of the dispatcher list, so `emit` must not
/// register a callsite on the second thread: another test waiting to write that lock
/// would block it.
fn emit_while_registering(
    target: &'static str,
    warm_up: impl Fn(),
    emit: impl Fn(&str) + Sync,
) -> String {
    use std::sync::atomic::{AtomicBool, Ordering};
    let out = SharedBuffer::default();
    let (layer, guard) = Builder::new().build(out.clone()).unwrap();
    let (entered, entered_rx) = std::sync::mpsc::sync_channel(1);
    let release = Arc::new(AtomicBool::new(false));
    // The slow layer is the outer one, so the ring layer's `register_callsite` waits
    // behind it.
    let subscriber = tracing_subscriber::registry()
        .with(layer)
        .with(SlowRegistration {
            target,
            entered,
            release: Arc::clone(&release),
        });
    let dispatch = Dispatch::new(subscriber);
    tracing_core::dispatcher::with_default(&dispatch, warm_up);
    std::thread::scope(|s| {
        s.spawn(|| tracing_core::dispatcher::with_default(&dispatch, || emit("first")));
        entered_rx.recv().unwrap();
        tracing_core::dispatcher::with_default(&dispatch, || emit("second"));
        guard.sync();
        release.store(true, Ordering::Release);
    });
    drop(guard);
    out.text()
}

/// tracing-core dispatches an event whose callsite another thread is still registering
/// (it answers `Interest::sometimes()` meanwhile), so the layer sees events of callsites
/// it was not yet told of; their records must still come out whole.
#[test]
fn an_event_whose_callsite_is_still_being_registered_is_written_whole() {
    let text = emit_while_registering(
        "event_race",
        || {},
        |who| tracing::warn!(target: "event_race", who, "raced"),
    );
    for who in ["first", "second"] {
        let line = format!(" WARN event_race: raced who=\"{who}\"\n");
        assert!(text.contains(&line), "{text}");
    }
}

/// The same for a span: its name and fields come out although its callsite was still
/// being registered when the event inside it was recorded.
#[test]
fn a_span_whose_callsite_is_still_being_registered_is_written_whole() {
    let event = || tracing::warn!(target: "app", "inside");
    let text = emit_while_registering("span_race", event, |who| {
        let _span = tracing::warn_span!(target: "span_race", "request", who).entered();
        event();
    });
    for who in ["first", "second"] {
        let line = format!(" WARN request{{who=\"{who}\"}}: app: inside\n");
        assert!(text.contains(&line), "{text}");
    }
}

/// Pins the calling thread to the CPU it runs on: its reservations and events then go
/// to one ring.
fn pin_to_current_cpu() {
    let cpu = crate::current_cpu();
    // SAFETY: cpu_set_t is plain old data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { core::mem::zeroed() };
    // SAFETY: `cpu` is below the possible CPUs, far below CPU_SETSIZE (1024).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a live cpu_set_t of the size passed; 0 names the calling thread.
    let pinned = unsafe { libc::sched_setaffinity(0, core::mem::size_of_val(&set), &set) };
    assert_eq!(pinned, 0, "sched_setaffinity");
}

/// The line of the event recorded after an [`OpenReservation`].
const AFTER_THE_OPEN_ONE: &str = " INFO cpulocal::tracing::tests: after the open one\n";

/// A record reserved and not committed, as by a producer preempted (or stopped in a
/// debugger) between its reserve and its commit, on a thread pinned to one CPU, with an
/// event recorded after it into the same sub-buffer: the sub-buffer stays incomplete
/// while the reservation is open. Dropped: the thread drops the reservation uncommitted
/// (it becomes padding, which the writer skips) and is joined.
struct OpenReservation {
    release: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OpenReservation {
    /// Returns once the event after the reservation is recorded.
    fn new(shared: &Arc<Shared>, dispatch: &Dispatch) -> OpenReservation {
        let (recorded, recorded_rx) = std::sync::mpsc::channel();
        let (release, release_rx) = std::sync::mpsc::channel::<()>();
        let (shared, dispatch) = (Arc::clone(shared), dispatch.clone());
        let thread = std::thread::spawn(move || {
            pin_to_current_cpu();
            let open = shared.ring.reserve(8).expect("room in an empty ring");
            tracing_core::dispatcher::with_default(&dispatch, || {
                tracing::info!("after the open one");
            });
            recorded.send(()).unwrap();
            // Until the release is sent or dropped.
            let _ = release_rx.recv();
            drop(open);
        });
        recorded_rx.recv().unwrap();
        OpenReservation {
            release: Some(release),
            thread: Some(thread),
        }
    }

    /// Lets the producer drop its reservation after `delay`, from another thread.
    fn release_after(self, delay: Duration) {
        std::thread::spawn(move || {
            std::thread::sleep(delay);
            drop(self);
        });
    }
}

impl Drop for OpenReservation {
    fn drop(&mut self) {
        drop(self.release.take());
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

/// A layer that never flushes on its own (only `sync` and the drop do), its shared
/// state, and its subscriber.
fn unflushed_layer(out: &SharedBuffer) -> (WriterGuard, Arc<Shared>, Dispatch) {
    let (layer, guard) = Builder::new()
        .flush_interval(Duration::from_secs(3600))
        .build(out.clone())
        .unwrap();
    let shared = Arc::clone(&layer.shared);
    (
        guard,
        shared,
        Dispatch::new(tracing_subscriber::registry().with(layer)),
    )
}

/// `sync` returns only once the events recorded before it are written, also when a
/// producer is between its reserve and its commit in front of them (before the fix the
/// sync's full pass read nothing of the incomplete sub-buffer and returned without the
/// event).
#[test]
fn sync_waits_for_a_record_still_being_written_before_it() {
    let out = SharedBuffer::default();
    let (guard, shared, dispatch) = unflushed_layer(&out);
    // The producer commits while `sync` waits, well within its 1 s bound.
    OpenReservation::new(&shared, &dispatch).release_after(Duration::from_millis(50));
    guard.sync();
    let text = out.text();
    assert!(text.contains(AFTER_THE_OPEN_ONE), "{text}");
    assert_eq!(guard.stats().written, 1, "{:?}", guard.stats());
    assert_eq!(guard.stats().stalled_sub_buffers, 0);
}

/// The same for the guard's drop: it writes the event, where before the fix it stopped
/// the writer with the event unread, lost and counted nowhere.
#[test]
fn the_guards_drop_waits_for_a_record_still_being_written_before_it() {
    let out = SharedBuffer::default();
    let (guard, shared, dispatch) = unflushed_layer(&out);
    OpenReservation::new(&shared, &dispatch).release_after(Duration::from_millis(50));
    drop(guard);
    let text = out.text();
    assert!(text.contains(AFTER_THE_OPEN_ONE), "{text}");
    assert_eq!(shared.stats().written, 1, "{:?}", shared.stats());
    assert_eq!(shared.stats().stalled_sub_buffers, 0);
}

/// A producer that never commits (a thread stopped in a debugger) holds `sync` and the
/// guard's drop for their bound only: both return, and the sub-buffer they gave up on is
/// counted (once) and reported.
#[test]
fn sync_and_the_guards_drop_give_up_on_a_record_never_committed_and_count_it() {
    let out = SharedBuffer::default();
    let (guard, shared, dispatch) = unflushed_layer(&out);
    let open = OpenReservation::new(&shared, &dispatch);
    guard.sync();
    assert_eq!(guard.stats().stalled_sub_buffers, 1, "{:?}", guard.stats());
    assert_eq!(guard.stats().written, 0);
    // A generous limit: a drop that waits without a bound hangs.
    let dropped = crate::tests::within(Duration::from_secs(60), move || drop(guard));
    assert!(
        dropped.is_some(),
        "the guard's drop hung on the open reservation"
    );
    drop(open);
    assert_eq!(shared.stats().stalled_sub_buffers, 1, "counted once");
    assert_eq!(shared.stats().written, 0);
    let text = out.text();
    assert!(!text.contains(AFTER_THE_OPEN_ONE), "{text}");
    assert!(
        text.contains("WARN cpulocal::tracing: 1 sub-buffers not read: a record reserved"),
        "{text}"
    );
}

/// The bound holds while other threads keep logging: records read from other CPUs (or
/// recorded after the call) do not restart it, only progress on the records recorded
/// before the call does. (Before, any record read restarted it: with two threads
/// logging every 50 us, `sync` and the drop did not return within 10 s.)
#[test]
fn sync_and_the_guards_drop_give_up_while_others_keep_logging() {
    let out = SharedBuffer::default();
    let (guard, shared, dispatch) = unflushed_layer(&out);
    let open = OpenReservation::new(&shared, &dispatch);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loggers: Vec<_> = (0..2)
        .map(|_| {
            let (stop, dispatch) = (Arc::clone(&stop), dispatch.clone());
            std::thread::spawn(move || {
                tracing_core::dispatcher::with_default(&dispatch, || {
                    // Relaxed: a stop flag.
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        tracing::info!(pad = "a record of some size to fill sub-buffers", "busy");
                        std::thread::sleep(Duration::from_micros(50));
                    }
                });
            })
        })
        .collect();
    let guard = Arc::new(guard);
    let syncing = Arc::clone(&guard);
    let synced = crate::tests::within(Duration::from_secs(30), move || syncing.sync());
    let guard = Arc::into_inner(guard).expect("the sync's handle is gone");
    let dropped = crate::tests::within(Duration::from_secs(30), move || drop(guard));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    loggers.into_iter().for_each(|l| l.join().unwrap());
    drop(open);
    assert!(synced.is_some(), "sync hung: {:?}", shared.stats());
    assert!(dropped.is_some(), "the drop hung: {:?}", shared.stats());
    assert!(
        shared.stats().stalled_sub_buffers >= 1,
        "{:?}",
        shared.stats()
    );
}
