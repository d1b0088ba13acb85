//! `kvmerger`: run, compare and analyse KV-cache compression on Llama-family models.

mod analyze;
mod args;
mod bench;
mod eval;
mod generate;
mod methods;

use std::io::Write;
use std::path::PathBuf;

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
    /// List every method with its parameters and their defaults.
    Methods(methods::MethodsArgs),
    /// Download the default model and the default haystack corpus if missing.
    Fetch {
        /// Only the model (the tests need no corpus).
        #[arg(long)]
        model_only: bool,
        /// Folder to put the model in. Default: the cache folder ($KVMERGER_CACHE, else
        /// $XDG_CACHE_HOME/kvmerger, else ~/.cache/kvmerger), where the other commands look.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
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
        Command::Methods(a) => methods::run(a),
        Command::Fetch { model_only, out } => fetch(model_only, out),
    };
    if let Err(e) = result {
        // A reader that closed our output early (`| head`) is not an error, as in other tools.
        if is_broken_pipe(&e) {
            std::process::exit(0);
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn fetch(model_only: bool, out: Option<PathBuf>) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    let path = match out {
        Some(dir) => {
            let path = dir.join(kvmerger_engine::fetch::DEFAULT_MODEL_FILE);
            if !path.exists() {
                kvmerger_engine::fetch::fetch_default_model(&dir)?;
            }
            path
        }
        None => kvmerger_engine::fetch::ensure_default_model()?,
    };
    writeln!(stdout, "model: {}", path.display())?;
    if model_only {
        return Ok(());
    }
    let corpus = kvmerger_eval::corpus::ensure_default_corpus()?;
    writeln!(stdout, "haystack corpus: {}", corpus.display())?;
    Ok(())
}
