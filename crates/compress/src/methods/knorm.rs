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
    use crate::dtype::KvDtype;
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

    /// KNorm reads the true keys of a centered quantized head. Keys `c + a_i u` with `c . u`
    /// large: the true norms order the entries by `a_i`, the stored (centered) rows by
    /// `|a_i|`, so a method reading the stored rows would keep another set. The norms are
    /// spaced far beyond q8_0's error, so the kept set is the f32 head's.
    #[test]
    fn a_centered_quantized_head_keeps_what_the_true_keys_say() {
        let (n, d, budget) = (40, 64, 15);
        let u: Vec<f32> = (0..d).map(|j| if j % 3 == 0 { 0.25 } else { -0.1 }).collect();
        let c: Vec<f32> = u.iter().map(|x| 40.0 * x).collect();
        let keys: Vec<Vec<f32>> = (0..n)
            .map(|i| {
                let a = ((i * 17) % n) as f32 / n as f32 * 8.0 - 4.0;
                c.iter().zip(&u).map(|(c, u)| c + a * u).collect()
            })
            .collect();
        let kept = |dtype: KvDtype| {
            let mut head = HeadCache::new(d, dtype);
            head.center_keys_on(keys.iter().map(Vec::as_slice), false);
            for (i, k) in keys.iter().enumerate() {
                head.push(k, k, crate::cache::EntryMeta::new(i));
            }
            let cfg = KnormConfig { budget: Budget::Tokens(budget), ..Default::default() };
            cfg.compress(HeadId { layer: 0, head: 0 }, &mut head, budget).unwrap();
            head.meta().iter().map(|m| m.position).collect::<Vec<_>>()
        };
        let mut plain = HeadCache::new(d, KvDtype::F32);
        keys.iter()
            .enumerate()
            .for_each(|(i, k)| plain.push(k, k, crate::cache::EntryMeta::new(i)));
        let truth = kvpress_kept(&plain, budget);
        assert_eq!(kept(KvDtype::Q8_0), truth);
        assert_eq!(kept(KvDtype::F32), truth, "a centered f32 head");
        // What the stored rows alone would keep: the smallest |a_i|, another set.
        let centered_norm = |i: usize| ((i * 17) % n) as f32 / n as f32 * 8.0 - 4.0;
        let mut by_shift: Vec<usize> = (0..n).collect();
        by_shift.sort_by(|&a, &b| centered_norm(a).abs().total_cmp(&centered_norm(b).abs()));
        let mut shifted = by_shift[..budget].to_vec();
        shifted.sort();
        assert_ne!(shifted, truth, "the test tells the two readings apart");
    }
}
