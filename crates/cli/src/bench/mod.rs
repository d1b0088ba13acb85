//! `kvmerger bench`: end-to-end speed, printed as Markdown tables with ratios and written as
//! JSON and Markdown.
//!
//! - Engines: prefill and decode of our engine in each decode weight format against
//!   llama.cpp (through `llama-cpp-python`, when importable) and candle-transformers'
//!   `quantized_llama`, on the same GGUF file and token ids, full cache.
//! - Compressed decode ([`compressed`]): a budget against the full cache at long contexts.
//! - A big file ([`synthetic`], `--synthetic llama-8b`): peak memory and speed on a generated
//!   8B-shaped GGUF.

mod compressed;
mod llama_cpp;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama;
use clap::Args;
use kvmerger_compress::{Budget, CompressionConfig};
use kvmerger_engine::{PrefillOptions, Session, WeightFormat, WeightFormats};
use serde::Serialize;

use crate::args::{MaxKvArgs, ModelSource, PrefillArgs};

mod breakdown;
mod kv_dtypes;
mod synthetic;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The model (a GGUF file: the references read nothing else) and threads.
    #[command(flatten)]
    pub source: ModelSource,
    /// Prompt lengths of the engine comparison (full cache); empty skips it.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_values_t = vec![512, 2048, 4080])]
    pub lengths: Vec<usize>,
    /// Prompt lengths of the compressed-decode comparison; empty skips it.
    #[arg(long, value_delimiter = ',', num_args = 0.., default_values_t = vec![4096, 8000])]
    pub compressed_lengths: Vec<usize>,
    /// Methods compared with the full cache at `--budget` in the compressed-decode part.
    #[arg(long, value_delimiter = ',', default_values_t = vec!["kvmerger".to_string(), "h2o".to_string()])]
    pub methods: Vec<String>,
    /// Budget of the compressed-decode part.
    #[arg(long, default_value = "0.35")]
    pub budget: Budget,
    /// Decode steps (generated tokens) timed after each prefill.
    #[arg(short = 'n', long, default_value_t = 16, value_name = "N")]
    pub decode_tokens: usize,
    /// Writes the figures as JSON here, and the tables next to it as Markdown (`.md`).
    #[arg(long, default_value = "results/bench.json", value_name = "FILE")]
    pub out: PathBuf,
    /// Skip candle-transformers' quantized_llama.
    #[arg(long)]
    pub no_reference: bool,
    /// Skip llama.cpp.
    #[arg(long)]
    pub no_llama_cpp: bool,
    /// KV dtypes whose full-cache decode is compared (ours and llama.cpp's, default weight
    /// formats) at `--kv-dtype-lengths`; empty skips it.
    #[arg(long, value_delimiter = ',', num_args = 0.., value_name = "DTYPES")]
    pub kv_dtypes: Vec<kvmerger_compress::KvDtype>,
    /// Prompt lengths of the KV dtype comparison.
    #[arg(long, value_delimiter = ',', default_values_t = vec![4096])]
    pub kv_dtype_lengths: Vec<usize>,
    /// The Python that imports `llama_cpp`.
    #[arg(long, default_value = "python3")]
    pub python: String,
    #[command(flatten)]
    pub prefill: PrefillArgs,
    /// Bounds the compressed methods' caches while decoding (not the full cache's).
    #[command(flatten)]
    pub max_kv: MaxKvArgs,
    #[command(flatten)]
    pub breakdown: breakdown::BreakdownArgs,
    /// Instead of comparing engines, write a random-weight GGUF of this shape into the cache
    /// folder (`llama-8b`: Llama-3-8B in a Q4_K_M file's block types, about 4.9 GB; `tiny`),
    /// load it, prefill `--synthetic-prompt` tokens, decode `-n` steps, and report peak RSS
    /// against the file's bytes plus the KV cache's. Needs python3 with numpy and gguf.
    #[arg(long, value_name = "SHAPE")]
    pub synthetic: Option<String>,
    /// Prompt tokens of the `--synthetic` run.
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub synthetic_prompt: usize,
    /// Keep the `--synthetic` file in the cache folder (the next run reuses it).
    #[arg(long)]
    pub keep: bool,
}

#[derive(Debug, Serialize)]
struct EngineRow {
    engine: String,
    tokens: usize,
    prefill_s: f64,
    prefill_tok_s: f64,
    decode_ms_per_token: f64,
}

const LLAMA_CPP: &str = "llama.cpp (llama-cpp-python 0.3.36, file format, f16 KV cache)";
const CANDLE: &str = "candle-transformers quantized_llama (dequantized f32)";
/// Positions of quantized_llama's rotary table (its `MAX_SEQ_LEN`).
const CANDLE_POSITIONS: usize = 4096;

pub fn run(args: BenchArgs) -> Result<()> {
    if let Some(shape) = &args.synthetic {
        crate::args::set_threads(args.source.threads)?;
        let report = synthetic::run(
            &args.source,
            &args.python,
            shape,
            args.synthetic_prompt,
            args.decode_tokens,
            args.keep,
        )?;
        let kernels = kvmerger_engine::kernel_report();
        let threads = rayon::current_num_threads();
        let markdown = format!("{threads} threads; {kernels}\n\n{}", report.table());
        let json = serde_json::json!({
            "kernel_level": kvmerger_engine::KernelLevel::active().name(),
            "threads": threads,
            "synthetic": report,
            "rss_ratio": report.rss_ratio(),
        });
        return write_outputs(&args.out, &json, &markdown);
    }
    let path = args.source.prepare()?;
    if path.is_dir() {
        bail!("bench compares against llama.cpp and quantized_llama, which read GGUF files only");
    }
    if args.breakdown.breakdown || args.breakdown.busy_cores > 0 {
        return breakdown::run(
            &args.breakdown,
            &args.source,
            &path,
            &args.lengths,
            args.decode_tokens,
            args.budget,
        );
    }
    let default_formats = WeightFormats {
        prefill: WeightFormats::default().prefill,
        decode: kvmerger_models::decode_format_for(&path),
    };
    // f32 decode keeps f32 prefill (the exact reference); the others prefill in the default.
    // The default comes first: it is loaded once for the tokens and measured first.
    let variants: Vec<(String, WeightFormats)> =
        [WeightFormat::File, WeightFormat::Q8, WeightFormat::Quantized, WeightFormat::F32]
            .into_iter()
            .map(|decode| {
                let prefill = match decode {
                    WeightFormat::F32 => WeightFormat::F32,
                    _ => default_formats.prefill,
                };
                let formats = WeightFormats { prefill, decode };
                let default = if formats == default_formats { ", default" } else { "" };
                let name = |f: WeightFormat| format!("{f:?}").to_lowercase();
                let label = format!("{} prefill, {} decode weights", name(prefill), name(decode));
                (format!("kvmerger, {label}{default}"), formats)
            })
            .collect();
    let mut first = Some(args.source.load(&path, default_formats)?);
    let model = first.as_ref().expect("just loaded");
    let context = model.model.config.context_length;
    let text =
        "The quick brown fox jumps over the lazy dog while the river runs past the old mill. "
            .repeat(1000);
    let tokens = model.tokenizer.encode(&text, false)?;
    let dtype_lengths: &[usize] =
        if args.kv_dtypes.is_empty() { &[] } else { &args.kv_dtype_lengths };
    let longest = args.lengths.iter().chain(&args.compressed_lengths).chain(dtype_lengths);
    let longest = longest.max().copied().unwrap_or(0);
    if longest + args.decode_tokens > context.min(tokens.len()) {
        bail!(
            "length {longest} plus {} decode steps exceeds the context ({context}) or the sample \
             text ({} tokens)",
            args.decode_tokens,
            tokens.len()
        );
    }
    if args.decode_tokens == 0 {
        bail!("--decode-tokens must be at least 1");
    }
    let prefill = args.prefill.options()?;
    let max_kv = args.max_kv.bound()?;

    let mut rows = Vec::new();
    if !args.lengths.is_empty() {
        // llama.cpp first and our default next: the ratio that matters is measured back to
        // back, before the machine can drift far.
        if !args.no_llama_cpp {
            let threads = rayon::current_num_threads();
            let measured = llama_cpp::measure(
                &args.python,
                &path,
                threads,
                &args.lengths,
                args.decode_tokens,
                &tokens,
                None,
            )?;
            for m in measured.into_iter().flatten() {
                rows.push(engine_row(LLAMA_CPP, m.tokens, m.prefill_s, m.decode_s));
            }
        }
        // One variant in memory at a time (an f32 copy of a 1.5B model is 6 GB by itself),
        // each measured at every length after an untimed warm-up.
        for (name, formats) in &variants {
            let loaded = match first.take() {
                Some(loaded) if loaded.model.formats == *formats => loaded,
                _ => args.source.load(&path, *formats)?,
            };
            warm_up(&loaded.model, &tokens, prefill)?;
            for &n in &args.lengths {
                let (prefill, decode) =
                    bench_ours(&loaded.model, &tokens[..n], args.decode_tokens, prefill)?;
                rows.push(engine_row(name, n, prefill, decode));
            }
            println!("{}", engine_table(&rows));
        }
        for &n in &args.lengths {
            if !args.no_reference && n + args.decode_tokens > CANDLE_POSITIONS {
                eprintln!(
                    "candle-transformers: not measured at {n} tokens plus {} decode steps \
                     (its rotary table stops at {CANDLE_POSITIONS} positions)",
                    args.decode_tokens
                );
            } else if !args.no_reference {
                let (prefill, decode) = bench_candle(&path, &tokens[..n], args.decode_tokens)?;
                rows.push(engine_row(CANDLE, n, prefill, decode));
            }
        }
    }
    let kernels = kvmerger_engine::kernel_report();
    let mut markdown = format!("{} threads; {kernels}\n\n", rayon::current_num_threads());
    if !rows.is_empty() {
        rows.sort_by_key(|r| r.tokens);
        markdown += &format!("## Engines, full cache\n\n{}\n", engine_table(&rows));
    }

    let mut compressed_rows = Vec::new();
    if !args.compressed_lengths.is_empty() {
        let loaded = match first.take() {
            Some(loaded) => loaded,
            None => args.source.load(&path, default_formats)?,
        };
        let mut configs = vec![CompressionConfig::Full];
        for method in &args.methods {
            configs.push(CompressionConfig::from_cli(method, Some(args.budget), &[])?);
        }
        for &n in &args.compressed_lengths {
            compressed_rows.extend(compressed::measure(
                &loaded.model,
                &tokens[..n],
                &configs,
                args.decode_tokens,
                prefill,
                max_kv,
            )?);
            println!("{}", compressed::table(&compressed_rows));
        }
        markdown += &format!(
            "## Decode over a compressed cache, {:?} decode weights\n\n{}",
            default_formats.decode,
            compressed::table(&compressed_rows)
        );
    }

    let mut dtype_rows = Vec::new();
    if !args.kv_dtypes.is_empty() {
        let python = (!args.no_llama_cpp).then_some(args.python.as_str());
        dtype_rows = kv_dtypes::measure(
            &args.source,
            &path,
            default_formats,
            &args.kv_dtypes,
            dtype_lengths,
            args.decode_tokens,
            &tokens,
            python,
        )?;
        markdown += &format!(
            "\n## Decode over a full cache in each KV dtype, {:?} decode weights\n\n{}",
            default_formats.decode,
            kv_dtypes::table(&dtype_rows)
        );
    }

    println!("\n{markdown}");
    let json = serde_json::json!({
        "kernel_level": kvmerger_engine::KernelLevel::active().name(),
        "kernels": kernels,
        "threads": rayon::current_num_threads(),
        "engines": rows,
        "compressed": compressed_rows,
        "kv_dtypes": dtype_rows,
    });
    write_outputs(&args.out, &json, &markdown)
}

/// Writes `json` to `out` and `markdown` next to it (`.md`).
fn write_outputs(out: &Path, json: &serde_json::Value, markdown: &str) -> Result<()> {
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(out, serde_json::to_string_pretty(json)?)
        .with_context(|| format!("writing {}", out.display()))?;
    let md = out.with_extension("md");
    std::fs::write(&md, markdown).with_context(|| format!("writing {}", md.display()))?;
    println!("written to {} and {}", out.display(), md.display());
    Ok(())
}

fn engine_row(engine: &str, tokens: usize, prefill_s: f64, decode_s: f64) -> EngineRow {
    EngineRow {
        engine: engine.to_string(),
        tokens,
        prefill_s,
        prefill_tok_s: tokens as f64 / prefill_s,
        decode_ms_per_token: decode_s * 1e3,
    }
}

/// One short untimed prefill and decode: the first pass of a process pays for page faults
/// and starting the thread pools, which would otherwise land on whichever row runs first.
fn warm_up(model: &kvmerger_engine::Llama, tokens: &[u32], prefill: PrefillOptions) -> Result<()> {
    bench_ours(model, &tokens[..tokens.len().min(64)], 2, prefill).map(|_| ())
}

/// Prefill of `tokens`, then seconds per greedy decode step over `steps` steps.
fn bench_ours(
    model: &kvmerger_engine::Llama,
    tokens: &[u32],
    steps: usize,
    prefill: PrefillOptions,
) -> Result<(f64, f64)> {
    let mut session = Session::new(model, &CompressionConfig::Full)?.with_options(prefill);
    let (logits, prefill) = timed_prefill(&mut session, tokens)?;
    Ok((prefill, timed_decode(&mut session, logits, steps)?))
}

/// Prefills `tokens` (compression included); returns the last logits and the seconds taken.
fn timed_prefill(session: &mut Session, tokens: &[u32]) -> Result<(Vec<f32>, f64)> {
    let start = Instant::now();
    let logits = session.prefill(tokens)?;
    Ok((logits, start.elapsed().as_secs_f64()))
}

/// Seconds per greedy decode step over `steps` steps after `logits`.
fn timed_decode(session: &mut Session, mut logits: Vec<f32>, steps: usize) -> Result<f64> {
    let start = Instant::now();
    for _ in 0..steps {
        let next = kvmerger_engine::argmax(&logits);
        logits = session.step(next)?;
    }
    Ok(start.elapsed().as_secs_f64() / steps as f64)
}

fn bench_candle(path: &std::path::Path, tokens: &[u32], steps: usize) -> Result<(f64, f64)> {
    // quantized_llama reads this on the loading thread to dequantize every weight to f32.
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    let (content, mut reader) = kvmerger_engine::read_gguf_header(path)?;
    let mut model = quantized_llama::ModelWeights::from_gguf(content, &mut reader, &Device::Cpu)?;
    let input = Tensor::new(tokens, &Device::Cpu)?.unsqueeze(0)?;
    let start = Instant::now();
    let mut logits = model.forward(&input, 0)?;
    let prefill = start.elapsed().as_secs_f64();
    let start = Instant::now();
    for i in 0..steps {
        let next = kvmerger_engine::argmax(&logits.flatten_all()?.to_vec1()?);
        logits =
            model.forward(&Tensor::new(&[next], &Device::Cpu)?.unsqueeze(0)?, tokens.len() + i)?;
    }
    Ok((prefill, start.elapsed().as_secs_f64() / steps as f64))
}

/// Ratios are tokens per second against llama.cpp's at the same length (above 1: faster),
/// or against candle-transformers' where llama.cpp was not measured.
fn engine_table(rows: &[EngineRow]) -> String {
    let mut out = String::from(
        "| engine | tokens | prefill s | prefill tok/s | decode ms/token | decode tok/s | \
         prefill vs llama.cpp | decode vs llama.cpp | prefill vs candle | decode vs candle |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let ratio = |r: &EngineRow, reference: &str| {
        rows.iter().find(|x| x.tokens == r.tokens && x.engine == reference).map_or(
            ["-".to_string(), "-".to_string()],
            |x| {
                [
                    format!("{:.2}x", r.prefill_tok_s / x.prefill_tok_s),
                    format!("{:.2}x", x.decode_ms_per_token / r.decode_ms_per_token),
                ]
            },
        )
    };
    for r in rows {
        let [pl, dl] = ratio(r, LLAMA_CPP);
        let [pc, dc] = ratio(r, CANDLE);
        out += &format!(
            "| {} | {} | {:.2} | {:.1} | {:.1} | {:.1} | {pl} | {dl} | {pc} | {dc} |\n",
            r.engine,
            r.tokens,
            r.prefill_s,
            r.prefill_tok_s,
            r.decode_ms_per_token,
            1e3 / r.decode_ms_per_token,
        );
    }
    out
}
