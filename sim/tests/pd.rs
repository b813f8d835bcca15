//! Prefill/decode disaggregation between two sims, with this test doing the proxy's part of each
//! engine's protocol (vLLM NixlConnector, SGLang bootstrap, TRT-LLM disaggregated params).

mod common;

use common::*;
use kvmesh_sim::{EngineKind, Role};
use serde_json::json;

const MODEL: &str = "Qwen/Qwen3-8B";

async fn pair(engine: EngineKind) -> (kvmesh_sim::RunningSim, kvmesh_sim::RunningSim) {
    let mut p = args();
    p.engine = engine;
    p.role = Role::Prefill;
    p.kv_transfer_port = Some(0);
    let mut d = args();
    d.engine = engine;
    d.role = Role::Decode;
    (start(p, words()).await, start(d, words()).await)
}

fn prompt() -> String {
    "the quick brown fox jumps over the lazy dog ".repeat(6)
}

/// KV usage of a worker, from its Prometheus text.
async fn kv_usage(addr: std::net::SocketAddr, path: &str, name: &str) -> f64 {
    sample(&get(addr, path).await.body, name).unwrap_or(f64::NAN)
}

#[tokio::test]
async fn vllm_nixl_prefill_then_decode() {
    let (p, d) = pair(EngineKind::Vllm).await;
    // Leg 1: the original request to P, as a 1-token, non-streaming prefill with do_remote_decode.
    let leg1 = json!({"model": MODEL, "prompt": prompt(), "max_tokens": 1, "stream": false,
        "kv_transfer_params": {"do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
                               "remote_block_ids": null, "remote_host": null, "remote_port": null}});
    let r1 = post(p.addr, "/v1/completions", &leg1).await;
    assert_eq!(r1.status, 200, "{}", r1.body);
    let v1 = r1.json();
    let params = v1["kv_transfer_params"].clone();
    assert_eq!(params["do_remote_prefill"], true);
    assert_eq!(params["do_remote_decode"], false);
    assert_eq!(params["remote_port"].as_u64(), p.transfer_port.map(u64::from));
    assert_eq!(params["remote_num_tokens"], 54);
    assert_eq!(params["remote_block_ids"][0].as_array().map(Vec::len), Some(4));
    assert!(params["remote_request_id"].is_string() && params["remote_engine_id"].is_string());
    // P holds the blocks for D.
    assert!(kv_usage(p.addr, "/metrics", "vllm:kv_cache_usage_perc").await > 0.0);

    // Leg 2: the original request (streaming) to D with P's parameters, forwarded verbatim.
    let leg2 = json!({"model": MODEL, "prompt": prompt(), "max_tokens": 8, "stream": true,
        "stream_options": {"include_usage": true}, "kv_transfer_params": params});
    let r2 = post(d.addr, "/v1/completions", &leg2).await;
    assert_eq!(r2.status, 200, "{}", r2.body);
    let data = r2.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let usage: serde_json::Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    let usage = &usage["usage"];
    assert_eq!(usage["completion_tokens"], 8);
    // All but the last prompt token came from P (vLLM recomputes the last one).
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 53);
    // D pulled the KV, so P freed its blocks.
    assert!(
        eventually(|| async { kv_usage(p.addr, "/metrics", "vllm:kv_cache_usage_perc").await == 0.0 }).await
    );
    p.shutdown().await;
    d.shutdown().await;
}

#[tokio::test]
async fn sglang_bootstrap_prefill_and_decode_together() {
    let (p, d) = pair(EngineKind::Sglang).await;
    let info = get(p.addr, "/server_info").await.json();
    assert_eq!(info["disaggregation_mode"], "prefill");
    let port = info["disaggregation_bootstrap_port"].as_u64().expect("a bootstrap port");
    assert_eq!(get(d.addr, "/server_info").await.json()["disaggregation_mode"], "decode");
    // The router sends the same body to both, at once.
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": prompt()}], "max_tokens": 6,
        "bootstrap_host": "127.0.0.1", "bootstrap_port": port, "bootstrap_room": 7_345_112_009_u64});
    let (rp, rd) = tokio::join!(
        post(p.addr, "/v1/chat/completions", &body),
        post(d.addr, "/v1/chat/completions", &body)
    );
    assert_eq!((rp.status, rd.status), (200, 200), "{} / {}", rp.body, rd.body);
    let (vp, vd) = (rp.json(), rd.json());
    assert_eq!(vp["choices"][0]["finish_reason"], "length");
    assert_eq!(vp["usage"]["completion_tokens"], 1);
    assert_eq!(vd["usage"]["completion_tokens"], 6);
    let prompt_tokens = vd["usage"]["prompt_tokens"].clone();
    assert_eq!(
        vd["usage"]["prompt_tokens_details"]["cached_tokens"], prompt_tokens,
        "the whole prompt came from P"
    );
    // D continues from P's first token.
    let first = vp["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    assert!(vd["choices"][0]["message"]["content"].as_str().unwrap().starts_with(&first));
    p.shutdown().await;
    d.shutdown().await;
}

#[tokio::test]
async fn trtllm_context_then_generation() {
    let (p, d) = pair(EngineKind::Trtllm).await;
    let ctx = json!({"model": MODEL, "prompt": prompt(), "max_tokens": 5, "stream": false,
        "disaggregated_params": {"request_type": "context_only", "disagg_request_id": 4242}});
    let r1 = post(p.addr, "/v1/completions", &ctx).await;
    assert_eq!(r1.status, 200, "{}", r1.body);
    let v1 = r1.json();
    assert_eq!(v1["choices"].as_array().map(Vec::len), Some(1));
    assert_eq!(v1["choices"][0]["finish_reason"], "length");
    let mut params = v1["choices"][0]["disaggregated_params"].clone();
    assert_eq!(params["request_type"], "context_only");
    assert_eq!(params["disagg_request_id"], 4242);
    assert!(params["ctx_request_id"].is_u64() && params["encoded_opaque_state"].is_string());
    assert_eq!(params["first_gen_tokens"].as_array().map(Vec::len), Some(1));
    let prompt_ids = v1["prompt_token_ids"].clone();
    assert_eq!(prompt_ids.as_array().map(Vec::len), Some(54));
    // The orchestrator sends the original request with the context's params as generation_only and
    // the context server's token ids as the prompt.
    params["request_type"] = json!("generation_only");
    let gen_body =
        json!({"model": MODEL, "prompt": prompt_ids, "max_tokens": 5, "disaggregated_params": params});
    let r2 = post(d.addr, "/v1/completions", &gen_body).await;
    assert_eq!(r2.status, 200, "{}", r2.body);
    let v2 = r2.json();
    assert_eq!(v2["usage"]["completion_tokens"], 5);
    assert_eq!(v2["usage"]["prompt_tokens_details"]["cached_tokens"], 54);
    p.shutdown().await;
    d.shutdown().await;
}

#[tokio::test]
async fn decode_worker_refuses_a_prefill_leg() {
    let (p, d) = pair(EngineKind::Vllm).await;
    let leg1 = json!({"model": MODEL, "prompt": "x", "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": true}});
    let r = post(d.addr, "/v1/completions", &leg1).await;
    assert_eq!(r.status, 400, "{}", r.body);
    p.shutdown().await;
    d.shutdown().await;
}
