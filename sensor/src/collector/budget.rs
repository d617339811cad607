//! A byte budget shared by every request in flight: request bodies (compressed) and what
//! they decompress to are reserved here before they are held in memory.
//!
//! Why: each request was bounded on its own (8 MiB body, 128 MiB decompressed), but 512 of
//! them at once could make the collector hold 64 GiB. With the budget, all requests together
//! hold at most its capacity; a request that finds it spent is refused (the agent retries
//! later) instead of growing the collector's memory.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

#[derive(Debug)]
pub struct Budget {
    capacity: usize,
    used: AtomicUsize,
}

/// Bytes reserved by one request; released when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Budget {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            capacity,
            used: AtomicUsize::new(0),
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// An empty reservation, grown with [`Reservation::grow`].
    pub fn reservation(self: &Arc<Self>) -> Reservation {
        Reservation {
            budget: self.clone(),
            bytes: 0,
        }
    }
}

impl Reservation {
    /// Reserves `n` more bytes; false (nothing reserved) if the budget cannot hold them.
    pub fn grow(&mut self, n: usize) -> bool {
        let b = &self.budget;
        let ok = b
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&u| u <= b.capacity)
            })
            .is_ok();
        if ok {
            self.bytes += n;
        }
        ok
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_share_the_capacity_and_release_on_drop() {
        let b = Budget::new(100);
        let mut r1 = b.reservation();
        assert!(r1.grow(60));
        let mut r2 = b.reservation();
        assert!(!r2.grow(41), "over the capacity: refused whole");
        assert!(r2.grow(40));
        assert_eq!(b.used(), 100);
        assert!(!r1.grow(1));
        assert!(!r1.grow(usize::MAX), "no overflow");
        drop(r1);
        assert_eq!(b.used(), 40);
        assert!(r2.grow(60));
        drop(r2);
        assert_eq!(b.used(), 0);
    }
}
