//! Cost attribution: each request's share of its worker's time.

use std::sync::Mutex;
use std::time::Instant;

/// Attributes a worker's time to the requests it serves at once: while `n` requests from
/// this router are in flight to it, each accrues `1/n` of every second. A request's share is
/// the clock's advance between its start and its end (processor-sharing accounting), so
/// concurrent requests split the worker's cost instead of each paying for all of it.
#[derive(Debug)]
pub struct ShareClock(Mutex<ShareState>);

#[derive(Debug)]
struct ShareState {
    at: Instant,
    in_flight: u32,
    /// Seconds accrued per request since the clock started.
    per_request: f64,
}

impl Default for ShareClock {
    fn default() -> Self {
        Self(Mutex::new(ShareState {
            at: Instant::now(),
            in_flight: 0,
            per_request: 0.0,
        }))
    }
}

impl ShareClock {
    fn advance(&self, now: Instant, delta: i32) -> f64 {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let dt = now.saturating_duration_since(s.at).as_secs_f64();
        if s.in_flight > 0 {
            s.per_request += dt / f64::from(s.in_flight);
        }
        s.at = s.at.max(now);
        s.in_flight = s.in_flight.saturating_add_signed(delta);
        s.per_request
    }

    /// A request starts; returns the clock reading to hand back to [`ShareClock::end`].
    pub fn start(&self, now: Instant) -> f64 {
        self.advance(now, 1)
    }

    /// A request that started at reading `started` ends; returns its share in seconds.
    pub fn end(&self, now: Instant, started: f64) -> f64 {
        (self.advance(now, -1) - started).max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A alone for 1 s, A and B together for 2 s, B alone for 1 s: each had the worker's
    /// whole attention for 1 s and half of it for 2 s, so each is charged 2 s, and the
    /// charges add up to the 4 s the worker was busy.
    #[test]
    fn concurrent_requests_split_the_workers_time() {
        let c = ShareClock::default();
        let t0 = Instant::now();
        let s = |secs| t0 + Duration::from_secs(secs);
        let a = c.start(s(0));
        let b = c.start(s(1));
        let a_share = c.end(s(3), a);
        let b_share = c.end(s(4), b);
        assert!((a_share - 2.0).abs() < 1e-9, "{a_share}");
        assert!((b_share - 2.0).abs() < 1e-9, "{b_share}");
        // idle time is charged to nobody
        let d = c.start(s(10));
        assert!((c.end(s(11), d) - 1.0).abs() < 1e-9);
    }
}
