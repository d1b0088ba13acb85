//! Helpers shared by the integration tests.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// Token ids of `texts` from `scripts/tokenizer_crosscheck.py`.
pub fn python_ids(model: &Path, texts: &[&str]) -> Vec<Vec<u32>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let script = root.join("scripts/tokenizer_crosscheck.py");
    let hint = "the tokenizer cross-check needs python3 with the packages gguf and tokenizers: run `pip install gguf tokenizers`";
    let probe = Command::new("python3").args(["-c", "import gguf, tokenizers"]).output();
    match probe {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!("{hint}\n{}", String::from_utf8_lossy(&out.stderr)),
        Err(e) => panic!("{hint} (python3 could not be started: {e})"),
    }
    let mut child = Command::new("python3")
        .arg(&script)
        .arg(model)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting python3");
    let input = serde_json::to_vec(texts).unwrap();
    child.stdin.take().unwrap().write_all(&input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{} failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the script prints a JSON list of id lists")
}
