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
use kvmerger_compress::{EntryMeta, HeadCache, KvDtype, StatsRequest};
use kvmerger_kernels::{attend, attend_into, AttentionOptions, AttentionShape};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SHAPE: AttentionShape = AttentionShape { n_heads: 9, n_kv_heads: 3, head_dim: 64 };
const ENTRIES: [usize; 4] = [2800, 2048, 4096, 8192];
const SHORT_ENTRIES: [usize; 5] = [32, 64, 128, 256, 1024];
const LAYERS: usize = 30;

fn heads(dtype: KvDtype, entries: usize) -> Vec<HeadCache> {
    let mut rng = StdRng::seed_from_u64(1);
    let d = SHAPE.head_dim;
    (0..SHAPE.n_kv_heads)
        .map(|_| {
            let mut h = HeadCache::with_capacity(d, dtype, entries);
            for i in 0..entries {
                let k: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
                let v: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
                h.push(&k, &v, EntryMeta::new(i));
            }
            h
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(2);
    let q: Vec<f32> =
        (0..SHAPE.n_heads * SHAPE.head_dim).map(|_| rng.random_range(-1.0..1.0)).collect();
    for entries in ENTRIES {
        let mut group =
            c.benchmark_group(format!("decode attention, {entries} entries, 9 over 3 heads of 64"));
        for dtype in KvDtype::ALL {
            let mut cache = heads(dtype, entries);
            for (stats, name) in
                [(StatsRequest::default(), ""), (StatsRequest::accumulated(), " + H2O stats")]
            {
                let opts =
                    AttentionOptions { chunk: 128, stats, log_count_bias: false, window: None };
                group.bench_function(format!("{dtype}{name}"), |b| {
                    b.iter(|| attend(&q, 1, &mut cache, SHAPE, opts))
                });
            }
        }
        // 30 layers' caches in turn, as a decode step reads them: the rows come from memory,
        // not from the caches a repeated call leaves them in.
        let mut layers: Vec<Vec<HeadCache>> =
            (0..LAYERS).map(|_| heads(KvDtype::F16, entries)).collect();
        let opts = AttentionOptions {
            chunk: 128,
            stats: StatsRequest::default(),
            log_count_bias: false,
            window: None,
        };
        let mut layer = 0;
        group.bench_function(format!("f16, {LAYERS} layers in turn"), |b| {
            b.iter(|| {
                layer = (layer + 1) % LAYERS;
                attend(&q, 1, &mut layers[layer], SHAPE, opts)
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
        let mut caches: Vec<Vec<Vec<HeadCache>>> =
            (0..4).map(|_| (0..LAYERS).map(|_| heads(KvDtype::F16, entries)).collect()).collect();
        for (stats, name) in
            [(StatsRequest::default(), ""), (StatsRequest::accumulated(), " + H2O stats")]
        {
            let opts = AttentionOptions { chunk: 128, stats, log_count_bias: false, window: None };
            group.bench_function(format!("one sequence{name}"), |b| {
                b.iter(|| {
                    on_pool(|| {
                        for layer in caches[0].iter_mut() {
                            attend_into(&q, 1, layer, SHAPE, opts, &mut outs[0]);
                        }
                    })
                })
            });
        }
        let opts = AttentionOptions {
            chunk: 128,
            stats: StatsRequest::default(),
            log_count_bias: false,
            window: None,
        };
        // Each layer's four sequences side by side, as a batched decode step runs them.
        group.bench_function("four sequences", |b| {
            b.iter(|| {
                on_pool(|| {
                    for layer in 0..LAYERS {
                        let [c0, c1, c2, c3] = caches.as_mut_slice() else { unreachable!() };
                        let [o0, o1, o2, o3] = outs.as_mut_slice() else { unreachable!() };
                        let one = |cache: &mut Vec<Vec<HeadCache>>, out: &mut Vec<f32>| {
                            attend_into(&q, 1, &mut cache[layer], SHAPE, opts, out)
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
