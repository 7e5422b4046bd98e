//! The global memory budget for request bodies the router holds.
//!
//! Every body is buffered whole (it is classified whole and replayed on failover), so the
//! per-request cap alone does not bound memory: 1,000 clients each sending a 32 MiB body
//! would make the router hold 32 GiB. Each body reserves its bytes here first — the declared
//! Content-Length up front, a chunked body as its chunks arrive — and a request that does
//! not fit is answered 503 with `Retry-After` before more of it is read. The reservation
//! is returned when the request ends, however it ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug)]
pub struct BodyBudget {
    limit: usize,
    used: AtomicUsize,
}

/// Bytes reserved for one request body; released on drop.
#[derive(Debug)]
pub struct Held {
    budget: Arc<BodyBudget>,
    bytes: usize,
}

impl BodyBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes reserved by requests in flight.
    pub fn in_use(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }

    /// Reserves `n` bytes, or `None` when they do not fit.
    pub fn reserve(self: &Arc<Self>, n: usize) -> Option<Held> {
        self.take(n).then(|| Held {
            budget: Arc::clone(self),
            bytes: n,
        })
    }
}

impl Held {
    /// Makes the reservation at least `total` bytes; false when the budget cannot.
    pub fn grow_to(&mut self, total: usize) -> bool {
        if total <= self.bytes {
            return true;
        }
        if !self.budget.take(total - self.bytes) {
            return false;
        }
        self.bytes = total;
        true
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_refused_past_the_limit_and_returned_on_drop() {
        let b = BodyBudget::new(100);
        let a = b.reserve(60).unwrap();
        assert!(b.reserve(41).is_none(), "60 + 41 > 100");
        let mut c = b.reserve(10).unwrap();
        assert!(c.grow_to(40));
        assert!(!c.grow_to(41), "60 + 41 > 100");
        assert_eq!(b.in_use(), 100);
        drop(a);
        assert_eq!(b.in_use(), 40);
        assert!(c.grow_to(100));
        drop(c);
        assert_eq!(b.in_use(), 0);
    }
}
