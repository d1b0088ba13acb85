//! Every supported architecture against llama.cpp. `scripts/llama_cpp_architectures.py`
//! builds a tiny random-weight GGUF of each (Llama 3 RoPE factors, linear RoPE scaling,
//! Mistral, Qwen2, Qwen3, Gemma 3, Phi-3 plain and LongRoPE) and records llama.cpp's logits
//! for every token of a fixed sequence; our logits must match them on both passes
//! (one prefill of the whole sequence; a short prefill then one token per step) in every
//! weight format the engine offers.
//!
//! Each variant comes with F16 and with Q8_0 weights. Tolerances, per token, with
//! `KL(llama.cpp || ours)` in nats and the largest logit difference (the logits have a
//! standard deviation of about 3):
//! - F16 files: KL <= 2e-4, difference <= 0.1. Both sides compute in f32 from the same
//!   f16 weights (llama.cpp rounds activations to f16): the check of the computation.
//! - Q8_0 files: KL <= 2e-2, difference <= 1.0. llama.cpp multiplies Q8_0 blocks by
//!   activations rounded to 8 bits, as our `quantized`, `q8` and `file` formats do in their
//!   own order, while `f32` does not round them; random weights amplify that rounding (our
//!   own f32 and quantized formats differ by as much). This checks that every weight format
//!   reads the file's blocks (and Phi-3's fused tensors, split by rows) right: a misread
//!   block moves logits by whole units.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use kvmerger_engine::testing::kl_divergence;
use kvmerger_engine::testing::{forward, ForwardOptions};
use kvmerger_engine::{load_gguf, Logits, Phase, WeightFormat, WeightFormats};

/// `(max KL, max |logit difference|)` per token, by the file's weight type.
fn tolerance(dtype: &str) -> (f64, f32) {
    match dtype {
        "f16" => (2e-4, 0.1),
        _ => (2e-2, 1.0),
    }
}
/// Tokens prefilled before the decode pass goes one token at a time.
const DECODE_PREFIX: usize = 6;

#[derive(serde::Deserialize)]
struct Variant {
    file: String,
    dtype: String,
    tokens: Vec<u32>,
    vocab: usize,
}

/// Runs the script into a fresh temporary folder; `None` (the test skips, saying why)
/// when python3, numpy, gguf or llama_cpp is missing.
fn generate() -> Option<PathBuf> {
    let dir = std::env::temp_dir().join(format!("kvmerger-architectures-{}", std::process::id()));
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/llama_cpp_architectures.py");
    let skip = |why: String| {
        eprintln!(
            "SKIPPED the llama.cpp comparison: {why}; it needs python3 with numpy, gguf and \
             llama-cpp-python (`pip install numpy gguf llama-cpp-python`)"
        );
        None
    };
    match Command::new("python3").arg(&script).arg(&dir).output() {
        Err(e) => skip(format!("python3 could not be started ({e})")),
        Ok(out) if out.status.code() == Some(3) => {
            skip(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
        Ok(out) => {
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            Some(dir)
        }
    }
}

/// Worst per-token KL and logit difference of `ours` against `theirs`, row by row.
fn compare(ours: &[Vec<f32>], theirs: &[Vec<f32>]) -> (f64, f32) {
    assert_eq!(ours.len(), theirs.len());
    let mut worst = (0.0f64, 0.0f32);
    for (o, t) in ours.iter().zip(theirs) {
        worst.0 = worst.0.max(kl_divergence(t, o));
        let diff = o.iter().zip(t).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        worst.1 = worst.1.max(diff);
    }
    worst
}

#[test]
fn every_architecture_matches_llama_cpp_on_every_pass_and_weight_format() {
    let Some(dir) = generate() else { return };
    let manifest = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
    let variants: Vec<Variant> = serde_json::from_str(&manifest).unwrap();
    assert_eq!(variants.len(), 16, "eight variants, each in F16 and Q8_0");
    let mut failures = Vec::new();
    for v in &variants {
        let bytes = std::fs::read(dir.join(format!("{}.logits", v.file))).unwrap();
        let flat: Vec<f32> =
            bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        let theirs: Vec<Vec<f32>> = flat.chunks_exact(v.vocab).map(<[f32]>::to_vec).collect();
        assert_eq!(theirs.len(), v.tokens.len());
        let spread = theirs[0].iter().fold(0.0f32, |m, x| m.max(x.abs()));
        assert!(spread > 2.0, "{}: logits too flat ({spread}) to tell mistakes apart", v.file);
        let (max_kl, max_abs) = tolerance(&v.dtype);
        let path = dir.join(format!("{}.gguf", v.file));
        for format in
            [WeightFormat::F32, WeightFormat::Quantized, WeightFormat::Q8, WeightFormat::File]
        {
            let formats = WeightFormats { prefill: format, decode: format };
            let (model, _) = load_gguf(&path, formats, &Device::Cpu).unwrap();
            let rows = |t: candle_core::Tensor| t.to_vec2::<f32>().unwrap();
            // One prefill of every token.
            let mut cache = model.new_cache();
            let all = ForwardOptions { logits: Logits::All, ..Default::default() };
            let prefill =
                rows(forward(&model, Phase::Prefill, &v.tokens, &mut cache, all).unwrap());
            // A short prefill, then one token per step.
            let mut cache = model.new_cache();
            let last = ForwardOptions::default();
            let mut decode = rows(
                forward(&model, Phase::Prefill, &v.tokens[..DECODE_PREFIX], &mut cache, last)
                    .unwrap(),
            );
            for &t in &v.tokens[DECODE_PREFIX..] {
                decode
                    .extend(rows(forward(&model, Phase::Decode, &[t], &mut cache, last).unwrap()));
            }
            for (pass, ours, reference) in [
                ("prefill", &prefill[..], &theirs[..]),
                ("decode", &decode[..], &theirs[DECODE_PREFIX - 1..]),
            ] {
                let (kl, diff) = compare(ours, reference);
                eprintln!(
                    "{:<18} {:<10} {pass:<8} max KL {kl:.2e} nats/token, max |logit diff| {diff:.3}",
                    v.file,
                    format!("{format:?}")
                );
                if kl > max_kl || diff > max_abs {
                    failures
                        .push(format!("{} {format:?} {pass}: KL {kl:.2e}, diff {diff:.3}", v.file));
                }
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(failures.is_empty(), "beyond the tolerance:\n{}", failures.join("\n"));
}
