//! `/v1/explain`: how a request would be routed now, and why. It runs the filter's pipeline with
//! core's pieces: parse the body, render the chat template, tokenize with the model's tokenizer,
//! hash at the model's block size, then score the fleet as a dry run (no policy state changes).

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use kvmesh_core::hash::hash_prompt;
use kvmesh_core::request::{
    Endpoint, InferenceRequest, Prompt, RequestError, RequestLimits, openai_error_body, parse_request,
};
use kvmesh_core::template::RenderOptions;
use kvmesh_core::{BlockHash, BlockSalt, Explanation, Policy, RouteInput, Scorer, SplitMix64, TokenId};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::plane::Plane;

/// Why explain could not answer: an HTTP status and an OpenAI-style JSON error body.
#[derive(Debug)]
pub struct ExplainError {
    /// HTTP status.
    pub status: u16,
    /// JSON body.
    pub body: String,
}

impl ExplainError {
    fn new(status: u16, message: &str, error_type: &str, param: Option<&str>) -> Self {
        ExplainError { status, body: openai_error_body(message, error_type, param, status) }
    }
}

impl From<RequestError> for ExplainError {
    fn from(e: RequestError) -> Self {
        ExplainError { status: e.status(), body: e.error_body() }
    }
}

/// The answer.
#[derive(Debug, Serialize)]
pub struct ExplainResponse {
    /// `chat` or `completions`.
    pub endpoint: &'static str,
    /// The model the request asked for.
    pub requested_model: String,
    /// The base model it is routed as (differs from the requested one for a LoRA adapter).
    pub model: String,
    /// The LoRA adapter, when the requested model is one.
    pub lora_adapter: Option<String>,
    /// Tokens per block the prompt was cut with.
    pub block_size: u32,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Full blocks hashed.
    pub hashed_blocks: usize,
    /// Leading request blocks each worker of the fleet holds.
    pub overlaps: BTreeMap<String, u32>,
    /// The scorer's account: decision, and per worker its overlap, load and cost.
    pub explanation: Explanation,
}

/// Which endpoint a body is for: `messages` present means chat.
#[derive(Deserialize)]
struct Probe<'a> {
    #[serde(borrow, default)]
    messages: Option<&'a RawValue>,
}

/// Picks the endpoint from the query (`endpoint=chat|completions`, or `path=/v1/...`), else from
/// the body.
pub fn endpoint_for(query: Option<&str>, body: &[u8]) -> Result<Endpoint, ExplainError> {
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let endpoint = match (key, value) {
            ("endpoint", "chat" | "chat_completions" | "chat-completions") => Endpoint::ChatCompletions,
            ("endpoint", "completions" | "completion") => Endpoint::Completions,
            ("path", p) => {
                Endpoint::from_path(&p.replace("%2F", "/").replace("%2f", "/")).ok_or_else(|| {
                    ExplainError::new(
                        400,
                        &format!("unknown inference path {p:?}"),
                        "invalid_request_error",
                        Some("path"),
                    )
                })?
            }
            ("endpoint", other) => {
                return Err(ExplainError::new(
                    400,
                    &format!("endpoint must be `chat` or `completions`, got {other:?}"),
                    "invalid_request_error",
                    Some("endpoint"),
                ));
            }
            _ => continue,
        };
        return Ok(endpoint);
    }
    // A body that is not JSON falls through to the parser, which says what is wrong with it.
    let chat = serde_json::from_slice::<Probe<'_>>(body).map(|p| p.messages.is_some()).unwrap_or(false);
    Ok(if chat { Endpoint::ChatCompletions } else { Endpoint::Completions })
}

/// Explains how `body` would be routed.
pub fn explain(plane: &Plane, endpoint: Endpoint, body: &[u8]) -> Result<ExplainResponse, ExplainError> {
    let limits = RequestLimits { max_body_bytes: crate::config::defaults::MAX_EXPLAIN_BODY_BYTES };
    let request = parse_request(endpoint, body, &limits)?;
    let requested = request.model().to_owned();

    // A configured or registered model is routed as itself; an adapter name as its base model.
    let (model, adapter) = {
        let inner = plane.lock();
        let known = plane.models.get(&requested).is_some()
            || inner.fleet.registered_models().contains_key(&requested);
        match (known, inner.fleet.serves_adapter(&requested)) {
            (true, _) => (requested.clone(), None),
            (false, Some(base)) => (base, Some(requested.clone())),
            (false, None) => {
                return Err(ExplainError::new(
                    404,
                    &format!("The model `{requested}` does not exist."),
                    "NotFoundError",
                    Some("model"),
                ));
            }
        }
    };
    let block_size = plane
        .models
        .get(&model)
        .and_then(|m| m.config.block_size)
        .or_else(|| plane.lock().fleet.registered_block_size(&model))
        .ok_or_else(|| {
            ExplainError::new(
                409,
                &format!("block size of `{model}` is unknown: configure it or wait for a worker to register"),
                "invalid_request_error",
                Some("model"),
            )
        })?;

    let tokens = prompt_tokens(plane, &model, &request)?;
    let salt = BlockSalt::lora(adapter.as_deref());
    let mut hashes: Vec<BlockHash> = Vec::new();
    hash_prompt(&tokens, block_size as usize, salt, &mut hashes);

    let inner = plane.lock();
    let config = inner.fleet.policy(&model);
    let policy =
        Policy::new(config).map_err(|e| ExplainError::new(500, &e.to_string(), "internal_error", None))?;
    let input = RouteInput {
        model: &model,
        hashes: &hashes,
        prompt_tokens: tokens.len() as u64,
        expected_output_tokens: request.max_output_tokens().map(u64::from),
        block_size,
        now_ms: plane.started.elapsed().as_millis() as u64,
    };
    let mut scorer = Scorer::new();
    // A fixed seed: the same request explains the same way while the fleet stands still.
    let mut rng = SplitMix64::new(0x6b76_6d65_7368);
    scorer.decide(&policy, &input, inner.fleet.fleet(), inner.fleet.index(), &mut rng);
    let explanation = scorer
        .explain(inner.fleet.fleet())
        .ok_or_else(|| ExplainError::new(500, "the scorer kept no decision", "internal_error", None))?;
    let overlaps = explanation.candidates.iter().map(|c| (c.worker.0.clone(), c.overlap_blocks)).collect();
    Ok(ExplainResponse {
        endpoint: match endpoint {
            Endpoint::ChatCompletions => "chat",
            Endpoint::Completions => "completions",
        },
        requested_model: requested,
        model,
        lora_adapter: adapter,
        block_size,
        prompt_tokens: tokens.len() as u64,
        hashed_blocks: hashes.len(),
        overlaps,
        explanation,
    })
}

/// The prompt's token ids, as the engine computes them (the first prompt of a batch).
fn prompt_tokens(
    plane: &Plane,
    model: &str,
    request: &InferenceRequest<'_>,
) -> Result<Vec<TokenId>, ExplainError> {
    // Token prompts need no tokenizer.
    if let InferenceRequest::Completion(c) = request {
        match &c.prompt {
            Prompt::Tokens(ids) => return Ok(ids.clone()),
            Prompt::TokenBatches(batches) => return Ok(batches.first().cloned().unwrap_or_default()),
            Prompt::Text(_) | Prompt::Texts(_) => {}
        }
    }
    let files = plane.models.get(model).and_then(|m| m.files.as_ref()).ok_or_else(|| {
        ExplainError::new(
            409,
            &format!("no tokenizer for `{model}`: configure its tokenizer_dir"),
            "invalid_request_error",
            Some("model"),
        )
    })?;
    let tokenizer = &files.tokenizer;
    let unprocessable =
        |e: &dyn std::fmt::Display| ExplainError::new(422, &e.to_string(), "invalid_request_error", None);
    match request {
        InferenceRequest::Completion(c) => {
            let text = match &c.prompt {
                Prompt::Text(t) => t.as_ref(),
                Prompt::Texts(ts) => ts.first().map_or("", |t| t.as_ref()),
                Prompt::Tokens(_) | Prompt::TokenBatches(_) => "",
            };
            let ids =
                if c.add_special_tokens { tokenizer.encode_prompt(text) } else { tokenizer.encode(text) };
            ids.map_err(|e| unprocessable(&e))
        }
        InferenceRequest::Chat(chat) => {
            let options = RenderOptions {
                now_unix_seconds: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_secs() as i64),
                default_kwargs: None,
            };
            let with_tools = chat.tools.as_ref().is_some_and(|t| !t.is_empty());
            let custom = chat.chat_template.is_some() || with_tools;
            let compiled;
            let template = match (&files.default_template, custom) {
                (Some(t), false) => t,
                _ => {
                    compiled = tokenizer
                        .chat_template(chat.chat_template.as_deref(), with_tools)
                        .map_err(|e| unprocessable(&e))?;
                    &compiled
                }
            };
            tokenizer.encode_chat(template, chat, &options).map_err(|e| unprocessable(&e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_from_query_then_body() {
        let chat = br#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        let completion = br#"{"model":"m","prompt":"hi"}"#;
        assert_eq!(endpoint_for(None, chat).unwrap(), Endpoint::ChatCompletions);
        assert_eq!(endpoint_for(None, completion).unwrap(), Endpoint::Completions);
        assert_eq!(endpoint_for(Some("endpoint=completions"), chat).unwrap(), Endpoint::Completions);
        assert_eq!(
            endpoint_for(Some("path=%2Fv1%2Fchat%2Fcompletions"), completion).unwrap(),
            Endpoint::ChatCompletions
        );
        assert_eq!(endpoint_for(Some("x=1"), b"not json").unwrap(), Endpoint::Completions);
        assert_eq!(endpoint_for(Some("endpoint=embeddings"), chat).unwrap_err().status, 400);
    }
}
