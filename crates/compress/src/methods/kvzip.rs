//! KVzip (Kim, Kim, Kwon, Lee, Yun, Song, "KVzip: Query-Agnostic KV Cache Compression with
//! Context Reconstruction", 2025): an entry matters as much as the model needs it to repeat
//! its context. Once the prompt is prefilled, the engine asks the model to repeat the
//! previous context and feeds the context again, teacher forced, `chunk` tokens at a time;
//! each entry scores the most attention any query of that reconstruction paid it (per kv
//! head: the maximum over the query heads of its group and over the queries). The softmax
//! of each query runs over the first `sinks` entries, the context chunk being repeated and
//! the reconstruction's own entries before it, as the paper's code and kvpress's
//! `KVzipPress` compute it. The reconstruction's entries are then dropped.
//!
//! The cost is a second prefill of about the context's length (the repeated context plus
//! a short instruction per chunk), with its own keys beside the context's: kvpress puts it
//! at 2-3 times the first prefill.
//!
//! Budgets: kvpress prunes the lowest scores over all layers and heads together (or, with
//! `layerwise`, over the heads of each layer); the paper's code also has uniform head
//! budgets. Budgets here hold per layer, so `heads = shared` ranks the heads of a layer
//! together (kvpress's `layerwise`, AdaKV without a safeguard; every head keeps at least
//! one entry) and `heads = uniform` gives each head its own budget. The first `sinks`
//! entries are always kept (kvpress scores them 1).

use serde::{Deserialize, Serialize};

use crate::budget::Budget;
use crate::cache::HeadCache;
use crate::error::{CompressError, Result};
use crate::method::{CompressionMethod, HeadId, HeadReport, Scorer};
use crate::methods::adakv::{allocate, compress_to_shares};
use crate::methods::select::{protect, retain_top_scored};
use crate::stats::{Reconstruction, StatsRequest};

/// How a layer's budget is split among its kv heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum HeadBudgets {
    /// The heads of a layer compete for its entries (kvpress's `layerwise`).
    #[default]
    Shared,
    /// Each head keeps its own budget (the paper's uniform variant).
    Uniform,
}

/// KVzip parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KvzipConfig {
    pub budget: Budget,
    /// Context tokens repeated per reconstruction pass (kvpress: 2048). The engine runs
    /// each pass in prefill chunks, so this bounds the reconstruction's keys, not memory.
    pub chunk: usize,
    /// First entries always kept, and in every scoring softmax (kvpress: 4).
    pub sinks: usize,
    pub heads: HeadBudgets,
}

impl Default for KvzipConfig {
    fn default() -> Self {
        Self { budget: Budget::default(), chunk: 2048, sinks: 4, heads: HeadBudgets::Shared }
    }
}

impl KvzipConfig {
    pub fn validate(&self) -> Result<()> {
        if self.chunk == 0 {
            return Err(CompressError::invalid("chunk", "must be at least 1"));
        }
        Ok(())
    }

    /// The reconstruction scores, `[len]`.
    fn reconstruction<'a>(&self, head: &'a HeadCache) -> Result<&'a [f32]> {
        head.reconstruction_attention().ok_or_else(|| {
            CompressError::Shape(
                "KVzip needs the attention of the context's reconstruction, which the engine \
                 records after a prompt prefilled whole"
                    .into(),
            )
        })
    }
}

impl Scorer for KvzipConfig {
    fn score(&self, head: &HeadCache) -> Result<Vec<f32>> {
        Ok(protect(self.reconstruction(head)?.to_vec(), self.sinks, 0))
    }
}

impl CompressionMethod for KvzipConfig {
    fn name(&self) -> &'static str {
        "kvzip"
    }

    fn stats(&self) -> StatsRequest {
        StatsRequest {
            reconstruction: Some(Reconstruction { chunk: self.chunk, sinks: self.sinks }),
            ..StatsRequest::default()
        }
    }

    fn decode_stats(&self) -> StatsRequest {
        StatsRequest::default()
    }

    fn budget_entries(&self, prompt_len: usize) -> usize {
        self.budget.entries(prompt_len)
    }

    fn compress(&self, _id: HeadId, head: &mut HeadCache, budget: usize) -> Result<HeadReport> {
        retain_top_scored(head, budget, self.sinks, 0, |head| {
            self.reconstruction(head).map(<[f32]>::to_vec)
        })
    }

    fn compress_layer(
        &self,
        layer: usize,
        heads: &mut [HeadCache],
        budget: usize,
    ) -> Result<Vec<HeadReport>> {
        let shares = match self.heads {
            HeadBudgets::Uniform => heads.iter().map(|h| budget.min(h.len())).collect(),
            HeadBudgets::Shared => {
                let scores = heads.iter().map(|h| self.score(h)).collect::<Result<Vec<_>>>()?;
                allocate(&scores, budget, 0.0)
            }
        };
        compress_to_shares(self, layer, heads, shares)
    }

    fn scorer(&self) -> Option<&dyn Scorer> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CompressionConfig;
    use crate::methods::test_util::random_head;

    fn kvzip(heads: &str) -> Box<dyn CompressionMethod> {
        let params = [("heads".to_string(), heads.to_string())];
        let config = CompressionConfig::from_cli("kvzip", Some(Budget::Ratio(0.25)), &params);
        config.unwrap().build().unwrap()
    }

    /// Heads whose reconstruction scores are `score(head, entry)`.
    fn scored_heads(n: usize, score: impl Fn(usize, usize) -> f32) -> Vec<HeadCache> {
        (0..2)
            .map(|h| {
                let mut head = random_head(n, 4, h as u64);
                head.set_reconstruction_attention((0..n).map(|i| score(h, i)).collect()).unwrap();
                head
            })
            .collect()
    }

    /// Shared budgets keep the layer's highest scores whatever head holds them; uniform
    /// budgets each head's own; the sinks stay either way.
    #[test]
    fn keeps_the_highest_reconstruction_scores_per_layer_or_per_head() {
        // Head 0 scores everything above head 1; within a head, later entries score more.
        let score = |h: usize, i: usize| (1 - h) as f32 + i as f32 / 100.0;
        let mut heads = scored_heads(40, score);
        let reports = kvzip("shared").compress_layer(0, &mut heads, 10).unwrap();
        assert_eq!(reports.iter().map(|r| r.after).sum::<usize>(), 20);
        // Head 1 keeps its sinks alone; head 0 its sinks and the rest of the layer's 20.
        let positions = |h: &HeadCache| h.meta().iter().map(|m| m.position).collect::<Vec<_>>();
        assert_eq!(positions(&heads[1]), [0, 1, 2, 3]);
        let expected: Vec<usize> = (0..4).chain(28..40).collect();
        assert_eq!(positions(&heads[0]), expected);
        let mut heads = scored_heads(40, score);
        kvzip("uniform").compress_layer(0, &mut heads, 10).unwrap();
        for head in &heads {
            assert_eq!(positions(head), [0, 1, 2, 3, 34, 35, 36, 37, 38, 39]);
        }
    }

    #[test]
    fn without_the_reconstruction_the_error_says_so() {
        let mut head = random_head(20, 4, 1);
        let err = kvzip("shared").compress(HeadId { layer: 0, head: 0 }, &mut head, 5);
        assert!(err.unwrap_err().to_string().contains("reconstruction"));
        let err = CompressionConfig::from_cli("kvzip", None, &[("chunk".into(), "0".into())]);
        assert!(err.unwrap_err().to_string().contains("chunk"));
    }
}
