//! TOVA (Oren, Hassid, Yarden, Adi, Schwartz, "Transformers are Multi-State RNNs", 2024):
//! Token Omission Via Attention. Each head keeps the entries the newest query attends to
//! most: after the prompt, the top scorers by the last prompt query's attention; then,
//! while decoding, whenever a step takes the head over its budget, the entry the step's
//! query attends to least leaves.
//!
//! Attention is averaged over the query heads of each kv group (the statistics the engine
//! collects per kv head); the paper's code and kvpress average over every query head of the
//! layer, so there all kv heads of a layer keep the same positions (docs/methods.md).
//!
//! The last query's attention after the prompt is the observation window of one query
//! (SnapKV's statistic). While decoding, the step's attention is the accumulated attention
//! (H2O's statistic) read after the step and cleared once read, so each step sees its own
//! queries only.

use serde::{Deserialize, Serialize};

use crate::budget::Budget;
use crate::cache::HeadCache;
use crate::error::{CompressError, Result};
use crate::method::{CompressionMethod, HeadId, HeadReport, Scorer};
use crate::methods::h2o::lowest_older_than_recent;
use crate::methods::select::{protect, protected_within, retain_top_scored};
use crate::stats::StatsRequest;

/// TOVA parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TovaConfig {
    pub budget: Budget,
    /// First entries always kept (kvpress: 0).
    pub sinks: usize,
    /// Newest entries always kept (kvpress: 1, the last prompt token; the paper: 0).
    pub recent: usize,
    /// Evict one entry per decode step once over budget (the paper's policy). `false`
    /// compresses the prompt only and lets the cache grow, as kvpress's `TOVAPress` does.
    pub decode_eviction: bool,
}

impl Default for TovaConfig {
    fn default() -> Self {
        Self { budget: Budget::default(), sinks: 0, recent: 1, decode_eviction: true }
    }
}

impl TovaConfig {
    /// Every value is valid: protection beyond a head's budget is clamped.
    pub fn validate(&self) -> Result<()> {
        Ok(())
    }
}

/// The attention window of one query: the prompt's last.
const LAST_QUERY: usize = 1;

/// Forgets the attention received so far, so that the next decode step's accumulation is
/// that step's attention alone.
fn clear_attention(head: &mut HeadCache) {
    head.meta_mut().iter_mut().for_each(|m| m.attention = 0.0);
}

/// The last prompt query's attention over the entries of `head`.
fn last_query_attention(head: &HeadCache) -> Result<Vec<f32>> {
    let scores = head.window_attention(LAST_QUERY).ok_or_else(|| {
        CompressError::Shape("TOVA needs the attention of the last prompt query".into())
    })?;
    Ok(scores.to_vec())
}

/// TOVA's prompt rule as scores; under a wrapper the decode-time eviction does not run.
impl Scorer for TovaConfig {
    fn score(&self, head: &HeadCache) -> Result<Vec<f32>> {
        Ok(protect(last_query_attention(head)?, self.sinks, self.recent))
    }
}

impl CompressionMethod for TovaConfig {
    fn name(&self) -> &'static str {
        "tova"
    }

    fn stats(&self) -> StatsRequest {
        StatsRequest::window(LAST_QUERY, false)
    }

    fn decode_stats(&self) -> StatsRequest {
        if self.decode_eviction {
            StatsRequest::accumulated()
        } else {
            StatsRequest::default()
        }
    }

    fn budget_entries(&self, prompt_len: usize) -> usize {
        self.budget.entries(prompt_len)
    }

    fn compress(&self, _id: HeadId, head: &mut HeadCache, budget: usize) -> Result<HeadReport> {
        let report =
            retain_top_scored(head, budget, self.sinks, self.recent, last_query_attention)?;
        // A prefill shared with an accumulating method (H2O) leaves the whole prompt's
        // attention here; the first decode step must read its own.
        if self.decode_eviction {
            clear_attention(head);
        }
        Ok(report)
    }

    fn scorer(&self) -> Option<&dyn Scorer> {
        Some(self)
    }

    /// Its decode-time eviction keeps the bound; without it, the last query's attention that
    /// TOVA reads exists for the prompt alone.
    fn decode_bound_refusal(&self) -> Option<String> {
        (!self.decode_eviction).then(|| {
            "tova with decode_eviction = false reads attention of the last prompt query \
             alone and has no rule for the entries decoding adds"
                .to_string()
        })
    }

    fn after_step(
        &self,
        _id: HeadId,
        head: &mut HeadCache,
        budget: usize,
        _step: usize,
    ) -> Result<()> {
        if !self.decode_eviction {
            return Ok(());
        }
        let (sinks, recent) = protected_within(self.sinks, self.recent, budget);
        // Victims are found by position, so a victim's slot can take another entry (two
        // rows move instead of half the cache), as in H2O.
        while head.len() > budget {
            head.remove_unordered(lowest_older_than_recent(head, sinks, recent));
        }
        clear_attention(head);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::EntryMeta;
    use crate::methods::test_util::random_head;

    /// kvpress's prefill rule computed the plain way: the last query's attention over
    /// every entry but the last, the last given the maximum plus one; sorted, the first
    /// `budget` taken (ties to the earlier position).
    fn kvpress_kept(last_query: &[f32], budget: usize) -> Vec<usize> {
        let n = last_query.len();
        let mut scores = last_query[..n - 1].to_vec();
        scores.push(scores.iter().copied().fold(f32::MIN, f32::max) + 1.0);
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        let mut kept = order[..budget].to_vec();
        kept.sort();
        kept
    }

    #[test]
    fn prefill_keeps_what_kvpress_keeps() {
        for seed in 0..20 {
            let mut head = random_head(60, 4, seed);
            // Softmax-like: positive, the last entry (the query itself) not always highest.
            let last: Vec<f32> = head.meta().iter().map(|m| m.attention / 300.0).collect();
            head.set_window_attention(LAST_QUERY, last.clone()).unwrap();
            let budget = 5 + 2 * seed as usize;
            let cfg = TovaConfig { budget: Budget::Tokens(budget), ..Default::default() };
            let report = cfg.compress(HeadId { layer: 0, head: 0 }, &mut head, budget).unwrap();
            let kept: Vec<usize> = head.meta().iter().map(|m| m.position).collect();
            assert_eq!(kept, kvpress_kept(&last, budget), "seed {seed}");
            assert_eq!((report.after, report.clamped), (budget, None));
            assert!(head.meta().iter().all(|m| m.attention == 0.0), "cleared for decoding");
        }
    }

    #[test]
    fn each_decode_step_evicts_what_its_own_query_attends_to_least() {
        let id = HeadId { layer: 0, head: 0 };
        let budget = 10;
        let cfg = TovaConfig { budget: Budget::Tokens(budget), ..Default::default() };
        let mut head = random_head(30, 4, 9);
        head.set_window_attention(LAST_QUERY, vec![0.5; 30]).unwrap();
        cfg.compress(id, &mut head, budget).unwrap();
        let extra = random_head(20, 4, 10);
        for step in 0..20 {
            // The engine appends the step's entry, then adds the step's attention (here the
            // random `attention` of `extra`, spread over every entry) to each entry.
            let meta = EntryMeta { position: 30 + step, attention: 0.0, count: 1 };
            head.push(&extra.key(step), &extra.value(step), meta);
            let attention: Vec<f32> =
                (0..head.len()).map(|i| extra.meta()[(i + step) % 20].attention).collect();
            head.meta_mut().iter_mut().zip(&attention).for_each(|(m, a)| m.attention += a);
            // Reference: the least attended entry of this step, the newest aside.
            let newest = head.len() - 1;
            let victim = (0..newest)
                .min_by(|&a, &b| {
                    let by = |i: usize| (attention[i], head.meta()[i].position);
                    by(a).partial_cmp(&by(b)).unwrap()
                })
                .map(|i| head.meta()[i].position)
                .unwrap();
            let mut expected: Vec<usize> = head.meta().iter().map(|m| m.position).collect();
            expected.retain(|&p| p != victim);
            expected.sort();
            cfg.after_step(id, &mut head, budget, step + 1).unwrap();
            let mut kept: Vec<usize> = head.meta().iter().map(|m| m.position).collect();
            assert_eq!(kept.last(), Some(&(30 + step)), "the newest entry stays last");
            kept.sort();
            assert_eq!(kept, expected, "step {step}");
            assert!(head.meta().iter().all(|m| m.attention == 0.0), "cleared for the next step");
        }
    }

    #[test]
    fn without_decode_eviction_the_cache_grows_and_keeps_its_statistic() {
        let cfg = TovaConfig { decode_eviction: false, ..Default::default() };
        assert_eq!(cfg.decode_stats(), StatsRequest::default());
        let mut head = random_head(12, 4, 1);
        let before = head.clone();
        cfg.after_step(HeadId { layer: 0, head: 0 }, &mut head, 8, 1).unwrap();
        assert_eq!(head, before);
    }

    #[test]
    fn missing_last_query_statistics_are_an_error() {
        let mut head = random_head(20, 4, 1);
        let err = TovaConfig::default().compress(HeadId { layer: 0, head: 0 }, &mut head, 10);
        assert!(err.unwrap_err().to_string().contains("last prompt query"));
    }
}
