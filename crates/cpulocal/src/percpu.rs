//! `PerCpu<T>`: one slot of any `T` per CPU (or per mm_cid), each behind a per-CPU lock
//! that the owning CPU takes with a restartable sequence and any other CPU can take
//! remotely.

use core::cell::UnsafeCell;
use core::fmt;
use core::marker::PhantomData;
use core::ops::{Deref, DerefMut};

use crate::cache_padded::CachePadded;
use crate::remote::{CpuLock, InvalidCpu};
use crate::{cpu, sys};

/// How a [`PerCpu`] picks the calling thread's slot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Index {
    /// By CPU number. The owning CPU takes the slot's lock with a restartable
    /// compare-and-store (no `lock` prefix); [`PerCpu::on_cpu`] reaches any slot.
    #[default]
    Cpu,
    /// By memory-map concurrency id ([`current_mm_cid`](crate::current_mm_cid)): the
    /// threads running at one time use the lowest slots, so the slots touched (and
    /// whatever `T` allocates on first use) stay proportional to the process's
    /// concurrency, not to the machine. An mm_cid is not a CPU, so no fence can target
    /// it: every acquisition is an atomic compare-exchange.
    MmCid,
}

/// A bare per-CPU lock: a [`PerCpu`] with nothing in its slots. Guard your own per-CPU
/// data with it when it cannot live inside a `PerCpu` (seed 004: "if you can construct a
/// per-cpu lock, that can be used to construct arbitrary logic").
///
/// ```
/// let lock = cpulocal::Lock::new(|_| ());
/// let held = lock.lock();          // this CPU's lock: one restartable compare-and-store
/// let cpu = held.cpu();
/// drop(held);                      // released with a store
/// drop(lock.lock_cpu(cpu).unwrap()); // any CPU's lock, from any thread
/// ```
pub type Lock = PerCpu<()>;

struct Slot<T> {
    lock: CpuLock,
    value: UnsafeCell<T>,
}

/// One `T` per possible CPU (or mm_cid), each cache-padded and behind its own lock.
///
/// [`with_cpu`](PerCpu::with_cpu) runs a closure on the calling thread's slot under
/// that slot's lock; [`on_cpu`](PerCpu::on_cpu) on any chosen slot, from any thread,
/// without touching the caller's affinity (the job `cpu_opv` was proposed for). The lock
/// is taken with one restartable sequence when the thread is on the slot's CPU; see
/// [`crate::remote`] for how a remote owner excludes those sequences.
///
/// `PerCpu<T>` is `Send` and `Sync` when `T: Send`, like a `Mutex<T>`: a slot's `T` is
/// only reached through its lock, from one thread at a time.
///
/// ```
/// use std::sync::Arc;
/// // Per-CPU histograms: each thread records into its CPU's slot.
/// let hist = Arc::new(cpulocal::PerCpu::new(|_cpu| [0u64; 4]));
/// let threads: Vec<_> = (0..4)
///     .map(|t| {
///         let hist = Arc::clone(&hist);
///         std::thread::spawn(move || {
///             for i in 0..100 {
///                 hist.with_cpu(|h| h[(t + i) % 4] += 1);
///             }
///         })
///     })
///     .collect();
/// threads.into_iter().for_each(|t| t.join().unwrap());
/// let mut total = 0;
/// hist.for_each(|_cpu, h| total += h.iter().sum::<u64>());
/// assert_eq!(total, 400);
/// // A chosen CPU's slot, from here:
/// hist.on_cpu(0, |h| *h = [0; 4]).unwrap();
/// assert!(hist.on_cpu(usize::MAX, |_| ()).is_err());
/// ```
pub struct PerCpu<T> {
    slots: Box<[CachePadded<Slot<T>>]>,
    index: Index,
}

// SAFETY: a slot's `T` is only reached by the holder of its lock, one thread at a time,
// so sending or sharing the PerCpu moves `T`s between threads but never shares them:
// `T: Send` is enough, as for `Mutex<T>`.
unsafe impl<T: Send> Sync for PerCpu<T> {}
// SAFETY: as above; the struct owns its `T`s.
unsafe impl<T: Send> Send for PerCpu<T> {}

impl<T> PerCpu<T> {
    /// One slot per possible CPU, slot `i` initialised with `init(i)`.
    pub fn new(init: impl FnMut(usize) -> T) -> Self {
        Self::with_index(Index::Cpu, init)
    }

    /// One slot per possible CPU, picked by `index`, slot `i` initialised with `init(i)`.
    ///
    /// ```
    /// use cpulocal::{Index, PerCpu};
    /// let caches = PerCpu::with_index(Index::MmCid, |_| Vec::<u32>::new());
    /// caches.with_cpu(|c| c.push(7));
    /// let mut n = 0;
    /// caches.for_each(|_, c| n += c.len());
    /// assert_eq!(n, 1);
    /// ```
    pub fn with_index(index: Index, mut init: impl FnMut(usize) -> T) -> Self {
        PerCpu {
            slots: (0..sys::possible_cpus())
                .map(|i| {
                    CachePadded::new(Slot {
                        lock: CpuLock::new(),
                        value: UnsafeCell::new(init(i)),
                    })
                })
                .collect(),
            index,
        }
    }

    /// The number of slots (the possible CPUs).
    #[inline]
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Always false: there is at least one CPU.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// How the calling thread's slot is picked.
    pub fn index(&self) -> Index {
        self.index
    }

    /// Locks the calling thread's slot and returns a guard that derefs to its `T`.
    ///
    /// The thread may migrate while it holds the guard: the slot stays locked, so
    /// nothing is lost, and the next thread on that CPU waits (spinning, then yielding)
    /// until the guard drops. Keep critical sections short. The guard is not `Send`.
    ///
    /// ```
    /// let counts = cpulocal::PerCpu::new(|_| 0u64);
    /// let mut slot = counts.lock();
    /// *slot += 1;
    /// assert!(slot.cpu() < counts.len());
    /// ```
    #[inline]
    pub fn lock(&self) -> PerCpuGuard<'_, T> {
        let index = match self.index {
            Index::Cpu => CpuLock::lock_current(self.slots.len(), |i| &self.slots[i].lock),
            Index::MmCid => {
                let i = cpu::current_mm_cid() as usize % self.slots.len();
                self.slots[i].lock.lock_atomic();
                i
            }
        };
        PerCpuGuard {
            slot: &self.slots[index],
            index,
            _not_send: PhantomData,
        }
    }

    /// Runs `f` on the calling thread's slot, under its lock.
    ///
    /// ```
    /// let sums = cpulocal::PerCpu::new(|_| 0u64);
    /// sums.with_cpu(|s| *s += 5);
    /// let mut total = 0;
    /// sums.for_each(|_, s| total += *s);
    /// assert_eq!(total, 5);
    /// ```
    #[inline]
    pub fn with_cpu<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        let mut guard = self.lock();
        f(&mut guard)
    }

    /// Locks slot `cpu` from any thread, without changing the caller's affinity, and
    /// returns a guard. Every fast path on that CPU waits (or restarts) until it drops.
    ///
    /// # Errors
    ///
    /// [`InvalidCpu`] when `cpu` is not below [`len`](PerCpu::len).
    pub fn lock_cpu(&self, cpu: usize) -> Result<PerCpuGuard<'_, T>, InvalidCpu> {
        let slot = self.slots.get(cpu).ok_or(InvalidCpu {
            cpu,
            slots: self.slots.len(),
        })?;
        match self.index {
            Index::Cpu => slot.lock.lock_remote(cpu as u32),
            Index::MmCid => slot.lock.lock_atomic(),
        }
        Ok(PerCpuGuard {
            slot,
            index: cpu,
            _not_send: PhantomData,
        })
    }

    /// Runs `f` on slot `cpu`, from any thread, atomically with respect to every other
    /// access to that slot, without changing the caller's affinity.
    ///
    /// # Errors
    ///
    /// [`InvalidCpu`] when `cpu` is not below [`len`](PerCpu::len); `f` is not run.
    ///
    /// ```
    /// let q = cpulocal::PerCpu::new(|_| Vec::<u32>::new());
    /// q.with_cpu(|v| v.push(1));
    /// // Drain every CPU's slot from this thread (e.g. after a cpuset shrink):
    /// let mut drained = Vec::new();
    /// for cpu in 0..q.len() {
    ///     q.on_cpu(cpu, |v| drained.append(v)).unwrap();
    /// }
    /// assert_eq!(drained, [1]);
    /// let err = q.on_cpu(q.len(), |_| ()).unwrap_err();
    /// assert_eq!(err.cpu, q.len());
    /// ```
    pub fn on_cpu<R>(&self, cpu: usize, f: impl FnOnce(&mut T) -> R) -> Result<R, InvalidCpu> {
        let mut guard = self.lock_cpu(cpu)?;
        Ok(f(&mut guard))
    }

    /// Runs `f` on every slot in turn, each under its lock: an aggregate read (or
    /// update) that is exact per slot while other threads keep working.
    pub fn for_each(&self, mut f: impl FnMut(usize, &mut T)) {
        for cpu in 0..self.slots.len() {
            let mut guard = self.lock_cpu(cpu).expect("cpu < len");
            f(cpu, &mut guard);
        }
    }

    /// Every slot's `T`, without locking: `&mut self` proves nobody else holds one.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> + '_ {
        self.slots.iter_mut().map(|s| s.value.get_mut())
    }

    /// The slots' values, in CPU order.
    pub fn into_vec(self) -> Vec<T> {
        self.slots
            .into_vec()
            .into_iter()
            .map(|s| s.into_inner().value.into_inner())
            .collect()
    }
}

impl<T: fmt::Debug> fmt::Debug for PerCpu<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PerCpu")
            .field("slots", &self.slots.len())
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

/// The lock of one [`PerCpu`] slot, held; derefs to the slot's `T`. Unlocks on drop.
/// Not `Send`: the lock token is the owning thread's.
pub struct PerCpuGuard<'a, T> {
    slot: &'a Slot<T>,
    index: usize,
    _not_send: PhantomData<*const ()>,
}

// SAFETY: sharing the guard shares `&T` only (through Deref), which needs `T: Sync`.
unsafe impl<T: Sync> Sync for PerCpuGuard<'_, T> {}

impl<T> PerCpuGuard<'_, T> {
    /// The slot's index: the CPU (or mm_cid) it belongs to.
    pub fn cpu(&self) -> usize {
        self.index
    }
}

impl<T> Deref for PerCpuGuard<'_, T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        // SAFETY: we hold the slot's lock, so no other reference to its `T` exists.
        unsafe { &*self.slot.value.get() }
    }
}

impl<T> DerefMut for PerCpuGuard<'_, T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: we hold the slot's lock, and `&mut self` makes this the only
        // reference through the guard.
        unsafe { &mut *self.slot.value.get() }
    }
}

impl<T> Drop for PerCpuGuard<'_, T> {
    #[inline]
    fn drop(&mut self) {
        self.slot.lock.unlock();
    }
}

impl<T: fmt::Debug> fmt::Debug for PerCpuGuard<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PerCpuGuard")
            .field("cpu", &self.index)
            .field("value", &**self)
            .finish()
    }
}
