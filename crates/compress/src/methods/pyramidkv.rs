//! PyramidKV (Cai, Zhang, Gao, Liu, Liu, Lu, Xiong, Dong, Chang, Hu, Xiao, "PyramidKV:
//! Dynamic KV Cache Compression based on Pyramidal Information Funneling", 2024): lower
//! layers attend broadly and keep more, higher layers attend to a few entries and keep
//! fewer. Layer budgets fall linearly with depth, averaging the budget; inside each layer
//! SnapKV chooses (its window and pooling).
//!
//! The layer budgets follow kvpress's `PyramidKVPress.get_layer_budget` (after the
//! authors' KVCache-Factory): with `B` entries per head on average, the first layer keeps
//! `2B - B / beta` (at most the prompt less the window) and the last `B / beta`; where the
//! last would fall below the window the pyramid cannot be built and every layer keeps `B`
//! (SnapKV), as there. kvpress rounds each layer's budget; here the fractions are
//! apportioned (largest remainders) so that the model's total is exactly `layers x B`.

use serde::{Deserialize, Serialize};

use crate::budget::Budget;
use crate::cache::HeadCache;
use crate::error::{CompressError, Result};
use crate::method::{CompressionMethod, HeadId, HeadReport};
use crate::methods::snapkv::SnapKvConfig;
use crate::stats::StatsRequest;

/// PyramidKV parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PyramidKvConfig {
    /// The average over layers.
    pub budget: Budget,
    /// SnapKV's observation window, also the least a layer keeps (kvpress: 64).
    pub window: usize,
    /// SnapKV's pooling kernel (odd; kvpress: 5).
    pub kernel: usize,
    /// Steepness: the last layer keeps `1 / beta` of the average (kvpress: 20; at least 1).
    pub beta: f64,
}

impl Default for PyramidKvConfig {
    fn default() -> Self {
        Self { budget: Budget::default(), window: 64, kernel: 5, beta: 20.0 }
    }
}

impl PyramidKvConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.beta >= 1.0 && self.beta.is_finite()) {
            return Err(CompressError::invalid(
                "beta",
                format!("must be at least 1, got {}", self.beta),
            ));
        }
        self.snapkv().validate()
    }

    fn snapkv(&self) -> SnapKvConfig {
        SnapKvConfig { budget: self.budget, window: self.window, kernel: self.kernel }
    }

    /// Entries per head of every layer of an `n_layers` model after a `prompt_len` prompt.
    pub fn layer_budgets(&self, n_layers: usize, prompt_len: usize) -> Vec<usize> {
        let even = self.budget.entries(prompt_len);
        if even >= prompt_len || n_layers < 2 {
            return vec![even; n_layers];
        }
        let (b, q, w) = (even as f64, prompt_len as f64, self.window as f64);
        let mut min = b / self.beta;
        let mut max = 2.0 * b - min;
        if max >= q - w {
            max = q - w;
            min = 2.0 * b - max;
        }
        if !(q >= max && max >= min && min >= w) {
            return vec![even; n_layers];
        }
        let step = (max - min) / (n_layers - 1) as f64;
        let exact: Vec<f64> = (0..n_layers).map(|l| max - l as f64 * step).collect();
        apportion(&exact, n_layers * even)
    }
}

/// Integers within 1 of each of `exact` that sum to `total` (which `exact` sums to up to
/// rounding): each floored, the rest given to the largest fractions (ties to the first).
fn apportion(exact: &[f64], total: usize) -> Vec<usize> {
    let mut out: Vec<usize> = exact.iter().map(|x| x.floor() as usize).collect();
    let mut order: Vec<usize> = (0..exact.len()).collect();
    order.sort_by(|&a, &b| (exact[b] - out[b] as f64).total_cmp(&(exact[a] - out[a] as f64)));
    let missing = total.saturating_sub(out.iter().sum());
    order.iter().cycle().take(missing).for_each(|&l| out[l] += 1);
    out
}

impl CompressionMethod for PyramidKvConfig {
    fn name(&self) -> &'static str {
        "pyramidkv"
    }

    fn stats(&self) -> StatsRequest {
        self.snapkv().stats()
    }

    fn budget_entries(&self, prompt_len: usize) -> usize {
        self.budget.entries(prompt_len)
    }

    fn layer_budget_entries(&self, layer: usize, n_layers: usize, prompt_len: usize) -> usize {
        self.layer_budgets(n_layers, prompt_len)[layer]
    }

    fn compress(&self, id: HeadId, head: &mut HeadCache, budget: usize) -> Result<HeadReport> {
        self.snapkv().compress(id, head, budget)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::test_util::random_head;

    /// kvpress's `get_layer_budget` in f64, before its rounding; `None` where it falls back
    /// to SnapKV.
    fn kvpress_budget(layer: usize, layers: usize, q_len: f64, ratio: f64) -> Option<f64> {
        let (window, beta) = (64.0, 20.0);
        let max_capacity_prompt = window + q_len * (1.0 - ratio);
        let mut min_num = (max_capacity_prompt - window) / beta;
        let mut max_num = (max_capacity_prompt - window) * 2.0 - min_num;
        if max_num >= q_len - window {
            max_num = q_len - window;
            min_num = (max_capacity_prompt - window) * 2.0 - max_num;
        }
        if !(q_len >= max_num && max_num >= min_num && min_num >= window) {
            return None;
        }
        let steps = (max_num - min_num) / (layers - 1) as f64;
        Some(max_num - layer as f64 * steps)
    }

    #[test]
    fn layer_budgets_follow_kvpress_and_hold_the_total() {
        for (prompt, share, layers) in
            [(4096, 0.5, 30), (4096, 0.75, 24), (8192, 0.25, 30), (3000, 0.6, 7), (1024, 0.5, 30)]
        {
            let cfg = PyramidKvConfig { budget: Budget::Ratio(share), ..Default::default() };
            let ours = cfg.layer_budgets(layers, prompt);
            let even = Budget::Ratio(share).entries(prompt);
            assert_eq!(ours.iter().sum::<usize>(), layers * even, "{prompt} {share}");
            for (l, &b) in ours.iter().enumerate() {
                match kvpress_budget(l, layers, prompt as f64, 1.0 - share) {
                    Some(x) => assert!((b as f64 - x).abs() < 1.0, "{prompt} {share} {l}"),
                    None => assert_eq!(b, even, "{prompt} {share}: SnapKV's budget"),
                }
            }
        }
        // At 1,024 tokens with half kept the pyramid stands, from the prompt less the window
        // down to the window; with a quarter kept its last layer would fall below the
        // window, and it falls back.
        let cfg = PyramidKvConfig::default();
        let b = cfg.layer_budgets(30, 1024);
        assert!(b.windows(2).all(|w| w[0] >= w[1]) && (b[0], b[29]) == (960, 64), "{b:?}");
        let quarter = PyramidKvConfig { budget: Budget::Ratio(0.25), ..cfg };
        assert_eq!(quarter.layer_budgets(30, 1024), vec![256; 30]);
    }

    #[test]
    fn each_layer_keeps_snapkv_top_scores_at_its_own_budget() {
        let (len, window) = (300, 8);
        let cfg = PyramidKvConfig { budget: Budget::Ratio(0.5), window, kernel: 1, beta: 4.0 };
        let budgets = cfg.layer_budgets(4, len);
        assert!(budgets[0] > budgets[3]);
        for (layer, &budget) in budgets.iter().enumerate() {
            let mut head = random_head(len, 4, layer as u64);
            let scores: Vec<f32> = head.meta().iter().map(|m| m.attention).collect();
            head.set_window_attention(window, scores.clone()).unwrap();
            // kvpress: the window scores above everything, top `budget` kept.
            let mut order: Vec<usize> = (0..len - window).collect();
            order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
            let mut expected = order[..budget - window].to_vec();
            expected.extend(len - window..len);
            expected.sort();
            let id = HeadId { layer, head: 0 };
            let b = cfg.layer_budget_entries(layer, 4, len);
            cfg.compress(id, &mut head, b).unwrap();
            let kept: Vec<usize> = head.meta().iter().map(|m| m.position).collect();
            assert_eq!(kept, expected, "layer {layer}");
        }
    }

    #[test]
    fn beta_below_one_is_refused() {
        let err = PyramidKvConfig { beta: 0.5, ..Default::default() }.validate().unwrap_err();
        assert!(err.to_string().contains("beta"));
    }
}
