//! Mutated datasets, sweep specifications and method configurations: every one is read
//! into a result or an error naming its line or field — never a panic.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::Instant;

use kvmerger_compress::{Budget, CompressionConfig};
use kvmerger_engine::testing::{random_llama, tiny_config};
use kvmerger_engine::Session;
use kvmerger_eval::dataset::{load_jsonl, LoadPolicy};
use kvmerger_eval::metrics::Metric;
use kvmerger_eval::sweep::{load_spec, Job};
use kvmerger_eval::tasks::{generate, TaskInput};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvmerger-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Values of the wrong type or out of any sane range.
fn junk(rng: &mut StdRng) -> Value {
    match rng.random_range(0..10) {
        0 => json!(null),
        1 => json!(-1),
        2 => json!(u64::MAX),
        3 => json!(1e300),
        4 => json!("x"),
        5 => json!([]),
        6 => json!({"a": [1, {"b": null}]}),
        7 => json!(true),
        8 => json!(0),
        _ => json!(rng.random_range(0..5000)),
    }
}

/// Replaces, removes or adds a random field somewhere in `v` (objects and arrays).
fn mutate_json(v: &mut Value, rng: &mut StdRng) {
    match v {
        Value::Object(map) if !map.is_empty() => {
            let keys: Vec<String> = map.keys().cloned().collect();
            let key = &keys[rng.random_range(0..keys.len())];
            match rng.random_range(0..5) {
                0 => {
                    map.remove(key);
                }
                1 => {
                    map.insert("unexpected".into(), junk(rng));
                }
                2 | 3 => mutate_json(map.get_mut(key).unwrap(), rng),
                _ => {
                    map.insert(key.clone(), junk(rng));
                }
            }
        }
        Value::Array(items) if !items.is_empty() && rng.random_bool(0.7) => {
            let i = rng.random_range(0..items.len());
            mutate_json(&mut items[i], rng);
        }
        other => *other = junk(rng),
    }
}

const GOOD_ROW: &str = r#"{"context": "The key is 7.", "question": "What is the key?", "answer_prefix": "Answer:", "answer": "7", "max_new_tokens": 4}"#;

#[test]
fn mutated_datasets_fail_by_line() {
    let start = Instant::now();
    let dir = scratch("hostile-dataset");
    let mut rng = StdRng::seed_from_u64(21);
    let deep = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
    let big = format!(
        r#"{{"context": "{}", "question": "q", "answer": "a"}}"#,
        "word ".repeat(20_000_000)
    );
    const CASES: usize = 300;
    for case in 0..CASES {
        let mut lines: Vec<Vec<u8>> = (0..5).map(|_| GOOD_ROW.as_bytes().to_vec()).collect();
        let at = rng.random_range(0..lines.len());
        match case % 6 {
            0 => {
                let mut v: Value = serde_json::from_str(GOOD_ROW).unwrap();
                mutate_json(&mut v, &mut rng);
                lines[at] = v.to_string().into_bytes();
            }
            1 => {
                let pos = rng.random_range(0..lines[at].len());
                lines[at].insert(pos, [0xff, 0xc3, 0x80, 0xfe][rng.random_range(0..4)]);
            }
            2 => {
                for _ in 0..rng.random_range(1..8) {
                    let pos = rng.random_range(0..lines[at].len());
                    lines[at][pos] ^= 1 << rng.random_range(0..8);
                }
            }
            3 => lines[at] = format!(r#"{{"context": {deep}}}"#).into_bytes(),
            4 => {
                let cut = rng.random_range(0..lines[at].len());
                lines[at].truncate(cut);
            }
            _ if case == 5 => lines[at] = big.clone().into_bytes(),
            _ => lines[at] = b"\0\0{\"context\"".to_vec(),
        }
        let path = dir.join(format!("case-{case}.jsonl"));
        std::fs::write(&path, lines.join(&b'\n')).unwrap();
        let skipped = catch_unwind(|| load_jsonl(&path, Metric::QaF1, LoadPolicy::Skip))
            .unwrap_or_else(|_| panic!("case {case} panicked"));
        let loaded = skipped.unwrap_or_else(|e| panic!("case {case}: {e}"));
        let (samples, errors) = (loaded.samples, loaded.errors);
        assert_eq!(samples.len() + errors.len(), 5 - usize::from(lines[at].is_empty()), "{case}");
        for e in &errors {
            assert!((1..=5).contains(&e.line) && !e.message.is_empty(), "case {case}: {e:?}");
        }
        match load_jsonl(&path, Metric::QaF1, LoadPolicy::Fatal) {
            Ok(loaded) => assert!(loaded.errors.is_empty()),
            Err(e) => assert!(e.to_string().contains(&format!("line {}", at + 1)), "{case}: {e}"),
        }
    }
    eprintln!("{CASES} mutated datasets in {:.1} s", start.elapsed().as_secs_f64());
    std::fs::remove_dir_all(&dir).unwrap();
}

const SPEC: &str = r#"{"name": "s", "methods": ["kvmerger", "h2o:window=4"], "budgets": [0.5, 0.35],
"tasks": [{"task": "passkey", "lengths": [128], "depths": [0.5], "seeds": [0]},
          {"task": "niah_single_1", "lengths": [320], "depths": [0.2], "seeds": [1]}]}"#;

#[test]
fn mutated_sweep_specs_load_or_fail_by_field() {
    let start = Instant::now();
    let dir = scratch("hostile-spec");
    let mut rng = StdRng::seed_from_u64(22);
    // Four characters a token, as a stand-in for the model's tokenizer.
    let count_tokens = |s: &str| s.len().div_ceil(4);
    const CASES: usize = 300;
    let (mut valid, mut errors) = (0, 0);
    for case in 0..CASES {
        let mut v: Value = serde_json::from_str(SPEC).unwrap();
        for _ in 0..rng.random_range(1..=2) {
            mutate_json(&mut v, &mut rng);
        }
        let path = dir.join(format!("spec-{case}.json"));
        std::fs::write(&path, v.to_string()).unwrap();
        let outcome = catch_unwind(AssertUnwindSafe(|| -> Result<(), String> {
            let spec = load_spec(&path).map_err(|e| e.to_string())?;
            spec.configs().map_err(|e| e.to_string())?;
            for job in spec.jobs() {
                if let Job::Generated { task, length, depth, seed } = job {
                    let input = TaskInput {
                        length,
                        depth,
                        seed,
                        count_tokens: &count_tokens,
                        haystack: None,
                    };
                    generate(task, &input).map_err(|e| e.to_string())?;
                }
            }
            Ok(())
        }))
        .unwrap_or_else(|_| panic!("spec {case} panicked: {v}"));
        match outcome {
            Ok(()) => valid += 1,
            Err(e) => {
                errors += 1;
                assert!(e.len() > 10, "spec {case}: an unhelpful error `{e}`");
            }
        }
    }
    assert!(errors > CASES / 4 && valid > 0, "{valid} valid, {errors} errors");
    eprintln!(
        "{CASES} mutated sweep specs: {valid} valid, {errors} errors, {:.1} s",
        start.elapsed().as_secs_f64()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn mutated_method_configs_fail_by_field_or_run() {
    let start = Instant::now();
    let model = random_llama(tiny_config(), 5).unwrap();
    let tokens: Vec<u32> = (0..48).map(|i| (i * 7 % 64) as u32).collect();
    let mut rng = StdRng::seed_from_u64(23);
    let bases: Vec<Value> =
        ["kvmerger", "h2o", "snapkv", "cam", "streaming_llm", "knorm", "keydiff", "tova"]
            .iter()
            .map(|m| {
                let config = CompressionConfig::from_cli(m, Some(Budget::Ratio(0.5)), &[]).unwrap();
                serde_json::to_value(config).unwrap()
            })
            .collect();
    const CASES: usize = 300;
    let (mut ran, mut errors) = (0, 0);
    for case in 0..CASES {
        let mut v = bases[case % bases.len()].clone();
        mutate_json(&mut v, &mut rng);
        let text = v.to_string();
        let outcome = catch_unwind(AssertUnwindSafe(|| -> Result<(), String> {
            let config = CompressionConfig::from_json(&text).map_err(|e| e.to_string())?;
            // A configuration that parses must run: compress a 48-token prompt, decode one.
            let mut session = Session::new(&model, &config).map_err(|e| e.to_string())?;
            session.prefill(&tokens).map_err(|e| e.to_string())?;
            session.extend(&[3], kvmerger_engine::Logits::Last).map_err(|e| e.to_string())?;
            Ok(())
        }))
        .unwrap_or_else(|_| panic!("method config {case} panicked: {text}"));
        match outcome {
            Ok(()) => ran += 1,
            Err(e) => {
                errors += 1;
                assert!(e.len() > 10, "config {case}: an unhelpful error `{e}`");
            }
        }
    }
    assert!(errors > CASES / 4 && ran > 0, "{ran} ran, {errors} errors");
    eprintln!(
        "{CASES} mutated method configs: {ran} ran, {errors} errors, {:.1} s",
        start.elapsed().as_secs_f64()
    );
}
