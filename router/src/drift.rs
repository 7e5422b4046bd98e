//! Drift: per tenant, the shape of its traffic now against its own recent past, so that a
//! tenant that suddenly sends 30k-token prompts (or switches models, or starts sending
//! images) is seen before the bill arrives.
//!
//! Each tenant's requests are counted into fixed windows (`--drift-window-s`, 5 min by
//! default) by four features: prompt tokens and `max_tokens` (powers of two), modalities
//! (text, image, audio) and model. When a window ends, each feature's distribution in it is
//! compared with the distribution over the windows before it (the baseline,
//! `--drift-baseline-windows`, 12 by default: the hour before) by the population stability
//! index, `PSI = Σ (pᵢ − qᵢ) · ln(pᵢ / qᵢ)` over the buckets (each share smoothed so an
//! empty bucket counts). Conventionally, below 0.1 is no shift, 0.1–0.25 a moderate one,
//! above 0.25 a significant one. A window with fewer than [`MIN_RECENT`] requests, or a
//! baseline with fewer than [`MIN_BASELINE`], gives no index (too few to say).
//!
//! Prompt tokens are the router's count: exact where a rule's threshold needed it, else the
//! classifier's lower bound, which follows the text's length; a shift in prompt sizes shows
//! either way. Tenants are the `tenant` label's values (configured tenants, `anonymous`,
//! `other`), so the index adds no series per client key.
//!
//! Exported as `switchyard_router_drift_psi{tenant, feature}`, and at `/admin/drift` with
//! the distributions compared.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus::GaugeVec;
use routing_rules::{Modality, RequestFeatures};
use serde::Serialize;

/// Requests a window needs for an index.
pub const MIN_RECENT: u64 = 20;
/// Requests the baseline needs for an index.
pub const MIN_BASELINE: u64 = 50;

/// The features compared, in the order [`Counts`] holds them.
pub const FEATURES: [&str; 4] = ["prompt_tokens", "max_tokens", "modality", "model"];

/// One window's counts for one tenant: bucket → requests, per feature.
#[derive(Debug, Clone, Default)]
struct Counts {
    requests: u64,
    buckets: [BTreeMap<String, u64>; 4],
}

impl Counts {
    fn add(&mut self, other: &Counts) {
        self.requests += other.requests;
        for (mine, theirs) in self.buckets.iter_mut().zip(&other.buckets) {
            for (k, v) in theirs {
                *mine.entry(k.clone()).or_default() += v;
            }
        }
    }
}

/// `n`'s power-of-two bucket: `0`, `1`, `2-3`, `4-7`, … (as the bucket's lower bound).
fn pow2_bucket(n: u64) -> &'static str {
    static NAMES: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
        std::iter::once("0".to_string())
            .chain((0..64).map(|b| (1u64 << b).to_string()))
            .collect()
    });
    let i = if n == 0 {
        0
    } else {
        64 - n.leading_zeros() as usize
    };
    NAMES.get(i).map_or("0", String::as_str)
}

/// The population stability index of `recent` against `baseline` over their buckets'
/// union; each share is smoothed with half a request so that an empty bucket counts.
pub fn psi(recent: &BTreeMap<String, u64>, baseline: &BTreeMap<String, u64>) -> f64 {
    let keys: std::collections::BTreeSet<&String> = recent.keys().chain(baseline.keys()).collect();
    let k = keys.len() as f64;
    let total = |m: &BTreeMap<String, u64>| m.values().sum::<u64>() as f64 + 0.5 * k;
    let (r_total, b_total) = (total(recent), total(baseline));
    keys.into_iter()
        .map(|key| {
            let p = (recent.get(key).copied().unwrap_or(0) as f64 + 0.5) / r_total;
            let q = (baseline.get(key).copied().unwrap_or(0) as f64 + 0.5) / b_total;
            (p - q) * (p / q).ln()
        })
        .sum()
}

#[derive(Debug)]
struct Tenant {
    /// The window being counted, and when it began.
    current: Counts,
    started: Instant,
    /// Ended windows, newest last (the baseline), at most `baseline_windows`.
    past: VecDeque<Counts>,
    /// The index of the last ended window against the windows before it, per feature.
    last: [Option<f64>; 4],
    /// That window's and its baseline's counts, for `/admin/drift`.
    last_compared: Option<(Counts, Counts)>,
}

/// Drift of every tenant's traffic (see the module docs).
pub struct Drift {
    window: Duration,
    baseline_windows: usize,
    tenants: Mutex<HashMap<String, Tenant>>,
    gauge: GaugeVec,
}

/// One tenant's drift, as `/admin/drift` shows it.
#[derive(Debug, Serialize)]
pub struct TenantReport {
    pub tenant: String,
    /// Requests in the window being counted now.
    pub current_requests: u64,
    /// The last ended window compared with its baseline: index per feature (`null`: too
    /// few requests to say), the requests in each, and the distributions compared.
    pub psi: BTreeMap<&'static str, Option<f64>>,
    pub window_requests: u64,
    pub baseline_requests: u64,
    pub window: BTreeMap<&'static str, BTreeMap<String, u64>>,
    pub baseline: BTreeMap<&'static str, BTreeMap<String, u64>>,
}

impl Drift {
    pub fn new(window: Duration, baseline_windows: usize, gauge: GaugeVec) -> Self {
        Self {
            window: window.max(Duration::from_millis(100)),
            baseline_windows: baseline_windows.max(1),
            tenants: Mutex::new(HashMap::new()),
            gauge,
        }
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// Counts one request of `tenant` (its label) for model label `model`.
    pub fn record(&self, tenant: &str, model: &str, f: &RequestFeatures) {
        let mut tenants = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        if !tenants.contains_key(tenant) {
            tenants.insert(
                tenant.to_string(),
                Tenant {
                    current: Counts::default(),
                    started: Instant::now(),
                    past: VecDeque::new(),
                    last: [None; 4],
                    last_compared: None,
                },
            );
        }
        let Some(t) = tenants.get_mut(tenant) else {
            return;
        };
        let c = &mut t.current;
        c.requests += 1;
        // a bucket seen before is counted without allocating (the common case)
        let mut bump = |i: usize, key: &str| match c.buckets[i].get_mut(key) {
            Some(n) => *n += 1,
            None => {
                c.buckets[i].insert(key.to_string(), 1);
            }
        };
        bump(0, pow2_bucket(f.prompt_tokens));
        bump(1, pow2_bucket(f.max_tokens));
        for (m, name) in [
            (Modality::Text, "text"),
            (Modality::Image, "image"),
            (Modality::Audio, "audio"),
        ] {
            if f.modalities.contains(m) {
                bump(2, name);
            }
        }
        bump(3, model);
    }

    /// Ends the windows whose time is up: each is compared with its baseline (the gauges
    /// are set) and joins the baseline. Called every second or so.
    pub fn tick(&self) {
        let mut tenants = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        for (name, t) in tenants.iter_mut() {
            while now.duration_since(t.started) >= self.window {
                t.started += self.window;
                let ended = std::mem::take(&mut t.current);
                let mut baseline = Counts::default();
                for w in &t.past {
                    baseline.add(w);
                }
                let enough = ended.requests >= MIN_RECENT && baseline.requests >= MIN_BASELINE;
                for (i, feature) in FEATURES.iter().enumerate() {
                    let index = enough.then(|| psi(&ended.buckets[i], &baseline.buckets[i]));
                    t.last[i] = index;
                    let g = self.gauge.with_label_values(&[name.as_str(), feature]);
                    match index {
                        Some(v) => g.set(v),
                        None => g.set(0.0),
                    }
                }
                t.last_compared = Some((ended.clone(), baseline));
                t.past.push_back(ended);
                while t.past.len() > self.baseline_windows {
                    t.past.pop_front();
                }
            }
        }
    }

    /// Every tenant's drift, by tenant.
    pub fn report(&self) -> Vec<TenantReport> {
        let tenants = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<TenantReport> = tenants
            .iter()
            .map(|(name, t)| {
                let by_feature = |c: Option<&Counts>| {
                    FEATURES
                        .iter()
                        .enumerate()
                        .map(|(i, f)| (*f, c.map(|c| c.buckets[i].clone()).unwrap_or_default()))
                        .collect()
                };
                let (window, baseline) = match &t.last_compared {
                    Some((w, b)) => (Some(w), Some(b)),
                    None => (None, None),
                };
                TenantReport {
                    tenant: name.clone(),
                    current_requests: t.current.requests,
                    psi: FEATURES.iter().copied().zip(t.last).collect(),
                    window_requests: window.map_or(0, |w| w.requests),
                    baseline_requests: baseline.map_or(0, |b| b.requests),
                    window: by_feature(window),
                    baseline: by_feature(baseline),
                }
            })
            .collect();
        out.sort_by(|a, b| a.tenant.cmp(&b.tenant));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn psi_is_zero_for_the_same_shape_and_large_for_a_shift() {
        let base = counts(&[("64", 600), ("128", 400)]);
        let same = counts(&[("64", 60), ("128", 40)]);
        assert!(psi(&same, &base) < 0.01, "{}", psi(&same, &base));
        let shifted = counts(&[("16384", 100)]);
        assert!(psi(&shifted, &base) > 1.0, "{}", psi(&shifted, &base));
        let moderate = counts(&[("64", 45), ("128", 55)]);
        let m = psi(&moderate, &base);
        assert!(m > 0.01 && m < 0.25, "{m}");
    }

    #[test]
    fn buckets_are_powers_of_two() {
        assert_eq!(pow2_bucket(0), "0");
        assert_eq!(pow2_bucket(1), "1");
        assert_eq!(pow2_bucket(3), "2");
        assert_eq!(pow2_bucket(4), "4");
        assert_eq!(pow2_bucket(30_000), "16384");
    }

    fn gauge() -> GaugeVec {
        GaugeVec::new(prometheus::Opts::new("t", "t"), &["tenant", "feature"]).unwrap()
    }

    #[test]
    fn a_tenant_shifting_its_prompts_drifts_and_another_does_not() {
        let drift = Drift::new(Duration::from_millis(100), 4, gauge());
        let req = |prompt_tokens| RequestFeatures {
            prompt_tokens,
            max_tokens: 64,
            modalities: routing_rules::ModalitySet::TEXT,
            ..Default::default()
        };
        // three windows of the usual traffic, then a window where a's prompts grow
        for w in 0..4 {
            for i in 0..30u64 {
                let a = if w == 3 { 30_000 } else { 100 + i };
                drift.record("a", "m", &req(a));
                drift.record("b", "m", &req(100 + i));
            }
            std::thread::sleep(Duration::from_millis(110));
            drift.tick();
        }
        let r = drift.report();
        let get = |t: &str, f: &str| r.iter().find(|x| x.tenant == t).unwrap().psi[f];
        assert!(get("a", "prompt_tokens").unwrap() > 0.25, "{r:?}");
        assert!(get("b", "prompt_tokens").unwrap() < 0.1, "{r:?}");
        assert!(get("a", "max_tokens").unwrap() < 0.1, "{r:?}");
        assert!(get("a", "model").unwrap() < 0.1, "{r:?}");
        let g = drift.gauge.with_label_values(&["a", "prompt_tokens"]).get();
        assert!(g > 0.25, "{g}");
    }

    #[test]
    fn too_few_requests_give_no_index() {
        let drift = Drift::new(Duration::from_millis(100), 4, gauge());
        drift.record("a", "m", &RequestFeatures::default());
        std::thread::sleep(Duration::from_millis(110));
        drift.tick();
        let r = drift.report();
        assert_eq!(r[0].psi["prompt_tokens"], None);
        assert_eq!(r[0].window_requests, 1);
    }
}
