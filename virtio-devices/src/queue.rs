//! Serving a split virtqueue's available chains, whatever the device does with them.

use std::sync::atomic::Ordering;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemory;

/// What a drain's caller did with a chain it ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// Completed, or queued to complete later.
    Done,
    /// Not completed: put back, to run again (its pages were not all reachable).
    HandBack,
}

/// How a drain ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drained {
    /// Nothing left, notifications re-enabled.
    Empty,
    /// The budget ran out; chains may be left.
    Budget,
    /// A chain was handed back; the queue stops there.
    HandedBack,
}

/// Runs up to `budget` available chains through `run` and hands (head, used length) to
/// `complete`, which may publish it at once, later, or hand it back (it stays available, to
/// run again from the start, and the drain stops there). Notifications stay disabled while
/// chains are left, and are re-enabled (with a re-check) once the ring is empty.
///
/// Every iteration consumes an avail entry, so a hostile ring cannot make this spin: an invalid
/// head index is skipped (`bad_head`), an avail index more than a queue ahead is an error. An
/// avail entry that cannot be read is skipped too, unless `wait` says to wait for its page.
pub fn drain<'m, M: GuestMemory>(
    queue: &mut Queue,
    mem: &'m M,
    budget: usize,
    mut run: impl FnMut(DescriptorChain<&'m M>) -> u32,
    mut bad_head: impl FnMut(),
    mut complete: impl FnMut(&mut Queue, u16, u32) -> Result<Completion, virtio_queue::Error>,
    mut wait: impl FnMut() -> bool,
) -> Result<Drained, virtio_queue::Error> {
    let mut left = budget;
    loop {
        queue.disable_notification(mem)?;
        loop {
            let avail = queue.avail_idx(mem, Ordering::Acquire)?;
            let pending = avail - std::num::Wrapping(queue.next_avail());
            if pending.0 == 0 {
                break;
            }
            if pending.0 > queue.size() {
                return Err(virtio_queue::Error::InvalidAvailRingIndex);
            }
            if left == 0 {
                return Ok(Drained::Budget);
            }
            left -= 1;
            match queue.pop_descriptor_chain(mem) {
                // The chain of an out-of-range head has no descriptors and no used slot.
                Some(chain) if chain.head_index() >= queue.size() => bad_head(),
                Some(chain) => {
                    let head = chain.head_index();
                    let len = run(chain);
                    if complete(queue, head, len)? == Completion::HandBack {
                        queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                        return Ok(Drained::HandedBack);
                    }
                }
                // The avail entry itself could not be read.
                None if wait() => return Ok(Drained::HandedBack),
                None => {
                    bad_head();
                    queue.set_next_avail(queue.next_avail().wrapping_add(1));
                }
            }
        }
        if !queue.enable_notification(mem)? {
            break;
        }
    }
    Ok(Drained::Empty)
}
