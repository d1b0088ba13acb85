//! The report: Markdown tables with confidence intervals, a CSV summary and PNG plots
//! from result rows.
//!
//! Rows are put in a canonical order first (task, sample, protocol; methods in the order
//! they were run), so the report of a sweep run in shards equals the unsharded one.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use kvmerger_compress::{Budget, KvDtype};

mod frontier;
mod progressive;

use crate::error::{EvalError, Result};
use crate::plot::{heatmap_grid, line_charts, HeatmapPanel, LineChart, Series};
use crate::results::ResultRow;
use crate::ruler::RulerTask;
use crate::runner::Protocol;
use crate::stats::{
    accuracy, bootstrap_mean, stratified_bootstrap_mean, Estimate, BOOTSTRAP_RESAMPLES,
};

/// A method holds its budget when its entries are within this share of the budget's.
pub const BUDGET_TOLERANCE: f64 = 0.01;

/// Samples per task whose predictions the report shows.
const PREDICTION_SAMPLES: usize = 2;

/// `budget` in percent, as a key that sorts.
fn pct(b: f64) -> u32 {
    (b * 100.0).round() as u32
}

/// A report column: the budget its rows asked for, read from their method label
/// (`h2o@35%`, `h2o@512 tokens`), not the share each sample happened to keep. Shares come
/// before token counts, each in increasing order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Column {
    /// A share of the prompt, in tenths of a percent.
    Share(u32),
    /// Entries per head.
    Tokens(usize),
}

impl Column {
    /// The full cache's column (everything).
    const FULL: Column = Column::Share(1000);

    fn of(r: &ResultRow) -> Column {
        let asked = r.method.rsplit_once('@').and_then(|(_, b)| b.parse::<Budget>().ok());
        match asked {
            Some(Budget::Tokens(t)) => Column::Tokens(t),
            Some(Budget::Ratio(x)) => Column::Share((x * 1000.0).round() as u32),
            // The full cache's label has no budget; its row records a share of 1.
            None => Column::Share((r.budget * 1000.0).round() as u32),
        }
    }

    fn is_share(self) -> bool {
        matches!(self, Column::Share(_))
    }

    /// Where the column sits on a plot's x axis: percent of the prompt, or tokens.
    fn x(self) -> f64 {
        match self {
            Column::Share(p) => p as f64 / 10.0,
            Column::Tokens(t) => t as f64,
        }
    }

    /// How far the column is from 35%, the budget predictions and heatmaps show.
    fn distance_to_35(self) -> u32 {
        match self {
            Column::Share(p) => p.abs_diff(350),
            Column::Tokens(_) => u32::MAX,
        }
    }

    /// The budget as the summary CSV writes it: a share (`0.35`) or a count (`512t`).
    fn csv(self) -> String {
        match self {
            Column::Share(p) => (p as f64 / 1000.0).to_string(),
            Column::Tokens(t) => format!("{t}t"),
        }
    }

    /// The budget in a file name: percent (`35`) or a count (`512t`).
    fn file_tag(self) -> String {
        match self {
            Column::Share(p) => (p as f64 / 10.0).to_string(),
            Column::Tokens(t) => format!("{t}t"),
        }
    }
}

impl std::fmt::Display for Column {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Column::Share(p) => write!(f, "{}", Budget::Ratio(p as f64 / 1000.0)),
            Column::Tokens(t) => write!(f, "{}", Budget::Tokens(t)),
        }
    }
}

/// Whether a row kept its budget within [`BUDGET_TOLERANCE`] (the full cache always does).
pub fn holds_budget(r: &ResultRow) -> bool {
    r.method_name() == "full" || (r.achieved_ratio / r.budget - 1.0).abs() <= BUDGET_TOLERANCE
}

/// A method label as reports show it: long list parameters (per-layer budgets) become
/// their length, so labels stay readable.
pub fn display_label(method: &str) -> String {
    let mut out = String::new();
    let mut rest = method;
    while let Some(open) = rest.find('[') {
        let close = rest[open..].find(']').map_or(rest.len(), |c| open + c + 1);
        let items = rest[open..close].split(',').count();
        out.push_str(&rest[..open]);
        if close - open > 24 {
            let _ = write!(out, "[{items} values]");
        } else {
            out.push_str(&rest[open..close]);
        }
        rest = &rest[close..];
    }
    out.push_str(rest);
    out
}

/// What a table cell measures.
#[derive(Clone, Copy)]
struct Measure {
    title: &'static str,
    value: fn(&ResultRow) -> f64,
    estimate: fn(&[f64]) -> Estimate,
    digits: usize,
}

/// The score of a task whose scores are all 0 or 1.
const ACCURACY: Measure = Measure {
    title: "Score (share correct, Wilson 95% interval)",
    value: |r| r.score,
    estimate: accuracy,
    digits: 2,
};
/// The score of a task with graded scores (F1, ROUGE).
const MEAN_SCORE: Measure = Measure {
    title: "Score (mean, bootstrap 95% interval)",
    value: |r| r.score,
    estimate: bootstrap_mean,
    digits: 2,
};
const PERPLEXITY: Measure = Measure {
    title: "Perplexity of the continuation (lower is better)",
    value: |r| r.perplexity,
    estimate: bootstrap_mean,
    digits: 2,
};
const KL: Measure = Measure {
    title: "KL divergence from the full cache (teacher-forced, nats/token)",
    value: |r| r.kl,
    estimate: bootstrap_mean,
    digits: 3,
};
const TOP1: Measure = Measure {
    title: "Top-1 agreement with the full cache",
    value: |r| r.top1_agreement,
    estimate: bootstrap_mean,
    digits: 2,
};

/// Rows in canonical order, grouped by task, protocol, method name and budget.
struct Groups<'a> {
    by: BTreeMap<(String, Protocol, String, Column), Vec<&'a ResultRow>>,
    tasks: BTreeSet<String>,
    protocols: BTreeSet<Protocol>,
    /// Compressed methods, in the order they were run; the first is the paired reference.
    methods: Vec<String>,
    /// The budgets asked for; the full cache's alone when no method compressed.
    budgets: Vec<Column>,
}

impl<'a> Groups<'a> {
    fn new(rows: &'a [ResultRow]) -> Self {
        let mut sorted: Vec<&ResultRow> = rows.iter().collect();
        // Stable: rows of one sample and protocol keep the order their methods ran in.
        sorted.sort_by(|a, b| {
            (&a.task, &a.sample_id, a.protocol).cmp(&(&b.task, &b.sample_id, b.protocol))
        });
        let mut by: BTreeMap<_, Vec<_>> = BTreeMap::new();
        let mut methods = Vec::new();
        for r in sorted {
            let name = r.method_name().to_string();
            if name != "full" && !methods.contains(&name) {
                methods.push(name.clone());
            }
            by.entry((r.task.clone(), r.protocol, name, Column::of(r))).or_default().push(r);
        }
        let tasks = rows.iter().map(|r| r.task.clone()).collect();
        let protocols = rows.iter().map(|r| r.protocol).collect();
        let mut budgets: BTreeSet<Column> =
            rows.iter().filter(|r| r.method_name() != "full").map(Column::of).collect();
        if budgets.is_empty() {
            // A baseline run (`--methods full`): the full cache's own column.
            budgets.insert(Column::FULL);
        }
        Self { by, tasks, protocols, methods, budgets: budgets.into_iter().collect() }
    }

    fn rows(
        &self,
        task: &str,
        protocol: Protocol,
        method: &str,
        budget: Column,
    ) -> &[&'a ResultRow] {
        let budget = if method == "full" { Column::FULL } else { budget };
        self.by
            .get(&(task.to_string(), protocol, method.to_string(), budget))
            .map_or(&[], Vec::as_slice)
    }

    fn estimate(
        &self,
        task: &str,
        protocol: Protocol,
        method: &str,
        budget: Column,
        m: Measure,
    ) -> Estimate {
        let values: Vec<f64> =
            self.rows(task, protocol, method, budget).iter().map(|r| (m.value)(r)).collect();
        (m.estimate)(&values)
    }

    /// Rows of `method` that missed their budget, and all its rows, in one cell.
    fn budget_misses(&self, task: &str, protocol: Protocol, method: &str, budget: Column) -> usize {
        self.rows(task, protocol, method, budget).iter().filter(|r| !holds_budget(r)).count()
    }

    /// Paired difference `measure(method) - measure(reference)` over the samples both ran.
    fn paired(
        &self,
        task: &str,
        protocol: Protocol,
        method: &str,
        reference: &str,
        budget: Column,
        value: fn(&ResultRow) -> f64,
    ) -> Estimate {
        let base: BTreeMap<&str, f64> = self
            .rows(task, protocol, reference, budget)
            .iter()
            .map(|r| (r.sample_id.as_str(), value(r)))
            .collect();
        let diffs: Vec<f64> = self
            .rows(task, protocol, method, budget)
            .iter()
            .filter_map(|r| base.get(r.sample_id.as_str()).map(|b| value(r) - b))
            .collect();
        bootstrap_mean(&diffs)
    }

    fn task_protocols(&self, task: &str) -> Vec<Protocol> {
        self.protocols
            .iter()
            .copied()
            .filter(|&p| self.by.keys().any(|k| k.0 == task && k.1 == p))
            .collect()
    }
}

/// The score measure of a task: Wilson intervals when every score of the task is 0 or 1 (an
/// accuracy), the bootstrap otherwise; one kind for the whole table, whatever the scores of
/// one cell happen to be.
fn score_measure(rows: &[ResultRow], task: &str) -> Measure {
    let binary = rows
        .iter()
        .filter(|r| r.task == task && r.score.is_finite())
        .all(|r| r.score == 0.0 || r.score == 1.0);
    if binary {
        ACCURACY
    } else {
        MEAN_SCORE
    }
}

fn fmt_estimate(e: Estimate, digits: usize) -> String {
    if e.n == 0 {
        "–".into()
    } else {
        format!("{:.d$} [{:.d$}, {:.d$}] ({})", e.mean, e.low, e.high, e.n, d = digits)
    }
}

fn header(first: &[&str], budgets: &[Column]) -> String {
    let mut h = String::from("|");
    first.iter().for_each(|c| h.push_str(&format!(" {c} |")));
    budgets.iter().for_each(|b| h.push_str(&format!(" {b} |")));
    h.push_str("\n|");
    first.iter().for_each(|_| h.push_str("---|"));
    budgets.iter().for_each(|_| h.push_str("---:|"));
    h
}

/// Text safe inside a Markdown table cell.
fn cell_text(s: &str) -> String {
    let t = s.replace('|', "\\|").replace('\n', "⏎");
    if t.trim().is_empty() {
        "(empty)".into()
    } else {
        format!("`{}`", t.replace('`', "'"))
    }
}

/// Writes `report.md`, `summary.csv` and the plots into `dir`. Returns the Markdown.
/// `notes` are paragraphs placed after the introduction (how prompts were built, and why).
pub fn write_report(
    rows: &[ResultRow],
    dir: &Path,
    title: &str,
    command: &str,
    notes: &[String],
) -> Result<String> {
    std::fs::create_dir_all(dir).map_err(EvalError::io(dir))?;
    let g = Groups::new(rows);
    let budgets = g.budgets.clone();
    let mut md = String::new();
    let _ = writeln!(md, "# {title}\n\nRegenerate with:\n\n```sh\n{command}\n```\n");
    let _ = writeln!(
        md,
        "{} rows. Columns are the budgets asked for. Cells are mean [95% confidence interval] \
         (n samples). Intervals: Wilson for a task whose scores are all 0 or 1 (accuracies), \
         percentile bootstrap over samples otherwise ({BOOTSTRAP_RESAMPLES} resamples, fixed \
         seed); each score table names its kind. The full cache is the reference every \
         method is compared with. ⚠ marks a cell where the method did not hold its budget \
         within ±{}% of entries on some samples (see *Budget held*); such cells compare \
         different memory and are not averaged in silently.\n",
        rows.len(),
        BUDGET_TOLERANCE * 100.0
    );
    for note in notes {
        let _ = writeln!(md, "{note}\n");
    }
    let _ = writeln!(md, "{}\n", kv_dtype_note(rows));
    let _ = writeln!(md, "Protocols:\n");
    for p in &g.protocols {
        let _ = writeln!(md, "- **{}**: {}.", p.name(), p.description());
    }
    if g.protocols.contains(&Protocol::Prompt) {
        let _ = writeln!(
            md,
            "\nUnder **prompt**, query-aware selectors such as SnapKV (whose observation window \
             then holds the question) win by construction; **context** is the fair test of what \
             a method keeps without knowing the question."
        );
        if g.tasks.contains("perplexity") {
            let _ =
                writeln!(md, "Perplexity samples have no question and run under **context** only.");
        }
    }
    md.push('\n');

    let reference = g.methods.first().cloned();
    let mut csv = String::from(
        "task,protocol,method,budget,n,score_mean,score_low,score_high,kl_mean,kl_low,kl_high,\
         top1_mean,perplexity_mean,perplexity_low,perplexity_high,matched_prefix_mean,\
         achieved_ratio_mean,rows_off_budget,resident_kv_mib_mean,paired_reference,\
         kl_minus_reference_mean,kl_minus_reference_low,kl_minus_reference_high\n",
    );
    write_budget_table(&mut md, &g, &budgets);
    write_ruler_average(&mut md, &g, &budgets, dir)?;
    if frontier::applies(rows) {
        frontier::write_frontier(&mut md, &g, dir)?;
    }
    if progressive::applies(&g) {
        progressive::write_progressive(&mut md, &g, &budgets);
    }
    for task in &g.tasks {
        let protocols = g.task_protocols(task);
        let _ = writeln!(md, "## {task}\n");
        let is_ppl = task == "perplexity";
        let score = score_measure(rows, task);
        let measures: Vec<Measure> =
            if is_ppl { vec![PERPLEXITY, KL, TOP1] } else { vec![score, KL, TOP1] };
        for m in &measures {
            let _ =
                writeln!(md, "### {}\n\n{}", m.title, header(&["protocol", "method"], &budgets));
            for &p in &protocols {
                for method in std::iter::once("full".to_string()).chain(g.methods.iter().cloned()) {
                    let label = if method == "full" {
                        "full cache".to_string()
                    } else {
                        display_label(&method)
                    };
                    let cells: Vec<String> = budgets
                        .iter()
                        .map(|&b| {
                            let e = g.estimate(task, p, &method, b, *m);
                            let flag =
                                if g.budget_misses(task, p, &method, b) > 0 { " ⚠" } else { "" };
                            format!("{}{flag}", fmt_estimate(e, m.digits))
                        })
                        .collect();
                    write_row(&mut md, p, &label, &cells);
                }
            }
            md.push('\n');
        }
        if let Some(reference) = &reference {
            let _ = writeln!(
                md,
                "### KL difference to {} on the same samples (method − {}; below 0: closer to \
                 the full cache than {})\n\nPaired over samples, so the spread between samples \
                 cancels; **bold** where the interval excludes 0.\n\n{}",
                display_label(reference),
                display_label(reference),
                display_label(reference),
                header(&["protocol", "method"], &budgets)
            );
            for &p in &protocols {
                for method in g.methods.iter().filter(|m| *m != reference) {
                    let cells: Vec<String> = budgets
                        .iter()
                        .map(|&b| {
                            let d = g.paired(task, p, method, reference, b, KL.value);
                            let base = g.estimate(task, p, reference, b, KL);
                            let text = fmt_estimate(d, 3);
                            if d.n == 0 {
                                text
                            } else {
                                let rel = format!(" {:+.0}%", 100.0 * d.mean / base.mean);
                                if d.excludes(0.0) {
                                    format!("**{text}{rel}**")
                                } else {
                                    format!("{text}{rel}")
                                }
                            }
                        })
                        .collect();
                    write_row(&mut md, p, &display_label(method), &cells);
                }
            }
            md.push('\n');
        }
        for &p in &protocols {
            for method in std::iter::once("full".to_string()).chain(g.methods.iter().cloned()) {
                let bs = if method == "full" { vec![Column::FULL] } else { budgets.clone() };
                for b in bs {
                    let rows = g.rows(task, p, &method, b);
                    if rows.is_empty() {
                        continue;
                    }
                    let e = |m: Measure| g.estimate(task, p, &method, b, m);
                    let mean = |f: fn(&ResultRow) -> f64| {
                        rows.iter().map(|r| f(r)).sum::<f64>() / rows.len() as f64
                    };
                    let (score, kl, ppl) = (e(score), e(KL), e(PERPLEXITY));
                    let paired = match &reference {
                        Some(r) if *r != method && method != "full" => {
                            Some((r, g.paired(task, p, &method, r, b, KL.value)))
                        }
                        _ => None,
                    };
                    let _ = writeln!(
                        csv,
                        "{task},{},\"{}\",{},{},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.3},{:.6},{},{:.4},\"{}\",{},{},{}",
                        p.name(),
                        method.replace('"', "\"\""),
                        b.csv(),
                        rows.len(),
                        score.mean,
                        score.low,
                        score.high,
                        kl.mean,
                        kl.low,
                        kl.high,
                        mean(|r| r.top1_agreement),
                        ppl.mean,
                        ppl.low,
                        ppl.high,
                        mean(|r| r.matched_prefix_tokens as f64),
                        mean(|r| r.achieved_ratio),
                        g.budget_misses(task, p, &method, b),
                        mean(|r| r.resident_kv_bytes as f64 / 1048576.0),
                        paired.map_or(String::new(), |(r, _)| r.replace('"', "\"\"")),
                        paired.map_or(String::new(), |(_, d)| format!("{:.6}", d.mean)),
                        paired.map_or(String::new(), |(_, d)| format!("{:.6}", d.low)),
                        paired.map_or(String::new(), |(_, d)| format!("{:.6}", d.high)),
                    );
                }
            }
        }
        if !is_ppl {
            write_predictions(&mut md, &g, task, &protocols, &budgets);
        }
        draw_task_plots(rows, &g, task, &protocols, &budgets, score, dir)?;
    }
    write_time_table(&mut md, &g, &budgets, rows);
    let mut figures: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(EvalError::io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "png"))
        .collect();
    figures.sort();
    let _ = writeln!(md, "## Figures\n");
    for f in figures {
        let name = f.file_name().unwrap_or_default().to_string_lossy();
        let _ = writeln!(md, "![{name}]({name})\n");
    }
    write_atomically(&dir.join("summary.csv"), csv.as_bytes())?;
    write_atomically(&dir.join("report.md"), md.as_bytes())?;
    Ok(md)
}

/// Achieved ratio of every method, budget and protocol over all tasks, with the rows that
/// missed the budget counted.
fn write_budget_table(md: &mut String, g: &Groups<'_>, budgets: &[Column]) {
    let _ = writeln!(
        md,
        "## Budget held\n\nMean achieved ratio (entries kept / prompt tokens) over all tasks; \
         ⚠ k/n: k of n rows off their budget by more than ±{}% of entries.\n\n{}",
        BUDGET_TOLERANCE * 100.0,
        header(&["protocol", "method"], budgets)
    );
    for &p in &g.protocols {
        for method in &g.methods {
            let cells: Vec<String> = budgets
                .iter()
                .map(|&b| {
                    let rows: Vec<&ResultRow> = g
                        .tasks
                        .iter()
                        .flat_map(|t| g.rows(t, p, method, b).iter().copied())
                        .collect();
                    if rows.is_empty() {
                        return "–".into();
                    }
                    let mean =
                        rows.iter().map(|r| r.achieved_ratio).sum::<f64>() / rows.len() as f64;
                    let off = rows.iter().filter(|r| !holds_budget(r)).count();
                    if off > 0 {
                        format!("{mean:.3} ⚠ {off}/{}", rows.len())
                    } else {
                        format!("{mean:.3}")
                    }
                })
                .collect();
            write_row(md, p, &display_label(method), &cells);
        }
    }
    md.push('\n');
}

/// The first samples' answers under every method, at the budget nearest 35%.
fn write_predictions(
    md: &mut String,
    g: &Groups<'_>,
    task: &str,
    protocols: &[Protocol],
    budgets: &[Column],
) {
    let Some(&budget) = budgets.iter().min_by_key(|b| b.distance_to_35()) else {
        return;
    };
    let first = protocols.first().copied().unwrap_or_default();
    let samples: Vec<&str> = g
        .rows(task, first, "full", Column::FULL)
        .iter()
        .map(|r| r.sample_id.as_str())
        .take(PREDICTION_SAMPLES)
        .collect();
    if samples.is_empty() {
        return;
    }
    let cols: Vec<String> = protocols.iter().map(|p| format!("{} protocol", p.name())).collect();
    let _ = writeln!(
        md,
        "### Predictions at {budget} ({}; the full cache's answer is the reference for \
         KL)\n\n| sample | method | {} |\n|---|---|{}",
        if samples.len() == 1 {
            "the first sample".to_string()
        } else {
            format!("the first {} samples", samples.len())
        },
        cols.join(" | "),
        "---|".repeat(cols.len())
    );
    let find = |p: Protocol, method: &str, sample: &str| -> Option<&ResultRow> {
        g.rows(task, p, method, budget).iter().copied().find(|r| r.sample_id == sample)
    };
    for sample in samples {
        let answers =
            find(first, "full", sample).map_or_else(String::new, |r| r.answers.join(" / "));
        let _ = writeln!(
            md,
            "| {sample} | **reference** | {} |",
            vec![cell_text(&answers); protocols.len()].join(" | ")
        );
        for method in std::iter::once("full".to_string()).chain(g.methods.iter().cloned()) {
            let cells: Vec<String> = protocols
                .iter()
                .map(|&p| {
                    find(p, &method, sample).map_or("–".into(), |r| {
                        format!("{} ({:.2})", cell_text(&r.prediction), r.score)
                    })
                })
                .collect();
            let label = if method == "full" { "full cache".into() } else { display_label(&method) };
            let _ = writeln!(md, "| {sample} | {label} | {} |", cells.join(" | "));
        }
    }
    md.push('\n');
}

/// Which dtype the caches stored keys and values in (memory figures are at its size), and
/// the reference's where it differs.
fn kv_dtype_note(rows: &[ResultRow]) -> String {
    let names =
        |dtypes: BTreeSet<KvDtype>| dtypes.iter().map(|d| d.name()).collect::<Vec<_>>().join(", ");
    let stored: BTreeSet<KvDtype> = rows.iter().map(|r| r.kv_dtype).collect();
    let mut note = format!(
        "KV cache: keys and values stored in {} (`--kv-dtype`); attention and compression \
         compute in f32, and every memory figure counts the stored size.",
        names(stored)
    );
    let references: BTreeSet<KvDtype> = rows.iter().filter_map(|r| r.reference_kv_dtype).collect();
    if !references.is_empty() {
        let _ = write!(
            note,
            " The full-cache reference of the fidelity figures (KL, top-1, matched prefix) ran \
             with an {} cache, so the full cache's own row measures what the stored dtype costs.",
            names(references)
        );
    }
    note
}

/// Memory and time, apart from the tables above because timings differ from run to run.
fn write_time_table(md: &mut String, g: &Groups<'_>, budgets: &[Column], rows: &[ResultRow]) {
    let _ = writeln!(
        md,
        "## Time and memory\n\nResident KV MiB / decode ms per sample (question and answer), \
         all tasks and protocols.\n\n{}",
        header(&["method"], budgets)
    );
    for method in &g.methods {
        let cells: Vec<String> = budgets
            .iter()
            .map(|&b| {
                let rows: Vec<&ResultRow> = g
                    .tasks
                    .iter()
                    .flat_map(|t| {
                        g.protocols.iter().flat_map(move |&p| g.rows(t, p, method, b).iter())
                    })
                    .copied()
                    .collect();
                if rows.is_empty() {
                    return "–".into();
                }
                let mean = |f: fn(&ResultRow) -> f64| {
                    rows.iter().map(|r| f(r)).sum::<f64>() / rows.len() as f64
                };
                format!(
                    "{:.1} / {:.0}",
                    mean(|r| r.resident_kv_bytes as f64 / 1048576.0),
                    mean(|r| r.decode_ms)
                )
            })
            .collect();
        let _ = writeln!(md, "| {} | {} |", display_label(method), cells.join(" | "));
    }
    let full: Vec<&ResultRow> = rows.iter().filter(|r| r.method_name() == "full").collect();
    if !full.is_empty() {
        let n = full.len() as f64;
        let _ = writeln!(
            md,
            "\nThe full cache holds {:.1} MiB of keys and values per sample on average; prefill \
             takes {:.0} ms per sample.\n",
            full.iter().map(|r| r.full_kv_bytes as f64 / 1048576.0).sum::<f64>() / n,
            full.iter().map(|r| r.prefill_ms).sum::<f64>() / n
        );
    }
}

fn draw_task_plots(
    rows: &[ResultRow],
    g: &Groups<'_>,
    task: &str,
    protocols: &[Protocol],
    budgets: &[Column],
    score: Measure,
    dir: &Path,
) -> Result<()> {
    let is_ppl = task == "perplexity";
    let plotted = plotted_budgets(budgets);
    let chart = |p: Protocol, m: Measure, y_label: &str, y_range| {
        budget_chart(
            g,
            &plotted,
            &format!("{task}, {} protocol", p.name()),
            y_label,
            y_range,
            |method, b| g.estimate(task, p, method, b, m),
        )
    };
    let (score, score_label, score_range) = if is_ppl {
        (PERPLEXITY, "perplexity", None)
    } else {
        (score, "score", Some((-0.02, 1.05)))
    };
    let charts: Vec<LineChart> =
        protocols.iter().map(|&p| chart(p, score, score_label, score_range)).collect();
    line_charts(&dir.join(format!("{task}_score_vs_budget.png")), &charts)?;
    let charts: Vec<LineChart> =
        protocols.iter().map(|&p| chart(p, KL, "KL(full || method), nats/token", None)).collect();
    line_charts(&dir.join(format!("{task}_kl_vs_budget.png")), &charts)?;
    if task == "passkey" || task == "needle" {
        draw_depth_heatmaps(rows, g, task, protocols, budgets, dir)?;
    }
    Ok(())
}

/// The budgets a plot shows, on one x axis: the shares asked for, or token counts where no
/// share was.
fn plotted_budgets(budgets: &[Column]) -> Vec<Column> {
    let shares = budgets.iter().any(|b| b.is_share());
    budgets.iter().copied().filter(|b| b.is_share() == shares).collect()
}

/// A chart of `estimate(method, budget)` against the `plotted` budgets, one line per
/// compressed method with its intervals, the full cache's value as the reference line.
fn budget_chart(
    g: &Groups<'_>,
    plotted: &[Column],
    title: &str,
    y_label: &str,
    y_range: Option<(f64, f64)>,
    estimate: impl Fn(&str, Column) -> Estimate,
) -> LineChart {
    let x_label = if plotted.iter().all(|b| b.is_share()) {
        "KV budget (% of the full cache)"
    } else {
        "KV budget (entries per head)"
    };
    let (series, intervals): (Vec<Series>, Vec<Vec<(f64, f64)>>) = g
        .methods
        .iter()
        .map(|method| {
            let est: Vec<(f64, Estimate)> = plotted
                .iter()
                .map(|&b| (b.x(), estimate(method, b)))
                .filter(|(_, e)| e.n > 0)
                .collect();
            (
                Series {
                    label: display_label(method),
                    points: est.iter().map(|(x, e)| (*x, e.mean)).collect(),
                    dashed: false,
                },
                est.iter().map(|(_, e)| (e.low, e.high)).collect(),
            )
        })
        .unzip();
    let full = estimate("full", Column::FULL);
    LineChart {
        title: title.to_string(),
        x_label: x_label.into(),
        y_label: y_label.to_string(),
        series,
        intervals,
        reference: (full.n > 0).then(|| (format!("full cache {:.3}", full.mean), full.mean)),
        y_range,
        nudge: true,
    }
}

/// RULER's score of a method: the mean over the subtasks of each subtask's mean score, with
/// a bootstrap interval that resamples within each subtask. A cell is left empty unless
/// every subtask in the rows has rows there (an average over fewer subtasks would compare
/// unlike things). Written only when the rows hold two or more RULER subtasks.
fn write_ruler_average(
    md: &mut String,
    g: &Groups<'_>,
    budgets: &[Column],
    dir: &Path,
) -> Result<()> {
    let subtasks: Vec<&str> =
        g.tasks.iter().map(String::as_str).filter(|t| RulerTask::from_name(t).is_some()).collect();
    if subtasks.len() < 2 {
        return Ok(());
    }
    let average = |p: Protocol, method: &str, b: Column| {
        task_average(g, &subtasks, p, (method, b), |r| r.score)
    };
    let _ = writeln!(
        md,
        "## RULER: average over {} subtasks\n\nThe mean of the subtasks' mean scores \
         (string_match_all, 0 to 1; RULER reports it times 100), with a bootstrap 95% \
         interval resampling samples within each subtask; n counts samples over all \
         subtasks. Subtasks: {}.\n\n{}",
        subtasks.len(),
        subtasks.join(", "),
        header(&["protocol", "method"], budgets)
    );
    for &p in &g.protocols {
        for method in std::iter::once("full".to_string()).chain(g.methods.iter().cloned()) {
            let label =
                if method == "full" { "full cache".to_string() } else { display_label(&method) };
            let cells: Vec<String> =
                budgets.iter().map(|&b| fmt_estimate(average(p, &method, b), 2)).collect();
            write_row(md, p, &label, &cells);
        }
    }
    md.push('\n');
    write_ruler_paired_differences(md, g, &subtasks, budgets);
    let plotted = plotted_budgets(budgets);
    let charts: Vec<LineChart> = g
        .protocols
        .iter()
        .map(|&p| {
            let title = format!("RULER average, {} protocol", p.name());
            budget_chart(g, &plotted, &title, "score", Some((-0.02, 1.05)), |m, b| average(p, m, b))
        })
        .collect();
    line_charts(&dir.join("ruler_average_score_vs_budget.png"), &charts)
}

/// RULER's average of each method minus the paired reference's (the first method run), on
/// the samples both ran: per subtask the mean of the per-sample score differences, averaged
/// over the subtasks, with a bootstrap interval resampling the differences within each
/// subtask. Pairing removes the spread between samples that both methods share, so the
/// interval of a difference is narrower than the two averages' intervals suggest.
fn write_ruler_paired_differences(
    md: &mut String,
    g: &Groups<'_>,
    subtasks: &[&str],
    budgets: &[Column],
) {
    let Some(reference) = g.methods.first() else { return };
    if g.methods.len() < 2 {
        return;
    }
    let difference = |p: Protocol, method: &str, b: Column| {
        paired_task_average(g, subtasks, p, (method, b), (reference, b), |r| r.score)
    };
    let reference_label = display_label(reference);
    let _ = writeln!(
        md,
        "### RULER average: difference to {reference_label} on the same samples\n\n\
         Method − {reference_label}, paired by sample within each subtask (above 0: the \
         method scores higher); **bold** where the 95% interval excludes 0.\n\n{}",
        header(&["protocol", "method"], budgets)
    );
    for &p in &g.protocols {
        for method in g.methods.iter().skip(1) {
            let cells: Vec<String> = budgets
                .iter()
                .map(|&b| {
                    let e = difference(p, method, b);
                    let text = fmt_estimate(e, 2);
                    if e.excludes(0.0) {
                        format!("**{text}**")
                    } else {
                        text
                    }
                })
                .collect();
            write_row(md, p, &display_label(method), &cells);
        }
    }
    md.push('\n');
}

/// The mean over `tasks` of each task's mean `value` for `method` at its budget, with a
/// bootstrap interval that resamples within each task (n counts samples over all tasks).
/// Empty unless every task has rows there: an average over fewer tasks compares unlike
/// things.
fn task_average(
    g: &Groups<'_>,
    tasks: &[&str],
    p: Protocol,
    (method, b): (&str, Column),
    value: fn(&ResultRow) -> f64,
) -> Estimate {
    let groups: Vec<Vec<f64>> =
        tasks.iter().map(|t| g.rows(t, p, method, b).iter().map(|r| value(r)).collect()).collect();
    stratified_unless_missing(&groups)
}

/// The stratified bootstrap of `groups`, empty if a group is.
fn stratified_unless_missing(groups: &[Vec<f64>]) -> Estimate {
    if groups.iter().any(Vec::is_empty) {
        Estimate::EMPTY
    } else {
        stratified_bootstrap_mean(groups)
    }
}

/// [`task_average`] of `value(method) - value(reference)` on the samples both ran: per task
/// the mean of the per-sample differences, averaged over the tasks. Pairing removes the
/// spread between samples that both share.
fn paired_task_average(
    g: &Groups<'_>,
    tasks: &[&str],
    p: Protocol,
    (method, b): (&str, Column),
    (reference, rb): (&str, Column),
    value: fn(&ResultRow) -> f64,
) -> Estimate {
    let groups: Vec<Vec<f64>> = tasks
        .iter()
        .map(|t| {
            let base: BTreeMap<&str, f64> = g
                .rows(t, p, reference, rb)
                .iter()
                .map(|r| (r.sample_id.as_str(), value(r)))
                .collect();
            g.rows(t, p, method, b)
                .iter()
                .filter_map(|r| base.get(r.sample_id.as_str()).map(|x| value(r) - x))
                .collect()
        })
        .collect();
    stratified_unless_missing(&groups)
}

/// One table row: the protocol, the method's label, then the cells.
fn write_row(md: &mut String, p: Protocol, label: &str, cells: &[String]) {
    let _ = writeln!(md, "| {} | {label} | {} |", p.name(), cells.join(" | "));
}

/// Score by depth (rows) and length (columns), one panel per method, one figure per
/// protocol at the budget nearest 35%.
fn draw_depth_heatmaps(
    rows: &[ResultRow],
    g: &Groups<'_>,
    task: &str,
    protocols: &[Protocol],
    budgets: &[Column],
    dir: &Path,
) -> Result<()> {
    let task_rows: Vec<&ResultRow> = rows.iter().filter(|r| r.task == task).collect();
    let depths: BTreeSet<u32> = task_rows.iter().filter_map(|r| r.depth.map(pct)).collect();
    let lengths: BTreeSet<usize> = task_rows.iter().map(|r| r.length).collect();
    let Some(&budget) = budgets.iter().min_by_key(|b| b.distance_to_35()) else {
        return Ok(());
    };
    if depths.is_empty() {
        return Ok(());
    }
    for &p in protocols {
        let panel = |method: &str| {
            let values = depths
                .iter()
                .map(|&d| {
                    lengths
                        .iter()
                        .map(|&l| {
                            let scores: Vec<f64> = g
                                .rows(task, p, method, budget)
                                .iter()
                                .filter(|r| r.length == l && r.depth.map(pct) == Some(d))
                                .map(|r| r.score)
                                .collect();
                            bootstrap_mean(&scores).mean
                        })
                        .collect()
                })
                .collect();
            HeatmapPanel {
                title: if method == "full" {
                    "full cache".into()
                } else {
                    format!("{} @ {budget}", display_label(method))
                },
                x_label: "context length (tokens)".into(),
                y_label: "needle depth (%)".into(),
                x_ticks: lengths.iter().map(|l| l.to_string()).collect(),
                y_ticks: depths.iter().map(|d| d.to_string()).collect(),
                values,
            }
        };
        let panels: Vec<HeatmapPanel> =
            std::iter::once(panel("full")).chain(g.methods.iter().map(|m| panel(m))).collect();
        heatmap_grid(
            &dir.join(format!("{task}_{}_depth_heatmap_{}.png", p.name(), budget.file_tag())),
            &panels,
            (330, 330),
            (0.0, 1.0),
            true,
        )?;
    }
    Ok(())
}

/// Writes `path` through a synced temporary file and a rename, so a crash leaves the old
/// file or the new one, never half of one.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp).map_err(EvalError::io(&tmp))?;
    file.write_all(bytes).and_then(|_| file.sync_all()).map_err(EvalError::io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(EvalError::io(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::tests::row;
    use crate::stats::wilson;

    #[test]
    fn tables_hold_intervals_flags_and_paired_differences() {
        let dir = std::env::temp_dir().join(format!("kvmerger-report-{}", std::process::id()));
        let mut rows = Vec::new();
        for s in 0..4 {
            let id = format!("s{s}");
            rows.push(row(&id, "full", 1.0, 1.0));
            rows.push(row(&id, "kvmerger@50%", 0.5, 1.0));
            let mut h = row(&id, "h2o@50%", 0.5, f64::from(s % 2));
            h.kl = 0.1 + 0.05 + 0.01 * s as f64;
            rows.push(h);
            // h2o at 35% keeps 30%: off its budget.
            let mut off = row(&id, "h2o@35%", 0.35, 0.0);
            off.achieved_ratio = 0.30;
            rows.push(off);
        }
        let md = write_report(&rows, &dir, "test", "kvmerger eval", &[]).unwrap();
        // h2o at 50%: 2 of 4 right, Wilson interval.
        let w = wilson(2, 4);
        let cell = format!("0.50 [{:.2}, {:.2}] (4)", w.low, w.high);
        assert!(
            md.contains(&format!("| context | h2o | 0.00 [0.00, 0.49] (4) ⚠ | {cell} |")),
            "{md}"
        );
        assert!(md.contains("| context | h2o | 0.300 ⚠ 4/4 | 0.500 |"), "{md}");
        // Paired KL: h2o - kvmerger = 0.05 + 0.01 s, mean 0.065, every difference positive.
        let paired =
            md.lines().find(|l| l.starts_with("| context | h2o | – | **0.065 [")).expect(&md);
        assert!(paired.contains("(4) +65%**"), "{paired}");
        for png in ["passkey_score_vs_budget.png", "passkey_kl_vs_budget.png"] {
            let meta = std::fs::metadata(dir.join(png)).unwrap();
            assert!(meta.len() > 2000, "{png} is {} bytes", meta.len());
        }
        assert!(dir.join("passkey_context_depth_heatmap_35.png").exists());
        let csv = std::fs::read_to_string(dir.join("summary.csv")).unwrap();
        assert!(csv.contains("passkey,context,\"full\",1,4,1.000000"), "{csv}");
        assert!(csv.contains("passkey,context,\"h2o\",0.35,4,"), "{csv}");
        // Shards merged in another sample order (each sample's methods still in the order
        // they ran) give the same report.
        let mut shuffled = rows.clone();
        shuffled.sort_by(|a, b| b.sample_id.cmp(&a.sample_id));
        let again = write_report(&shuffled, &dir, "test", "kvmerger eval", &[]).unwrap();
        assert_eq!(md, again);
    }

    /// Columns are the budgets asked for, not the share each sample kept; one interval kind
    /// per table; a baseline-only run fills the full cache's column.
    #[test]
    fn columns_are_the_budgets_asked_for() {
        let dir = std::env::temp_dir().join(format!("kvmerger-columns-{}", std::process::id()));
        let mut rows = Vec::new();
        for (s, share) in [0.24, 0.25, 0.26, 1.0].into_iter().enumerate() {
            let id = format!("s{s}");
            rows.push(row(&id, "full", 1.0, 0.5));
            let mut h = row(&id, "h2o@100 tokens", share, 0.0);
            h.achieved_ratio = share;
            rows.push(h);
        }
        let md = write_report(&rows, &dir, "test", "kvmerger eval", &[]).unwrap();
        assert!(md.contains("| protocol | method | 100 tokens |\n"), "{md}");
        assert!(!md.contains(" 24% |") && !md.contains(" 26% |"), "{md}");
        // Graded scores somewhere in the task: the bootstrap everywhere, also for the cell
        // whose scores are all 0.
        assert!(md.contains("### Score (mean, bootstrap") && !md.contains("Wilson 95%"), "{md}");
        assert!(md.contains("| context | h2o | 0.00 [0.00, 0.00] (4) |"), "{md}");

        let baseline: Vec<ResultRow> = rows.into_iter().filter(|r| r.method == "full").collect();
        let md = write_report(&baseline, &dir, "test", "kvmerger eval", &[]).unwrap();
        assert!(md.contains("| protocol | method | 100% |\n"), "{md}");
        assert!(md.contains("| context | full cache | 0.50 [0.50, 0.50] (4) |"), "{md}");
    }

    /// RULER's average: the mean of the subtasks' means, empty where a subtask has no rows.
    #[test]
    fn ruler_subtasks_are_averaged_with_an_interval() {
        let dir = std::env::temp_dir().join(format!("kvmerger-ruler-avg-{}", std::process::id()));
        let mut rows = Vec::new();
        for (task, scores) in [("niah_single_1", [1.0, 1.0]), ("vt", [0.5, 0.5])] {
            for (s, score) in scores.into_iter().enumerate() {
                let id = format!("{task}-s{s}");
                for (method, budget) in [("full", 1.0), ("kvmerger@50%", 0.5)] {
                    let mut r = row(&id, method, budget, score);
                    r.task = task.into();
                    rows.push(r);
                }
                if task == "vt" {
                    let mut r = row(&id, "h2o@50%", 0.5, 0.0);
                    r.task = task.into();
                    rows.push(r);
                }
            }
        }
        let md = write_report(&rows, &dir, "test", "kvmerger eval", &[]).unwrap();
        assert!(md.contains("## RULER: average over 2 subtasks"), "{md}");
        // (1 + 0.5) / 2, with no spread inside either subtask; n counts samples.
        assert!(md.contains("| context | full cache | 0.75 [0.75, 0.75] (4) |"), "{md}");
        assert!(md.contains("| context | kvmerger | 0.75 [0.75, 0.75] (4) |"), "{md}");
        // h2o ran vt only: no average, and no paired difference.
        assert!(md.contains("| context | h2o | – |"), "{md}");
        assert!(md.contains("### RULER average: difference to kvmerger"), "{md}");
        assert!(md.contains("| context | h2o | – |\n\n"), "{md}");
        assert!(dir.join("ruler_average_score_vs_budget.png").exists());
        // One subtask: no average section.
        let one: Vec<ResultRow> = rows.into_iter().filter(|r| r.task == "vt").collect();
        let md = write_report(&one, &dir, "test", "kvmerger eval", &[]).unwrap();
        assert!(!md.contains("RULER: average"), "{md}");
    }

    /// The paired difference of RULER averages: per subtask the mean of per-sample
    /// differences, averaged over subtasks; bold where its interval excludes 0.
    #[test]
    fn ruler_averages_are_compared_paired_by_sample() {
        let dir = std::env::temp_dir().join(format!("kvmerger-ruler-diff-{}", std::process::id()));
        let mut rows = Vec::new();
        // kvmerger scores 1, 0, 1, 0 on each subtask's samples; snapkv 1, 1, 1, 1 on
        // niah_single_1 (+0.5) and the same as kvmerger on vt (0): average +0.25.
        for task in ["niah_single_1", "vt"] {
            for s in 0..4 {
                let id = format!("{task}-s{s}");
                let base = if s % 2 == 0 { 1.0 } else { 0.0 };
                let other = if task == "vt" { base } else { 1.0 };
                for (method, score) in
                    [("full", 1.0), ("kvmerger@50%", base), ("snapkv@50%", other)]
                {
                    let budget = if method == "full" { 1.0 } else { 0.5 };
                    let mut r = row(&id, method, budget, score);
                    r.task = task.into();
                    rows.push(r);
                }
            }
        }
        let md = write_report(&rows, &dir, "test", "kvmerger eval", &[]).unwrap();
        let line = md
            .lines()
            .skip_while(|l| !l.starts_with("### RULER average: difference to kvmerger"))
            .find(|l| l.starts_with("| context | snapkv |"))
            .unwrap_or_else(|| panic!("{md}"));
        assert!(line.contains("0.25 ["), "{line}");
        assert!(line.contains("(8)"), "{line}");
        // Each resample of niah_single_1's differences (0.5 each on average, 0 or 1) and vt's
        // (all 0) keeps the average between 0 and 0.5.
        let e = {
            let groups = vec![vec![0.0, 1.0, 0.0, 1.0], vec![0.0; 4]];
            stratified_bootstrap_mean(&groups)
        };
        assert!(e.low >= 0.0 && e.high <= 0.5, "{e:?}");
    }

    #[test]
    fn long_list_parameters_are_shortened_in_labels() {
        let label = format!("kvmerger(layer_budgets=[{}];mass=log_count)", ["0.35"; 30].join(","));
        assert_eq!(display_label(&label), "kvmerger(layer_budgets=[30 values];mass=log_count)");
        assert_eq!(display_label("h2o"), "h2o");
        assert_eq!(display_label("x(a=[1,2])"), "x(a=[1,2])");
    }
}
