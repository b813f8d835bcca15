//! One VM's routing state and the request pipeline over kvmesh-core: parse, render, tokenize, hash,
//! score. No host calls here (time comes in as an argument), so it is unit-tested natively.
//!
//! State: static workers and models from the plugin configuration; the control plane's workers,
//! loads, index and per-model policies (applied in `apply.rs`); this proxy's own recent decisions
//! (the policy's optimistic or approx-prefix entries) and its in-flight requests per worker. When
//! the control plane's state is older than its TTL, requests are routed on load alone and say so.

use std::collections::HashMap;

use kvmesh_core::hash::{BlockSalt, hash_prompt};
use kvmesh_core::request::{
    Endpoint, InferenceRequest, Prompt, RequestError, RequestLimits, openai_error_body, parse_request,
};
use kvmesh_core::template::{ChatLayout, ChatTemplate, RenderOptions, RenderPath, RenderedChat};
use kvmesh_core::tokenize::{BlockWalk, Encoder, SegmentCacheConfig};
use kvmesh_core::{
    BlockHash, Fleet, Outcome, Policy, PolicyKind, PrefixIndex, RouteInput, RoutingConfig, Scorer,
    SplitMix64, TokenId, Tokenizer, TokenizerFiles, WorkerInfo, WorkerSlot,
};
use serde_json::value::RawValue;

use crate::config::{Error, FilterConfig};

/// Block size assumed for a model no worker serves yet (its requests get 503 anyway).
const DEFAULT_BLOCK_SIZE: u32 = 16;

/// Blocks the fleet index holds before evicting (the control plane's index, as streamed).
const INDEX_MAX_BLOCKS: usize = 1 << 20;

/// Bytes per token assumed when a prompt cannot be tokenized yet (its model's tokenizer is still
/// loading): the load score then works on an estimate.
const ESTIMATED_BYTES_PER_TOKEN: u64 = 4;

/// A served model: its tokenizer and compiled default chat template, loaded once per VM.
pub(crate) struct Model {
    pub(crate) tokenizer: Tokenizer,
    /// Encodes through a per-segment id cache: a repeated system prompt or earlier chat turn costs a
    /// lookup, not a tokenization (ids equal the uncached ones; see kvmesh-core's segment cache tests).
    encoder: Encoder,
    /// `None` when the model ships no chat template (its chat requests get 400).
    template: Option<ChatTemplate>,
    pub(crate) block_size: u32,
    /// Identity of the tokenizer files (the control plane's `tokenizer_id`; empty when static).
    pub(crate) tokenizer_id: String,
}

impl Model {
    /// Loads a model's tokenizer and default template.
    pub(crate) fn load(
        name: &str,
        files: TokenizerFiles<'_>,
        block_size: u32,
        tokenizer_id: String,
        cache: SegmentCacheConfig,
    ) -> Result<Model, Error> {
        let tokenizer = Tokenizer::from_files(files)
            .map_err(|e| Error::Model { model: name.to_owned(), source: e.into() })?;
        // Compiling costs far more than rendering: once per VM, not per request.
        let template = tokenizer.chat_template(None, false).ok();
        let encoder = tokenizer.encoder(cache);
        Ok(Model { tokenizer, encoder, template, block_size, tokenizer_id })
    }

    /// The same model for another thread: the loaded tokenizer shared, its own template, encoder
    /// and caches.
    pub(crate) fn fork(&self, cache: SegmentCacheConfig) -> Model {
        Model {
            tokenizer: self.tokenizer.clone(),
            encoder: self.tokenizer.encoder(cache),
            template: self.tokenizer.chat_template(None, false).ok(),
            block_size: self.block_size,
            tokenizer_id: self.tokenizer_id.clone(),
        }
    }
}

/// Why a request was not routed, with the HTTP status it is answered with.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RejectKind {
    /// Malformed body or unrenderable chat (400).
    BadRequest,
    /// Body over the limit (413).
    TooLarge,
    /// No such model here (404).
    UnknownModel,
    /// No eligible worker (503).
    NoWorker,
    /// Every eligible worker is overloaded (429).
    Shed,
    /// The tokenizer failed on valid input: a bug or an unsupported model (500).
    Internal,
    /// The fleet is not known yet: no state from the control plane (503).
    NotReady,
}

impl RejectKind {
    /// The HTTP status.
    pub fn status(self) -> u16 {
        match self {
            RejectKind::BadRequest => 400,
            RejectKind::TooLarge => 413,
            RejectKind::UnknownModel => 404,
            RejectKind::NoWorker => 503,
            RejectKind::Shed => 429,
            RejectKind::Internal => 500,
            RejectKind::NotReady => 503,
        }
    }

    /// Whether the filter, not the request, is why it was not routed: the configured failure
    /// mode then decides between this answer and forwarding it unrouted.
    pub fn is_own_failure(self) -> bool {
        matches!(self, RejectKind::Internal | RejectKind::NotReady)
    }
}

/// A request that is answered by the filter instead of a worker.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Rejected {
    /// What went wrong.
    pub kind: RejectKind,
    /// The OpenAI-style JSON error body.
    pub body: String,
}

impl Rejected {
    fn new(kind: RejectKind, message: &str, error_type: &str) -> Rejected {
        Rejected { kind, body: openai_error_body(message, error_type, None, kind.status()) }
    }

    fn request(err: &RequestError) -> Rejected {
        let kind = if err.status() == 413 { RejectKind::TooLarge } else { RejectKind::BadRequest };
        Rejected { kind, body: err.error_body() }
    }
}

/// A routed request: where it goes and what it holds there until it completes.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Routed {
    /// The override-host header value, `ip:port[,fallback…]`.
    pub destination: String,
    /// The chosen worker.
    pub worker: WorkerSlot,
    /// Prompt tokens in the request.
    pub prompt_tokens: u64,
    /// Leading blocks predicted cached on the chosen worker.
    pub overlap_blocks: u32,
    /// Prompt tokens the worker must prefill (counted in flight until the first byte of the
    /// response, or the end of the request).
    pub prefill_tokens: u64,
    /// Whether `prefill_tokens` no longer count in flight ([`Router::prefill_done`]).
    pub prefill_done: bool,
    /// Blocks the request holds (counted in flight until the request ends).
    pub request_blocks: u64,
    /// Block size the prompt was hashed with.
    pub block_size: u32,
    /// The policy that decided.
    pub policy: PolicyKind,
    /// How it was decided, when not normally.
    pub degraded: Option<Degraded>,
    /// How its chat was rendered (`None`: not a chat, or not rendered).
    pub render: Option<RenderPath>,
}

/// Why a request was routed on less than the full picture.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Degraded {
    /// The control plane's state is older than its TTL (or never arrived): load alone decided.
    StaleState,
    /// The model's tokenizer is not loaded yet: load alone decided, on an estimated prompt length.
    NoTokenizer,
}

/// One VM's routing state.
pub struct Router {
    pub(crate) fleet: Fleet,
    pub(crate) index: PrefixIndex,
    /// The configured policy, for models the control plane gives none.
    pub(crate) default_policy: Policy,
    /// Per-model policies from the control plane.
    pub(crate) policies: HashMap<String, Policy>,
    /// What decides while the state is stale: load-only with the configured limits.
    stale_policy: Policy,
    scorer: Scorer,
    rng: SplitMix64,
    pub(crate) models: HashMap<String, Model>,
    pub(crate) segment_cache: SegmentCacheConfig,
    limits: RequestLimits,
    /// Control-plane worker handles to fleet slots (valid within the applied stream epoch).
    pub(crate) handles: HashMap<u32, WorkerSlot>,
    /// `Some(ttl)` when the fleet comes from the control plane.
    state_ttl_ms: Option<u64>,
    /// When the control plane was last heard from (through the state service), host clock ms.
    state_heard_at_ms: Option<u64>,
    /// Whether kv-aware stops exact tokenization at the first block no one holds.
    early_exit: bool,
    /// The control plane's block hash version when it is not this filter's (its index is ignored).
    pub(crate) foreign_hash_version: Option<u32>,
    /// Reused per request: the prompt's block hashes.
    hashes: Vec<BlockHash>,
    /// Reused per request: each worker's cached prefix, counted during kv-aware's walk.
    runs: Vec<u32>,
}

impl Router {
    /// Loads every static model's tokenizer and template and registers the static workers.
    pub fn new(config: &FilterConfig) -> Result<Router, Error> {
        // A bad policy fails before the tokenizers' seconds of loading.
        let policies = Router::policies(config)?;
        let segment_cache = config.segment_cache.to_core();
        let mut models = HashMap::with_capacity(config.models.len());
        for m in &config.models {
            let files = TokenizerFiles {
                tokenizer_json: m.tokenizer.get(),
                tokenizer_config_json: m.tokenizer_config.as_deref().map(RawValue::get),
                chat_template_jinja: m.chat_template.as_deref(),
            };
            let block_size = config
                .workers
                .iter()
                .find(|w| w.model == m.name)
                .map_or(DEFAULT_BLOCK_SIZE, |w| w.block_size);
            models.insert(
                m.name.clone(),
                Model::load(&m.name, files, block_size, String::new(), segment_cache)?,
            );
        }
        Router::with_models(config, models, policies)
    }

    /// A router for another thread of this process, from `config` (the one this router was made
    /// from): its loaded models shared, not loaded again; its own caches, fleet view and recent
    /// decisions.
    pub fn fork(&self, config: &FilterConfig) -> Result<Router, Error> {
        let policies = Router::policies(config)?;
        let models = self.models.iter().map(|(name, m)| (name.clone(), m.fork(self.segment_cache))).collect();
        Router::with_models(config, models, policies)
    }

    /// The configured policy, and the load-only one for stale state.
    fn policies(config: &FilterConfig) -> Result<(Policy, Policy), Error> {
        let routing = config.routing();
        let invalid =
            |e: kvmesh_core::Error| Error::Invalid { field: "routing".to_owned(), reason: e.to_string() };
        let default_policy = Policy::new(routing).map_err(invalid)?;
        let stale_policy =
            Policy::new(RoutingConfig { policy: PolicyKind::LoadOnly, ..routing }).map_err(invalid)?;
        Ok((default_policy, stale_policy))
    }

    /// A router for `config` with its `models` loaded and its `(default, stale)` policies.
    fn with_models(
        config: &FilterConfig,
        models: HashMap<String, Model>,
        (default_policy, stale_policy): (Policy, Policy),
    ) -> Result<Router, Error> {
        let segment_cache = config.segment_cache.to_core();
        let mut router = Router {
            fleet: Fleet::new(),
            index: PrefixIndex::new(INDEX_MAX_BLOCKS),
            default_policy,
            policies: HashMap::new(),
            stale_policy,
            scorer: Scorer::new(),
            rng: SplitMix64::new(0x6b76_6d65_7368),
            models,
            segment_cache,
            limits: RequestLimits { max_body_bytes: config.max_body_bytes },
            handles: HashMap::new(),
            state_ttl_ms: config.state.map(|s| s.ttl_ms),
            state_heard_at_ms: None,
            early_exit: config.early_exit,
            foreign_hash_version: None,
            hashes: Vec::new(),
            runs: Vec::new(),
        };
        router.apply_fleet(config.workers.iter().cloned())?;
        Ok(router)
    }

    /// Records when the control plane was last heard from (host clock ms).
    pub fn set_state_heard_at(&mut self, heard_at_ms: Option<u64>) {
        self.state_heard_at_ms = heard_at_ms;
    }

    /// Whether the control plane's state counts as stale at `now_ms` (never when there is none).
    pub fn state_is_stale(&self, now_ms: u64) -> bool {
        match (self.state_ttl_ms, self.state_heard_at_ms) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(ttl), Some(at)) => now_ms.saturating_sub(at) > ttl,
        }
    }

    /// Whether anything is to be routed: a static model, or the control plane's state to follow.
    /// Without either the filter passes everything through.
    pub fn routes_anything(&self) -> bool {
        !self.models.is_empty() || self.state_ttl_ms.is_some()
    }

    /// The control plane's block hash version when it differs from this filter's, so that its
    /// KV index is ignored.
    pub fn foreign_hash_version(&self) -> Option<u32> {
        self.foreign_hash_version
    }

    /// Models loaded.
    pub fn model_count(&self) -> usize {
        self.models.len()
    }

    /// Workers in the fleet.
    pub fn worker_count(&self) -> usize {
        self.fleet.len()
    }

    /// Longest request body routed, in bytes.
    pub fn max_body_bytes(&self) -> usize {
        self.limits.max_body_bytes
    }

    /// Adds or updates static workers (from the plugin configuration).
    pub fn apply_fleet(&mut self, workers: impl IntoIterator<Item = WorkerInfo>) -> Result<(), Error> {
        for worker in workers {
            let id = worker.id.to_string();
            self.fleet
                .upsert(worker)
                .map_err(|e| Error::Invalid { field: format!("workers[{id}]"), reason: e.to_string() })?;
        }
        Ok(())
    }

    /// Routes one request body sent to `endpoint` at `now_ms` (host clock, milliseconds), and
    /// counts it in flight on the chosen worker; call [`Router::finish`] when it ends.
    pub fn route(
        &mut self,
        endpoint: Endpoint,
        body: &[u8],
        now_ms: u64,
        now_unix_seconds: i64,
    ) -> Result<Routed, Rejected> {
        let request = parse_request(endpoint, body, &self.limits).map_err(|e| Rejected::request(&e))?;
        let model_name = request.model();
        self.hashes.clear();
        let stale = self.state_is_stale(now_ms);
        let mut render = None;
        // Whether kv-aware's walk counted the overlaps (into `runs`) as it went.
        let mut walked = false;
        let (block_size, prompt_tokens, degraded) = match self.models.get_mut(model_name) {
            Some(model) if stale => {
                // Load alone decides: the prompt's blocks would not be looked at.
                let estimate = (body.len() as u64).div_ceil(ESTIMATED_BYTES_PER_TOKEN);
                (model.block_size, estimate, Some(Degraded::StaleState))
            }
            Some(model) => {
                let policy = self.policies.get(model_name).unwrap_or(&self.default_policy);
                let Model { tokenizer, encoder, template, block_size, .. } = model;
                let (input, rendered) =
                    prompt_input(tokenizer, template.as_ref(), &request, now_unix_seconds)?;
                render = rendered;
                let salt = BlockSalt::for_request(None, request.cache_salt());
                let block_size = *block_size;
                let prompt_tokens = match &input {
                    PromptInput::Tokens(ids) => {
                        hash_prompt(ids, block_size as usize, salt, &mut self.hashes);
                        ids.len() as u64
                    }
                    // kv-aware only needs exact ids as far as some worker holds the prefix: stop
                    // at the first block with which no worker continues its cached prefix (in
                    // the fleet's index or this proxy's recent decisions), and estimate the rest
                    // of the length from its bytes. The walk counts each worker's prefix as it
                    // goes, so scoring reads neither index again.
                    PromptInput::Text { text, add_special_tokens }
                        if self.early_exit && policy.kind() == PolicyKind::KvAware =>
                    {
                        let (index, runs) = (&self.index, &mut self.runs);
                        runs.clear();
                        runs.resize(self.fleet.slot_bound(), 0);
                        let mut depth = 0;
                        let held = |h| {
                            let grew = policy.extend_runs(index, h, depth, runs, now_ms);
                            depth += 1;
                            grew
                        };
                        let walk = text
                            .walk(encoder, *add_special_tokens, block_size as usize, salt, held)
                            .map_err(|e| internal(&e))?;
                        self.hashes.extend_from_slice(walk.hashes);
                        walked = true;
                        walk.total_tokens as u64
                    }
                    // Every block, exactly: the same walk that never stops (cached segments and
                    // turns replay their block hashes).
                    PromptInput::Text { text, add_special_tokens } => {
                        let walk = text
                            .walk(encoder, *add_special_tokens, block_size as usize, salt, |_| true)
                            .map_err(|e| internal(&e))?;
                        self.hashes.extend_from_slice(walk.hashes);
                        walk.total_tokens as u64
                    }
                };
                (block_size, prompt_tokens, None)
            }
            None => match self.fleet.iter().find(|(_, e)| e.info.model == model_name) {
                // Served, but its tokenizer is still on its way: route on load, estimate the length.
                Some((_, entry)) => {
                    let estimate = (body.len() as u64).div_ceil(ESTIMATED_BYTES_PER_TOKEN);
                    (entry.info.block_size, estimate, Some(Degraded::NoTokenizer))
                }
                None if self.state_ttl_ms.is_some() && self.state_heard_at_ms.is_none() => {
                    let message = "the fleet is not known yet (no state from the control plane)";
                    return Err(Rejected::new(RejectKind::NotReady, message, "ServiceUnavailableError"));
                }
                None => {
                    let message = format!("The model `{model_name}` does not exist.");
                    return Err(Rejected::new(RejectKind::UnknownModel, &message, "NotFoundError"));
                }
            },
        };

        let input = RouteInput {
            model: model_name,
            hashes: &self.hashes,
            prompt_tokens,
            expected_output_tokens: request.max_output_tokens().map(u64::from),
            block_size,
            now_ms,
        };
        let policy = match degraded {
            Some(_) => &mut self.stale_policy,
            None => self.policies.get_mut(model_name).unwrap_or(&mut self.default_policy),
        };
        let policy_kind = policy.kind();
        let decision = if walked && degraded.is_none() {
            self.scorer.route_walked(policy, &input, &self.runs, &self.fleet, &mut self.rng)
        } else {
            self.scorer.route(policy, &input, &self.fleet, &self.index, &mut self.rng)
        };
        let worker = match decision.outcome {
            Outcome::Routed(worker) => worker,
            Outcome::Shed => {
                let message = "every worker of this model is overloaded; retry later";
                return Err(Rejected::new(RejectKind::Shed, message, "RateLimitError"));
            }
            Outcome::NoWorker => {
                let message = format!("no worker is ready for model `{model_name}`");
                return Err(Rejected::new(RejectKind::NoWorker, &message, "ServiceUnavailableError"));
            }
        };
        let mut destination = String::with_capacity(64);
        if !decision.write_override_host(&self.fleet, &mut destination) {
            let message = "the chosen worker left the fleet";
            return Err(Rejected::new(RejectKind::NoWorker, message, "ServiceUnavailableError"));
        }
        if let Some(entry) = self.fleet.get_mut(worker) {
            entry.load.begin_request(decision.prefill_tokens, decision.request_blocks);
        }
        Ok(Routed {
            destination,
            worker,
            prompt_tokens,
            overlap_blocks: decision.overlap_blocks,
            prefill_tokens: decision.prefill_tokens,
            prefill_done: false,
            request_blocks: decision.request_blocks,
            block_size,
            policy: policy_kind,
            degraded,
            render,
        })
    }

    /// Stops counting a routed request's prefill in flight: its worker answered, so the prompt is
    /// prefilled (an engine streams its first chunk with the first token, and sends a whole
    /// answer only when done). Its blocks stay counted until [`Router::finish`]. Once per request.
    pub fn prefill_done(&mut self, routed: &mut Routed) {
        if routed.prefill_done {
            return;
        }
        routed.prefill_done = true;
        if let Some(entry) = self.fleet.get_mut(routed.worker) {
            entry.load.prefill_done(routed.prefill_tokens);
        }
    }

    /// Ends a routed request's in-flight accounting (response complete or stream reset).
    pub fn finish(&mut self, routed: &Routed) {
        if let Some(entry) = self.fleet.get_mut(routed.worker) {
            let prefill = if routed.prefill_done { 0 } else { routed.prefill_tokens };
            entry.load.end_request(prefill, routed.request_blocks);
        }
    }
}

/// A request's prompt as the engine will tokenize it.
enum PromptInput<'a> {
    /// Text (a rendered chat, or a completion prompt), with or without the model's special tokens.
    Text { text: PromptText<'a>, add_special_tokens: bool },
    /// Token ids given by the client.
    Tokens(&'a [TokenId]),
}

/// A text prompt: written out, or a chat laid out by a native renderer (never written out whole).
enum PromptText<'a> {
    Written(std::borrow::Cow<'a, str>),
    LaidOut(ChatLayout<'a>),
}

impl PromptText<'_> {
    /// Tokenizes and hashes the prompt block by block through `encoder`, until `held` says no.
    fn walk<'e>(
        &self,
        encoder: &'e mut Encoder,
        add_special_tokens: bool,
        block_size: usize,
        salt: BlockSalt,
        held: impl FnMut(BlockHash) -> bool,
    ) -> Result<BlockWalk<'e>, kvmesh_core::tokenize::TokenizeError> {
        match self {
            PromptText::Written(text) => {
                encoder.walk_blocks(text, add_special_tokens, block_size, salt, held)
            }
            PromptText::LaidOut(layout) => {
                encoder.walk_layout(layout, add_special_tokens, block_size, salt, held)
            }
        }
    }
}

fn internal(e: &dyn std::fmt::Display) -> Rejected {
    Rejected::new(RejectKind::Internal, &format!("cannot tokenize the prompt: {e}"), "InternalServerError")
}

/// The prompt of `request`: the chat rendered with the model's template (laid out when a native
/// renderer covers it; and how it was rendered), or the completion's prompt (a batch is routed as
/// a whole, on its first prompt).
fn prompt_input<'a>(
    tokenizer: &Tokenizer,
    model_template: Option<&'a ChatTemplate>,
    request: &'a InferenceRequest<'a>,
    now_unix_seconds: i64,
) -> Result<(PromptInput<'a>, Option<RenderPath>), Rejected> {
    match request {
        InferenceRequest::Chat(chat) => {
            let bad = |e: &dyn std::fmt::Display| {
                Rejected::new(RejectKind::BadRequest, &format!("{e}"), "invalid_request_error")
            };
            let options = RenderOptions { now_unix_seconds: Some(now_unix_seconds), default_kwargs: None };
            let add_special_tokens = chat.add_special_tokens;
            let rendered = match (&chat.chat_template, &chat.tools, model_template) {
                (None, None, Some(template)) => template.render_chat(chat, &options).map_err(|e| bad(&e))?,
                // A request's own template or tools pick another template: compiled per request
                // (rare), and its prompt written out, since the template does not outlive this call.
                _ => {
                    let own = tokenizer
                        .chat_template(chat.chat_template.as_deref(), chat.tools.is_some())
                        .map_err(|e| bad(&e))?;
                    let (text, path) = own.render_traced(chat, &options).map_err(|e| bad(&e))?;
                    let text = PromptText::Written(text.into());
                    return Ok((PromptInput::Text { text, add_special_tokens }, Some(path)));
                }
            };
            let path = rendered.path();
            let text = match rendered {
                RenderedChat::Layout(layout) => PromptText::LaidOut(layout),
                RenderedChat::Text(text) => PromptText::Written(text.into()),
            };
            let input = PromptInput::Text { text, add_special_tokens };
            Ok((input, Some(path)))
        }
        InferenceRequest::Completion(completion) => Ok((
            match &completion.prompt {
                Prompt::Text(text) => PromptInput::Text {
                    text: PromptText::Written(text.as_ref().into()),
                    add_special_tokens: true,
                },
                Prompt::Texts(texts) => PromptInput::Text {
                    text: PromptText::Written(texts.first().map_or("", |t| t.as_ref()).into()),
                    add_special_tokens: true,
                },
                Prompt::Tokens(ids) => PromptInput::Tokens(ids),
                Prompt::TokenBatches(batches) => {
                    PromptInput::Tokens(batches.first().map_or(&[], Vec::as_slice))
                }
            },
            None,
        )),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A tiny byte-level BPE tokenizer.json: every byte is one token (enough to hash blocks).
    pub(crate) fn tokenizer_json() -> String {
        let vocab: Vec<String> = (0u8..=255)
            .map(|b| {
                let c = byte_char(b);
                format!("{}:{b}", serde_json::to_string(&c.to_string()).unwrap_or_default())
            })
            .collect();
        format!(
            r#"{{"version":"1.0","added_tokens":[],"normalizer":null,
                "pre_tokenizer":{{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true}},
                "post_processor":null,"decoder":null,
                "model":{{"type":"BPE","dropout":null,"unk_token":null,"continuing_subword_prefix":null,
                "end_of_word_suffix":null,"fuse_unk":false,"byte_fallback":false,"ignore_merges":false,
                "vocab":{{{}}},"merges":[]}}}}"#,
            vocab.join(",")
        )
    }

    /// GPT-2's byte-to-unicode map.
    fn byte_char(b: u8) -> char {
        let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        if printable(b) {
            return char::from(b);
        }
        let offset = (0u8..b).filter(|&x| !printable(x)).count() as u32;
        char::from_u32(256 + offset).unwrap_or('?')
    }

    pub(crate) fn config(workers: usize) -> FilterConfig {
        let workers: Vec<String> = (0..workers)
            .map(|i| {
                format!(r#"{{"id":"w{i}","address":"127.0.0.1:{}","model":"m","block_size":4}}"#, 9000 + i)
            })
            .collect();
        let json = format!(
            r#"{{"models":[{{"name":"m","tokenizer":{},"chat_template":"{{% for m in messages %}}{{{{ m.content }}}}{{% endfor %}}"}}],
                "workers":[{}]}}"#,
            tokenizer_json(),
            workers.join(",")
        );
        FilterConfig::from_bytes(Some(json.as_bytes())).expect("test config is valid")
    }

    pub(crate) fn chat(system: &str, user: &str) -> Vec<u8> {
        serde_json::json!({"model": "m", "messages": [
            {"role": "system", "content": system}, {"role": "user", "content": user}]})
        .to_string()
        .into_bytes()
    }

    #[test]
    fn a_fork_shares_the_loaded_tokenizer_and_starts_its_own_state() {
        let config = config(4);
        let mut first = Router::new(&config).expect("router");
        let system = "a long shared system prompt that spans many blocks of four bytes each";
        let routed = first.route(Endpoint::ChatCompletions, &chat(system, "one"), 0, 0).expect("routed");
        let mut fork = first.fork(&config).expect("fork");
        for (name, model) in &fork.models {
            assert!(model.tokenizer.shares_with(&first.models[name].tokenizer), "{name} loaded again");
        }
        let in_flight = |r: &Router| r.fleet.iter().map(|(_, e)| e.load.inflight_requests).sum::<u32>();
        assert_eq!((in_flight(&first), in_flight(&fork)), (1, 0), "the fork has its own fleet view");
        // The fork routes as a fresh router does: the same decision for the same first request.
        let mut fresh = Router::new(&config).expect("router");
        let again =
            |r: &mut Router| r.route(Endpoint::ChatCompletions, &chat(system, "one"), 0, 0).expect("routed");
        assert_eq!(again(&mut fork).destination, again(&mut fresh).destination);
        assert_eq!(routed.destination, again(&mut Router::new(&config).expect("router")).destination);
    }

    #[test]
    fn same_prefix_sticks_to_one_worker() {
        let mut router = Router::new(&config(4)).expect("router");
        let system = "a long shared system prompt that spans many blocks of four bytes each";
        let first = router.route(Endpoint::ChatCompletions, &chat(system, "one"), 0, 0).expect("routed");
        router.finish(&first);
        let second = router.route(Endpoint::ChatCompletions, &chat(system, "two"), 1, 0).expect("routed");
        assert_eq!(first.worker, second.worker);
        assert!(second.overlap_blocks > 0, "{second:?}");
        // The test template is no known one: rendered by minijinja.
        assert_eq!(second.render, Some(RenderPath::Interpreted));
        assert!(second.destination.starts_with(&first.destination[..14]), "{second:?}");
    }

    #[test]
    fn kv_aware_stops_tokenizing_at_the_first_block_no_one_holds() {
        let kv_aware = |early_exit: bool| {
            let base = config(2);
            let mut router = Router::new(&base).expect("router");
            router.default_policy =
                Policy::new(RoutingConfig { policy: PolicyKind::KvAware, ..RoutingConfig::default() })
                    .expect("policy");
            router.early_exit = early_exit;
            router
        };
        let system = "a long shared system prompt that spans many blocks of four bytes each";
        let body = chat(system, "one");
        let mut full = kv_aware(false);
        let exact = full.route(Endpoint::ChatCompletions, &body, 0, 0).expect("routed");
        assert!(full.hashes.len() > 10);
        let mut early = kv_aware(true);
        let estimated = early.route(Endpoint::ChatCompletions, &body, 0, 0).expect("routed");
        // Nothing is cached anywhere: the first block is the first miss.
        assert_eq!(early.hashes.len(), 1);
        assert_eq!(early.hashes[0], full.hashes[0]);
        // The rest of the length is estimated from bytes (tuned for real vocabularies, so far off
        // for this byte-per-token test tokenizer; core/tests/early_exit.rs bounds the real error).
        assert!(
            estimated.prompt_tokens > 0 && estimated.prompt_tokens != exact.prompt_tokens,
            "{estimated:?}"
        );
        // The same prompt again: its first block is now held by this proxy's recent decision, so
        // the walk goes on through it, and the request follows it.
        early.finish(&estimated);
        let again = early.route(Endpoint::ChatCompletions, &body, 1, 0).expect("routed");
        assert_eq!((again.worker, again.overlap_blocks), (estimated.worker, 1), "{again:?}");
        assert_eq!(early.hashes.len(), 2);
    }

    #[test]
    fn prefill_counts_in_flight_until_the_first_response_byte_and_only_once() {
        let mut router = Router::new(&config(1)).expect("router");
        let body = chat("a prompt of a few blocks", "q");
        let mut first = router.route(Endpoint::ChatCompletions, &body, 0, 0).expect("routed");
        let second = router.route(Endpoint::ChatCompletions, &body, 1, 0).expect("routed");
        let slot = first.worker;
        let load = |router: &Router| router.fleet.get(slot).expect("the worker").load.clone();
        let both = first.prefill_tokens + second.prefill_tokens;
        assert!(first.prefill_tokens > 0 && second.prefill_tokens > 0, "{first:?} {second:?}");
        assert_eq!(load(&router).inflight_prefill_tokens, both);
        router.prefill_done(&mut first);
        router.prefill_done(&mut first);
        assert_eq!(load(&router).inflight_prefill_tokens, second.prefill_tokens);
        assert_eq!(load(&router).inflight_requests, 2, "the request itself is still in flight");
        // Ending it takes its blocks, not the other request's prefill.
        router.finish(&first);
        assert_eq!(load(&router).inflight_prefill_tokens, second.prefill_tokens);
        assert_eq!(
            (load(&router).inflight_requests, load(&router).inflight_blocks),
            (1, second.request_blocks)
        );
    }

    #[test]
    fn unknown_model_is_404() {
        let mut router = Router::new(&config(1)).expect("router");
        let body = br#"{"model":"nope","prompt":"hi"}"#;
        let err = router.route(Endpoint::Completions, body, 0, 0).expect_err("rejected");
        assert_eq!(err.kind.status(), 404);
        assert!(err.body.contains("nope"), "{}", err.body);
    }

    #[test]
    fn malformed_json_is_400_and_too_large_is_413() {
        let mut router = Router::new(&config(1)).expect("router");
        let err = router.route(Endpoint::Completions, b"{nope", 0, 0).expect_err("rejected");
        assert_eq!(err.kind.status(), 400);
        let big = vec![b' '; 9 << 20];
        let err = router.route(Endpoint::Completions, &big, 0, 0).expect_err("rejected");
        assert_eq!(err.kind.status(), 413);
    }

    #[test]
    fn no_worker_is_503() {
        let mut router = Router::new(&config(0)).expect("router");
        let err = router
            .route(Endpoint::Completions, br#"{"model":"m","prompt":"hi"}"#, 0, 0)
            .expect_err("no worker");
        assert_eq!(err.kind.status(), 503);
        assert!(err.body.starts_with(r#"{"error":"#), "{}", err.body);
    }
}
