//! The cost ledger: what each tenant, model and pool cost, minute by minute over the last
//! day, from the router's own accounting (the same as `switchyard_router_cost_usd_total`:
//! a pool's price per hour × each attempt's share of its worker's time). It answers
//! `GET /admin/cost` and `switchyard cost`: "what did each tenant / model / pool cost over
//! the last hour, and what would the same traffic have cost all on the reference pool
//! (by default the dearest on-demand pool, e.g. H100 on-demand)".
//!
//! ## The baseline
//!
//! What a request would have cost on the reference pool is estimated from that pool's own
//! measured rate when it served traffic in the window: its worker-seconds per token
//! (prompt + completion) × the request's tokens × its price (`basis: "tokens"`). When it
//! served nothing in the window, the request's own worker time is priced at the reference
//! pool's price (`basis: "worker_seconds"`): an upper bound when the reference hardware is
//! faster than the hardware that served it. The ledger lives in memory: a restarted
//! router starts a new one (Prometheus keeps the long history).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// One minute's totals for one (tenant, model, pool).
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    /// Requests this pool answered.
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Share of the pool's workers' time, failed attempts included.
    pub worker_seconds: f64,
    pub cost_usd: f64,
}

impl Entry {
    fn add(&mut self, o: &Entry) {
        self.requests += o.requests;
        self.prompt_tokens += o.prompt_tokens;
        self.completion_tokens += o.completion_tokens;
        self.worker_seconds += o.worker_seconds;
        self.cost_usd += o.cost_usd;
    }
}

/// `tenant`, `model`, `pool`: label values (configured names, `anonymous`, `other`), so the
/// ledger's size is bounded by the configuration, never by clients.
type Key = (String, String, String);

/// One minute's totals: tenant → model → pool (nested, so a request's lookup borrows its
/// labels and allocates only for a combination the minute has not seen). Every request
/// charges the ledger, so these maps use hashbrown's `entry_ref` (one hash per level, not a
/// lookup and then another) and its default hasher (foldhash; the keys are configured
/// names, never a client's, so SipHash's resistance to chosen keys buys nothing here).
type Totals =
    hashbrown::HashMap<String, hashbrown::HashMap<String, hashbrown::HashMap<String, Entry>>>;

/// The entry of `(tenant, model, pool)` in `t`, made if new.
fn slot<'t>(t: &'t mut Totals, tenant: &str, model: &str, pool: &str) -> &'t mut Entry {
    t.entry_ref(tenant)
        .or_default()
        .entry_ref(model)
        .or_default()
        .entry_ref(pool)
        .or_default()
}

/// Minutes kept: one day.
const MINUTES: u64 = 24 * 60;

#[derive(Default)]
pub struct Ledger {
    /// `(minute since the epoch, totals)`, oldest first.
    minutes: Mutex<VecDeque<(u64, Totals)>>,
}

/// What one request adds to the ledger.
pub struct Charge<'a> {
    pub tenant: &'a str,
    pub model: &'a str,
    /// The pool that answered (its request and tokens), if one did.
    pub answered_by: Option<&'a str>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Each attempt's pool and share of its worker's time (seconds).
    pub attempts: &'a [(std::sync::Arc<str>, f64)],
}

/// What `seconds` of a worker cost at `price_per_hour`.
pub fn worker_cost(price_per_hour: f64, seconds: f64) -> f64 {
    price_per_hour * seconds / 3600.0
}

impl Ledger {
    /// Adds a request at `minute` (minutes since the Unix epoch); `price` is each pool's
    /// price per hour (a pool no longer configured costs nothing).
    pub fn record(&self, minute: u64, c: &Charge<'_>, price: impl Fn(&str) -> Option<f64>) {
        let Ok(mut minutes) = self.minutes.lock() else {
            return;
        };
        if minutes.back().is_none_or(|(m, _)| *m < minute) {
            minutes.push_back((minute, Totals::default()));
            while minutes.front().is_some_and(|(m, _)| *m + MINUTES <= minute) {
                minutes.pop_front();
            }
        }
        // a clock step back lands in the newest minute
        let Some((_, totals)) = minutes.back_mut() else {
            return;
        };
        let mut add = |pool: &str, e: Entry| {
            slot(totals, c.tenant, c.model, pool).add(&e);
        };
        if let Some(pool) = c.answered_by {
            add(
                pool,
                Entry {
                    requests: 1,
                    prompt_tokens: c.prompt_tokens,
                    completion_tokens: c.completion_tokens,
                    ..Entry::default()
                },
            );
        }
        for (pool, secs) in c.attempts {
            let usd = price(pool).map_or(0.0, |p| worker_cost(p, *secs));
            add(
                pool,
                Entry {
                    worker_seconds: *secs,
                    cost_usd: usd,
                    ..Entry::default()
                },
            );
        }
    }

    /// The totals of the minutes since `from_minute` (inclusive), by key.
    pub fn since(&self, from_minute: u64) -> HashMap<Key, Entry> {
        let mut out: HashMap<Key, Entry> = HashMap::new();
        let Ok(minutes) = self.minutes.lock() else {
            return out;
        };
        for (_, totals) in minutes.iter().filter(|(m, _)| *m >= from_minute) {
            for (t, models) in totals {
                for (m, pools) in models {
                    for (p, e) in pools {
                        let key = (t.clone(), m.clone(), p.clone());
                        out.entry(key).or_default().add(e);
                    }
                }
            }
        }
        out
    }
}

/// Minutes since the Unix epoch, now.
pub fn minute_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 60)
}

/// One row of a report.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Row {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(flatten)]
    pub totals: Entry,
    /// What the same requests would have cost on the reference pool.
    pub baseline_usd: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    pub window_minutes: u64,
    pub baseline_pool: String,
    pub baseline_price_per_hour: f64,
    /// `tokens` (the reference pool's measured worker-seconds per token) or
    /// `worker_seconds` (it served nothing in the window: each request's own time).
    pub basis: String,
    pub rows: Vec<Row>,
    pub total: Row,
    /// `total.baseline_usd - total.cost_usd`.
    pub savings_usd: f64,
}

/// Which of tenant, model, pool a report groups by.
#[derive(Debug, Clone, Copy, Default)]
pub struct By {
    pub tenant: bool,
    pub model: bool,
    pub pool: bool,
}

impl By {
    /// `tenant,model,pool` or any subset, comma-separated.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut by = By::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "tenant" => by.tenant = true,
                "model" => by.model = true,
                "pool" => by.pool = true,
                other => {
                    return Err(format!(
                        "cannot group by `{other}`: use tenant, model and/or pool"
                    ));
                }
            }
        }
        Ok(by)
    }
}

/// The report over `totals` (one window's), grouped `by`, against `baseline` (a pool's
/// name and price per hour).
pub fn report(
    totals: &HashMap<Key, Entry>,
    window_minutes: u64,
    by: By,
    baseline: (&str, f64),
) -> Report {
    let (base_pool, price) = baseline;
    // the reference pool's measured worker-seconds per token in the window
    let (base_secs, base_tokens) = totals.iter().filter(|((_, _, p), _)| p == base_pool).fold(
        (0.0, 0u64),
        |(s, t), (_, e)| {
            (
                s + e.worker_seconds,
                t + e.prompt_tokens + e.completion_tokens,
            )
        },
    );
    let per_token = (base_tokens > 0 && base_secs > 0.0).then(|| base_secs / base_tokens as f64);
    let baseline_of = |e: &Entry| match per_token {
        Some(spt) => (e.prompt_tokens + e.completion_tokens) as f64 * spt * price / 3600.0,
        None => e.worker_seconds * price / 3600.0,
    };
    // (tenant, model, pool), each `None` when not grouped by → (totals, baseline)
    type Group<'k> = (Option<&'k str>, Option<&'k str>, Option<&'k str>);
    let mut grouped: HashMap<Group<'_>, (Entry, f64)> = HashMap::new();
    let mut total = (Entry::default(), 0.0);
    for ((t, m, p), e) in totals {
        // a request's baseline is charged once, with its tokens (on the answering pool's
        // row); failed attempts' time is cost the reference pool would not have had
        let b = if e.requests > 0 { baseline_of(e) } else { 0.0 };
        let key = (
            by.tenant.then_some(t.as_str()),
            by.model.then_some(m.as_str()),
            by.pool.then_some(p.as_str()),
        );
        let g = grouped.entry(key).or_default();
        g.0.add(e);
        g.1 += b;
        total.0.add(e);
        total.1 += b;
    }
    let mut rows: Vec<Row> = grouped
        .into_iter()
        .map(|((t, m, p), (e, b))| Row {
            tenant: t.map(str::to_string),
            model: m.map(str::to_string),
            pool: p.map(str::to_string),
            totals: e,
            baseline_usd: b,
        })
        .collect();
    rows.sort_by(|a, b| b.totals.cost_usd.total_cmp(&a.totals.cost_usd));
    Report {
        window_minutes,
        baseline_pool: base_pool.to_string(),
        baseline_price_per_hour: price,
        basis: if per_token.is_some() {
            "tokens"
        } else {
            "worker_seconds"
        }
        .to_string(),
        savings_usd: total.1 - total.0.cost_usd,
        total: Row {
            tenant: None,
            model: None,
            pool: None,
            totals: total.0,
            baseline_usd: total.1,
        },
        rows,
    }
}

/// The report as a plain table.
pub fn table(r: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "last {} min · baseline: everything on {} (${:.2}/h, by {})",
        r.window_minutes, r.baseline_pool, r.baseline_price_per_hour, r.basis
    );
    let _ = writeln!(
        out,
        "{:<16} {:<16} {:<16} {:>9} {:>12} {:>12} {:>12} {:>12}",
        "tenant", "model", "pool", "requests", "tokens", "cost $", "baseline $", "saved $"
    );
    let dash = |o: &Option<String>| o.clone().unwrap_or_else(|| "*".into());
    for row in r.rows.iter().chain(std::iter::once(&r.total)) {
        let e = &row.totals;
        let _ = writeln!(
            out,
            "{:<16} {:<16} {:<16} {:>9} {:>12} {:>12.6} {:>12.6} {:>12.6}",
            dash(&row.tenant),
            dash(&row.model),
            dash(&row.pool),
            e.requests,
            e.prompt_tokens + e.completion_tokens,
            e.cost_usd,
            row.baseline_usd,
            row.baseline_usd - e.cost_usd,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn charge<'a>(
        tenant: &'a str,
        pool: &'a str,
        tokens: u64,
        attempts: &'a [(std::sync::Arc<str>, f64)],
    ) -> Charge<'a> {
        Charge {
            tenant,
            model: "m",
            answered_by: Some(pool),
            prompt_tokens: tokens,
            completion_tokens: 0,
            attempts,
        }
    }

    /// Prices per hour: cpu $0.20, spot $0.36, h100 $7.20.
    fn price(pool: &str) -> Option<f64> {
        match pool {
            "cpu" => Some(0.2),
            "spot" => Some(0.36),
            "h100" => Some(7.2),
            _ => None,
        }
    }

    fn at(pool: &str, secs: f64) -> (std::sync::Arc<str>, f64) {
        (pool.into(), secs)
    }

    #[test]
    fn the_ledger_keeps_a_day_of_minutes_and_sums_a_window() {
        let l = Ledger::default();
        l.record(100, &charge("a", "cpu", 10, &[at("cpu", 36.0)]), price);
        l.record(101, &charge("a", "cpu", 10, &[at("cpu", 36.0)]), price);
        l.record(101, &charge("b", "h100", 10, &[at("h100", 3.6)]), price);
        let all = l.since(0);
        let a = all[&("a".into(), "m".into(), "cpu".into())];
        assert_eq!(a.requests, 2);
        assert!((a.cost_usd - 0.004).abs() < 1e-12, "{a:?}");
        assert_eq!(l.since(101).len(), 2);
        assert_eq!(
            l.since(101)[&("a".into(), "m".into(), "cpu".into())].requests,
            1
        );
        // a day later the first minutes are gone
        l.record(100 + MINUTES, &charge("a", "cpu", 1, &[]), price);
        let later = l.since(0);
        assert_eq!(later[&("a".into(), "m".into(), "cpu".into())].requests, 2);
    }

    #[test]
    fn the_baseline_uses_the_reference_pools_measured_rate_or_else_worker_time() {
        let l = Ledger::default();
        // cpu: 100 tokens, 18 s of worker time at $0.20/h ($0.001); a failed spot attempt
        // first (1 s at $0.36/h: $0.0001)
        l.record(
            5,
            &charge("a", "cpu", 100, &[at("spot", 1.0), at("cpu", 18.0)]),
            price,
        );
        // h100: 1000 tokens in 2 s at $7.20/h → 0.002 s per token
        l.record(5, &charge("b", "h100", 1000, &[at("h100", 2.0)]), price);
        let r = report(&l.since(0), 60, By::parse("tenant").unwrap(), ("h100", 7.2));
        assert_eq!(r.basis, "tokens");
        let a = r
            .rows
            .iter()
            .find(|r| r.tenant.as_deref() == Some("a"))
            .unwrap();
        // 100 tokens × 0.002 s × $7.2/h
        assert!(
            (a.baseline_usd - 100.0 * 0.002 * 7.2 / 3600.0).abs() < 1e-12,
            "{a:?}"
        );
        assert!((a.totals.cost_usd - 0.0011).abs() < 1e-12);
        assert_eq!(a.pool, None, "grouped by tenant only");
        assert!((r.savings_usd - (r.total.baseline_usd - r.total.totals.cost_usd)).abs() < 1e-15);

        // no h100 traffic: each request's own worker time at the h100 price
        let l = Ledger::default();
        l.record(5, &charge("a", "cpu", 100, &[at("cpu", 10.0)]), price);
        let r = report(&l.since(0), 60, By::default(), ("h100", 7.2));
        assert_eq!(r.basis, "worker_seconds");
        assert!((r.total.baseline_usd - 10.0 * 7.2 / 3600.0).abs() < 1e-12);
        assert!(table(&r).contains("h100"));
        assert!(By::parse("tenant,nope").is_err());
    }
}
