//! `kvmerger eval` end to end on the real default model with ~100-token inputs: a resumed
//! run recomputes exactly the rows whose sample changed, and a sweep run as three parallel
//! shards reports the same as one run.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn kvmerger(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_kvmerger")).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "kvmerger {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvmerger-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A passkey row in kvpress's columns, with the extra columns a RULER export has.
fn dataset_row(key: &str) -> String {
    let filler = "The grass is green. The sky is blue. ".repeat(6);
    format!(
        r#"{{"context": "{filler}The pass key is {key}. Remember it. {filler}", "question": "What is the pass key?", "answer_prefix": "The pass key is", "answer": "{key}", "max_new_tokens": 6, "task": "passkey", "length": 100}}"#
    )
}

#[test]
fn a_resumed_run_recomputes_rows_whose_sample_changed() {
    kvmerger(&["fetch", "--model-only"]);
    let dir = temp_dir("resume");
    let data = dir.join("data.jsonl");
    let out = dir.join("out");
    let args = |data: &Path, out: &Path| -> Vec<String> {
        [
            "eval",
            "--dataset",
            path(data),
            "--metric",
            "contains",
            "--methods",
            "streaming_llm",
            "--budgets",
            "50%",
            "--protocols",
            "context",
            "--out",
            path(out),
        ]
        .map(String::from)
        .to_vec()
    };
    let run = |data: &Path| {
        let a = args(data, &out);
        String::from_utf8_lossy(&kvmerger(&a.iter().map(String::as_str).collect::<Vec<_>>()).stderr)
            .to_string()
    };
    std::fs::write(&data, format!("{}\n{}\n", dataset_row("48213"), dataset_row("90417"))).unwrap();
    let first = run(&data);
    assert!(first.contains("computed 4 rows (0 of them stale"), "{first}");
    assert_eq!(
        first.matches("ignoring unknown columns length, task").count(),
        1,
        "one warning for the unknown columns: {first}"
    );
    let again = run(&data);
    assert!(again.contains("computed 0 rows (0 of them stale"), "{again}");

    // Edit the second line's key (context and answer): its two rows are stale.
    std::fs::write(&data, format!("{}\n{}\n", dataset_row("48213"), dataset_row("31337"))).unwrap();
    let edited = run(&data);
    assert!(edited.contains("computed 2 rows (2 of them stale"), "{edited}");
    let results = std::fs::read_to_string(out.join("results.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> =
        results.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 4, "superseded rows are dropped from the file:\n{results}");
    let second: Vec<&serde_json::Value> =
        rows.iter().filter(|r| r["sample_id"] == "data-2").collect();
    assert_eq!(second.len(), 2);
    assert!(second.iter().all(|r| r["answers"][0] == "31337"), "{second:?}");
    // The full cache reads the new key; no special token reaches the scored text.
    let full = second.iter().find(|r| r["method"] == "full").unwrap();
    assert_eq!(full["score"], 1.0, "{full}");
    assert!(rows.iter().all(|r| !r["prediction"].as_str().unwrap().contains("<|")), "{results}");
}

/// The report without the parts that differ between runs: the command and the timings.
fn comparable(report: &str) -> String {
    let mut out = Vec::new();
    let mut skipping = false;
    for line in report.lines() {
        if line.starts_with("## ") {
            skipping = line.starts_with("## Time");
        }
        if !skipping && !line.starts_with("kvmerger ") && !line.starts_with("cargo run") {
            out.push(line);
        }
    }
    out.join("\n")
}

#[test]
fn three_parallel_shards_report_what_one_run_reports() {
    kvmerger(&["fetch", "--model-only"]);
    let dir = temp_dir("shards");
    let spec = dir.join("spec.json");
    std::fs::write(
        &spec,
        r#"{"name": "tiny", "tasks": [{"task": "passkey", "lengths": [96], "depths": [0.5], "seeds": [1, 2, 3]}], "methods": ["streaming_llm", "h2o"], "budgets": [{"ratio": 0.5}]}"#,
    )
    .unwrap();
    let (whole, sharded) = (dir.join("whole"), dir.join("sharded"));
    kvmerger(&["eval", "--spec", path(&spec), "--out", path(&whole)]);
    // Three processes at once, as a job array would start them.
    let handles: Vec<_> = (1..=3)
        .map(|i| {
            let (spec, sharded) = (spec.clone(), sharded.clone());
            std::thread::spawn(move || {
                let shard = format!("{i}/3");
                kvmerger(&[
                    "eval",
                    "--spec",
                    path(&spec),
                    "--out",
                    path(&sharded),
                    "--shard",
                    &shard,
                ])
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let shards: Vec<String> = (1..=3)
        .map(|i| sharded.join(format!("results-{i}-of-3.jsonl")).display().to_string())
        .collect();
    let mut args = vec!["report", "--out", path(&sharded), "--title", "kvmerger comparison: tiny"];
    args.extend(shards.iter().map(String::as_str));
    kvmerger(&args);
    let read = |d: &Path, f: &str| std::fs::read_to_string(d.join(f)).unwrap();
    assert_eq!(read(&whole, "summary.csv"), read(&sharded, "summary.csv"));
    let (a, b) = (read(&whole, "report.md"), read(&sharded, "report.md"));
    assert_eq!(comparable(&a), comparable(&b));
    // Both protocols ran: 3 samples x 2 protocols x (full + 2 methods).
    assert!(a.contains("18 rows."), "{a}");
}
