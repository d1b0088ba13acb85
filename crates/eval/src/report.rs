//! The report: Markdown tables, a CSV summary and PNG plots from result rows.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::error::{EvalError, Result};
use crate::plot::{heatmap_grid, line_chart, HeatmapPanel, Series};
use crate::results::ResultRow;

/// Mean, sample standard deviation and count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stat {
    pub mean: f64,
    pub std: f64,
    pub n: usize,
}

impl Stat {
    pub fn of(values: impl IntoIterator<Item = f64>) -> Self {
        let v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
        let n = v.len();
        if n == 0 {
            return Self { mean: f64::NAN, std: f64::NAN, n };
        }
        let mean = v.iter().sum::<f64>() / n as f64;
        let var = if n > 1 {
            v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64
        } else {
            0.0
        };
        Self { mean, std: var.sqrt(), n }
    }
}

/// `budget` in percent, as a key that sorts.
fn pct(b: f64) -> u32 {
    (b * 100.0).round() as u32
}

/// Rows grouped by task, method name and budget.
struct Groups<'a> {
    by: BTreeMap<(String, String, u32), Vec<&'a ResultRow>>,
    tasks: BTreeSet<String>,
    methods: Vec<String>,
    budgets: BTreeSet<u32>,
}

impl<'a> Groups<'a> {
    fn new(rows: &'a [ResultRow]) -> Self {
        let mut by: BTreeMap<_, Vec<_>> = BTreeMap::new();
        let mut methods = Vec::new();
        for r in rows {
            let name = r.method_name().to_string();
            if name != "full" && !methods.contains(&name) {
                methods.push(name.clone());
            }
            by.entry((r.task.clone(), name, pct(r.budget))).or_default().push(r);
        }
        let tasks = rows.iter().map(|r| r.task.clone()).collect();
        let budgets =
            rows.iter().filter(|r| r.method_name() != "full").map(|r| pct(r.budget)).collect();
        Self { by, tasks, methods, budgets }
    }

    fn stat(&self, task: &str, method: &str, budget: u32, f: impl Fn(&ResultRow) -> f64) -> Stat {
        let budget = if method == "full" { 100 } else { budget };
        Stat::of(
            self.by
                .get(&(task.to_string(), method.to_string(), budget))
                .into_iter()
                .flatten()
                .map(|r| f(r)),
        )
    }
}

fn cell(s: Stat, digits: usize) -> String {
    if s.n == 0 {
        "–".into()
    } else {
        format!("{:.d$} ± {:.d$} ({})", s.mean, s.std, s.n, d = digits)
    }
}

/// Writes `report.md`, `summary.csv` and the plots into `dir`. Returns the Markdown.
pub fn write_report(rows: &[ResultRow], dir: &Path, title: &str, command: &str) -> Result<String> {
    std::fs::create_dir_all(dir).map_err(EvalError::io(dir))?;
    let g = Groups::new(rows);
    let mut md = String::new();
    let _ = writeln!(md, "# {title}\n\nRegenerate with:\n\n```sh\n{command}\n```\n");
    let _ = writeln!(md, "{} rows. Cells are mean ± standard deviation (n) over samples and seeds; the full cache's row is the reference each method is compared with.\n", rows.len());
    let budgets: Vec<u32> = g.budgets.iter().copied().collect();
    let header = |first: &str| {
        let mut h = format!("| {first} |");
        budgets.iter().for_each(|b| h.push_str(&format!(" {b}% |")));
        h.push_str("\n|---|");
        budgets.iter().for_each(|_| h.push_str("---:|"));
        h
    };
    type Column = fn(&ResultRow) -> f64;
    let metric_tables: [(&str, Column, usize); 3] = [
        ("Score", |r| r.score, 2),
        ("KL divergence from the full cache (teacher-forced, nats/token)", |r| r.kl, 3),
        ("Top-1 agreement with the full cache", |r| r.top1_agreement, 2),
    ];
    let mut csv = String::from("task,method,budget,n,score_mean,score_std,kl_mean,top1_mean,matched_prefix_mean,achieved_ratio_mean,resident_kv_mib_mean\n");
    for task in &g.tasks {
        let _ = writeln!(md, "## {task}\n");
        for (name, f, digits) in metric_tables {
            let name = if task == "perplexity" && name == "Score" {
                "Perplexity of the continuation (lower is better)"
            } else {
                name
            };
            let _ = writeln!(md, "### {name}\n\n{}", header("method"));
            for method in std::iter::once("full".to_string()).chain(g.methods.iter().cloned()) {
                let label =
                    if method == "full" { "full cache".to_string() } else { method.clone() };
                let cells: Vec<String> =
                    budgets.iter().map(|&b| cell(g.stat(task, &method, b, f), digits)).collect();
                let _ = writeln!(md, "| {label} | {} |", cells.join(" | "));
            }
            md.push('\n');
        }
        for method in &g.methods {
            for &b in &budgets {
                let s = g.stat(task, method, b, |r| r.score);
                if s.n == 0 {
                    continue;
                }
                let m = |f: fn(&ResultRow) -> f64| g.stat(task, method, b, f).mean;
                let _ = writeln!(
                    csv,
                    "{task},\"{}\",{},{},{:.6},{:.6},{:.6},{:.6},{:.3},{:.6},{:.4}",
                    method.replace('"', "\"\""),
                    b as f64 / 100.0,
                    s.n,
                    s.mean,
                    s.std,
                    m(|r| r.kl),
                    m(|r| r.top1_agreement),
                    m(|r| r.matched_prefix_tokens as f64),
                    m(|r| r.achieved_ratio),
                    m(|r| r.resident_kv_bytes as f64 / 1048576.0)
                );
            }
        }
        draw_task_plots(rows, &g, task, &budgets, dir)?;
    }
    let _ = writeln!(
        md,
        "## Memory and time\n\n{}",
        header("method: achieved ratio / resident KV MiB / decode ms per sample")
    );
    for method in &g.methods {
        let cells: Vec<String> = budgets
            .iter()
            .map(|&b| {
                let all = |f: fn(&ResultRow) -> f64| {
                    Stat::of(
                        g.tasks
                            .iter()
                            .flat_map(|t| g.by.get(&(t.clone(), method.clone(), b)))
                            .flatten()
                            .map(|r| f(r)),
                    )
                    .mean
                };
                format!(
                    "{:.3} / {:.1} / {:.0}",
                    all(|r| r.achieved_ratio),
                    all(|r| r.resident_kv_bytes as f64 / 1048576.0),
                    all(|r| r.decode_ms)
                )
            })
            .collect();
        let _ = writeln!(md, "| {method} | {} |", cells.join(" | "));
    }
    let full_mib = Stat::of(
        rows.iter()
            .filter(|r| r.method_name() == "full")
            .map(|r| r.full_kv_bytes as f64 / 1048576.0),
    )
    .mean;
    let _ = writeln!(
        md,
        "\nThe full cache holds {full_mib:.1} MiB of keys and values per sample on average.\n"
    );
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

fn draw_task_plots(
    rows: &[ResultRow],
    g: &Groups<'_>,
    task: &str,
    budgets: &[u32],
    dir: &Path,
) -> Result<()> {
    let line = |f: fn(&ResultRow) -> f64, method: &str| -> Vec<(f64, f64)> {
        budgets
            .iter()
            .map(|&b| (b as f64 / 100.0, g.stat(task, method, b, f).mean))
            .filter(|p| p.1.is_finite())
            .collect()
    };
    let full = |f: fn(&ResultRow) -> f64| g.stat(task, "full", 100, f).mean;
    let (x0, x1) = (
        budgets.first().copied().unwrap_or(0) as f64 / 100.0,
        budgets.last().copied().unwrap_or(100) as f64 / 100.0,
    );
    let is_ppl = task == "perplexity";
    let (score_of, label): (fn(&ResultRow) -> f64, &str) =
        if is_ppl { (|r| r.perplexity, "perplexity") } else { (|r| r.score, "score") };
    let mut series: Vec<Series> = g
        .methods
        .iter()
        .map(|m| Series { label: m.clone(), points: line(score_of, m), dashed: false })
        .collect();
    if full(score_of).is_finite() {
        series.push(Series {
            label: "full cache".into(),
            points: vec![(x0, full(score_of)), (x1, full(score_of))],
            dashed: true,
        });
    }
    let range = if is_ppl { None } else { Some((0.0, 1.05)) };
    line_chart(
        &dir.join(format!("{task}_score_vs_budget.png")),
        &format!("{task}: {label} vs KV budget"),
        "budget (share of the full cache)",
        label,
        &series,
        range,
    )?;
    let kl: Vec<Series> = g
        .methods
        .iter()
        .map(|m| Series { label: m.clone(), points: line(|r| r.kl, m), dashed: false })
        .collect();
    line_chart(
        &dir.join(format!("{task}_kl_vs_budget.png")),
        &format!("{task}: KL(full || method) vs KV budget"),
        "budget (share of the full cache)",
        "KL (nats/token)",
        &kl,
        None,
    )?;
    if task == "passkey" || task == "needle" {
        draw_depth_heatmaps(rows, g, task, budgets, dir)?;
    }
    Ok(())
}

/// Score by depth (rows) and length (columns), one panel per method, one figure per budget.
fn draw_depth_heatmaps(
    rows: &[ResultRow],
    g: &Groups<'_>,
    task: &str,
    budgets: &[u32],
    dir: &Path,
) -> Result<()> {
    let task_rows: Vec<&ResultRow> = rows.iter().filter(|r| r.task == task).collect();
    let depths: BTreeSet<u32> = task_rows.iter().filter_map(|r| r.depth.map(pct)).collect();
    let lengths: BTreeSet<usize> = task_rows.iter().map(|r| r.length).collect();
    if depths.is_empty() {
        return Ok(());
    }
    let panel = |method: &str, budget: u32| {
        let values = depths
            .iter()
            .map(|&d| {
                lengths
                    .iter()
                    .map(|&l| {
                        let s = Stat::of(
                            task_rows
                                .iter()
                                .filter(|r| {
                                    r.method_name() == method
                                        && (method == "full" || pct(r.budget) == budget)
                                        && r.length == l
                                        && r.depth.map(pct) == Some(d)
                                })
                                .map(|r| r.score),
                        );
                        if s.n == 0 {
                            f64::NAN
                        } else {
                            s.mean
                        }
                    })
                    .collect()
            })
            .collect();
        HeatmapPanel {
            title: if method == "full" {
                "full cache".into()
            } else {
                format!("{method} @ {budget}%")
            },
            x_label: "context length (tokens)".into(),
            y_label: "needle depth (%)".into(),
            x_ticks: lengths.iter().map(|l| l.to_string()).collect(),
            y_ticks: depths.iter().map(|d| d.to_string()).collect(),
            values,
        }
    };
    for &b in budgets {
        let panels: Vec<HeatmapPanel> = std::iter::once(panel("full", b))
            .chain(g.methods.iter().map(|m| panel(m, b)))
            .collect();
        heatmap_grid(
            &dir.join(format!("{task}_depth_heatmap_{b}.png")),
            &panels,
            (360, 330),
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

    #[test]
    fn tables_hold_hand_computed_means_and_plots_are_written() {
        let dir = std::env::temp_dir().join(format!("kvmerger-report-{}", std::process::id()));
        let rows = vec![
            row("s0", "full", 1.0, 1.0),
            row("s1", "full", 1.0, 1.0),
            row("s0", "h2o@50%", 0.5, 1.0),
            row("s1", "h2o@50%", 0.5, 0.0),
            row("s0", "kvmerger@50%", 0.5, 1.0),
            row("s1", "kvmerger@50%", 0.5, 1.0),
            row("s0", "h2o@35%", 0.35, 0.0),
            row("s1", "h2o@35%", 0.35, 0.0),
        ];
        let md = write_report(&rows, &dir, "test", "kvmerger eval").unwrap();
        // h2o at 50%: mean of 1 and 0 = 0.5, sample std = 0.71.
        assert!(md.contains("| h2o | 0.00 ± 0.00 (2) | 0.50 ± 0.71 (2) |"), "{md}");
        assert!(md.contains("| full cache | 1.00 ± 0.00 (2) | 1.00 ± 0.00 (2) |"), "{md}");
        assert!(md.contains("| kvmerger | – | 1.00 ± 0.00 (2) |"), "{md}");
        for png in [
            "passkey_score_vs_budget.png",
            "passkey_kl_vs_budget.png",
            "passkey_depth_heatmap_50.png",
        ] {
            let meta = std::fs::metadata(dir.join(png)).unwrap();
            assert!(meta.len() > 2000, "{png} is {} bytes", meta.len());
        }
        let csv = std::fs::read_to_string(dir.join("summary.csv")).unwrap();
        assert!(csv.contains("passkey,\"h2o\",0.5,2,0.500000"), "{csv}");
    }
}
