//! Prompts to token ids, and the tokens the sim "generates".
//!
//! With a model's tokenizer files the ids are the ones the engine computes (kvmesh-core's
//! tokenizer and chat templates, the same code the router uses), so the token ids and block hashes in KV events match a
//! real engine serving that model. Without them a built-in word tokenizer stands in (ids are then
//! stable but not any model's).
//!
//! Generated text is filler: whole words that are one token each in the model's vocabulary, picked
//! deterministically from the seed and the prompt, so a repeated greedy-like request repeats its
//! output (and its decode blocks) exactly as a real engine with temperature 0 would.

use std::path::{Path, PathBuf};

use kvmesh_core::hash::TokenId;
use kvmesh_core::request::{ChatRequest, ContentPart, MessageContent};
use kvmesh_core::template::{ChatTemplate, RenderOptions};
use kvmesh_core::tokenize::{Tokenizer, TokenizerFiles};

/// Words the filler draws from (those that are one token in the model's vocabulary).
const FILLER_WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "was", "on", "be", "by", "this",
    "are", "from", "or", "at", "an", "but", "not", "which", "have", "one", "all", "were", "can", "their",
    "there", "been", "more", "when", "will", "would", "who", "so", "no", "time", "data", "model", "cache",
    "block", "token", "route", "fast", "simple", "system", "request",
];

/// Tokenization as the simulated engine does it.
pub trait PromptTokenizer: Send + Sync {
    /// Ids of a completions prompt; `add_special_tokens` adds what the model's tokenizer adds (BOS).
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<TokenId>, String>;
    /// The chat prompt text of a conversation, as the model's chat template renders it.
    fn render_chat(&self, request: &ChatRequest<'_>) -> Result<String, String>;
    /// Filler tokens: `(id, text)` pairs, each one whole word.
    fn filler(&self) -> &[(TokenId, String)];
    /// Where the tokenizer came from, for logs and `/model_info`.
    fn source(&self) -> String;
}

/// The model's own tokenizer and chat templates (kvmesh-core), loaded from a model directory.
pub struct ModelTokenizer {
    tokenizer: Tokenizer,
    /// The model's templates compiled once: for requests without tools, and with tools.
    templates: [Option<ChatTemplate>; 2],
    filler: Vec<(TokenId, String)>,
    dir: PathBuf,
}

impl ModelTokenizer {
    /// Loads `tokenizer.json`, and `tokenizer_config.json` / `chat_template.jinja` if present.
    pub fn load(dir: &Path) -> Result<Self, String> {
        let read = |name: &str| std::fs::read_to_string(dir.join(name));
        let json =
            read("tokenizer.json").map_err(|e| format!("{}: {e}", dir.join("tokenizer.json").display()))?;
        let config = read("tokenizer_config.json").ok();
        let jinja = read("chat_template.jinja").ok();
        let tokenizer = Tokenizer::from_files(TokenizerFiles {
            tokenizer_json: &json,
            tokenizer_config_json: config.as_deref(),
            chat_template_jinja: jinja.as_deref(),
        })
        .map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut filler = Vec::new();
        for word in FILLER_WORDS {
            let text = format!(" {word}");
            if let Ok(ids) = tokenizer.encode(&text)
                && let [id] = ids[..]
            {
                filler.push((id, text));
            }
        }
        if filler.is_empty() {
            return Err(format!("{}: no filler word is a single token in this vocabulary", dir.display()));
        }
        let templates = [tokenizer.chat_template(None, false).ok(), tokenizer.chat_template(None, true).ok()];
        if templates[0].is_none() {
            tracing::warn!(dir = %dir.display(), "the model has no chat template; chat prompts are rendered as ChatML");
        }
        Ok(ModelTokenizer { tokenizer, templates, filler, dir: dir.to_owned() })
    }
}

impl PromptTokenizer for ModelTokenizer {
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<TokenId>, String> {
        let ids =
            if add_special_tokens { self.tokenizer.encode_prompt(text) } else { self.tokenizer.encode(text) };
        ids.map_err(|e| e.to_string())
    }

    fn render_chat(&self, request: &ChatRequest<'_>) -> Result<String, String> {
        let with_tools = request.tools.as_ref().is_some_and(|t| !t.is_empty());
        let own;
        let template = match &request.chat_template {
            Some(t) => {
                own = self.tokenizer.chat_template(Some(t), with_tools).map_err(|e| e.to_string())?;
                &own
            }
            None => match &self.templates[usize::from(with_tools)] {
                Some(t) => t,
                None => return Ok(render_chatml(request)),
            },
        };
        // Templates that print the date (Llama 3) see the wall clock, as the engine's do.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let options = RenderOptions { now_unix_seconds: Some(now), default_kwargs: None };
        template.render(request, &options).map_err(|e| e.to_string())
    }

    fn filler(&self) -> &[(TokenId, String)] {
        &self.filler
    }

    fn source(&self) -> String {
        self.dir.display().to_string()
    }
}

/// A stand-in when no tokenizer files are available: words and punctuation to stable ids.
pub struct WordTokenizer {
    filler: Vec<(TokenId, String)>,
}

impl Default for WordTokenizer {
    fn default() -> Self {
        let filler = FILLER_WORDS.iter().map(|w| (word_id(w), format!(" {w}"))).collect();
        WordTokenizer { filler }
    }
}

/// A stable id for a word, above the ids special tokens would take.
fn word_id(word: &str) -> TokenId {
    // FNV-1a: tiny, stable across releases, good enough to spread words over the id range.
    let mut h: u32 = 0x811c_9dc5;
    for b in word.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    1000 + h % 150_000
}

impl PromptTokenizer for WordTokenizer {
    fn encode(&self, text: &str, _add_special_tokens: bool) -> Result<Vec<TokenId>, String> {
        let mut ids = Vec::new();
        for piece in text.split(|c: char| c.is_whitespace()) {
            let mut word = String::new();
            for c in piece.chars() {
                if c.is_alphanumeric() {
                    word.push(c);
                } else {
                    if !word.is_empty() {
                        ids.push(word_id(&word));
                        word.clear();
                    }
                    let mut buf = [0u8; 4];
                    ids.push(word_id(c.encode_utf8(&mut buf)));
                }
            }
            if !word.is_empty() {
                ids.push(word_id(&word));
            }
        }
        Ok(ids)
    }

    fn render_chat(&self, request: &ChatRequest<'_>) -> Result<String, String> {
        Ok(render_chatml(request))
    }

    fn filler(&self) -> &[(TokenId, String)] {
        &self.filler
    }

    fn source(&self) -> String {
        "built-in word tokenizer".to_owned()
    }
}

/// ChatML, as Qwen's templates render plain text conversations (system/user/assistant turns
/// without tools or reasoning); used when no model template is available: `<|im_start|>{role}\n{content}<|im_end|>\n` per message, then
/// `<|im_start|>assistant\n` when a generation prompt is asked for.
pub fn render_chatml(request: &ChatRequest<'_>) -> String {
    let mut out = String::new();
    let last = request.messages.len().saturating_sub(1);
    for (i, m) in request.messages.iter().enumerate() {
        out.push_str("<|im_start|>");
        out.push_str(&m.role);
        out.push('\n');
        match &m.content {
            Some(MessageContent::Text(t)) => out.push_str(t),
            Some(MessageContent::Parts(parts)) => {
                for p in parts {
                    if let ContentPart::Text(t) = p {
                        out.push_str(t);
                    }
                }
            }
            None => {}
        }
        if i == last && request.continue_final_message {
            return out;
        }
        out.push_str("<|im_end|>\n");
    }
    if request.add_generation_prompt {
        out.push_str("<|im_start|>assistant\n");
    }
    out
}

/// The default tokenizer directory: `$KVMESH_TOKENIZERS/qwen3` (default root
/// `/root/.cache/kvmesh/tokenizers`), if it holds a tokenizer.json.
pub fn default_tokenizer_dir() -> Option<PathBuf> {
    let root = std::env::var_os("KVMESH_TOKENIZERS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root/.cache/kvmesh/tokenizers"));
    let dir = root.join("qwen3");
    dir.join("tokenizer.json").is_file().then_some(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvmesh_core::request::{Endpoint, InferenceRequest, RequestLimits, parse_request};

    #[test]
    fn chatml_renders_like_qwen_for_plain_turns() {
        let body = br#"{"model":"m","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi"}]}"#;
        let Ok(InferenceRequest::Chat(chat)) =
            parse_request(Endpoint::ChatCompletions, body, &RequestLimits::default())
        else {
            panic!("parses")
        };
        assert_eq!(
            render_chatml(&chat),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn word_tokenizer_is_stable() {
        let t = WordTokenizer::default();
        let a = t.encode("Hello, world", true).unwrap();
        assert_eq!(a.len(), 3);
        assert_eq!(a, t.encode("Hello, world", false).unwrap());
        assert!(!t.filler().is_empty());
    }

    #[test]
    fn qwen3_filler_words_are_single_tokens() {
        let Some(dir) = default_tokenizer_dir() else { return };
        let t = ModelTokenizer::load(&dir).unwrap();
        assert!(t.filler().len() > 30, "{}", t.filler().len());
        for (id, text) in t.filler() {
            assert_eq!(t.encode(text, false).unwrap(), vec![*id]);
        }
        // Qwen3's own template, through kvmesh-core, renders plain turns as ChatML.
        let body =
            br#"{"model":"m","messages":[{"role":"system","content":"S"},{"role":"user","content":"U"}]}"#;
        let Ok(InferenceRequest::Chat(chat)) =
            parse_request(Endpoint::ChatCompletions, body, &RequestLimits::default())
        else {
            panic!("parses")
        };
        assert_eq!(t.render_chat(&chat).unwrap(), render_chatml(&chat));
    }
}
