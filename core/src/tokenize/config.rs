//! `tokenizer_config.json`: what transformers reads beside `tokenizer.json` and the engine needs too.
//!
//! Only the fields that change the ids or the rendered prompt are typed; the many others a model
//! ships (`model_max_length`, `clean_up_tokenization_spaces`, ...) are ignored on purpose.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::TokenizeError;

/// Name transformers gives the template picked when a model ships several and none is asked for.
pub const DEFAULT_TEMPLATE_NAME: &str = "default";

/// Name of the template transformers picks when the request carries tools and the model ships one.
pub const TOOL_USE_TEMPLATE_NAME: &str = "tool_use";

/// The parts of `tokenizer_config.json` that matter for prompts and ids.
#[derive(Clone, Debug, Default)]
pub struct TokenizerConfig {
    /// `tokenizer_class`, e.g. `PreTrainedTokenizerFast`, `Qwen2Tokenizer`, `LlamaTokenizerFast`.
    pub tokenizer_class: Option<String>,
    /// Beginning-of-sequence token text, if the model has one.
    pub bos_token: Option<String>,
    /// End-of-sequence token text, if the model has one.
    pub eos_token: Option<String>,
    /// The other named special tokens (`unk_token`, `pad_token`, ...), by their config key.
    pub named_tokens: BTreeMap<String, String>,
    /// `additional_special_tokens`, in order.
    pub additional_special_tokens: Vec<String>,
    /// `add_bos_token`, when the config states it.
    pub add_bos_token: Option<bool>,
    /// `add_eos_token`, when the config states it.
    pub add_eos_token: Option<bool>,
    /// Chat templates by name; a single unnamed template is stored as [`DEFAULT_TEMPLATE_NAME`].
    pub chat_templates: Vec<(String, String)>,
    /// `added_tokens_decoder`: id to token text, as the config declares it.
    pub added_tokens: BTreeMap<u32, String>,
}

/// A special token as configs spell it: a bare string or an `AddedToken` object.
#[derive(Deserialize)]
#[serde(untagged)]
enum TokenDef {
    Text(String),
    Object { content: String },
}

impl TokenDef {
    fn into_text(self) -> String {
        match self {
            TokenDef::Text(s) | TokenDef::Object { content: s } => s,
        }
    }
}

/// `chat_template` as configs spell it: one template, or a list of named ones.
#[derive(Deserialize)]
#[serde(untagged)]
enum TemplateDef {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

#[derive(Deserialize)]
struct AddedTokenEntry {
    content: String,
}

/// The file as it is on disk; every field optional because real configs omit most of them.
#[derive(Deserialize, Default)]
struct RawConfig {
    tokenizer_class: Option<String>,
    bos_token: Option<TokenDef>,
    eos_token: Option<TokenDef>,
    unk_token: Option<TokenDef>,
    pad_token: Option<TokenDef>,
    sep_token: Option<TokenDef>,
    cls_token: Option<TokenDef>,
    mask_token: Option<TokenDef>,
    additional_special_tokens: Option<Vec<TokenDef>>,
    add_bos_token: Option<bool>,
    add_eos_token: Option<bool>,
    chat_template: Option<TemplateDef>,
    added_tokens_decoder: Option<BTreeMap<String, AddedTokenEntry>>,
}

impl TokenizerConfig {
    /// Parses `tokenizer_config.json`; `chat_template_jinja` is a separately shipped
    /// `chat_template.jinja`, which replaces the config's default template as transformers does.
    pub fn from_json(json: &str, chat_template_jinja: Option<&str>) -> Result<Self, TokenizeError> {
        let raw: RawConfig = serde_json::from_str(json)
            .map_err(|e| TokenizeError::Json { file: "tokenizer_config.json", reason: e.to_string() })?;
        let mut config = TokenizerConfig {
            tokenizer_class: raw.tokenizer_class,
            bos_token: raw.bos_token.map(TokenDef::into_text),
            eos_token: raw.eos_token.map(TokenDef::into_text),
            add_bos_token: raw.add_bos_token,
            add_eos_token: raw.add_eos_token,
            additional_special_tokens: raw
                .additional_special_tokens
                .unwrap_or_default()
                .into_iter()
                .map(TokenDef::into_text)
                .collect(),
            ..TokenizerConfig::default()
        };
        for (key, token) in [
            ("unk_token", raw.unk_token),
            ("pad_token", raw.pad_token),
            ("sep_token", raw.sep_token),
            ("cls_token", raw.cls_token),
            ("mask_token", raw.mask_token),
        ] {
            if let Some(token) = token {
                config.named_tokens.insert(key.to_owned(), token.into_text());
            }
        }
        config.chat_templates = match raw.chat_template {
            None => Vec::new(),
            Some(TemplateDef::One(t)) => vec![(DEFAULT_TEMPLATE_NAME.to_owned(), t)],
            Some(TemplateDef::Named(list)) => list.into_iter().map(|n| (n.name, n.template)).collect(),
        };
        if let Some(jinja) = chat_template_jinja {
            // transformers: a template file takes priority over every template in the config.
            config.chat_templates = vec![(DEFAULT_TEMPLATE_NAME.to_owned(), jinja.to_owned())];
        }
        for (id, entry) in raw.added_tokens_decoder.unwrap_or_default() {
            let id: u32 = id.parse().map_err(|_| TokenizeError::Json {
                file: "tokenizer_config.json",
                reason: format!("added_tokens_decoder key {id:?} is not a token id"),
            })?;
            config.added_tokens.insert(id, entry.content);
        }
        Ok(config)
    }

    /// The template transformers' `get_chat_template` picks: `tool_use` for requests with tools
    /// when the model has one, else `default`; `None` if there is neither.
    pub fn chat_template(&self, with_tools: bool) -> Option<&str> {
        if with_tools && let Some(t) = self.template_named(TOOL_USE_TEMPLATE_NAME) {
            return Some(t);
        }
        self.template_named(DEFAULT_TEMPLATE_NAME)
    }

    /// The template called `name`, if the model ships one by that name.
    pub fn template_named(&self, name: &str) -> Option<&str> {
        self.chat_templates.iter().find(|(n, _)| n == name).map(|(_, t)| t.as_str())
    }

    /// Named special tokens as transformers' `special_tokens_map` passes them to a chat template.
    pub fn special_tokens_map(&self) -> impl Iterator<Item = (&str, &str)> {
        let bos = self.bos_token.as_deref().map(|t| ("bos_token", t));
        let eos = self.eos_token.as_deref().map(|t| ("eos_token", t));
        bos.into_iter().chain(eos).chain(self.named_tokens.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_tokens_are_strings_or_added_token_objects() {
        let json = r#"{"bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false},
                       "eos_token": "</s>", "unk_token": null, "add_bos_token": true}"#;
        let config = TokenizerConfig::from_json(json, None).unwrap();
        assert_eq!(config.bos_token.as_deref(), Some("<s>"));
        assert_eq!(config.eos_token.as_deref(), Some("</s>"));
        assert!(!config.named_tokens.contains_key("unk_token"));
        assert_eq!(config.add_bos_token, Some(true));
    }

    #[test]
    fn named_templates_pick_tool_use_then_default() {
        let json = r#"{"chat_template": [{"name": "default", "template": "D"},
                                         {"name": "tool_use", "template": "T"}]}"#;
        let config = TokenizerConfig::from_json(json, None).unwrap();
        assert_eq!(config.chat_template(false), Some("D"));
        assert_eq!(config.chat_template(true), Some("T"));
        // A list without `default` has no template for plain requests (transformers refuses).
        let json = r#"{"chat_template": [{"name": "rag", "template": "R"}]}"#;
        assert_eq!(TokenizerConfig::from_json(json, None).unwrap().chat_template(false), None);
    }

    #[test]
    fn separate_jinja_file_replaces_the_config_templates() {
        let config = TokenizerConfig::from_json(r#"{"chat_template": "old"}"#, Some("new")).unwrap();
        assert_eq!(config.chat_template(false), Some("new"));
        let json = r#"{"chat_template": [{"name": "tool_use", "template": "T"}]}"#;
        let config = TokenizerConfig::from_json(json, Some("new")).unwrap();
        assert_eq!(config.chat_template(true), Some("new"));
    }

    #[test]
    fn malformed_config_names_the_file() {
        let err = TokenizerConfig::from_json("{", None).unwrap_err();
        assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
        let err = TokenizerConfig::from_json(r#"{"added_tokens_decoder": {"x": {"content": "a"}}}"#, None)
            .unwrap_err();
        assert!(err.to_string().contains("\"x\""), "{err}");
    }
}
