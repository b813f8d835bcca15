//! The property the system rests on, end to end: a simulated vLLM worker serves prompts, the agent
//! forwards its KV events over a real nats-server, and the blocks arrive named exactly as
//! `kvmesh_core::hash::hash_prompt` names the prompts' tokens (what the filter computes).

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use common::WAIT;
use kvmesh_agent::http::HttpClient;
use kvmesh_agent::{AgentArgs, Gpus};
use kvmesh_core::hash::{BlockHash, BlockSalt, hash_prompt};
use kvmesh_proto::v1::{Heartbeat, KvEventBatch, kv_event};
use kvmesh_sim::SimConfig;
use kvmesh_sim::prompt::WordTokenizer;
use kvmesh_tests::nats::NatsServer;
use prost::Message;
use tokio_stream::StreamExt;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: AgentArgs,
}

#[derive(Parser)]
struct SimCli {
    #[command(flatten)]
    args: kvmesh_sim::SimArgs,
}

const BLOCK: usize = 16;

/// A prompt of `blocks` full blocks plus 5 tokens (so one generated token completes no block).
fn prompt(first: u32, blocks: usize) -> Vec<u32> {
    (first..first + (blocks * BLOCK + 5) as u32).collect()
}

fn names(tokens: &[u32]) -> Vec<BlockHash> {
    let mut out = Vec::new();
    hash_prompt(tokens, BLOCK, BlockSalt::NONE, &mut out);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_vllm_prompts_arrive_as_the_filter_names_them() {
    prompts_arrive_as_the_filter_names_them("vllm").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_sglang_prompts_arrive_as_the_filter_names_them() {
    prompts_arrive_as_the_filter_names_them("sglang").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_trtllm_prompts_arrive_as_the_filter_names_them() {
    prompts_arrive_as_the_filter_names_them("trtllm").await;
}

async fn prompts_arrive_as_the_filter_names_them(engine: &str) {
    let zmq = engine != "trtllm";
    let nats = tokio::task::spawn_blocking(NatsServer::start).await.expect("nats-server started");
    let events_port = kvmesh_tests::free_port();
    let replay_port = kvmesh_tests::free_port();
    let sim_port = kvmesh_tests::free_port();
    let mut sim_flags = vec![
        "sim".to_owned(),
        format!("--engine={engine}"),
        format!("--port={sim_port}"),
        "--model=tiny".to_owned(),
        "--speedup=50".to_owned(),
    ];
    if zmq {
        sim_flags.extend([
            format!("--kv-events-endpoint=tcp://127.0.0.1:{events_port}"),
            format!("--kv-replay-endpoint=tcp://127.0.0.1:{replay_port}"),
            "--kv-events-topic=kv-events".to_owned(),
        ]);
    }
    let sim_args = SimCli::try_parse_from(sim_flags).expect("sim flags").args;
    let mut config = SimConfig::new(sim_args).expect("sim config");
    config.tokenizer = Some(Arc::new(WordTokenizer::default()));

    let client = async_nats::connect(nats.url()).await.expect("test client connects");
    let mut sub = client.subscribe("kvmesh.simtest.>").await.expect("subscribe");
    client.flush().await.expect("subscription registered");
    let mut agent_flags = vec![
        "agent".to_owned(),
        "--worker-id=sim-1".to_owned(),
        format!("--engine={engine}"),
        "--namespace=simtest".to_owned(),
        "--model=tiny".to_owned(),
        format!("--address=127.0.0.1:{sim_port}"),
        format!("--metrics-url=http://127.0.0.1:{sim_port}/metrics"),
        format!("--nats={}", nats.url()),
        "--load-interval=200ms".to_owned(),
        "--ttl=600ms".to_owned(),
    ];
    if zmq {
        // The agent binds; the sim's publisher connects to it (an endpoint with a host connects out).
        agent_flags.extend([
            format!("--kv-events-bind=tcp://127.0.0.1:{events_port}"),
            format!("--kv-replay=tcp://127.0.0.1:{replay_port}"),
            "--kv-topic=kv-events".to_owned(),
        ]);
    }
    let cli = Cli::try_parse_from(agent_flags).expect("agent flags");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let agent =
        tokio::spawn(kvmesh_agent::run(cli.args.validate().expect("valid"), Gpus::none(), async move {
            let _ = stopped.await;
        }));
    // The agent binds first: the sim's publisher connects to it while starting.
    let sim = kvmesh_sim::start(config).await.expect("sim starts");

    let http = HttpClient::new(Duration::from_secs(10));
    let complete = async |tokens: &[u32]| {
        let body = serde_json::json!({"model": "tiny", "prompt": tokens, "max_tokens": 1}).to_string();
        http.post_json(&format!("{}/v1/completions", sim.url()), Bytes::from(body))
            .await
            .expect("completion");
    };

    // A: 6 blocks. B: A's first 4 blocks, then 3 of its own (a prefix hit: only B's own blocks are
    // stored, under A's 4th block as parent).
    let a = prompt(1000, 6);
    let mut b = a[..4 * BLOCK].to_vec();
    b.extend(prompt(5000, 3));
    complete(&a).await;
    complete(&b).await;
    let mut expected: HashMap<BlockHash, i64> = HashMap::new();
    for h in names(&a).into_iter().chain(names(&b)) {
        expected.insert(h, 1);
    }
    // Events sent before the agent's subscription reached the sim are lost (ZMQ's slow joiner); the
    // next batch the agent sees makes it replay them. Keep serving fresh prompts until A and B are in.
    let mut model: HashMap<BlockHash, i64> = HashMap::new();
    let mut heartbeat: Option<Heartbeat> = None;
    let mut filler = 20_000u32;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !expected.keys().all(|h| model.contains_key(h))
        || heartbeat.as_ref().is_none_or(|h| h.block_size != BLOCK as u32)
    {
        let message = match tokio::time::timeout(Duration::from_millis(500), sub.next()).await {
            Ok(message) => message.expect("subscription open"),
            Err(_) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "A's and B's blocks never arrived: {model:?}"
                );
                let extra = prompt(filler, 1);
                filler += 1000;
                complete(&extra).await;
                for h in names(&extra) {
                    expected.insert(h, 1);
                }
                continue;
            }
        };
        if message.subject.as_str() == "kvmesh.simtest.kv.sim-1" {
            let batch = KvEventBatch::decode(message.payload).expect("KvEventBatch");
            for event in batch.events {
                match event.kind {
                    Some(kv_event::Kind::Stored(s)) => {
                        s.blocks.iter().for_each(|h| *model.entry(BlockHash(*h)).or_insert(0) += 1)
                    }
                    Some(kv_event::Kind::Removed(r)) => {
                        r.blocks.iter().for_each(|h| *model.entry(BlockHash(*h)).or_insert(0) -= 1)
                    }
                    Some(kv_event::Kind::Cleared(_)) => model.clear(),
                    None => panic!("event without a kind"),
                }
            }
            model.retain(|_, c| *c > 0);
        } else if message.subject.as_str() == "kvmesh.simtest.worker.sim-1" {
            heartbeat = Some(Heartbeat::decode(message.payload).expect("Heartbeat"));
        }
    }
    // Every block the agent published is one the filter computes for a prompt that was served, once.
    for (block, copies) in &model {
        assert_eq!(expected.get(block), Some(copies), "block {block:?} is not a served prompt's block");
    }
    let heartbeat = heartbeat.expect("a heartbeat");
    assert_eq!((heartbeat.worker_id.as_str(), heartbeat.block_size), ("sim-1", BLOCK as u32));

    let _ = stop.send(());
    tokio::time::timeout(WAIT, agent).await.expect("agent stops").expect("agent task").expect("agent ran");
    sim.shutdown().await;
}
