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

mod config;
mod engine;

pub use config::{DEFAULT_TEMPLATE_NAME, TOOL_USE_TEMPLATE_NAME, TokenizerConfig};
pub use engine::canonicalize;

use engine::Engine;

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

/// Which special tokens a completions prompt gets when the engine adds them
/// (`add_special_tokens=True`, vLLM's default for `/v1/completions`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SpecialsPolicy {
    /// What `tokenizer.json`'s post-processor adds (Llama 3: BOS; Qwen: nothing).
    PostProcessor,
    /// transformers rebuilds the post-processor of these tokenizer classes from `add_bos_token` /
    /// `add_eos_token` at load, so the config wins over `tokenizer.json`.
    Explicit { bos: Option<TokenId>, eos: Option<TokenId> },
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

/// A model's tokenizer: text to the exact ids the engine computes, plus what chat templates need.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    engine: Engine,
    config: TokenizerConfig,
    specials: SpecialsPolicy,
    bos_id: Option<TokenId>,
    eos_id: Option<TokenId>,
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
        for (&id, content) in &config.added_tokens {
            if engine.added_token_id(content).is_none() && engine.token_to_id(content) != Some(id) {
                return Err(TokenizeError::AddedTokenMissing { id, content: content.clone() });
            }
        }
        let lookup = |role: &'static str, token: &Option<String>| match token {
            None => Ok(None),
            Some(t) => engine
                .token_to_id(t)
                .map(Some)
                .ok_or_else(|| TokenizeError::UnknownSpecialToken { role, token: t.clone() }),
        };
        let bos_id = lookup("bos_token", &config.bos_token)?;
        let eos_id = lookup("eos_token", &config.eos_token)?;
        let class = config.tokenizer_class.as_deref().unwrap_or("");
        let specials = match CLASSES_WITH_CONFIGURED_SPECIALS.iter().find(|(c, _, _)| *c == class) {
            Some(&(_, bos_default, eos_default)) => SpecialsPolicy::Explicit {
                bos: bos_id.filter(|_| config.add_bos_token.unwrap_or(bos_default)),
                eos: eos_id.filter(|_| config.add_eos_token.unwrap_or(eos_default)),
            },
            None => SpecialsPolicy::PostProcessor,
        };
        Ok(Tokenizer { engine, config, specials, bos_id, eos_id })
    }

    /// Ids of `text`, adding no special tokens; special-token strings inside the text become their
    /// ids, as HF does (`add_special_tokens=False`, `split_special_tokens=False`). This is how vLLM
    /// tokenizes a rendered chat prompt.
    pub fn encode(&self, text: &str) -> Result<Vec<TokenId>, TokenizeError> {
        let mut out = Vec::new();
        self.encode_into(text, &mut out)?;
        Ok(out)
    }

    /// [`Tokenizer::encode`], appending to `out` (which is not cleared).
    pub fn encode_into(&self, text: &str, out: &mut Vec<TokenId>) -> Result<(), TokenizeError> {
        self.engine.encode_into(text, false, out)
    }

    /// Ids of a completions prompt as vLLM computes them (`add_special_tokens=True`): the text's ids
    /// with the special tokens the tokenizer adds around a sequence (BOS for Llama 3, none for Qwen).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<TokenId>, TokenizeError> {
        let mut out = Vec::new();
        match self.specials {
            SpecialsPolicy::PostProcessor => self.engine.encode_into(text, true, &mut out)?,
            SpecialsPolicy::Explicit { bos, eos } => {
                out.extend(bos);
                self.engine.encode_into(text, false, &mut out)?;
                out.extend(eos);
            }
        }
        Ok(out)
    }

    /// Id of a token by its text (added tokens first, then a text that is exactly one token).
    pub fn token_to_id(&self, token: &str) -> Option<TokenId> {
        self.engine.token_to_id(token)
    }

    /// The parsed `tokenizer_config.json` (empty if none was given).
    pub fn config(&self) -> &TokenizerConfig {
        &self.config
    }

    /// Beginning-of-sequence token text and id, if the config names one.
    pub fn bos(&self) -> Option<(&str, TokenId)> {
        self.config.bos_token.as_deref().zip(self.bos_id)
    }

    /// End-of-sequence token text and id, if the config names one.
    pub fn eos(&self) -> Option<(&str, TokenId)> {
        self.config.eos_token.as_deref().zip(self.eos_id)
    }

    /// The named special tokens a chat template sees, as transformers' `special_tokens_map`.
    pub fn special_tokens(&self) -> SpecialTokens {
        SpecialTokens {
            named: self.config.special_tokens_map().map(|(k, v)| (k.to_owned(), v.to_owned())).collect(),
            additional: self.config.additional_special_tokens.clone(),
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
            Some(t) => self.config.template_named(t).unwrap_or(t),
            None => self.config.chat_template(with_tools).ok_or(TemplateError::NoTemplate)?,
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
