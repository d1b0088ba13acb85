//! `kvmerger generate`: one prompt, one method, streamed output and speed.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use kvmerger_engine::chat::ChatMessage;
use kvmerger_engine::{Sampler, SamplingConfig, Session};

use crate::args::{MethodArgs, ModelArgs};

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub method: MethodArgs,
    /// The prompt text.
    #[arg(long, conflicts_with = "prompt_file")]
    pub prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    pub chat: bool,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print per-layer compression statistics.
    #[arg(long)]
    pub stats: bool,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let text = match (&args.prompt, &args.prompt_file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        }
        (None, None) => bail!("give a prompt with --prompt or --prompt-file"),
    };
    if text.trim().is_empty() {
        bail!("the prompt is empty");
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) || args.temperature < 0.0 {
        bail!("--top-p must be in (0, 1] and --temperature at least 0");
    }
    let method = args.method.config()?;
    let loaded = args.model.load()?;
    let prompt = if args.chat {
        loaded.chat_template()?.render(&[ChatMessage::user(&text)], true)?
    } else {
        text
    };
    let tokens = loaded.tokenizer.encode(&prompt, true)?;
    let context = loaded.model.config.context_length;
    if tokens.len() + 1 > context {
        bail!("the prompt has {} tokens but the model's context is {context}", tokens.len());
    }
    let mut session = Session::new(&loaded.model, &method)?;
    let logits = session.prefill(&tokens)?;
    let mut sampler = Sampler::new(SamplingConfig {
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
    });
    let mut decoder = loaded.tokenizer.stream_decoder();
    let stop = loaded.tokenizer.eos_ids();
    let mut stdout = std::io::stdout();
    let max_tokens = args.max_tokens.min(context - tokens.len());
    session.generate(logits, max_tokens, &mut sampler, &stop, |id| {
        if !stop.contains(&id) {
            if let Ok(Some(piece)) = decoder.push(id) {
                let _ = write!(stdout, "{piece}");
                let _ = stdout.flush();
            }
        }
        true
    })?;
    println!();
    let t = session.timings;
    eprintln!(
        "\n{}: prompt {} tokens, prefill {:.1} tokens/s ({:.2} s), decode {:.1} tokens/s ({} tokens), weights {:.0} MiB",
        method.label(),
        tokens.len(),
        t.prefill_tokens_per_s(),
        t.prefill.as_secs_f64(),
        t.decode_tokens_per_s(),
        t.decode_tokens,
        loaded.model.weight_bytes() as f64 / (1 << 20) as f64
    );
    if let Some(report) = session.report() {
        eprintln!(
            "kv cache after the prompt: {} entries kept of {} ({:.1}%), {:.2} MiB resident, compression {:.1} ms",
            report.kept_entries(),
            report.prompt_len * loaded.model.config.n_layers * loaded.model.config.n_kv_heads,
            100.0 * report.achieved_ratio(),
            report.resident_bytes as f64 / (1 << 20) as f64,
            report.compress_ms
        );
        if args.stats {
            print_stats(report);
        }
    }
    Ok(())
}

fn print_stats(report: &kvmerger_engine::CompressionReport) {
    eprintln!(
        "{:>5} {:>8} {:>10} {:>10} {:>12} {:>8}",
        "layer", "budget", "kept", "ratio", "merge sets", "largest"
    );
    for (layer, heads) in report.heads.iter().enumerate() {
        let kept: Vec<String> = heads.iter().map(|h| h.after.to_string()).collect();
        let sets: usize = heads.iter().map(|h| h.merge_sets).sum();
        let largest = heads.iter().map(|h| h.largest_set).max().unwrap_or(0);
        eprintln!(
            "{layer:>5} {:>8} {:>10} {:>9.1}% {sets:>12} {largest:>8}",
            report.budgets[layer],
            kept.join("/"),
            100.0 * report.layer_ratio(layer)
        );
    }
}
