//! A sweep killed with SIGKILL at several points and resumed stores the same rows as an
//! uninterrupted run, and the same command run twice stores identical rows (timing fields
//! aside). Real model, short passkey inputs, two methods.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;

const SPEC: &str = r#"{
  "name": "killed",
  "tasks": [{"task": "passkey", "lengths": [256], "depths": [0.5], "seeds": [0, 1, 2]}],
  "methods": ["h2o", "streaming_llm"],
  "budgets": [0.5],
  "protocols": ["context"]
}"#;
/// Three samples, each under the full cache and two methods. A sample's rows are appended
/// together once all its methods ran, so the kill points below fall between samples.
const ROWS: usize = 9;
/// Fields that measure time, not results.
const TIMING: [&str; 3] = ["prefill_ms", "scoring_ms", "decode_ms"];

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvmerger-killed-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("spec.json"), SPEC).unwrap();
    dir
}

fn start(dir: &Path, out: &str) -> Child {
    let model = kvmerger_models::ensure_default_model().unwrap();
    Command::new(env!("CARGO_BIN_EXE_kvmerger"))
        .args(["eval", "--spec"])
        .arg(dir.join("spec.json"))
        .arg("--model")
        .arg(model)
        .arg("--out")
        .arg(dir.join(out))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run kvmerger")
}

fn run_to_end(dir: &Path, out: &str) {
    let status = start(dir, out).wait().unwrap();
    assert!(status.success(), "kvmerger eval failed: {status}");
}

fn results(dir: &Path, out: &str) -> PathBuf {
    dir.join(out).join("results.jsonl")
}

fn complete_lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.matches('\n').count())
}

/// Rows keyed by (sample, method), timing fields removed.
fn rows(path: &Path) -> BTreeMap<String, Value> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut rows = BTreeMap::new();
    for line in text.lines() {
        let mut row: Value = serde_json::from_str(line).unwrap();
        let obj = row.as_object_mut().unwrap();
        for field in TIMING {
            obj.remove(field);
        }
        let key = format!("{}|{}", obj["sample_id"], obj["method"]);
        assert!(rows.insert(key.clone(), row).is_none(), "row {key} stored twice");
    }
    rows
}

/// Starts a run and kills it with SIGKILL once `when` holds (polled every 5 ms).
fn kill_when(dir: &Path, out: &str, when: impl Fn(&Path, Duration) -> bool) {
    let mut child = start(dir, out);
    let began = Instant::now();
    let path = results(dir, out);
    loop {
        if child.try_wait().unwrap().is_some() {
            return; // finished before the kill point
        }
        if when(&path, began.elapsed()) {
            child.kill().unwrap(); // SIGKILL on Unix
            child.wait().unwrap();
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn killed_and_resumed_sweeps_equal_an_uninterrupted_one_and_runs_repeat_exactly() {
    let dir = scratch();
    run_to_end(&dir, "a");
    let reference = rows(&results(&dir, "a"));
    assert_eq!(reference.len(), ROWS);

    // Reproducible: the same command again gives the same rows.
    run_to_end(&dir, "b");
    assert_eq!(rows(&results(&dir, "b")), reference, "a second run differs");

    // Killed while loading or in the first prefill, right after the first sample's rows are
    // written (in the second sample's prefill), and after the second sample's (in the third's).
    kill_when(&dir, "c", |_, t| t > Duration::from_millis(300));
    assert!(complete_lines(&results(&dir, "c")) < ROWS);
    kill_when(&dir, "c", |p, _| complete_lines(p) >= 1);
    kill_when(&dir, "c", |p, _| complete_lines(p) >= 4);
    let before = complete_lines(&results(&dir, "c"));
    // A write cut short by the kill: half a row at the end of the file.
    let path = results(&dir, "c");
    let text = std::fs::read_to_string(&path).unwrap();
    let first = text.lines().next().expect("a row survived the kills");
    let torn = format!("{text}{}", &first[..first.len() / 2]);
    std::fs::write(&path, torn).unwrap();
    run_to_end(&dir, "c");
    let resumed = rows(&path);
    assert!(before < ROWS, "the kills interrupted the sweep ({before} rows before resuming)");
    assert_eq!(resumed, reference, "the resumed sweep differs from the uninterrupted one");
    std::fs::remove_dir_all(&dir).unwrap();
}
