//! `Stack<T>`: per-CPU intrusive LIFO lists, for object caches and freelists.

use core::fmt;
use core::marker::PhantomData;
use core::mem::offset_of;
use core::ops::{Deref, DerefMut};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering};

use core::alloc::Layout;

use crate::abi::Rseq;
use crate::arch::{self, Outcome};
use crate::pool::{self, Item, Pool, SlotTable};
use crate::remote::{self, Attempt, CpuLock, InvalidCpu};
use crate::{sys, Index};

/// An element of a [`Stack`]: a `T` with the link the stack threads through it.
///
/// Nodes are boxed once and then move between the caller and the stacks without
/// allocating: an object cache keeps its objects in nodes.
///
/// ```
/// let mut node = cpulocal::Node::new(String::from("buf"));
/// node.push_str("fer");
/// assert_eq!(node.as_str(), "buffer");
/// assert_eq!(node.into_inner(), "buffer");
/// ```
#[repr(C)]
pub struct Node<T> {
    /// The next node's address while on a list (0: the end). Read by the pop sequence
    /// at a fixed offset, so it stays first.
    next: AtomicUsize,
    value: T,
}

impl<T> Node<T> {
    /// A boxed node holding `value`.
    pub fn new(value: T) -> Box<Self> {
        Box::new(Node {
            next: AtomicUsize::new(0),
            value,
        })
    }

    /// The value, freeing the node.
    #[allow(
        clippy::boxed_local,
        reason = "nodes live in boxes; this frees the box"
    )]
    pub fn into_inner(self: Box<Self>) -> T {
        self.value
    }
}

impl<T> Deref for Node<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T> DerefMut for Node<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.value
    }
}

impl<T: fmt::Debug> fmt::Debug for Node<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Node").field(&self.value).finish()
    }
}

const NEXT_OFFSET: isize = offset_of!(Node<()>, next) as isize;
const _: () = assert!(NEXT_OFFSET == 0);

/// One CPU's list: its lock, whose word is the list head while the lock is free (the
/// first node's address, 0 when empty; nodes are 8-byte aligned, so a head is even) and
/// the holder's token (odd) while it is held. The push and pop sequences load that one
/// word, guard and head at once. One [`Item`] of the per-CPU pool: 16 bytes per CPU,
/// packed with other items of that CPU, never sharing a line with another CPU's (a
/// padded slot took 128).
#[repr(C)]
struct Slot {
    lock: CpuLock,
}

const SLOT: Layout = Layout::new::<Slot>();
/// CPU `c`'s slot is `c << SLOT_SHIFT` bytes past CPU 0's (the pool's stride); the
/// sequences compute it from the CPU number they read.
const SLOT_SHIFT: u32 = pool::shift_for(SLOT);
/// The lock word, which holds the head, from the slot's start.
const HEAD_OFFSET: i32 = (offset_of!(Slot, lock) + CpuLock::WORD_OFFSET) as i32;
// A head is a node's address, which must be even to be told from a token.
const _: () = assert!(core::mem::align_of::<Node<()>>() >= 2);

/// Per-CPU LIFO lists, of values or of boxed [`Node`]s.
///
/// Two ways in and out: the nodes themselves ([`push`](Stack::push),
/// [`pop`](Stack::pop), [`steal`](Stack::steal), [`pop_or_steal`](Stack::pop_or_steal)),
/// for object caches that keep their objects in nodes and never allocate; and values
/// ([`push_value`](Stack::push_value), [`pop_value`](Stack::pop_value),
/// [`pop_or_steal_value`](Stack::pop_or_steal_value)), which box each value in a node
/// on the way in and free the node on the way out. The short names go to the nodes
/// because they are what a per-CPU cache is for: a value round trip allocates.
///
/// [`push`](Stack::push) and [`pop`](Stack::pop) work on the calling thread's CPU's list
/// with one restartable sequence each: a load-store for push, and a load-load-store for
/// pop, which is free of ABA on its CPU because anything else that runs on that CPU
/// restarts it. [`steal`](Stack::steal) and [`pop_all_on`](Stack::pop_all_on) reach
/// another CPU's list by taking that CPU's lock as a remote owner (see
/// [`crate::remote`]). The lock's word is the list head itself while the lock is free,
/// so the sequences' one load of the head is also their check of the lock: they restart
/// while it is held.
///
/// A thread whose sequences keep aborting (a debugger single-stepping) completes its
/// operation through the same remote acquisition of its own CPU's lock.
///
/// `Stack<T>` is `Send` and `Sync` when `T: Send`: a node belongs to one list or one
/// owner at a time.
///
/// ```
/// use cpulocal::{Node, Stack};
/// let cache = Stack::new();
/// cache.push(Node::new(1u32));
/// cache.push_value(2u32);
/// // This CPU's list first, then the others' (the thread may have migrated in between).
/// let mut got: Vec<u32> = Vec::new();
/// while let Some(v) = cache.pop_or_steal_value() {
///     got.push(v);
/// }
/// got.sort();
/// assert_eq!(got, [1, 2]);
/// ```
pub struct Stack<T> {
    /// The lists: a [`Slot`] per possible CPU, zeroed (empty and unlocked) by the pool.
    slots: Item,
    /// The possible CPUs: the slots.
    len: usize,
    /// What the fast paths read, in place: the first slot and the slot count.
    table: SlotTable,
    _owns: PhantomData<Box<Node<T>>>,
}

// SAFETY: a node is reachable from one list at a time and is handed out by value
// (`Box`), so sharing the stack only moves `T`s between threads: `T: Send` suffices.
unsafe impl<T: Send> Sync for Stack<T> {}
// SAFETY: as above; the stack owns the nodes on its lists.
unsafe impl<T: Send> Send for Stack<T> {}

impl<T> Stack<T> {
    /// Empty lists, one per possible CPU.
    pub fn new() -> Self {
        // A zeroed slot is an empty list with its lock free (its word 0).
        let slots = Pool::for_index(Index::Cpu).alloc(SLOT);
        let len = sys::possible_cpus();
        Stack {
            table: SlotTable {
                base: slots.base().as_ptr(),
                len,
            },
            slots,
            len,
            _owns: PhantomData,
        }
    }

    /// The number of lists (the possible CPUs): every CPU number below it is valid.
    pub fn slots(&self) -> usize {
        self.len
    }

    /// CPU `cpu`'s list.
    #[inline(always)]
    fn slot_at(&self, cpu: usize) -> Option<&Slot> {
        // SAFETY: the pool item holds a `Slot` for each of the `len` CPUs, zeroed (a
        // valid `Slot`: atomics) and alive as long as `self`.
        (cpu < self.len).then(|| unsafe { &*self.slots.at(cpu).cast::<Slot>() })
    }

    /// Pushes `value` onto the calling thread's CPU's list, in a node allocated for it.
    ///
    /// ```
    /// let stack = cpulocal::Stack::new();
    /// stack.push_value("a");
    /// assert_eq!(stack.pop_or_steal_value(), Some("a"));
    /// ```
    #[inline]
    pub fn push_value(&self, value: T) {
        self.push(Node::new(value));
    }

    /// Pops the most recently pushed value of the calling thread's CPU's list (freeing
    /// its node); `None` when that list is empty (see
    /// [`pop_or_steal_value`](Stack::pop_or_steal_value)).
    #[inline]
    pub fn pop_value(&self) -> Option<T> {
        self.pop().map(Node::into_inner)
    }

    /// [`pop_or_steal`](Stack::pop_or_steal), for values (freeing the node).
    pub fn pop_or_steal_value(&self) -> Option<T> {
        self.pop_or_steal().map(Node::into_inner)
    }

    /// Pops from the calling thread's CPU's list, or, when it is empty, steals from the
    /// other CPUs' lists in turn (the next CPU first): `None` only when every list was
    /// empty as it was visited. The fallback a buffer pool wants: use the local cache,
    /// and take from another CPU's before allocating. No CPU number, so no error.
    ///
    /// ```
    /// use cpulocal::{Node, Stack};
    /// let pool = Stack::new();
    /// pool.push(Node::new(vec![0u8; 64]));
    /// let buf = pool.pop_or_steal().unwrap_or_else(|| Node::new(vec![0u8; 64]));
    /// assert_eq!(buf.len(), 64);
    /// assert!(pool.pop_or_steal().is_none());
    /// ```
    pub fn pop_or_steal(&self) -> Option<Box<Node<T>>> {
        if let Some(node) = self.pop() {
            return Some(node);
        }
        let slots = self.slots();
        let here = crate::cpu::current_cpu();
        (1..=slots).find_map(|i| {
            let cpu = (here + i) % slots;
            self.steal(cpu).expect("cpu < slots")
        })
    }

    /// Pushes `node` onto the calling thread's CPU's list.
    #[inline]
    pub fn push(&self, node: Box<Node<T>>) {
        let node = Box::into_raw(node);
        // One attempt inline; the first use, retries and the locked path stay out of
        // line, so a call site carries only the sequence itself.
        if let Some(rseq) = remote::fast_path_area() {
            if self.try_push(rseq.as_ptr(), node) == Outcome::Committed(()) {
                return;
            }
        }
        self.push_retry(node);
    }

    /// One restartable push onto the current CPU's list.
    #[inline(always)]
    fn try_push(&self, rseq: *mut Rseq, node: *mut Node<T>) -> Outcome {
        // The table (set in `new`, changed after only through `&mut self`, by the test
        // hook `clear_fast_table`) has `table.len` slots (`self.len`, or 0), laid out as the
        // constants say (the sequence refuses a CPU beyond them); each head word is
        // written only by sequences on its CPU, which refuse it while it holds a token
        // (one that read a head before a remote owner's exchange may commit over the
        // token: the owner sees that after its fence and tries again), and by that lock's
        // holders.
        // SAFETY: `rseq` is ours; table and heads as above; `node` is ours until the
        // commit, its link at NEXT_OFFSET (0).
        unsafe {
            arch::push_guarded_on_current_cpu::<SLOT_SHIFT, HEAD_OFFSET>(
                rseq,
                &self.table,
                node.cast(),
            )
        }
    }

    #[cold]
    #[inline(never)]
    fn push_retry(&self, node: *mut Node<T>) {
        let pushed = remote::on_current_cpu(self.len, |rseq, cpu| {
            match self.try_push(rseq, node) {
                Outcome::Committed(()) => Attempt::Done(()),
                Outcome::CompareFailed => Attempt::Retry, // the head moved under us
                Outcome::Aborted => self.own_slot(cpu as usize).lock.aborted(),
            }
        });
        if pushed.is_none() {
            // SAFETY: no sequence committed (the inline attempt did not, and the loop
            // returns `None` only when none did), so `node` is still ours, from
            // `Box::into_raw` in `push`.
            self.push_locked(unsafe { Box::from_raw(node) });
        }
    }

    /// The slow path of `push`. The node stays a `Box` until the lock is ours, so a
    /// panic in the acquisition (a refused membarrier fence) frees it instead of
    /// leaking it.
    #[cold]
    fn push_locked(&self, node: Box<Node<T>>) {
        let (index, head) = CpuLock::lock_current_taking(self.len, |i| &self.own_slot(i).lock);
        // Relaxed: the node is ours; the release below publishes the link.
        node.next.store(head, Ordering::Relaxed);
        self.own_slot(index)
            .lock
            .unlock_to(Box::into_raw(node) as usize);
    }

    /// Pops the most recently pushed node of the calling thread's CPU's list; `None`
    /// when that list is empty (other CPUs' lists may not be: see
    /// [`steal`](Stack::steal), [`pop_or_steal`](Stack::pop_or_steal)).
    #[inline]
    pub fn pop(&self) -> Option<Box<Node<T>>> {
        if let Some(rseq) = remote::fast_path_area() {
            match self.try_pop(rseq.as_ptr()) {
                // SAFETY: the node left the list in the commit: it is ours, and it came
                // from `Box::into_raw` in `push`.
                Outcome::Committed(node) => return Some(unsafe { Box::from_raw(node) }),
                Outcome::CompareFailed => return None,
                Outcome::Aborted => {}
            }
        }
        self.pop_retry()
    }

    /// One restartable pop from the current CPU's list: the node, or `CompareFailed`
    /// when the list is empty.
    #[inline(always)]
    fn try_pop(&self, rseq: *mut Rseq) -> Outcome<*mut Node<T>> {
        // SAFETY: `rseq`, table and heads as in `try_push`; a non-zero even head is a node
        // of this list, its link at NEXT_OFFSET, which nobody can free before this sequence
        // commits or restarts (an odd head is a token: the sequence refuses it).
        let outcome = unsafe {
            arch::pop_guarded_on_current_cpu::<SLOT_SHIFT, HEAD_OFFSET, { NEXT_OFFSET as i32 }>(
                rseq,
                &self.table,
            )
        };
        match outcome {
            Outcome::Committed(head) => Outcome::Committed(head as *mut Node<T>),
            Outcome::CompareFailed => Outcome::CompareFailed,
            Outcome::Aborted => Outcome::Aborted,
        }
    }

    #[cold]
    #[inline(never)]
    fn pop_retry(&self) -> Option<Box<Node<T>>> {
        let popped = remote::on_current_cpu(self.len, |rseq, cpu| match self.try_pop(rseq) {
            Outcome::Committed(node) => Attempt::Done(node),
            Outcome::CompareFailed => Attempt::Done(core::ptr::null_mut()),
            Outcome::Aborted => self.own_slot(cpu as usize).lock.aborted(),
        });
        match popped {
            // SAFETY: the node left the list in the commit: it is ours, and it came from
            // `Box::into_raw` in `push`.
            Some(node) => NonNull::new(node).map(|n| unsafe { Box::from_raw(n.as_ptr()) }),
            None => self.pop_locked(),
        }
    }

    #[cold]
    fn pop_locked(&self) -> Option<Box<Node<T>>> {
        let (index, head) = CpuLock::lock_current_taking(self.len, |i| &self.own_slot(i).lock);
        // SAFETY: the lock is ours and `head` is the list it replaced.
        unsafe { unlink_and_unlock(&self.own_slot(index).lock, head) }
    }

    /// Slot `index`, below [`slots`](Stack::slots) (a CPU the calling code read from the
    /// kernel or got from `lock_current`).
    #[inline]
    fn own_slot(&self, index: usize) -> &Slot {
        self.slot_at(index).expect("a CPU below the possible CPUs")
    }

    /// Pops the most recently pushed node of CPU `cpu`'s list, from any thread.
    ///
    /// # Errors
    ///
    /// [`InvalidCpu`] when `cpu` is not below [`slots`](Stack::slots).
    pub fn steal(&self, cpu: usize) -> Result<Option<Box<Node<T>>>, InvalidCpu> {
        let slot = self.slot(cpu)?;
        let head = lock_remote(slot, cpu);
        // SAFETY: the lock is ours and `head` is the list it replaced.
        Ok(unsafe { unlink_and_unlock(&slot.lock, head) })
    }

    /// Detaches the calling thread's CPU's whole list.
    pub fn pop_all(&self) -> NodeList<T> {
        let (index, head) = CpuLock::lock_current_taking(self.len, |i| &self.own_slot(i).lock);
        self.own_slot(index).lock.unlock_to(0);
        NodeList::from_head(head)
    }

    /// Detaches CPU `cpu`'s whole list, from any thread (e.g. to drain a CPU that left
    /// the cpuset).
    ///
    /// # Errors
    ///
    /// [`InvalidCpu`] when `cpu` is not below [`slots`](Stack::slots).
    pub fn pop_all_on(&self, cpu: usize) -> Result<NodeList<T>, InvalidCpu> {
        let slot = self.slot(cpu)?;
        let head = lock_remote(slot, cpu);
        slot.lock.unlock_to(0);
        Ok(NodeList::from_head(head))
    }

    fn slot(&self, cpu: usize) -> Result<&Slot, InvalidCpu> {
        self.slot_at(cpu).ok_or(InvalidCpu {
            cpu,
            slots: self.len,
        })
    }
}

/// Takes CPU `cpu`'s lock from any thread; returns the list head it replaced.
fn lock_remote(slot: &Slot, cpu: usize) -> usize {
    #[cfg(any(test, feature = "__test-hooks"))]
    if crate::test_hooks::stack_guard_broken() {
        // The mutation of the stress tests: the exchange without the fence, so a push
        // or pop in flight on `cpu` still commits over the token.
        return slot.lock.lock_atomic();
    }
    slot.lock.lock_remote(cpu as u32)
}

/// Pops the first node of the list `head` and releases `lock` to the rest.
///
/// # Safety
///
/// The caller holds `lock`, and `head` is the list head its acquisition replaced.
unsafe fn unlink_and_unlock<T>(lock: &CpuLock, head: usize) -> Option<Box<Node<T>>> {
    let Some(node) = NonNull::new(head as *mut Node<T>) else {
        lock.unlock_to(0);
        return None;
    };
    // SAFETY: `node` heads the list we hold (the caller's contract), so it is alive and
    // ours to take; it came from `Box::into_raw`.
    let node = unsafe { Box::from_raw(node.as_ptr()) };
    // Relaxed: the lock's acquisition (the fence after a local one; the membarrier after
    // a remote one, for the links that sequences stored) ordered the list's links.
    lock.unlock_to(node.next.load(Ordering::Relaxed));
    Some(node)
}

impl<T> Default for Stack<T> {
    fn default() -> Self {
        Stack::new()
    }
}

impl<T> Drop for Stack<T> {
    fn drop(&mut self) {
        for cpu in 0..self.len {
            // `&mut self`: no other thread uses the stack any more, and no lock is held.
            let head = self.own_slot(cpu).lock.take_unshared();
            drop(NodeList::<T>::from_head(head));
        }
        // SAFETY: from `alloc` of this pool with `SLOT`, freed once (here), and nothing
        // uses it any more (`&mut self`, the lists emptied).
        unsafe { Pool::for_index(Index::Cpu).free(self.slots, SLOT) };
    }
}

impl<T> fmt::Debug for Stack<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stack")
            .field("cpus", &self.len)
            .finish_non_exhaustive()
    }
}

/// A detached list of nodes, most recently pushed first; an iterator that hands each
/// node back. Frees the nodes it still holds when dropped.
pub struct NodeList<T> {
    head: *mut Node<T>,
}

// SAFETY: the list owns its nodes exclusively; moving it moves `T`s.
unsafe impl<T: Send> Send for NodeList<T> {}

impl<T> NodeList<T> {
    fn from_head(head: usize) -> Self {
        NodeList {
            head: head as *mut Node<T>,
        }
    }

    /// Whether no node is left.
    pub fn is_empty(&self) -> bool {
        self.head.is_null()
    }
}

impl<T> Iterator for NodeList<T> {
    type Item = Box<Node<T>>;

    fn next(&mut self) -> Option<Box<Node<T>>> {
        if self.head.is_null() {
            return None;
        }
        // SAFETY: the list owns its nodes, each from `Box::into_raw`, linked by `next`.
        let node = unsafe { Box::from_raw(self.head) };
        self.head = node.next.load(Ordering::Relaxed) as *mut Node<T>;
        Some(node)
    }
}

impl<T> Drop for NodeList<T> {
    fn drop(&mut self) {
        for node in self.by_ref() {
            drop(node);
        }
    }
}

impl<T> fmt::Debug for NodeList<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeList")
            .field("empty", &self.head.is_null())
            .finish()
    }
}

/// What the pool's tests check of a stack's layout.
#[cfg(test)]
pub(crate) mod tests_api {
    /// The bytes of one CPU's list.
    pub(crate) const SLOT_BYTES: usize = core::mem::size_of::<super::Slot>();

    /// The address of CPU `cpu`'s list.
    pub(crate) fn slot_address<T>(stack: &super::Stack<T>, cpu: usize) -> usize {
        stack.slots.at(cpu) as usize
    }

    /// The first slot's address and the slot count, as the fast paths read them.
    pub(crate) fn fast_table<T>(stack: &super::Stack<T>) -> (usize, usize) {
        (stack.table.base as usize, stack.table.len)
    }

    /// Makes the fast paths see no slot at all (a slot count of 0): every operation
    /// takes the slow paths.
    pub(crate) fn clear_fast_table<T>(stack: &mut super::Stack<T>) {
        stack.table.len = 0;
    }
}
