//! Prefix index cost at fleet scale: store, remove and longest-prefix lookup against an index that
//! already holds 1M and 10M blocks, and the bytes each indexed block takes.
//!
//! Run: `cargo bench -p kvmesh-core --bench index`

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kvmesh_core::hash::{BlockHash, BlockSalt, hash_prompt};
use kvmesh_core::{Overlap, PrefixIndex, WorkerSlot};

const WORKERS: u16 = 64;
const BLOCK: usize = 16;
/// Blocks per cached sequence in the fill: a 1k-token prompt.
const SEQ_BLOCKS: usize = 64;

/// Block hashes of sequence `n`: sequences share a system-prompt-like head in groups of 8.
fn sequence(n: u64) -> Vec<BlockHash> {
    let head = n / 8;
    let tokens: Vec<u32> = (0..(SEQ_BLOCKS * BLOCK) as u64)
        .map(|i| {
            let src = if i < 256 { head } else { n };
            (src.wrapping_mul(0x9e37_79b9).wrapping_add(i * 7919) % 151_936) as u32
        })
        .collect();
    let mut out = Vec::with_capacity(SEQ_BLOCKS);
    hash_prompt(&tokens, BLOCK, BlockSalt::NONE, &mut out);
    out
}

/// An index holding about `blocks` distinct blocks, each sequence on one or two workers.
fn filled(blocks: usize) -> (PrefixIndex, Vec<Vec<BlockHash>>) {
    let mut index = PrefixIndex::new(blocks);
    let mut kept = Vec::new();
    let mut n = 0u64;
    while index.len() < blocks {
        let seq = sequence(n);
        let w = WorkerSlot((n % u64::from(WORKERS)) as u16);
        index.store(w, &seq);
        if n.is_multiple_of(3) {
            index.store(WorkerSlot(((n + 17) % u64::from(WORKERS)) as u16), &seq[..SEQ_BLOCKS / 2]);
        }
        if n.is_multiple_of(997) {
            kept.push(seq);
        }
        n += 1;
    }
    (index, kept)
}

fn bench_index(c: &mut Criterion) {
    let mut group = c.benchmark_group("index");
    group.sample_size(20).measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    for &size in &[1_000_000usize, 10_000_000] {
        let (mut index, kept) = filled(size);
        let stats = index.stats();
        eprintln!(
            "index at {size} blocks: {} placements, {} bytes, {:.1} bytes per block",
            stats.placements,
            stats.bytes,
            stats.bytes as f64 / stats.blocks as f64
        );

        // Longest prefix of a 64-block request whose first half is cached on some workers.
        let mut query = kept[kept.len() / 2].clone();
        query.truncate(SEQ_BLOCKS / 2);
        query.extend(sequence(u64::MAX - 1)[SEQ_BLOCKS / 2..].iter().copied());
        let mut out: Vec<Overlap> = Vec::with_capacity(WORKERS as usize);
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::new("longest_prefix_64_blocks", size), &query, |b, q| {
            b.iter(|| {
                index.longest_prefix(black_box(q), &mut out);
                black_box(out.len())
            })
        });

        // Store of a new 64-block sequence at capacity: each block evicts the oldest one.
        let mut next = 1u64 << 40;
        group.throughput(Throughput::Elements(SEQ_BLOCKS as u64));
        let fresh: Vec<Vec<BlockHash>> = (0..256).map(|i| sequence(next + i)).collect();
        next += 256;
        let mut i = 0;
        group.bench_function(BenchmarkId::new("store_64_new_blocks_at_capacity", size), |b| {
            b.iter(|| {
                let seq = &fresh[i % fresh.len()];
                index.store(WorkerSlot((i % WORKERS as usize) as u16), black_box(seq));
                i += 1;
            })
        });

        // Remove and re-store a held sequence (what an eviction followed by a recompute costs).
        let held = kept[kept.len() - 1].clone();
        let w = WorkerSlot(7);
        index.store(w, &held);
        group.bench_function(BenchmarkId::new("remove_then_store_64_blocks", size), |b| {
            b.iter(|| {
                index.remove(w, black_box(&held));
                index.store(w, black_box(&held));
            })
        });
        let _ = next;
    }
    group.finish();
}

criterion_group!(benches, bench_index);
criterion_main!(benches);
