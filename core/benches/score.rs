//! Cost of one routing decision: a 256-block request (4k tokens at block size 16) scored against 64
//! workers, with an index holding realistic overlaps (a system prompt most workers hold, conversation
//! prefixes of various lengths on a few, and background blocks).
//!
//! Run: `cargo bench -p kvmesh-core --bench score`

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kvmesh_core::{
    BlockHash, Engine, Fleet, Policy, PolicyKind, PrefixIndex, Role, RouteInput, RoutingConfig, Scorer,
    SplitMix64, WorkerInfo, WorkerLoad, WorkerSlot, WorkerState,
};

/// Counts heap allocations, to show that a warm scorer makes none per decision.
struct CountingAlloc;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call unchanged to the system allocator; only counts.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Relaxed);
        // SAFETY: the caller's contract is passed through as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Heap allocations `f` makes.
fn allocations(f: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.load(Relaxed);
    f();
    ALLOCATIONS.load(Relaxed) - before
}

const WORKERS: u16 = 64;
const BLOCK_SIZE: u32 = 16;
const REQUEST_BLOCKS: usize = 256;
const MODEL: &str = "llama";

/// `n` pseudo-random block hashes from a seed (the index only sees opaque hashes).
fn hashes(seed: u64, n: usize) -> Vec<BlockHash> {
    let mut rng = SplitMix64::new(seed);
    (0..n).map(|_| BlockHash(rng.next_u64())).collect()
}

/// 64 ready workers with varied load.
fn fleet() -> Fleet {
    let mut fleet = Fleet::new();
    for i in 0..WORKERS {
        let slot = fleet
            .upsert(WorkerInfo {
                id: format!("vllm-{i}").as_str().into(),
                address: format!("10.0.{}.{}:8000", i / 256, i % 256),
                model: MODEL.into(),
                engine: Engine::Vllm,
                role: Role::Both,
                block_size: BLOCK_SIZE,
                state: WorkerState::Ready,
            })
            .expect("64 workers fit in a fleet table");
        let i = u32::from(i);
        if let Some(entry) = fleet.get_mut(slot) {
            entry.load = WorkerLoad {
                running: i % 17,
                waiting: i % 3,
                kv_usage: (i % 10) as f32 / 12.0,
                kv_capacity_blocks: 20_000,
                inflight_requests: i % 5,
                inflight_prefill_tokens: u64::from(i % 7) * 512,
                inflight_blocks: u64::from(i % 11) * 100,
                gpus: Vec::new(),
            };
        }
    }
    fleet
}

/// The request, and an index where 48 workers hold its 32-block system prompt, every fourth worker
/// holds a longer conversation prefix (up to 240 blocks), and 200k unrelated blocks fill the rest.
fn request_and_index() -> (Vec<BlockHash>, PrefixIndex) {
    let request = hashes(1, REQUEST_BLOCKS);
    let mut index = PrefixIndex::new(1_000_000);
    for w in 0..WORKERS {
        let slot = WorkerSlot(w);
        if w < 48 {
            index.store(slot, &request[..32]);
        }
        if w % 4 == 0 {
            index.store(slot, &request[..32 + usize::from(w) * 13 % 208]);
        }
        for s in 0..50u64 {
            index.store(slot, &hashes(1_000 + u64::from(w) * 100 + s, 64));
        }
    }
    (request, index)
}

fn bench_score(c: &mut Criterion) {
    let fleet = fleet();
    let (request, index) = request_and_index();
    let input = |now_ms| RouteInput {
        model: MODEL,
        hashes: &request,
        prompt_tokens: REQUEST_BLOCKS as u64 * u64::from(BLOCK_SIZE) + 7,
        expected_output_tokens: Some(256),
        block_size: BLOCK_SIZE,
        now_ms,
    };

    let mut group = c.benchmark_group("score_256_blocks_64_workers");
    group.sample_size(30).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Elements(1));

    // The index lookup alone, to tell the scorer's own cost from the index's.
    let mut overlaps = Vec::with_capacity(usize::from(WORKERS));
    group.bench_function("fleet_index_longest_prefix_only", |b| {
        b.iter(|| {
            index.longest_prefix(black_box(&request), &mut overlaps);
            black_box(overlaps.len())
        })
    });

    let mut scorer = Scorer::new();
    let mut rng = SplitMix64::new(42);
    let mut kv = Policy::new(RoutingConfig { policy: PolicyKind::KvAware, ..RoutingConfig::default() })
        .expect("default config is valid");
    group.bench_function("kv_aware_route", |b| {
        b.iter(|| black_box(scorer.route(&mut kv, black_box(&input(0)), &fleet, &index, &mut rng)))
    });

    let mut hot =
        Policy::new(RoutingConfig { temperature: 0.5, ..RoutingConfig::default() }).expect("config is valid");
    group.bench_function("kv_aware_route_temperature_0.5", |b| {
        b.iter(|| black_box(scorer.route(&mut hot, black_box(&input(0)), &fleet, &index, &mut rng)))
    });

    // Approx-prefix learns from its own decisions: warm it with 400 past requests that share the
    // request's head to various depths, so its index is at capacity and every route also forgets.
    let mut approx =
        Policy::new(RoutingConfig { policy: PolicyKind::ApproxPrefix, ..RoutingConfig::default() })
            .expect("default config is valid");
    let mut now_ms = 0u64;
    for n in 0..400u64 {
        let mut past = request[..(n as usize * 37) % REQUEST_BLOCKS].to_vec();
        past.extend(hashes(10_000 + n, REQUEST_BLOCKS - past.len()));
        let past_input = RouteInput { hashes: &past, ..input(now_ms) };
        scorer.route(&mut approx, &past_input, &fleet, &index, &mut rng);
        now_ms += 10;
    }
    group.bench_function("approx_prefix_decide", |b| {
        b.iter(|| black_box(scorer.decide(&approx, black_box(&input(now_ms)), &fleet, &index, &mut rng)))
    });
    group.bench_function("approx_prefix_route_and_learn", |b| {
        b.iter(|| {
            now_ms += 1;
            black_box(scorer.route(&mut approx, black_box(&input(now_ms)), &fleet, &index, &mut rng))
        })
    });

    // Warm buffers: deciding allocates nothing; learning (approx-prefix) only while its index grows.
    let kv_allocs = allocations(|| {
        for _ in 0..100 {
            black_box(scorer.route(&mut kv, &input(0), &fleet, &index, &mut rng));
            black_box(scorer.route(&mut hot, &input(0), &fleet, &index, &mut rng));
            black_box(scorer.decide(&approx, &input(now_ms), &fleet, &index, &mut rng));
        }
    });
    let approx_allocs = allocations(|| {
        for _ in 0..100 {
            now_ms += 1;
            black_box(scorer.route(&mut approx, &input(now_ms), &fleet, &index, &mut rng));
        }
    });
    eprintln!(
        "heap allocations in 300 warm decisions: {kv_allocs}; in 100 approx-prefix routes: {approx_allocs}"
    );

    // The explanation is built only on request; this is what asking costs.
    scorer.decide(&kv, &input(0), &fleet, &index, &mut rng);
    group.bench_function("kv_aware_explain", |b| b.iter(|| black_box(scorer.explain(&fleet))));
    group.finish();

    let d = scorer.route(&mut kv, &input(0), &fleet, &index, &mut rng);
    let mut header = String::new();
    d.write_override_host(&fleet, &mut header);
    eprintln!(
        "kv-aware: {:?} overlap {} blocks cost {:.0}; override-host {header}",
        d.outcome, d.overlap_blocks, d.cost
    );
}

criterion_group!(benches, bench_score);
criterion_main!(benches);
