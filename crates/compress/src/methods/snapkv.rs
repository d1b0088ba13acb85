//! SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", 2024):
//! score prefix tokens by the attention the prompt's last `window` queries give them,
//! smoothed by 1-D average pooling, and keep the top scorers plus the window itself.
//! A window longer than a head's budget is clamped to the budget (and reported).

use serde::{Deserialize, Serialize};

use crate::budget::Budget;
use crate::cache::HeadCache;
use crate::error::{CompressError, Result};
use crate::method::{CompressionMethod, HeadId, HeadReport, Scorer};
use crate::methods::select::top_k;
use crate::stats::StatsRequest;

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

impl SnapKvConfig {
    /// The observation window's attention, `[len]`.
    fn window_scores<'a>(&self, head: &'a HeadCache) -> Result<&'a [f32]> {
        head.window_attention(self.window).ok_or_else(|| {
            CompressError::Shape(format!(
                "SnapKV needs the attention of the last {} prompt queries",
                self.window
            ))
        })
    }
}

/// kvpress's `SnapKVPress.score`: the pooled attention of the entries before the window,
/// the window itself always kept.
impl Scorer for SnapKvConfig {
    fn score(&self, head: &HeadCache) -> Result<Vec<f32>> {
        let prefix = head.len().saturating_sub(self.window);
        let mut scores = avg_pool(&self.window_scores(head)?[..prefix], self.kernel);
        scores.resize(head.len(), f32::INFINITY);
        Ok(scores)
    }
}

impl CompressionMethod for SnapKvConfig {
    fn name(&self) -> &'static str {
        "snapkv"
    }

    fn stats(&self) -> StatsRequest {
        StatsRequest::window(self.window, false)
    }

    fn budget_entries(&self, prompt_len: usize) -> usize {
        self.budget.entries(prompt_len)
    }

    fn compress(&self, _id: HeadId, head: &mut HeadCache, budget: usize) -> Result<HeadReport> {
        let before = head.len();
        if before <= budget {
            return Ok(HeadReport { before, after: before, ..Default::default() });
        }
        let scores = self.window_scores(head)?;
        // The observation window always stays; one longer than the budget is cut to it.
        let window = self.window.min(budget);
        let prefix = before - window;
        let pooled = avg_pool(&scores[..prefix], self.kernel);
        let mut keep = top_k(0..prefix, |i| pooled[i], budget - window);
        keep.extend(prefix..before);
        head.retain_indices(&keep);
        head.shrink_to_fit();
        let clamped = (window < self.window).then_some("window");
        Ok(HeadReport { before, after: head.len(), clamped, ..Default::default() })
    }

    fn scorer(&self) -> Option<&dyn Scorer> {
        Some(self)
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
            let (budget, window) = (20, 6);
            let scores: Vec<f32> =
                head.meta().iter().map(|m| m.attention * 0.7 + (m.position % 5) as f32).collect();
            head.set_window_attention(window, scores.clone()).unwrap();
            // A wider window's statistics beside it are not read.
            head.set_window_attention(2 * window, vec![1.0; 70]).unwrap();
            // Reference: pool by hand with explicit zero padding, sort, take the best.
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
    fn window_larger_than_the_budget_is_clamped_and_reported() {
        let mut head = random_head(70, 4, 1);
        head.set_window_attention(32, vec![0.0; 70]).unwrap();
        let cfg = SnapKvConfig { budget: Budget::Ratio(0.2), window: 32, kernel: 5 };
        let report = cfg.compress(HeadId { layer: 0, head: 0 }, &mut head, 14).unwrap();
        assert_eq!(report.clamped, Some("window"));
        let kept: Vec<usize> = head.meta().iter().map(|m| m.position).collect();
        assert_eq!(kept, (56..70).collect::<Vec<_>>(), "the window's last 14 entries");
        let err = SnapKvConfig { kernel: 4, ..Default::default() }.validate().unwrap_err();
        assert!(err.to_string().contains("kernel"));
    }

    #[test]
    fn missing_window_statistics_are_an_error() {
        let mut head = random_head(70, 4, 1);
        head.set_window_attention(64, vec![0.0; 70]).unwrap();
        let cfg = SnapKvConfig { budget: Budget::Ratio(0.5), window: 32, kernel: 5 };
        let err = cfg.compress(HeadId { layer: 0, head: 0 }, &mut head, 35).unwrap_err();
        assert!(err.to_string().contains("32"), "{err}");
    }
}
