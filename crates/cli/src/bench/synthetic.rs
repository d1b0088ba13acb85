//! `kvmerger bench --synthetic llama-8b`: memory and speed on a file the size of the models
//! people run, generated rather than downloaded. `scripts/synthetic_gguf.py` (embedded here)
//! writes a random-weight GGUF shaped like Llama-3-8B in a Q4_K_M file's block types into
//! the cache folder; the bench loads it, prefills a prompt, decodes, and reports the process's
//! peak resident memory against the file's bytes plus the KV cache's (goal: at most 1.15x).
//! The file is deleted afterwards unless `--keep` asks otherwise.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use kvmerger_compress::CompressionConfig;
use kvmerger_engine::{argmax, Session, WeightFormats};
use serde::Serialize;

use crate::args::ModelSource;

const SCRIPT: &str = include_str!("../../../../scripts/synthetic_gguf.py");

/// The shapes the script writes (its `SHAPES`).
pub const SHAPES: [&str; 2] = ["llama-8b", "tiny"];

/// What one run measured.
#[derive(Debug, Serialize)]
pub struct SyntheticReport {
    pub shape: String,
    pub file_bytes: u64,
    /// Weight bytes the model holds (`Llama::weight_bytes`).
    pub weight_bytes: usize,
    /// Keys and values resident after the last decode step.
    pub kv_bytes: usize,
    /// The process's peak resident set (`VmHWM`), loading included.
    pub peak_rss_bytes: u64,
    pub load_s: f64,
    pub prompt_tokens: usize,
    pub prefill_s: f64,
    pub decode_steps: usize,
    pub decode_ms_per_token: f64,
}

impl SyntheticReport {
    /// Peak resident memory over the file's bytes plus the KV cache's.
    pub fn rss_ratio(&self) -> f64 {
        self.peak_rss_bytes as f64 / (self.file_bytes as f64 + self.kv_bytes as f64)
    }

    pub fn table(&self) -> String {
        let gb = |b: f64| b / 1e9;
        format!(
            "| shape | file GB | weights GB | KV MB | peak RSS GB | peak RSS / (file + KV) | \
             load s | prompt | prefill s | decode ms/token |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n\
             | {} | {:.3} | {:.3} | {:.1} | {:.3} | {:.3} | {:.1} | {} | {:.1} | {:.0} |\n",
            self.shape,
            gb(self.file_bytes as f64),
            gb(self.weight_bytes as f64),
            self.kv_bytes as f64 / 1e6,
            gb(self.peak_rss_bytes as f64),
            self.rss_ratio(),
            self.load_s,
            self.prompt_tokens,
            self.prefill_s,
            self.decode_ms_per_token,
        )
    }
}

/// Removes the generated file when dropped, unless it is to be kept.
struct Generated {
    path: PathBuf,
    keep: bool,
}

impl Drop for Generated {
    fn drop(&mut self) {
        if !self.keep {
            // A file already gone is what was wanted.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Writes the random GGUF of `shape` to `path` with `python` (through a temporary name, so
/// an interrupted run leaves no truncated file behind). Returns the file's bytes.
pub fn generate(python: &str, shape: &str, path: &Path) -> Result<u64> {
    if !SHAPES.contains(&shape) {
        bail!("--synthetic: unknown shape `{shape}` (expected one of {})", SHAPES.join(", "));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let partial = path.with_extension("partial");
    let out = Command::new(python)
        .args(["-c", SCRIPT, shape])
        .arg(&partial)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("starting {python}"))?;
    match out.status.code() {
        Some(0) => {}
        Some(3) => {
            bail!("--synthetic needs `{python}` with numpy and gguf (pip install numpy gguf)")
        }
        _ => {
            let _ = std::fs::remove_file(&partial);
            bail!("writing the synthetic GGUF failed ({})", out.status);
        }
    }
    std::fs::rename(&partial, path)
        .with_context(|| format!("moving {} into place", partial.display()))?;
    Ok(std::fs::metadata(path)?.len())
}

/// Generates the file of `shape` (or reuses a kept one), then measures it: load, a prefill
/// of `prompt` tokens, `steps` greedy decode steps; deletes the file unless `keep`.
pub fn run(
    source: &ModelSource,
    python: &str,
    shape: &str,
    prompt: usize,
    steps: usize,
    keep: bool,
) -> Result<SyntheticReport> {
    if steps == 0 || prompt == 0 {
        bail!("--synthetic needs a prompt and at least one decode step");
    }
    let path = kvmerger_models::cache_dir().join("synthetic").join(format!("{shape}.gguf"));
    let generated = Generated { path: path.clone(), keep };
    let file_bytes = match std::fs::metadata(&path) {
        Ok(meta) => {
            eprintln!("reusing {} (kept by an earlier --keep)", path.display());
            meta.len()
        }
        Err(_) => {
            eprintln!("writing a random {shape} GGUF to {}", path.display());
            let start = Instant::now();
            let bytes = generate(python, shape, &path)?;
            eprintln!("written: {bytes} bytes in {:.0} s", start.elapsed().as_secs_f64());
            bytes
        }
    };
    let start = Instant::now();
    let loaded = source.load(&path, WeightFormats::default())?;
    let load_s = start.elapsed().as_secs_f64();
    let text = "Call me Ishmael. Some years ago, never mind how long precisely, having little \
                or no money in my purse, I thought I would sail about a little. "
        .repeat(prompt.div_ceil(16));
    let tokens = loaded.tokenizer.encode(&text, true)?;
    if tokens.len() < prompt || prompt + steps > loaded.model.config.context_length {
        bail!("a prompt of {prompt} tokens and {steps} steps does not fit this model");
    }
    let mut session = Session::new(&loaded.model, &CompressionConfig::Full)?;
    let start = Instant::now();
    let mut logits = session.prefill(&tokens[..prompt])?;
    let prefill_s = start.elapsed().as_secs_f64();
    let start = Instant::now();
    for _ in 0..steps {
        logits = session.step(argmax(&logits))?;
    }
    let decode_s = start.elapsed().as_secs_f64();
    if !logits.iter().all(|v| v.is_finite()) {
        bail!("the synthetic model's logits are not finite");
    }
    let report = SyntheticReport {
        shape: shape.to_string(),
        file_bytes,
        weight_bytes: loaded.model.weight_bytes(),
        kv_bytes: session.cache().resident_bytes(),
        peak_rss_bytes: crate::peak_rss::peak_rss_bytes()
            .context("peak RSS is read from /proc/self/status, which only Linux has")?,
        load_s,
        prompt_tokens: prompt,
        prefill_s,
        decode_steps: steps,
        decode_ms_per_token: decode_s * 1e3 / steps as f64,
    };
    drop(generated);
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", report.table())?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

    /// The tiny shape through the same script: the loader accepts it with the shapes and
    /// block types asked for, holds no more than the file's bytes, and decodes to finite
    /// logits. Skips (saying why) where python3 lacks numpy or gguf.
    #[test]
    fn the_generator_writes_a_file_the_loader_runs() {
        let dir = std::env::temp_dir().join(format!("kvmerger-synthetic-{}", std::process::id()));
        let path = dir.join("tiny.gguf");
        let bytes = match generate("python3", "tiny", &path) {
            Ok(bytes) => bytes,
            Err(e) if e.to_string().contains("pip install") => {
                eprintln!("SKIPPED the synthetic GGUF check: {e}");
                return;
            }
            Err(e) => panic!("{e:#}"),
        };
        let (content, _) = kvmerger_engine::read_gguf_header(&path).unwrap();
        let dtype = |name: &str| content.tensor_infos[name].ggml_dtype;
        assert_eq!(dtype("blk.1.attn_q.weight"), GgmlDType::Q4K);
        assert_eq!(dtype("output.weight"), GgmlDType::Q6K);
        // llama.cpp's Q4_K_M rule for 8 layers: the first and last eighth (layers 0 and 7)
        // and every third from the second eighth on (layers 3 and 6) get more bits.
        for layer in 0..8 {
            let more = if [0, 3, 6, 7].contains(&layer) { GgmlDType::Q6K } else { GgmlDType::Q4K };
            assert_eq!(dtype(&format!("blk.{layer}.attn_v.weight")), more, "layer {layer}");
            assert_eq!(dtype(&format!("blk.{layer}.ffn_down.weight")), more, "layer {layer}");
        }
        let loaded = kvmerger_models::load_model(&path, WeightFormats::default()).unwrap();
        let c = &loaded.model.config;
        let shape = (c.n_layers, c.hidden_size, c.n_heads, c.n_kv_heads, c.intermediate_size);
        assert_eq!(shape, (8, 256, 4, 2, 512));
        assert_eq!((c.vocab_size, loaded.tokenizer.vocab_size()), (512, 512));
        let weights = loaded.model.weight_bytes() as u64;
        assert!(weights <= bytes && weights * 10 >= bytes * 9, "{weights} of {bytes}");
        let mut session = Session::new(&loaded.model, &CompressionConfig::Full).unwrap();
        let tokens = loaded.tokenizer.encode("Call me Ishmael.", true).unwrap();
        let logits = session.prefill(&tokens).unwrap();
        let logits = session.step(argmax(&logits)).unwrap();
        assert_eq!(logits.len(), 512);
        assert!(logits.iter().all(|v| v.is_finite()));
        let (low, high) =
            logits.iter().fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
        assert!(high - low > 1e-2, "random weights give logits that differ: {low}..{high}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
