//! A decode step allocates nothing per layer: every buffer a step needs is allocated once
//! per forward pass (or grown once per thread and reused), so a model with more layers makes
//! the same number of heap allocations per step. Counted with a global allocator, for every
//! method's decode path (forward pass and decode-time policy) and for a batched step.
//!
//! One test in this binary: the count (`counting_allocator`) is global.

use kvmerger_compress::{Budget, CompressionConfig, KvCache, METHOD_NAMES};
use kvmerger_engine::testing::{forward, random_llama_with, tiny_config};
use kvmerger_engine::{BatchItem, Llama, Phase, Session, WeightFormat, WeightFormats};

mod counting_allocator;
use counting_allocator::allocations_of;

const PROMPT: usize = 96;
const STEPS: usize = 8;

/// The tiny model with `layers` layers, decoding through the quantized kernel with an f16
/// cache, as the default model does.
fn model(layers: usize) -> Llama {
    let config = kvmerger_engine::ModelConfig { n_layers: layers, ..tiny_config() };
    let formats = WeightFormats { prefill: WeightFormat::F32, decode: WeightFormat::File };
    random_llama_with(config, 7, formats).unwrap()
}

fn prompt(seed: u32) -> Vec<u32> {
    (0..PROMPT as u32).map(|i| (i * 7 + seed * 13) % 64).collect()
}

/// The fewest allocations any of `STEPS` steps made, after two warm-up steps (per-thread
/// buffers grow during those; the fewest filters out a later regrowth as a cache gets
/// longer, which does not recur every step).
fn fewest_per_step(mut step: impl FnMut()) -> usize {
    step();
    step();
    (0..STEPS).map(|_| allocations_of(&mut step)).min().unwrap()
}

/// Room in every head for every step, so the cache's own growth is not counted.
fn reserve_steps(cache: &mut KvCache) {
    cache.layers.iter_mut().flatten().for_each(|h| h.reserve_exact(4 * STEPS));
}

/// One sequence's decode steps under `method` (at 35% unless it is the full cache).
fn session_step_allocations(model: &Llama, method: &str) -> usize {
    let budget = (method != "full").then_some(Budget::Ratio(0.35));
    let config = CompressionConfig::from_cli(method, budget, &[]).unwrap();
    let mut session = Session::new(model, &config).unwrap();
    session.prefill(&prompt(1)).unwrap();
    reserve_steps(session.cache_mut());
    let mut token = 3;
    fewest_per_step(|| {
        session.step(token).unwrap();
        token = (token + 5) % 64;
    })
}

/// Three sequences decoding in one batched pass.
fn batch_step_allocations(model: &Llama) -> usize {
    let mut caches: Vec<_> = (0..3)
        .map(|s| {
            let mut cache = model.new_cache();
            forward(model, Phase::Prefill, &prompt(s), &mut cache, Default::default()).unwrap();
            reserve_steps(&mut cache);
            cache
        })
        .collect();
    let tokens = [[1u32], [2], [3]];
    fewest_per_step(|| {
        let mut items: Vec<BatchItem<'_>> = caches
            .iter_mut()
            .zip(&tokens)
            .map(|(cache, t)| BatchItem::last_logits(t, cache))
            .collect();
        model.forward_batch(&mut items, Phase::Decode, 128).unwrap();
    })
}

#[test]
fn a_decode_step_allocates_the_same_with_two_layers_or_six() {
    let (shallow, deep) = (model(2), model(6));
    for method in METHOD_NAMES {
        let (two, six) =
            (session_step_allocations(&shallow, method), session_step_allocations(&deep, method));
        assert_eq!(two, six, "{method}: allocations per decode step, 2 layers vs 6");
    }
    let (two, six) = (batch_step_allocations(&shallow), batch_step_allocations(&deep));
    assert_eq!(two, six, "batched decode step: allocations, 2 layers vs 6");
}
