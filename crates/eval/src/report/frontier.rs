//! The equal-bytes frontier: every cache of the rows (a method at a budget, in a dtype, or
//! both stacked) as a point at its resident KV bytes, a share of the full cache's on the
//! same sample, against its score averaged over the tasks and its KL; the points joined per
//! family, the Pareto frontier drawn, who is on it at a few shares named, and the stacks
//! compared with the full quantized caches they undercut, paired by sample.
//!
//! Written when the rows hold more than one cache dtype (the `frontier` presets).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

use kvmerger_compress::KvDtype;

use super::{display_label, fmt_estimate, paired_task_average, task_average, Column, Groups, KL};
use crate::error::Result;
use crate::plot::{line_charts, LineChart, Series};
use crate::results::ResultRow;
use crate::runner::Protocol;
use crate::stats::Estimate;

/// Shares of the full cache's bytes at which the table names the frontier: q8_0's and
/// q4_0's keys and values (34 and 18 bytes a block of 32 against 64), and two below.
pub const FRONTIER_SHARES: [f64; 4] = [0.53, 0.28, 0.18, 0.10];

/// One cache of the rows.
struct Point {
    /// The rows' method label (`full`, `kvmerger@50%`, `kvmerger/q8_0@50%`).
    method: String,
    column: Column,
    /// Shown as `kvmerger/q8_0@50%`, `full/q4_0r`: every point names its dtype.
    label: String,
    /// The points joined by one line: `full cache`, `kvmerger/f16`, `kvmerger/q8_0`.
    family: String,
    /// Mean over rows of resident bytes / the full cache's resident bytes, same sample.
    share: f64,
    score: Estimate,
    kl: Estimate,
}

impl Point {
    fn is_full(&self) -> bool {
        self.method == "full" || self.method.starts_with("full/")
    }
}

/// Whether the rows compare caches of several dtypes.
pub(super) fn applies(rows: &[ResultRow]) -> bool {
    rows.iter().map(|r| r.kv_dtype).collect::<BTreeSet<KvDtype>>().len() > 1
}

/// Writes the frontier section of every protocol into `md` and `frontier_<protocol>.png`.
pub(super) fn write_frontier(md: &mut String, g: &Groups<'_>, dir: &Path) -> Result<()> {
    let scored: Vec<&str> =
        g.tasks.iter().map(String::as_str).filter(|t| *t != "perplexity").collect();
    let all: Vec<&str> = g.tasks.iter().map(String::as_str).collect();
    if scored.is_empty() {
        return Ok(());
    }
    for &p in &g.protocols {
        let points = points(g, p, &scored, &all);
        let Some(base) = points.iter().find(|x| x.method == "full") else { continue };
        let base_label = base.label.clone();
        let _ = writeln!(
            md,
            "## Equal-bytes frontier ({} protocol)\n\nEach cache as a point: x is its resident \
             KV bytes (keys, values, scales and the 16-byte entry records) as a share of the \
             {base_label} cache's on the same sample, averaged over samples; the score is the \
             mean over the {} scored tasks of each task's mean score, with a bootstrap 95% \
             interval resampling within each task; KL is against the {base_label} cache (mean \
             over all tasks). The frontier at a share is the best-scoring point at or below it; \
             its difference to {base_label} is paired by sample within each task.\n",
            p.name(),
            scored.len()
        );
        let _ = writeln!(
            md,
            "| share of {base_label} bytes | on the frontier | bytes | score | KL | score − \
             {base_label} (paired) |\n|---:|---|---:|---:|---:|---:|"
        );
        for share in FRONTIER_SHARES {
            let best = points
                .iter()
                .filter(|x| x.share <= share && x.score.n > 0)
                .max_by(|a, b| a.score.mean.total_cmp(&b.score.mean));
            let Some(best) = best else {
                let _ = writeln!(md, "| {:.0}% | (no point at or below) | | | | |", share * 100.0);
                continue;
            };
            let diff = paired_task_average(
                g,
                &scored,
                p,
                (&best.method, best.column),
                ("full", Column::FULL),
                |r| r.score,
            );
            let _ = writeln!(
                md,
                "| {:.0}% | {} | {:.1}% | {} | {} | {} |",
                share * 100.0,
                best.label,
                best.share * 100.0,
                fmt_estimate(best.score, 2),
                fmt_estimate(best.kl, 3),
                bold_if_excludes_zero(diff, 2)
            );
        }
        md.push('\n');
        write_stacks_against_quantized_caches(md, g, p, &scored, &points);
        write_points(md, &points);
        draw(p, &points, &base_label, dir)?;
    }
    Ok(())
}

/// Every (method, budget) of protocol `p` with rows, with its bytes, score and KL.
fn points(g: &Groups<'_>, p: Protocol, scored: &[&str], all: &[&str]) -> Vec<Point> {
    let full_bytes: BTreeMap<(&str, &str), f64> = all
        .iter()
        .flat_map(|t| g.rows(t, p, "full", Column::FULL))
        .map(|r| ((r.task.as_str(), r.sample_id.as_str()), r.resident_kv_bytes as f64))
        .collect();
    let keys: BTreeSet<(&str, Column)> =
        g.by.keys().filter(|k| k.1 == p).map(|k| (k.2.as_str(), k.3)).collect();
    let mut out: Vec<Point> = keys
        .into_iter()
        .filter_map(|(method, column)| {
            let rows: Vec<&ResultRow> =
                all.iter().flat_map(|t| g.rows(t, p, method, column)).copied().collect();
            let first = rows.first()?;
            let shares: Vec<f64> = rows
                .iter()
                .filter_map(|r| {
                    let full = full_bytes.get(&(r.task.as_str(), r.sample_id.as_str()))?;
                    (*full > 0.0).then(|| r.resident_kv_bytes as f64 / full)
                })
                .collect();
            if shares.is_empty() {
                return None;
            }
            let dtype = first.kv_dtype.name();
            let named = if method.split('@').next()?.ends_with(&format!("/{dtype}")) {
                method.split('@').next()?.to_string()
            } else {
                format!("{}/{dtype}", method.split('@').next()?)
            };
            let is_full = method == "full" || method.starts_with("full/");
            Some(Point {
                method: method.to_string(),
                column,
                label: if is_full {
                    format!("full/{dtype}")
                } else {
                    display_label(&format!("{named}@{column}"))
                },
                family: if is_full { "full cache".into() } else { display_label(&named) },
                share: shares.iter().sum::<f64>() / shares.len() as f64,
                score: task_average(g, scored, p, (method, column), |r| r.score),
                kl: task_average(g, all, p, (method, column), KL.value),
            })
        })
        .collect();
    out.sort_by(|a, b| b.share.total_cmp(&a.share));
    out
}

/// Each compressed family against each full cache stored in another dtype than the
/// reference's: the family's point with the most bytes at or below that cache's, paired by
/// sample (above 0: the compressed cache scores higher in no more memory).
fn write_stacks_against_quantized_caches(
    md: &mut String,
    g: &Groups<'_>,
    p: Protocol,
    scored: &[&str],
    points: &[Point],
) {
    let quantized: Vec<&Point> =
        points.iter().filter(|x| x.is_full() && x.method != "full").collect();
    if quantized.is_empty() {
        return;
    }
    let _ = writeln!(
        md,
        "### Compressed caches against full quantized caches, at no more bytes\n\nFor each \
         full cache in another dtype, each family's point with the most bytes at or below \
         it; differences (point − full cache) paired by sample within each task, **bold** \
         where the 95% interval excludes 0.\n\n| full cache | bytes | compressed cache | \
         bytes | score difference | KL difference |\n|---|---:|---|---:|---:|---:|"
    );
    let families: BTreeSet<&str> =
        points.iter().filter(|x| !x.is_full()).map(|x| x.family.as_str()).collect();
    for full in quantized {
        for family in &families {
            // Points are sorted by bytes, most first.
            let Some(point) = points.iter().find(|x| x.family == *family && x.share <= full.share)
            else {
                continue;
            };
            let paired = |value: fn(&ResultRow) -> f64| {
                paired_task_average(
                    g,
                    scored,
                    p,
                    (&point.method, point.column),
                    (&full.method, Column::FULL),
                    value,
                )
            };
            let _ = writeln!(
                md,
                "| {} | {:.1}% | {} | {:.1}% | {} | {} |",
                full.label,
                full.share * 100.0,
                point.label,
                point.share * 100.0,
                bold_if_excludes_zero(paired(|r| r.score), 2),
                bold_if_excludes_zero(paired(KL.value), 3)
            );
        }
    }
    md.push('\n');
}

/// Every point, most bytes first.
fn write_points(md: &mut String, points: &[Point]) {
    let _ = writeln!(
        md,
        "### Every point\n\n| cache | family | bytes | score | KL |\n|---|---|---:|---:|---:|"
    );
    for x in points {
        let _ = writeln!(
            md,
            "| {} | {} | {:.1}% | {} | {} |",
            x.label,
            x.family,
            x.share * 100.0,
            fmt_estimate(x.score, 2),
            fmt_estimate(x.kl, 3)
        );
    }
    md.push('\n');
}

fn bold_if_excludes_zero(e: Estimate, digits: usize) -> String {
    let text = fmt_estimate(e, digits);
    if e.excludes(0.0) {
        format!("**{text}**")
    } else {
        text
    }
}

/// Indices of the points on the Pareto frontier of `value` (higher is better when
/// `higher`): those no point with at most their bytes beats, fewest bytes first.
fn pareto(points: &[Point], value: fn(&Point) -> f64, higher: bool) -> Vec<usize> {
    let mut order: Vec<usize> =
        (0..points.len()).filter(|&i| value(&points[i]).is_finite()).collect();
    let better = |a: f64, b: f64| if higher { a > b } else { a < b };
    // Fewest bytes first; at equal bytes the better value first, so it alone is kept.
    order.sort_by(|&a, &b| {
        let (x, y) = (value(&points[a]), value(&points[b]));
        points[a].share.total_cmp(&points[b].share).then(if higher {
            y.total_cmp(&x)
        } else {
            x.total_cmp(&y)
        })
    });
    let mut best: Option<f64> = None;
    order
        .into_iter()
        .filter(|&i| {
            let v = value(&points[i]);
            let keep = best.is_none_or(|b| better(v, b));
            if keep {
                best = Some(v);
            }
            keep
        })
        .collect()
}

/// Score and KL against bytes, one line per family, the Pareto frontier dashed.
fn draw(p: Protocol, points: &[Point], base: &str, dir: &Path) -> Result<()> {
    let families: Vec<&str> = {
        let mut f: Vec<&str> = Vec::new();
        // The full caches first, then the families in the order their points appear.
        for x in points.iter().filter(|x| x.is_full()).chain(points.iter().filter(|x| !x.is_full()))
        {
            if !f.contains(&x.family.as_str()) {
                f.push(&x.family);
            }
        }
        f
    };
    let chart = |title: &str,
                 y_label: &str,
                 value: fn(&Point) -> f64,
                 estimate: fn(&Point) -> Estimate,
                 higher: bool| {
        let mut series = Vec::new();
        let mut intervals = Vec::new();
        for family in &families {
            let mut members: Vec<&Point> =
                points.iter().filter(|x| x.family == *family && value(x).is_finite()).collect();
            members.sort_by(|a, b| a.share.total_cmp(&b.share));
            series.push(Series {
                label: family.to_string(),
                points: members.iter().map(|x| (100.0 * x.share, value(x))).collect(),
                dashed: false,
            });
            intervals.push(members.iter().map(|x| (estimate(x).low, estimate(x).high)).collect());
        }
        series.push(Series {
            label: "Pareto frontier".into(),
            points: pareto(points, value, higher)
                .into_iter()
                .map(|i| (100.0 * points[i].share, value(&points[i])))
                .collect(),
            dashed: true,
        });
        intervals.push(Vec::new());
        LineChart {
            title: format!("{title}, {} protocol", p.name()),
            x_label: format!("resident KV bytes (% of the {base} cache)"),
            y_label: y_label.into(),
            series,
            intervals,
            reference: None,
            y_range: None,
            nudge: false,
        }
    };
    let charts = [
        chart(
            "Score against bytes",
            "score (mean over tasks)",
            |x| x.score.mean,
            |x| x.score,
            true,
        ),
        chart(
            "KL against bytes",
            "KL from the full cache, nats/token",
            |x| x.kl.mean,
            |x| x.kl,
            false,
        ),
    ];
    line_charts(&dir.join(format!("frontier_{}.png", p.name())), &charts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::write_report;
    use crate::results::tests::row;

    /// Rows of two tasks, four samples each: the full cache in f16 (100 bytes, all right),
    /// in q8_0 (56 bytes, all right) and q4_0 (32 bytes, half right), KVMerger at 50% in f16
    /// (50 bytes, all right) and on q8_0 (28 bytes, all right but one).
    fn frontier_rows() -> Vec<ResultRow> {
        let mut rows = Vec::new();
        for task in ["niah_single_1", "vt"] {
            for s in 0..4 {
                let id = format!("{task}-s{s}");
                let caches = [
                    ("full", KvDtype::F16, 1.0, 100, 1.0),
                    ("full/q8_0", KvDtype::Q8_0, 1.0, 56, 1.0),
                    ("full/q4_0", KvDtype::Q4_0, 1.0, 32, f64::from(s % 2)),
                    ("kvmerger@50%", KvDtype::F16, 0.5, 50, 1.0),
                    (
                        "kvmerger/q8_0@50%",
                        KvDtype::Q8_0,
                        0.5,
                        28,
                        f64::from(s != 1 || task == "vt"),
                    ),
                ];
                for (method, dtype, budget, bytes, score) in caches {
                    let mut r = row(&id, method, budget, score);
                    r.task = task.into();
                    r.kv_dtype = dtype;
                    r.resident_kv_bytes = bytes;
                    r.kl = 1.0 - budget / 2.0 + f64::from(bytes < 50) * 0.1;
                    rows.push(r);
                }
            }
        }
        rows
    }

    #[test]
    fn the_frontier_names_the_best_point_at_or_below_each_share_and_pairs_the_stacks() {
        let dir = std::env::temp_dir().join(format!("kvmerger-frontier-{}", std::process::id()));
        let rows = frontier_rows();
        assert!(applies(&rows));
        let md = write_report(&rows, &dir, "test", "kvmerger eval", &[]).unwrap();
        assert!(md.contains("## Equal-bytes frontier (context protocol)"), "{md}");
        // At 53%: KVMerger in f16 (50 bytes, all right) beats the cheaper points.
        assert!(md.contains("| 53% | kvmerger/f16@50% | 50.0% | 1.00 "), "{md}");
        // At 28%: KVMerger on q8_0 (28 bytes): 7 of 8 right, -0.125 against the full cache
        // (-0.25 on one task, 0 on the other).
        assert!(md.contains("| 28% | kvmerger/q8_0@50% | 28.0% | 0.88 "), "{md}");
        assert!(md.contains("| -0.12 ["), "{md}");
        assert!(md.contains("| 18% | (no point at or below) |"), "{md}");
        // Against the full q4_0 cache (32 bytes): KVMerger on q8_0 is the kvmerger/q8_0
        // family's point at or below it, +0.375 on average, paired.
        let line = md
            .lines()
            .find(|l| l.starts_with("| full/q4_0 | 32.0% | kvmerger/q8_0@50% | 28.0% |"))
            .unwrap_or_else(|| panic!("{md}"));
        assert!(line.contains("0.38 ["), "{line}");
        // KVMerger in f16 (50 bytes) is not at or below q4_0's 32 bytes.
        assert!(!md.contains("| full/q4_0 | 32.0% | kvmerger/f16@50%"), "{md}");
        assert!(md.contains("| full/q8_0 | 56.0% | kvmerger/f16@50% | 50.0% |"), "{md}");
        assert!(dir.join("frontier_context.png").exists());
        // One dtype: no frontier.
        let f16: Vec<ResultRow> = rows.into_iter().filter(|r| r.kv_dtype == KvDtype::F16).collect();
        assert!(!applies(&f16));
        let md = write_report(&f16, &dir, "test", "kvmerger eval", &[]).unwrap();
        assert!(!md.contains("Equal-bytes frontier"), "{md}");
    }

    fn point(share: f64, score: f64) -> Point {
        let e = Estimate { mean: score, low: score, high: score, n: 1 };
        Point {
            method: format!("m{share}"),
            column: Column::FULL,
            label: String::new(),
            family: String::new(),
            share,
            score: e,
            kl: e,
        }
    }

    #[test]
    fn the_pareto_frontier_keeps_the_points_nothing_cheaper_beats() {
        let points =
            [point(1.0, 0.9), point(0.5, 0.6), point(0.5, 0.7), point(0.3, 0.8), point(0.1, 0.2)];
        // Higher scores: 0.1 (0.2), 0.3 (0.8), then 1.0 (0.9); both 0.5 points lose to 0.3.
        assert_eq!(pareto(&points, |x| x.score.mean, true), vec![4, 3, 0]);
        // Lower is better (KL): only the cheapest, 0.2, and nothing beats it later.
        assert_eq!(pareto(&points, |x| x.kl.mean, false), vec![4]);
    }
}
