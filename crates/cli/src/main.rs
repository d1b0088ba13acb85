//! `kvmerger`: run, compare and analyse KV-cache compression on Llama-family models.

mod analyze;
mod args;
mod bench;
mod eval;
mod generate;
mod serve;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "kvmerger",
    version,
    about = "KV-cache compression (KVMerger, H2O, CaM, StreamingLLM, SnapKV) on Llama-family models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compare every method with the full cache at the same budgets (the main job).
    Eval(eval::EvalArgs),
    /// Merge result shards and write the report.
    Report(eval::ReportArgs),
    /// Generate text from a prompt under a compression method.
    Generate(generate::GenerateArgs),
    /// Key similarity and per-layer merge ratios of a model across texts (the paper's observations).
    Analyze(analyze::AnalyzeArgs),
    /// Measure prefill and decode speed against candle-transformers' quantized_llama.
    Bench(bench::BenchArgs),
    /// Serve the model over an OpenAI-compatible HTTP API with per-request compression.
    Serve(serve::ServeArgs),
    /// Download the default model and the default haystack corpus if missing.
    Fetch {
        /// Only the model (the tests need no corpus).
        #[arg(long)]
        model_only: bool,
        /// A known model to fetch instead of the default (smollm2-135m, qwen2.5-coder-0.5b).
        #[arg(long)]
        model: Option<std::path::PathBuf>,
    },
}

fn main() {
    let cli = Cli::parse();
    let result: Result<()> = match cli.command {
        Command::Eval(a) => eval::run(a),
        Command::Report(a) => eval::report(a),
        Command::Generate(a) => generate::run(a),
        Command::Analyze(a) => analyze::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Fetch { model_only, model } => fetch(model_only, model),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn fetch(model_only: bool, model: Option<std::path::PathBuf>) -> Result<()> {
    let path = kvmerger_engine::fetch::resolve_model(model.as_deref())?;
    println!("model: {}", path.display());
    if model_only {
        return Ok(());
    }
    let corpus = kvmerger_eval::corpus::ensure_default_corpus()?;
    println!("haystack corpus: {}", corpus.display());
    Ok(())
}
