//! `kvmesh demo` end to end: the real tokenizer and template, the core's scorer and index, and the
//! simulated engines' prefix caches. kv-aware routing must find more of the prompt cached than
//! round robin on the same workload, and its predictions must match what the engines found.

use std::process::Command;

#[test]
fn kv_aware_beats_round_robin_on_the_demo_workload() {
    let out = Command::new(env!("CARGO_BIN_EXE_kvmesh"))
        .args(["demo", "--json", "--conversations", "12", "--turns", "4", "--kv-blocks", "512"])
        .output()
        .expect("the kvmesh binary runs");
    assert!(
        out.status.success(),
        "kvmesh demo failed (tokenizer files missing? run `make setup`): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: serde_json::Value = serde_json::from_slice(&out.stdout).expect("demo --json prints JSON");
    let by_policy = |name: &str| {
        results
            .as_array()
            .and_then(|a| a.iter().find(|r| r["policy"] == name))
            .unwrap_or_else(|| panic!("no {name} result in {results}"))
    };
    let kv = by_policy("kv-aware");
    let rr = by_policy("round-robin");
    assert_eq!(kv["requests"], 48);
    assert_eq!(kv["unrouted"], 0);
    let hit = |r: &serde_json::Value| r["hit_rate"].as_f64().expect("hit_rate is a number");
    assert!(hit(kv) > hit(rr), "kv-aware hit rate {} not above round robin {}", hit(kv), hit(rr));
    assert!(kv["prefill_tokens"].as_u64() < rr["prefill_tokens"].as_u64());
    // The router's predicted overlap is exactly what the engine then found cached.
    for turn in kv["sample"].as_array().expect("sample turns") {
        let predicted = turn["predicted_overlap_blocks"].as_u64().expect("number") * 16;
        let cached = turn["cached_tokens"].as_u64().expect("number");
        let prompt = turn["prompt_tokens"].as_u64().expect("number");
        // The engine never counts the block holding the last prompt token as cached.
        let cap = (prompt - 1) / 16 * 16;
        assert_eq!(cached, predicted.min(cap), "turn {turn}");
    }
}
