//! `kvmesh tokenize` end to end: the built binary, real tokenizer files from `make setup`
//! (`$KVMESH_TOKENIZERS`), stdin in, JSON out, exit 2 on bad input.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn tokenizer_dir(model: &str) -> PathBuf {
    let root = std::env::var_os("KVMESH_TOKENIZERS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root/.cache/kvmesh/tokenizers"));
    let dir = root.join(model);
    assert!(
        dir.join("tokenizer.json").is_file(),
        "{} is missing: run `make setup` to fetch the tokenizer files",
        dir.join("tokenizer.json").display()
    );
    dir
}

fn kvmesh(args: &[&str], dir: &Path, stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvmesh"))
        .arg("tokenize")
        .arg("--tokenizer-dir")
        .arg(dir)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the kvmesh binary starts");
    child.stdin.take().expect("stdin is piped").write_all(stdin.as_bytes()).expect("stdin takes the input");
    child.wait_with_output().expect("kvmesh exits")
}

fn ids(output: &Output) -> Vec<u32> {
    assert!(output.status.success(), "kvmesh failed: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("stdout is one JSON array of ids")
}

#[test]
fn raw_text_gets_no_special_tokens_but_keeps_the_ones_in_it() {
    let out = kvmesh(&[], &tokenizer_dir("qwen3"), "Hello world<|im_end|>");
    // "Hello", " world", then the special token matched as one id, as HF does.
    assert_eq!(ids(&out), vec![9707, 1879, 151645]);
}

#[test]
fn requests_give_the_ids_the_engine_computes() {
    let dir = tokenizer_dir("llama3_1");
    // Chat: the template writes BOS and the generation prompt; nothing is added on top.
    let chat =
        kvmesh(&["--request"], &dir, r#"{"model": "m", "messages": [{"role": "user", "content": "Hi"}]}"#);
    let chat = ids(&chat);
    assert_eq!(chat.first(), Some(&128_000), "starts with <|begin_of_text|>");
    assert_eq!(chat.iter().filter(|&&id| id == 128_000).count(), 1, "BOS once");
    // Completions: the tokenizer adds BOS (vLLM's add_special_tokens=True); token ids pass through.
    let text = ids(&kvmesh(&["--request"], &dir, r#"{"model": "m", "prompt": "Hi"}"#));
    assert_eq!(text.first(), Some(&128_000));
    let tokens = ids(&kvmesh(&["--request"], &dir, r#"{"model": "m", "prompt": [1, 2, 3]}"#));
    assert_eq!(tokens, vec![1, 2, 3]);
}

#[test]
fn bad_input_exits_2_with_a_message() {
    let dir = tokenizer_dir("qwen3");
    for body in ["{not json", r#"{"model": "m", "messages": []}"#, r#"{"model": "m"}"#] {
        let out = kvmesh(&["--request"], &dir, body);
        assert_eq!(out.status.code(), Some(2), "{body}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("kvmesh tokenize:"), "{body}");
    }
    let out = kvmesh(&[], Path::new("/nonexistent/tokenizer"), "text");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tokenizer.json"));
}

#[test]
fn canonical_prints_a_tokenizer_json_that_loads_to_the_same_ids() {
    let dir = tokenizer_dir("qwen3");
    let out = kvmesh(&["--canonical"], &dir, "");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let canonical = String::from_utf8(out.stdout).expect("UTF-8 JSON");
    assert!(canonical.starts_with(r#"{"version":"2.0","#), "{}", &canonical[..80.min(canonical.len())]);
    // A directory holding the canonical file tokenizes as the original does.
    let copy = std::env::temp_dir().join(format!("kvmesh-canonical-{}", std::process::id()));
    std::fs::create_dir_all(&copy).expect("temp dir");
    std::fs::write(copy.join("tokenizer.json"), &canonical).expect("written");
    let text = "Hello world<|im_end|> 你好";
    let same = ids(&kvmesh(&[], &copy, text)) == ids(&kvmesh(&[], &dir, text));
    std::fs::remove_dir_all(&copy).expect("temp dir removed");
    assert!(same);
    let out = kvmesh(&["--canonical"], Path::new("/nonexistent/tokenizer"), "");
    assert_eq!(out.status.code(), Some(2));
}
