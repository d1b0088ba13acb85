//! Selection helpers shared by the methods.

use crate::cache::HeadCache;
use crate::error::Result;
use crate::method::HeadReport;

/// Indices of the `k` entries with the highest score among `candidates`, returned in
/// increasing index order. Ties go to the lower index, so selection is deterministic.
pub fn top_k(
    candidates: impl IntoIterator<Item = usize>,
    score: impl Fn(usize) -> f32,
    k: usize,
) -> Vec<usize> {
    let mut c: Vec<usize> = candidates.into_iter().collect();
    c.sort_by(|&a, &b| score(b).total_cmp(&score(a)).then(a.cmp(&b)));
    c.truncate(k);
    c.sort_unstable();
    c
}

/// The union of two index lists, sorted and without duplicates.
pub fn union_sorted(a: &[usize], b: &[usize]) -> Vec<usize> {
    let mut out: Vec<usize> = a.iter().chain(b).copied().collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Keeps the most recent `recent` entries plus the `budget - recent` entries with the
/// highest accumulated attention among the rest (H2O's selection). Returns kept indices.
pub fn heavy_hitters_and_recent(head: &HeadCache, budget: usize, recent: usize) -> Vec<usize> {
    let len = head.len();
    if len <= budget {
        return (0..len).collect();
    }
    let recent = recent.min(budget);
    let split = len - recent;
    let meta = head.meta();
    let heavy = top_k(0..split, |i| meta[i].attention, budget - recent);
    union_sorted(&heavy, &(split..len).collect::<Vec<_>>())
}

/// Sinks that fit in `budget` beside at least one recent entry, so the newest token is
/// always kept.
pub fn sinks_within(sinks: usize, budget: usize) -> usize {
    sinks.min(budget.saturating_sub(1))
}

/// Keeps the first `sinks` and the last `budget - sinks` entries (StreamingLLM's selection),
/// with the sinks clamped by [`sinks_within`].
pub fn sinks_and_recent(len: usize, budget: usize, sinks: usize) -> Vec<usize> {
    if len <= budget {
        return (0..len).collect();
    }
    let sinks = sinks_within(sinks, budget);
    (0..sinks).chain(len - (budget - sinks)..len).collect()
}

/// The selection of a plain scorer (kvpress's `ScorerPress`): keeps the first `sinks` and
/// the last `recent` entries of the head, and fills the rest of `budget` with the entries
/// between them that `scores` rates highest (ties to the earlier entry). `scores` gives one
/// score per entry, `[len]`, and is only called when the head is over budget. Protection
/// that does not fit is shrunk by [`protected_within`] and reported as clamped.
pub fn retain_top_scored(
    head: &mut HeadCache,
    budget: usize,
    sinks: usize,
    recent: usize,
    scores: impl FnOnce(&HeadCache) -> Result<Vec<f32>>,
) -> Result<HeadReport> {
    let len = head.len();
    if len <= budget {
        return Ok(HeadReport { before: len, after: len, ..Default::default() });
    }
    let scores = scores(head)?;
    debug_assert_eq!(scores.len(), len);
    let (kept_sinks, kept_recent) = protected_within(sinks, recent, budget);
    let middle = kept_sinks..len - kept_recent;
    let mut keep = top_k(middle, |i| scores[i], budget - kept_recent - kept_sinks);
    keep.splice(0..0, 0..kept_sinks);
    keep.extend(len - kept_recent..len);
    head.retain_indices(&keep);
    head.shrink_to_fit();
    let clamped =
        if kept_recent < recent { Some("recent") } else { (kept_sinks < sinks).then_some("sinks") };
    Ok(HeadReport { before: len, after: head.len(), clamped, ..Default::default() })
}

/// `(sinks, recent)` shrunk to fit in `budget`: the recent part takes its room first (it
/// holds the newest token), the sinks what is left.
pub fn protected_within(sinks: usize, recent: usize, budget: usize) -> (usize, usize) {
    let recent = recent.min(budget);
    (sinks.min(budget - recent), recent)
}

/// Marks the first `sinks` and the last `recent` entries of `scores` as always kept (a
/// scorer's protection, for wrappers that rank the scores themselves).
pub fn protect(mut scores: Vec<f32>, sinks: usize, recent: usize) -> Vec<f32> {
    let len = scores.len();
    scores[..sinks.min(len)].fill(f32::INFINITY);
    scores[len - recent.min(len)..].fill(f32::INFINITY);
    scores
}

/// The L2 norm of each row of a `[len, head_dim]` matrix, `[len]`.
pub fn row_norms(rows: &[f32], head_dim: usize) -> Vec<f32> {
    rows.chunks_exact(head_dim).map(|r| r.iter().map(|x| x * x).sum::<f32>().sqrt()).collect()
}
