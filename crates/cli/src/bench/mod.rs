//! `kvmerger bench`: prefill and decode speed of our engine against candle-transformers'
//! `quantized_llama` on the same GGUF file, dequantized, full cache, in the same run.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama;
use clap::Args;
use kvmerger_compress::CompressionConfig;
use kvmerger_engine::{load_model, Session, WeightFormat, WeightFormats};
use serde::Serialize;

use crate::args::ModelSource;

mod breakdown;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The model (a GGUF file: the reference reads nothing else) and threads.
    #[command(flatten)]
    pub source: ModelSource,
    /// Prompt lengths to measure.
    #[arg(long, value_delimiter = ',', default_values_t = vec![512, 2048, 4080])]
    pub lengths: Vec<usize>,
    /// Decode steps (generated tokens) timed after each prefill.
    #[arg(short = 'n', long, default_value_t = 16, value_name = "N")]
    pub decode_tokens: usize,
    /// Also write the figures as JSON here.
    #[arg(long, default_value = "results/bench.json", value_name = "FILE")]
    pub out: PathBuf,
    /// Skip candle-transformers (ours only).
    #[arg(long)]
    pub no_reference: bool,
    #[command(flatten)]
    pub breakdown: breakdown::BreakdownArgs,
}

#[derive(Debug, Serialize)]
struct Row {
    engine: String,
    tokens: usize,
    prefill_s: f64,
    prefill_tok_s: f64,
    decode_ms_per_token: f64,
}

pub fn run(args: BenchArgs) -> Result<()> {
    let path = args.source.prepare()?;
    if path.is_dir() {
        bail!("bench compares against quantized_llama, which reads GGUF files only");
    }
    if args.breakdown.breakdown || args.breakdown.busy_cores > 0 {
        return breakdown::run(&args.breakdown, &path, &args.lengths, args.decode_tokens);
    }
    let f32_only = WeightFormats { prefill: WeightFormat::F32, decode: WeightFormat::F32 };
    let file_format = WeightFormats { prefill: WeightFormat::F32, decode: WeightFormat::Quantized };
    let ours_f32 = load_model(&path, f32_only)?;
    let ours_file = load_model(&path, file_format)?;
    let q8 = WeightFormats { prefill: WeightFormat::F32, decode: WeightFormat::Q8 };
    let ours_q8 = load_model(&path, q8)?;
    let ours_kernel = load_model(&path, WeightFormats::default())?;
    let text =
        "The quick brown fox jumps over the lazy dog while the river runs past the old mill. "
            .repeat(800);
    let all_tokens = ours_f32.tokenizer.encode(&text, false)?;
    let mut rows = Vec::new();
    for &n in &args.lengths {
        if n + args.decode_tokens > ours_f32.model.config.context_length || n > all_tokens.len() {
            bail!(
                "length {n} plus {} decode steps exceeds the context or the sample text",
                args.decode_tokens
            );
        }
        let tokens = &all_tokens[..n];
        let variants = [
            ("kvmerger f32", &ours_f32),
            ("kvmerger f32 prefill + file-format (Q4_1) decode", &ours_file),
            ("kvmerger f32 prefill + Q8_0 decode", &ours_q8),
            ("kvmerger f32 prefill + file blocks on our kernel decode (default)", &ours_kernel),
        ];
        for (name, loaded) in variants {
            let mut session = Session::new(&loaded.model, &CompressionConfig::Full)?;
            let start = Instant::now();
            let mut logits = session.prefill(tokens)?;
            let prefill = start.elapsed().as_secs_f64();
            let start = Instant::now();
            for _ in 0..args.decode_tokens {
                let next = kvmerger_engine::argmax(&logits);
                logits = session.extend(&[next], kvmerger_engine::Logits::Last)?.swap_remove(0);
            }
            let decode = start.elapsed().as_secs_f64() / args.decode_tokens as f64;
            rows.push(row(name, n, prefill, decode));
        }
        if !args.no_reference {
            let (prefill, decode) = bench_reference(&path, tokens, args.decode_tokens)?;
            rows.push(row(
                "candle-transformers quantized_llama (dequantized f32)",
                n,
                prefill,
                decode,
            ));
        }
        print_table(&rows)?;
    }
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&rows)?)
        .with_context(|| format!("writing {}", args.out.display()))?;
    writeln!(std::io::stdout(), "\nwritten to {}", args.out.display())?;
    Ok(())
}

fn row(engine: &str, tokens: usize, prefill_s: f64, decode_s: f64) -> Row {
    Row {
        engine: engine.to_string(),
        tokens,
        prefill_s,
        prefill_tok_s: tokens as f64 / prefill_s,
        decode_ms_per_token: decode_s * 1e3,
    }
}

fn bench_reference(path: &std::path::Path, tokens: &[u32], steps: usize) -> Result<(f64, f64)> {
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

fn print_table(rows: &[Row]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "\n| engine | tokens | prefill s | prefill tok/s | decode ms/token | prefill vs reference | decode vs reference |")?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|---:|")?;
    for r in rows {
        let reference = rows
            .iter()
            .find(|x| x.tokens == r.tokens && x.engine.starts_with("candle-transformers"));
        let (p, d) = match reference {
            Some(x) => (
                format!("{:.2}x", r.prefill_tok_s / x.prefill_tok_s),
                format!("{:.2}x", x.decode_ms_per_token / r.decode_ms_per_token),
            ),
            None => ("-".into(), "-".into()),
        };
        writeln!(
            out,
            "| {} | {} | {:.2} | {:.1} | {:.1} | {p} | {d} |",
            r.engine, r.tokens, r.prefill_s, r.prefill_tok_s, r.decode_ms_per_token
        )?;
    }
    Ok(())
}
