//! llama.cpp in the same run: `scripts/bench_llama_cpp.py` (embedded here) drives it through
//! the `llama-cpp-python` package on the same GGUF file and the same token ids.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

const SCRIPT: &str = include_str!("../../../../scripts/bench_llama_cpp.py");

/// What the script prints for one prompt length.
#[derive(Debug, Deserialize)]
pub struct Measured {
    pub tokens: usize,
    pub prefill_s: f64,
    pub decode_s: f64,
}

/// A KV cache type other than llama.cpp's default f16: keys and values stored as ggml type
/// `ggml_type` (8: q8_0, 2: q4_0), with flash attention (which a quantized V cache needs).
#[derive(Debug, Clone, Copy)]
pub struct CacheType {
    pub ggml_type: u32,
}

/// Runs llama.cpp on `tokens[..n]` for each `n` of `lengths`, then `steps` decode steps, its
/// cache in `cache` (default f16). `Ok(None)` when `python` cannot import `llama_cpp` (the
/// reason is printed).
pub fn measure(
    python: &str,
    model: &Path,
    threads: usize,
    lengths: &[usize],
    steps: usize,
    tokens: &[u32],
    cache: Option<CacheType>,
) -> Result<Option<Vec<Measured>>> {
    let importable = Command::new(python)
        .args(["-c", "import llama_cpp"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !importable {
        eprintln!(
            "llama.cpp: `{python}` cannot import llama_cpp, so it is not measured \
             (pip install llama-cpp-python==0.3.36; see docs/bench/README.md)"
        );
        return Ok(None);
    }
    let mut input = serde_json::json!({
        "model": model, "threads": threads, "lengths": lengths, "steps": steps, "tokens": tokens,
    });
    if let Some(CacheType { ggml_type }) = cache {
        input["type_k"] = ggml_type.into();
        input["type_v"] = ggml_type.into();
        input["flash_attn"] = true.into();
    }
    let mut child = Command::new(python)
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {python}"))?;
    // Written from this thread and closed before reading: the script reads all of stdin first.
    child
        .stdin
        .take()
        .context("llama.cpp script stdin")?
        .write_all(input.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("the llama.cpp benchmark failed ({})", out.status);
    }
    let rows = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("llama.cpp script printed `{l}`")))
        .collect::<Result<Vec<Measured>>>()?;
    Ok(Some(rows))
}
