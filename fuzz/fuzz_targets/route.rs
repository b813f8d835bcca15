//! The filter's whole decision on a client's body: parse, render Qwen3's chat template, tokenize,
//! hash, score, in one router that learns across inputs (segment cache, optimistic entries).
//! Needs the Qwen3 tokenizer files that `make setup` installs (`$KVMESH_TOKENIZERS/qwen3`).
#![no_main]

use std::cell::RefCell;
use std::path::PathBuf;

use kvmesh_core::request::Endpoint;
use kvmesh_core::tokenize::canonicalize;
use kvmesh_filter::FilterConfig;
use kvmesh_filter::router::Router;
use libfuzzer_sys::fuzz_target;

fn tokenizer_dir() -> PathBuf {
    let base = std::env::var_os("KVMESH_TOKENIZERS").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
        home.join(".cache/kvmesh/tokenizers")
    });
    base.join("qwen3")
}

fn router(policy: &str) -> Router {
    let dir = tokenizer_dir();
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| {
            panic!("fuzz set-up: read {}: {e} (run make setup)", dir.join(name).display())
        })
    };
    let tokenizer = canonicalize(&read("tokenizer.json")).expect("fuzz set-up: the Qwen3 tokenizer converts");
    let workers: Vec<String> = (0..4)
        .map(|i| {
            format!(r#"{{"id":"w{i}","address":"127.0.0.1:{}","model":"qwen3","block_size":16}}"#, 9000 + i)
        })
        .collect();
    let config = format!(
        r#"{{"models":[{{"name":"qwen3","tokenizer":{tokenizer},"tokenizer_config":{}}}],"workers":[{}],"routing":{{"policy":"{policy}"}}}}"#,
        read("tokenizer_config.json"),
        workers.join(",")
    );
    let config =
        FilterConfig::from_bytes(Some(config.as_bytes())).expect("fuzz set-up: the configuration is valid");
    Router::new(&config).expect("fuzz set-up: the router builds")
}

thread_local! {
    static ROUTERS: RefCell<[Router; 2]> = RefCell::new([router("approx-prefix"), router("kv-aware")]);
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, body)) = data.split_first() else { return };
    let endpoint = if first & 1 == 0 { Endpoint::Completions } else { Endpoint::ChatCompletions };
    ROUTERS.with(|routers| {
        let routers = &mut *routers.borrow_mut();
        let router = &mut routers[usize::from(first >> 1 & 1)];
        let now_ms = 1_767_225_600_000 + u64::from(first);
        if let Ok(routed) = router.route(endpoint, body, now_ms, (now_ms / 1000) as i64) {
            router.finish(&routed);
        }
    });
});
