//! `kvmerger analyze`: the paper's two observations on a model, as figures and JSON.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use kvmerger_compress::methods::CompareTo;
use kvmerger_compress::{Budget, StatsRequest};
use kvmerger_engine::{LoadedModel, Prefilled};
use kvmerger_eval::analyze::{
    analyze_cache, cosine_matrix, persistence, suggest_layer_budgets, TextAnalysis,
};
use kvmerger_eval::plot::{heatmap_grid, line_chart, HeatmapPanel, Series};
use serde_json::json;

use crate::args::{finite_f32, ModelArgs};

#[derive(Debug, Args)]
pub struct AnalyzeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text files to analyse (repeatable; at least two, to compare them). Default: two
    /// far-apart passages of the haystack corpus, repetitive passkey filler, and a
    /// synthetic key-value list.
    #[arg(long = "text")]
    pub texts: Vec<PathBuf>,
    /// Tokens taken from each text (the context analysed).
    #[arg(short = 'c', long, default_value_t = 1024, value_name = "N")]
    pub ctx_size: usize,
    /// Cosine threshold of merging-set identification.
    #[arg(long, default_value_t = 0.75, value_parser = finite_f32, allow_hyphen_values = true)]
    pub threshold: f32,
    /// Layer of the similarity heatmap.
    #[arg(long, default_value_t = 10)]
    pub layer: usize,
    /// Kv head of the similarity heatmap.
    #[arg(long, default_value_t = 0)]
    pub head: usize,
    /// Tokens shown in the similarity heatmap.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// Write a KVMerger configuration with per-layer budgets averaging this share of the
    /// prompt (0.35 or 35%).
    #[arg(long, allow_hyphen_values = true)]
    pub suggest_budget: Option<Budget>,
    /// Output folder.
    #[arg(long, default_value = "results/analyze")]
    pub out: PathBuf,
}

pub fn run(args: AnalyzeArgs) -> Result<()> {
    let suggest = match args.suggest_budget {
        None => None,
        Some(Budget::Ratio(r)) => Some(r),
        Some(b) => bail!("--suggest-budget takes a share of the prompt (0.35, 35%), not {b}"),
    };
    if args.texts.len() == 1 {
        bail!("--text: give at least two texts; analyze compares their per-layer merge ratios");
    }
    if !(-1.0..=1.0).contains(&args.threshold) {
        bail!("--threshold must be a cosine in [-1, 1], got {}", args.threshold);
    }
    let loaded = args.model.load()?;
    let c = &loaded.model.config;
    if args.layer >= c.n_layers || args.head >= c.n_kv_heads {
        bail!("--layer must be below {} and --head below {}", c.n_layers, c.n_kv_heads);
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let texts = load_texts(&args, &loaded)?;
    let mut analyses = Vec::new();
    for (i, (name, tokens)) in texts.iter().enumerate() {
        eprintln!("analysing {name} ({} tokens)", tokens.len());
        let prefilled =
            Prefilled::run(&loaded.model, tokens, StatsRequest::default(), Default::default())?;
        if i == 0 {
            draw_similarity(&args, name, &prefilled)?;
        }
        analyses.push(analyze_cache(name, &prefilled.cache, args.threshold, CompareTo::Neighbour));
    }
    let curves: Vec<Vec<f64>> = analyses.iter().map(|a| a.layer_merge_ratio.clone()).collect();
    let spread = persistence(&curves);
    draw_curves(&args, &analyses)?;

    let mut summary = json!({
        // The file name only: the folder is the user's machine.
        "model": loaded.path.file_name().unwrap_or_default().to_string_lossy(),
        "threshold": args.threshold,
        "texts": analyses,
        "persistence": spread,
    });
    if let Some(overall) = suggest {
        let mean: Vec<f64> = (0..c.n_layers)
            .map(|l| curves.iter().map(|cv| cv[l]).sum::<f64>() / curves.len() as f64)
            .collect();
        let layer_budgets = suggest_layer_budgets(&mean, overall);
        // The threshold measured the profile; the default merge mode does not read it.
        let made_for = format!(
            "{} ({} layers)",
            loaded.path.file_name().unwrap_or_default().to_string_lossy(),
            c.n_layers
        );
        let config = json!({"method": "kvmerger", "budget": Budget::Ratio(overall), "layer_budgets": layer_budgets, "layer_budgets_model": made_for});
        let path =
            args.out.join(format!("kvmerger-layer-budgets-{}.json", (overall * 100.0).round()));
        std::fs::write(&path, serde_json::to_string_pretty(&config)?)?;
        eprintln!(
            "suggested configuration written to {} (use with --method-config)",
            path.display()
        );
        summary["suggested_config"] = config;
    }
    let path = args.out.join("summary.json");
    std::fs::write(&path, serde_json::to_string_pretty(&summary)?)?;
    print_summary(&analyses, &spread)?;
    eprintln!(
        "figures and {} written to {}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        args.out.display()
    );
    Ok(())
}

fn load_texts(args: &AnalyzeArgs, loaded: &LoadedModel) -> Result<Vec<(String, Vec<u32>)>> {
    let mut texts: Vec<(String, String)> = Vec::new();
    for path in &args.texts {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        texts.push((path.file_stem().unwrap_or_default().to_string_lossy().to_string(), text));
    }
    if texts.is_empty() {
        let corpus = std::fs::read_to_string(kvmerger_eval::corpus::ensure_default_corpus()?)?;
        let chars: Vec<char> = corpus.chars().collect();
        let passage = |at: usize| {
            chars[at.min(chars.len())..(at + 12_000).min(chars.len())].iter().collect::<String>()
        };
        texts.push(("moby-dick-ch1".into(), passage(chars.len() / 50)));
        texts.push(("moby-dick-late".into(), passage(chars.len() * 4 / 5)));
        texts.push(("passkey-filler".into(), kvmerger_eval::tasks::PASSKEY_FILLER.repeat(200)));
        texts.push(("key-value-list".into(), kvmerger_eval::tasks::key_value_noise(400, 7)));
    }
    texts
        .into_iter()
        .map(|(name, text)| {
            let mut tokens = loaded.tokenizer.encode(&text, true)?;
            if tokens.len() < args.ctx_size {
                bail!(
                    "{name} has only {} tokens, fewer than --ctx-size {}",
                    tokens.len(),
                    args.ctx_size
                );
            }
            tokens.truncate(args.ctx_size);
            Ok((name, tokens))
        })
        .collect()
}

fn draw_similarity(args: &AnalyzeArgs, name: &str, prefilled: &Prefilled) -> Result<()> {
    let head = &prefilled.cache.layers[args.layer][args.head];
    let start = head.len().saturating_sub(args.window) / 2;
    let len = args.window.min(head.len());
    let ticks: Vec<String> = (start..start + len).map(|i| i.to_string()).collect();
    let panel = |what: &str, rows: &[f32]| HeatmapPanel {
        title: format!(
            "{what} cosine similarity, layer {} head {} ({name})",
            args.layer, args.head
        ),
        x_label: "token".into(),
        y_label: "token".into(),
        x_ticks: ticks.clone(),
        y_ticks: ticks.clone(),
        values: cosine_matrix(rows, head.head_dim(), start, len)
            .into_iter()
            .map(|r| r.into_iter().map(f64::from).collect())
            .collect(),
    };
    let (keys, values) = (head.keys(), head.values());
    let panels = [panel("key", &keys), panel("value", &values)];
    heatmap_grid(
        &args.out.join("similarity_heatmap.png"),
        &panels,
        (620, 600),
        (-0.2, 1.0),
        false,
    )?;
    Ok(())
}

fn draw_curves(args: &AnalyzeArgs, analyses: &[TextAnalysis]) -> Result<()> {
    let series: Vec<Series> = analyses
        .iter()
        .map(|a| Series {
            label: a.name.clone(),
            points: a.layer_merge_ratio.iter().enumerate().map(|(l, r)| (l as f64, *r)).collect(),
            dashed: false,
        })
        .collect();
    let title =
        format!("Entries left by merging-set identification (threshold {})", args.threshold);
    line_chart(
        &args.out.join("layer_merge_ratio.png"),
        &title,
        "layer",
        "share of tokens kept",
        &series,
        Some((0.0, 1.05)),
    )?;

    let first = &analyses[0];
    let n_layers = first.layer_merge_ratio.len();
    let per_layer =
        |pick: &dyn Fn(&kvmerger_eval::analyze::HeadAnalysis) -> f32| -> Vec<(f64, f64)> {
            (0..n_layers)
                .map(|l| {
                    let heads: Vec<f64> = first
                        .heads
                        .iter()
                        .filter(|h| h.layer == l)
                        .map(|h| pick(h) as f64)
                        .collect();
                    (l as f64, heads.iter().sum::<f64>() / heads.len().max(1) as f64)
                })
                .collect()
        };
    let series = vec![
        Series {
            label: "keys, median".into(),
            points: per_layer(&|h| h.key_cosine_percentiles[2]),
            dashed: false,
        },
        Series {
            label: "keys, 5th percentile".into(),
            points: per_layer(&|h| h.key_cosine_percentiles[0]),
            dashed: true,
        },
        Series {
            label: "keys, 95th percentile".into(),
            points: per_layer(&|h| h.key_cosine_percentiles[4]),
            dashed: true,
        },
        Series {
            label: "values, median".into(),
            points: per_layer(&|h| h.value_cosine_percentiles[2]),
            dashed: false,
        },
    ];
    let title =
        format!("Cosine similarity of adjacent tokens ({}), mean over kv heads", first.name);
    line_chart(
        &args.out.join("adjacent_similarity.png"),
        &title,
        "layer",
        "cos(x_i, x_i+1)",
        &series,
        Some((-0.2, 1.05)),
    )?;
    Ok(())
}

fn print_summary(
    analyses: &[TextAnalysis],
    spread: &kvmerger_eval::analyze::Persistence,
) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "| text | tokens | mean merge ratio | lowest layer ratio | median adjacent key cos | median adjacent value cos |")?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|")?;
    for a in analyses {
        let mean = a.layer_merge_ratio.iter().sum::<f64>() / a.layer_merge_ratio.len() as f64;
        let lowest = a.layer_merge_ratio.iter().copied().fold(f64::INFINITY, f64::min);
        let med = |f: &dyn Fn(&kvmerger_eval::analyze::HeadAnalysis) -> f32| {
            a.heads.iter().map(|h| f(h) as f64).sum::<f64>() / a.heads.len() as f64
        };
        writeln!(
            out,
            "| {} | {} | {mean:.3} | {lowest:.3} | {:.3} | {:.3} |",
            a.name,
            a.tokens,
            med(&|h| h.key_cosine_percentiles[2]),
            med(&|h| h.value_cosine_percentiles[2])
        )?;
    }
    writeln!(
        out,
        "\nacross texts: max |difference| of a layer's ratio {:.3}, mean {:.3}, mean pairwise correlation {}",
        spread.max_abs_diff,
        spread.mean_abs_diff,
        spread.mean_pairwise_correlation.map_or("undefined (one text)".into(), |c| format!("{c:.3}"))
    )
}
