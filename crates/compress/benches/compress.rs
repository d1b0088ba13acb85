//! How long each method takes to compress one head of a 2,048-token prompt (head_dim 64),
//! how long merging-set identification alone takes, and how KVMerger's `merge` mode
//! (priority-queue merging to the budget) scales from 2k to 8k tokens.
//!
//!     cargo bench -p kvmerger-compress
//!     cargo bench -p kvmerger-compress -- merge --warm-up-time 1 --measurement-time 3

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use kvmerger_compress::{
    merge_to_target, merging_sets, Budget, CompareTo, CompressionConfig, EntryMeta, HeadCache,
    HeadId, KvDtype, METHOD_NAMES,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const T: usize = 2048;
const D: usize = 64;

/// `len` keys that drift slowly, so neighbours are similar as in real models.
fn head(len: usize) -> HeadCache {
    let mut rng = StdRng::seed_from_u64(1);
    let mut key: Vec<f32> = (0..D).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut h = HeadCache::with_capacity(D, KvDtype::F32, len);
    for i in 0..len {
        key.iter_mut().for_each(|k| *k += rng.random_range(-0.3..0.3));
        let value: Vec<f32> = (0..D).map(|_| rng.random_range(-1.0..1.0)).collect();
        h.push(
            &key,
            &value,
            EntryMeta { position: i, count: 1, attention: rng.random_range(0.0..3.0) },
        );
    }
    let scores: Vec<f32> = h.meta().iter().map(|m| m.attention).collect();
    h.set_window_attention(32, scores).unwrap();
    h
}

fn bench(c: &mut Criterion) {
    let base = head(T);
    let mut group = c.benchmark_group("compress one head, 2048 tokens, 35% budget");
    for name in METHOD_NAMES {
        let budget = (name != "full").then_some(Budget::Ratio(0.35));
        let method = CompressionConfig::from_cli(name, budget, &[]).unwrap().build().unwrap();
        let b = method.budget_entries(T);
        group.bench_function(name, |bench| {
            bench.iter_batched(
                || base.clone(),
                |mut h| method.compress(HeadId { layer: 0, head: 0 }, &mut h, b).unwrap(),
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
    let protected = vec![false; T];
    c.bench_function("merging_sets, 2048 tokens", |bench| {
        bench.iter(|| merging_sets(&base.keys(), D, &protected, 0.75, CompareTo::Neighbour))
    });
    let mut group = c.benchmark_group("kvmerger merge mode, one head, 35% budget");
    for len in [2048, 8192] {
        let base = head(len);
        let protected = vec![false; len];
        let target = Budget::Ratio(0.35).entries(len);
        group.bench_function(format!("{len} tokens, merge_to_target alone"), |bench| {
            bench.iter(|| merge_to_target(&base.keys(), D, &protected, target, Default::default()))
        });
        for similarity in ["cosine", "centered"] {
            let params = [("similarity".to_string(), similarity.to_string())];
            let config =
                CompressionConfig::from_cli("kvmerger", Some(Budget::Ratio(0.35)), &params);
            let method = config.unwrap().build().unwrap();
            let b = method.budget_entries(len);
            group.bench_function(format!("{len} tokens, {similarity}"), |bench| {
                bench.iter_batched(
                    || base.clone(),
                    |mut h| method.compress(HeadId { layer: 0, head: 0 }, &mut h, b).unwrap(),
                    BatchSize::LargeInput,
                )
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
