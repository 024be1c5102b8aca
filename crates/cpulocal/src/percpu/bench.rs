//! Bench-only variants of [`PerCpu::with_cpu`] (feature `__bench`, enabled by
//! `cpulocal-cli`): the same lock sequence without the parts issue 8 added, so that one
//! `cpulocal bench` run shows what each costs. Hidden from the docs; not for use.

use super::{PerCpu, Slot};
use crate::arch::Outcome;
use crate::remote::{self, CpuLock};

impl<T> PerCpu<T> {
    /// The lock sequence of [`with_cpu`](PerCpu::with_cpu) *without* the re-entry check
    /// and *without* the parking bookkeeping: nothing is counted or checked per thread,
    /// the release is a bare store that never looks for sleepers, and a waiter yields
    /// instead of sleeping. Not for use: nesting is not detected, and a thread asleep in
    /// another method on the same `PerCpu` would never be woken by its release. Under
    /// [`Scheme::Locked`] (no fast path) it is `with_cpu`.
    ///
    /// [`Scheme::Locked`]: crate::remote::Scheme::Locked
    #[doc(hidden)]
    #[inline(always)]
    pub fn with_cpu_bench_baseline<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        self.with_cpu_bench::<false, R>(f)
    }

    /// The lock sequence of [`with_cpu`](PerCpu::with_cpu) and its release with the look
    /// for sleepers, *without* the re-entry bookkeeping (the thread's held-slot word is
    /// read for the area, never written). Between
    /// [`with_cpu_bench_baseline`](PerCpu::with_cpu_bench_baseline) and `with_cpu`, it
    /// splits what parking and the re-entry check each cost. A held slot goes to
    /// `with_cpu`. Not for use: nesting is not detected.
    #[doc(hidden)]
    #[inline(always)]
    pub fn with_cpu_bench_park_only<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        self.with_cpu_bench::<true, R>(f)
    }

    /// [`with_cpu`](PerCpu::with_cpu), out of line: the variants' fallbacks, so that they
    /// stay as small as the `with_cpu` they are compared with, rather than inline a whole
    /// `with_cpu` at each of them.
    #[cold]
    #[inline(never)]
    fn with_cpu_out_of_line<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        self.with_cpu(f)
    }

    /// Both variants: `PARK` releases as `with_cpu`'s fast path does (waking sleepers)
    /// and sends a held slot to `with_cpu`; without it the release is a bare store and a
    /// held slot is waited for by yielding. Repeated aborts, and no fast path at all, go
    /// to `with_cpu`.
    #[inline(always)]
    fn with_cpu_bench<const PARK: bool, R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        /// Releases the slot, also when `f` panics.
        struct Release<'a, const PARK: bool>(&'a CpuLock);
        impl<const PARK: bool> Drop for Release<'_, PARK> {
            #[inline(always)]
            fn drop(&mut self) {
                if PARK {
                    self.0.unlock_ready_asymmetric();
                } else {
                    self.0.unlock_without_parking();
                }
            }
        }
        let mut aborts = 0;
        let (slot, _): (&Slot<T>, usize) = loop {
            // The area as `with_cpu` gets it (one thread-local load), but nothing stored.
            let Some(area) = remote::percpu_fast_area() else {
                if remote::prepare_percpu_fast_path() {
                    continue;
                }
                return self.with_cpu_out_of_line(f);
            };
            match self.lock_local(area) {
                Outcome::Committed(taken) => break taken,
                Outcome::CompareFailed if PARK => return self.with_cpu_out_of_line(f),
                // A lazy `PerCpu`'s slot may have no value yet: `with_cpu` makes it.
                Outcome::CompareFailed if self.init.is_some() => {
                    return self.with_cpu_out_of_line(f)
                }
                // Held: yield (never sleep: this variant's releases wake nobody) and retry.
                Outcome::CompareFailed => std::thread::yield_now(),
                Outcome::Aborted => {
                    aborts += 1;
                    if aborts == remote::MAX_ABORTS {
                        return self.with_cpu_out_of_line(f);
                    }
                }
            }
        };
        let _release = Release::<PARK>(&slot.lock);
        // SAFETY: we hold the slot's lock, and it is ready: the sequence took a `READY`
        // word.
        f(unsafe { (*slot.value.get()).assume_init_mut() })
    }
}
