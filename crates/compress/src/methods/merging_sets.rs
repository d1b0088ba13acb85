//! KVMerger's merging-set identification: the paper's Algorithm 1 (a greedy backward scan
//! that groups consecutive tokens whose keys are similar) and merging to a budget
//! (adjacent runs merged most-similar-first). Pure functions on key matrices, shared by the
//! method and by `kvmerger analyze`.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::ops::Range;

use serde::{Deserialize, Serialize};

/// Which member a token is compared with when growing a merging set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CompareTo {
    /// Its direct neighbour `i + 1` (the pseudocode's `|i - j| = 1`): chaining.
    #[default]
    Neighbour,
    /// The set's anchor: its first member found by the backward scan (its last token).
    Anchor,
}

/// Cosine similarity; 0 when either vector is zero.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut dot, mut na, mut nb) = (0.0f32, 0.0f32, 0.0f32);
    for (x, y) in a.iter().zip(b) {
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na.sqrt() * nb.sqrt())
    }
}

/// Cosine similarity of each row of a `[len, head_dim]` matrix with the next one, `[len - 1]`
/// (empty for fewer than two rows): the statistic the paper's first observation is about.
pub fn adjacent_cosine(rows: &[f32], head_dim: usize) -> Vec<f32> {
    let row = |i: usize| &rows[i * head_dim..(i + 1) * head_dim];
    let n = rows.len().checked_div(head_dim).unwrap_or(0);
    (1..n).map(|i| cosine(row(i - 1), row(i))).collect()
}

/// Merging sets of a head's keys (`[len, head_dim]`). Scans from the last token to the
/// first: token `i` joins the set of `i + 1` when both are unprotected and `i` is similar
/// enough (`cos > threshold`) to the token `compare_to` names; otherwise it starts a new
/// set. Protected tokens belong to no set and break runs.
///
/// Returns every set, singletons included, as increasing index ranges; together they cover
/// each unprotected index exactly once.
pub fn merging_sets(
    keys: &[f32],
    head_dim: usize,
    protected: &[bool],
    threshold: f32,
    compare_to: CompareTo,
) -> Vec<Range<usize>> {
    let n = protected.len();
    debug_assert_eq!(keys.len(), n * head_dim);
    let key = |i: usize| &keys[i * head_dim..(i + 1) * head_dim];
    let mut sets = Vec::new();
    // The set being grown: `start..end`, anchored at `end - 1`.
    let mut current: Option<Range<usize>> = None;
    for i in (0..n).rev() {
        if protected[i] {
            sets.extend(current.take());
            continue;
        }
        current = match current {
            Some(set) => {
                let other = match compare_to {
                    CompareTo::Neighbour => set.start,
                    CompareTo::Anchor => set.end - 1,
                };
                if cosine(key(i), key(other)) > threshold {
                    Some(i..set.end)
                } else {
                    sets.push(set);
                    Some(i..i + 1)
                }
            }
            None => Some(i..i + 1),
        };
    }
    sets.extend(current);
    sets.reverse();
    sets
}

/// Cosine similarity of two run centroids given by their key sums: `(sum_a / n_a - c)` and
/// `(sum_b / n_b - c)`, with `c` the head's mean key when `center` is given, 0 otherwise.
/// Computed in f64 so that incremental and from-scratch sums agree. 0 for a zero vector.
pub(crate) fn centroid_cosine(
    sum_a: &[f64],
    n_a: f64,
    sum_b: &[f64],
    n_b: f64,
    center: Option<&[f64]>,
) -> f64 {
    let (mut dot, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
    for t in 0..sum_a.len() {
        let c = center.map_or(0.0, |c| c[t]);
        let (x, y) = (sum_a[t] / n_a - c, sum_b[t] / n_b - c);
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na.sqrt() * nb.sqrt())
    }
}

/// Ward's merge cost of two runs given by their (weighted) sums and masses: the squared
/// error the merge adds, `m_a m_b / (m_a + m_b) |sum_a / m_a - sum_b / m_b|^2`, in f64.
pub(crate) fn ward_cost(sum_a: &[f64], m_a: f64, sum_b: &[f64], m_b: f64) -> f64 {
    let dist: f64 = sum_a.iter().zip(sum_b).map(|(x, y)| (x / m_a - y / m_b).powi(2)).sum();
    m_a * m_b / (m_a + m_b) * dist
}

/// The mean of a `[len, head_dim]` matrix's rows, `[head_dim]`, in f64.
pub(crate) fn mean_row(rows: &[f32], head_dim: usize) -> Vec<f64> {
    let n = rows.len().checked_div(head_dim).unwrap_or(0).max(1) as f64;
    let mut mean = vec![0.0f64; head_dim];
    for row in rows.chunks_exact(head_dim) {
        mean.iter_mut().zip(row).for_each(|(m, x)| *m += *x as f64);
    }
    mean.iter_mut().for_each(|m| *m /= n);
    mean
}

/// Fewest entries merging can leave: every protected token plus one entry per run of
/// unprotected tokens between them.
pub fn min_reachable(protected: &[bool]) -> usize {
    let runs =
        (0..protected.len()).filter(|&i| !protected[i] && (i == 0 || protected[i - 1])).count();
    protected.iter().filter(|&&p| p).count() + runs
}

/// A candidate merge of the adjacent runs starting at `left` and `right`, valid while both
/// runs still carry the stamps it was scored with.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    score: f64,
    left: usize,
    right: usize,
    stamps: (u32, u32),
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    /// Most similar first; on equal scores the leftmost pair.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score.total_cmp(&other.score).then(other.left.cmp(&self.left))
    }
}

/// How adjacent runs are compared when merging to a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Linkage {
    /// The cosine of the runs' centroid keys: the most similar pair merges first.
    #[default]
    Centroid,
    /// Ward's criterion: the pair whose merge adds the least squared error between the
    /// merged (mean) key and its members' keys, `m_a m_b / (m_a + m_b) |mu_a - mu_b|^2`,
    /// merges first. A large run's centroid drifts toward the head's common key direction
    /// and grows more similar to everything by cosine; by squared error it does not.
    Ward,
}

/// What [`merge_to_target`] compares runs by, besides their keys.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunScoring<'a> {
    /// The head's mean key, subtracted from centroids before their cosine (centroid linkage).
    pub center: Option<&'a [f64]>,
    /// What each row weighs (the tokens it already stands for); 1 each when absent.
    pub row_weights: Option<&'a [f32]>,
    /// Values, `[len, head_dim]`, compared too when given: centroid linkage takes the
    /// smaller of the key and (uncentred) value cosines, Ward's adds the value error.
    pub values: Option<&'a [f32]>,
    pub linkage: Linkage,
}

/// Merges adjacent unprotected tokens most-similar-first until protected tokens plus runs
/// number `target` (or no two unprotected runs touch). Protected tokens are barriers: never
/// merged, and no run spans one. Two runs are compared as `scoring` says (by default the
/// cosine of their centroid keys, each row weighing 1); a merged run is re-scored against
/// its new neighbours. A max-heap of candidate pairs with stamps that invalidate stale
/// entries makes this `O(n log n)` pair operations for `n` tokens.
///
/// `keys`: `[len, head_dim]`. Returns the runs, singletons included, as increasing index
/// ranges covering each unprotected index exactly once (as [`merging_sets`] does).
pub fn merge_to_target(
    keys: &[f32],
    head_dim: usize,
    protected: &[bool],
    target: usize,
    scoring: RunScoring<'_>,
) -> Vec<Range<usize>> {
    let n = protected.len();
    let RunScoring { center, row_weights, values, linkage } = scoring;
    debug_assert_eq!(keys.len(), n * head_dim);
    debug_assert!(row_weights.is_none_or(|w| w.len() == n));
    debug_assert!(values.is_none_or(|v| v.len() == n * head_dim));
    // Runs are named by their first index. For a run `s..e`: end[s] = e, start[e - 1] = s,
    // sums[s] its key sum, stamp[s] bumped whenever the run grows, alive[s] until it is
    // absorbed by its left neighbour; sums[s] is weighted, and mass[s] is its weight.
    let mut alive = vec![true; n];
    let mut end: Vec<usize> = (1..=n).collect();
    let mut start: Vec<usize> = (0..n).collect();
    let mut mass: Vec<f64> = match row_weights {
        Some(w) => w.iter().map(|&w| w as f64).collect(),
        None => vec![1.0; n],
    };
    let weighted_sums = |rows: &[f32]| -> Vec<f64> {
        rows.chunks_exact(head_dim)
            .zip(&mass)
            .flat_map(|(row, &w)| row.iter().map(move |&x| w * x as f64))
            .collect()
    };
    let mut sums = weighted_sums(keys);
    let mut value_sums = values.map(weighted_sums);
    let mut stamp = vec![0u32; n];
    let row = |sums: &[f64], s: usize| -> Vec<f64> { sums[s * head_dim..][..head_dim].to_vec() };
    let score = |sums: &[f64], value_sums: Option<&[f64]>, mass: &[f64], a: usize, b: usize| {
        let (ma, mb) = (mass[a], mass[b]);
        fn rows(sums: &[f64], a: usize, b: usize, d: usize) -> (&[f64], &[f64]) {
            (&sums[a * d..][..d], &sums[b * d..][..d])
        }
        let of = |sums| rows(sums, a, b, head_dim);
        match linkage {
            Linkage::Centroid => {
                let cos = |sums, center| {
                    let (ra, rb) = of(sums);
                    centroid_cosine(ra, ma, rb, mb, center)
                };
                let key = cos(sums, center);
                value_sums.map_or(key, |v| key.min(cos(v, None)))
            }
            Linkage::Ward => {
                let cost = |sums| {
                    let (ra, rb) = of(sums);
                    ward_cost(ra, ma, rb, mb)
                };
                -(cost(sums) + value_sums.map_or(0.0, cost))
            }
        }
    };
    let mut heap = BinaryHeap::new();
    for i in 1..n {
        if !protected[i - 1] && !protected[i] {
            let s = score(&sums, value_sums.as_deref(), &mass, i - 1, i);
            heap.push(Candidate { score: s, left: i - 1, right: i, stamps: (0, 0) });
        }
    }
    let mut count = n;
    while count > target {
        let Some(c) = heap.pop() else { break };
        let (a, b) = (c.left, c.right);
        // Stale: either run has grown or been absorbed since the pair was scored.
        if !alive[a] || !alive[b] || c.stamps != (stamp[a], stamp[b]) {
            continue;
        }
        for sums in std::iter::once(&mut sums).chain(value_sums.as_mut()) {
            let add = row(sums, b);
            sums[a * head_dim..][..head_dim].iter_mut().zip(&add).for_each(|(x, y)| *x += y);
        }
        mass[a] += mass[b];
        end[a] = end[b];
        start[end[a] - 1] = a;
        stamp[a] += 1;
        alive[b] = false;
        count -= 1;
        if a > 0 && !protected[a - 1] {
            let p = start[a - 1];
            let s = score(&sums, value_sums.as_deref(), &mass, p, a);
            heap.push(Candidate { score: s, left: p, right: a, stamps: (stamp[p], stamp[a]) });
        }
        let e = end[a];
        if e < n && !protected[e] {
            let s = score(&sums, value_sums.as_deref(), &mass, a, e);
            heap.push(Candidate { score: s, left: a, right: e, stamps: (stamp[a], stamp[e]) });
        }
    }
    let mut runs = Vec::new();
    let mut i = 0;
    while i < n {
        if protected[i] {
            i += 1;
        } else {
            runs.push(i..end[i]);
            i = end[i];
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Brute force, forwards: cut between `i` and `i + 1` whenever either is protected or
    /// the condition fails. For the anchor rule the anchor is recomputed from scratch as the
    /// last token of the run `i + 1` belongs to, scanning the whole suffix.
    fn reference(
        keys: &[f32],
        d: usize,
        protected: &[bool],
        t: f32,
        compare_to: CompareTo,
    ) -> Vec<Range<usize>> {
        let n = protected.len();
        let key = |i: usize| &keys[i * d..(i + 1) * d];
        // joins[i]: does token i join the set of i + 1?
        let mut joins = vec![false; n];
        for i in (0..n.saturating_sub(1)).rev() {
            if protected[i] || protected[i + 1] {
                continue;
            }
            let mut anchor = i + 1;
            while anchor + 1 < n && joins[anchor] {
                anchor += 1;
            }
            let other = if compare_to == CompareTo::Neighbour { i + 1 } else { anchor };
            joins[i] = cosine(key(i), key(other)) > t;
        }
        let mut sets = Vec::new();
        let mut i = 0;
        while i < n {
            if protected[i] {
                i += 1;
                continue;
            }
            let start = i;
            while joins[i] {
                i += 1;
            }
            sets.push(start..i + 1);
            i += 1;
        }
        sets
    }

    fn input() -> impl Strategy<Value = (Vec<f32>, Vec<bool>, f32)> {
        (1usize..40).prop_flat_map(|n| {
            (
                proptest::collection::vec(-1.0f32..1.0, n * 3),
                proptest::collection::vec(proptest::bool::weighted(0.2), n),
                -1.0f32..1.0,
            )
        })
    }

    /// Plain O(n^2) merging to a target: rescan every adjacent pair of runs, merge the most
    /// similar (the leftmost on ties), repeat. A run's centroid is its rows' mean weighted
    /// by `weights`; with `values`, a pair scores the smaller of its key and value cosines
    /// (centroid linkage) or the sum of their Ward costs.
    fn merge_reference(
        keys: &[f32],
        d: usize,
        protected: &[bool],
        target: usize,
        scoring: RunScoring<'_>,
    ) -> Vec<Range<usize>> {
        let RunScoring { center, row_weights, values, linkage } = scoring;
        let ones = vec![1.0; protected.len()];
        let weights = row_weights.unwrap_or(&ones);
        let sum = |rows: &[f32], r: &Range<usize>| -> Vec<f64> {
            let mut s = vec![0.0f64; d];
            for i in r.clone() {
                let w = weights[i] as f64;
                s.iter_mut().zip(&rows[i * d..(i + 1) * d]).for_each(|(a, k)| *a += w * *k as f64);
            }
            s
        };
        let mass = |r: &Range<usize>| r.clone().map(|i| weights[i] as f64).sum::<f64>();
        let mut runs: Vec<Range<usize>> =
            (0..protected.len()).filter(|&i| !protected[i]).map(|i| i..i + 1).collect();
        let n_protected = protected.iter().filter(|&&p| p).count();
        while n_protected + runs.len() > target {
            let mut best: Option<(f64, usize)> = None;
            for j in 1..runs.len() {
                if runs[j - 1].end != runs[j].start {
                    continue;
                }
                let (a, b) = (&runs[j - 1], &runs[j]);
                let (ma, mb) = (mass(a), mass(b));
                let score = match linkage {
                    Linkage::Centroid => {
                        let key = centroid_cosine(&sum(keys, a), ma, &sum(keys, b), mb, center);
                        values.map_or(key, |v| {
                            key.min(centroid_cosine(&sum(v, a), ma, &sum(v, b), mb, None))
                        })
                    }
                    Linkage::Ward => {
                        let cost = |rows| ward_cost(&sum(rows, a), ma, &sum(rows, b), mb);
                        -(cost(keys) + values.map_or(0.0, cost))
                    }
                };
                if best.is_none_or(|(s, _)| score > s) {
                    best = Some((score, j));
                }
            }
            let Some((_, j)) = best else { break };
            runs[j - 1].end = runs[j].end;
            runs.remove(j);
        }
        runs
    }

    type MergeInput = (Vec<f32>, Vec<bool>, usize, bool, Option<Vec<f32>>, Option<Vec<f32>>);

    /// Keys, protected rows, a target, whether to center, the rows' weights if any (the
    /// tokens each already stands for, whole numbers), and values if they are compared too.
    fn merge_input() -> impl Strategy<Value = MergeInput> {
        (1usize..50).prop_flat_map(|n| {
            (
                proptest::collection::vec(-1.0f32..1.0, n * 3),
                proptest::collection::vec(proptest::bool::weighted(0.15), n),
                0..=n,
                proptest::bool::ANY,
                proptest::option::of(proptest::collection::vec(
                    (1u32..20).prop_map(|c| c as f32),
                    n,
                )),
                proptest::option::of(proptest::collection::vec(-1.0f32..1.0, n * 3)),
            )
        })
    }

    #[test]
    fn ward_keeps_a_large_key_apart_where_cosine_merges_it() {
        // Ten keys along one direction with noise; token 5 points the same way with ten
        // times the length (as a sink or a salient token's key may). By cosine it is the
        // closest match of its neighbours; by squared error the furthest.
        let c = [0.6f32, -0.3, 0.5];
        let noise = [
            [0.1, 0.0, -0.1],
            [-0.1, 0.1, 0.0],
            [0.0, -0.1, 0.1],
            [0.1, 0.1, 0.0],
            [-0.1, 0.0, 0.1],
            [0.0, 0.0, 0.0],
            [0.0, 0.1, -0.1],
            [0.1, -0.1, 0.0],
            [-0.1, -0.1, 0.1],
            [0.0, 0.1, 0.1],
        ];
        let keys: Vec<f32> = (0..10)
            .flat_map(|i| {
                let scale = if i == 5 { 10.0 } else { 1.0 };
                (0..3).map(move |t| scale * c[t] + noise[i][t])
            })
            .collect();
        let runs = |linkage| {
            let scoring = RunScoring { linkage, ..Default::default() };
            merge_to_target(&keys, 3, &[false; 10], 3, scoring)
        };
        assert_eq!(runs(Linkage::Ward), [0..5, 5..6, 6..10]);
        assert!(!runs(Linkage::Centroid).contains(&(5..6)), "{:?}", runs(Linkage::Centroid));
    }

    proptest! {
        #[test]
        fn priority_queue_merging_equals_the_quadratic_reference(
            (keys, protected, target, centered, weights, values) in merge_input()
        ) {
            let center = centered.then(|| mean_row(&keys, 3));
            let (c, v) = (center.as_deref(), values.as_deref());
            for linkage in [Linkage::Centroid, Linkage::Ward] {
                let scoring =
                    RunScoring { center: c, row_weights: weights.as_deref(), values: v, linkage };
                let ours = merge_to_target(&keys, 3, &protected, target, scoring);
                let expected = merge_reference(&keys, 3, &protected, target, scoring);
                prop_assert_eq!(&ours, &expected);
                let n_protected = protected.iter().filter(|&&p| p).count();
                prop_assert_eq!(n_protected + ours.len(), target.max(min_reachable(&protected)));
            }
        }

        #[test]
        fn backward_scan_equals_brute_force((keys, protected, t) in input()) {
            for mode in [CompareTo::Neighbour, CompareTo::Anchor] {
                prop_assert_eq!(merging_sets(&keys, 3, &protected, t, mode), reference(&keys, 3, &protected, t, mode));
            }
        }

        #[test]
        fn sets_are_runs_covering_each_unprotected_token_once((keys, protected, t) in input()) {
            let sets = merging_sets(&keys, 3, &protected, t, CompareTo::Neighbour);
            let mut seen = vec![0; protected.len()];
            for s in &sets {
                prop_assert!(!s.is_empty());
                for i in s.clone() {
                    seen[i] += 1;
                    prop_assert!(!protected[i]);
                }
            }
            for (i, p) in protected.iter().enumerate() {
                prop_assert_eq!(seen[i], if *p { 0 } else { 1 });
            }
        }
    }

    #[test]
    fn adjacent_cosine_compares_each_row_with_the_next() {
        let rows = [1.0, 0.0, 1.0, 1.0, 0.0, 2.0, 0.0, -3.0];
        let c = adjacent_cosine(&rows, 2);
        let expected = [1.0 / 2f32.sqrt(), 1.0 / 2f32.sqrt(), -1.0];
        assert_eq!(c.len(), 3);
        assert!(c.iter().zip(expected).all(|(a, b)| (a - b).abs() < 1e-6), "{c:?}");
        assert!(adjacent_cosine(&rows[..2], 2).is_empty());
    }

    #[test]
    fn thresholds_outside_the_cosine_range_merge_nothing_or_every_run() {
        let keys: Vec<f32> = (0..30).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let protected = [false, false, false, true, false, false, false, false, false, false];
        let none = merging_sets(&keys, 3, &protected, 1.01, CompareTo::Neighbour);
        assert_eq!(none.len(), 9, "every unprotected token alone");
        let all = merging_sets(&keys, 3, &protected, -1.01, CompareTo::Neighbour);
        assert_eq!(all, vec![0..3, 4..10], "each run between protected tokens is one set");
    }
}
