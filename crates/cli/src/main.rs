//! `kvmerger`: run, compare and analyse KV-cache compression on Llama-family models.

mod args;
mod bench;
mod generate;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "kvmerger", version, about = "KV-cache compression (KVMerger, H2O, CaM, StreamingLLM, SnapKV) on Llama-family models")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt under a compression method.
    Generate(generate::GenerateArgs),
    /// Measure prefill and decode speed against candle-transformers' quantized_llama.
    Bench(bench::BenchArgs),
    /// Download the default model (and the default haystack corpus) if missing.
    Fetch,
}

fn main() {
    let cli = Cli::parse();
    let result: Result<()> = match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Fetch => fetch(),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn fetch() -> Result<()> {
    let path = kvmerger_engine::fetch::ensure_default_model()?;
    println!("model: {}", path.display());
    Ok(())
}
