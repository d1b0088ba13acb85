//! StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
//! ICLR 2024): keep the first `sinks` tokens and the most recent `budget - sinks`. Sinks
//! that leave no room for a recent entry are clamped to `budget - 1` (and reported).

use serde::{Deserialize, Serialize};

use crate::budget::Budget;
use crate::cache::HeadCache;
use crate::error::Result;
use crate::method::{CompressionMethod, HeadId, HeadReport};
use crate::methods::select::{sinks_and_recent, sinks_within};

/// StreamingLLM parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamingLlmConfig {
    pub budget: Budget,
    /// Attention-sink tokens kept at the start (paper: 4).
    pub sinks: usize,
}

impl Default for StreamingLlmConfig {
    fn default() -> Self {
        Self { budget: Budget::default(), sinks: 4 }
    }
}

impl StreamingLlmConfig {
    /// Every value is valid: sinks beyond a head's budget are clamped when compressing.
    pub fn validate(&self) -> Result<()> {
        Ok(())
    }
}

impl CompressionMethod for StreamingLlmConfig {
    fn name(&self) -> &'static str {
        "streaming_llm"
    }

    fn budget_entries(&self, prompt_len: usize) -> usize {
        self.budget.entries(prompt_len)
    }

    fn compress(&self, _id: HeadId, head: &mut HeadCache, budget: usize) -> Result<HeadReport> {
        let before = head.len();
        head.retain_indices(&sinks_and_recent(before, budget, self.sinks));
        head.shrink_to_fit();
        let clamped =
            (before > budget && sinks_within(self.sinks, budget) < self.sinks).then_some("sinks");
        Ok(HeadReport { before, after: head.len(), clamped, ..Default::default() })
    }

    /// Its sliding window keeps the bound.
    fn decode_bound_refusal(&self) -> Option<String> {
        None
    }

    /// The window slides: the oldest entry after the sinks leaves.
    fn after_step(
        &self,
        _id: HeadId,
        head: &mut HeadCache,
        budget: usize,
        _step: usize,
    ) -> Result<()> {
        while head.len() > budget {
            head.remove(sinks_within(self.sinks, budget));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::test_util::random_head;

    #[test]
    fn keeps_sinks_and_the_recent_window() {
        let mut head = random_head(50, 4, 1);
        let cfg = StreamingLlmConfig { budget: Budget::Tokens(10), sinks: 4 };
        cfg.compress(HeadId { layer: 0, head: 0 }, &mut head, 10).unwrap();
        let kept: Vec<usize> = head.meta().iter().map(|m| m.position).collect();
        assert_eq!(kept, vec![0, 1, 2, 3, 44, 45, 46, 47, 48, 49]);
    }

    #[test]
    fn keeps_the_reference_selection_on_random_inputs() {
        for seed in 0..20u64 {
            let len = 20 + 7 * seed as usize;
            let (budget, sinks) = (5 + 3 * seed as usize, seed as usize % 6);
            let mut head = random_head(len, 4, seed);
            let cfg = StreamingLlmConfig { budget: Budget::Tokens(budget), sinks };
            cfg.compress(HeadId { layer: 0, head: 0 }, &mut head, budget).unwrap();
            // Reference: an index stays if it is a sink or among the last `budget - sinks`.
            let expected: Vec<usize> =
                (0..len).filter(|&i| i < sinks || i >= len - (budget - sinks)).collect();
            let kept: Vec<usize> = head.meta().iter().map(|m| m.position).collect();
            assert_eq!(kept, expected, "seed {seed}");
        }
    }

    #[test]
    fn sinks_larger_than_the_budget_are_clamped_and_reported() {
        let mut head = random_head(50, 4, 1);
        let cfg = StreamingLlmConfig { budget: Budget::Ratio(0.05), sinks: 4 };
        let report = cfg.compress(HeadId { layer: 0, head: 0 }, &mut head, 3).unwrap();
        assert_eq!(report.clamped, Some("sinks"));
        let kept: Vec<usize> = head.meta().iter().map(|m| m.position).collect();
        assert_eq!(kept, vec![0, 1, 49], "two sinks and the newest token");
    }
}
