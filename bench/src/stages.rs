//! The filter's per-request steps one by one through kvmesh-core (parse, render, tokenize, hash),
//! timed on a workload's bodies. Builds natively and for wasm32-wasip1: the `filter-stages` binary
//! runs it inside V8 outside Envoy (node, TurboFan only, as Envoy compiles), so the in-Envoy
//! decision time can be split by stage.

use std::hint::black_box;
use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use kvmesh_core::hash::hash_prompt;
use kvmesh_core::request::{InferenceRequest, Prompt, RequestLimits, parse_request};
use kvmesh_core::template::{ChatTemplate, RenderOptions};
use kvmesh_core::tokenize::{Encoder, SegmentCacheConfig};
use kvmesh_core::{BlockHash, BlockSalt, TokenId, Tokenizer, TokenizerFiles};
use serde::{Deserialize, Serialize};

use crate::workload::Workload;

/// KV block size of the configured workers (vLLM's GPU default).
pub const BLOCK_SIZE: u32 = 16;
/// `strftime_now`'s clock in templates: fixed, so renders repeat.
const NOW_UNIX_SECONDS: i64 = 1_767_225_600;

/// Median stage times of one workload, microseconds.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct StageTiming {
    /// Prompt tokens of a request (median).
    pub prompt_tokens: u64,
    /// Parsing the body (typed serde structs).
    pub parse_us: f64,
    /// Rendering the chat template (0 for completions).
    pub render_us: f64,
    /// Tokenizing through the encoder's segment cache (0 for token-id prompts).
    pub tokenize_us: f64,
    /// Hashing the blocks.
    pub hash_us: f64,
    /// The four together, per request (median of the sums).
    pub total_us: f64,
}

/// The steps' state: the model's tokenizer, its compiled template, and one encoder whose caches
/// stay warm across workloads, like a filter VM's.
pub struct Stages {
    template: ChatTemplate,
    encoder: Encoder,
}

impl Stages {
    /// Compiles the template and makes an encoder with `segment_cache`.
    pub fn new(tokenizer: &Tokenizer, segment_cache: SegmentCacheConfig) -> Result<Stages> {
        let template = tokenizer.chat_template(None, false).context("the model's chat template")?;
        Ok(Stages { template, encoder: tokenizer.encoder(segment_cache) })
    }

    /// Times `iterations` requests of `workload` after `warmup` untimed ones; fresh workloads get a
    /// new seed per request from `next_seed`.
    pub fn time(
        &mut self,
        workload: &Workload,
        warmup: usize,
        iterations: usize,
        next_seed: &mut dyn FnMut() -> u64,
    ) -> Result<StageTiming> {
        let mut samples: [Vec<u64>; 6] = Default::default();
        for i in 0..warmup + iterations {
            let body = workload.body(next_seed());
            let (tokens, ns) = self.run(workload, &body)?;
            if i >= warmup {
                let total = ns.iter().sum();
                for (sample, value) in
                    samples.iter_mut().zip([tokens as u64, ns[0], ns[1], ns[2], ns[3], total])
                {
                    sample.push(value);
                }
            }
        }
        let mut median = |i: usize| {
            let v = &mut samples[i];
            v.sort_unstable();
            v.get(v.len() / 2).copied().unwrap_or(0)
        };
        let us = |ns: u64| ns as f64 / 1_000.0;
        Ok(StageTiming {
            prompt_tokens: median(0),
            parse_us: us(median(1)),
            render_us: us(median(2)),
            tokenize_us: us(median(3)),
            hash_us: us(median(4)),
            total_us: us(median(5)),
        })
    }

    /// One request: its token count and the stages' nanoseconds (parse, render, tokenize, hash).
    fn run(&mut self, workload: &Workload, body: &[u8]) -> Result<(usize, [u64; 4])> {
        let t0 = Instant::now();
        let request = parse_request(workload.endpoint(), black_box(body), &RequestLimits::default())
            .map_err(|e| anyhow!("{}: parse: {e:?}", workload.name))?;
        let t1 = Instant::now();
        let mut ids: Vec<TokenId> = Vec::with_capacity(8192);
        let mut rendered = t1;
        match &request {
            InferenceRequest::Chat(chat) => {
                let options =
                    RenderOptions { now_unix_seconds: Some(NOW_UNIX_SECONDS), default_kwargs: None };
                let text = self.template.render(chat, &options).context("render")?;
                rendered = Instant::now();
                self.encoder.encode_into(&text, chat.add_special_tokens, &mut ids).context("tokenize")?;
            }
            InferenceRequest::Completion(completion) => match &completion.prompt {
                Prompt::Text(text) => self.encoder.encode_into(text, true, &mut ids).context("tokenize")?,
                Prompt::Tokens(t) => ids.extend_from_slice(t),
                _ => {}
            },
        }
        let t2 = Instant::now();
        let mut hashes: Vec<BlockHash> = Vec::with_capacity(ids.len() / BLOCK_SIZE as usize + 1);
        hash_prompt(&ids, BLOCK_SIZE as usize, BlockSalt::NONE, &mut hashes);
        black_box(&hashes);
        let t3 = Instant::now();
        let ns = |a: Instant, b: Instant| (b - a).as_nanos() as u64;
        Ok((ids.len(), [ns(t0, t1), ns(t1, rendered), ns(rendered, t2), ns(t2, t3)]))
    }
}

/// Loads Qwen3's tokenizer from `dir` (`tokenizer.json` and `tokenizer_config.json`).
pub fn load_tokenizer(dir: &std::path::Path) -> Result<Tokenizer> {
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name)).with_context(|| format!("read {}", dir.join(name).display()))
    };
    let (json, config) = (read("tokenizer.json")?, read("tokenizer_config.json")?);
    Ok(Tokenizer::from_files(TokenizerFiles {
        tokenizer_json: &json,
        tokenizer_config_json: Some(&config),
        chat_template_jinja: None,
    })?)
}

/// One workload's stages with and without the segment cache.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StageRow {
    /// Workload name.
    pub workload: String,
    /// With the default segment cache.
    pub cached: StageTiming,
    /// With the segment cache off.
    pub uncached: StageTiming,
}

/// What `filter-stages` prints: the tokenizer's load time and every workload's stages.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StagesRun {
    /// Loading the tokenizer (`Tokenizer::from_files`), milliseconds.
    pub tokenizer_load_ms: f64,
    /// Per workload.
    pub rows: Vec<StageRow>,
}
