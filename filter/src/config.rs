//! The plugin configuration: JSON in the Wasm filter's `configuration` (a `StringValue`).
//!
//! For this slice the fleet (workers, models, tokenizer files) comes from here; the control plane's
//! state stream replaces the `workers` list later (see `router.rs`, `Router::apply_fleet`).

use kvmesh_core::request::DEFAULT_MAX_BODY_BYTES;
use kvmesh_core::{RoutingConfig, WorkerInfo};
use serde::Deserialize;
use serde_json::value::RawValue;

/// Errors of the filter crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The plugin configuration is not the JSON this filter understands.
    #[error("invalid kvmesh filter configuration: {source}")]
    Config {
        /// What serde_json rejected, with line and column.
        #[source]
        source: serde_json::Error,
    },
    /// The configuration parses but a value is unusable.
    #[error("invalid kvmesh filter configuration: `{field}` {reason}")]
    Invalid {
        /// The offending field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A model's tokenizer or chat template could not be loaded.
    #[error("invalid kvmesh filter configuration: model `{model}`: {source}")]
    Model {
        /// The model's name.
        model: String,
        /// What kvmesh-core rejected.
        #[source]
        source: kvmesh_core::Error,
    },
}

/// The filter's settings. Unknown fields are rejected so a typo never silently does nothing.
/// No `models` means the filter routes nothing: every request passes through untouched.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// The workers requests may go to (until the control plane streams the fleet).
    #[serde(default)]
    pub workers: Vec<WorkerInfo>,
    /// The served models, each with its tokenizer files.
    #[serde(default)]
    pub models: Vec<ModelConfig>,
    /// How requests are scored; approx-prefix by default, since without the control plane's index
    /// this proxy's own past decisions are the only cache knowledge it has.
    #[serde(default = "default_routing")]
    pub routing: RoutingConfig,
    /// Longest request body routed, in bytes; longer ones get 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
}

/// One served model and its tokenizer, as the model ships the files.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The model's name (the OpenAI `model` field).
    pub name: String,
    /// The model's `tokenizer.json`, embedded as a JSON object (kept raw: it is only handed to the
    /// tokenizer loader, and embedding it unescaped keeps a 10 MB file 10 MB).
    pub tokenizer: Box<RawValue>,
    /// The model's `tokenizer_config.json`, embedded as a JSON object, if it ships one.
    #[serde(default)]
    pub tokenizer_config: Option<Box<RawValue>>,
    /// `chat_template.jinja`, if the model ships its template as a separate file.
    #[serde(default)]
    pub chat_template: Option<String>,
}

fn default_routing() -> RoutingConfig {
    RoutingConfig { policy: kvmesh_core::PolicyKind::ApproxPrefix, ..RoutingConfig::default() }
}

fn default_max_body_bytes() -> usize {
    DEFAULT_MAX_BODY_BYTES
}

impl FilterConfig {
    /// Parses the plugin configuration; no configuration (or only whitespace) means the defaults.
    pub fn from_bytes(bytes: Option<&[u8]>) -> Result<Self, Error> {
        let config: FilterConfig = match bytes {
            Some(b) if !b.iter().all(u8::is_ascii_whitespace) => {
                serde_json::from_slice(b).map_err(|source| Error::Config { source })?
            }
            _ => return Ok(Self::default_routing_off()),
        };
        config.validate()?;
        Ok(config)
    }

    /// The configuration with nothing to route (what an empty plugin configuration means).
    fn default_routing_off() -> Self {
        FilterConfig {
            workers: Vec::new(),
            models: Vec::new(),
            routing: default_routing(),
            max_body_bytes: default_max_body_bytes(),
        }
    }

    /// Checks what serde cannot: ranges and cross-references; the error names the field.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |field: String, reason: String| Error::Invalid { field, reason };
        self.routing.validate().map_err(|e| invalid("routing".to_owned(), e.to_string()))?;
        if self.max_body_bytes == 0 {
            return Err(invalid("max_body_bytes".to_owned(), "must be at least 1".to_owned()));
        }
        for (i, w) in self.workers.iter().enumerate() {
            if w.block_size == 0 {
                return Err(invalid(format!("workers[{i}].block_size"), "must be at least 1".to_owned()));
            }
            if !self.models.iter().any(|m| m.name == w.model) {
                return Err(invalid(
                    format!("workers[{i}].model"),
                    format!("`{}` is not in `models`", w.model),
                ));
            }
            let same_model = self.workers.iter().filter(|o| o.model == w.model);
            // One block size per model: the prompt is hashed once per request.
            if same_model.clone().any(|o| o.block_size != w.block_size) {
                return Err(invalid(
                    format!("workers[{i}].block_size"),
                    format!("workers of model `{}` disagree on block size", w.model),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKENIZER: &str = r#"{"version":"1.0","model":{"type":"BPE","vocab":{},"merges":[]}}"#;

    fn with_worker(worker_model: &str, block_size: u32) -> String {
        format!(
            r#"{{"models":[{{"name":"m","tokenizer":{TOKENIZER}}}],
               "workers":[{{"id":"w0","address":"127.0.0.1:1","model":"{worker_model}","block_size":{block_size}}}]}}"#
        )
    }

    #[test]
    fn missing_or_blank_configuration_means_no_routing() {
        for raw in [None, Some(&b"  \n"[..]), Some(&b"{}"[..])] {
            let config = FilterConfig::from_bytes(raw).expect("accepted");
            assert!(config.models.is_empty() && config.workers.is_empty());
            assert_eq!(config.routing.policy, kvmesh_core::PolicyKind::ApproxPrefix);
        }
    }

    #[test]
    fn malformed_json_is_rejected() {
        let err = FilterConfig::from_bytes(Some(b"{not json")).expect_err("malformed JSON must fail");
        assert!(err.to_string().contains("invalid kvmesh filter configuration"), "{err}");
    }

    #[test]
    fn unknown_field_is_rejected() {
        assert!(FilterConfig::from_bytes(Some(br#"{"upstreams": []}"#)).is_err());
    }

    #[test]
    fn worker_and_model_are_accepted() {
        let config = FilterConfig::from_bytes(Some(with_worker("m", 16).as_bytes())).expect("valid");
        assert_eq!(config.workers.len(), 1);
        assert_eq!(config.models[0].tokenizer.get(), TOKENIZER);
    }

    #[test]
    fn worker_of_unknown_model_is_rejected() {
        let err = FilterConfig::from_bytes(Some(with_worker("other", 16).as_bytes())).expect_err("invalid");
        assert!(err.to_string().contains("workers[0].model"), "{err}");
    }

    #[test]
    fn zero_block_size_is_rejected() {
        let err = FilterConfig::from_bytes(Some(with_worker("m", 0).as_bytes())).expect_err("invalid");
        assert!(err.to_string().contains("workers[0].block_size"), "{err}");
    }
}
