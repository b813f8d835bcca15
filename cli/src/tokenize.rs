//! `kvmesh tokenize`: the token ids the engine computes for a text or a request, to check what the
//! router sees against what the engine sees.

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use kvmesh_core::request::{Endpoint, InferenceRequest, Prompt, RequestLimits, parse_request};
use kvmesh_core::template::RenderOptions;
use kvmesh_core::tokenize::canonicalize;
use kvmesh_core::{TokenId, Tokenizer, TokenizerFiles};
use serde_json::value::RawValue;

/// Exit status for input that cannot be tokenized (and for an unusable tokenizer directory).
const BAD_INPUT: u8 = 2;

/// Arguments of `kvmesh tokenize`.
#[derive(clap::Args)]
pub struct TokenizeArgs {
    /// Directory with `tokenizer.json`, and optionally `tokenizer_config.json` and
    /// `chat_template.jinja`, as a model ships them.
    #[arg(long, value_name = "DIR")]
    tokenizer_dir: PathBuf,
    /// Read one OpenAI request body (chat or completions, told apart by `messages`) instead of raw
    /// text, and print the ids the engine computes for it. A batch of prompts prints one array each.
    #[arg(long)]
    request: bool,
    /// Print the directory's `tokenizer.json` in the canonical form the filter loads fastest (what
    /// the control plane serves; for a filter configured with its tokenizer inline), and read no
    /// input.
    #[arg(long, conflicts_with = "request")]
    canonical: bool,
}

/// Reads stdin and prints its token ids as one JSON array (no special tokens added to raw text).
pub fn run(args: TokenizeArgs) -> anyhow::Result<ExitCode> {
    let mut input = Vec::new();
    if !args.canonical {
        std::io::stdin().read_to_end(&mut input).context("cannot read stdin")?;
    }
    match tokenize(&args, &input) {
        Ok(json) => {
            println!("{json}");
            Ok(ExitCode::SUCCESS)
        }
        Err(err) => {
            eprintln!("kvmesh tokenize: {err:#}");
            Ok(ExitCode::from(BAD_INPUT))
        }
    }
}

/// The JSON to print for `input`, or why there is none.
fn tokenize(args: &TokenizeArgs, input: &[u8]) -> anyhow::Result<String> {
    if args.canonical {
        let path = args.tokenizer_dir.join("tokenizer.json");
        let json =
            std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        return canonicalize(&json).with_context(|| format!("cannot convert {}", path.display()));
    }
    if !args.request {
        let text = std::str::from_utf8(input).context("stdin is not UTF-8 text")?;
        let tokenizer = load(&args.tokenizer_dir)?;
        return Ok(serde_json::to_string(&tokenizer.encode(text)?)?);
    }
    // Parse before loading the tokenizer: a bad body fails fast.
    let endpoint = if has_messages(input) { Endpoint::ChatCompletions } else { Endpoint::Completions };
    let request = parse_request(endpoint, input, &RequestLimits::default())
        .map_err(|e| anyhow::anyhow!("bad {} request: {e}", endpoint.path()))?;
    let tokenizer = load(&args.tokenizer_dir)?;
    let ids: Vec<Vec<TokenId>> = match &request {
        InferenceRequest::Chat(chat) => {
            let template = tokenizer.chat_template(chat.chat_template.as_deref(), chat.tools.is_some())?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
                .ok();
            let options = RenderOptions { now_unix_seconds: now, default_kwargs: None };
            vec![tokenizer.encode_chat(&template, chat, &options)?]
        }
        InferenceRequest::Completion(completion) => {
            // vLLM tokenizes a completions prompt with the tokenizer's special tokens (BOS for
            // Llama 3) unless the request turns them off; token-id prompts pass through.
            let encode = |text: &str| {
                if completion.add_special_tokens {
                    tokenizer.encode_prompt(text)
                } else {
                    tokenizer.encode(text)
                }
            };
            match &completion.prompt {
                Prompt::Text(text) => vec![encode(text)?],
                Prompt::Texts(texts) => texts.iter().map(|t| encode(t)).collect::<Result<_, _>>()?,
                Prompt::Tokens(ids) => vec![ids.clone()],
                Prompt::TokenBatches(batches) => batches.clone(),
            }
        }
    };
    Ok(match ids.as_slice() {
        [one] => serde_json::to_string(one)?,
        many => serde_json::to_string(many)?,
    })
}

/// Whether a body has a non-null top-level `messages` (a chat request). A body that is not a JSON
/// object is left to the request parser to refuse.
fn has_messages(body: &[u8]) -> bool {
    serde_json::from_slice::<BTreeMap<String, &RawValue>>(body)
        .is_ok_and(|fields| fields.get("messages").is_some_and(|v| v.get() != "null"))
}

/// Loads the tokenizer files of `dir`.
pub(crate) fn load(dir: &Path) -> anyhow::Result<Tokenizer> {
    let read = |name: &str| std::fs::read_to_string(dir.join(name));
    let json = read("tokenizer.json")
        .with_context(|| format!("cannot read {}", dir.join("tokenizer.json").display()))?;
    let optional = |name: &str| match read(name) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", dir.join(name).display())),
    };
    let config = optional("tokenizer_config.json")?;
    let jinja = optional("chat_template.jinja")?;
    Tokenizer::from_files(TokenizerFiles {
        tokenizer_json: &json,
        tokenizer_config_json: config.as_deref(),
        chat_template_jinja: jinja.as_deref(),
    })
    .with_context(|| format!("cannot load the tokenizer in {}", dir.display()))
}
