//! The tokenizer engine behind our interface: HuggingFace `tokenizers` 1.0 (pinned rc).
//!
//! Nothing outside this file names the engine's types, so moving to 1.0 final (or to another
//! engine) touches only this file.

use tokenizers::pipeline::{EncodeOptions, Override, PipelineToken, PipelineTokenizer};

use super::TokenizeError;
use crate::hash::TokenId;

/// The `version` the engine's reader accepts; anything else goes through [`canonicalize`] first.
const CANONICAL_VERSION: &str = "2.0";

/// A loaded tokenizer pipeline (normalizer, pre-tokenizer, BPE model, post-processor).
#[derive(Clone)]
pub(crate) struct Engine {
    inner: PipelineTokenizer,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

/// Rewrites a `tokenizer.json` as HuggingFace ships it (`"version": "1.0"`) into the canonical
/// `2.0` form the 1.0 engine reads. Idempotent. Run it ahead of time (natively, e.g. in the control
/// plane): on the 11 MB Qwen3 file it costs a full `serde_json` round trip.
pub fn canonicalize(tokenizer_json: &str) -> Result<String, TokenizeError> {
    let mut value: serde_json::Value = serde_json::from_str(tokenizer_json)
        .map_err(|e| TokenizeError::Json { file: "tokenizer.json", reason: e.to_string() })?;
    tokenizers::canonicalize_value(&mut value)
        .map_err(|e| TokenizeError::Unsupported { file: "tokenizer.json", what: e.to_string() })?;
    // Compact, not pretty: the canonical file is shipped to every filter VM.
    serde_json::to_string(&value)
        .map_err(|e| TokenizeError::Json { file: "tokenizer.json", reason: e.to_string() })
}

/// Whether a `tokenizer.json` already is in the canonical form, judged by its `"version"` field
/// (found without parsing the whole file: it may be megabytes).
fn is_canonical(tokenizer_json: &str) -> bool {
    // HF writes `"version"` first; the canonical writer does too. A miss only costs a conversion.
    let head = &tokenizer_json.as_bytes()[..tokenizer_json.len().min(256)];
    let head = String::from_utf8_lossy(head);
    let Some(at) = head.find("\"version\"") else { return false };
    let rest = head[at + "\"version\"".len()..].trim_start();
    let Some(rest) = rest.strip_prefix(':') else { return false };
    rest.trim_start().starts_with(&format!("\"{CANONICAL_VERSION}\""))
}

impl Engine {
    /// Loads a `tokenizer.json`, canonical (`2.0`) or as HuggingFace ships it (converted here).
    pub(crate) fn from_json(tokenizer_json: &str) -> Result<Self, TokenizeError> {
        let converted;
        let canonical = if is_canonical(tokenizer_json) {
            tokenizer_json
        } else {
            converted = canonicalize(tokenizer_json)?;
            converted.as_str()
        };
        let inner = tokenizers::from_json(canonical)
            .map_err(|e| TokenizeError::Unsupported { file: "tokenizer.json", what: e.to_string() })?;
        Ok(Engine { inner })
    }

    /// Appends the ids of `text` to `out`. Special-token strings in the text become their ids (as
    /// HF does by default); `add_special_tokens` runs the post-processor (BOS for Llama 3).
    pub(crate) fn encode_into(
        &self,
        text: &str,
        add_special_tokens: bool,
        out: &mut Vec<TokenId>,
    ) -> Result<(), TokenizeError> {
        let options = EncodeOptions {
            add_special_tokens,
            encode_special_tokens: false,
            // The engine computes on the whole prompt: a tokenizer.json's own padding or
            // truncation settings are not what vLLM applies to a prompt.
            padding: Override::Off,
            truncation: Override::Off,
        };
        let mut ids: Vec<PipelineToken> = Vec::with_capacity(text.len() / 3 + 2);
        self.inner
            .encode_into(text, &options, &mut ids)
            .map_err(|e| TokenizeError::Encode { reason: e.to_string() })?;
        out.extend_from_slice(PipelineToken::cast_slice(&ids));
        Ok(())
    }

    /// Id of an added (special) token by its text.
    pub(crate) fn added_token_id(&self, token: &str) -> Option<TokenId> {
        self.inner.get_added_vocabulary().token_to_id(token)
    }

    /// Id of a token by its text: added tokens first, then a text that encodes to exactly one id.
    pub(crate) fn token_to_id(&self, token: &str) -> Option<TokenId> {
        if let Some(id) = self.added_token_id(token) {
            return Some(id);
        }
        let mut ids = Vec::new();
        self.encode_into(token, false, &mut ids).ok()?;
        match ids.as_slice() {
            [id] => Some(*id),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_sniffing_reads_only_the_head() {
        assert!(is_canonical(r#"{"version": "2.0", "truncation": null}"#));
        assert!(is_canonical(r#"{"version":"2.0"}"#));
        assert!(!is_canonical(r#"{"version": "1.0", "truncation": null}"#));
        assert!(!is_canonical(r#"{"truncation": null}"#));
        assert!(!is_canonical(""));
        // A multi-byte character cut at the 256-byte boundary must not panic.
        let long = format!("{{\"x\": \"{}\"}}", "é".repeat(200));
        assert!(!is_canonical(&long));
    }

    #[test]
    fn unknown_model_type_is_refused_with_its_name() {
        let json = r#"{"version": "1.0", "added_tokens": [], "normalizer": null, "pre_tokenizer": null,
                       "post_processor": null, "decoder": null,
                       "model": {"type": "Mystery", "vocab": {}}}"#;
        let err = Engine::from_json(json).unwrap_err();
        // The converter lowercases the unknown type's name; either way the message names the model.
        assert!(err.to_string().to_lowercase().contains("model"), "{err}");
    }
}
