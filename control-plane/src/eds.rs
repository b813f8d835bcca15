//! Endpoint discovery for Envoy's worker cluster over xDS's REST-JSON transport: Envoy POSTs a
//! `DiscoveryRequest` to [`EDS_PATH`] every `refresh_delay` and gets, for each cluster it names, a
//! `ClusterLoadAssignment` of the registered workers. Without it the cluster is static, and a
//! worker that registers later cannot be reached: the override_host policy only picks members.
//!
//! REST rather than gRPC: the same xDS messages in their JSON form, with no Envoy protos to build.
//! Every cluster name gets every registered worker with an `ip:port` address (what the filter's
//! override-host header names); cordoned and draining workers are `DRAINING`, so Envoy's own
//! fallback (round robin, when the filter forwards a request unrouted) skips them too.

use serde::Deserialize;
use serde_json::{Value, json};

use kvmesh_core::WorkerState;

/// Where Envoy's REST EDS subscription posts (the xDS v3 REST endpoint for endpoints).
pub const EDS_PATH: &str = "/v3/discovery:endpoints";

/// The resource type Envoy asks for and is given.
pub const TYPE_URL: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// What this service reads of Envoy's `DiscoveryRequest` (the rest, `node` and the version Envoy
/// last accepted, changes nothing: every answer is the whole current state).
#[derive(Debug, Default, Deserialize)]
pub struct DiscoveryRequest {
    /// The clusters wanted.
    #[serde(default)]
    pub resource_names: Vec<String>,
    /// The resource type; empty or [`TYPE_URL`].
    #[serde(default)]
    pub type_url: String,
}

/// Why a discovery request is refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum EdsError {
    /// Not a JSON `DiscoveryRequest`.
    #[error("not a JSON DiscoveryRequest: {0}")]
    Malformed(String),
    /// Another resource type than endpoints.
    #[error("this endpoint serves {TYPE_URL}, not {0}")]
    WrongType(String),
    /// No cluster named.
    #[error("resource_names is empty: name the worker cluster")]
    NoCluster,
}

/// Parses Envoy's request body.
pub fn parse_request(body: &[u8]) -> Result<DiscoveryRequest, EdsError> {
    let request: DiscoveryRequest =
        serde_json::from_slice(body).map_err(|e| EdsError::Malformed(e.to_string()))?;
    if !request.type_url.is_empty() && request.type_url != TYPE_URL {
        return Err(EdsError::WrongType(request.type_url));
    }
    if request.resource_names.is_empty() {
        return Err(EdsError::NoCluster);
    }
    Ok(request)
}

/// One registered worker as an Envoy endpoint: its `ip:port` split (IPv6 in brackets), and its
/// health; `None` for an address that is not `ip:port`.
fn endpoint((address, state): &(String, WorkerState)) -> Option<(String, u16, &'static str)> {
    let (host, port) = address.rsplit_once(':')?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    // EDS endpoints are addresses, never names to resolve.
    let ip: std::net::IpAddr = host.parse().ok()?;
    let port: u16 = port.parse().ok()?;
    let health = match state {
        WorkerState::Ready => "HEALTHY",
        WorkerState::Cordoned | WorkerState::Draining => "DRAINING",
    };
    Some((ip.to_string(), port, health))
}

/// The `DiscoveryResponse` for `request` over the registered `workers` (address as registered,
/// state; [`crate::fleet_state::FleetState::registered_addresses`]): one assignment per named
/// cluster. Its version is a hash of the endpoints, so an unchanged fleet answers the same version.
pub fn response(request: &DiscoveryRequest, workers: &[(String, WorkerState)]) -> Value {
    let mut endpoints: Vec<(String, u16, &str)> = workers.iter().filter_map(endpoint).collect();
    endpoints.sort_unstable();
    endpoints.dedup();
    let mut digest = Vec::new();
    for (ip, port, health) in &endpoints {
        digest.extend_from_slice(format!("{ip}:{port}:{health};").as_bytes());
    }
    let version = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&digest));
    let lb_endpoints: Vec<Value> = endpoints
        .iter()
        .map(|(ip, port, health)| {
            json!({
                "endpoint": {"address": {"socket_address": {"address": ip, "port_value": port}}},
                "health_status": health,
            })
        })
        .collect();
    let resources: Vec<Value> = request
        .resource_names
        .iter()
        .map(|cluster| {
            json!({
                "@type": TYPE_URL,
                "cluster_name": cluster,
                "endpoints": [{"lb_endpoints": lb_endpoints}],
            })
        })
        .collect();
    json!({"version_info": version, "resources": resources, "type_url": TYPE_URL})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(address: &str, state: WorkerState) -> (String, WorkerState) {
        (address.to_owned(), state)
    }

    #[test]
    fn registered_workers_become_endpoints_of_every_named_cluster() {
        let workers = [
            worker("10.0.0.2:8000", WorkerState::Ready),
            worker("[fd00::1]:8001", WorkerState::Draining),
            worker("vllm-0.svc:8000", WorkerState::Ready),
            worker("10.0.0.4", WorkerState::Ready),
            worker("10.0.0.2:8000", WorkerState::Ready),
        ];
        let request = parse_request(
            br#"{"node":{"id":"envoy"},"version_info":"x","resource_names":["workers"],"type_url":"type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"}"#,
        )
        .expect("Envoy's request parses");
        let answer = response(&request, &workers);
        assert_eq!(answer["type_url"], TYPE_URL);
        let assignment = &answer["resources"][0];
        assert_eq!(assignment["@type"], TYPE_URL);
        assert_eq!(assignment["cluster_name"], "workers");
        let lb = assignment["endpoints"][0]["lb_endpoints"].as_array().expect("a list");
        let got: Vec<(String, u64, String)> = lb
            .iter()
            .map(|e| {
                let socket = &e["endpoint"]["address"]["socket_address"];
                (
                    socket["address"].as_str().unwrap_or_default().to_owned(),
                    socket["port_value"].as_u64().unwrap_or_default(),
                    e["health_status"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [("10.0.0.2".into(), 8000, "HEALTHY".into()), ("fd00::1".into(), 8001, "DRAINING".into())],
            "names and portless addresses are left out, a repeated address counted once"
        );
    }

    #[test]
    fn the_version_follows_the_endpoints_only() {
        let request = DiscoveryRequest { resource_names: vec!["workers".into()], type_url: String::new() };
        let one = [worker("10.0.0.2:8000", WorkerState::Ready), worker("10.0.0.3:8000", WorkerState::Ready)];
        let version = |w: &[(String, WorkerState)]| {
            response(&request, w)["version_info"].as_str().unwrap_or_default().to_owned()
        };
        let reordered = [one[1].clone(), one[0].clone()];
        assert_eq!(version(&one), version(&reordered), "the registry's order does not matter");
        let mut other = one.clone();
        other[0].1 = WorkerState::Cordoned;
        assert_ne!(version(&one), version(&other));
        assert_ne!(version(&one), version(&[]));
    }

    #[test]
    fn other_types_and_nameless_requests_are_refused() {
        assert!(matches!(parse_request(b"{nope"), Err(EdsError::Malformed(_))));
        let clusters = br#"{"resource_names":["workers"],"type_url":"type.googleapis.com/envoy.config.cluster.v3.Cluster"}"#;
        assert!(matches!(parse_request(clusters), Err(EdsError::WrongType(_))));
        assert_eq!(parse_request(br#"{"resource_names":[]}"#).err(), Some(EdsError::NoCluster));
    }
}
