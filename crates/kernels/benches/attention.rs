//! Decode attention (one query per kv-head group) over 2k, 4k and 8k-entry caches in each
//! storage dtype, SmolLM2-135M's shape (9 query heads over 3 kv heads, head_dim 64): one
//! layer's step, with and without H2O's accumulated-attention statistic. The dtypes of one
//! length run one after another, so their ratios come from the same machine load.
//!
//! Short caches (32 to 1,024 entries per head, as a served conversation's), f16: a decode
//! step's 30 layers on a pool thread, for one sequence, and for four side by side as a
//! batched decode step runs them.
//!
//!     cargo bench -p kvmerger-kernels --bench attention
//!     cargo bench -p kvmerger-kernels --bench attention -- --warm-up-time 1 --measurement-time 3
//!     cargo bench -p kvmerger-kernels --bench attention -- short

use criterion::{criterion_group, criterion_main, Criterion};
use half::{bf16, f16};
// KvEntry, KvHead and RowsRef for `test_head`, which names them from its parent.
use kvmerger_kernels::{
    decode_attention, AttentionShape, BlockQ4_0, BlockQ8_0, DecodeOptions, KvElement, KvEntry,
    KvHead, RowsRef,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[path = "../src/attention/test_head.rs"]
mod test_head;
use test_head::TestHead;

const SHAPE: AttentionShape = AttentionShape { n_heads: 9, n_kv_heads: 3, head_dim: 64 };
const ENTRIES: [usize; 4] = [2800, 2048, 4096, 8192];
const SHORT_ENTRIES: [usize; 5] = [32, 64, 128, 256, 1024];
const LAYERS: usize = 30;

/// A layer of `entries` entries per kv head, stored as `T`, each one token.
fn heads<T: KvElement>(entries: usize) -> Vec<TestHead<T>> {
    TestHead::layer(SHAPE.head_dim, &[entries; SHAPE.n_kv_heads], 1, 1)
}

/// Without and with H2O's accumulated-attention statistic.
const STATS: [(bool, &str); 2] = [(false, ""), (true, " + H2O stats")];

/// One layer's step over `entries` entries stored as `T`, named `name`.
fn bench_type<T: KvElement>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    entries: usize,
    q: &[f32],
) {
    let mut cache = heads::<T>(entries);
    let mut out = vec![0.0f32; q.len()];
    for (accumulate, stats) in STATS {
        let opts = DecodeOptions { log_count_bias: false, accumulate };
        group.bench_function(format!("{name}{stats}"), |b| {
            b.iter(|| decode_attention(q, &mut cache, SHAPE, opts, &mut out))
        });
    }
}

fn bench(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(2);
    let q: Vec<f32> =
        (0..SHAPE.n_heads * SHAPE.head_dim).map(|_| rng.random_range(-1.0..1.0)).collect();
    for entries in ENTRIES {
        let mut group =
            c.benchmark_group(format!("decode attention, {entries} entries, 9 over 3 heads of 64"));
        bench_type::<f16>(&mut group, "f16", entries, &q);
        bench_type::<bf16>(&mut group, "bf16", entries, &q);
        bench_type::<f32>(&mut group, "f32", entries, &q);
        bench_type::<BlockQ8_0>(&mut group, "q8_0", entries, &q);
        bench_type::<BlockQ4_0>(&mut group, "q4_0", entries, &q);
        // 30 layers' caches in turn, as a decode step reads them: the rows come from memory,
        // not from the caches a repeated call leaves them in.
        let mut layers: Vec<Vec<TestHead<f16>>> = (0..LAYERS).map(|_| heads(entries)).collect();
        let opts = DecodeOptions::default();
        let mut out = vec![0.0f32; q.len()];
        let mut layer = 0;
        group.bench_function(format!("f16, {LAYERS} layers in turn"), |b| {
            b.iter(|| {
                layer = (layer + 1) % LAYERS;
                decode_attention(&q, &mut layers[layer], SHAPE, opts, &mut out)
            })
        });
        group.finish();
    }
}

/// Runs `f` on a pool thread, as a decode step runs.
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::join(f, || ()).0
}

fn bench_short(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(3);
    let q: Vec<f32> =
        (0..SHAPE.n_heads * SHAPE.head_dim).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut outs = vec![vec![0.0f32; q.len()]; 4];
    for entries in SHORT_ENTRIES {
        let mut group =
            c.benchmark_group(format!("short caches, {entries} entries, {LAYERS} layers"));
        // [sequence][layer]
        let mut caches: Vec<Vec<Vec<TestHead<f16>>>> =
            (0..4).map(|_| (0..LAYERS).map(|_| heads(entries)).collect()).collect();
        for (accumulate, name) in STATS {
            let opts = DecodeOptions { log_count_bias: false, accumulate };
            group.bench_function(format!("one sequence{name}"), |b| {
                b.iter(|| {
                    on_pool(|| {
                        for layer in caches[0].iter_mut() {
                            decode_attention(&q, layer, SHAPE, opts, &mut outs[0]);
                        }
                    })
                })
            });
        }
        let opts = DecodeOptions::default();
        // Each layer's four sequences side by side, as a batched decode step runs them.
        group.bench_function("four sequences", |b| {
            b.iter(|| {
                on_pool(|| {
                    for layer in 0..LAYERS {
                        let [c0, c1, c2, c3] = caches.as_mut_slice() else { unreachable!() };
                        let [o0, o1, o2, o3] = outs.as_mut_slice() else { unreachable!() };
                        let one = |cache: &mut Vec<Vec<TestHead<f16>>>, out: &mut Vec<f32>| {
                            decode_attention(&q, &mut cache[layer], SHAPE, opts, out)
                        };
                        rayon::join(
                            || rayon::join(|| one(c0, o0), || one(c1, o1)),
                            || rayon::join(|| one(c2, o2), || one(c3, o3)),
                        );
                    }
                })
            })
        });
        group.finish();
    }
}

criterion_group!(benches, bench_short, bench);
criterion_main!(benches);
