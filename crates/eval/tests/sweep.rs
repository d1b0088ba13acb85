//! A short sweep on the real default model: interrupted and resumed, it gives the same
//! rows as one uninterrupted run; the full cache finds the passkey.

use std::path::PathBuf;

use kvmerger_compress::{Budget, CompressionConfig, KvDtype};
use kvmerger_engine::{LoadedModel, PrefillCompression, PrefillOptions, WeightFormats};
use kvmerger_eval::results::{ResultRow, ResultStore, Shard};
use kvmerger_eval::runner::Protocol;
use kvmerger_eval::sweep::{run_sweep, Job, SweepInput};
use kvmerger_eval::tasks::TaskKind;
use kvmerger_models::load_model;

fn model() -> LoadedModel {
    load_model(&kvmerger_models::ensure_default_model().unwrap(), WeightFormats::default()).unwrap()
}

fn input() -> SweepInput<'static> {
    let configs = vec![
        CompressionConfig::Full,
        CompressionConfig::from_cli("kvmerger", Some(Budget::Ratio(0.5)), &[]).unwrap(),
        CompressionConfig::from_cli("cam", Some(Budget::Ratio(0.5)), &[]).unwrap(),
    ];
    let jobs = [0.5, 0.9]
        .iter()
        .map(|&depth| Job::Generated { task: TaskKind::Passkey, length: 200, depth, seed: 3 })
        .collect();
    SweepInput {
        configs,
        jobs,
        haystack: None,
        protocols: vec![Protocol::Context],
        chat: false,
        prefill: PrefillOptions::default(),
        prefill_modes: vec![PrefillCompression::Once],
        reference_kv_dtype: None,
        kv_stacks: Vec::new(),
        max_kv: None,
        model_fingerprint: "test model".into(),
        shard: Shard::WHOLE,
        progress: false,
    }
}

fn temp(name: &str) -> PathBuf {
    let p =
        std::env::temp_dir().join(format!("kvmerger-sweep-{}-{name}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

/// Rows without their timings, which differ between runs.
fn comparable(rows: &[ResultRow]) -> Vec<ResultRow> {
    rows.iter()
        .map(|r| ResultRow { prefill_ms: 0.0, scoring_ms: 0.0, decode_ms: 0.0, ..r.clone() })
        .collect()
}

#[test]
fn interrupted_and_resumed_sweep_equals_an_uninterrupted_one() {
    let mut m = model();
    let whole_path = temp("whole");
    let (mut store, _) = ResultStore::open(&whole_path).unwrap();
    let whole = run_sweep(&mut m, &input(), &mut store).unwrap().computed;
    assert_eq!(whole.len(), 6);

    let parts_path = temp("parts");
    let mut first = input();
    first.jobs.truncate(1);
    let (mut store, _) = ResultStore::open(&parts_path).unwrap();
    assert_eq!(run_sweep(&mut m, &first, &mut store).unwrap().computed.len(), 3);
    drop(store);
    // Resuming computes only what is missing.
    let (mut store, done) = ResultStore::open(&parts_path).unwrap();
    assert_eq!(done.len(), 3);
    let rest = run_sweep(&mut m, &input(), &mut store).unwrap();
    assert_eq!((rest.computed.len(), rest.stale), (3, 0));
    // Compare what both runs stored, read back the same way.
    let (_, all) = ResultStore::open(&parts_path).unwrap();
    let (_, whole_stored) = ResultStore::open(&whole_path).unwrap();
    assert_eq!(comparable(&all), comparable(&whole_stored));

    let full: Vec<&ResultRow> = whole.iter().filter(|r| r.method == "full").collect();
    assert!(
        full.iter().all(|r| r.score == 1.0 && r.kl == 0.0 && r.top1_agreement == 1.0),
        "{full:?}"
    );
    for r in &whole {
        // Resident memory is keys, values (64 + 64 elements in the cache's dtype) and a
        // 16-byte record per entry.
        assert_eq!(r.kv_dtype, m.model.kv_dtype);
        let entry = (2 * r.kv_dtype.row_bytes(64)) as f64;
        let kept = r.achieved_ratio * r.full_kv_bytes as f64;
        let resident = r.resident_kv_bytes as f64;
        assert!(
            resident >= kept && resident <= kept * (1.0 + 16.0 / entry) * 1.001,
            "{}: {resident} bytes for {kept}",
            r.method
        );
        assert!(r.kl >= 0.0 && r.kl.is_finite());
    }
}

/// With an f32 reference, the f16 full cache's own row measures what storing keys and
/// values in f16 costs: a KL well under 1e-3 nats per token, and half the memory.
#[test]
fn an_f16_cache_is_close_to_an_f32_reference() {
    let mut m = model();
    assert_eq!(m.model.kv_dtype, KvDtype::F16);
    let mut input = input();
    input.configs.truncate(1);
    input.jobs.truncate(1);
    input.reference_kv_dtype = Some(KvDtype::F32);
    let (mut store, _) = ResultStore::open(&temp("f16")).unwrap();
    let rows = run_sweep(&mut m, &input, &mut store).unwrap().computed;
    let full = &rows[0];
    assert_eq!((full.kv_dtype, full.reference_kv_dtype), (KvDtype::F16, Some(KvDtype::F32)));
    assert!(full.kl >= 0.0 && full.kl < 1e-3, "KL {}", full.kl);
    assert!(full.top1_agreement >= 0.9, "{full:?}");
    let f32_bytes = 2 * 4 * full.context_tokens * 30 * 3 * 64;
    assert_eq!(2 * full.full_kv_bytes, f32_bytes);
}

#[test]
fn incremental_rows_stand_beside_once_rows_and_hold_budget_plus_one_chunk() {
    let mut m = model();
    let chunk = 64;
    let share = 0.25;
    let mut input = input();
    input.configs = vec![
        CompressionConfig::Full,
        CompressionConfig::from_cli("kvmerger", Some(Budget::Ratio(share)), &[]).unwrap(),
        CompressionConfig::from_cli("h2o", Some(Budget::Ratio(share)), &[]).unwrap(),
    ];
    input.jobs = vec![Job::Generated { task: TaskKind::Passkey, length: 600, depth: 0.5, seed: 3 }];
    input.prefill = PrefillOptions { chunk, ..PrefillOptions::default() };
    input.prefill_modes = vec![PrefillCompression::Once, PrefillCompression::Incremental];
    let path = temp("incremental");
    let (mut store, _) = ResultStore::open(&path).unwrap();
    let rows = run_sweep(&mut m, &input, &mut store).unwrap().computed;
    let _ = std::fs::remove_file(&path);
    // The full cache compresses nothing: one row, under the first mode.
    assert_eq!(rows.iter().filter(|r| r.method_name() == "full").count(), 1);
    for name in ["kvmerger", "h2o"] {
        let row = |method: &str| rows.iter().find(|r| r.method_name() == method).unwrap();
        let (once, incremental) = (row(name), row(&format!("{name}/incremental")));
        assert_eq!(incremental.method, format!("{name}/incremental@25%"));
        let context = once.context_tokens;
        let budget = (share * context as f64).ceil() as usize;
        assert!(budget + chunk < context, "the prompt must not fit budget + chunk");
        // Once holds every prompt entry; incremental at most budget + chunk of them, each
        // entry (with its statistics) no larger than in the shared prefill.
        let bound = once.peak_kv_bytes as f64 * (budget + chunk) as f64 / context as f64;
        assert!(
            incremental.peak_kv_bytes as f64 <= bound,
            "{name}: {} bytes > {bound}",
            incremental.peak_kv_bytes
        );
        assert!(incremental.kl.is_finite() && incremental.achieved_ratio <= share + 0.01);
    }
}

/// A stack runs the full cache and a method again on a q8_0 cache, in rows of their own
/// compared with the f16 full cache: about 56% of its resident bytes (keys and values at
/// 34 bytes a block of 32 against 64, plus the 16-byte entry records), a small KL.
#[test]
fn stacked_rows_run_on_their_own_dtype_against_the_sweeps_reference() {
    let mut m = model();
    let mut input = input();
    input.jobs.truncate(1);
    input.configs.truncate(2);
    input.kv_stacks = vec![(KvDtype::Q8_0, input.configs.clone())];
    let path = temp("stacked");
    let (mut store, _) = ResultStore::open(&path).unwrap();
    let rows = run_sweep(&mut m, &input, &mut store).unwrap().computed;
    assert_eq!(m.model.kv_dtype, KvDtype::F16, "the model keeps its own dtype");
    let labels: Vec<&str> = rows.iter().map(|r| r.method.as_str()).collect();
    assert_eq!(labels, ["full", "kvmerger@50%", "full/q8_0", "kvmerger/q8_0@50%"]);
    let row = |label: &str| rows.iter().find(|r| r.method == label).unwrap();
    let (full, q8) = (row("full"), row("full/q8_0"));
    assert_eq!((q8.kv_dtype, q8.reference_kv_dtype), (KvDtype::Q8_0, Some(KvDtype::F16)));
    assert_eq!((full.kv_dtype, full.reference_kv_dtype), (KvDtype::F16, None));
    let share = q8.resident_kv_bytes as f64 / full.resident_kv_bytes as f64;
    assert!((0.53..0.60).contains(&share), "q8_0 holds {share} of f16's bytes");
    assert!(q8.kl > 0.0 && q8.kl < 5e-3, "q8_0 KL {}", q8.kl);
    let stacked = row("kvmerger/q8_0@50%");
    let share = stacked.resident_kv_bytes as f64 / full.resident_kv_bytes as f64;
    assert!(share < 0.32, "KVMerger at 50% on q8_0 holds {share} of f16's bytes");
    assert!(stacked.kl >= 0.0 && stacked.kl.is_finite());
    // Resumed, nothing is recomputed: the stacked rows have keys of their own.
    drop(store);
    let (mut store, done) = ResultStore::open(&path).unwrap();
    assert_eq!(done.len(), 4);
    assert!(run_sweep(&mut m, &input, &mut store).unwrap().computed.is_empty());
    let _ = std::fs::remove_file(&path);
}
