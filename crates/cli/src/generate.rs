//! `kvmerger generate`: one prompt, one method, streamed output and speed.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use kvmerger_compress::Budget;
use kvmerger_engine::{check_prompt_text, RequestLimits, Sampler, Session};
use kvmerger_models::{ChatMessage, ChatTemplate};
use serde_json::json;

use crate::args::{
    flag_error, ContextArgs, MaxKvArgs, MethodArgs, ModelArgs, PrefillArgs, SamplingArgs,
};
use crate::peak_rss::peak_rss_bytes;

/// How often a long prefill says how far it got.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The prompt text.
    #[arg(short = 'p', long, conflicts_with = "prompt_file")]
    pub prompt: Option<String>,
    /// Read the prompt from a file; `-` reads standard input.
    #[arg(short = 'f', long, value_name = "FILE")]
    pub prompt_file: Option<PathBuf>,
    /// Keep only the first N tokens of the prompt (after the chat template, if any): a
    /// long-context run of an exact length from any long text.
    #[arg(long, value_name = "N")]
    pub prompt_tokens: Option<usize>,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub method: MethodArgs,
    #[command(flatten)]
    pub context: ContextArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub prefill: PrefillArgs,
    #[command(flatten)]
    pub max_kv: MaxKvArgs,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    pub chat: bool,
    /// Print per-layer compression statistics.
    #[arg(long)]
    pub stats: bool,
    /// Also write a JSON record of the run here (configuration, output, speed, cache size).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let sampling = args.sampling.config()?;
    let method = args.method.config()?;
    let prefill = args.prefill.options()?;
    let max_kv = args.max_kv.bound()?;
    let text = read_prompt(&args)?;
    check_prompt_text(&text).map_err(flag_error)?;
    let loaded = args.model.load()?;
    let mut prompt = if args.chat {
        ChatTemplate::for_tokenizer(&loaded.tokenizer)?.render(&[ChatMessage::user(&text)], true)?
    } else {
        text
    };
    let mut tokens = loaded.tokenizer.encode(&prompt, true)?;
    match args.prompt_tokens {
        Some(0) => bail!("--prompt-tokens must be at least 1"),
        Some(n) if n > tokens.len() => {
            bail!("--prompt-tokens {n}: the prompt has only {} tokens", tokens.len())
        }
        Some(n) => {
            tokens.truncate(n);
            // The record shows what the model read.
            prompt = loaded.tokenizer.decode(&tokens)?;
        }
        None => {}
    }
    let context = args.context.limit(loaded.model.config.context_length)?;
    let limits = RequestLimits::of(&loaded.model.config, Some(context));
    let max_tokens = args.sampling.max_tokens(&tokens, &limits)?;
    let mut session =
        Session::new(&loaded.model, &method)?.with_options(prefill).with_max_kv(max_kv);
    let started = Instant::now();
    let mut last_line = started;
    let logits = session.prefill_with_progress(&tokens, |done| {
        // A line every few seconds: a long prompt prefills for minutes.
        if last_line.elapsed() >= PROGRESS_EVERY {
            last_line = Instant::now();
            let secs = started.elapsed().as_secs();
            eprintln!("[{secs:>6} s] prefill: {done} of {} prompt tokens", tokens.len());
        }
    })?;
    let mut sampler = Sampler::new(sampling);
    sampler.remember(&tokens);
    let mut decoder = loaded.tokenizer.stream_decoder();
    let stop = loaded.tokenizer.eos_ids();
    let mut stdout = std::io::stdout().lock();
    let mut generated = String::new();
    // A closed stdout (`| head`) stops generation; the error ends the program quietly in main.
    let mut write_error = None;
    let ids = session.generate(logits, max_tokens, &mut sampler, &stop, |id| {
        // A stop token ends generation without reaching here.
        if let Ok(Some(piece)) = decoder.push(id) {
            generated.push_str(&piece);
            if let Err(e) = write!(stdout, "{piece}").and_then(|_| stdout.flush()) {
                write_error = Some(e);
                return false;
            }
        }
        true
    })?;
    if let Some(e) = write_error {
        return Err(e.into());
    }
    writeln!(stdout)?;
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
    let c = &loaded.model.config;
    let peak = session.peak();
    let entry = kvmerger_engine::entry_bytes(c.head_dim, loaded.model.kv_dtype);
    eprintln!(
        "kv cache peak ({} prefill in chunks of {}): {} entries in the fullest head, {:.2} MiB \
         resident (the full prompt's cache: {:.2} MiB)",
        prefill.compression.name(),
        prefill.chunk,
        peak.head_entries,
        peak.resident_bytes as f64 / (1 << 20) as f64,
        (tokens.len() * entry * c.n_layers * c.n_kv_heads) as f64 / (1 << 20) as f64
    );
    let peak_rss = peak_rss_bytes();
    if let Some(bytes) = peak_rss {
        eprintln!("process peak resident memory: {:.1} MiB", bytes as f64 / (1 << 20) as f64);
    }
    let cache = session.report().map(|report| {
        let total = report.prompt_len * c.n_layers * c.n_kv_heads;
        eprintln!(
            "kv cache after the prompt: {} entries kept of {total} ({:.1}%), {:.2} MiB resident, compression {:.1} ms",
            report.kept_entries(),
            100.0 * report.achieved_ratio(),
            report.resident_bytes as f64 / (1 << 20) as f64,
            report.compress_ms
        );
        if args.stats {
            print_stats(report);
        }
        json!({
            "entries_kept": report.kept_entries(),
            "entries_total": total,
            "achieved_ratio": report.achieved_ratio(),
            "resident_bytes": report.resident_bytes,
            "compress_ms": report.compress_ms,
            "clamped_heads": report.clamped_heads(),
            "layer_budgets": report.budgets.iter().map(|&b| shown_bound(b)).collect::<Vec<_>>(),
        })
    });
    if let Some(path) = &args.out {
        let record = json!({
            "model": loaded.path.file_name().unwrap_or_default().to_string_lossy(),
            "weights": loaded.model.formats,
            "method": method,
            "label": method.label(),
            "sampling": sampling,
            "chat": args.chat,
            "prompt": prompt,
            "prompt_tokens": tokens.len(),
            "output": generated,
            "output_tokens": ids.len(),
            "prefill_s": t.prefill.as_secs_f64(),
            "prefill_tokens_per_s": t.prefill_tokens_per_s(),
            "decode_tokens_per_s": t.decode_tokens_per_s(),
            "prefill_compression": prefill.compression.name(),
            "prefill_chunk": prefill.chunk,
            "peak_head_entries": peak.head_entries,
            "peak_resident_bytes": peak.resident_bytes,
            "peak_process_rss_bytes": peak_rss,
            "cache": cache,
        });
        std::fs::write(path, serde_json::to_string_pretty(&record)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The prompt from `--prompt`, `--prompt-file` or, with `--prompt-file -`, standard input.
fn read_prompt(args: &GenerateArgs) -> Result<String> {
    match (&args.prompt, &args.prompt_file) {
        (Some(p), _) => Ok(p.clone()),
        (None, Some(f)) if f.as_os_str() == "-" => {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text).context("reading the prompt from stdin")?;
            Ok(text)
        }
        (None, Some(f)) => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))
        }
        (None, None) => bail!("give a prompt with -p/--prompt or -f/--prompt-file"),
    }
}

/// A layer's entry budget as reported: none for a share of 1, which has no bound.
fn shown_bound(budget: usize) -> Option<usize> {
    (budget != Budget::EVERYTHING).then_some(budget)
}

fn print_stats(report: &kvmerger_engine::CompressionReport) {
    eprintln!(
        "{:>5} {:>8} {:>10} {:>10} {:>12} {:>8}  clamped",
        "layer", "budget", "kept", "ratio", "merge sets", "largest"
    );
    for (layer, heads) in report.heads.iter().enumerate() {
        let kept: Vec<String> = heads.iter().map(|h| h.after.to_string()).collect();
        let sets: usize = heads.iter().map(|h| h.merge_sets).sum();
        let largest = heads.iter().map(|h| h.largest_set).max().unwrap_or(0);
        // `head:part` for each head whose method shrank a fixed part to fit its budget.
        let clamped: Vec<String> = heads
            .iter()
            .enumerate()
            .filter_map(|(h, r)| r.clamped.map(|part| format!("{h}:{part}")))
            .collect();
        eprintln!(
            "{layer:>5} {:>8} {:>10} {:>9.1}% {sets:>12} {largest:>8}  {}",
            shown_bound(report.budgets[layer]).map_or("all".to_string(), |b| b.to_string()),
            kept.join("/"),
            100.0 * report.layer_ratio(layer),
            if clamped.is_empty() { "-".to_string() } else { clamped.join(",") }
        );
    }
    let clamped = report.clamped_heads();
    if clamped > 0 {
        eprintln!(
            "warning: {clamped} of {} heads had a fixed part (sinks, window, protected \
             entries) shrunk to fit the budget",
            report.heads.iter().flatten().count()
        );
    }
}
