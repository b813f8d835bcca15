//! The filter's plugin configuration as the benchmarks give it, in Envoy and outside it alike.

use std::path::Path;

use anyhow::{Context, Result};
use kvmesh_core::PolicyKind;
use kvmesh_core::tokenize::canonicalize;

use crate::stages::BLOCK_SIZE;
use crate::workload::MODEL;

/// The plugin configuration: the tokenizer files in `dir` inline (`tokenizer.json` in the canonical
/// form, converted here as the control plane converts what it serves), one static worker per
/// upstream port (block size 16), the default policy unless `policy` names one;
/// `segment_cache_bytes` overrides the segment cache size.
pub fn plugin_config(
    dir: &Path,
    upstream_ports: &[u16],
    segment_cache_bytes: Option<usize>,
    policy: Option<PolicyKind>,
) -> Result<String> {
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name)).with_context(|| format!("read {}", dir.join(name).display()))
    };
    let workers: Vec<String> = upstream_ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            format!(
                r#"{{"id":"worker-{i}","address":"127.0.0.1:{port}","model":"{MODEL}","block_size":{BLOCK_SIZE}}}"#
            )
        })
        .collect();
    let mut extra =
        segment_cache_bytes.map(|b| format!(r#","segment_cache":{{"max_bytes":{b}}}"#)).unwrap_or_default();
    if let Some(policy) = policy {
        // Only the policy: a whole serialized `RoutingConfig` would name every field of this
        // version, which an older `--baseline-module` refuses as unknown.
        extra.push_str(&format!(r#","routing":{{"policy":"{}"}}"#, policy.name()));
    }
    Ok(format!(
        r#"{{"models":[{{"name":"{MODEL}","tokenizer":{},"tokenizer_config":{}}}],"workers":[{}]{extra}}}"#,
        canonicalize(&read("tokenizer.json")?)?,
        read("tokenizer_config.json")?,
        workers.join(",")
    ))
}
