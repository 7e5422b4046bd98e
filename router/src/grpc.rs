//! The gRPC registry service (`switchyard.registry.v1.Registry`).

use std::net::SocketAddr;
use std::sync::Arc;

use proto::registry_server::Registry as RegistryApi;
use proto::{
    Command, DeregisterRequest, DeregisterResponse, DrainRequest, DrainResponse, HeartbeatRequest,
    HeartbeatResponse, RegisterRequest, RegisterResponse,
};
use routing_rules::RulesStore;
use subtle::ConstantTimeEq;
use tonic::{Request, Response, Status};

use crate::metrics::Metrics;
use crate::registry::{Registry, ServedModel};

pub struct RegistryService {
    pub registry: Arc<Registry>,
    pub rules: Arc<RulesStore>,
    pub token: Option<String>,
    pub metrics: Arc<Metrics>,
    /// Networks a worker's advertised data-plane address must fall in.
    pub allowed_networks: Vec<ipnet::IpNet>,
    /// The TLS layer requires client certificates from the configured CA: a caller that
    /// got this far is authenticated.
    pub mtls: bool,
    /// The router's own listeners: a worker advertising one of them would make the router
    /// forward requests to itself.
    pub own_addresses: Vec<SocketAddr>,
}

/// Whether `address` is one of the router's own listeners (`own`, where an unspecified
/// listener address stands for every local one: loopback included).
pub fn is_own(own: &[SocketAddr], address: SocketAddr) -> bool {
    own.iter().any(|o| {
        o.port() == address.port()
            && (o.ip() == address.ip()
                || (o.ip().is_unspecified()
                    && (address.ip().is_loopback() || address.ip().is_unspecified())))
    })
}

/// The networks allowed when the operator names none: loopback, and only when the registry
/// itself listens on loopback. A registry reachable from elsewhere must be told which
/// networks its workers live in (`--allow-networks`), or it would route to any address a
/// token holder advertises.
pub fn default_networks(registry_listen: SocketAddr) -> Option<Vec<ipnet::IpNet>> {
    registry_listen.ip().is_loopback().then(|| {
        ["127.0.0.0/8", "::1/128"]
            .iter()
            .filter_map(|n| n.parse().ok())
            .collect()
    })
}

impl RegistryService {
    /// With a token: the caller must present it. Without: a caller with a client
    /// certificate (mTLS), or only loopback callers.
    fn authorize<T>(&self, req: &Request<T>) -> Result<(), Status> {
        if self.mtls {
            return Ok(()); // the TLS handshake verified the worker's certificate
        }
        match &self.token {
            Some(token) => {
                let presented = req
                    .metadata()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .unwrap_or_default();
                if bool::from(presented.as_bytes().ct_eq(token.as_bytes())) {
                    Ok(())
                } else {
                    Err(Status::unauthenticated("bad or missing registry token"))
                }
            }
            None => match req.remote_addr() {
                Some(a) if a.ip().is_loopback() => Ok(()),
                other => Err(Status::permission_denied(format!(
                    "registrations from {other:?} refused: without --registry-token the router accepts loopback workers only"
                ))),
            },
        }
    }
}

/// The DNS and URI names and the common name of the caller's client certificate (the first
/// of its chain); empty without one.
fn certificate_names<T>(req: &Request<T>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Some(chain) = req.peer_certs() else {
        return Vec::new();
    };
    let Some(Ok((_, cert))) = chain
        .first()
        .map(|der| x509_parser::parse_x509_certificate(der.as_ref()))
    else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_string))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(s) | GeneralName::URI(s) => names.push((*s).to_string()),
                _ => {}
            }
        }
    }
    names
}

#[tonic::async_trait]
impl RegistryApi for RegistryService {
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        self.authorize(&req)?;
        // with mTLS, the names the worker's certificate carries: it must name the worker's
        // id or its pool (a certificate for one pool cannot register workers into another)
        let cert_names = self.mtls.then(|| certificate_names(&req));
        let r = req.into_inner();
        if r.worker_id.is_empty() {
            return Err(Status::invalid_argument("worker_id is empty"));
        }
        let rules = self.rules.load();
        let Some(pool) = rules.rules.pool(&r.pool) else {
            let known: Vec<&str> = rules.rules.pools().iter().map(|p| &*p.name).collect();
            return Err(Status::not_found(format!(
                "unknown pool `{}` (pools: {})",
                r.pool,
                known.join(", ")
            )));
        };
        if let Some(names) = &cert_names
            && !names.iter().any(|n| *n == r.worker_id || *n == *pool.name)
        {
            return Err(Status::permission_denied(format!(
                "the client certificate names {names:?}: it must name the worker id `{}` or its pool `{}`",
                r.worker_id, pool.name
            )));
        }
        let address: SocketAddr = r.address.parse().map_err(|_| {
            Status::invalid_argument(format!("address `{}` is not ip:port", r.address))
        })?;
        if !self
            .allowed_networks
            .iter()
            .any(|n| n.contains(&address.ip()))
        {
            let nets: Vec<String> = self
                .allowed_networks
                .iter()
                .map(|n| n.to_string())
                .collect();
            return Err(Status::permission_denied(format!(
                "address {address} not allowed: workers must advertise an address in the router's --allow-networks ({})",
                nets.join(", ")
            )));
        }
        if is_own(&self.own_addresses, address) {
            return Err(Status::invalid_argument(format!(
                "address {address} is one of the router's own listeners"
            )));
        }
        if r.models.is_empty() {
            return Err(Status::invalid_argument(
                "a worker must serve at least one model",
            ));
        }
        let models = r
            .models
            .into_iter()
            .map(|m| ServedModel {
                name: m.name,
                max_context: m.max_context,
                modalities: m.modalities,
            })
            .collect();
        let lease_id = self
            .registry
            .register(
                r.worker_id.clone(),
                pool.name.clone(),
                address,
                models,
                r.device,
                if r.engine.is_empty() {
                    "switchyard".into()
                } else {
                    r.engine
                },
            )
            .map_err(|e| Status::already_exists(e.to_string()))?;
        self.registry
            .set_max_concurrency(&lease_id, r.max_concurrency);
        self.metrics
            .registrations
            .with_label_values(&[&*pool.name])
            .inc();
        tracing::info!(worker = %r.worker_id, pool = %pool.name, %address, "worker registered");
        Ok(Response::new(RegisterResponse {
            lease_id,
            heartbeat_interval_ms: self.registry.heartbeat_interval.as_millis() as u32,
            lease_ttl_ms: self.registry.lease_ttl.as_millis() as u32,
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        self.authorize(&req)?;
        let r = req.into_inner();
        let drain = self
            .registry
            .heartbeat(
                &r.lease_id,
                &crate::registry::Heartbeat {
                    in_flight: r.in_flight,
                    queued: r.queued,
                    kv_cache_usage: r.kv_cache_usage,
                    tokens_per_second: r.tokens_per_second,
                    prefix_cache_hit_rate: r.prefix_cache_hit_rate,
                    prefix_cache_bytes: r.prefix_cache_bytes,
                },
            )
            .map_err(|e| Status::not_found(e.to_string()))?;
        let command = if drain { Command::Drain } else { Command::None };
        Ok(Response::new(HeartbeatResponse {
            command: command as i32,
        }))
    }

    async fn drain(&self, req: Request<DrainRequest>) -> Result<Response<DrainResponse>, Status> {
        self.authorize(&req)?;
        let r = req.into_inner();
        self.registry
            .drain(&r.lease_id)
            .map_err(|e| Status::not_found(e.to_string()))?;
        tracing::info!(lease = %r.lease_id, reason = %r.reason, deadline_s = r.deadline_s, "worker draining");
        Ok(Response::new(DrainResponse {}))
    }

    async fn deregister(
        &self,
        req: Request<DeregisterRequest>,
    ) -> Result<Response<DeregisterResponse>, Status> {
        self.authorize(&req)?;
        let r = req.into_inner();
        self.registry
            .deregister(&r.lease_id)
            .map_err(|e| Status::not_found(e.to_string()))?;
        tracing::info!(lease = %r.lease_id, "worker deregistered");
        Ok(Response::new(DeregisterResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::is_own;

    #[test]
    fn own_listeners_are_recognised_whatever_address_names_them() {
        let own = [
            "127.0.0.1:8080".parse().unwrap(),
            "0.0.0.0:9090".parse().unwrap(),
        ];
        assert!(is_own(&own, "127.0.0.1:8080".parse().unwrap()));
        assert!(!is_own(&own, "127.0.0.1:8081".parse().unwrap()));
        assert!(
            is_own(&own, "127.0.0.1:9090".parse().unwrap()),
            "0.0.0.0 covers loopback"
        );
        assert!(is_own(&own, "0.0.0.0:9090".parse().unwrap()));
        assert!(
            !is_own(&own, "10.0.0.7:9090".parse().unwrap()),
            "another host may use the same port"
        );
    }
}
