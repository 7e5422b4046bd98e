//! Tenant limits shared by every router replica, kept in Redis (as Envoy's global rate-limit
//! service and LiteLLM keep theirs): `--limits-redis redis://host:6379`.
//!
//! Requests and tokens per minute are GCRA buckets evaluated inside Redis by one Lua
//! script per check ([`GCRA`]), on Redis's own clock: however many routers take from a
//! tenant's bucket, its combined rate stays within the limit (a full minute's worth may
//! come at once, then the bucket refills evenly, as the local buckets do). A bucket's key
//! names its limit, so a reload that changes the limit starts a fresh bucket.
//!
//! Redis never takes requests down with it. A check that fails or takes longer than
//! [`TIMEOUT`] is decided by the router's local bucket instead (each router then enforces
//! the whole limit on its own), the store is skipped for [`BACKOFF`] so requests do not
//! wait on it, and `switchyard_router_limits_store_up` drops to 0 while
//! `switchyard_router_limits_local_decisions_total` counts the checks decided locally.
//! Requests in flight and daily budgets stay per router.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use redis::aio::ConnectionManager;

/// Longest a check waits for Redis before the local bucket decides.
pub const TIMEOUT: Duration = Duration::from_millis(100);
/// How long the store is skipped after it failed.
pub const BACKOFF: Duration = Duration::from_secs(1);

/// GCRA on Redis's clock. `KEYS[1]`: the bucket. `ARGV[1]`: microseconds between requests at
/// the steady rate (a minute / the limit); `ARGV[2]`: the bucket's depth in microseconds (a
/// minute); `ARGV[3]`: how much to take; `ARGV[4]`: 1 to take it even when it does not fit
/// (a charge after the fact: the bucket goes into debt). Returns `{0, left}` when taken
/// (`left`: what the bucket still holds), else `{wait, 0}`, the microseconds until it would
/// fit. The bucket holds its theoretical arrival time, in microseconds since 2026-01-01
/// (small enough for a double to hold exactly), and expires once full again.
pub const GCRA: &str = r"
local interval = tonumber(ARGV[1])
local depth = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local force = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = (tonumber(t[1]) - 1767225600) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval * n
local wait = new_tat - depth - now
if wait > 0 and force ~= 1 then return {wait, 0} end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.floor((new_tat - now) / 1000) + 1000)
local left = math.floor((depth + now - new_tat) / interval)
if left < 0 then left = 0 end
return {0, left}
";

pub struct SharedLimits {
    url: String,
    conn: ArcSwapOption<ConnectionManager>,
    script: redis::Script,
    started: Instant,
    /// Until when (milliseconds since `started`) checks skip the store.
    skip_until_ms: AtomicU64,
    up: prometheus::IntGauge,
    local_decisions: prometheus::IntCounter,
}

impl SharedLimits {
    /// The store at `url` (checked now; connected in the background by [`Self::connect`]).
    pub fn new(
        url: &str,
        up: prometheus::IntGauge,
        local_decisions: prometheus::IntCounter,
    ) -> Result<Arc<Self>, String> {
        redis::Client::open(url).map_err(|e| format!("--limits-redis {url}: {e}"))?;
        up.set(0);
        Ok(Arc::new(Self {
            url: url.to_string(),
            conn: ArcSwapOption::empty(),
            script: redis::Script::new(GCRA),
            started: Instant::now(),
            skip_until_ms: AtomicU64::new(0),
            up,
            local_decisions,
        }))
    }

    /// Connects, retrying every second until Redis answers; the connection then reconnects
    /// by itself. Run on the control plane's runtime.
    pub async fn connect(self: Arc<Self>) {
        let Ok(client) = redis::Client::open(self.url.as_str()) else {
            return;
        };
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT));
        loop {
            match ConnectionManager::new_with_config(client.clone(), config.clone()).await {
                Ok(c) => {
                    tracing::info!(url = %self.url, "shared limits: connected to Redis");
                    self.conn.store(Some(Arc::new(c)));
                    self.up.set(1);
                    return;
                }
                Err(e) => {
                    tracing::warn!(url = %self.url, "shared limits: Redis unreachable ({e}); limits are local meanwhile");
                    tokio::time::sleep(BACKOFF).await;
                }
            }
        }
    }

    /// Takes `n` from `tenant`'s `what` bucket of `limit` per minute: `Some(Ok(left))` taken
    /// (`left` still in the bucket), `Some(Err(wait))` not before `wait`, `None` when the
    /// store cannot say (the local bucket decides). `force` takes it even when it does not
    /// fit (the bucket goes into debt).
    pub async fn take(
        &self,
        tenant: &str,
        what: &str,
        limit: u32,
        n: u32,
        force: bool,
    ) -> Option<Result<u32, Duration>> {
        let now_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let conn = self.conn.load_full();
        let Some(conn) = conn.filter(|_| now_ms >= self.skip_until_ms.load(Ordering::Relaxed))
        else {
            self.local_decisions.inc();
            return None;
        };
        let minute_us: u64 = 60_000_000;
        let interval = minute_us.div_ceil(u64::from(limit.max(1)));
        let mut conn = (*conn).clone();
        let mut invocation = self
            .script
            .key(format!("switchyard:limit:{tenant}:{what}:{limit}"));
        invocation
            .arg(interval)
            .arg(minute_us)
            .arg(n)
            .arg(u8::from(force));
        let call = invocation.invoke_async::<(i64, i64)>(&mut conn);
        match tokio::time::timeout(TIMEOUT, call).await {
            Ok(Ok((wait_us, left))) => {
                self.up.set(1);
                Some(if wait_us > 0 {
                    Err(Duration::from_micros(wait_us.unsigned_abs()))
                } else {
                    Ok(u32::try_from(left.max(0)).unwrap_or(u32::MAX))
                })
            }
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".to_string(),
                };
                if self.up.get() == 1 {
                    tracing::warn!(url = %self.url, "shared limits: Redis failed ({why}); limits are local until it answers");
                }
                self.up.set(0);
                let backoff = u64::try_from(BACKOFF.as_millis()).unwrap_or(1000);
                self.skip_until_ms
                    .store(now_ms + backoff, Ordering::Relaxed);
                self.local_decisions.inc();
                None
            }
        }
    }
}
