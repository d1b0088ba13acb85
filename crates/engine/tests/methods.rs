//! Every method through every path of the engine on the tiny model: exact budgets after
//! the prompt, budgets kept through decoding, memory that follows the entries kept.

use kvmerger_compress::{Budget, CompressionConfig, EntryMeta, METHOD_NAMES};
use kvmerger_engine::testing::{random_llama, tiny_config};
use kvmerger_engine::{Logits, Sampler, Session};

const PROMPT: usize = 60;
const STEPS: usize = 64;

fn configs(budget: f64) -> Vec<CompressionConfig> {
    METHOD_NAMES
        .iter()
        .filter(|&&m| m != "full" || budget == 1.0)
        .map(|&m| {
            let params: Vec<(String, String)> = match m {
                "snapkv" => vec![("window".into(), "4".into())],
                _ => vec![],
            };
            let b = (m != "full").then_some(Budget::Ratio(budget));
            CompressionConfig::from_cli(m, b, &params).unwrap()
        })
        .collect()
}

#[test]
fn every_method_keeps_its_budget_through_prefill_and_decode() {
    let model = random_llama(tiny_config(), 5).unwrap();
    let tokens: Vec<u32> = (0..PROMPT as u32).map(|i| (i * 7 + 3) % 64).collect();
    let (hd, entry_bytes) = (model.config.head_dim, std::mem::size_of::<EntryMeta>());
    for budget in [1.0, 0.5, 0.35, 0.2] {
        for config in configs(budget) {
            let label = config.label();
            let expected = Budget::Ratio(budget).entries(PROMPT);
            let mut session = Session::new(&model, &config).unwrap();
            let mut logits = session.prefill(&tokens).unwrap();
            let report = session.report().unwrap().clone();
            for (l, heads) in session.cache.layers.iter().enumerate() {
                for (h, head) in heads.iter().enumerate() {
                    assert_eq!(head.len(), expected, "{label}: layer {l} head {h}");
                    assert_eq!(report.heads[l][h].after, head.len());
                    // Resident memory is the kept keys, values and metadata, nothing more.
                    assert_eq!(
                        head.resident_bytes(),
                        expected * (2 * hd * 4 + entry_bytes),
                        "{label}"
                    );
                    assert!(
                        head.meta().windows(2).all(|w| w[0].position < w[1].position),
                        "{label}: sorted by position"
                    );
                }
            }
            assert!((report.achieved_ratio() - expected as f64 / PROMPT as f64).abs() < 1e-9);

            let mut sampler = Sampler::new(Default::default());
            for step in 0..STEPS {
                let next = sampler.sample(&logits);
                logits = session.extend(&[next], Logits::Last).unwrap().swap_remove(0);
                assert!(logits.iter().all(|x| x.is_finite()));
                let bounded = matches!(
                    config,
                    CompressionConfig::H2o(_)
                        | CompressionConfig::Cam(_)
                        | CompressionConfig::StreamingLlm(_)
                );
                for head in session.cache.layers.iter().flatten() {
                    if bounded {
                        assert!(
                            head.len() <= expected,
                            "{label}: {} > {expected} at step {step}",
                            head.len()
                        );
                    } else {
                        assert_eq!(
                            head.len(),
                            expected + step + 1,
                            "{label} grows by one entry per step"
                        );
                    }
                    // The newest entry always sits at the newest logical position.
                    assert_eq!(head.meta().last().unwrap().position, PROMPT + step);
                }
            }
            assert_eq!(session.cache.n_seen, PROMPT + STEPS);
        }
    }
}

#[test]
fn kvmerger_threshold_mode_reports_what_it_achieved() {
    let model = random_llama(tiny_config(), 6).unwrap();
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
    let kept: usize = session.cache.layers.iter().flatten().map(|h| h.len()).sum();
    let total = PROMPT * model.config.n_layers * model.config.n_kv_heads;
    assert!((report.achieved_ratio() - kept as f64 / total as f64).abs() < 1e-12);
    assert!(kept < total, "repeated tokens give similar keys that merge");
    // Merged entries stand for all the tokens they absorbed.
    for head in session.cache.layers.iter().flatten() {
        assert_eq!(head.meta().iter().map(|m| m.count as usize).sum::<usize>(), PROMPT);
    }
}
