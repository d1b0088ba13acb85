//! What a compression method does to the needle's tokens: for RULER single-needle samples
//! on development seeds, the share of the needle's value tokens (its digits) that each
//! method keeps as entries of their own, merges into a larger entry, or evicts, over every
//! (layer, kv head), and the mean size of the entries that hold them.
//!
//! ```sh
//! cargo run --release -p kvmerger-eval --example needle_fate -- \
//!     [MODEL.gguf] [--length 1024] [--seeds 3] [--budget 0.25] [METHOD ...]
//! ```
//!
//! METHOD is a method name or a variant (`kvmerger:agree_on=keys_and_values`); default
//! `kvmerger keydiff`.

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

use kvmerger_compress::{Budget, CompressionConfig, HeadCache};
use kvmerger_engine::{load_model, Session};
use kvmerger_eval::ruler::RulerTask;
use kvmerger_eval::runner::{prompt_texts, RunOptions};
use kvmerger_eval::tasks::{generate, TaskInput, TaskKind};

/// Where the needle's tokens went in one head, as counts of tokens.
#[derive(Default, Clone, Copy)]
struct Fate {
    alone: usize,
    merged: usize,
    evicted: usize,
    /// Summed over the merged tokens: the size of the entry holding each.
    merged_size: usize,
}

/// The entry count of each prompt token's entry in `head` (0 where evicted), for a head
/// that holds `prompt_len` prompt tokens: contiguous runs when nothing was evicted (their
/// counts sum to the prompt), otherwise single tokens at their positions.
fn entry_sizes(head: &HeadCache, prompt_len: usize) -> Vec<usize> {
    let meta = head.meta();
    let mut sizes = vec![0; prompt_len];
    let total: usize = meta.iter().map(|m| m.count as usize).sum();
    if total == prompt_len {
        let mut at = 0;
        for m in meta {
            let c = m.count as usize;
            sizes[at..at + c].iter_mut().for_each(|s| *s = c);
            at += c;
        }
    } else {
        for m in meta.iter().filter(|m| m.position < prompt_len) {
            sizes[m.position] = m.count as usize;
        }
    }
    sizes
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut positional = Vec::new();
    let (mut length, mut seeds, mut budget) = (1024usize, 3u64, 0.25f64);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--length" => length = value()?.parse()?,
            "--seeds" => seeds = value()?.parse()?,
            "--budget" => budget = value()?.parse()?,
            _ => positional.push(a.clone()),
        }
    }
    let path = match positional.first().filter(|a| a.ends_with(".gguf")) {
        Some(_) => positional.remove(0).into(),
        None => kvmerger_models::default_model_path(),
    };
    let methods = if positional.is_empty() {
        vec!["kvmerger".to_string(), "keydiff".to_string()]
    } else {
        positional
    };
    let model = load_model(&path, Default::default())?;
    let tok = &model.tokenizer;
    let count = |s: &str| tok.encode(s, true).map_or(0, |t| t.len());
    let haystack = std::fs::read_to_string(kvmerger_eval::corpus::ensure_default_corpus()?)?;
    println!("| method | alone | merged | evicted | mean entry size when merged |");
    println!("|---|---:|---:|---:|---:|");
    let mut fates = vec![Fate::default(); methods.len()];
    for task in [RulerTask::NiahSingle1, RulerTask::NiahSingle2, RulerTask::NiahSingle3] {
        for seed in 0..seeds {
            let input = TaskInput {
                length,
                depth: 0.0,
                seed,
                count_tokens: &count,
                haystack: Some(&haystack),
            };
            let sample = generate(TaskKind::Ruler(task), &input)?;
            let (context, _) = prompt_texts(&model, &sample, RunOptions::default())?;
            let answer = &sample.answers[0];
            let at = context.find(answer.as_str()).ok_or("the answer is not in the context")?;
            // The needle's value tokens: those the answer adds to the prefix before it.
            let first = tok.encode(&context[..at], true)?.len();
            let last = tok.encode(&context[..at + answer.len()], true)?.len();
            let tokens = tok.encode(&context, true)?;
            for (m, name) in methods.iter().enumerate() {
                let (method, variant) = name.split_once(':').unwrap_or((name, ""));
                let params: Vec<(String, String)> = variant
                    .split(';')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                let config =
                    CompressionConfig::from_cli(method, Some(Budget::Ratio(budget)), &params)?;
                let mut session = Session::new(&model.model, &config)?;
                session.prefill(&tokens)?;
                for head in session.cache().layers.iter().flatten() {
                    let sizes = entry_sizes(head, tokens.len());
                    for &s in &sizes[first..last.min(sizes.len())] {
                        let f = &mut fates[m];
                        match s {
                            0 => f.evicted += 1,
                            1 => f.alone += 1,
                            _ => {
                                f.merged += 1;
                                f.merged_size += s;
                            }
                        }
                    }
                }
            }
        }
    }
    for (name, f) in methods.iter().zip(&fates) {
        let total = (f.alone + f.merged + f.evicted).max(1) as f64;
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} | {:.1} |",
            f.alone as f64 / total,
            f.merged as f64 / total,
            f.evicted as f64 / total,
            f.merged_size as f64 / f.merged.max(1) as f64
        );
    }
    Ok(())
}
