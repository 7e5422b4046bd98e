//! How attempts connect to a pool's workers (`pools.X.upstream` in the rules): HTTPS with
//! the pool's CA and client certificate, and the credentials the router sends. Built once
//! per rule set ([`for_pools`]: certificates parsed at reload, not per request) and read by
//! every attempt ([`crate::attempt::peer`]).
//!
//! The client's own `Authorization` never reaches a worker: the router sends the pool's
//! key, or none.

use std::collections::HashMap;
use std::sync::Arc;

use pingora::protocols::tls::CaType;
use pingora::utils::tls::{CertKey, WrappedX509};
use routing_rules::Pool;

/// One pool's connection settings.
#[derive(Default)]
pub struct PoolConn {
    pub tls: Option<TlsConn>,
    /// `Authorization` sent with every request to the pool's workers.
    pub authorization: Option<http::HeaderValue>,
    /// Keeps the pool's pooled connections its own: pingora reuses a connection for any
    /// peer with the same address, name and client certificate, but not by CA, so two pools
    /// at one address with different CAs would otherwise share connections.
    pub group: u64,
}

/// HTTPS to a pool's workers.
pub struct TlsConn {
    /// The CA the workers' certificates must chain to (`None`: the system's roots).
    pub ca: Option<Arc<CaType>>,
    /// The router's client certificate and key, for workers that want mTLS.
    pub client: Option<Arc<CertKey>>,
    /// The name checked on the workers' certificates (default: the worker's host name or
    /// address).
    pub server_name: Option<String>,
}

/// Every pool's settings, by pool name; pools without `upstream` are absent.
pub fn for_pools(pools: &[Pool]) -> HashMap<Arc<str>, Arc<PoolConn>> {
    pools
        .iter()
        .filter_map(|p| {
            let u = p.upstream.as_ref()?;
            let tls = u.tls.as_ref().map(|t| TlsConn {
                ca: (!t.ca_der.is_empty()).then(|| {
                    let certs: Vec<WrappedX509> = t
                        .ca_der
                        .iter()
                        .map(|der| WrappedX509::new(der.clone(), pingora::utils::tls::parse_x509))
                        .collect();
                    Arc::from(certs.into_boxed_slice())
                }),
                client: t
                    .client
                    .as_ref()
                    .map(|(chain, key)| Arc::new(CertKey::new(chain.clone(), key.clone()))),
                server_name: t.server_name.clone(),
            });
            // checked at load: printable ASCII
            let authorization = u
                .authorization
                .as_deref()
                .and_then(|a| http::HeaderValue::from_str(a).ok())
                .map(|mut v| {
                    v.set_sensitive(true);
                    v
                });
            let group = {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                p.name.hash(&mut h);
                h.finish()
            };
            Some((
                p.name.clone(),
                Arc::new(PoolConn {
                    tls,
                    authorization,
                    group,
                }),
            ))
        })
        .collect()
}
