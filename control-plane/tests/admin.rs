//! The REST admin API: auth, worker state, policies, JSON errors, OpenAPI, and explain with a real
//! tokenizer (Qwen3's) against blocks published on NATS.

mod common;

use common::*;
use kvmesh_control_plane::admin::ROUTES;
use kvmesh_control_plane::config::ModelConfig;
use kvmesh_core::hash::hash_prompt;
use kvmesh_core::request::{Endpoint, InferenceRequest, RequestLimits, parse_request};
use kvmesh_core::template::RenderOptions;
use kvmesh_core::{BlockSalt, Tokenizer, TokenizerFiles};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutating_calls_need_the_token_and_every_error_is_json() {
    let nats = nats();
    let client = client(&nats).await;
    let cp = start(config(&nats, "adm1")).await;
    let port = cp.admin_addr().port();
    let a = FakeAgent::start(&client, "adm1", "a", 1).await;
    a.heartbeat(60_000).await;
    wait_until("a registered", || async { stats(port).await["workers"].get("a").is_some() }).await;

    let policy = serde_json::to_vec(&json!({"model": "m", "routing": {"policy": "load-only"}})).unwrap();
    let calls: [(&str, &str, Option<Vec<u8>>); 5] = [
        ("POST", "/v1/workers/a/drain", None),
        ("POST", "/v1/workers/a/cordon", None),
        ("POST", "/v1/workers/a/uncordon", None),
        ("POST", "/v1/workers/a/role", Some(br#"{"role":"prefill"}"#.to_vec())),
        ("PUT", "/v1/policy", Some(policy.clone())),
    ];
    for (method, path, body) in &calls {
        for token in [None, Some("wrong")] {
            let (status, body) = request(port, method, path, token, body.clone()).await;
            assert_eq!(status, 401, "{method} {path} with {token:?}: {body}");
            assert_eq!(body["error"]["code"], "unauthorized", "{body}");
        }
    }
    let (status, w) = request(port, "POST", "/v1/workers/a/cordon", Some(TOKEN), None).await;
    assert_eq!((status, &w["worker"]["state"]), (200, &json!("cordoned")), "{w}");
    let (_, w) = request(port, "POST", "/v1/workers/a/drain", Some(TOKEN), None).await;
    assert_eq!(w["worker"]["state"], "draining");
    let (_, w) = request(port, "POST", "/v1/workers/a/uncordon", Some(TOKEN), None).await;
    assert_eq!(w["worker"]["state"], "ready");
    let (_, w) =
        request(port, "POST", "/v1/workers/a/role", Some(TOKEN), Some(br#"{"role":"prefill"}"#.to_vec()))
            .await;
    assert_eq!((&w["worker"]["role"], &w["worker"]["role_override"]), (&json!("prefill"), &json!("prefill")));
    let (_, list) = get(port, "/v1/workers").await;
    assert_eq!(list["workers"][0]["role"], "prefill", "{list}");
    let (status, e) = request(port, "POST", "/v1/workers/nobody/cordon", Some(TOKEN), None).await;
    assert_eq!((status, &e["error"]["code"]), (404, &json!("unknown_worker")));

    let (status, p) = request(port, "PUT", "/v1/policy", Some(TOKEN), Some(policy)).await;
    assert_eq!((status, &p["routing"]["policy"]), (200, &json!("load-only")), "{p}");
    let (_, p) = get(port, "/v1/policy").await;
    assert_eq!(p["policies"]["m"]["policy"], "load-only", "{p}");
    let bad =
        serde_json::to_vec(&json!({"model": "m", "routing": {"weights": {"overlap_weight": -1}}})).unwrap();
    let (status, e) = request(port, "PUT", "/v1/policy", Some(TOKEN), Some(bad)).await;
    assert_eq!(status, 400);
    assert!(e["error"]["message"].as_str().unwrap().contains("weights.overlap_weight"), "{e}");
    let (status, e) = request(port, "PUT", "/v1/policy", Some(TOKEN), Some(b"{".to_vec())).await;
    assert_eq!((status, e["error"].is_object()), (400, true), "{e}");

    let (status, e) = get(port, "/v1/nothing").await;
    assert_eq!((status, &e["error"]["code"]), (404, &json!("not_found")));
    let (status, e) = request(port, "DELETE", "/v1/workers", None, None).await;
    assert_eq!((status, e["error"].is_object()), (405, true), "{e}");
    let (status, e) = request(port, "POST", "/v1/explain", None, Some(b"{".to_vec())).await;
    assert_eq!((status, e["error"].is_object()), (400, true), "{e}");
    let (status, e) =
        request(port, "POST", "/v1/explain", None, Some(br#"{"model":"nope","prompt":"hi"}"#.to_vec())).await;
    assert_eq!((status, e["error"].is_object()), (404, true), "{e}");
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_route_answers_and_is_in_the_openapi_document() {
    let nats = nats();
    let cp = start(config(&nats, "adm2")).await;
    let port = cp.admin_addr().port();
    let (status, doc) = get(port, "/openapi.json").await;
    assert_eq!(status, 200);
    for (method, path) in ROUTES {
        assert!(
            doc["paths"][path][method.to_lowercase()].is_object(),
            "{method} {path} missing from /openapi.json"
        );
        let concrete = path.replace("{id}", "nobody");
        let (status, body) = request(port, method, &concrete, None, Some(b"{}".to_vec())).await;
        // Routed: neither the 404 fallback nor 405 (unknown workers answer their own 404 JSON).
        assert!(
            status != 405 && !(status == 404 && body["error"]["code"] == "not_found"),
            "{method} {path}: {status} {body}"
        );
    }
    assert_eq!(get(port, "/healthz").await, (200, json!({"status": "ok"})));
    assert_eq!(get(port, "/readyz").await, (200, json!({"ready": true})));
    cp.shutdown().await;
}

/// Token ids of an OpenAI request body, computed the way the engine does, independently of the
/// control plane's own pipeline.
fn tokens_of(tokenizer: &Tokenizer, endpoint: Endpoint, body: &[u8]) -> Vec<u32> {
    match parse_request(endpoint, body, &RequestLimits::default()).unwrap() {
        InferenceRequest::Completion(c) => match c.prompt {
            kvmesh_core::request::Prompt::Text(t) => tokenizer.encode_prompt(&t).unwrap(),
            other => panic!("text prompt expected, got {other:?}"),
        },
        InferenceRequest::Chat(chat) => {
            let template = tokenizer.chat_template(None, false).unwrap();
            tokenizer.encode_chat(&template, &chat, &RenderOptions::default()).unwrap()
        }
    }
}

fn hashes(tokens: &[u32], block_size: usize) -> Vec<u64> {
    let mut out = Vec::new();
    hash_prompt(tokens, block_size, BlockSalt::NONE, &mut out);
    out.into_iter().map(|h| h.0).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn explain_shows_the_worker_holding_the_prefix_with_full_overlap() {
    let nats = nats();
    let client = client(&nats).await;
    let dir = kvmesh_tests::tokenizer_dir("qwen3");
    let mut config = config(&nats, "adm3");
    config.models.push(ModelConfig::named("qwen", Some(dir.clone())));
    let cp = start(config).await;
    let port = cp.admin_addr().port();
    let a = FakeAgent::start_for(&client, "adm3", "a", 1, "qwen", 16).await;
    let b = FakeAgent::start_for(&client, "adm3", "b", 2, "qwen", 16).await;
    a.heartbeat(60_000).await;
    b.heartbeat(60_000).await;

    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    let json = read("tokenizer.json").unwrap();
    let config_json = read("tokenizer_config.json");
    let tokenizer = tokio::task::block_in_place(|| {
        Tokenizer::from_files(TokenizerFiles {
            tokenizer_json: &json,
            tokenizer_config_json: config_json.as_deref(),
            chat_template_jinja: None,
        })
        .unwrap()
    });

    let prompt = "You are a careful assistant. ".repeat(20) + "Summarise the history of the printing press.";
    let completion =
        serde_json::to_vec(&json!({"model": "qwen", "prompt": prompt, "max_tokens": 16})).unwrap();
    let completion_tokens = tokens_of(&tokenizer, Endpoint::Completions, &completion);
    let completion_blocks = hashes(&completion_tokens, 16);
    assert!(completion_blocks.len() >= 8, "a prompt of several blocks");
    a.store(&completion_blocks).await;

    let chat = serde_json::to_vec(&json!({"model": "qwen", "messages": [
        {"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "Why is the sky blue? ".repeat(10)}]}))
    .unwrap();
    let chat_blocks = hashes(&tokens_of(&tokenizer, Endpoint::ChatCompletions, &chat), 16);
    b.store(&chat_blocks).await;
    wait_until("both indexed", || async {
        let s = stats(port).await;
        s["workers"]["a"]["blocks"] == completion_blocks.len()
            && s["workers"]["b"]["blocks"] == chat_blocks.len()
    })
    .await;

    let (status, e) = request(port, "POST", "/v1/explain", None, Some(completion)).await;
    assert_eq!(status, 200, "{e}");
    assert_eq!(e["endpoint"], "completions");
    assert_eq!(e["prompt_tokens"], completion_tokens.len());
    assert_eq!(e["hashed_blocks"], completion_blocks.len());
    assert_eq!(e["overlaps"], json!({"a": completion_blocks.len(), "b": 0}), "{e}");
    assert_eq!(e["explanation"]["chosen"]["id"], "a", "{e}");
    let candidates = e["explanation"]["candidates"].as_array().unwrap();
    assert!(candidates.iter().all(|c| c["cost"].is_number() && c["running"].is_number()), "{e}");

    // Chat, told by `messages`; and the same body as a completion by query (no prompt: 400).
    let (status, e) = request(port, "POST", "/v1/explain", None, Some(chat.clone())).await;
    assert_eq!(status, 200, "{e}");
    assert_eq!(e["endpoint"], "chat");
    assert_eq!(e["overlaps"], json!({"a": 0, "b": chat_blocks.len()}), "{e}");
    assert_eq!(e["explanation"]["chosen"]["id"], "b");
    let (status, e) = request(port, "POST", "/v1/explain?endpoint=completions", None, Some(chat)).await;
    assert_eq!(status, 400, "{e}");

    // A prompt sharing only the first half of a's blocks overlaps that much.
    let half = completion_blocks.len() / 2;
    let ids: Vec<u32> = completion_tokens[..half * 16].iter().copied().chain([1, 2, 3].repeat(16)).collect();
    let body = serde_json::to_vec(&json!({"model": "qwen", "prompt": ids})).unwrap();
    let (status, e) = request(port, "POST", "/v1/explain", None, Some(body)).await;
    assert_eq!(status, 200, "{e}");
    assert_eq!(e["overlaps"]["a"], half, "{e}");

    let (_, models) = get(port, "/v1/models").await;
    let qwen = &models["models"][0];
    assert_eq!(
        (&qwen["name"], &qwen["has_tokenizer"], &qwen["workers"]),
        (&json!("qwen"), &json!(true), &json!(2))
    );
    assert_eq!(qwen["block_size"], 16, "block size from the workers' registration: {models}");
    let _: Value = models;
    cp.shutdown().await;
}
