//! `kvmerger analyze --suggest-budget` writes per-layer budgets that, used by KVMerger,
//! reach the requested overall budget.

use kvmerger_compress::{CompareTo, CompressionConfig, StatsRequest};
use kvmerger_engine::testing::{random_llama, tiny_config};
use kvmerger_engine::{PrefillOptions, Prefilled, Session};
use kvmerger_eval::analyze::{analyze_cache, suggest_layer_budgets};

#[test]
fn a_suggested_configuration_reaches_the_requested_budget() {
    let mut config = tiny_config();
    config.n_layers = 6;
    let model = random_llama(config, 21).unwrap();
    let tokens: Vec<u32> = (0..240u32).map(|i| (i * 13 + i / 7) % 64).collect();
    let prefilled = Prefilled::run(
        &model,
        &tokens,
        StatsRequest::accumulated(),
        PrefillOptions { attention_chunk: 64, ..Default::default() },
    )
    .unwrap();
    // A low threshold so that layers differ in how much they merge.
    let analysis = analyze_cache("synthetic", &prefilled.cache, 0.3, CompareTo::Neighbour);
    for overall in [0.5, 0.35, 0.2] {
        let budgets = suggest_layer_budgets(&analysis.layer_merge_ratio, overall);
        let json = serde_json::json!({"method": "kvmerger", "budget": {"ratio": overall}, "layer_budgets": budgets});
        let method = CompressionConfig::from_json(&json.to_string()).unwrap();
        let mut session = Session::new(&model, &method).unwrap();
        session.resume(prefilled.clone()).unwrap();
        let achieved = session.report().unwrap().achieved_ratio();
        // Within one percentage point of the full cache.
        assert!((achieved - overall).abs() <= 0.01, "requested {overall}, achieved {achieved}");
        // Layers really get different budgets.
        let per_layer: Vec<usize> = session.report().unwrap().budgets.clone();
        assert!(per_layer.iter().any(|&b| b != per_layer[0]), "{per_layer:?}");
    }
}
