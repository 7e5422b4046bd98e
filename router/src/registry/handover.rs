//! Zero-downtime upgrades: the old process exports its workers' leases, the new one
//! imports them, so routing has no gap and workers need not register again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::{Lease, Registry, ServedModel, Worker, WorkerState};

/// A registered worker's lease as the router hands it to the process replacing it
/// (`switchyard serve --upgrade`), so the workers keep their leases across the upgrade.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportedLease {
    pub lease_id: String,
    pub id: String,
    pub pool: String,
    pub address: SocketAddr,
    pub models: Vec<ServedModel>,
    pub device: String,
    /// Empty when exported by a router from before this field.
    #[serde(default)]
    pub engine: String,
    pub draining: bool,
    pub reported_load: u32,
    pub registered_unix: u64,
    /// 0 when exported by a router from before this field.
    #[serde(default)]
    pub max_concurrency: u32,
}

impl Registry {
    /// Every registered worker's lease (static workers come from the rules file instead).
    pub fn export(&self) -> Vec<ExportedLease> {
        let leases = self.leases();
        let mut list: Vec<ExportedLease> = leases
            .iter()
            .map(|(lease_id, l)| {
                let w = &l.worker;
                ExportedLease {
                    lease_id: lease_id.clone(),
                    id: w.id.clone(),
                    pool: w.pool.to_string(),
                    address: w.address,
                    models: w.models.clone(),
                    device: w.device.clone(),
                    engine: w.engine.clone(),
                    draining: w.state == WorkerState::Draining,
                    reported_load: w.reported_load.load(Ordering::Relaxed),
                    registered_unix: w.registered_unix,
                    max_concurrency: w.max_concurrency.load(Ordering::Relaxed),
                }
            })
            .collect();
        list.sort_by(|a, b| a.id.cmp(&b.id));
        list
    }

    /// Takes over leases exported by the process this one replaces: the workers' next
    /// heartbeats renew them here, with no re-registration and no gap in routing. Each
    /// lease starts a fresh TTL.
    pub fn import(&self, exported: Vec<ExportedLease>) -> usize {
        let mut leases = self.leases();
        let mut known: std::collections::HashSet<String> =
            leases.values().map(|l| l.worker.id.clone()).collect();
        let now = Instant::now();
        let mut n = 0;
        for e in exported {
            if !known.insert(e.id.clone()) {
                continue;
            }
            let mut worker = Worker::registered(
                e.id,
                e.pool.into(),
                e.address,
                e.models,
                e.device,
                e.engine,
                e.registered_unix,
            );
            if e.draining {
                worker.state = WorkerState::Draining;
            }
            worker.record_report(e.reported_load, 0, 0.0, 0.0);
            worker
                .max_concurrency
                .store(e.max_concurrency, Ordering::Relaxed);
            let worker = Arc::new(worker);
            leases.insert(
                e.lease_id,
                Lease {
                    worker,
                    last_heartbeat: now,
                },
            );
            n += 1;
        }
        self.publish(&leases);
        n
    }

    /// Restarts every lease's TTL now (the control plane starting after an upgrade's
    /// hand-over, which may come seconds after the leases were imported).
    pub fn renew_all(&self) {
        let now = Instant::now();
        for l in self.leases().values_mut() {
            l.last_heartbeat = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::tests::{addr, served_m};
    use super::*;

    fn other() -> SocketAddr {
        "127.0.0.1:10".parse().unwrap()
    }

    /// What an upgrade hands over: the new process routes to the same workers at once and
    /// their next heartbeats (with the old lease ids) renew the leases there.
    #[test]
    fn exported_leases_are_routable_and_renewable_in_the_next_process() {
        let old = Registry::new(Duration::from_millis(100), Duration::from_millis(300));
        let live = old
            .register(
                "a".into(),
                Arc::from("p"),
                addr(),
                served_m(),
                "cpu".into(),
                "switchyard".into(),
            )
            .unwrap();
        let draining = old
            .register(
                "b".into(),
                Arc::from("p"),
                other(),
                served_m(),
                "cpu".into(),
                "switchyard".into(),
            )
            .unwrap();
        old.heartbeat(&live, &crate::registry::Heartbeat::running(7))
            .unwrap();
        old.drain(&draining).unwrap();
        let exported = serde_json::to_string(&old.export()).unwrap();

        let new = Registry::new(Duration::from_millis(100), Duration::from_millis(300));
        let imported: Vec<ExportedLease> = serde_json::from_str(&exported).unwrap();
        assert_eq!(new.import(imported.clone()), 2);
        let snap = new.snapshot();
        let ids: Vec<&str> = snap.routable("p", "m").map(|w| w.id.as_str()).collect();
        assert_eq!(ids, ["a"], "the draining worker stays out of routing");
        assert_eq!(snap.routable("p", "m").next().unwrap().load(), 7);
        assert_eq!(
            new.heartbeat(&live, &crate::registry::Heartbeat::running(1)),
            Ok(false)
        );
        assert_eq!(
            new.heartbeat(&draining, &crate::registry::Heartbeat::running(1)),
            Ok(true),
            "still told to drain"
        );
        // importing twice (a retried upgrade) adds nothing
        assert_eq!(new.import(imported), 0);
        assert_eq!(new.export().len(), 2);
        // unrenewed, the leases expire as any other
        assert_eq!(new.expire(Instant::now() + Duration::from_secs(1)).len(), 2);
    }
}
