//! Tenants: who sent a request, and whether its tenant's limits let it in.
//!
//! A request's tenant comes from its API key (`Authorization: Bearer KEY`), looked up by the
//! key's SHA-256 among the tenants the rules declare. A key no tenant holds is its own
//! tenant, `key-` and the first 64 bits of its digest (with `auth: required` it gets 401
//! `invalid_api_key` instead); no key at all is `anonymous`.
//!
//! Limits, per configured tenant: requests in flight and requests per minute before the
//! body is read, prompt tokens per minute once the prompt is counted
//! (GCRA token buckets from `governor`: a full minute's worth may come at once, then the
//! bucket refills evenly). Over a limit the request gets 429 with `Retry-After` and
//! OpenAI's `x-ratelimit-*` headers, so the official SDKs back off by themselves. The
//! limiters live across rule reloads; a tenant whose limits change starts a fresh bucket.
//! A daily budget (dollars per UTC day) is charged each request's cost as it ends
//! ([`Limiters::charge`], from the cost accounting) and refuses new requests with 429
//! `insufficient_quota` once spent.
//! Limits are this router's own, unless `--limits-redis` names a Redis that every replica
//! shares: then requests and tokens per minute are taken from buckets in Redis
//! ([`crate::shared_limits`]), and decided locally only while Redis cannot answer.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use routing_rules::{BreakerLimits, CompiledRules, Limits, Tenant, key_digest};

use crate::error::ProxyError;

/// The tenant a request's `Authorization` header names: a configured tenant's name, the
/// key's derived id (`key-` + 16 hex digits of its SHA-256: stable across builds, never
/// the key), or `None` without a key.
pub fn tenant_of(rules: &CompiledRules, authorization: Option<&str>) -> Option<String> {
    let key = authorization?.strip_prefix("Bearer ")?.trim();
    if key.is_empty() {
        return None;
    }
    let digest = key_digest(key);
    if let Some(t) = rules.tenant_by_key(&digest) {
        return Some(t.name.to_string());
    }
    use std::fmt::Write;
    let mut id = String::with_capacity(20);
    id.push_str("key-");
    for b in &digest[..8] {
        let _ = write!(id, "{b:02x}");
    }
    Some(id)
}

/// The tenant a request's `Authorization` header names (see [`tenant_of`]).
pub fn tenant_of_headers(rules: &CompiledRules, headers: &http::HeaderMap) -> Option<String> {
    let authorization = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    tenant_of(rules, authorization)
}

/// A tenant's circuit breaker: per-second counts of its answers over the window, and
/// whether it is open (until when) or half-open (a probe out).
#[derive(Default)]
struct Breaker {
    /// `(second, answers, failures)`, oldest first, within the window.
    seconds: std::collections::VecDeque<(u64, u32, u32)>,
    open_until: Option<std::time::Instant>,
    probing: bool,
}

/// The breaker's word on a new request.
enum Gate {
    Pass,
    /// Half-open: this request is the probe.
    Probe,
    Shed(Duration),
}

impl Breaker {
    fn gate(&mut self, now: std::time::Instant) -> Gate {
        match self.open_until {
            None => Gate::Pass,
            Some(until) if now < until => Gate::Shed(until - now),
            Some(_) if self.probing => Gate::Shed(Duration::from_secs(1)),
            Some(_) => {
                self.probing = true;
                Gate::Probe
            }
        }
    }

    /// Counts an answer (`failed`: a 5xx); a probe's answer closes or reopens the breaker.
    fn answer(&mut self, cfg: &BreakerLimits, failed: bool, probe: bool, now: std::time::Instant) {
        let open = Duration::from_secs(u64::from(cfg.open_s));
        if probe {
            self.probing = false;
            self.seconds.clear();
            self.open_until = failed.then(|| now + open);
            return;
        }
        if self.open_until.is_some() {
            return; // answers of requests let in before it opened
        }
        let second = unix_seconds();
        match self.seconds.back_mut() {
            Some((s, n, f)) if *s == second => {
                *n += 1;
                *f += u32::from(failed);
            }
            _ => self.seconds.push_back((second, 1, u32::from(failed))),
        }
        let window = u64::from(cfg.window_s);
        while self
            .seconds
            .front()
            .is_some_and(|(s, ..)| s + window <= second)
        {
            self.seconds.pop_front();
        }
        let (n, f) = self.seconds.iter().fold((0u64, 0u64), |(n, f), (_, a, b)| {
            (n + u64::from(*a), f + u64::from(*b))
        });
        if n >= u64::from(cfg.min_requests) && f * 100 >= u64::from(cfg.error_percent) * n {
            self.open_until = Some(now + open);
            self.seconds.clear();
        }
    }
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A per-minute GCRA bucket that tells how much is left after each take (for the
/// `x-ratelimit-remaining-*` headers).
type Bucket = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

/// One tenant's limiters.
struct State {
    limits: Limits,
    breaker: Mutex<Breaker>,
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    in_flight: AtomicU32,
    /// Spent today (`day`, days since the epoch, UTC), in billionths of a dollar.
    spent_nano_usd: AtomicU64,
    day: AtomicU64,
    /// Spent this month (`month`, months since January 1970, UTC), in billionths of a dollar.
    spent_month_nano_usd: AtomicU64,
    month: AtomicU64,
}

/// This month, as months since January 1970 (UTC), and the time left until the next one.
fn this_month() -> (u64, Duration) {
    let now = time::OffsetDateTime::now_utc();
    let (year, month) = (now.year(), now.month());
    let next = match month {
        time::Month::December => time::Date::from_calendar_date(year + 1, time::Month::January, 1),
        m => time::Date::from_calendar_date(year, m.next(), 1),
    };
    let left = next
        .map(|d| d.midnight().assume_utc() - now)
        .ok()
        .and_then(|d| Duration::try_from(d).ok())
        .unwrap_or(Duration::from_secs(86_400));
    let index =
        u64::try_from(i64::from(year) - 1970).unwrap_or(0) * 12 + u64::from(month as u8 - 1);
    (index, left)
}

/// Today, as days since the epoch (UTC), and the time left until tomorrow.
fn today() -> (u64, Duration) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    (now / 86_400, Duration::from_secs(86_400 - now % 86_400))
}

impl State {
    fn new(limits: Limits) -> Self {
        let bucket = |per_minute: Option<NonZeroU32>| {
            per_minute.map(|n| {
                RateLimiter::direct(Quota::per_minute(n))
                    .with_middleware::<StateInformationMiddleware>()
            })
        };
        Self {
            limits,
            requests: bucket(limits.requests_per_minute),
            tokens: bucket(limits.tokens_per_minute),
            breaker: Mutex::default(),
            in_flight: AtomicU32::new(0),
            spent_nano_usd: AtomicU64::new(0),
            day: AtomicU64::new(today().0),
            spent_month_nano_usd: AtomicU64::new(0),
            month: AtomicU64::new(this_month().0),
        }
    }

    /// What was spent this month (a new month starts from zero).
    fn spent_this_month(&self, month: u64) -> &AtomicU64 {
        if self.month.swap(month, Ordering::Relaxed) != month {
            self.spent_month_nano_usd.store(0, Ordering::Relaxed);
        }
        &self.spent_month_nano_usd
    }

    /// What was spent today (a new day starts from zero).
    fn spent_today(&self, day: u64) -> &AtomicU64 {
        if self.day.swap(day, Ordering::Relaxed) != day {
            self.spent_nano_usd.store(0, Ordering::Relaxed);
        }
        &self.spent_nano_usd
    }
}

/// Every configured tenant's limiters.
#[derive(Default)]
pub struct Limiters {
    by_tenant: Mutex<HashMap<Arc<str>, Arc<State>>>,
    /// The store every replica shares, when configured (set once at start).
    pub shared: std::sync::OnceLock<Arc<crate::shared_limits::SharedLimits>>,
}

/// A request let in: counted in its tenant's requests in flight until dropped.
pub struct Admitted {
    state: Arc<State>,
    tenant: Arc<str>,
    /// The breaker's half-open probe.
    probe: bool,
    /// OpenAI's `x-ratelimit-*-requests` headers for the answer (limit, what is left, when
    /// the bucket is full again), when the tenant has a requests-per-minute limit.
    pub headers: Vec<(&'static str, String)>,
}

impl Admitted {
    /// The request's answer, for its tenant's breaker: `status` as the client got it (5xx
    /// are failures, but 503: no capacity is the fleet's state, not the tenant's doing;
    /// 429 and a client that left count neither way).
    pub fn answered(&self, status: u16) {
        let Some(cfg) = &self.state.limits.breaker else {
            return;
        };
        if status == 429 || status == 499 || status == 0 {
            return; // told nothing (a probe's turn passes on when it is dropped)
        }
        if let Ok(mut b) = self.state.breaker.lock() {
            let failed = status >= 500 && status != 503;
            b.answer(cfg, failed, self.probe, std::time::Instant::now());
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::Relaxed);
        if self.probe
            && let Ok(mut b) = self.state.breaker.lock()
        {
            // a probe that ended without telling (refused later, the client left): the
            // next request probes
            b.probing = false;
        }
    }
}

/// A tenant's use of its limits now (`GET /admin/tenants`).
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// `closed`, `open` or `half_open` (tenants with a breaker; else `closed`).
    pub breaker: &'static str,
    pub in_flight: u32,
    /// Counted for tenants with a budget only.
    pub spent_today_usd: f64,
    /// Counted for tenants with a budget only.
    pub spent_this_month_usd: f64,
}

/// A refusal: the error, and the headers that go with it.
pub struct Refused {
    pub error: ProxyError,
    pub headers: Vec<(&'static str, String)>,
}

impl Limiters {
    fn state(&self, tenant: &Tenant) -> Arc<State> {
        let mut map = self.by_tenant.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(&tenant.name) {
            Some(s) if s.limits == tenant.limits => Arc::clone(s),
            _ => {
                let s = Arc::new(State::new(tenant.limits));
                map.insert(Arc::clone(&tenant.name), Arc::clone(&s));
                s
            }
        }
    }

    /// Takes `n` from a tenant's `what` bucket: the shared one when the store answers,
    /// else this router's own. Taken: what is left in the bucket.
    async fn take(
        &self,
        tenant: &str,
        what: &'static str,
        local: &Bucket,
        limit: NonZeroU32,
        n: NonZeroU32,
    ) -> Result<u32, Refused> {
        if let Some(store) = self.shared.get()
            && let Some(verdict) = store.take(tenant, what, limit.get(), n.get(), false).await
        {
            return verdict.map_err(|wait| refused(tenant.to_string(), what, limit, wait));
        }
        match local.check_n(n) {
            Ok(Ok(snapshot)) => Ok(snapshot.remaining_burst_capacity()),
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                Err(refused(tenant.to_string(), what, limit, wait))
            }
            // more than the bucket holds: callers refuse that before taking
            Err(_) => Err(refused(tenant.to_string(), what, limit, Duration::ZERO)),
        }
    }

    /// Charges `n` to a tenant's `what` bucket after the fact (completion tokens, known
    /// once generated): taken even when it does not fit. In Redis the bucket goes into
    /// debt, so the tenant's next requests wait until it is paid off; a local bucket
    /// cannot hold debt (`governor`), so it is emptied as far as `n` reaches.
    async fn charge_bucket(
        &self,
        tenant: &str,
        what: &'static str,
        local: &Bucket,
        limit: NonZeroU32,
        n: u32,
    ) {
        if n == 0 {
            return;
        }
        if let Some(store) = self.shared.get()
            && store
                .take(tenant, what, limit.get(), n, true)
                .await
                .is_some()
        {
            return;
        }
        // take the largest amounts that fit, halving: O(log n) checks
        let mut left = n.min(limit.get());
        let mut chunk = left;
        while left > 0 && chunk > 0 {
            let Some(c) = NonZeroU32::new(chunk.min(left)) else {
                break;
            };
            match local.check_n(c) {
                Ok(Ok(_)) => left -= c.get(),
                _ => chunk /= 2,
            }
        }
    }

    /// Lets a request in, or says why not, before its body is read: its tenant's requests
    /// in flight (nothing spent when refused), then requests per minute.
    pub async fn admit_request(&self, tenant: &Tenant) -> Result<Admitted, Refused> {
        let state = self.state(tenant);
        if let Some(budget) = state.limits.budget_nano_usd_per_day {
            let (day, left) = today();
            if state.spent_today(day).load(Ordering::Relaxed) >= budget.get() {
                return Err(Refused {
                    error: ProxyError::QuotaExceeded {
                        tenant: tenant.name.to_string(),
                        budget_usd: budget.get() as f64 / 1e9,
                        period: "day",
                        retry_after: left,
                    },
                    headers: Vec::new(),
                });
            }
        }
        if let Some(budget) = state.limits.budget_nano_usd_per_month {
            let (month, left) = this_month();
            if state.spent_this_month(month).load(Ordering::Relaxed) >= budget.get() {
                return Err(Refused {
                    error: ProxyError::QuotaExceeded {
                        tenant: tenant.name.to_string(),
                        budget_usd: budget.get() as f64 / 1e9,
                        period: "month",
                        retry_after: left,
                    },
                    headers: Vec::new(),
                });
            }
        }
        if let Some(max) = state.limits.max_concurrent {
            let took = state
                .in_flight
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    (n < max.get()).then_some(n + 1)
                });
            if took.is_err() {
                return Err(Refused {
                    error: ProxyError::RateLimited {
                        tenant: tenant.name.to_string(),
                        what: "concurrent requests",
                        limit: max.get(),
                        retry_after: Duration::from_secs(1),
                    },
                    headers: Vec::new(),
                });
            }
        } else {
            state.in_flight.fetch_add(1, Ordering::Relaxed);
        }
        // from here on, a refusal gives the in-flight slot back (and a probe's turn)
        let mut admitted = Admitted {
            state: Arc::clone(&state),
            tenant: Arc::clone(&tenant.name),
            probe: false,
            headers: Vec::new(),
        };
        // the breaker, once nothing else has refused: a probe's turn is handed back by
        // `Admitted`'s drop, whatever happens to the probe next
        if state.limits.breaker.is_some() {
            let gate = match state.breaker.lock() {
                Ok(mut b) => b.gate(std::time::Instant::now()),
                Err(_) => Gate::Pass,
            };
            match gate {
                Gate::Pass => {}
                Gate::Probe => admitted.probe = true,
                Gate::Shed(wait) => {
                    return Err(Refused {
                        error: ProxyError::TenantCircuitOpen {
                            tenant: tenant.name.to_string(),
                            retry_after: wait,
                        },
                        headers: Vec::new(),
                    });
                }
            }
        }
        if let (Some(bucket), Some(limit)) = (&state.requests, state.limits.requests_per_minute) {
            let left = self
                .take(&tenant.name, "requests", bucket, limit, NonZeroU32::MIN)
                .await?;
            admitted.headers = remaining_headers("requests", limit, left);
        }
        Ok(admitted)
    }

    /// What `tenant` uses now, if it has sent a request since the router started.
    pub fn usage(&self, tenant: &str) -> Option<Usage> {
        let map = self.by_tenant.lock().unwrap_or_else(|p| p.into_inner());
        let s = map.get(tenant)?;
        let breaker = match s.breaker.lock().map(|b| b.open_until) {
            Ok(Some(until)) if std::time::Instant::now() < until => "open",
            Ok(Some(_)) => "half_open",
            _ => "closed",
        };
        Some(Usage {
            breaker,
            in_flight: s.in_flight.load(Ordering::Relaxed),
            spent_today_usd: s.spent_today(today().0).load(Ordering::Relaxed) as f64 / 1e9,
            spent_this_month_usd: s.spent_this_month(this_month().0).load(Ordering::Relaxed) as f64
                / 1e9,
        })
    }

    /// Charges a finished request's cost to its tenant's budgets for today and this month.
    pub fn charge(&self, tenant: &str, usd: f64) {
        let state = {
            let map = self.by_tenant.lock().unwrap_or_else(|p| p.into_inner());
            map.get(tenant).cloned()
        };
        let Some(s) = state else { return };
        if !(usd.is_finite() && usd > 0.0) {
            return;
        }
        let nano = (usd * 1e9).ceil() as u64;
        if s.limits.budget_nano_usd_per_day.is_some() {
            s.spent_today(today().0).fetch_add(nano, Ordering::Relaxed);
        }
        if s.limits.budget_nano_usd_per_month.is_some() {
            s.spent_this_month(this_month().0)
                .fetch_add(nano, Ordering::Relaxed);
        }
    }

    /// Charges an answer's completion tokens to its tenant's tokens per minute, once the
    /// worker has reported them (prompt tokens were taken at admission).
    pub async fn charge_completion(&self, admitted: &Admitted, tokens: u64) {
        let s = &admitted.state;
        if let (Some(bucket), Some(limit)) = (&s.tokens, s.limits.tokens_per_minute) {
            let n = u32::try_from(tokens).unwrap_or(u32::MAX);
            self.charge_bucket(&admitted.tenant, "tokens", bucket, limit, n)
                .await;
        }
    }

    /// Spends `prompt_tokens` of the tenant's tokens per minute, once the prompt is
    /// counted, or says why not (a request refused here has spent its request). Taken: the
    /// `x-ratelimit-*-tokens` headers for the answer.
    pub async fn admit_tokens(
        &self,
        tenant: &Tenant,
        prompt_tokens: u64,
    ) -> Result<Vec<(&'static str, String)>, Refused> {
        let state = self.state(tenant);
        let (Some(bucket), Some(limit)) = (&state.tokens, state.limits.tokens_per_minute) else {
            return Ok(Vec::new());
        };
        let n = u32::try_from(prompt_tokens.max(1)).unwrap_or(u32::MAX);
        let n = NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        if n > limit {
            // a prompt larger than a whole minute's tokens never fits
            return Err(Refused {
                error: ProxyError::TooLargeForTenant {
                    tenant: tenant.name.to_string(),
                    tokens: prompt_tokens,
                    limit: limit.get(),
                },
                headers: ratelimit_headers("tokens", limit, Duration::ZERO),
            });
        }
        let left = self.take(&tenant.name, "tokens", bucket, limit, n).await?;
        Ok(remaining_headers("tokens", limit, left))
    }
}

/// The metric's `reason` for a refusal.
pub fn reason(e: &ProxyError) -> &'static str {
    match e {
        ProxyError::RateLimited { what: "tokens", .. } | ProxyError::TooLargeForTenant { .. } => {
            "tokens_per_minute"
        }
        ProxyError::RateLimited {
            what: "requests", ..
        } => "requests_per_minute",
        ProxyError::RateLimited { .. } => "max_concurrent",
        ProxyError::QuotaExceeded { .. } => "budget",
        ProxyError::TenantCircuitOpen { .. } => "circuit_open",
        _ => "invalid_api_key",
    }
}

fn refused(tenant: String, what: &'static str, limit: NonZeroU32, wait: Duration) -> Refused {
    Refused {
        error: ProxyError::RateLimited {
            tenant,
            what,
            limit: limit.get(),
            retry_after: wait,
        },
        headers: ratelimit_headers(what, limit, wait),
    }
}

/// OpenAI's rate-limit headers on an admitted request: the limit, what is left of it, and
/// when the bucket is full again (it refills evenly over a minute).
fn remaining_headers(what: &str, limit: NonZeroU32, left: u32) -> Vec<(&'static str, String)> {
    let left = left.min(limit.get());
    let full_in =
        Duration::from_secs(60).mul_f64(f64::from(limit.get() - left) / f64::from(limit.get()));
    let mut h = ratelimit_headers(what, limit, full_in);
    h[1].1 = left.to_string();
    h
}

/// OpenAI's rate-limit headers for `requests` or `tokens`: the limit, nothing remaining,
/// and when it resets (`"1.5s"`).
fn ratelimit_headers(what: &str, limit: NonZeroU32, wait: Duration) -> Vec<(&'static str, String)> {
    let (l, r, t) = if what == "tokens" {
        (
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
        )
    } else {
        (
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
        )
    };
    vec![
        (l, limit.get().to_string()),
        (r, "0".to_string()),
        (t, format!("{:.3}s", wait.as_secs_f64())),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(rpm: Option<u32>, tpm: Option<u32>, conc: Option<u32>) -> Tenant {
        Tenant {
            name: Arc::from("a"),
            limits: Limits {
                requests_per_minute: rpm.and_then(NonZeroU32::new),
                tokens_per_minute: tpm.and_then(NonZeroU32::new),
                max_concurrent: conc.and_then(NonZeroU32::new),
                budget_nano_usd_per_day: None,
                budget_nano_usd_per_month: None,
                breaker: None,
            },
            models: None,
            pools: None,
        }
    }

    #[tokio::test]
    async fn the_breaker_opens_on_failures_sheds_the_tenant_and_a_probe_closes_it() {
        let l = Limiters::default();
        let mut t = tenant(None, None, None);
        t.limits.breaker = Some(BreakerLimits {
            error_percent: 50,
            min_requests: 4,
            window_s: 60,
            open_s: 1,
        });
        // 2 of 3 failed: below min_requests, still closed
        for status in [504, 200, 504] {
            l.admit_request(&t)
                .await
                .ok()
                .expect("closed")
                .answered(status);
        }
        assert_eq!(l.usage("a").map(|u| u.breaker), Some("closed"));
        // the fourth answer: 3 of 4 failed ≥ 50 % → open
        l.admit_request(&t)
            .await
            .ok()
            .expect("closed")
            .answered(502);
        let r = l.admit_request(&t).await.err().expect("shed");
        assert_eq!(r.error.status(), 503);
        assert_eq!(r.error.retry_after(), Some(1));
        assert_eq!(reason(&r.error), "circuit_open");
        assert_eq!(l.usage("a").map(|u| u.breaker), Some("open"));
        // after open_s: one probe at a time; a failed probe reopens it
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let probe = l.admit_request(&t).await.ok().expect("the probe");
        assert!(l.admit_request(&t).await.is_err(), "one probe at a time");
        probe.answered(504);
        drop(probe);
        assert!(l.admit_request(&t).await.is_err(), "reopened");
        tokio::time::sleep(Duration::from_millis(1100)).await;
        // a probe that tells nothing passes its turn on; a successful one closes
        drop(l.admit_request(&t).await.ok().expect("a probe"));
        let probe = l.admit_request(&t).await.ok().expect("the next probe");
        probe.answered(200);
        drop(probe);
        assert_eq!(l.usage("a").map(|u| u.breaker), Some("closed"));
        for _ in 0..3 {
            l.admit_request(&t)
                .await
                .ok()
                .expect("closed again")
                .answered(200);
        }

        // half-open while the tenant is at its concurrency limit: that refusal does not take
        // the probe's turn (before, the breaker stayed half-open and shed for good)
        t.limits.max_concurrent = NonZeroU32::new(1);
        let l = Limiters::default();
        let holder = l.admit_request(&t).await.ok().expect("the one slot");
        for _ in 0..4 {
            holder.answered(504); // opens the breaker; the slot stays taken
        }
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let r = l.admit_request(&t).await.err().expect("no slot");
        assert_eq!(reason(&r.error), "max_concurrent");
        drop(holder);
        let probe = l.admit_request(&t).await.ok().expect("the probe");
        assert!(probe.probe);
        probe.answered(200);
        drop(probe);
        assert_eq!(l.usage("a").map(|u| u.breaker), Some("closed"));
    }

    #[tokio::test]
    async fn requests_per_minute_allows_the_burst_then_refuses_with_a_wait() {
        let l = Limiters::default();
        let t = tenant(Some(3), None, None);
        for _ in 0..3 {
            assert!(l.admit_request(&t).await.is_ok());
        }
        let r = l
            .admit_request(&t)
            .await
            .err()
            .expect("the fourth is refused");
        assert_eq!(r.error.status(), 429);
        // one request's worth refills in 20 s
        let wait = r.error.retry_after().expect("retry-after");
        assert!((1..=20).contains(&wait), "{wait}");
        assert!(
            r.headers
                .iter()
                .any(|(k, v)| *k == "x-ratelimit-limit-requests" && v == "3")
        );
    }

    #[tokio::test]
    async fn tokens_per_minute_counts_prompt_tokens_and_refuses_a_prompt_larger_than_the_minute() {
        let l = Limiters::default();
        let t = tenant(None, Some(1000), None);
        assert!(l.admit_tokens(&t, 600).await.is_ok());
        let r = l.admit_tokens(&t, 600).await.expect_err("1200 > 1000");
        assert!(r.error.to_string().contains("on tokens"), "{}", r.error);
        let r = l.admit_tokens(&t, 5000).await.expect_err("never fits");
        assert!(matches!(r.error, ProxyError::TooLargeForTenant { .. }));
    }

    #[tokio::test]
    async fn concurrency_is_released_when_a_request_ends_and_changed_limits_start_fresh() {
        let l = Limiters::default();
        let t = tenant(None, None, Some(2));
        let a = l.admit_request(&t).await.ok();
        let b = l.admit_request(&t).await.ok();
        assert!(a.is_some() && b.is_some());
        assert!(l.admit_request(&t).await.is_err());
        drop(a);
        assert!(l.admit_request(&t).await.is_ok());
        // a reload that changes the limit: a fresh state
        let wider = tenant(None, None, Some(5));
        assert!(l.admit_request(&wider).await.is_ok());
    }

    #[tokio::test]
    async fn a_spent_budget_refuses_until_tomorrow() {
        let l = Limiters::default();
        let mut t = tenant(None, None, None);
        t.limits.budget_nano_usd_per_day = std::num::NonZeroU64::new(10_000_000); // $0.01
        assert!(l.admit_request(&t).await.is_ok());
        l.charge("a", 0.004);
        assert!(l.admit_request(&t).await.is_ok(), "$0.004 of $0.01 spent");
        l.charge("a", 0.007);
        let r = l.admit_request(&t).await.err().expect("$0.011 spent");
        assert!(matches!(r.error, ProxyError::QuotaExceeded { .. }));
        let wait = r.error.retry_after().expect("until midnight");
        assert!((1..=86_400).contains(&wait), "{wait}");
        assert_eq!(reason(&r.error), "budget");
    }

    #[tokio::test]
    async fn admitted_requests_carry_what_is_left_of_their_limits() {
        let l = Limiters::default();
        let t = tenant(Some(3), Some(1000), None);
        let a = l.admit_request(&t).await.ok().expect("admitted");
        let h = |hs: &[(&'static str, String)], k: &str| {
            hs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
        };
        assert_eq!(
            h(&a.headers, "x-ratelimit-limit-requests").as_deref(),
            Some("3")
        );
        assert_eq!(
            h(&a.headers, "x-ratelimit-remaining-requests").as_deref(),
            Some("2")
        );
        // one of three per minute taken: full again in 20 s
        let reset = h(&a.headers, "x-ratelimit-reset-requests").expect("reset");
        let secs: f64 = reset.trim_end_matches('s').parse().expect("seconds");
        assert!((19.0..=20.0).contains(&secs), "{reset}");
        let tokens = l.admit_tokens(&t, 250).await.ok().expect("tokens");
        assert_eq!(
            h(&tokens, "x-ratelimit-limit-tokens").as_deref(),
            Some("1000")
        );
        assert_eq!(
            h(&tokens, "x-ratelimit-remaining-tokens").as_deref(),
            Some("750")
        );
    }

    #[tokio::test]
    async fn completion_tokens_are_charged_to_tokens_per_minute_after_the_answer() {
        let l = Limiters::default();
        let t = tenant(None, Some(1000), None);
        let a = l.admit_request(&t).await.ok().expect("admitted");
        assert!(l.admit_tokens(&t, 100).await.is_ok());
        // the answer generated 850 tokens: 50 are left of the minute
        l.charge_completion(&a, 850).await;
        let r = l
            .admit_tokens(&t, 100)
            .await
            .expect_err("100 > the 50 left");
        assert_eq!(reason(&r.error), "tokens_per_minute");
        assert!(l.admit_tokens(&t, 40).await.is_ok(), "40 of the 50 left");
        // a charge larger than the bucket empties it (a local bucket holds no debt)
        l.charge_completion(&a, 1_000_000).await;
        assert!(l.admit_tokens(&t, 5).await.is_err());
    }

    #[tokio::test]
    async fn a_spent_monthly_budget_refuses_until_next_month() {
        let l = Limiters::default();
        let mut t = tenant(None, None, None);
        t.limits.budget_nano_usd_per_month = std::num::NonZeroU64::new(20_000_000); // $0.02
        assert!(l.admit_request(&t).await.is_ok());
        l.charge("a", 0.015);
        assert!(l.admit_request(&t).await.is_ok(), "$0.015 of $0.02 spent");
        l.charge("a", 0.01);
        let r = l.admit_request(&t).await.err().expect("$0.025 spent");
        assert!(r.error.to_string().contains("this month"), "{}", r.error);
        assert_eq!(r.error.status(), 429);
        let wait = r.error.retry_after().expect("until the 1st");
        assert!((1..=31 * 86_400).contains(&wait), "{wait}");
        let u = l.usage("a").expect("usage");
        assert!(
            (u.spent_this_month_usd - 0.025).abs() < 1e-9,
            "{}",
            u.spent_this_month_usd
        );
        let (month, left) = this_month();
        assert!(month >= (2026 - 1970) * 12, "{month}");
        assert!(left <= Duration::from_secs(31 * 86_400));
    }
}
