//! End to end, as deployed: a real nats-server, two simulated vLLM workers (`kvmesh sim`) each with
//! its agent (`kvmesh agent`), and the control plane, all on 127.0.0.1. After a prompt is served by
//! worker A, `/v1/explain` for the same request shows A with the full overlap and B with none;
//! a restarted control plane rebuilds the same index through resync; resetting A's prefix cache
//! removes it; stopping A's agent expires A.
//!
//! The sims and agents run in-process through their crates' own entry points (the same code the
//! `kvmesh sim` and `kvmesh agent` commands run), so the test stops every one of them itself.

mod common;

use clap::Parser;
use common::*;
use kvmesh_control_plane::config::ModelConfig;
use serde_json::json;
use tokio::sync::oneshot;

#[derive(Parser)]
struct SimCli {
    #[command(flatten)]
    args: kvmesh_sim::SimArgs,
}

#[derive(Parser)]
struct AgentCli {
    #[command(flatten)]
    args: kvmesh_agent::AgentArgs,
}

/// One simulated worker and its agent.
struct Worker {
    sim: kvmesh_sim::RunningSim,
    agent_stop: Option<oneshot::Sender<()>>,
    agent: Option<tokio::task::JoinHandle<()>>,
}

impl Worker {
    async fn start(id: &str, nats: &str, namespace: &str, tokenizer_dir: &std::path::Path) -> Worker {
        let (pub_port, replay_port) = (kvmesh_tests::free_port(), kvmesh_tests::free_port());
        let sim_args = SimCli::try_parse_from([
            "sim",
            "--port",
            "0",
            "--model",
            "qwen",
            "--block-size",
            "16",
            "--tokenizer-dir",
            &tokenizer_dir.display().to_string(),
            "--kv-events-endpoint",
            &format!("tcp://*:{pub_port}"),
            "--kv-replay-endpoint",
            &format!("tcp://*:{replay_port}"),
            "--speedup",
            "50",
        ])
        .expect("sim flags")
        .args;
        let config = kvmesh_sim::SimConfig::new(sim_args).expect("sim config");
        let sim = kvmesh_sim::start(config).await.expect("sim starts");
        let agent_args = AgentCli::try_parse_from([
            "agent",
            "--worker-id",
            id,
            "--engine",
            "vllm",
            "--model",
            "qwen",
            "--address",
            &sim.addr.to_string(),
            "--kv-events",
            &format!("tcp://127.0.0.1:{pub_port}"),
            "--kv-replay",
            &format!("tcp://127.0.0.1:{replay_port}"),
            "--metrics-url",
            &format!("{}/metrics", sim.url()),
            "--block-size",
            "16",
            "--nats",
            nats,
            "--namespace",
            namespace,
            "--ttl",
            "1500ms",
            "--load-interval",
            "200ms",
            "--gpus",
            "none",
        ])
        .expect("agent flags")
        .args;
        let agent_config = agent_args.validate().expect("agent config");
        let (tx, rx) = oneshot::channel::<()>();
        let agent = tokio::spawn(async move {
            let stop = async move {
                let _ = rx.await;
            };
            if let Err(e) = kvmesh_agent::run(agent_config, kvmesh_agent::Gpus::none(), stop).await {
                panic!("agent failed: {e}");
            }
        });
        Worker { sim, agent_stop: Some(tx), agent: Some(agent) }
    }

    async fn stop_agent(&mut self) {
        if let Some(tx) = self.agent_stop.take() {
            let _ = tx.send(());
        }
        if let Some(agent) = self.agent.take() {
            let _ = tokio::time::timeout(WAIT, agent).await;
        }
    }

    async fn shutdown(mut self) {
        self.stop_agent().await;
        self.sim.shutdown().await;
    }
}

fn cp_config(nats: &kvmesh_tests::nats::NatsServer, dir: &std::path::Path) -> kvmesh_control_plane::Config {
    let mut config = config(nats, "e2e");
    config.models.push(ModelConfig::named("qwen", Some(dir.to_path_buf())));
    config
}

async fn explain(port: u16, body: &serde_json::Value) -> serde_json::Value {
    let (status, e) =
        request(port, "POST", "/v1/explain", None, Some(serde_json::to_vec(body).unwrap())).await;
    assert_eq!(status, 200, "{e}");
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prompt_served_by_a_shows_a_with_full_overlap_in_explain() {
    let nats = nats();
    let dir = kvmesh_tests::tokenizer_dir("qwen3");
    let cp = start(cp_config(&nats, &dir)).await;
    let port = cp.admin_addr().port();
    let mut a = Worker::start("a", &nats.url(), "e2e", &dir).await;
    let b = Worker::start("b", &nats.url(), "e2e", &dir).await;
    wait_until("both workers registered", || async {
        let s = stats(port).await;
        s["workers"].get("a").is_some() && s["workers"].get("b").is_some()
    })
    .await;

    let prompt = "You are a meticulous archivist. ".repeat(24) + "List three facts about the Rosetta Stone.";
    let request_body = json!({"model": "qwen", "prompt": prompt, "max_tokens": 8});
    let before = explain(port, &request_body).await;
    let blocks = before["hashed_blocks"].as_u64().unwrap();
    assert!(blocks >= 8, "{before}");
    assert_eq!(before["overlaps"], json!({"a": 0, "b": 0}), "nothing cached yet: {before}");

    // Serve the prompt on A.
    let sim_port = a.sim.addr.port();
    let body = serde_json::to_vec(&request_body).unwrap();
    let served = tokio::task::spawn_blocking(move || {
        kvmesh_tests::http::post(sim_port, "/v1/completions", &[("content-type", "application/json")], &body)
    })
    .await
    .unwrap()
    .expect("completion on sim A");
    assert_eq!(served.status, 200, "{}", String::from_utf8_lossy(served.body()));

    wait_until("A holds the prompt's blocks", || async {
        explain(port, &request_body).await["overlaps"]["a"].as_u64() == Some(blocks)
    })
    .await;
    let after = explain(port, &request_body).await;
    assert_eq!(after["overlaps"], json!({"a": blocks, "b": 0}), "{after}");
    assert_eq!(after["explanation"]["chosen"]["id"], "a", "{after}");
    assert_eq!(after["explanation"]["chosen"]["address"], a.sim.addr.to_string());

    // A restarted control plane rebuilds the same index from the agents' resync.all answers.
    let before_restart = stats(port).await;
    let new_config = cp_config(&nats, &dir);
    cp.shutdown().await;
    let cp = start(new_config).await;
    let port = cp.admin_addr().port();
    wait_until("restarted control plane rebuilt A's blocks", || async {
        let s = stats(port).await;
        s["workers"]["a"]["blocks"] == before_restart["workers"]["a"]["blocks"]
            && s["workers"].get("b").is_some()
    })
    .await;
    let rebuilt = stats(port).await;
    assert_eq!(rebuilt["workers"]["a"]["digest"], before_restart["workers"]["a"]["digest"], "{rebuilt}");
    assert_eq!(explain(port, &request_body).await["overlaps"], json!({"a": blocks, "b": 0}));

    // Evicting on the sim removes the blocks from the index.
    let sim_port = a.sim.addr.port();
    let reset = tokio::task::spawn_blocking(move || {
        kvmesh_tests::http::post(sim_port, "/reset_prefix_cache", &[], b"")
    })
    .await
    .unwrap()
    .expect("reset A's prefix cache");
    assert_eq!(reset.status, 200);
    wait_until("A's blocks left the index", || async { worker_blocks(port, "a").await == 0 }).await;
    assert_eq!(explain(port, &request_body).await["overlaps"]["a"], 0);

    // Killing A's agent stops its heartbeats: A expires.
    a.stop_agent().await;
    wait_until("A expired", || async { stats(port).await["workers"].get("a").is_none() }).await;
    let (_, workers) = get(port, "/v1/workers").await;
    assert_eq!(workers["workers"].as_array().unwrap().len(), 1, "{workers}");

    a.shutdown().await;
    b.shutdown().await;
    cp.shutdown().await;
}
