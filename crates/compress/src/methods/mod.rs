//! One file per method, each citing its paper.

mod adakv;
mod cam;
mod expected_attention;
mod full;
mod h2o;
mod inner;
mod keydiff;
mod knorm;
mod kvmerger;
mod kvzip;
mod merge_on_evict;
mod merging_sets;
mod pyramidkv;
mod select;
mod snapkv;
mod streaming_llm;
#[cfg(test)]
mod test_util;
mod tova;

pub use adakv::{allocate, AdaKvConfig};
pub use cam::{CamConfig, CamEviction, CamProbability};
pub use expected_attention::ExpectedAttentionConfig;
pub use full::FullCache;
pub use h2o::H2oConfig;
pub use inner::InnerMethod;
pub use keydiff::KeyDiffConfig;
pub use knorm::KnormConfig;
pub use kvmerger::{
    BudgetMode, KvMergerConfig, MassRule, MergeWeights, PivotRule, ProtectScore, SharesOf, Sigma,
};
pub use kvzip::{HeadBudgets, KvzipConfig};
pub use merge_on_evict::MergeOnEvictConfig;
pub use merging_sets::{
    adjacent_cosine, cosine, merge_to_target, merging_sets, min_reachable, CompareTo, Linkage,
    RunScoring,
};
pub use pyramidkv::PyramidKvConfig;
pub use snapkv::{avg_pool, SnapKvConfig};
pub use streaming_llm::StreamingLlmConfig;
pub use tova::TovaConfig;

/// Every method through every path: configured by name as on the command line, compressed
/// after a prompt, then driven through decode steps.
#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use crate::budget::Budget;
    use crate::cache::EntryMeta;
    use crate::config::CompressionConfig;
    use crate::dtype::KvDtype;
    use crate::method::{CompressionMethod, HeadId};
    use crate::methods::test_util::{random_head, random_head_as};

    /// `(method, parameters, whether it keeps the head within budget while decoding)`
    type Case = (&'static str, &'static [(&'static str, &'static str)], bool);

    const METHODS: [Case; 32] = [
        ("full", &[], false),
        ("streaming_llm", &[], true),
        ("h2o", &[], true),
        ("snapkv", &[("window", "8")], false),
        ("cam", &[], true),
        ("cam", &[("eviction", "h2o")], true),
        ("kvmerger", &[], false),
        ("kvmerger", &[("budget_mode", "exact")], false),
        ("kvmerger", &[("similarity", "centered")], false),
        ("kvmerger", &[("protect_by", "window"), ("protect_window", "8")], false),
        ("kvmerger", &[("merge", "false")], false),
        ("kvmerger", &[("budget_mode", "threshold"), ("mass", "log_count")], false),
        ("knorm", &[], false),
        ("knorm", &[("sinks", "4"), ("recent", "8")], false),
        ("keydiff", &[], false),
        ("keydiff", &[("sinks", "4"), ("recent", "8")], false),
        ("tova", &[], true),
        ("tova", &[("sinks", "4"), ("recent", "8")], true),
        ("tova", &[("decode_eviction", "false")], false),
        ("adakv", &[], false),
        ("adakv", &[("scorer", "knorm"), ("alpha_safeguard", "0.5")], false),
        ("adakv", &[("scorer", "keydiff"), ("head_method", "kvmerger")], false),
        ("pyramidkv", &[], false),
        ("pyramidkv", &[("window", "8"), ("beta", "2")], false),
        ("merge", &[], false),
        ("merge", &[("scorer", "snapkv"), ("merge_fraction", "0.5")], false),
        ("expected_attention", &[], false),
        ("adakv", &[("scorer", "expected_attention")], false),
        ("kvzip", &[], false),
        ("kvzip", &[("heads", "uniform"), ("sinks", "0")], false),
        ("adakv", &[("scorer", "kvzip")], false),
        ("merge", &[("scorer", "kvzip")], false),
    ];

    /// Every method, in every dtype, at several budgets: exact budgets, metadata order, and
    /// resident bytes at the dtype's size.
    #[test]
    fn every_method_compresses_and_decodes_within_its_budget() {
        for dtype in KvDtype::ALL.into_iter().filter(|d| !d.rotated()) {
            compresses_and_decodes_within_budget(dtype);
        }
    }

    fn compresses_and_decodes_within_budget(dtype: KvDtype) {
        const T: usize = 100;
        // Quantized rows are whole blocks of 32.
        let d = if dtype.is_quantized() { 32 } else { 8 };
        for (name, params, bounded_decode) in METHODS {
            for ratio in [1.0, 0.5, 0.35, 0.2] {
                let budget = (name != "full").then_some(Budget::Ratio(ratio));
                let params: Vec<(String, String)> =
                    params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
                let config = CompressionConfig::from_cli(name, budget, &params).unwrap();
                let method = config.build().unwrap();
                let what = format!("{} at {ratio} in {dtype}", config.label());
                let id = HeadId { layer: 1, head: 2 };

                let mut head = head_with_statistics(&*method, T, d, 11, dtype);
                // The bound while decoding; compression gets at most what the head holds,
                // as the engine passes it.
                let bound = method.budget_entries(T);
                let b = bound.min(T);
                let mut widened = head.clone();
                let report = method.compress(id, &mut head, b).unwrap();
                assert_eq!(head.dtype(), dtype.storage(), "{what}");
                computes_in_f32(&*method, id, &mut widened, b, &head, &what);
                let exact = name != "kvmerger" || !params.iter().any(|(_, v)| v == "threshold");
                if exact {
                    assert_eq!(head.len(), b, "{what}");
                } else {
                    assert!(head.len() <= T, "{what}");
                }
                assert_eq!((report.before, report.after), (T, head.len()), "{what}");
                assert!(
                    head.meta().windows(2).all(|w| w[0].position < w[1].position),
                    "{what}: sorted by position"
                );
                if head.len() < T {
                    let row = 2 * dtype.row_bytes(d) + std::mem::size_of::<EntryMeta>();
                    assert_eq!(
                        head.resident_bytes(),
                        head.len() * row + crate::HeadCache::fixed_bytes(d, dtype),
                        "{what}: memory follows the entries kept (and the key center)"
                    );
                }

                let mut rng = StdRng::seed_from_u64(5);
                for step in 1..=64 {
                    let k: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
                    let v: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
                    head.push(
                        &k,
                        &v,
                        EntryMeta {
                            position: T + step - 1,
                            count: 1,
                            attention: rng.random_range(0.0..5.0),
                        },
                    );
                    method.after_step(id, &mut head, bound, step).unwrap();
                    if bounded_decode {
                        assert!(
                            head.len() <= bound,
                            "{what}: {} entries after step {step}",
                            head.len()
                        );
                    }
                }
                // H2O's and TOVA's decode-time evictions move another entry into the
                // victim's slot; every other policy keeps the entries in position order.
                let mut positions: Vec<usize> = head.meta().iter().map(|m| m.position).collect();
                if matches!(config, CompressionConfig::H2o(_) | CompressionConfig::Tova(_)) {
                    positions.sort();
                }
                assert!(
                    positions.windows(2).all(|w| w[0] < w[1]),
                    "{what}: distinct positions, sorted after decoding"
                );
                assert_eq!(head.dtype(), dtype.storage(), "{what}");
                let log_count = |c: &CompressionConfig| matches!(c, CompressionConfig::Kvmerger(k) if k.mass == super::MassRule::LogCount);
                let expected = match &config {
                    CompressionConfig::Adakv(a) => {
                        a.head_method.as_ref().is_some_and(|m| log_count(m.config()))
                    }
                    c => log_count(c),
                };
                assert_eq!(method.log_count_bias(), expected, "{what}");
            }
        }
    }

    /// Every method either keeps a head within a bound while decoding (its decode-time
    /// policy handed the bound, then [`CompressionMethod::bound`] on a head still past it,
    /// as the engine drives them) or says why it cannot, naming itself.
    #[test]
    fn every_method_holds_a_bound_while_decoding_or_says_why_not() {
        const T: usize = 100;
        const BOUND: usize = 40;
        let mut bounded = Vec::new();
        for (name, params, _) in METHODS {
            let params: Vec<(String, String)> =
                params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            let budget = (name != "full").then_some(Budget::Ratio(0.5));
            let config = CompressionConfig::from_cli(name, budget, &params).unwrap();
            let method = config.build().unwrap();
            if let Some(reason) = method.decode_bound_refusal() {
                assert!(reason.contains(name) || name == "full", "{}: {reason}", config.label());
                continue;
            }
            bounded.push(config.label());
            let id = HeadId { layer: 0, head: 1 };
            let mut head = head_with_statistics(&*method, T, 8, 3, KvDtype::F32);
            let b = method.budget_entries(T);
            method.compress(id, &mut head, b).unwrap();
            let mut rng = StdRng::seed_from_u64(2);
            for step in 1..=200 {
                let k: Vec<f32> = (0..8).map(|_| rng.random_range(-1.0..1.0)).collect();
                let meta = EntryMeta { position: T + step - 1, count: 1, attention: 1.0 };
                head.push(&k, &k, meta);
                method.after_step(id, &mut head, b.min(BOUND), step).unwrap();
                if head.len() > BOUND {
                    method.bound(id, &mut head, BOUND).unwrap();
                }
                assert!(head.len() <= BOUND, "{}: {} at step {step}", config.label(), head.len());
            }
        }
        // The eviction methods, the key scorers and KVMerger's budget modes.
        assert_eq!(bounded.len(), 14, "{bounded:?}");
    }

    /// A random head with the statistics `method` asks the prefill of `n` tokens for.
    fn head_with_statistics(
        method: &dyn CompressionMethod,
        n: usize,
        d: usize,
        seed: u64,
        dtype: KvDtype,
    ) -> crate::HeadCache {
        let mut head = random_head_as(n, d, seed, dtype);
        let stats = method.prompt_stats(n);
        for w in stats.windows.iter() {
            let scores = head.meta().iter().map(|m| m.attention / 2.0).collect();
            head.set_window_attention(w, scores).unwrap();
        }
        for e in stats.evictions.iter() {
            let received: Vec<f32> = head.meta().iter().map(|m| m.attention).collect();
            let targets = received.iter().map(|a| a * e.span as f32).collect();
            head.set_eviction_attention(e, received, targets).unwrap();
        }
        if stats.reconstruction.is_some() {
            let scores = head.meta().iter().map(|m| m.attention / 5.0).collect();
            head.set_reconstruction_attention(scores).unwrap();
        }
        // Two query heads per kv head, their queries the keys and the keys reversed.
        for q in stats.queries.iter() {
            let keys = head.keys().into_owned();
            let reversed: Vec<f32> = keys.iter().rev().copied().collect();
            let moments = head.query_moments_mut(q, 2);
            for (a, b) in keys.chunks_exact(d).zip(reversed.chunks_exact(d)) {
                moments.add(&[a, b].concat());
            }
        }
        head
    }

    /// Every method compressing the kv heads of a layer together holds the layer's total:
    /// `heads x budget` entries (AdaKV moves budget between heads; the others keep each
    /// head's own), at every layer of a model (PyramidKV's budgets differ by layer and sum
    /// to the model's total).
    #[test]
    fn every_method_holds_the_layer_and_model_totals() {
        const T: usize = 120;
        let layers = 6;
        for (name, params, _) in METHODS {
            if params.iter().any(|(_, v)| *v == "threshold") {
                continue;
            }
            let budget = (name != "full").then_some(Budget::Ratio(0.3));
            let params: Vec<(String, String)> =
                params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            let config = CompressionConfig::from_cli(name, budget, &params).unwrap();
            let method = config.build().unwrap();
            let even = method.budget_entries(T).min(T);
            let mut kept = 0;
            for layer in 0..layers {
                let b = method.layer_budget_entries(layer, layers, T).min(T);
                let mut heads: Vec<crate::HeadCache> = (0..3)
                    .map(|h| {
                        head_with_statistics(&*method, T, 8, (layer * 3 + h) as u64, KvDtype::F32)
                    })
                    .collect();
                let reports = method.compress_layer(layer, &mut heads, b).unwrap();
                let after: usize = reports.iter().map(|r| r.after).sum();
                assert_eq!(after, heads.iter().map(|h| h.len()).sum::<usize>(), "{name}");
                assert_eq!(after, 3 * b, "{}: layer {layer}", config.label());
                kept += after;
            }
            assert_eq!(kept, layers * 3 * even, "{}", config.label());
        }
    }

    /// Compressing `head` widened to f32 and narrowing the result back gives the same
    /// entries as compressing `narrow` (the same head, compressed in its own dtype): the
    /// method computes in f32 either way; only roundings of repeated writes (CaM adding a
    /// victim's share to its targets one by one) may differ.
    fn computes_in_f32(
        method: &dyn CompressionMethod,
        id: HeadId,
        head: &mut crate::HeadCache,
        budget: usize,
        narrow: &crate::HeadCache,
        what: &str,
    ) {
        let dtype = head.dtype();
        head.convert(KvDtype::F32);
        method.compress(id, head, budget).unwrap();
        head.convert(dtype);
        assert_eq!(head.meta(), narrow.meta(), "{what}");
        assert_eq!(head.keys(), narrow.keys(), "{what}");
        let tolerance = match dtype {
            KvDtype::F32 => 0.0,
            KvDtype::F16 => 4e-3,
            KvDtype::Bf16 => 3e-2,
            // Values in [-1, 1]: a step is 1/127 (q8_0) or 1/8 (q4_0); each of CaM's
            // repeated writes requantizes its target's blocks, moving every element of them
            // by up to half a step, and on 4 bits a target whose largest element grows gets
            // a new scale for the whole block: several steps in all.
            KvDtype::Q8_0 => 0.1,
            _ => 1.0,
        };
        for (a, b) in head.values().iter().zip(narrow.values().iter()) {
            assert!((a - b).abs() <= tolerance, "{what}: value {a} vs {b}");
        }
    }

    #[test]
    fn heads_within_budget_are_left_unchanged() {
        for (name, params, _) in METHODS {
            let params: Vec<(String, String)> =
                params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            let config = CompressionConfig::from_cli(name, None, &params).unwrap();
            if config.name() == "kvmerger" && params.iter().any(|(_, v)| v == "threshold") {
                continue; // threshold mode merges whatever the budget
            }
            let method = config.build().unwrap();
            let mut head = random_head(40, 4, 3);
            let original = head.clone();
            method.compress(HeadId { layer: 0, head: 0 }, &mut head, 40).unwrap();
            assert_eq!(head.keys(), original.keys(), "{name}");
            assert_eq!(head.values(), original.values(), "{name}");
            // TOVA clears the attention statistic for its decode steps to read afresh.
            let clear = |h: &crate::HeadCache| {
                let mut meta = h.meta().to_vec();
                if name == "tova" {
                    meta.iter_mut().for_each(|m| m.attention = 0.0);
                }
                meta
            };
            assert_eq!(clear(&head), clear(&original), "{name}");
        }
    }
}
