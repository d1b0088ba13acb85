//! KeyDiff (Park, Jones, Morse, Goel, Lee, Lott, "KeyDiff: Key Similarity-Based KV Cache
//! Eviction for Long-Context LLM Inference in Resource-Constrained Environments", 2025):
//! keys that point away from the head's average key direction are the distinctive ones
//! worth keeping. The anchor is the mean of the unit-length keys; each entry scores
//! `-cosine(key, anchor)` and the highest scores stay. No attention statistics are needed.
//!
//! This is kvpress's `KeyDiffPress`: one pass over the whole prompt, every entry scored.
//! The paper evicts block by block as the prompt streams in (kvpress's `BlockPress`
//! around this scorer); `sinks` and `recent` (both 0 by default) add protection.

use serde::{Deserialize, Serialize};

use crate::budget::Budget;
use crate::cache::HeadCache;
use crate::error::Result;
use crate::method::{CompressionMethod, HeadId, HeadReport, Scorer};
use crate::methods::merging_sets::cosine;
use crate::methods::select::{protect, retain_top_scored, row_norms};

/// KeyDiff parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct KeyDiffConfig {
    pub budget: Budget,
    /// First entries always kept (kvpress: 0).
    pub sinks: usize,
    /// Newest entries always kept (kvpress: 0).
    pub recent: usize,
}

impl KeyDiffConfig {
    /// Every value is valid: protection beyond a head's budget is clamped when compressing.
    pub fn validate(&self) -> Result<()> {
        Ok(())
    }
}

/// `-cosine(key, anchor)` for each key of a `[len, head_dim]` matrix, where the anchor is
/// the mean of the keys scaled to unit length (a zero key counts as zero, and scores 0).
pub(crate) fn keydiff_scores(keys: &[f32], head_dim: usize) -> Vec<f32> {
    let norms = row_norms(keys, head_dim);
    let mut anchor = vec![0.0f32; head_dim];
    for (key, &norm) in keys.chunks_exact(head_dim).zip(&norms) {
        if norm > 0.0 {
            anchor.iter_mut().zip(key).for_each(|(a, k)| *a += k / norm);
        }
    }
    // A mean, as kvpress takes it (its length does not change the cosines).
    let n = norms.len().max(1) as f32;
    anchor.iter_mut().for_each(|a| *a /= n);
    keys.chunks_exact(head_dim).map(|key| -cosine(key, &anchor)).collect()
}

impl Scorer for KeyDiffConfig {
    fn score(&self, head: &HeadCache) -> Result<Vec<f32>> {
        let scores = keydiff_scores(&head.keys(), head.head_dim());
        Ok(protect(scores, self.sinks, self.recent))
    }
}

impl CompressionMethod for KeyDiffConfig {
    fn name(&self) -> &'static str {
        "keydiff"
    }

    fn budget_entries(&self, prompt_len: usize) -> usize {
        self.budget.entries(prompt_len)
    }

    fn compress(&self, _id: HeadId, head: &mut HeadCache, budget: usize) -> Result<HeadReport> {
        retain_top_scored(head, budget, self.sinks, self.recent, |head| {
            Ok(keydiff_scores(&head.keys(), head.head_dim()))
        })
    }

    /// Every entry is scored against the mean key direction: the most typical keys leave.
    fn decode_bound_refusal(&self) -> Option<String> {
        None
    }

    fn scorer(&self) -> Option<&dyn Scorer> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::test_util::random_head;

    /// kvpress's rule computed the plain way, in f64: normalise every key, average them,
    /// rank keys from the least similar to that anchor, take the first `budget` (ties to
    /// the earlier position).
    fn kvpress_kept(head: &HeadCache, budget: usize) -> Vec<usize> {
        let n = head.len();
        let d = head.head_dim();
        let key = |i: usize| head.key(i).iter().map(|&x| x as f64).collect::<Vec<f64>>();
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let mut anchor = vec![0.0f64; d];
        for i in 0..n {
            let k = key(i);
            for j in 0..d {
                anchor[j] += k[j] / norm(&k) / n as f64;
            }
        }
        let cos = |i: usize| {
            let k = key(i);
            let dot: f64 = k.iter().zip(&anchor).map(|(a, b)| a * b).sum();
            dot / (norm(&k) * norm(&anchor))
        };
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| cos(a).total_cmp(&cos(b)).then(a.cmp(&b)));
        let mut kept = order[..budget].to_vec();
        kept.sort();
        kept
    }

    #[test]
    fn keeps_the_keys_least_like_the_mean_direction_as_kvpress_does() {
        for seed in 0..20 {
            // Keys pushed towards a shared direction, as real keys are, so the anchor is
            // far from zero and the ranking is not noise.
            let mut head = random_head(60, 8, seed);
            let keys: Vec<f32> =
                head.keys().iter().enumerate().map(|(i, k)| k + (i % 8) as f32 * 0.1).collect();
            let values = head.values().into_owned();
            let meta = head.meta().to_vec();
            head = HeadCache::from_parts(8, head.dtype(), keys, values, meta).unwrap();
            let budget = 5 + 2 * seed as usize;
            let expected = kvpress_kept(&head, budget);
            let cfg = KeyDiffConfig { budget: Budget::Tokens(budget), ..Default::default() };
            let report = cfg.compress(HeadId { layer: 0, head: 0 }, &mut head, budget).unwrap();
            let kept: Vec<usize> = head.meta().iter().map(|m| m.position).collect();
            assert_eq!(kept, expected, "seed {seed}");
            assert_eq!((report.before, report.after, report.clamped), (60, budget, None));
        }
    }

    #[test]
    fn the_key_opposite_the_crowd_stays_and_zero_keys_score_zero() {
        // Three keys along +x, one along -x, one zero: the anchor points along +x.
        let keys = [1.0, 0.0, 2.0, 0.1, 0.5, -0.1, -1.0, 0.0, 0.0, 0.0];
        let scores = keydiff_scores(&keys, 2);
        assert!(scores[3] > 0.99, "{scores:?}");
        assert_eq!(scores[4], 0.0);
        assert!(scores[..3].iter().all(|&s| s < -0.9), "{scores:?}");
    }
}
