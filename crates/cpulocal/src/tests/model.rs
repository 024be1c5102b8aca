//! Every [`crate::ops`] primitive against a naive single-threaded model: the same
//! pseudo-random sequence of operations runs on real words through the primitives
//! (rseq, or the fallback when the process has no rseq) and on plain values, and the
//! outcomes and the whole state must agree after every step.

use core::mem::offset_of;
use core::sync::atomic::{AtomicUsize, Ordering};

use super::delay_exclusive;
use crate::ops::{self, Outcome};
use crate::test_hooks;

/// xorshift64*: deterministic, good enough to pick operations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Small values most of the time (so compares succeed), anything sometimes (so adds
    /// wrap).
    fn value(&mut self) -> usize {
        match self.below(4) {
            0 => self.next() as usize,
            _ => self.below(8),
        }
    }
}

/// A list node: `next` is not at offset 0, so `pop`'s offset is exercised.
#[repr(C)]
struct Node {
    tag: usize,
    next: AtomicUsize,
}

const WORDS: usize = 4;
const BUF: usize = 64;

/// Pins the calling thread to the CPU it runs on, so the primitives' expected CPU
/// stays right (the thread is the only writer of its words anyway). Best effort.
fn pin_to_current_cpu() {
    let cpu = crate::current_cpu();
    // SAFETY: cpu_set_t is plain old data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { core::mem::zeroed() };
    // SAFETY: `cpu` is below the possible CPUs, far below CPU_SETSIZE (1024).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a live cpu_set_t of the size passed; 0 names the calling thread.
    let _ = unsafe { libc::sched_setaffinity(0, core::mem::size_of_val(&set), &set) };
}

/// Runs `op` until it does not abort (bounded), with the CPU read afresh each time.
fn retry(aborts: &mut u64, mut op: impl FnMut(u32) -> Outcome<usize>) -> Outcome<usize> {
    for _ in 0..100_000 {
        match op(crate::current_cpu() as u32) {
            Outcome::Aborted => *aborts += 1,
            done => return done,
        }
    }
    panic!("a primitive aborted 100000 times in a row on a pinned thread");
}

fn unit(o: Outcome) -> Outcome<usize> {
    match o {
        Outcome::Committed(()) => Outcome::Committed(0),
        Outcome::CompareFailed => Outcome::CompareFailed,
        Outcome::Aborted => Outcome::Aborted,
    }
}

/// Runs `steps` pseudo-random primitives from `seed` on a fresh pinned thread, checking
/// each against the model. Returns how many attempts aborted (and were retried).
pub(crate) fn ops_agree_with_a_model(seed: u64, steps: usize) -> u64 {
    std::thread::spawn(move || {
        pin_to_current_cpu();
        run_model(seed, steps)
    })
    .join()
    .expect("model thread")
}

fn run_model(seed: u64, steps: usize) -> u64 {
    let mut rng = Rng(seed | 1);
    let mut aborts = 0;

    let words: Vec<AtomicUsize> = (0..WORDS).map(|_| AtomicUsize::new(0)).collect();
    let seconds: Vec<AtomicUsize> = (0..WORDS).map(|_| AtomicUsize::new(0)).collect();
    let mut buf = vec![0u8; BUF];
    let nodes: Vec<Node> = (0..16)
        .map(|tag| Node {
            tag,
            next: AtomicUsize::new(0),
        })
        .collect();
    let head = AtomicUsize::new(0);

    let mut m_words = [0usize; WORDS];
    let mut m_seconds = [0usize; WORDS];
    let mut m_buf = [0u8; BUF];
    let mut m_list: Vec<usize> = Vec::new(); // top at the end
    let addr = |i: usize| &nodes[i] as *const Node as usize;

    for step in 0..steps {
        let i = rng.below(WORDS);
        let kind = rng.below(6);
        let (got, want) = match kind {
            0 => {
                let n = rng.value();
                let got = retry(&mut aborts, |cpu| {
                    // SAFETY: `words[i]` is written only here, by this one thread.
                    let o = unsafe { ops::add(words[i].as_ptr(), n, cpu) };
                    unit(o)
                });
                m_words[i] = m_words[i].wrapping_add(n);
                (got, Outcome::Committed(0))
            }
            1 => {
                let expect = if rng.below(2) == 0 {
                    m_words[i]
                } else {
                    rng.value()
                };
                let newv = rng.value();
                let got = retry(&mut aborts, |cpu| {
                    // SAFETY: `words[i]` is written only through primitives, by this thread.
                    let o = unsafe { ops::compare_store(words[i].as_ptr(), expect, newv, cpu) };
                    unit(o)
                });
                let want = if m_words[i] == expect {
                    m_words[i] = newv;
                    Outcome::Committed(0)
                } else {
                    Outcome::CompareFailed
                };
                (got, want)
            }
            2 => {
                let offset = offset_of!(Node, next) as isize;
                let got = retry(&mut aborts, |cpu| {
                    // SAFETY: `head` is written only through primitives, by this thread;
                    // it is 0 or the address of a node of `nodes`, which outlives the
                    // loop, with its `next` at `offset`.
                    unsafe { ops::pop(head.as_ptr(), 0, offset, cpu) }
                });
                let want = match m_list.pop() {
                    Some(top) => Outcome::Committed(top),
                    None => Outcome::CompareFailed,
                };
                (got, want)
            }
            3 => {
                // Push a node that is not on the list, with `compare_store` on the head;
                // sometimes with a stale expectation, which must fail.
                let Some(n) = (0..nodes.len())
                    .map(|k| (k + i) % nodes.len())
                    .find(|&k| !m_list.contains(&addr(k)))
                else {
                    continue;
                };
                let top = m_list.last().copied().unwrap_or(0);
                let expect = if rng.below(4) == 0 { top ^ 8 } else { top };
                nodes[n].next.store(expect, Ordering::Relaxed);
                let got = retry(&mut aborts, |cpu| {
                    // SAFETY: `head` is written only through primitives, by this thread.
                    let o = unsafe { ops::compare_store(head.as_ptr(), expect, addr(n), cpu) };
                    unit(o)
                });
                let want = if expect == top {
                    m_list.push(addr(n));
                    Outcome::Committed(0)
                } else {
                    Outcome::CompareFailed
                };
                (got, want)
            }
            4 => {
                let j = rng.below(WORDS);
                let expect = if rng.below(3) == 0 {
                    rng.value()
                } else {
                    m_words[i]
                };
                let (newv2, newv) = (rng.value(), rng.value());
                let got = retry(&mut aborts, |cpu| {
                    // SAFETY: `words[i]` and `seconds[j]` are written only through
                    // primitives, by this thread; nothing reads `seconds[j]` meanwhile.
                    let o = unsafe {
                        ops::compare_try_store_release(
                            words[i].as_ptr(),
                            expect,
                            seconds[j].as_ptr(),
                            newv2,
                            newv,
                            cpu,
                        )
                    };
                    unit(o)
                });
                let want = if m_words[i] == expect {
                    m_seconds[j] = newv2;
                    m_words[i] = newv;
                    Outcome::Committed(0)
                } else {
                    Outcome::CompareFailed
                };
                (got, want)
            }
            _ => {
                let expect = if rng.below(3) == 0 {
                    rng.value()
                } else {
                    m_words[i]
                };
                let newv = rng.value();
                let len = rng.below(BUF / 2 + 1);
                let at = rng.below(BUF - len + 1);
                let src: Vec<u8> = (0..len).map(|k| (step + k) as u8).collect();
                let dst = buf.as_mut_ptr().wrapping_add(at);
                let got = retry(&mut aborts, |cpu| {
                    // SAFETY: `dst..dst+len` lies in `buf`, `src` is a separate vector
                    // of `len` bytes; `words[i]` is written only through primitives, by
                    // this thread.
                    let o = unsafe {
                        ops::compare_memcpy_store_release(
                            words[i].as_ptr(),
                            expect,
                            dst,
                            src.as_ptr(),
                            len,
                            newv,
                            cpu,
                        )
                    };
                    unit(o)
                });
                let want = if m_words[i] == expect {
                    m_buf[at..at + len].copy_from_slice(&src);
                    m_words[i] = newv;
                    Outcome::Committed(0)
                } else {
                    Outcome::CompareFailed
                };
                (got, want)
            }
        };
        assert_eq!(got, want, "step {step}: operation {kind} on word {i}");
        let real_words: Vec<usize> = words.iter().map(|w| w.load(Ordering::Relaxed)).collect();
        let real_seconds: Vec<usize> = seconds.iter().map(|w| w.load(Ordering::Relaxed)).collect();
        assert_eq!(real_words, m_words, "step {step}: words");
        assert_eq!(real_seconds, m_seconds, "step {step}: second words");
        assert_eq!(buf[..], m_buf[..], "step {step}: buffer");
        assert_eq!(
            head.load(Ordering::Relaxed),
            m_list.last().copied().unwrap_or(0),
            "step {step}: list head"
        );
    }
    // The list links are what the model says, node by node.
    let mut walked = Vec::new();
    let mut p = head.load(Ordering::Relaxed);
    while p != 0 {
        walked.push(p);
        // SAFETY: every non-zero link is the address of a node of `nodes`.
        p = unsafe { (*(p as *const Node)).next.load(Ordering::Relaxed) };
    }
    m_list.reverse();
    assert_eq!(walked, m_list, "list links");
    assert!(
        nodes.iter().enumerate().all(|(k, n)| n.tag == k),
        "pop wrote only the head"
    );
    aborts
}

#[test]
fn every_primitive_agrees_with_a_naive_model() {
    let _delay = delay_exclusive();
    let quiet = ops_agree_with_a_model(0x5eed, 20_000);
    // With the window widened, preemption lands inside sequences: the retried
    // primitives must still agree.
    test_hooks::set_delay_loops(2_000);
    let widened = ops_agree_with_a_model(0xdecaf, 5_000);
    println!("model: {quiet} aborts without delay, {widened} with a 2000-loop delay");
}
