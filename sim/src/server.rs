//! The HTTP API: OpenAI completions and chat (non-streaming and SSE), and each engine's own
//! router-facing endpoints.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use kvmesh_core::hash::{BlockSalt, TokenId, hash_block};
use kvmesh_core::request::{
    Endpoint, InferenceRequest, Prompt, RequestError, RequestLimits, openai_error_body, parse_request,
};

use crate::config::{EngineKind, Role, SimArgs};
use crate::events::zmq::ZmqEndpoints;
use crate::pd::{OpaqueState, PdFields, TrtllmDisaggParams, VllmKvParams, pull};
use crate::prompt::PromptTokenizer;
use crate::scheduler::{FinishReason, Finished, SeqSpec, SeqUpdate};
use crate::worker::{Command, EngineShared};

/// Everything a request handler needs.
pub struct App {
    /// The flags.
    pub args: SimArgs,
    /// Prompt tokenization.
    pub tokenizer: Arc<dyn PromptTokenizer>,
    /// Text of each filler token.
    pub filler_text: HashMap<TokenId, String>,
    /// Commands to the engine loop.
    pub cmd: mpsc::UnboundedSender<Command>,
    /// What the engine loop publishes.
    pub shared: Arc<EngineShared>,
    /// Request counter (ids, seeds).
    pub next_id: AtomicU64,
    /// Requests being served (vLLM's `/load`).
    pub inflight: AtomicUsize,
    /// The KV event sockets, when events are on.
    pub kv_endpoints: Option<ZmqEndpoints>,
    /// The KV transfer side channel's port, when this worker serves one.
    pub transfer_port: Option<u16>,
    /// The host decode workers reach this worker's side channel at.
    pub advertise_host: String,
    /// This engine's id (vLLM's `remote_engine_id`).
    pub engine_id: String,
    /// Unix time the worker started.
    pub created: u64,
}

/// The routes of the configured engine.
pub fn router(app: Arc<App>) -> Router {
    let mut r = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/version", get(version));
    r = match app.args.engine {
        EngineKind::Vllm => r
            .route("/metrics", get(prometheus))
            .route("/load", get(load))
            .route("/kv_event_sources", get(kv_event_sources))
            .route("/reset_prefix_cache", post(reset_prefix_cache)),
        EngineKind::Sglang => r
            .route("/metrics", get(prometheus))
            .route("/health_generate", get(health))
            .route("/model_info", get(model_info))
            .route("/get_model_info", get(model_info))
            .route("/server_info", get(server_info))
            .route("/get_server_info", get(server_info))
            .route("/get_load", get(get_load))
            .route("/flush_cache", post(reset_prefix_cache)),
        EngineKind::Trtllm => r
            .route("/metrics", get(iteration_stats))
            .route("/prometheus/metrics", get(prometheus))
            .route("/health_generate", get(health))
            .route("/kv_cache_events", post(kv_cache_events)),
    };
    // Bodies up to core's limit reach the parser, which answers 413 in OpenAI's error format.
    r.layer(DefaultBodyLimit::max(RequestLimits::default().max_body_bytes + 1)).with_state(app)
}

fn json_response(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn json_ok<T: Serialize>(value: &T) -> Response {
    match serde_json::to_string(value) {
        Ok(body) => json_response(StatusCode::OK, body),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string(), "InternalServerError", None),
    }
}

fn error(status: StatusCode, message: &str, kind: &str, param: Option<&str>) -> Response {
    json_response(status, openai_error_body(message, kind, param, status.as_u16()))
}

fn bad_request(message: &str, param: Option<&str>) -> Response {
    error(StatusCode::BAD_REQUEST, message, "BadRequestError", param)
}

fn request_error(e: &RequestError) -> Response {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
    json_response(status, e.error_body())
}

async fn health() -> StatusCode {
    StatusCode::OK
}

async fn version(State(app): State<Arc<App>>) -> Response {
    let version = match app.args.engine {
        EngineKind::Vllm => "0.33.0",
        EngineKind::Sglang => "0.5.23",
        EngineKind::Trtllm => "1.1.0",
    };
    json_ok(&serde_json::json!({ "version": version }))
}

async fn models(State(app): State<Arc<App>>) -> Response {
    let owner = match app.args.engine {
        EngineKind::Vllm => "vllm",
        EngineKind::Sglang => "sglang",
        EngineKind::Trtllm => "tensorrt_llm",
    };
    json_ok(&serde_json::json!({
        "object": "list",
        "data": [{
            "id": app.args.model,
            "object": "model",
            "created": app.created,
            "owned_by": owner,
            "root": app.args.model,
            "parent": null,
            "max_model_len": app.args.max_model_len,
            "permission": [],
        }],
    }))
}

async fn prometheus(State(app): State<Arc<App>>) -> Response {
    let body = app.shared.metrics.encode();
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        body,
    )
        .into_response()
}

async fn load(State(app): State<Arc<App>>) -> Response {
    json_ok(&serde_json::json!({ "server_load": app.inflight.load(Ordering::Relaxed) }))
}

/// vLLM's resolved `KVEventsConfig` per data-parallel rank.
async fn kv_event_sources(State(app): State<Arc<App>>) -> Response {
    let a = &app.args;
    let config = match &app.kv_endpoints {
        Some(ep) => serde_json::json!({
            "enable_kv_cache_events": true,
            "publisher": "zmq",
            "endpoint": ep.endpoint,
            "replay_endpoint": ep.replay_endpoint,
            "buffer_steps": a.kv_events_buffer_steps,
            "hwm": 100_000,
            "max_queue_size": 100_000,
            "topic": a.kv_events_topic,
        }),
        None => serde_json::json!({
            "enable_kv_cache_events": false,
            "publisher": "null",
            "endpoint": "tcp://*:5557",
            "replay_endpoint": null,
            "buffer_steps": a.kv_events_buffer_steps,
            "hwm": 100_000,
            "max_queue_size": 100_000,
            "topic": a.kv_events_topic,
        }),
    };
    json_ok(&serde_json::json!({ "0": config }))
}

async fn reset_prefix_cache(State(app): State<Arc<App>>) -> Response {
    let (tx, rx) = oneshot::channel();
    if app.cmd.send(Command::Reset(tx)).is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "engine stopped", "ServiceUnavailableError", None);
    }
    match rx.await {
        Ok(true) => (StatusCode::OK, "Cache flushed.").into_response(),
        _ => (StatusCode::BAD_REQUEST, "Cache not flushed: requests are running.").into_response(),
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Prefill => "prefill",
        Role::Decode => "decode",
        Role::Both => "null",
    }
}

/// Splits `tcp://host:port` into host and port.
fn host_port(endpoint: &str) -> (String, Option<u16>) {
    let rest = endpoint.split_once("://").map_or(endpoint, |(_, r)| r);
    match rest.rsplit_once(':') {
        Some((h, p)) => (h.to_owned(), p.parse().ok()),
        None => (rest.to_owned(), None),
    }
}

async fn server_info(State(app): State<Arc<App>>) -> Response {
    let a = &app.args;
    let kv_events = app.kv_endpoints.as_ref().map(|ep| {
        let (host, port) = host_port(&ep.endpoint);
        let replay_port = ep.replay_endpoint.as_deref().and_then(|r| host_port(r).1);
        serde_json::json!({
            "endpoint_host": host,
            "endpoint_port_base": port,
            "replay_endpoint_port_base": replay_port,
            "topic": a.kv_events_topic,
            "block_size": a.block_size,
            "dp_size": 1,
        })
    });
    let kv_events_config = app.kv_endpoints.as_ref().map(|ep| {
        serde_json::json!({
            "publisher": "zmq",
            "endpoint": ep.endpoint,
            "replay_endpoint": ep.replay_endpoint,
            "topic": a.kv_events_topic,
        })
        .to_string()
    });
    let load = app.shared.load.lock().map(|l| *l).unwrap_or_default();
    json_ok(&serde_json::json!({
        "model_path": a.model,
        "served_model_name": a.model,
        "tokenizer_path": app.tokenizer.source(),
        "page_size": a.block_size,
        "max_running_requests": a.max_num_seqs,
        "max_total_num_tokens": a.kv_blocks * a.block_size,
        "chunked_prefill_size": a.max_num_batched_tokens,
        "context_length": a.max_model_len,
        "disaggregation_mode": role_name(a.role),
        "disaggregation_bootstrap_port": app.transfer_port,
        "kv_events_config": kv_events_config,
        "kv_events": kv_events,
        "dp_size": 1,
        "tp_size": 1,
        "random_seed": a.seed,
        "version": "0.5.23",
        "internal_states": [{ "num_running_reqs": load.running, "num_queue_reqs": load.waiting }],
    }))
}

async fn model_info(State(app): State<Arc<App>>) -> Response {
    json_ok(&serde_json::json!({
        "model_path": app.args.model,
        "tokenizer_path": app.tokenizer.source(),
        "is_generation": true,
        "preferred_sampling_params": null,
        "weight_version": "default",
        "has_image_understanding": false,
        "has_audio_understanding": false,
        "model_type": null,
        "architectures": null,
    }))
}

async fn get_load(State(app): State<Arc<App>>) -> Response {
    let load = app.shared.load.lock().map(|l| *l).unwrap_or_default();
    json_ok(&serde_json::json!([{
        "dp_rank": 0,
        "num_reqs": load.running + load.waiting,
        "num_waiting_reqs": load.waiting,
        "num_tokens": load.used_blocks * load.block_size,
    }]))
}

/// TRT-LLM's `GET /metrics`: the iteration stats queued since the last read.
async fn iteration_stats(State(app): State<Arc<App>>) -> Response {
    let drained: Vec<String> =
        app.shared.iteration_stats.lock().map(|mut q| q.drain(..).collect()).unwrap_or_default();
    json_response(StatusCode::OK, format!("[{}]", drained.join(",")))
}

/// TRT-LLM's `POST /kv_cache_events`: the KV events queued since the last call.
async fn kv_cache_events(State(app): State<Arc<App>>) -> Response {
    let body = match &app.shared.trtllm_events {
        Some(q) => q.lock().map(|mut q| q.drain_json()).unwrap_or_else(|_| "[]".to_owned()),
        None => "[]".to_owned(),
    };
    json_response(StatusCode::OK, body)
}

async fn completions(State(app): State<Arc<App>>, body: Bytes) -> Response {
    infer(app, Endpoint::Completions, body).await
}

async fn chat_completions(State(app): State<Arc<App>>, body: Bytes) -> Response {
    infer(app, Endpoint::ChatCompletions, body).await
}

/// A request refused before it reached the engine (boxed: a `Response` is large).
type Rejected = Box<Response>;

fn reject(message: &str, param: Option<&str>) -> Rejected {
    Box::new(bad_request(message, param))
}

/// Which part of a disaggregated request this is.
enum Leg {
    /// A whole request.
    Whole,
    /// vLLM prefill leg: hold the KV under `remote_request_id`.
    VllmPrefill,
    /// vLLM decode leg: pull the prefill worker's KV.
    VllmDecode(VllmKvParams),
    /// SGLang prefill leg: hold the KV under the room.
    SglangPrefill { room: u64 },
    /// SGLang decode leg: pull the room's KV from the bootstrap server.
    SglangDecode { host: String, port: u16, room: u64 },
    /// TRT-LLM context-only leg.
    TrtllmContext(TrtllmDisaggParams),
    /// TRT-LLM generation-only leg.
    TrtllmGeneration(TrtllmDisaggParams),
}

impl Leg {
    fn is_prefill(&self) -> bool {
        matches!(self, Leg::VllmPrefill | Leg::SglangPrefill { .. } | Leg::TrtllmContext(_))
    }

    fn is_decode(&self) -> bool {
        matches!(self, Leg::VllmDecode(_) | Leg::SglangDecode { .. } | Leg::TrtllmGeneration(_))
    }
}

fn leg_of(app: &App, pd: &PdFields) -> Result<Leg, Rejected> {
    let leg = match app.args.engine {
        EngineKind::Vllm => match &pd.kv_transfer_params {
            Some(p) if p.do_remote_decode => Leg::VllmPrefill,
            Some(p) if p.do_remote_prefill => Leg::VllmDecode(p.clone()),
            _ => Leg::Whole,
        },
        // SGLang reads the bootstrap fields only in a disaggregation mode.
        EngineKind::Sglang => match (pd.bootstrap_room, app.args.role) {
            (Some(room), Role::Prefill) => Leg::SglangPrefill { room },
            (Some(room), Role::Decode) => {
                let Some(host) = pd.bootstrap_host.clone() else {
                    return Err(reject("bootstrap_host is required in decode mode", Some("bootstrap_host")));
                };
                // SGLang substitutes its own bootstrap port for a null one.
                let port = pd.bootstrap_port.or(app.args.kv_transfer_port).unwrap_or(8998);
                Leg::SglangDecode { host, port, room }
            }
            _ => Leg::Whole,
        },
        EngineKind::Trtllm => match &pd.disaggregated_params {
            Some(p) if p.request_type == "context_only" => Leg::TrtllmContext(p.clone()),
            Some(p) if p.request_type == "generation_only" => Leg::TrtllmGeneration(p.clone()),
            Some(p) => {
                return Err(reject(
                    &format!("unknown disaggregated_params.request_type {:?}", p.request_type),
                    Some("disaggregated_params.request_type"),
                ));
            }
            None => Leg::Whole,
        },
    };
    let role = app.args.role;
    if leg.is_prefill() && role == Role::Decode {
        return Err(reject("this worker's role is decode; it takes no prefill leg", None));
    }
    if leg.is_decode() && role == Role::Prefill {
        return Err(reject("this worker's role is prefill; it takes no decode leg", None));
    }
    Ok(leg)
}

/// The prompts of a request as token ids, in choice order (before `n`).
fn prompts(app: &App, req: &InferenceRequest<'_>, pd: &PdFields) -> Result<Vec<Vec<TokenId>>, Rejected> {
    let enc = |text: &str, add: bool| app.tokenizer.encode(text, add).map_err(|e| reject(&e, Some("prompt")));
    let out = match req {
        InferenceRequest::Completion(c) => match &c.prompt {
            Prompt::Text(t) => vec![enc(t, c.add_special_tokens)?],
            Prompt::Texts(ts) => ts.iter().map(|t| enc(t, c.add_special_tokens)).collect::<Result<_, _>>()?,
            Prompt::Tokens(ids) => vec![ids.clone()],
            Prompt::TokenBatches(b) => b.clone(),
        },
        InferenceRequest::Chat(chat) => match &pd.prompt_token_ids {
            // TRT-LLM's generation leg carries the context server's tokens instead of re-rendering.
            Some(ids) if app.args.engine == EngineKind::Trtllm => vec![ids.clone()],
            _ => {
                let text = app.tokenizer.render_chat(chat).map_err(|e| reject(&e, Some("messages")))?;
                vec![enc(&text, chat.add_special_tokens)?]
            }
        },
    };
    if out.iter().any(Vec::is_empty) {
        return Err(reject("the prompt is empty after tokenization", Some("prompt")));
    }
    Ok(out)
}

/// Sends `Abort` for the request's sequences if the handler stops before they finish.
struct AbortOnDrop {
    cmd: mpsc::UnboundedSender<Command>,
    ids: Vec<u64>,
    app: Arc<App>,
    armed: bool,
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.app.inflight.fetch_sub(1, Ordering::Relaxed);
        if self.armed {
            let _ = self.cmd.send(Command::Abort(std::mem::take(&mut self.ids)));
        }
    }
}

async fn infer(app: Arc<App>, endpoint: Endpoint, body: Bytes) -> Response {
    let req = match parse_request(endpoint, &body, &RequestLimits::default()) {
        Ok(r) => r,
        Err(e) => return request_error(&e),
    };
    if req.model() != app.args.model {
        return error(
            StatusCode::NOT_FOUND,
            &format!("The model `{}` does not exist.", req.model()),
            "NotFoundError",
            Some("model"),
        );
    }
    let pd: PdFields = match serde_json::from_slice(&body) {
        Ok(pd) => pd,
        Err(e) => return bad_request(&format!("invalid disaggregation field: {e}"), None),
    };
    let leg = match leg_of(&app, &pd) {
        Ok(l) => l,
        Err(r) => return *r,
    };
    let prompts = match prompts(&app, &req, &pd) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let n = req.n() as usize;
    if (leg.is_prefill() || leg.is_decode()) && (n != 1 || prompts.len() != 1) {
        return bad_request("a disaggregated request takes one prompt and n = 1", Some("n"));
    }
    let a = &app.args;
    let requested = req.max_output_tokens().map(|m| m as usize);
    for p in &prompts {
        let want = p.len() + requested.unwrap_or(1);
        if want > a.max_model_len {
            return bad_request(
                &format!(
                    "This model's maximum context length is {} tokens. However, you requested {want} tokens \
                     ({} in the messages, {} in the completion). Please reduce the length of the messages or completion.",
                    a.max_model_len,
                    p.len(),
                    requested.unwrap_or(1)
                ),
                Some("max_tokens"),
            );
        }
        if want.div_ceil(a.block_size) > a.kv_blocks {
            return bad_request(
                &format!(
                    "the request needs {} KV blocks; this worker has {}",
                    want.div_ceil(a.block_size),
                    a.kv_blocks
                ),
                Some("max_tokens"),
            );
        }
    }

    let request_no = app.next_id.fetch_add(1, Ordering::Relaxed);
    app.inflight.fetch_add(1, Ordering::Relaxed);
    let mut guard = AbortOnDrop { cmd: app.cmd.clone(), ids: Vec::new(), app: app.clone(), armed: false };

    // Decode legs first receive the prompt's KV from the prefill worker.
    let mut remote_tokens = 0;
    let mut preset = Vec::new();
    if let Some(source) = pull_source(&leg) {
        let (host, port, key) = source;
        let wait = app.shared.clock.real(a.kv_lease_secs);
        app.shared.awaiting_transfer.fetch_add(1, Ordering::Relaxed);
        let pulled = pull(&host, port, &key, wait).await;
        app.shared.awaiting_transfer.fetch_sub(1, Ordering::Relaxed);
        match pulled {
            Ok(info) => {
                let prompt_len = prompts[0].len();
                let tokens = info.tokens.min(prompt_len);
                remote_tokens = match leg {
                    // vLLM always recomputes the last prompt token to get its logits.
                    Leg::VllmDecode(_) => tokens.min(prompt_len - 1),
                    _ => tokens,
                };
                let bytes = remote_tokens as f64 * a.kv_bytes_per_token as f64;
                tokio::time::sleep(app.shared.clock.real(bytes / (a.transfer_gbps * 1e9 / 8.0))).await;
                match &leg {
                    Leg::TrtllmGeneration(p) => preset = p.first_gen_tokens.clone().unwrap_or_default(),
                    Leg::SglangDecode { .. } => preset = info.first_token.into_iter().collect(),
                    _ => {}
                }
            }
            Err(e) if matches!(leg, Leg::VllmDecode(_)) => {
                tracing::warn!(error = %e, "KV pull failed; recomputing the prompt locally");
            }
            Err(e) => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &format!("KV transfer failed: {e}"),
                    "InternalServerError",
                    None,
                );
            }
        }
    }

    let (tx, rx) = mpsc::unbounded_channel();
    let salt: Option<Arc<str>> = req.cache_salt().map(Arc::from);
    let mut specs = Vec::new();
    for (pi, prompt) in prompts.iter().enumerate() {
        for j in 0..n {
            let choice = (pi * n + j) as u32;
            let seed = hash_block(None, prompt, BlockSalt(a.seed).with(j as u64)).0;
            let (max_tokens, ends_naturally) = match leg {
                // Prefill legs stop after the first token, whatever the client asked for.
                Leg::SglangPrefill { .. } | Leg::TrtllmContext(_) => (1, false),
                _ => match requested {
                    Some(m) => (m, false),
                    None => {
                        let room = a.max_model_len - prompt.len();
                        ((1 + (seed % a.default_max_tokens as u64) as usize).min(room), true)
                    }
                },
            };
            let hold_key = match &leg {
                Leg::VllmPrefill => Some(format!("{}-{request_no}", app.engine_id)),
                Leg::SglangPrefill { room } => Some(room.to_string()),
                Leg::TrtllmContext(_) => Some(request_no.to_string()),
                _ => None,
            };
            let id = (request_no << 20) | u64::from(choice);
            guard.ids.push(id);
            specs.push(SeqSpec {
                choice,
                prompt: prompt.clone(),
                max_tokens,
                ends_naturally,
                cache_salt: salt.clone(),
                remote_tokens,
                preset_output: preset.clone(),
                hold_key,
                sink: tx.clone(),
                seed,
                arrival: app.shared.clock.now(),
                id,
            });
        }
    }
    drop(tx);
    if app.cmd.send(Command::Submit(specs)).is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "engine stopped", "ServiceUnavailableError", None);
    }
    guard.armed = true;
    let meta = ResponseMeta {
        id: format!(
            "{}-{:08x}{request_no:08x}",
            if endpoint == Endpoint::Completions { "cmpl" } else { "chatcmpl" },
            a.seed as u32
        ),
        request_no,
        created: app.created,
        model: a.model.clone(),
        endpoint,
        prompt_lens: prompts.iter().map(Vec::len).collect(),
        n,
    };
    if req.stream() && !leg.is_prefill() {
        stream_response(app.clone(), meta, rx, guard, req.include_usage()).await
    } else {
        let include_prompt_ids = matches!(leg, Leg::TrtllmContext(_));
        let prompt_ids = if include_prompt_ids { prompts.first().cloned() } else { None };
        full_response(&app, meta, rx, guard, leg, prompt_ids).await
    }
}

/// Where a decode leg pulls its KV from: `(host, port, key)`.
fn pull_source(leg: &Leg) -> Option<(String, u16, String)> {
    match leg {
        Leg::VllmDecode(p) => {
            let host = p.remote_host.clone()?;
            let port = p.remote_port?;
            Some((host, port, p.remote_request_id.clone()?))
        }
        Leg::SglangDecode { host, port, room } => Some((host.clone(), *port, room.to_string())),
        Leg::TrtllmGeneration(p) => {
            let state = p.encoded_opaque_state.as_deref()?;
            let bytes = base64::engine::general_purpose::STANDARD.decode(state).ok()?;
            let state: OpaqueState = serde_json::from_slice(&bytes).ok()?;
            Some((state.host, state.port, p.ctx_request_id?.to_string()))
        }
        _ => None,
    }
}

struct ResponseMeta {
    id: String,
    request_no: u64,
    created: u64,
    model: String,
    endpoint: Endpoint,
    prompt_lens: Vec<usize>,
    n: usize,
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: usize,
    total_tokens: usize,
    completion_tokens: usize,
    prompt_tokens_details: PromptTokensDetails,
}

#[derive(Serialize)]
struct PromptTokensDetails {
    cached_tokens: usize,
}

/// Usage over all choices: each prompt counted once (not per `n`), every choice's output.
fn usage(meta: &ResponseMeta, finished: &[Option<Finished>]) -> Usage {
    let prompt_tokens: usize = meta.prompt_lens.iter().sum();
    let completion_tokens = finished.iter().flatten().map(|f| f.completion_tokens).sum();
    let cached_tokens = finished
        .iter()
        .flatten()
        .filter(|f| (f.choice as usize).is_multiple_of(meta.n))
        .map(|f| f.cached_tokens)
        .sum();
    Usage {
        prompt_tokens,
        total_tokens: prompt_tokens + completion_tokens,
        completion_tokens,
        prompt_tokens_details: PromptTokensDetails { cached_tokens },
    }
}

async fn full_response(
    app: &Arc<App>,
    meta: ResponseMeta,
    mut rx: mpsc::UnboundedReceiver<SeqUpdate>,
    mut guard: AbortOnDrop,
    leg: Leg,
    prompt_token_ids: Option<Vec<TokenId>>,
) -> Response {
    let choices = meta.prompt_lens.len() * meta.n;
    let mut texts = vec![String::new(); choices];
    let mut tokens: Vec<Vec<TokenId>> = vec![Vec::new(); choices];
    let mut finished: Vec<Option<Finished>> = vec![None; choices];
    while let Some(update) = rx.recv().await {
        match update {
            SeqUpdate::Token { choice, id } => {
                if let Some(t) = texts.get_mut(choice as usize) {
                    t.push_str(app.filler_text.get(&id).map_or("", String::as_str));
                }
                if let Some(t) = tokens.get_mut(choice as usize) {
                    t.push(id);
                }
            }
            SeqUpdate::Finished(f) => {
                let i = f.choice as usize;
                if let Some(slot) = finished.get_mut(i) {
                    *slot = Some(f);
                }
            }
        }
    }
    guard.armed = false;
    let reason = |i: usize| finished[i].as_ref().map_or("abort", |f| f.reason.as_str());
    let usage = usage(&meta, &finished);
    let held = finished.first().and_then(|f| f.as_ref()).filter(|f| f.reason != FinishReason::Abort);
    let kv_transfer_params = match (&leg, held.and_then(|f| f.held_block_ids.clone())) {
        (Leg::VllmPrefill, Some(block_ids)) => Some(VllmKvParams {
            do_remote_decode: false,
            do_remote_prefill: true,
            remote_block_ids: Some(vec![block_ids]),
            remote_engine_id: Some(app.engine_id.clone()),
            remote_request_id: Some(format!("{}-{}", app.engine_id, meta.request_no)),
            remote_host: Some(app.advertise_host.clone()),
            remote_port: app.transfer_port,
            tp_size: Some(1),
            remote_num_tokens: held.map(|f| f.prompt_tokens),
        }),
        _ => None,
    };
    let disaggregated_params = match &leg {
        Leg::TrtllmContext(p) => {
            let opaque = serde_json::to_vec(&OpaqueState {
                host: app.advertise_host.clone(),
                port: app.transfer_port.unwrap_or(0),
            })
            .unwrap_or_default();
            Some(TrtllmDisaggParams {
                request_type: "context_only".to_owned(),
                first_gen_tokens: Some(tokens[0].clone()),
                ctx_request_id: Some(meta.request_no),
                encoded_opaque_state: Some(base64::engine::general_purpose::STANDARD.encode(opaque)),
                draft_tokens: None,
                disagg_request_id: p.disagg_request_id,
                ctx_dp_rank: Some(0),
                ctx_info_endpoint: None,
                schedule_style: p.schedule_style,
            })
        }
        _ => None,
    };
    match meta.endpoint {
        Endpoint::Completions => {
            let choices: Vec<_> = (0..choices)
                .map(|i| CompletionChoice {
                    index: i,
                    text: std::mem::take(&mut texts[i]),
                    logprobs: None,
                    finish_reason: Some(reason(i)),
                    stop_reason: None,
                    disaggregated_params: if i == 0 { disaggregated_params.clone() } else { None },
                })
                .collect();
            json_ok(&CompletionResponse {
                id: &meta.id,
                object: "text_completion",
                created: meta.created,
                model: &meta.model,
                choices,
                usage,
                kv_transfer_params,
                prompt_token_ids,
            })
        }
        Endpoint::ChatCompletions => {
            let choices: Vec<_> = (0..choices)
                .map(|i| ChatChoice {
                    index: i,
                    message: ChatMessageOut {
                        role: "assistant",
                        content: std::mem::take(&mut texts[i]),
                        reasoning_content: None,
                        tool_calls: Vec::new(),
                    },
                    logprobs: None,
                    finish_reason: Some(reason(i)),
                    stop_reason: None,
                    disaggregated_params: if i == 0 { disaggregated_params.clone() } else { None },
                })
                .collect();
            json_ok(&ChatResponse {
                id: &meta.id,
                object: "chat.completion",
                created: meta.created,
                model: &meta.model,
                choices,
                usage,
                kv_transfer_params,
                prompt_token_ids,
            })
        }
    }
}

#[derive(Serialize)]
struct CompletionChoice {
    index: usize,
    text: String,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
    stop_reason: Option<()>,
    #[serde(skip_serializing_if = "Option::is_none")]
    disaggregated_params: Option<TrtllmDisaggParams>,
}

#[derive(Serialize)]
struct CompletionResponse<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<CompletionChoice>,
    usage: Usage,
    #[serde(skip_serializing_if = "Option::is_none")]
    kv_transfer_params: Option<VllmKvParams>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_token_ids: Option<Vec<TokenId>>,
}

#[derive(Serialize)]
struct ChatMessageOut {
    role: &'static str,
    content: String,
    reasoning_content: Option<()>,
    tool_calls: Vec<()>,
}

#[derive(Serialize)]
struct ChatChoice {
    index: usize,
    message: ChatMessageOut,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
    stop_reason: Option<()>,
    #[serde(skip_serializing_if = "Option::is_none")]
    disaggregated_params: Option<TrtllmDisaggParams>,
}

#[derive(Serialize)]
struct ChatResponse<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<ChatChoice>,
    usage: Usage,
    #[serde(skip_serializing_if = "Option::is_none")]
    kv_transfer_params: Option<VllmKvParams>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_token_ids: Option<Vec<TokenId>>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: usize,
    text: &'a str,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
    stop_reason: Option<()>,
}

#[derive(Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

#[derive(Serialize)]
struct ChatChunkChoice<'a> {
    index: usize,
    delta: Delta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct Chunk<'a, C: Serialize> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<C>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

/// One SSE `data:` event with a JSON body.
fn sse_json<T: Serialize>(value: &T) -> Event {
    Event::default().data(serde_json::to_string(value).unwrap_or_default())
}

async fn stream_response(
    app: Arc<App>,
    meta: ResponseMeta,
    mut rx: mpsc::UnboundedReceiver<SeqUpdate>,
    mut guard: AbortOnDrop,
    include_usage: bool,
) -> Response {
    let (tx, out) = mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(async move {
        let choices = meta.prompt_lens.len() * meta.n;
        let chat = meta.endpoint == Endpoint::ChatCompletions;
        let object = if chat { "chat.completion.chunk" } else { "text_completion" };
        if chat {
            for i in 0..choices {
                let c = ChatChunkChoice {
                    index: i,
                    delta: Delta { role: Some("assistant"), content: Some("") },
                    logprobs: None,
                    finish_reason: None,
                };
                let ev = sse_json(&Chunk {
                    id: &meta.id,
                    object,
                    created: meta.created,
                    model: &meta.model,
                    choices: vec![c],
                    usage: None,
                });
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
        }
        let mut finished: Vec<Option<Finished>> = vec![None; choices];
        while let Some(update) = rx.recv().await {
            let ev = match update {
                SeqUpdate::Token { choice, id } => {
                    let text = app.filler_text.get(&id).map_or("", String::as_str);
                    token_chunk(&meta, object, choice as usize, text, None)
                }
                SeqUpdate::Finished(f) => {
                    let i = f.choice as usize;
                    let reason = f.reason.as_str();
                    if let Some(slot) = finished.get_mut(i) {
                        *slot = Some(f);
                    }
                    token_chunk(&meta, object, i, "", Some(reason))
                }
            };
            if tx.send(Ok(ev)).await.is_err() {
                return; // the client left: dropping the guard aborts the sequences
            }
        }
        guard.armed = false;
        if include_usage {
            let usage = Some(usage(&meta, &finished));
            let ev = if chat {
                sse_json(&Chunk::<ChatChunkChoice> {
                    id: &meta.id,
                    object,
                    created: meta.created,
                    model: &meta.model,
                    choices: vec![],
                    usage,
                })
            } else {
                sse_json(&Chunk::<ChunkChoice> {
                    id: &meta.id,
                    object,
                    created: meta.created,
                    model: &meta.model,
                    choices: vec![],
                    usage,
                })
            };
            let _ = tx.send(Ok(ev)).await;
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
        drop(guard);
    });
    Sse::new(ReceiverStream::new(out)).into_response()
}

fn token_chunk(
    meta: &ResponseMeta,
    object: &'static str,
    index: usize,
    text: &str,
    reason: Option<&'static str>,
) -> Event {
    if meta.endpoint == Endpoint::ChatCompletions {
        let content = if reason.is_some() { None } else { Some(text) };
        let c = ChatChunkChoice {
            index,
            delta: Delta { role: None, content },
            logprobs: None,
            finish_reason: reason,
        };
        sse_json(&Chunk {
            id: &meta.id,
            object,
            created: meta.created,
            model: &meta.model,
            choices: vec![c],
            usage: None,
        })
    } else {
        let c = ChunkChoice { index, text, logprobs: None, finish_reason: reason, stop_reason: None };
        sse_json(&Chunk {
            id: &meta.id,
            object,
            created: meta.created,
            model: &meta.model,
            choices: vec![c],
            usage: None,
        })
    }
}
