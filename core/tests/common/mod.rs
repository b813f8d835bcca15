//! What the tokenizer integration tests share: the tokenizer files `make setup` fetched into
//! `$KVMESH_TOKENIZERS` (default `/root/.cache/kvmesh/tokenizers`), loaded once per test binary.
//! A missing file fails the test: it means a broken set-up, never a reason to skip.
#![allow(dead_code)] // each test binary uses part of it

use std::path::PathBuf;
use std::sync::OnceLock;

use kvmesh_core::{Tokenizer, TokenizerFiles};

/// The directory of one model's tokenizer files (`qwen3`, `llama3_1`).
pub fn tokenizer_dir(model: &str) -> PathBuf {
    std::env::var_os("KVMESH_TOKENIZERS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root/.cache/kvmesh/tokenizers"))
        .join(model)
}

/// Loads a model's tokenizer from its files.
pub fn load(model: &str) -> Tokenizer {
    let dir = tokenizer_dir(model);
    let read = |file: &str| {
        std::fs::read_to_string(dir.join(file))
            .unwrap_or_else(|e| panic!("cannot read {}: {e}; run `make setup`", dir.join(file).display()))
    };
    let (json, config) = (read("tokenizer.json"), read("tokenizer_config.json"));
    Tokenizer::from_files(TokenizerFiles {
        tokenizer_json: &json,
        tokenizer_config_json: Some(&config),
        chat_template_jinja: None,
    })
    .unwrap_or_else(|e| panic!("{model}: {e}"))
}

/// A model's tokenizer, loaded on first use and shared by the tests of one binary.
pub fn shared(model: &str) -> &'static Tokenizer {
    static QWEN3: OnceLock<Tokenizer> = OnceLock::new();
    static LLAMA3_1: OnceLock<Tokenizer> = OnceLock::new();
    match model {
        "qwen3" => QWEN3.get_or_init(|| load(model)),
        "llama3_1" => LLAMA3_1.get_or_init(|| load(model)),
        other => panic!("no tokenizer set-up named {other}"),
    }
}
