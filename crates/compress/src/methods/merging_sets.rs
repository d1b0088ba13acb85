//! KVMerger's merging-set identification (the paper's Algorithm 1): a greedy backward
//! scan that groups consecutive tokens whose keys are similar. Pure functions on key
//! matrices, shared by the method and by `kvmerger analyze`.

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

    proptest! {
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
