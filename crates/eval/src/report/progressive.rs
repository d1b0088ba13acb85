//! Compressing while prefilling against compressing once. For every method that ran both
//! ways (rows `m` and `m/incremental`), what compressing as the prompt streams in costs it:
//! incremental − once, paired by sample over every task; and that cost against the first
//! such method's on the same samples (a difference of two paired differences), which says
//! whether one method loses less than another when it compresses progressively.
//!
//! Written when the rows hold a method run both ways.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::{display_label, fmt_estimate, header, write_row, Column, Groups};
use crate::results::ResultRow;
use crate::runner::Protocol;
use crate::stats::{bootstrap_mean, Estimate};

/// What marks a method's incremental rows (`kvmerger/incremental@35%`).
const INCREMENTAL: &str = "/incremental";

/// One measure of the tables: KL over every task, the score over the tasks that answer.
struct Measure {
    name: &'static str,
    /// The sign of a difference that is a loss, and what it means.
    worse: (&'static str, &'static str),
    value: fn(&ResultRow) -> f64,
    /// Perplexity samples score a perplexity, not an answer: not averaged with answers.
    answers_only: bool,
    digits: usize,
}

const MEASURES: [Measure; 2] = [
    Measure {
        name: "KL",
        worse: ("above 0", "further from the full cache"),
        value: |r| r.kl,
        answers_only: false,
        digits: 3,
    },
    Measure {
        name: "score",
        worse: ("below 0", "fewer right answers"),
        value: |r| r.score,
        answers_only: true,
        digits: 2,
    },
];

/// Methods run both ways, in the order they ran, as (once, incremental) names.
fn pairs(g: &Groups<'_>) -> Vec<(String, String)> {
    g.methods
        .iter()
        .filter(|m| !m.ends_with(INCREMENTAL))
        .map(|m| (m.clone(), format!("{m}{INCREMENTAL}")))
        .filter(|(_, incremental)| g.methods.contains(incremental))
        .collect()
}

/// Whether the rows hold a method run both ways.
pub fn applies(g: &Groups<'_>) -> bool {
    !pairs(g).is_empty()
}

/// Per sample (task, id), `value(incremental) - value(once)` of one method at one budget.
fn losses(
    g: &Groups<'_>,
    p: Protocol,
    (once, incremental): (&str, &str),
    b: Column,
    m: &Measure,
) -> BTreeMap<(String, String), f64> {
    let mut out = BTreeMap::new();
    for task in g.tasks.iter().filter(|t| !m.answers_only || *t != "perplexity") {
        let base: BTreeMap<&str, f64> =
            g.rows(task, p, once, b).iter().map(|r| (r.sample_id.as_str(), (m.value)(r))).collect();
        for r in g.rows(task, p, incremental, b) {
            let Some(x) = base.get(r.sample_id.as_str()) else { continue };
            let d = (m.value)(r) - x;
            if d.is_finite() {
                out.insert((task.clone(), r.sample_id.clone()), d);
            }
        }
    }
    out
}

/// `a - b` on the samples both hold.
fn difference(
    a: &BTreeMap<(String, String), f64>,
    b: &BTreeMap<(String, String), f64>,
) -> Estimate {
    let d: Vec<f64> = a.iter().filter_map(|(k, x)| b.get(k).map(|y| x - y)).collect();
    bootstrap_mean(&d)
}

fn cell(e: Estimate, digits: usize) -> String {
    let text = fmt_estimate(e, digits);
    if e.excludes(0.0) {
        format!("**{text}**")
    } else {
        text
    }
}

/// The two tables per measure: each method's loss, and each loss minus the first method's.
pub fn write_progressive(md: &mut String, g: &Groups<'_>, budgets: &[Column]) {
    let pairs = pairs(g);
    let Some((reference, _)) = pairs.first() else { return };
    let reference = display_label(reference);
    let _ = writeln!(
        md,
        "## Compressing while prefilling against compressing once\n\n\
         Each method's rows compressed during the chunked prefill against its rows \
         compressed once after it, paired by sample over every task (the score over the \
         tasks that answer); **bold** where the 95% interval excludes 0.\n"
    );
    for m in &MEASURES {
        let _ = writeln!(
            md,
            "### {}: incremental − once ({}: {})\n\n{}",
            m.name,
            m.worse.0,
            m.worse.1,
            header(&["protocol", "method"], budgets)
        );
        for &p in &g.protocols {
            for (once, incremental) in &pairs {
                let cells: Vec<String> = budgets
                    .iter()
                    .map(|&b| {
                        let loss = losses(g, p, (once, incremental), b, m);
                        cell(bootstrap_mean(&loss.values().copied().collect::<Vec<_>>()), m.digits)
                    })
                    .collect();
                write_row(md, p, &display_label(once), &cells);
            }
        }
        md.push('\n');
        if pairs.len() < 2 {
            continue;
        }
        let _ = writeln!(
            md,
            "### {}: each method's loss minus {reference}'s\n\n(incremental − once) of the \
             method minus (incremental − once) of {reference}, on the samples both ran \
             ({}: the method loses more than {reference} when compressing \
             progressively).\n\n{}",
            m.name,
            m.worse.0,
            header(&["protocol", "method"], budgets)
        );
        for &p in &g.protocols {
            for (once, incremental) in &pairs[1..] {
                let cells: Vec<String> = budgets
                    .iter()
                    .map(|&b| {
                        let (first, first_inc) = &pairs[0];
                        let base = losses(g, p, (first, first_inc), b, m);
                        let loss = losses(g, p, (once, incremental), b, m);
                        cell(difference(&loss, &base), m.digits)
                    })
                    .collect();
                write_row(md, p, &display_label(once), &cells);
            }
        }
        md.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row of `method` at 35% on sample `id` of `task` with these KL and score.
    fn row(task: &str, id: usize, method: &str, kl: f64, score: f64) -> ResultRow {
        let mut r = crate::results::tests::row(&format!("{task}-{id}"), method, 0.35, score);
        r.task = task.into();
        r.kl = kl;
        r
    }

    #[test]
    fn losses_pair_by_sample_and_differences_compare_the_losses() {
        let mut rows = Vec::new();
        for id in 0..6 {
            let x = id as f64;
            // KVMerger loses 0.01 KL when compressing progressively; H2O loses 0.1 more
            // than that on every sample; TOVA never ran incrementally.
            rows.push(row("passkey", id, "kvmerger@35%", 0.2 + x, 1.0));
            rows.push(row("passkey", id, "kvmerger/incremental@35%", 0.21 + x, 1.0));
            rows.push(row("passkey", id, "h2o@35%", 0.3 + x, 1.0));
            rows.push(row("passkey", id, "h2o/incremental@35%", 0.41 + x, 0.0));
            rows.push(row("passkey", id, "tova@35%", 0.3, 1.0));
            rows.push(row("perplexity", id, "kvmerger@35%", 0.5, 12.0));
            rows.push(row("perplexity", id, "kvmerger/incremental@35%", 0.51, 30.0));
            rows.push(row("perplexity", id, "h2o@35%", 0.5, 12.0));
            rows.push(row("perplexity", id, "h2o/incremental@35%", 0.61, 30.0));
        }
        let g = Groups::new(&rows);
        assert!(applies(&g));
        assert_eq!(pairs(&g).len(), 2, "tova ran once only");
        let b = Column::of(&rows[0]);
        let (kl, score) = (&MEASURES[0], &MEASURES[1]);
        let p = Protocol::Context;
        let merger = losses(&g, p, ("kvmerger", "kvmerger/incremental"), b, kl);
        let h2o = losses(&g, p, ("h2o", "h2o/incremental"), b, kl);
        assert_eq!(merger.len(), 12, "both tasks' samples");
        assert!(merger.values().all(|d| (d - 0.01).abs() < 1e-9));
        let d = difference(&h2o, &merger);
        assert!((d.mean - 0.1).abs() < 1e-9 && d.excludes(0.0), "{d:?}");
        // Scores leave the perplexity samples out: their score is a perplexity.
        let h2o_score = losses(&g, p, ("h2o", "h2o/incremental"), b, score);
        assert_eq!(h2o_score.len(), 6);
        assert!(h2o_score.values().all(|&d| d == -1.0));
        let mut md = String::new();
        write_progressive(&mut md, &g, &[b]);
        assert!(md.contains("each method's loss minus"), "{md}");
        assert!(!md.contains("TOVA") && !md.contains("tova"), "{md}");
    }
}
