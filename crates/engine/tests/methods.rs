//! Every method through every path of the engine on the tiny model: exact budgets after
//! the prompt, whatever its length, budgets kept through decoding, memory that follows the
//! entries kept, and statistics shared between methods without one standing in for another.

use kvmerger_compress::{
    Budget, CompressionConfig, EntryMeta, KvDtype, StatsRequest, METHOD_NAMES,
};
use kvmerger_engine::testing::{forward, random_llama, tiny_config, ForwardOptions};
use kvmerger_engine::{Logits, Phase, PrefillOptions, Prefilled, Sampler, Session};

const STEPS: usize = 16;

/// A shared prefill with `attention_chunk` queries per chunk of the softmax.
fn chunked(attention_chunk: usize) -> PrefillOptions {
    PrefillOptions { attention_chunk, ..Default::default() }
}

/// Every method with its defaults, plus the parameter variants that change how a head
/// reaches its budget. `threshold` mode is left out: it keeps what merging leaves.
fn configs(budget: f64) -> Vec<CompressionConfig> {
    let variants: &[(&str, &[(&str, &str)])] = &[
        ("snapkv", &[("window", "4")]),
        ("cam", &[("eviction", "h2o")]),
        ("kvmerger", &[("budget_mode", "exact")]),
        ("kvmerger", &[("similarity", "centered")]),
        ("kvmerger", &[("protect_by", "window"), ("protect_window", "8")]),
        ("kvmerger", &[("mass", "log_count"), ("sigma", "adaptive")]),
        ("knorm", &[("sinks", "4"), ("recent", "8")]),
        ("keydiff", &[("sinks", "4"), ("recent", "8")]),
        ("tova", &[("sinks", "4"), ("recent", "8")]),
        ("tova", &[("decode_eviction", "false")]),
        ("adakv", &[("scorer", "knorm")]),
        ("adakv", &[("scorer", "expected_attention"), ("head_method", "kvmerger")]),
        ("pyramidkv", &[("window", "4"), ("beta", "2")]),
        ("merge", &[("scorer", r#"{"method":"snapkv","window":4}"#)]),
        ("expected_attention", &[("n_sink", "0"), ("use_covariance", "false")]),
    ];
    let defaults = METHOD_NAMES.iter().map(|&m| (m, &[][..]));
    defaults
        .chain(variants.iter().copied())
        .filter(|&(m, _)| m != "full" || budget == 1.0)
        .map(|(m, params)| {
            let params: Vec<(String, String)> =
                params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            let b = (m != "full").then_some(Budget::Ratio(budget));
            CompressionConfig::from_cli(m, b, &params).unwrap()
        })
        .collect()
}

/// In every cache dtype: exact budgets, and resident bytes at the dtype's size.
#[test]
fn every_method_keeps_its_budget_through_prefill_and_decode_on_any_prompt_length() {
    for dtype in KvDtype::ALL {
        keeps_budget_through_prefill_and_decode(dtype);
    }
}

fn keeps_budget_through_prefill_and_decode(dtype: KvDtype) {
    let mut config = tiny_config();
    // Quantized rows are whole blocks of 32.
    config.head_dim = if dtype.is_quantized() { 32 } else { config.head_dim };
    let mut model = random_llama(config, 5).unwrap();
    model.kv_dtype = dtype;
    let (hd, entry_bytes) = (model.config.head_dim, std::mem::size_of::<EntryMeta>());
    for prompt in [1, 3, 7, 20, 60] {
        let tokens: Vec<u32> = (0..prompt as u32).map(|i| (i * 7 + 3) % 64).collect();
        for budget in [1.0, 0.5, 0.35, 0.2] {
            for config in configs(budget) {
                let label = format!("{} on {prompt} tokens in {dtype}", config.label());
                // A share of 1 has no bound (everything, also while decoding).
                let bound = Budget::Ratio(budget).entries(prompt);
                let expected = bound.min(prompt);
                let mut session = Session::new(&model, &config).unwrap();
                let mut logits = session.prefill(&tokens).unwrap();
                let report = session.report().unwrap().clone();
                // Each layer holds its budget (PyramidKV's differ by layer, and average the
                // budget); AdaKV shares it among the layer's heads, the others keep each
                // head's own.
                let shared =
                    matches!(config, CompressionConfig::Adakv(_) | CompressionConfig::Kvzip(_));
                for (l, heads) in session.cache().layers.iter().enumerate() {
                    let layer_expected = report.budgets[l].min(prompt);
                    let held: usize = heads.iter().map(|h| h.len()).sum();
                    assert_eq!(held, heads.len() * layer_expected, "{label}: layer {l}");
                    for (h, head) in heads.iter().enumerate() {
                        if !shared {
                            assert_eq!(head.len(), layer_expected, "{label}: layer {l} head {h}");
                        }
                        assert_eq!(head.dtype(), dtype.storage(), "{label}");
                        assert_eq!(report.heads[l][h].after, head.len());
                        // Resident memory is the kept keys, values and metadata, and a
                        // centered head's key center, nothing more.
                        assert_eq!(
                            head.resident_bytes(),
                            head.len() * (2 * dtype.row_bytes(hd) + entry_bytes)
                                + kvmerger_compress::HeadCache::fixed_bytes(hd, dtype),
                            "{label}"
                        );
                        assert!(
                            head.meta().windows(2).all(|w| w[0].position < w[1].position),
                            "{label}: sorted by position"
                        );
                    }
                }
                assert!((report.achieved_ratio() - expected as f64 / prompt as f64).abs() < 1e-9);

                let kept: Vec<usize> =
                    session.cache().layers.iter().flatten().map(|h| h.len()).collect();
                let mut sampler = Sampler::new(Default::default());
                for step in 0..STEPS {
                    let next = sampler.sample(&logits);
                    logits = session.extend(&[next], Logits::Last).unwrap().swap_remove(0);
                    assert!(logits.iter().all(|x| x.is_finite()));
                    let bounded = match &config {
                        CompressionConfig::H2o(_)
                        | CompressionConfig::Cam(_)
                        | CompressionConfig::StreamingLlm(_) => true,
                        CompressionConfig::Tova(t) => t.decode_eviction,
                        _ => false,
                    };
                    for (head, &kept) in session.cache().layers.iter().flatten().zip(&kept) {
                        if bounded {
                            assert_eq!(
                                head.len(),
                                (kept + step + 1).min(bound),
                                "{label}: grows to its bound at step {step}, then holds it"
                            );
                        } else {
                            assert_eq!(
                                head.len(),
                                kept + step + 1,
                                "{label} grows by one entry per step"
                            );
                        }
                        // The newest entry always sits at the newest logical position.
                        let newest = head.meta().last().unwrap().position;
                        assert_eq!(newest, prompt + step, "{label}: newest entry");
                    }
                }
                assert_eq!(session.cache().n_seen, prompt + STEPS);
            }
        }
    }
}

/// A token budget is an absolute bound: on a shorter prompt nothing is evicted, neither
/// after the prompt nor while decoding, until a head grows to the count; a share of 1 keeps
/// everything.
#[test]
fn budgets_beyond_the_prompt_evict_nothing_until_reached() {
    let model = random_llama(tiny_config(), 5).unwrap();
    let tokens: Vec<u32> = (0..20).map(|i| (i * 7 + 3) % 64).collect();
    for method in ["h2o", "streaming_llm", "cam"] {
        for (budget, bound) in [(Budget::Tokens(30), 30), (Budget::Ratio(1.0), Budget::EVERYTHING)]
        {
            let config = CompressionConfig::from_cli(method, Some(budget), &[]).unwrap();
            let label = config.label();
            let mut session = Session::new(&model, &config).unwrap();
            let mut logits = session.prefill(&tokens).unwrap();
            assert_eq!(session.report().unwrap().budgets, [bound, bound], "{label}");
            let mut sampler = Sampler::new(Default::default());
            for step in 1..=20 {
                let next = sampler.sample(&logits);
                logits = session.extend(&[next], Logits::Last).unwrap().swap_remove(0);
                for head in session.cache().layers.iter().flatten() {
                    assert_eq!(head.len(), (20 + step).min(bound), "{label} at step {step}");
                }
            }
        }
    }
}

/// Per-layer budgets of another model (another layer count) are refused where the
/// configuration meets the model, naming the layer count.
#[test]
fn per_layer_budgets_of_another_model_are_refused() {
    let model = random_llama(tiny_config(), 5).unwrap();
    for shares in ["[0.2]", "[0.2, 0.2, 0.2]"] {
        let params = vec![("layer_budgets".to_string(), shares.to_string())];
        let config =
            CompressionConfig::from_cli("kvmerger", Some(Budget::Ratio(0.2)), &params).unwrap();
        let err = Session::new(&model, &config).err().expect(shares).to_string();
        assert!(err.contains("layer_budgets") && err.contains("2 layers"), "{shares}: {err}");
    }
    let params = vec![("layer_budgets".to_string(), "[0.1, 0.3]".to_string())];
    let config =
        CompressionConfig::from_cli("kvmerger", Some(Budget::Ratio(0.2)), &params).unwrap();
    Session::new(&model, &config).unwrap();
}

#[test]
fn fixed_parts_larger_than_the_budget_are_clamped_and_reported() {
    let model = random_llama(tiny_config(), 5).unwrap();
    let tokens: Vec<u32> = (0..20).map(|i| (i * 5 + 1) % 64).collect();
    // 50% of 20 tokens is 10 entries: SnapKV's default window of 32 and 12 sinks do not fit.
    for (method, param) in [("snapkv", ("window", "32")), ("streaming_llm", ("sinks", "12"))] {
        let params = vec![(param.0.to_string(), param.1.to_string())];
        let config =
            CompressionConfig::from_cli(method, Some(Budget::Ratio(0.5)), &params).unwrap();
        let mut session = Session::new(&model, &config).unwrap();
        session.prefill(&tokens).unwrap();
        let report = session.report().unwrap();
        let heads = model.config.n_layers * model.config.n_kv_heads;
        assert_eq!(report.clamped_heads(), heads, "{method}");
        assert!(report.heads.iter().flatten().all(|h| h.clamped == Some(param.0)));
        assert!(session.cache().layers.iter().flatten().all(|h| h.len() == 10));
    }
    // At 60 tokens the default window fits: nothing is clamped.
    let tokens: Vec<u32> = (0..80).map(|i| (i * 5 + 1) % 64).collect();
    let config = CompressionConfig::from_cli("snapkv", Some(Budget::Ratio(0.5)), &[]).unwrap();
    let mut session = Session::new(&model, &config).unwrap();
    session.prefill(&tokens).unwrap();
    assert_eq!(session.report().unwrap().clamped_heads(), 0);
}

#[test]
fn methods_sharing_a_prefill_each_read_their_own_window() {
    let model = random_llama(tiny_config(), 8).unwrap();
    let tokens: Vec<u32> = (0..120).map(|i| (i * 11 + 5) % 64).collect();
    let snapkv = |window: usize| {
        let params = vec![("window".to_string(), window.to_string())];
        CompressionConfig::from_cli("snapkv", Some(Budget::Ratio(0.5)), &params).unwrap()
    };
    let (narrow, wide) = (snapkv(32), snapkv(64));
    let stats = |c: &CompressionConfig| c.build().unwrap().prompt_stats(tokens.len());
    let kept = |config: &CompressionConfig, prefilled: Prefilled| {
        let mut session = Session::new(&model, config).unwrap();
        session.resume(prefilled).unwrap();
        session.cache().layers.iter().flatten().map(|h| h.meta().to_vec()).collect::<Vec<_>>()
    };
    let alone = Prefilled::run(&model, &tokens, stats(&narrow), chunked(16)).unwrap();
    let shared =
        Prefilled::run(&model, &tokens, stats(&narrow).union(stats(&wide)), chunked(16)).unwrap();
    assert_eq!(kept(&narrow, shared.clone()), kept(&narrow, alone));
    let wide_alone = Prefilled::run(&model, &tokens, stats(&wide), chunked(16)).unwrap();
    assert_eq!(kept(&wide, shared), kept(&wide, wide_alone.clone()));
    // A prefill that recorded only the wider window does not serve the narrower one.
    let mut session = Session::new(&model, &narrow).unwrap();
    let err = session.resume(wide_alone).unwrap_err();
    assert!(err.to_string().contains("snapkv"), "{err}");
    // Nor does one without accumulated attention serve a method that needs it.
    let h2o = CompressionConfig::from_cli("h2o", Some(Budget::Ratio(0.5)), &[]).unwrap();
    let bare =
        Prefilled::run(&model, &tokens, StatsRequest::window(32, false), chunked(16)).unwrap();
    assert!(Session::new(&model, &h2o).unwrap().resume(bare).is_err());

    // CaM reads the attention at eviction time of its own sliding window, which depends on
    // its budget: two budgets sharing a prefill each compress as they would alone.
    let cam = |ratio| CompressionConfig::from_cli("cam", Some(Budget::Ratio(ratio)), &[]).unwrap();
    let (half, third) = (cam(0.5), cam(0.35));
    assert_ne!(stats(&half).evictions, stats(&third).evictions);
    let shared =
        Prefilled::run(&model, &tokens, stats(&half).union(stats(&third)), chunked(16)).unwrap();
    for config in [&half, &third] {
        let alone = Prefilled::run(&model, &tokens, stats(config), chunked(16)).unwrap();
        let values = |prefilled: Prefilled| {
            let mut session = Session::new(&model, config).unwrap();
            session.resume(prefilled).unwrap();
            session.cache().layers.iter().flatten().map(|h| h.values().to_vec()).collect::<Vec<_>>()
        };
        assert_eq!(values(shared.clone()), values(alone));
    }
    let without = Prefilled::run(&model, &tokens, stats(&half), chunked(16)).unwrap();
    assert!(Session::new(&model, &third).unwrap().resume(without).is_err());
}

#[test]
fn kvmerger_threshold_mode_reports_what_it_achieved() {
    let model = random_llama(tiny_config(), 6).unwrap();
    const PROMPT: usize = 60;
    let tokens: Vec<u32> = (0..PROMPT as u32).map(|i| (i / 6) % 64).collect();
    let params = vec![
        ("budget_mode".to_string(), "threshold".to_string()),
        ("threshold".to_string(), "0.5".to_string()),
    ];
    let config =
        CompressionConfig::from_cli("kvmerger", Some(Budget::Ratio(0.5)), &params).unwrap();
    let mut session = Session::new(&model, &config).unwrap();
    session.prefill(&tokens).unwrap();
    let report = session.report().unwrap();
    let kept: usize = session.cache().layers.iter().flatten().map(|h| h.len()).sum();
    let total = PROMPT * model.config.n_layers * model.config.n_kv_heads;
    assert!((report.achieved_ratio() - kept as f64 / total as f64).abs() < 1e-12);
    assert!(kept < total, "repeated tokens give similar keys that merge");
    // Merged entries stand for all the tokens they absorbed.
    for head in session.cache().layers.iter().flatten() {
        assert_eq!(head.meta().iter().map(|m| m.count as usize).sum::<usize>(), PROMPT);
    }
}

/// TOVA on the engine: after the prompt it keeps what SnapKV keeps with a window of one
/// query and no pooling (the last query's attention, the last token kept); each decode step
/// then evicts, per head, the entry that step's query attended to least, found here by
/// running the same step on a copy of the cache with its attention statistic cleared. A
/// prefill shared with H2O (which accumulates attention over the whole prompt) changes
/// nothing.
#[test]
fn tova_evicts_what_each_step_attends_to_least() {
    let model = random_llama(tiny_config(), 7).unwrap();
    let tokens: Vec<u32> = (0..40).map(|i| (i * 13 + 2) % 64).collect();
    let config = |method: &str, params: &[(&str, &str)]| {
        let params: Vec<(String, String)> =
            params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        CompressionConfig::from_cli(method, Some(Budget::Ratio(0.5)), &params).unwrap()
    };
    let tova = config("tova", &[]);
    let snapkv = config("snapkv", &[("window", "1"), ("kernel", "1")]);
    let h2o = config("h2o", &[]);
    let stats = |c: &CompressionConfig| c.build().unwrap().prompt_stats(tokens.len());
    let positions = |session: &Session| {
        let heads = session.cache().layers.iter().flatten();
        heads.map(|h| h.meta().iter().map(|m| m.position).collect::<Vec<_>>()).collect::<Vec<_>>()
    };
    let resumed = |c: &CompressionConfig, prefilled: Prefilled| {
        let mut session = Session::new(&model, c).unwrap();
        session.resume(prefilled).unwrap();
        session
    };
    let alone = Prefilled::run(&model, &tokens, stats(&tova), chunked(16)).unwrap();
    let shared =
        Prefilled::run(&model, &tokens, stats(&tova).union(stats(&h2o)), chunked(16)).unwrap();
    let mut session = resumed(&tova, shared);
    let mut by_itself = resumed(&tova, alone.clone());
    assert_eq!(positions(&session), positions(&resumed(&snapkv, alone)));

    for step in 0..8u32 {
        let token = (step * 5 + 1) % 64;
        let mut probe = session.cache().clone();
        probe.layers.iter_mut().flatten().for_each(|h| {
            h.meta_mut().iter_mut().for_each(|m| m.attention = 0.0);
        });
        let opts = ForwardOptions { stats: StatsRequest::accumulated(), ..Default::default() };
        forward(&model, Phase::Decode, &[token], &mut probe, opts).unwrap();
        let expected: Vec<Vec<usize>> = probe
            .layers
            .iter()
            .flatten()
            .map(|h| {
                let meta = h.meta();
                let newest = meta.len() - 1;
                let victim = (0..newest)
                    .min_by(|&a, &b| {
                        let key = |i: usize| (meta[i].attention, meta[i].position);
                        key(a).partial_cmp(&key(b)).unwrap()
                    })
                    .unwrap();
                let mut kept: Vec<usize> = meta.iter().map(|m| m.position).collect();
                kept.remove(victim);
                kept.sort();
                kept
            })
            .collect();
        session.extend(&[token], Logits::Last).unwrap();
        by_itself.extend(&[token], Logits::Last).unwrap();
        let mut got = positions(&session);
        got.iter_mut().for_each(|p| p.sort());
        assert_eq!(got, expected, "step {step}");
        let mut alone_got = positions(&by_itself);
        alone_got.iter_mut().for_each(|p| p.sort());
        assert_eq!(alone_got, got, "step {step}: a shared prefill changes nothing");
    }
}
