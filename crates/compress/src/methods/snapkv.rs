//! SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", 2024):
//! score prefix tokens by the attention the prompt's last `window` queries give them,
//! smoothed by 1-D average pooling, and keep the top scorers plus the window itself.

use serde::{Deserialize, Serialize};

use crate::budget::Budget;
use crate::cache::HeadCache;
use crate::error::{CompressError, Result};
use crate::method::{CompressionMethod, HeadId, HeadReport, StatsRequest};
use crate::methods::select::top_k;

/// SnapKV parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SnapKvConfig {
    pub budget: Budget,
    /// Observation window: the last queries of the prompt (paper: 32 or 64).
    pub window: usize,
    /// Average-pooling kernel over key positions (paper: 5; odd; 1 disables pooling).
    pub kernel: usize,
}

impl Default for SnapKvConfig {
    fn default() -> Self {
        Self { budget: Budget::default(), window: 32, kernel: 5 }
    }
}

impl SnapKvConfig {
    pub fn validate(&self) -> Result<()> {
        if self.window == 0 {
            return Err(CompressError::invalid("window", "must be at least 1"));
        }
        if self.kernel.is_multiple_of(2) {
            return Err(CompressError::invalid(
                "kernel",
                format!("must be odd and positive, got {}", self.kernel),
            ));
        }
        if let Budget::Tokens(t) = self.budget {
            if self.window > t {
                return Err(CompressError::invalid(
                    "window",
                    format!("window of {} exceeds the budget of {t} entries", self.window),
                ));
            }
        }
        Ok(())
    }
}

/// Average pooling with stride 1 and zero padding of `kernel / 2` on each side, dividing
/// by `kernel` (PyTorch's `avg_pool1d` with `count_include_pad`).
pub fn avg_pool(scores: &[f32], kernel: usize) -> Vec<f32> {
    let half = kernel / 2;
    (0..scores.len())
        .map(|i| {
            let lo = i.saturating_sub(half);
            let hi = (i + half + 1).min(scores.len());
            scores[lo..hi].iter().sum::<f32>() / kernel as f32
        })
        .collect()
}

impl CompressionMethod for SnapKvConfig {
    fn name(&self) -> &'static str {
        "snapkv"
    }

    fn stats(&self) -> StatsRequest {
        StatsRequest { accumulated: false, window: Some(self.window) }
    }

    fn budget_entries(&self, prompt_len: usize) -> usize {
        self.budget.entries(prompt_len)
    }

    fn compress(&self, _id: HeadId, head: &mut HeadCache, budget: usize) -> Result<HeadReport> {
        let before = head.len();
        if before <= budget {
            return Ok(HeadReport { before, after: before, ..Default::default() });
        }
        if self.window > budget {
            return Err(CompressError::invalid(
                "window",
                format!("window of {} exceeds the budget of {budget} entries", self.window),
            ));
        }
        if head.window_attention.len() != before {
            return Err(CompressError::Shape(
                "SnapKV needs the observation-window attention of every entry".into(),
            ));
        }
        let prefix = before - self.window;
        let pooled = avg_pool(&head.window_attention[..prefix], self.kernel);
        let mut keep = top_k(0..prefix, |i| pooled[i], budget - self.window);
        keep.extend(prefix..before);
        head.retain_indices(&keep);
        head.shrink_to_fit();
        Ok(HeadReport { before, after: head.len(), ..Default::default() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::test_util::random_head;

    #[test]
    fn pooling_matches_hand_computed_values() {
        // kernel 3, zero padded: [(0+1+2)/3, (1+2+3)/3, (2+3+0)/3]
        assert_eq!(avg_pool(&[1.0, 2.0, 3.0], 3), vec![1.0, 2.0, 5.0 / 3.0]);
        assert_eq!(avg_pool(&[1.0, 2.0, 3.0], 1), vec![1.0, 2.0, 3.0]);
    }

    #[test]
    fn keeps_the_reference_selection_on_random_inputs() {
        for seed in 0..20 {
            let mut head = random_head(70, 4, seed);
            head.window_attention =
                head.meta().iter().map(|m| m.attention * 0.7 + (m.position % 5) as f32).collect();
            let (budget, window) = (20, 6);
            // Reference: pool by hand with explicit zero padding, sort, take the best.
            let scores = head.window_attention.clone();
            let prefix = 70 - window;
            let pooled: Vec<f32> = (0..prefix)
                .map(|i| {
                    (-2i64..=2)
                        .map(|o| i as i64 + o)
                        .filter(|&j| j >= 0 && (j as usize) < prefix)
                        .map(|j| scores[j as usize])
                        .sum::<f32>()
                        / 5.0
                })
                .collect();
            let mut order: Vec<usize> = (0..prefix).collect();
            order.sort_by(|&a, &b| pooled[b].partial_cmp(&pooled[a]).unwrap().then(a.cmp(&b)));
            let mut expected: Vec<usize> = order[..budget - window].to_vec();
            expected.extend(prefix..70);
            expected.sort();
            let cfg = SnapKvConfig { budget: Budget::Tokens(budget), window, kernel: 5 };
            cfg.compress(HeadId { layer: 0, head: 0 }, &mut head, budget).unwrap();
            let kept: Vec<usize> = head.meta().iter().map(|m| m.position).collect();
            assert_eq!(kept, expected, "seed {seed}");
        }
    }

    #[test]
    fn window_larger_than_the_budget_is_named() {
        let mut head = random_head(70, 4, 1);
        head.window_attention = vec![0.0; 70];
        let cfg = SnapKvConfig { budget: Budget::Ratio(0.2), window: 32, kernel: 5 };
        let err = cfg.compress(HeadId { layer: 0, head: 0 }, &mut head, 14).unwrap_err();
        assert!(err.to_string().contains("window"), "{err}");
        let err = SnapKvConfig { kernel: 4, ..Default::default() }.validate().unwrap_err();
        assert!(err.to_string().contains("kernel"));
    }
}
