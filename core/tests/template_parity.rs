//! Chat prompts rendered by kvmesh must equal what vLLM renders through transformers'
//! `apply_chat_template`, byte for byte, and tokenize to the same ids. The expected renderings are
//! fixtures made by `tests/fixtures/templates/make_fixtures.py` (see `tests/fixtures/README.md`);
//! the tokenizer files come from `make setup` (`$KVMESH_TOKENIZERS`), and a missing file fails.

use std::path::{Path, PathBuf};

use kvmesh_core::request::{Endpoint, InferenceRequest, RequestLimits, parse_request};
use kvmesh_core::template::{ContentFormat, Native, RenderOptions};
use kvmesh_core::{Tokenizer, TokenizerFiles};
use serde::Deserialize;
use serde_json::value::RawValue;

/// One fixture file; the request stays raw JSON so its key order (which `tojson` shows) is kept.
#[derive(Deserialize)]
struct Fixture<'a> {
    tokenizer_dir: String,
    chat_template_file: Option<String>,
    content_format: String,
    #[serde(borrow)]
    cases: Vec<Case<'a>>,
}

#[derive(Deserialize)]
struct Case<'a> {
    name: String,
    #[serde(borrow)]
    request: &'a RawValue,
    rendered: Option<String>,
    ids: Option<Vec<u32>>,
    error: Option<String>,
}

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/templates")
}

fn tokenizer_root() -> PathBuf {
    std::env::var_os("KVMESH_TOKENIZERS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root/.cache/kvmesh/tokenizers"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| {
        panic!("cannot read {}: {e}; run `make setup` to fetch the tokenizer files", path.display())
    })
}

fn check_fixture(name: &str) {
    let text = read(&fixtures_dir().join(format!("{name}.json")));
    let fixture: Fixture<'_> = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}.json: {e}"));
    let dir = tokenizer_root().join(&fixture.tokenizer_dir);
    let jinja = fixture.chat_template_file.as_ref().map(|f| read(&fixtures_dir().join(f)));
    let (json, config) = (read(&dir.join("tokenizer.json")), read(&dir.join("tokenizer_config.json")));
    let tokenizer = Tokenizer::from_files(TokenizerFiles {
        tokenizer_json: &json,
        tokenizer_config_json: Some(&config),
        chat_template_jinja: jinja.as_deref(),
    })
    .unwrap_or_else(|e| panic!("{name}: {e}"));

    let mut failures = Vec::new();
    let cases = &fixture.cases;
    for case in cases {
        let case_name = &case.name;
        let body = case.request.get().as_bytes();
        let request = match parse_request(Endpoint::ChatCompletions, body, &RequestLimits::default()) {
            Ok(InferenceRequest::Chat(r)) => r,
            other => panic!("{name}/{case_name}: not a chat request: {other:?}"),
        };
        let template = tokenizer
            .chat_template(request.chat_template.as_deref(), request.tools.is_some())
            .unwrap_or_else(|e| panic!("{name}/{case_name}: {e}"));
        let want_format = match fixture.content_format.as_str() {
            "openai" => ContentFormat::OpenAi,
            _ => ContentFormat::String,
        };
        assert_eq!(template.content_format(), want_format, "{name}: content format");
        let rendered = template.render(&request, &RenderOptions::default());
        // A known template renders natively where it can: the interpreter must agree with it.
        let interpreted = template.render_interpreted(&request, &RenderOptions::default());
        if rendered.as_ref().ok() != interpreted.as_ref().ok() {
            failures.push(format!("{case_name}: native and minijinja renderings differ"));
            continue;
        }
        match (case.rendered.as_deref(), rendered) {
            (Some(want), Ok(got)) => {
                if got != want {
                    failures.push(format!("{case_name}: rendered\n{got:?}\nexpected\n{want:?}"));
                    continue;
                }
                let ids = tokenizer.encode(&got).unwrap_or_else(|e| panic!("{name}/{case_name}: {e}"));
                if Some(&ids) != case.ids.as_ref() {
                    failures.push(format!("{case_name}: ids differ from Python tokenizers"));
                }
            }
            (None, Err(_)) => {} // transformers refused it too
            (Some(_), Err(e)) => failures.push(format!("{case_name}: {e}")),
            (None, Ok(got)) => failures.push(format!(
                "{case_name}: rendered {got:?}, but transformers refused with {:?}",
                case.error
            )),
        }
    }
    eprintln!("{name}: {} cases, {} failures", cases.len(), failures.len());
    assert!(
        failures.is_empty(),
        "{name}: {} of {} cases differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn qwen3_renders_as_transformers() {
    check_fixture("qwen3");
}

#[test]
fn known_templates_have_native_renderers() {
    for (dir, native) in [("qwen3", Native::Qwen3), ("llama3_1", Native::Llama3)] {
        let dir = tokenizer_root().join(dir);
        let (json, config) = (read(&dir.join("tokenizer.json")), read(&dir.join("tokenizer_config.json")));
        let files = TokenizerFiles {
            tokenizer_json: &json,
            tokenizer_config_json: Some(&config),
            chat_template_jinja: None,
        };
        let tokenizer = Tokenizer::from_files(files).expect("the tokenizer loads");
        let template = tokenizer.chat_template(None, false).expect("the model has a template");
        assert_eq!(template.native(), Some(native), "{}", dir.display());
    }
}

#[test]
fn llama3_1_renders_as_transformers() {
    check_fixture("llama3_1");
}

#[test]
fn llama3_1_tool_template_file_renders_as_transformers() {
    check_fixture("llama3_1_tools");
}
