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
//! Limits are this router's own: replicas do not share them yet.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use routing_rules::{CompiledRules, Limits, Tenant, key_digest};

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

/// One tenant's limiters.
struct State {
    limits: Limits,
    requests: Option<DefaultDirectRateLimiter>,
    tokens: Option<DefaultDirectRateLimiter>,
    in_flight: AtomicU32,
    /// Spent today (`day`, days since the epoch, UTC), in billionths of a dollar.
    spent_nano_usd: AtomicU64,
    day: AtomicU64,
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
            per_minute.map(|n| RateLimiter::direct(Quota::per_minute(n)))
        };
        Self {
            limits,
            requests: bucket(limits.requests_per_minute),
            tokens: bucket(limits.tokens_per_minute),
            in_flight: AtomicU32::new(0),
            spent_nano_usd: AtomicU64::new(0),
            day: AtomicU64::new(today().0),
        }
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
}

/// A request let in: counted in its tenant's requests in flight until dropped.
pub struct Admitted(Arc<State>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A tenant's use of its limits now (`GET /admin/tenants`).
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub in_flight: u32,
    /// Counted for tenants with a budget only.
    pub spent_today_usd: f64,
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

    /// Lets a request in, or says why not, before its body is read: its tenant's requests
    /// in flight (nothing spent when refused), then requests per minute.
    pub fn admit_request(&self, tenant: &Tenant) -> Result<Admitted, Refused> {
        let state = self.state(tenant);
        if let Some(budget) = state.limits.budget_nano_usd_per_day {
            let (day, left) = today();
            if state.spent_today(day).load(Ordering::Relaxed) >= budget.get() {
                return Err(Refused {
                    error: ProxyError::QuotaExceeded {
                        tenant: tenant.name.to_string(),
                        budget_usd: budget.get() as f64 / 1e9,
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
        // from here on, a refusal gives the in-flight slot back
        let admitted = Admitted(Arc::clone(&state));
        if let (Some(bucket), Some(limit)) = (&state.requests, state.limits.requests_per_minute)
            && let Err(not_until) = bucket.check()
        {
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            return Err(refused(tenant.name.to_string(), "requests", limit, wait));
        }
        Ok(admitted)
    }

    /// What `tenant` uses now, if it has sent a request since the router started.
    pub fn usage(&self, tenant: &str) -> Option<Usage> {
        let map = self.by_tenant.lock().unwrap_or_else(|p| p.into_inner());
        let s = map.get(tenant)?;
        Some(Usage {
            in_flight: s.in_flight.load(Ordering::Relaxed),
            spent_today_usd: s.spent_today(today().0).load(Ordering::Relaxed) as f64 / 1e9,
        })
    }

    /// Charges a finished request's cost to its tenant's budget for today.
    pub fn charge(&self, tenant: &str, usd: f64) {
        let state = {
            let map = self.by_tenant.lock().unwrap_or_else(|p| p.into_inner());
            map.get(tenant).cloned()
        };
        if let Some(s) = state
            && s.limits.budget_nano_usd_per_day.is_some()
            && usd.is_finite()
            && usd > 0.0
        {
            let nano = (usd * 1e9).ceil() as u64;
            s.spent_today(today().0).fetch_add(nano, Ordering::Relaxed);
        }
    }

    /// Spends `prompt_tokens` of the tenant's tokens per minute, once the prompt is
    /// counted, or says why not (a request refused here has spent its request).
    pub fn admit_tokens(&self, tenant: &Tenant, prompt_tokens: u64) -> Result<(), Refused> {
        let state = self.state(tenant);
        let (Some(bucket), Some(limit)) = (&state.tokens, state.limits.tokens_per_minute) else {
            return Ok(());
        };
        let n = u32::try_from(prompt_tokens.max(1)).unwrap_or(u32::MAX);
        let n = NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        match bucket.check_n(n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                Err(refused(tenant.name.to_string(), "tokens", limit, wait))
            }
            Err(_) => Err(Refused {
                error: ProxyError::TooLargeForTenant {
                    tenant: tenant.name.to_string(),
                    tokens: prompt_tokens,
                    limit: limit.get(),
                },
                headers: ratelimit_headers("tokens", limit, Duration::ZERO),
            }),
        }
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
            },
        }
    }

    #[test]
    fn requests_per_minute_allows_the_burst_then_refuses_with_a_wait() {
        let l = Limiters::default();
        let t = tenant(Some(3), None, None);
        for _ in 0..3 {
            assert!(l.admit_request(&t).is_ok());
        }
        let r = l.admit_request(&t).err().expect("the fourth is refused");
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

    #[test]
    fn tokens_per_minute_counts_prompt_tokens_and_refuses_a_prompt_larger_than_the_minute() {
        let l = Limiters::default();
        let t = tenant(None, Some(1000), None);
        assert!(l.admit_tokens(&t, 600).is_ok());
        let r = l.admit_tokens(&t, 600).expect_err("1200 > 1000");
        assert!(r.error.to_string().contains("on tokens"), "{}", r.error);
        let r = l.admit_tokens(&t, 5000).expect_err("never fits");
        assert!(matches!(r.error, ProxyError::TooLargeForTenant { .. }));
    }

    #[test]
    fn concurrency_is_released_when_a_request_ends_and_changed_limits_start_fresh() {
        let l = Limiters::default();
        let t = tenant(None, None, Some(2));
        let a = l.admit_request(&t).ok();
        let b = l.admit_request(&t).ok();
        assert!(a.is_some() && b.is_some());
        assert!(l.admit_request(&t).is_err());
        drop(a);
        assert!(l.admit_request(&t).is_ok());
        // a reload that changes the limit: a fresh state
        let wider = tenant(None, None, Some(5));
        assert!(l.admit_request(&wider).is_ok());
    }

    #[test]
    fn a_spent_budget_refuses_until_tomorrow() {
        let l = Limiters::default();
        let mut t = tenant(None, None, None);
        t.limits.budget_nano_usd_per_day = std::num::NonZeroU64::new(10_000_000); // $0.01
        assert!(l.admit_request(&t).is_ok());
        l.charge("a", 0.004);
        assert!(l.admit_request(&t).is_ok(), "$0.004 of $0.01 spent");
        l.charge("a", 0.007);
        let r = l.admit_request(&t).err().expect("$0.011 spent");
        assert!(matches!(r.error, ProxyError::QuotaExceeded { .. }));
        let wait = r.error.retry_after().expect("until midnight");
        assert!((1..=86_400).contains(&wait), "{wait}");
        assert_eq!(reason(&r.error), "budget");
    }
}
