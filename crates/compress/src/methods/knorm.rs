//! KNorm (Devoto, Zhao, Scardapane, Minervini, "A Simple and Effective L2 Norm-Based
//! Strategy for KV Cache Compression", EMNLP 2024): keys with a low L2 norm draw high
//! attention, so each head keeps the entries whose keys have the lowest norm. No attention
//! statistics are needed; it acts once, after the prompt. kvpress's `KnormPress` scores
//! `-||key||` over every entry; `sinks` and `recent` (both 0 by default) add protection.

use serde::{Deserialize, Serialize};

use crate::budget::Budget;
use crate::cache::HeadCache;
use crate::error::Result;
use crate::method::{CompressionMethod, HeadId, HeadReport, Scorer};
use crate::methods::select::{protect, retain_top_scored, row_norms};

/// KNorm parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct KnormConfig {
    pub budget: Budget,
    /// First entries always kept (kvpress: 0).
    pub sinks: usize,
    /// Newest entries always kept (kvpress: 0).
    pub recent: usize,
}

impl KnormConfig {
    /// Every value is valid: protection beyond a head's budget is clamped when compressing.
    pub fn validate(&self) -> Result<()> {
        Ok(())
    }
}

/// `-||key||` for each entry of `head`.
fn knorm_scores(head: &HeadCache) -> Vec<f32> {
    row_norms(&head.keys(), head.head_dim()).into_iter().map(|n| -n).collect()
}

impl Scorer for KnormConfig {
    fn score(&self, head: &HeadCache) -> Result<Vec<f32>> {
        Ok(protect(knorm_scores(head), self.sinks, self.recent))
    }
}

impl CompressionMethod for KnormConfig {
    fn name(&self) -> &'static str {
        "knorm"
    }

    fn budget_entries(&self, prompt_len: usize) -> usize {
        self.budget.entries(prompt_len)
    }

    fn compress(&self, _id: HeadId, head: &mut HeadCache, budget: usize) -> Result<HeadReport> {
        retain_top_scored(head, budget, self.sinks, self.recent, |head| Ok(knorm_scores(head)))
    }

    /// Key norms are known for every entry: the highest-norm keys leave.
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

    /// kvpress's rule computed the plain way: each key's norm in f64, sorted from the
    /// smallest (highest `-norm`), the first `budget` taken, ties to the earlier position.
    fn kvpress_kept(head: &HeadCache, budget: usize) -> Vec<usize> {
        let norm = |i: usize| head.key(i).iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        let mut order: Vec<usize> = (0..head.len()).collect();
        order.sort_by(|&a, &b| norm(a).total_cmp(&norm(b)).then(a.cmp(&b)));
        let mut kept = order[..budget].to_vec();
        kept.sort();
        kept
    }

    #[test]
    fn keeps_the_lowest_norm_keys_as_kvpress_does() {
        for seed in 0..20 {
            let mut head = random_head(60, 8, seed);
            let budget = 5 + 2 * seed as usize;
            let expected = kvpress_kept(&head, budget);
            let cfg = KnormConfig { budget: Budget::Tokens(budget), ..Default::default() };
            let report = cfg.compress(HeadId { layer: 0, head: 0 }, &mut head, budget).unwrap();
            let kept: Vec<usize> = head.meta().iter().map(|m| m.position).collect();
            assert_eq!(kept, expected, "seed {seed}");
            assert_eq!((report.before, report.after, report.clamped), (60, budget, None));
        }
    }

    #[test]
    fn protected_entries_stay_and_oversized_protection_is_clamped() {
        let mut head = random_head(40, 4, 7);
        let cfg = KnormConfig { budget: Budget::Tokens(10), sinks: 2, recent: 3 };
        // Reference: the two sinks, the three newest, the five lowest norms in between.
        let inner = (2..37).map(|i| (i, -row_norms(&head.key(i), 4)[0]));
        let mut inner: Vec<(usize, f32)> = inner.collect();
        inner.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut expected: Vec<usize> = vec![0, 1, 37, 38, 39];
        expected.extend(inner[..5].iter().map(|&(i, _)| i));
        expected.sort();
        cfg.compress(HeadId { layer: 0, head: 0 }, &mut head, 10).unwrap();
        let kept: Vec<usize> = head.meta().iter().map(|m| m.position).collect();
        assert_eq!(kept, expected);

        let mut head = random_head(40, 4, 7);
        let cfg = KnormConfig { budget: Budget::Tokens(4), sinks: 2, recent: 3 };
        let report = cfg.compress(HeadId { layer: 0, head: 0 }, &mut head, 4).unwrap();
        assert_eq!(report.clamped, Some("sinks"));
        let kept: Vec<usize> = head.meta().iter().map(|m| m.position).collect();
        assert_eq!(kept, vec![0, 37, 38, 39], "one sink beside the three newest");
        let mut head = random_head(40, 4, 7);
        let report = cfg.compress(HeadId { layer: 0, head: 0 }, &mut head, 2).unwrap();
        assert_eq!(report.clamped, Some("recent"));
        let kept: Vec<usize> = head.meta().iter().map(|m| m.position).collect();
        assert_eq!(kept, vec![38, 39], "the two newest, no sink");
    }
}
