//! `kvmerger`: run, compare and analyse KV-cache compression on Llama-family models.

mod allocator;
mod analyze;
mod args;
mod bench;
mod eval;
mod generate;
mod methods;
mod peak_rss;
mod serve;

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
    /// Print what the run uses before it starts (the kernel level, see
    /// KVMERGER_KERNEL_LEVEL).
    #[arg(short, long, global = true)]
    verbose: bool,
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
    /// List every method with its parameters and their defaults.
    Methods(methods::MethodsArgs),
    /// List the kernel levels this CPU runs, lowest first, one a line (the values of
    /// KVMERGER_KERNEL_LEVEL, which caps the level the kernels dispatch to).
    Kernels,
    /// Download the default model and the default haystack corpus if missing.
    Fetch {
        /// Only the model (the tests need no corpus).
        #[arg(long)]
        model_only: bool,
        /// A known model to fetch instead of the default (smollm2-135m, qwen2.5-coder-0.5b,
        /// qwen2.5-coder-1.5b, gemma3-270m).
        #[arg(short = 'm', long, value_name = "NAME")]
        model: Option<String>,
        /// Folder to put the model in. Default: the cache folder ($KVMERGER_CACHE, else
        /// $XDG_CACHE_HOME/kvmerger, else ~/.cache/kvmerger), where the other commands look.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
}

fn kernels() -> Result<()> {
    for level in kvmerger_engine::KernelLevel::supported() {
        println!("{level}");
    }
    Ok(())
}

fn main() {
    allocator::return_large_blocks_when_freed();
    let cli = Cli::parse();
    // A cap that names no level is refused before any kernel runs, not silently ignored.
    if let Err(e) = kvmerger_engine::KernelLevel::cap_from_env() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
    if cli.verbose {
        eprintln!("{}", kvmerger_engine::kernel_report());
    }
    let result: Result<()> = match cli.command {
        Command::Eval(a) => eval::run(a),
        Command::Report(a) => eval::report(a),
        Command::Generate(a) => generate::run(a),
        Command::Analyze(a) => analyze::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Methods(a) => methods::run(a),
        Command::Kernels => kernels(),
        Command::Fetch { model_only, model, out } => fetch(model_only, model, out),
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

fn fetch(model_only: bool, model: Option<String>, out: Option<PathBuf>) -> Result<()> {
    use kvmerger_models::{
        default_model, ensure_known_model, known_model, known_model_names, resolve_model,
    };
    let mut stdout = std::io::stdout().lock();
    let path = match out {
        Some(dir) => {
            let known = match model.as_deref() {
                Some(name) => known_model(name).ok_or_else(|| {
                    anyhow::anyhow!("unknown model `{name}`; known: {}", known_model_names())
                })?,
                None => default_model(),
            };
            ensure_known_model(known, &dir)?
        }
        None => resolve_model(model.as_deref().map(std::path::Path::new))?,
    };
    writeln!(stdout, "model: {}", path.display())?;
    if model_only {
        return Ok(());
    }
    let corpus = kvmerger_eval::corpus::ensure_default_corpus()?;
    writeln!(stdout, "haystack corpus: {}", corpus.display())?;
    Ok(())
}
