//! [`ObjectPool`]: a pool of boxed objects on the allocator's machinery: per-CPU slabs
//! (one restartable sequence per get or put) and batches between CPUs.

use core::fmt;
use core::marker::PhantomData;
use core::mem::ManuallyDrop;
use core::ops::{Deref, DerefMut};
use core::ptr::NonNull;

use crate::alloc::{Backend, ClassSpec, LazyRegion};

/// Objects each CPU keeps at most.
const CAP: usize = 128;
/// Objects moved between a CPU and the shared transfer cache at once.
const BATCH: usize = 32;
static SPECS: [ClassSpec; 1] = [ClassSpec {
    cap: CAP,
    batch: BATCH,
}];
/// The slab stride of [`SPECS`]'s regions, for the fast paths.
const SHIFT: u32 = crate::alloc::slab_shift(&[ClassSpec {
    cap: CAP,
    batch: BATCH,
}]);

/// A pool of reusable `Box<T>`: [`get`](ObjectPool::get) takes an object that was put
/// back earlier (still initialised: a buffer keeps its capacity), and dropping the
/// [`Pooled`] handle puts it back.
///
/// Each CPU keeps up to 128 free objects; a get or a put on them is one restartable
/// sequence, no atomic read-modify-write. When a CPU has too many, 32 move at once to a
/// shared transfer cache (up to 256 objects, behind a short try-lock), where a CPU that
/// has none takes 32 at once. So objects taken on one CPU and returned on another (an
/// I/O thread gets buffers, workers put them back) cost one lock per 32 objects, not a
/// fence per object. Objects beyond what the caches hold are dropped. Without rseq (the
/// fallback), or without membarrier's rseq fence (the locked scheme: see
/// [`remote_scheme`](crate::remote_scheme)), only the transfer cache is used.
///
/// The buffer-pool recipe:
///
/// ```
/// use cpulocal::ObjectPool;
///
/// static BUFFERS: ObjectPool<Vec<u8>> = ObjectPool::new();
///
/// let mut buf = BUFFERS.get_or_else(|| Vec::with_capacity(4096));
/// buf.clear();
/// buf.extend_from_slice(b"request");
/// assert_eq!(&buf[..], b"request");
/// drop(buf); // back to this CPU's cache
///
/// // On the same CPU, the next get usually finds it again, capacity intact.
/// let again = BUFFERS.get_or_else(Vec::new);
/// assert!(again.capacity() == 0 || again.capacity() >= 4096);
/// ```
///
/// `ObjectPool<T>` is `Send` and `Sync` when `T` is `Send`: objects move between the
/// threads that use the pool, and a pool only hands an object to one holder.
pub struct ObjectPool<T> {
    region: LazyRegion,
    _objects: PhantomData<Box<T>>,
}

// SAFETY: the pool owns boxed `T`s and hands each to one thread at a time; its state is
// atomics and per-CPU words written only by restartable sequences and lock holders.
unsafe impl<T: Send> Send for ObjectPool<T> {}
// SAFETY: as for `Send`: sharing the pool moves `T`s between threads, nothing more.
unsafe impl<T: Send> Sync for ObjectPool<T> {}

/// Drops the boxes the caches give up.
struct DropBoxes<T>(PhantomData<T>);

impl<T> Backend for DropBoxes<T> {
    fn refill(&self, _class: usize, _out: &mut [usize]) -> usize {
        0
    }

    fn release(&self, _class: usize, blocks: &[usize]) {
        for &b in blocks {
            // SAFETY: every entry of the pool is a `Box<T>` turned into a pointer by
            // `put`, owned by the pool alone.
            drop(unsafe { Box::from_raw(b as *mut T) });
        }
    }
}

impl<T> ObjectPool<T> {
    /// An empty pool. `const`: usable in a `static`.
    pub const fn new() -> Self {
        ObjectPool {
            region: LazyRegion::new(),
            _objects: PhantomData,
        }
    }

    /// An object put back earlier, if this CPU's cache (or the transfer cache) has one.
    ///
    /// ```
    /// let pool = cpulocal::ObjectPool::new();
    /// assert!(pool.get().is_none());
    /// pool.put(Box::new(7u32));
    /// // Found unless the thread moved to another CPU in between.
    /// if let Some(seven) = pool.get() {
    ///     assert_eq!(*seven, 7);
    /// };
    /// ```
    #[inline]
    pub fn get(&self) -> Option<Pooled<'_, T>> {
        let region = self.region.get()?;
        if let Some(rseq) = crate::thread::current_if_registered() {
            // SAFETY: this thread's registered area.
            if let Some(p) = unsafe { region.pop_fast::<SHIFT>(rseq, 0) } {
                return Some(self.handle(p));
            }
        }
        let p = region.pop_slow(0, &DropBoxes::<T>(PhantomData))?;
        Some(self.handle(p))
    }

    /// An object put back earlier, or a new one made by `make`.
    pub fn get_or_else(&self, make: impl FnOnce() -> T) -> Pooled<'_, T> {
        self.get()
            .unwrap_or_else(|| self.handle(Box::into_raw(Box::new(make())) as usize))
    }

    /// Gives `object` to the pool (it is dropped when the caches are full).
    ///
    /// ```
    /// let pool = cpulocal::ObjectPool::new();
    /// for i in 0..1000 {
    ///     pool.put(Box::new(i));
    /// }
    /// // At most what the caches hold stays; the rest was dropped.
    /// assert!(pool.len() <= 128 * cpulocal::possible_cpus() + 256);
    /// ```
    #[inline]
    pub fn put(&self, object: Box<T>) {
        let p = Box::into_raw(object) as usize;
        let Some(region) = self.region.get_or_create(&SPECS) else {
            DropBoxes::<T>(PhantomData).release(0, &[p]);
            return;
        };
        if let Some(rseq) = crate::thread::current_if_registered() {
            // SAFETY: this thread's registered area.
            if unsafe { region.push_fast::<SHIFT>(rseq, 0, p) } {
                return;
            }
        }
        region.push_slow(0, p, &DropBoxes::<T>(PhantomData));
    }

    /// How many objects the pool holds now (a snapshot while other threads work).
    pub fn len(&self) -> usize {
        self.region.get().map_or(0, |r| {
            let (on_cpus, transfer) = r.cached(0);
            on_cpus + transfer
        })
    }

    /// Whether the pool holds no object now (a snapshot).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn handle(&self, p: usize) -> Pooled<'_, T> {
        Pooled {
            // SAFETY: entries are non-null `Box<T>` pointers.
            object: unsafe { NonNull::new_unchecked(p as *mut T) },
            pool: self,
        }
    }
}

impl<T> Default for ObjectPool<T> {
    fn default() -> Self {
        ObjectPool::new()
    }
}

impl<T> fmt::Debug for ObjectPool<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectPool")
            .field("len", &self.len())
            .finish()
    }
}

impl<T> Drop for ObjectPool<T> {
    fn drop(&mut self) {
        if let Some(region) = self.region.get() {
            let backend = DropBoxes::<T>(PhantomData);
            for cpu in 0..region.ranges() {
                // `&mut self`: nobody else can hold a slab's lock.
                region.drain_cpu(cpu as u32, &backend);
            }
            region.drain_transfer(&backend);
        }
        if let Some(r) = self.region.take() {
            // SAFETY: nobody uses the region any more, and its objects were dropped.
            unsafe { crate::alloc::Region::destroy(r) };
        }
    }
}

/// An object taken from an [`ObjectPool`]; goes back to the pool when dropped.
pub struct Pooled<'a, T> {
    object: NonNull<T>,
    pool: &'a ObjectPool<T>,
}

// SAFETY: a `Pooled` owns its `T` like a `Box<T>` does.
unsafe impl<T: Send> Send for Pooled<'_, T> {}
// SAFETY: `&Pooled` gives `&T` only.
unsafe impl<T: Sync> Sync for Pooled<'_, T> {}

impl<T> Pooled<'_, T> {
    /// Takes the object out of the pool's reach: it will not go back.
    ///
    /// ```
    /// let pool = cpulocal::ObjectPool::new();
    /// let b: Box<String> = pool.get_or_else(|| "mine".to_string()).into_box();
    /// assert_eq!(*b, "mine");
    /// ```
    pub fn into_box(self) -> Box<T> {
        let this = ManuallyDrop::new(self);
        // SAFETY: the pointer came from `Box::into_raw`, and `this` is not dropped.
        unsafe { Box::from_raw(this.object.as_ptr()) }
    }
}

impl<T> Deref for Pooled<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: a live, exclusively owned box.
        unsafe { self.object.as_ref() }
    }
}

impl<T> DerefMut for Pooled<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: a live, exclusively owned box, borrowed mutably through `self`.
        unsafe { self.object.as_mut() }
    }
}

impl<T> Drop for Pooled<'_, T> {
    fn drop(&mut self) {
        // SAFETY: the pointer came from `Box::into_raw` and is owned by this handle.
        let object = unsafe { Box::from_raw(self.object.as_ptr()) };
        self.pool.put(object);
    }
}

impl<T: fmt::Debug> fmt::Debug for Pooled<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Pooled").field(&**self).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counted<'a>(&'a AtomicUsize);
    impl Drop for Counted<'_> {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn every_object_put_is_dropped_exactly_once_across_threads() {
        let drops = AtomicUsize::new(0);
        let made = AtomicUsize::new(0);
        {
            let pool = ObjectPool::new();
            std::thread::scope(|s| {
                for _ in 0..4 {
                    s.spawn(|| {
                        for i in 0..2000 {
                            let o = pool.get_or_else(|| {
                                made.fetch_add(1, Ordering::Relaxed);
                                Counted(&drops)
                            });
                            if i % 3 == 0 {
                                drop(o.into_box());
                            }
                        }
                    });
                }
            });
            assert!(pool.len() <= CAP * crate::possible_cpus() + BATCH * 8);
        }
        assert_eq!(drops.load(Ordering::Relaxed), made.load(Ordering::Relaxed));
    }

    /// A zero-sized `T`'s boxes are dangling pointers equal to its alignment (1, 2,
    /// ...): they are kept and given back like any other, and dropped exactly once.
    #[test]
    fn zero_sized_objects_come_back_and_are_dropped_once() {
        static DROPS: AtomicUsize = AtomicUsize::new(0);
        struct Token;
        impl Drop for Token {
            fn drop(&mut self) {
                DROPS.fetch_add(1, Ordering::Relaxed);
            }
        }
        #[repr(align(2))]
        struct Token2(Token);
        let mut got = 0;
        {
            let ones = ObjectPool::new();
            let twos = ObjectPool::new();
            for _ in 0..10 {
                // Each put is taken back at once: found unless the thread moved to
                // another CPU in between (then the object waits in the first CPU's
                // cache, and is dropped with the pool). A taken object goes back to the
                // pool when its handle drops.
                ones.put(Box::new(Token));
                got += usize::from(ones.get().is_some());
                twos.put(Box::new(Token2(Token)));
                got += usize::from(twos.get().is_some());
            }
            assert!(ones.len() + twos.len() <= 20);
        }
        assert!(got > 0, "none of 20 zero-sized objects came back");
        assert_eq!(DROPS.load(Ordering::Relaxed), 20);
    }

    #[test]
    fn objects_put_on_one_thread_are_found_by_another_in_batches() {
        let pool = ObjectPool::new();
        std::thread::scope(|s| {
            s.spawn(|| {
                for i in 0..1000u32 {
                    pool.put(Box::new(i));
                }
            });
        });
        let found = std::thread::scope(|s| {
            s.spawn(|| std::iter::from_fn(|| pool.get().map(|o| o.into_box())).count())
                .join()
                .unwrap()
        });
        // The putting thread's CPU cache, or the transfer cache, or both.
        assert!(found >= BATCH.min(1000), "found {found}");
    }

    /// The caches hold at most one CPU's 128 and the transfer cache's 256 objects for a
    /// thread that puts from one CPU (only the transfer cache's 256 without rseq or with
    /// the locked scheme); every object beyond is dropped at once, none is lost.
    #[test]
    fn objects_beyond_what_the_caches_hold_are_dropped_at_once() {
        let drops = AtomicUsize::new(0);
        std::thread::scope(|s| {
            s.spawn(|| {
                let cpu = crate::current_cpu();
                if !crate::tests::pin_to(cpu) || crate::current_cpu() != cpu {
                    println!("skipped: cannot pin the thread to CPU {cpu}");
                    return;
                }
                let pool = ObjectPool::new();
                for _ in 0..1000 {
                    pool.put(Box::new(Counted(&drops)));
                }
                let held = pool.len();
                // The documented sizes, not `CAP` and `BATCH`: the docs are under test.
                let per_cpu = if matches!(crate::mechanism(), crate::Mechanism::Rseq { .. })
                    && crate::remote_scheme() == crate::remote::Scheme::Membarrier
                {
                    128
                } else {
                    0
                };
                assert!(held <= per_cpu + 256, "{held} objects held");
                assert_eq!(drops.load(Ordering::Relaxed), 1000 - held);
                drop(pool);
                assert_eq!(drops.load(Ordering::Relaxed), 1000);
            });
        });
    }
}
