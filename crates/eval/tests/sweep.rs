//! A short sweep on the real default model: interrupted and resumed, it gives the same
//! rows as one uninterrupted run; the full cache finds the passkey.

use std::path::PathBuf;

use kvmerger_compress::{Budget, CompressionConfig};
use kvmerger_engine::{load_model, LoadedModel, WeightFormats};
use kvmerger_eval::results::{ResultRow, ResultStore, Shard};
use kvmerger_eval::runner::Protocol;
use kvmerger_eval::sweep::{run_sweep, Job, SweepInput};
use kvmerger_eval::tasks::TaskKind;

fn model() -> LoadedModel {
    load_model(&kvmerger_engine::fetch::ensure_default_model().unwrap(), WeightFormats::default())
        .unwrap()
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
        attention_chunk: 128,
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
    rows.iter().map(|r| ResultRow { prefill_ms: 0.0, decode_ms: 0.0, ..r.clone() }).collect()
}

#[test]
fn interrupted_and_resumed_sweep_equals_an_uninterrupted_one() {
    let m = model();
    let whole_path = temp("whole");
    let (mut store, _) = ResultStore::open(&whole_path).unwrap();
    let whole = run_sweep(&m, &input(), &mut store).unwrap().computed;
    assert_eq!(whole.len(), 6);

    let parts_path = temp("parts");
    let mut first = input();
    first.jobs.truncate(1);
    let (mut store, _) = ResultStore::open(&parts_path).unwrap();
    assert_eq!(run_sweep(&m, &first, &mut store).unwrap().computed.len(), 3);
    drop(store);
    // Resuming computes only what is missing.
    let (mut store, done) = ResultStore::open(&parts_path).unwrap();
    assert_eq!(done.len(), 3);
    let rest = run_sweep(&m, &input(), &mut store).unwrap();
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
        // Resident memory is keys, values and a small per-entry record (16 of every 528 bytes).
        let kept = r.achieved_ratio * r.full_kv_bytes as f64;
        let resident = r.resident_kv_bytes as f64;
        assert!(
            resident >= kept && resident <= kept * 1.04,
            "{}: {resident} bytes for {kept}",
            r.method
        );
        assert!(r.kl >= 0.0 && r.kl.is_finite());
    }
}
