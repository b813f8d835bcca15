//! The HTTP API of each engine mode: OpenAI endpoints, errors, load and metrics endpoints.

mod common;

use common::*;
use kvmesh_sim::EngineKind;
use kvmesh_sim::engine_hash::{BlockChain, HashAlgo};
use serde_json::json;

const MODEL: &str = "Qwen/Qwen3-8B";

#[tokio::test]
async fn completions_and_chat_answer_with_consistent_usage() {
    let sim = start(args(), words()).await;
    let r = post(
        sim.addr,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": ["one two three", "four five"], "max_tokens": 5, "n": 2}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"].as_array().map(Vec::len), Some(4));
    assert!(
        v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["finish_reason"] == "length" && !c["text"].as_str().unwrap().is_empty())
    );
    // Each prompt counts once, every choice's output counts.
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    assert_eq!(v["usage"]["completion_tokens"], 20);
    assert_eq!(v["usage"]["total_tokens"], 25);

    let chat = json!({"model": MODEL, "messages": [{"role": "user", "content": "hello there"}]});
    let r = post(sim.addr, "/v1/chat/completions", &chat).await;
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    // Without max_tokens the sim draws a length and ends naturally.
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let again = post(sim.addr, "/v1/chat/completions", &chat).await.json();
    assert_eq!(
        again["choices"][0]["message"]["content"], v["choices"][0]["message"]["content"],
        "deterministic"
    );

    let models = get(sim.addr, "/v1/models").await.json();
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(get(sim.addr, "/health").await.status, 200);
    sim.shutdown().await;
}

#[tokio::test]
async fn streaming_sends_chunks_usage_and_done() {
    let sim = start(args(), words()).await;
    let body = json!({"model": MODEL, "prompt": "a b c d", "max_tokens": 3, "stream": true,
                      "stream_options": {"include_usage": true}});
    let r = post(sim.addr, "/v1/completions", &body).await;
    assert_eq!(r.status, 200);
    let data = r.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<serde_json::Value> =
        data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    let texts = chunks.iter().filter(|c| c["choices"].as_array().is_some_and(|a| !a.is_empty())).count();
    assert_eq!(texts, 4, "3 tokens and a final chunk with the finish reason");
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!((usage["prompt_tokens"].as_u64(), usage["completion_tokens"].as_u64()), (Some(4), Some(3)));

    let chat = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": true});
    let data = post(sim.addr, "/v1/chat/completions", &chat).await.sse_data();
    let first: serde_json::Value = serde_json::from_str(&data[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let last: serde_json::Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    sim.shutdown().await;
}

#[tokio::test]
async fn malformed_requests_get_4xx_json_errors() {
    let sim = start(args(), words()).await;
    let cases: Vec<(&str, String, u16)> = vec![
        ("/v1/completions", "{\"model\": ".into(), 400),
        ("/v1/completions", "[1,2]".into(), 400),
        ("/v1/completions", json!({"prompt": "x"}).to_string(), 400),
        ("/v1/completions", json!({"model": MODEL, "prompt": "x", "max_tokens": -1}).to_string(), 400),
        ("/v1/completions", json!({"model": "other", "prompt": "x"}).to_string(), 404),
        ("/v1/completions", json!({"model": MODEL, "prompt": "x", "max_tokens": 100_000}).to_string(), 400),
        ("/v1/chat/completions", json!({"model": MODEL, "messages": []}).to_string(), 400),
        ("/v1/chat/completions", json!({"model": MODEL, "messages": [{"content": "x"}]}).to_string(), 400),
        ("/v1/completions", json!({"model": MODEL, "prompt": "x", "kv_transfer_params": 5}).to_string(), 400),
        ("/v1/completions", String::new(), 400),
    ];
    for (path, body, status) in cases {
        let r = http(sim.addr, "POST", path, Some(&body)).await;
        assert_eq!(r.status, status, "{body} -> {}", r.body);
        let v = r.json();
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{}", r.body);
        assert_eq!(v["error"]["code"], status);
    }
    // Still serving after all that.
    assert_eq!(
        post(sim.addr, "/v1/completions", &json!({"model": MODEL, "prompt": "ok", "max_tokens": 1}))
            .await
            .status,
        200
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn vllm_load_and_metrics_change_as_load_changes() {
    let mut a = args();
    a.speedup = 1.0;
    let sim = start(a, words()).await;
    let addr = sim.addr;
    let before = get(addr, "/metrics").await.body;
    assert_eq!(sample(&before, "vllm:num_requests_running"), Some(0.0));
    assert_eq!(sample(&before, "vllm:prefix_cache_queries_total"), Some(0.0));
    let load: Vec<_> = (0..4)
        .map(|i| {
            let body =
                json!({"model": MODEL, "prompt": format!("request {i} with some words"), "max_tokens": 120});
            tokio::spawn(async move { post(addr, "/v1/completions", &body).await.status })
        })
        .collect();
    let busy = eventually(|| async {
        let m = get(addr, "/metrics").await.body;
        let l = get(addr, "/load").await.json();
        sample(&m, "vllm:num_requests_running").is_some_and(|v| v >= 1.0)
            && sample(&m, "vllm:kv_cache_usage_perc").is_some_and(|v| v > 0.0)
            && l["server_load"].as_u64().is_some_and(|v| v >= 1)
    })
    .await;
    assert!(busy, "running requests show in /metrics and /load");
    for h in load {
        assert_eq!(h.await.unwrap(), 200);
    }
    let idle = eventually(|| async {
        sample(&get(addr, "/metrics").await.body, "vllm:num_requests_running") == Some(0.0)
    })
    .await;
    assert!(idle);
    let after = get(addr, "/metrics").await.body;
    assert!(sample(&after, "vllm:prefix_cache_queries_total").is_some_and(|v| v > 0.0));
    assert!(sample(&after, "vllm:generation_tokens_total").is_some_and(|v| v == 480.0), "{after}");
    assert!(after.contains("vllm:time_to_first_token_seconds_count{"));
    assert_eq!(get(addr, "/load").await.json()["server_load"], 0);
    sim.shutdown().await;
}

#[tokio::test]
async fn vllm_event_sources_and_cache_reset() {
    let mut a = args();
    a.kv_events_endpoint = Some("tcp://*:0".into());
    a.kv_replay_endpoint = Some("tcp://*:0".into());
    let sim = start(a, words()).await;
    let ep = sim.kv_endpoints.clone().expect("events on");
    let src = get(sim.addr, "/kv_event_sources").await.json();
    assert_eq!(src["0"]["endpoint"], ep.endpoint.as_str());
    assert!(!ep.endpoint.ends_with(":0"), "the bound port is reported");
    assert_eq!(src["0"]["replay_endpoint"], ep.replay_endpoint.clone().unwrap().as_str());
    let mut sub = Sub::connect(&ep.endpoint).await;
    assert_eq!(
        post(
            sim.addr,
            "/v1/completions",
            &json!({"model": MODEL, "prompt": "x ".repeat(40), "max_tokens": 1})
        )
        .await
        .status,
        200
    );
    assert_eq!(post(sim.addr, "/reset_prefix_cache", &json!({})).await.status, 200);
    let batches = sub.drain(std::time::Duration::from_millis(400)).await;
    assert_eq!(batches.last().map(|b| b.events.clone()), Some(vec![Ev::Cleared]));
    sim.shutdown().await;
}

#[tokio::test]
async fn sglang_router_endpoints() {
    let mut a = args();
    a.engine = EngineKind::Sglang;
    a.kv_events_endpoint = Some("tcp://*:0".into());
    a.kv_replay_endpoint = Some("tcp://*:0".into());
    a.kv_events_topic = "kv-events".into();
    let sim = start(a, words()).await;
    let info = get(sim.addr, "/server_info").await.json();
    assert_eq!(info["disaggregation_mode"], "null");
    assert_eq!(info["page_size"], 16);
    let kv = &info["kv_events"];
    assert_eq!(kv["topic"], "kv-events");
    assert_eq!(kv["block_size"], 16);
    let port =
        sim.kv_endpoints.as_ref().unwrap().endpoint.rsplit(':').next().unwrap().parse::<u64>().unwrap();
    assert_eq!(kv["endpoint_port_base"], port);
    assert!(kv["replay_endpoint_port_base"].as_u64().is_some());
    assert_eq!(get(sim.addr, "/model_info").await.json()["model_path"], MODEL);
    let load = get(sim.addr, "/get_load").await.json();
    assert_eq!(load[0]["num_reqs"], 0);
    assert_eq!(
        post(
            sim.addr,
            "/v1/completions",
            &json!({"model": MODEL, "prompt": "y ".repeat(40), "max_tokens": 2})
        )
        .await
        .status,
        200
    );
    let m = get(sim.addr, "/metrics").await.body;
    assert_eq!(sample(&m, "sglang:num_running_reqs"), Some(0.0));
    assert!(sample(&m, "sglang:generation_tokens_total").is_some_and(|v| v == 2.0), "{m}");
    assert!(m.contains("engine_type=\"unified\""));
    sim.shutdown().await;
}

#[tokio::test]
async fn trtllm_stats_and_kv_events_over_http() {
    let mut a = args();
    a.engine = EngineKind::Trtllm;
    let sim = start(a, words()).await;
    let prompt: Vec<u32> = (1..=40).collect();
    let r =
        post(sim.addr, "/v1/completions", &json!({"model": MODEL, "prompt": prompt, "max_tokens": 3})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let stats = get(sim.addr, "/metrics").await.json();
    let stats = stats.as_array().expect("a list of iteration stats");
    assert!(!stats.is_empty());
    let s = &stats[0];
    for key in [
        "iter",
        "iterLatencyMS",
        "numActiveRequests",
        "numQueuedRequests",
        "kvCacheStats",
        "inflightBatchingStats",
    ] {
        assert!(s.get(key).is_some(), "{key} in {s}");
    }
    assert_eq!(s["kvCacheStats"]["tokensPerBlock"], 16);
    assert_eq!(s["kvCacheStats"]["maxNumBlocks"], 256);
    assert_eq!(get(sim.addr, "/metrics").await.json(), json!([]), "drained on read");

    let events = post(sim.addr, "/kv_cache_events", &json!({})).await.json();
    let events = events.as_array().expect("a list");
    assert_eq!(events[0]["data"]["type"], "created");
    let stored = events.iter().find(|e| e["data"]["type"] == "stored").expect("a stored event");
    let mut chain = BlockChain::new(HashAlgo::Trtllm, 16, None);
    chain.extend(&prompt);
    let hashes: Vec<u64> = stored["data"]["blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["block_hash"].as_u64().unwrap())
        .collect();
    assert_eq!(hashes, chain.hashes().iter().map(|h| h.0).collect::<Vec<_>>());
    assert_eq!(stored["data"]["blocks"][0]["tokens"][0]["token_id"], 1);
    assert_eq!(post(sim.addr, "/kv_cache_events", &json!({})).await.json(), json!([]), "drained on read");
    let prom = get(sim.addr, "/prometheus/metrics").await.body;
    assert!(sample(&prom, "trtllm_kv_cache_max_blocks").is_some_and(|v| v == 256.0), "{prom}");
    sim.shutdown().await;
}
