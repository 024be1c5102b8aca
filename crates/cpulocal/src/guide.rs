//! Choosing a structure, and recipes.
//!
//! # When to use what
//!
//! Figures: `cargo run --release -p cpulocal-cli -- bench --threads 1,2` on a 2-vCPU
//! x86_64 VM (AMD EPYC host, Zen 4, Linux 6.18, glibc 2.36), median ns per operation of
//! the ten runs of the build of 1691adb in the README's table, 1 thread / 2 threads. The
//! figures are this machine's; run the command on yours. With 2 threads on 2 CPUs,
//! every shared structure has its cache line bounce between them; the per-CPU ones do
//! not.
//!
//! ## [`Counter`](crate::Counter) or per-thread shards (`thread_local::ThreadLocal<Cell<u64>>`)
//!
//! | | `Counter` | `ThreadLocal<Cell<u64>>` |
//! |---|---|---|
//! | `add` | 0.66 / 0.66 ns | 1.25 / 1.33 ns (a `const thread_local!` cell: 0.56 / 0.57 ns) |
//! | memory | 16 bytes per CPU that ever adds, bounded by the CPUs | one shard per thread that ever added (reused after it exits), grows with the thread count |
//! | exact `take` (read and reset while others add) | yes: nothing lost or counted twice | no: a shard is a plain `Cell` of another thread; reading it while it adds is a race, resetting it loses adds |
//! | from a signal handler | `add` is async-signal-safe (on a thread that has used cpulocal, even as the counter's first use) | the first access allocates: not signal-safe |
//! | `sum` | one pass over the CPUs | one pass over every thread that ever added |
//!
//! A plain `thread_local!` cell is faster per `add` (no restartable sequence, nothing to
//! check) and wins when one thread owns the count or the total is read only after the
//! threads end; `ThreadLocal` shards cost more per `add` than `Counter` here. `Counter` wins when threads are many or come and go (a pool of
//! hundreds of workers on 8 CPUs keeps 8 slots, not hundreds), when the total must be
//! taken exactly while others add (rates exported per scrape), and in signal handlers.
//! Both beat one shared `AtomicU64` as soon as two threads add (11 ns with 2
//! threads here, and more with more CPUs).
//!
//! ## [`Stack`](crate::Stack) or `crossbeam::queue::ArrayQueue`
//!
//! | | `Stack::push` + `pop` | `ArrayQueue::push` + `pop` |
//! |---|---|---|
//! | same thread pushes and pops | 2.0 / 2.0 ns | 8.1 / 19 ns |
//! | a value pushed on one CPU, popped on another | only with `steal` / `pop_all_on`: a `membarrier` each, about 500 ns or more | as above: any thread pops any value |
//! | order, bound | LIFO per CPU, unbounded (intrusive nodes) | FIFO, fixed capacity |
//!
//! `Stack` is for objects that are freed and reused on the same CPU (object caches,
//! buffer pools, free lists): every push and pop stays on this CPU's list, without a
//! shared cache line. For handing values from producers to consumers on other CPUs, use
//! a queue (`ArrayQueue`, a channel): a `Stack` pop on another CPU sees an empty list,
//! and stealing costs a system call.
//!
//! ## [`PerCpu`](crate::PerCpu) or one `Mutex` (`parking_lot::Mutex`, `std::sync::Mutex`)
//!
//! | | `PerCpu::with_cpu` | `parking_lot::Mutex` | `std::sync::Mutex` |
//! |---|---|---|---|
//! | lock, `+= 1`, unlock | 1.7 / 1.7 ns | 5.2 / 19 ns | 4.4 / 35 ns |
//! | one CPU's slot from another thread (`on_cpu`) | 440 ns or more (a `membarrier`) | | |
//!
//! `PerCpu` is for state that splits per CPU and is combined rarely: histograms,
//! per-CPU caches, statistics. Each thread touches only its CPU's slot, so threads never
//! contend unless the scheduler preempts one inside its critical section. State that must
//! be consistent as a whole (a map every thread looks things up in) needs one lock (or a
//! concurrent map): reading all CPUs' slots costs one remote acquisition per CPU. With
//! one thread alone an uncontended mutex costs more than twice what `with_cpu` does
//! here, and once threads update at the same time, over 10 times.
//!
//! `with_cpu`'s lock is one restartable compare-and-store on the slot's lock word, its
//! release one store and a look for sleepers. Its re-entry check (see
//! [`with_cpu`](crate::PerCpu::with_cpu)) adds two thread-local stores: measurable only
//! in a loop that does nothing but call `with_cpu` inlined (1.16x there, nothing where
//! the call is not inlined or the closure does other work: `cpulocal bench --group lock
//! --layout` shows each caller shape against the same sequence without the check).
//!
//! # Recipes
//!
//! ## A static metric
//!
//! [`Counter::new`](crate::Counter::new) is a `const fn`: a counter can be a `static`,
//! with no lazy initialisation; its per-CPU memory is taken on first use.
//!
//! ```
//! use cpulocal::Counter;
//!
//! static REQUESTS: Counter = Counter::new();
//!
//! fn handle_request() {
//!     REQUESTS.add(1); // one restartable add on this CPU's slot
//! }
//!
//! std::thread::scope(|s| {
//!     for _ in 0..4 {
//!         s.spawn(|| (0..1000).for_each(|_| handle_request()));
//!     }
//! });
//! // An exporter takes the count since its last scrape: exact, even while
//! // requests are being counted.
//! assert_eq!(REQUESTS.take(), 4000);
//! assert_eq!(REQUESTS.take(), 0);
//! ```
//!
//! ## A histogram, snapshot and reset
//!
//! One array of buckets per CPU; recording locks only this CPU's array. The snapshot
//! takes each CPU's buckets under that CPU's lock and zeroes them, so every sample lands
//! in exactly one snapshot (the snapshot is not one instant across CPUs: each CPU's part
//! is exact at the moment it is taken).
//!
//! ```
//! use cpulocal::PerCpu;
//!
//! const BUCKETS: usize = 16;
//! static LATENCY_US: PerCpu<[u64; BUCKETS]> = PerCpu::new_lazy(|| [0; BUCKETS]);
//!
//! fn record(us: u64) {
//!     let bucket = (u64::BITS - us.leading_zeros()) as usize; // log2 buckets
//!     LATENCY_US.with_cpu(|h| h[bucket.min(BUCKETS - 1)] += 1);
//! }
//!
//! fn snapshot_and_reset() -> [u64; BUCKETS] {
//!     let mut total = [0; BUCKETS];
//!     LATENCY_US.for_each(|_cpu, h| {
//!         for (t, b) in total.iter_mut().zip(h.iter_mut()) {
//!             *t += std::mem::take(b);
//!         }
//!     });
//!     total
//! }
//!
//! let mut seen = 0;
//! std::thread::scope(|s| {
//!     for t in 0..4 {
//!         s.spawn(move || (0..1000).for_each(|i| record(i * t)));
//!     }
//!     for _ in 0..10 {
//!         seen += snapshot_and_reset().iter().sum::<u64>(); // while they record
//!     }
//! });
//! seen += snapshot_and_reset().iter().sum::<u64>();
//! assert_eq!(seen, 4000); // none lost, none twice
//! ```
//!
//! ## A buffer pool with the steal fallback
//!
//! Buffers are returned to the CPU that frees them and taken from the CPU that needs
//! one: the common case is a push and a pop on one CPU's list. When this CPU's list is
//! empty, take one from another CPU's list (a `membarrier` system call each, so only as
//! the fallback) before allocating.
//!
//! ```
//! use cpulocal::{Node, Stack};
//!
//! struct BufferPool {
//!     free: Stack<Vec<u8>>,
//! }
//!
//! impl BufferPool {
//!     fn get(&self) -> Box<Node<Vec<u8>>> {
//!         // This CPU's list first (no shared cache line); when it is empty, the other
//!         // CPUs' lists in turn; allocate only when all were empty.
//!         self.free
//!             .pop_or_steal()
//!             .unwrap_or_else(|| Node::new(Vec::with_capacity(4096)))
//!     }
//!
//!     fn put(&self, mut buf: Box<Node<Vec<u8>>>) {
//!         buf.clear();
//!         self.free.push(buf);
//!     }
//! }
//!
//! let pool = BufferPool { free: Stack::new() };
//! let mut buf = pool.get();
//! buf.extend_from_slice(b"response");
//! pool.put(buf);
//! // Freed on one thread, reused on another, wherever it runs.
//! std::thread::scope(|s| {
//!     s.spawn(|| {
//!         let buf = pool.get();
//!         assert!(buf.is_empty() && buf.capacity() >= 4096);
//!         pool.put(buf);
//!     });
//! });
//! ```
//!
//! ## A ring consumer loop: wait, flush policy, shutdown, merge by timestamp
//!
//! Producers write records into their CPU's ring; one consumer thread sleeps in
//! [`RingBuffer::wait`](crate::ring::RingBuffer::wait) until a sub-buffer is full or its
//! latency bound passes, then flushes (only when woken by the timeout, so busy rings
//! hand over full sub-buffers), consumes every CPU's ring and merges the records by
//! timestamp. Shutdown: producers stop, then a flag and
//! [`notify`](crate::ring::RingBuffer::notify) make the consumer do a last flush and
//! pass.
//!
//! Each CPU's records come out in order; records of different CPUs are merged per
//! batch. A record can reach the consumer in a later batch than a newer record of
//! another CPU (its sub-buffer was handed over later): a consumer that needs one global
//! order holds records back for one latency bound before writing them out.
//!
//! ```
//! use cpulocal::ring::{RingBuffer, RingConfig};
//! use std::sync::atomic::{AtomicBool, Ordering};
//! use std::time::Duration;
//!
//! const LATENCY: Duration = Duration::from_millis(20); // the flush policy
//!
//! let ring = RingBuffer::new(RingConfig::default()).unwrap(); // timestamps on
//! let stopping = AtomicBool::new(false);
//! let mut batches: Vec<Vec<(u64, usize, Vec<u8>)>> = Vec::new();
//! std::thread::scope(|s| {
//!     let consumer = s.spawn(|| {
//!         let mut batches = Vec::new();
//!         loop {
//!             let full = ring.wait(LATENCY);
//!             // Acquire: pairs with the Release below; the producers are done.
//!             let last = stopping.load(Ordering::Acquire);
//!             if !full || last {
//!                 ring.flush_all(); // hand over partly filled sub-buffers
//!             }
//!             let mut batch = Vec::new();
//!             ring.consume_all(|rec| {
//!                 batch.push((rec.timestamp.unwrap(), rec.cpu, rec.data.to_vec()))
//!             });
//!             batch.sort_by_key(|&(timestamp, _, _)| timestamp); // merge the CPUs
//!             batches.push(batch);
//!             if last {
//!                 return batches;
//!             }
//!         }
//!     });
//!     let producers: Vec<_> = (0..4)
//!         .map(|p| {
//!             let ring = &ring;
//!             s.spawn(move || {
//!                 for i in 0..500 {
//!                     ring.write(format!("producer {p} event {i}").as_bytes()).unwrap();
//!                 }
//!             })
//!         })
//!         .collect();
//!     producers.into_iter().for_each(|p| p.join().unwrap());
//!     stopping.store(true, Ordering::Release);
//!     ring.notify(); // wake the consumer now rather than after LATENCY
//!     batches = consumer.join().unwrap();
//! });
//! let records: Vec<_> = batches.iter().flatten().collect();
//! assert_eq!(records.len(), 2000);
//! assert!(batches.iter().all(|b| b.windows(2).all(|w| w[0].0 <= w[1].0)));
//! ```
//!
//! # Platforms
//!
//! cpulocal is Linux-only (x86_64 and aarch64, 64-bit): restartable sequences are a
//! Linux system call, and `membarrier` a Linux one. On other targets the crate does not
//! compile (a `compile_error!` says why). Where rseq is missing on Linux (old kernels,
//! valgrind, gVisor, seccomp), it still works, through its fallback.
//!
//! A crate that also builds elsewhere depends on cpulocal for Linux only and keeps a
//! portable path for the rest:
//!
//! ```toml
//! [target.'cfg(target_os = "linux")'.dependencies]
//! cpulocal = "0.1"
//! ```
//!
//! ```
//! #[cfg(target_os = "linux")]
//! use cpulocal::Counter as Hits;
//!
//! // Elsewhere: one shared atomic (or per-thread shards) behind the same methods.
//! #[cfg(not(target_os = "linux"))]
//! struct Hits(std::sync::atomic::AtomicU64);
//! #[cfg(not(target_os = "linux"))]
//! impl Hits {
//!     const fn new() -> Self {
//!         Hits(std::sync::atomic::AtomicU64::new(0))
//!     }
//!     fn add(&self, n: u64) {
//!         self.0.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
//!     }
//!     fn sum(&self) -> u64 {
//!         self.0.load(std::sync::atomic::Ordering::Relaxed)
//!     }
//! }
//!
//! static HITS: Hits = Hits::new();
//! HITS.add(2);
//! assert_eq!(HITS.sum(), 2);
//! ```
#![deny(unsafe_code)]
