//! Models' tokenizer and chat-template files: read once at start, served to filters (which cannot
//! read files inside Envoy) and used by `/v1/explain` to tokenize as the engine does.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use kvmesh_core::Tokenizer;
use kvmesh_core::template::ChatTemplate;
use kvmesh_core::tokenize::{TokenizerFiles, canonicalize};

use crate::config::{Config, ModelConfig};
use crate::error::Error;

/// A model's files and the tokenizer loaded from them.
pub struct ModelFiles {
    /// Identity of the files: xxh3-64 (hex) of `tokenizer.json` as shipped.
    pub tokenizer_id: String,
    /// `tokenizer.json` in the canonical form the 1.0 engine loads without converting (what
    /// filters get: converting the HF form costs every wasm VM a full JSON round trip).
    pub tokenizer_json: Arc<Vec<u8>>,
    /// `tokenizer_config.json` (empty when the model ships none).
    pub tokenizer_config: Arc<Vec<u8>>,
    /// The default chat template source (`chat_template.jinja`, else the config's; empty if none).
    pub chat_template: String,
    /// The tokenizer, as explain uses it.
    pub tokenizer: Tokenizer,
    /// The compiled default chat template, when the model has one.
    pub default_template: Option<ChatTemplate>,
}

/// One configured model.
pub struct Model {
    /// Its configuration.
    pub config: ModelConfig,
    /// Its files, when a tokenizer directory is configured.
    pub files: Option<ModelFiles>,
}

/// Every configured model by name.
#[derive(Default)]
pub struct Models {
    by_name: BTreeMap<String, Model>,
}

impl Models {
    /// Loads the files of every configured model; fails naming the model whose files are broken.
    pub fn load(config: &Config) -> Result<Models, Error> {
        let mut by_name = BTreeMap::new();
        for model in &config.models {
            let files = match &model.tokenizer_dir {
                Some(dir) => Some(load_files(&model.name, dir)?),
                None => None,
            };
            by_name.insert(model.name.clone(), Model { config: model.clone(), files });
        }
        Ok(Models { by_name })
    }

    /// A model by name.
    pub fn get(&self, name: &str) -> Option<&Model> {
        self.by_name.get(name)
    }

    /// Every model, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Model)> {
        self.by_name.iter().map(|(k, v)| (k.as_str(), v))
    }
}

/// Reads and checks a model's files.
fn load_files(model: &str, dir: &Path) -> Result<ModelFiles, Error> {
    let err = |reason: String| Error::ModelAssets { model: model.to_owned(), reason };
    let read = |name: &str| -> Result<Option<String>, Error> {
        let path = dir.join(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(err(format!("{}: {e}", path.display()))),
        }
    };
    let shipped =
        read("tokenizer.json")?.ok_or_else(|| err(format!("{} has no tokenizer.json", dir.display())))?;
    let config = read("tokenizer_config.json")?;
    let jinja = read("chat_template.jinja")?;
    let tokenizer_id = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(shipped.as_bytes()));
    let canonical = canonicalize(&shipped).map_err(|e| err(e.to_string()))?;
    let tokenizer = Tokenizer::from_files(TokenizerFiles {
        tokenizer_json: &canonical,
        tokenizer_config_json: config.as_deref(),
        chat_template_jinja: jinja.as_deref(),
    })
    .map_err(|e| err(e.to_string()))?;
    let chat_template = tokenizer.config().chat_template(false).unwrap_or_default().to_owned();
    let default_template = if chat_template.is_empty() {
        None
    } else {
        Some(tokenizer.chat_template(None, false).map_err(|e| err(e.to_string()))?)
    };
    tracing::info!(model, dir = %dir.display(), tokenizer_id, has_template = default_template.is_some(), "model files loaded");
    Ok(ModelFiles {
        tokenizer_id,
        tokenizer_json: Arc::new(canonical.into_bytes()),
        tokenizer_config: Arc::new(config.unwrap_or_default().into_bytes()),
        chat_template,
        tokenizer,
        default_template,
    })
}
