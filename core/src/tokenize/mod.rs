//! Prompt text to token ids, exactly as the engine (vLLM, through HuggingFace `tokenizers`)
//! computes them: one id off and every block hash after it misses (DESIGN.md section 2b).
//!
//! [`Tokenizer`] is our small interface; the engine behind it is HuggingFace `tokenizers` 1.0
//! (pinned rc), whose ids equal those of 0.2x, the release engines run today (checked by
//! `core/tests/tokenizer_parity.rs`). It loads from bytes the caller read, never from a path:
//!
//! - `tokenizer.json` in either form: the canonical `2.0` form the 1.0 engine reads, or the `1.0`
//!   form HuggingFace ships, which is converted on load. Converting the 11 MB Qwen3 file costs a
//!   full JSON round trip, so callers that load often (every Envoy worker VM) should convert once
//!   ahead of time with [`canonicalize`] and ship the result.
//! - `tokenizer_config.json` (optional): BOS/EOS and other named tokens, `add_bos_token`, the chat
//!   template(s).
//! - `chat_template.jinja` (optional): a template shipped as its own file, which wins over the
//!   config's default template, as in transformers.
//!
//! Unicode normalization runs with the Unicode 9 tables 0.2x uses, not the engine's (`normalize.rs`).
//!
//! The per-request path goes through an [`Encoder`] (one per thread, e.g. per filter VM): it keeps
//! the engine's working buffers, a bounded cache of ids per text segment (the text between added
//! tokens: a repeated system prompt or earlier turn costs a hash and a lookup), and can stop
//! tokenizing at the first block no worker holds ([`Encoder::walk_blocks`]), estimating the rest
//! of the prompt's length from its bytes (`estimate.rs`).

mod cache;
mod config;
mod encoder;
mod engine;
mod estimate;
mod normalize;

pub use cache::{SegmentCacheConfig, SegmentCacheStats};
pub use config::{DEFAULT_TEMPLATE_NAME, TOOL_USE_TEMPLATE_NAME, TokenizerConfig};
pub use encoder::{BlockWalk, Encoder};
pub use engine::canonicalize;

use std::sync::{Arc, Mutex, PoisonError};

use engine::{Engine, Scratch};

use crate::hash::TokenId;
use crate::request::ChatRequest;
use crate::template::{ChatTemplate, RenderOptions, SpecialTokens, TemplateError};

/// Why a tokenizer could not be loaded or a text not encoded.
#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    /// A file is not the JSON it should be.
    #[error("{file} is malformed: {reason}")]
    Json {
        /// Which file (`tokenizer.json`, `tokenizer_config.json`).
        file: &'static str,
        /// What the parser said.
        reason: String,
    },
    /// A file asks for something this build cannot do (a model type, normalizer, pre-tokenizer or
    /// regex pattern outside what we compile in, or a legacy layout the converter refuses).
    #[error("{file} is not supported: {what}")]
    Unsupported {
        /// Which file.
        file: &'static str,
        /// What is unsupported, as the engine or converter names it.
        what: String,
    },
    /// `tokenizer_config.json` declares an added token that `tokenizer.json` lacks: transformers
    /// would add it at load and change the ids, which we do not reproduce.
    #[error(
        "tokenizer_config.json declares added token {content:?} (id {id}) that tokenizer.json lacks; \
         re-save the tokenizer with transformers so tokenizer.json holds every added token"
    )]
    AddedTokenMissing {
        /// The token's id in the config.
        id: TokenId,
        /// The token's text.
        content: String,
    },
    /// A special token named by the config is not in the vocabulary.
    #[error("{role} {token:?} from tokenizer_config.json is not in the vocabulary")]
    UnknownSpecialToken {
        /// `bos_token` or `eos_token`.
        role: &'static str,
        /// Its text.
        token: String,
    },
    /// The engine failed on this input.
    #[error("cannot tokenize the text: {reason}")]
    Encode {
        /// What the engine said.
        reason: String,
    },
}

/// The files a model ships for tokenization, as bytes the caller read.
#[derive(Clone, Copy, Debug, Default)]
pub struct TokenizerFiles<'a> {
    /// `tokenizer.json`, HF (`1.0`) or canonical (`2.0`) form.
    pub tokenizer_json: &'a str,
    /// `tokenizer_config.json`, if the model ships one.
    pub tokenizer_config_json: Option<&'a str>,
    /// `chat_template.jinja`, if the model ships its template as a separate file.
    pub chat_template_jinja: Option<&'a str>,
}

/// Tokenizer classes whose post-processor transformers (4.x) rebuilds from `add_bos_token` and
/// `add_eos_token` (their `update_post_processor`), with those defaults.
const CLASSES_WITH_CONFIGURED_SPECIALS: &[(&str, bool, bool)] = &[
    ("LlamaTokenizerFast", true, false),
    ("LlamaTokenizer", true, false),
    ("CodeLlamaTokenizerFast", true, false),
    ("CodeLlamaTokenizer", true, false),
    ("GemmaTokenizerFast", true, false),
    ("GemmaTokenizer", true, false),
];

/// Working buffers kept for the convenience methods ([`Tokenizer::encode`]); more threads than
/// this encoding at once just allocate their own.
const POOLED_SCRATCH: usize = 4;

// Tokenizers are shared across threads (control plane, simulator); encoders move with their thread.
const _: fn() = || {
    fn shared<T: Send + Sync>() {}
    fn movable<T: Send>() {}
    shared::<Tokenizer>();
    movable::<Encoder>();
};

/// A model's tokenizer: text to the exact ids the engine computes, plus what chat templates need.
/// Cheap to clone (shared).
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    config: TokenizerConfig,
    /// Ids a completions prompt starts with (`add_special_tokens=True`): BOS for Llama 3.
    prompt_prefix: Vec<TokenId>,
    /// Ids a completions prompt ends with (EOS where the config asks for it).
    prompt_suffix: Vec<TokenId>,
    bos_id: Option<TokenId>,
    eos_id: Option<TokenId>,
    /// Working buffers for the convenience methods, which have no [`Encoder`] to hold them.
    pool: Mutex<Vec<Scratch>>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("engine", &self.inner.engine)
            .field("prompt_prefix", &self.inner.prompt_prefix)
            .field("prompt_suffix", &self.inner.prompt_suffix)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Loads a tokenizer from its files' contents.
    pub fn from_files(files: TokenizerFiles<'_>) -> Result<Self, TokenizeError> {
        let engine = Engine::from_json(files.tokenizer_json)?;
        let config = match files.tokenizer_config_json {
            Some(json) => TokenizerConfig::from_json(json, files.chat_template_jinja)?,
            None => TokenizerConfig {
                chat_templates: files
                    .chat_template_jinja
                    .map(|jinja| vec![(DEFAULT_TEMPLATE_NAME.to_owned(), jinja.to_owned())])
                    .unwrap_or_default(),
                ..TokenizerConfig::default()
            },
        };
        let mut scratch = engine.scratch();
        let lookup_in = |token: &str, scratch: &mut Scratch| -> Option<TokenId> {
            engine.added_token_id(token).or_else(|| single_id(&engine, token, scratch))
        };
        for (&id, content) in &config.added_tokens {
            if engine.added_token_id(content).is_none() && lookup_in(content, &mut scratch) != Some(id) {
                return Err(TokenizeError::AddedTokenMissing { id, content: content.clone() });
            }
        }
        let mut lookup = |role: &'static str, token: &Option<String>| match token {
            None => Ok(None),
            Some(t) => lookup_in(t, &mut scratch)
                .map(Some)
                .ok_or_else(|| TokenizeError::UnknownSpecialToken { role, token: t.clone() }),
        };
        let bos_id = lookup("bos_token", &config.bos_token)?;
        let eos_id = lookup("eos_token", &config.eos_token)?;
        let class = config.tokenizer_class.as_deref().unwrap_or("");
        let (prompt_prefix, prompt_suffix) =
            match CLASSES_WITH_CONFIGURED_SPECIALS.iter().find(|(c, _, _)| *c == class) {
                Some(&(_, bos_default, eos_default)) => (
                    bos_id.filter(|_| config.add_bos_token.unwrap_or(bos_default)).into_iter().collect(),
                    eos_id.filter(|_| config.add_eos_token.unwrap_or(eos_default)).into_iter().collect(),
                ),
                None => engine.post_processor_specials(),
            };
        let inner = Inner {
            engine,
            config,
            prompt_prefix,
            prompt_suffix,
            bos_id,
            eos_id,
            pool: Mutex::new(vec![scratch]),
        };
        Ok(Tokenizer { inner: Arc::new(inner) })
    }

    /// Ids of `text`, adding no special tokens; special-token strings inside the text become their
    /// ids, as HF does (`add_special_tokens=False`, `split_special_tokens=False`). This is how vLLM
    /// tokenizes a rendered chat prompt.
    pub fn encode(&self, text: &str) -> Result<Vec<TokenId>, TokenizeError> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        self.encode_into(text, &mut out)?;
        Ok(out)
    }

    /// [`Tokenizer::encode`], appending to `out` (which is not cleared).
    pub fn encode_into(&self, text: &str, out: &mut Vec<TokenId>) -> Result<(), TokenizeError> {
        self.with_scratch(|engine, scratch| encoder::encode_uncached(engine, text, scratch, out))
    }

    /// Ids of a completions prompt as vLLM computes them (`add_special_tokens=True`): the text's ids
    /// with the special tokens the tokenizer adds around a sequence (BOS for Llama 3, none for Qwen).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<TokenId>, TokenizeError> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        out.extend_from_slice(&self.inner.prompt_prefix);
        self.encode_into(text, &mut out)?;
        out.extend_from_slice(&self.inner.prompt_suffix);
        Ok(out)
    }

    /// Whether `other` is this very load (a clone of it), not another load of the same files.
    pub fn shares_with(&self, other: &Tokenizer) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// An [`Encoder`] for this tokenizer: the per-thread state of the fast path (working buffers
    /// and a segment cache bounded by `cache`).
    pub fn encoder(&self, cache: SegmentCacheConfig) -> Encoder {
        Encoder::new(self.clone(), cache)
    }

    /// Runs `f` with pooled working buffers.
    fn with_scratch<T>(&self, f: impl FnOnce(&Engine, &mut Scratch) -> T) -> T {
        let engine = &self.inner.engine;
        let taken = self.inner.pool.lock().unwrap_or_else(PoisonError::into_inner).pop();
        let mut scratch = taken.unwrap_or_else(|| engine.scratch());
        let out = f(engine, &mut scratch);
        let mut pool = self.inner.pool.lock().unwrap_or_else(PoisonError::into_inner);
        if pool.len() < POOLED_SCRATCH {
            pool.push(scratch);
        }
        out
    }

    /// Id of a token by its text (added tokens first, then a text that is exactly one token).
    pub fn token_to_id(&self, token: &str) -> Option<TokenId> {
        let engine = &self.inner.engine;
        engine
            .added_token_id(token)
            .or_else(|| self.with_scratch(|engine, scratch| single_id(engine, token, scratch)))
    }

    /// The parsed `tokenizer_config.json` (empty if none was given).
    pub fn config(&self) -> &TokenizerConfig {
        &self.inner.config
    }

    /// Beginning-of-sequence token text and id, if the config names one.
    pub fn bos(&self) -> Option<(&str, TokenId)> {
        self.inner.config.bos_token.as_deref().zip(self.inner.bos_id)
    }

    /// End-of-sequence token text and id, if the config names one.
    pub fn eos(&self) -> Option<(&str, TokenId)> {
        self.inner.config.eos_token.as_deref().zip(self.inner.eos_id)
    }

    /// The named special tokens a chat template sees, as transformers' `special_tokens_map`.
    pub fn special_tokens(&self) -> SpecialTokens {
        SpecialTokens {
            named: self
                .inner
                .config
                .special_tokens_map()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            additional: self.inner.config.additional_special_tokens.clone(),
        }
    }

    /// Compiles the chat template a request uses: `request_template` (the request's own
    /// `chat_template`, either a template or the name of one the model ships) if given, else the
    /// model's (`tool_use` for requests with tools when the model has one). Compiling costs far
    /// more than rendering: callers keep the result.
    pub fn chat_template(
        &self,
        request_template: Option<&str>,
        with_tools: bool,
    ) -> Result<ChatTemplate, TemplateError> {
        let source = match request_template {
            Some(t) => self.inner.config.template_named(t).unwrap_or(t),
            None => self.inner.config.chat_template(with_tools).ok_or(TemplateError::NoTemplate)?,
        };
        ChatTemplate::new(source, self.special_tokens())
    }

    /// The ids vLLM computes for a chat request: the rendered template, tokenized without added
    /// special tokens (the template writes them) unless the request sets `add_special_tokens`.
    pub fn encode_chat(
        &self,
        template: &ChatTemplate,
        request: &ChatRequest<'_>,
        options: &RenderOptions<'_>,
    ) -> Result<Vec<TokenId>, crate::Error> {
        let text = template.render(request, options)?;
        Ok(if request.add_special_tokens { self.encode_prompt(&text)? } else { self.encode(&text)? })
    }
}

/// The id `text` encodes to when that is exactly one id.
fn single_id(engine: &Engine, text: &str, scratch: &mut Scratch) -> Option<TokenId> {
    let mut ids = Vec::new();
    encoder::encode_uncached(engine, text, scratch, &mut ids).ok()?;
    match ids.as_slice() {
        [id] => Some(*id),
        _ => None,
    }
}
