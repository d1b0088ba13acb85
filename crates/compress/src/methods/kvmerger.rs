//! KVMerger (Wang, Jin, Yu, Zhang, "Model Tells You Where to Merge: Adaptive KV Cache
//! Merging for LLMs on Long-Context Tasks", arXiv 2407.08454, 2024).

use serde::{Deserialize, Serialize};

use crate::budget::Budget;
use crate::error::Result;

/// How the result is brought to the budget (the paper leaves this open).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BudgetMode {
    /// After merging, evict the lowest-attention unprotected entries down to the budget.
    #[default]
    Exact,
    /// No eviction: the achieved ratio is whatever the threshold gives.
    Threshold,
}

/// Which member a token is compared with when growing a merging set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CompareTo {
    /// Its direct neighbour `i + 1` (the pseudocode's `|i - j| = 1`): chaining.
    #[default]
    Neighbour,
    /// The set's first member found by the backward scan (its last token).
    Anchor,
}

/// Kernel width of the Gaussian merge weights.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sigma {
    /// A fixed sigma (paper's grid search: 5 on Llama2-7B).
    Fixed(f32),
    /// Mean distance from the members to the pivot, floored by `sigma_floor`.
    Adaptive,
}

/// How a merged entry accounts for the number of tokens it stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MassRule {
    /// No correction.
    None,
    /// Scale the merged value by the set size.
    #[default]
    ScaleValues,
    /// Add `ln(count)` to the merged entry's attention logit (exact for identical keys).
    LogCount,
}

/// Merge weights inside a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MergeWeights {
    /// Gaussian kernel around the pivot (paper).
    #[default]
    Gaussian,
    /// Plain average (ablation).
    Uniform,
}

/// Which member of a set is the pivot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PivotRule {
    /// The member with the largest accumulated attention (paper).
    #[default]
    Attention,
    /// A seeded random member (ablation).
    Random,
}

/// KVMerger parameters; defaults follow the paper and `docs/methods.md`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KvMergerConfig {
    pub budget: Budget,
    pub budget_mode: BudgetMode,
    /// Cosine-similarity threshold `eps` (paper: 0.75).
    pub threshold: f32,
    pub compare_to: CompareTo,
    /// Share of the prompt kept as an unmerged recent window; default by budget
    /// (0.17 at budgets >= 50%, 0.08 below).
    pub recent: Option<f64>,
    /// Share of the prompt kept unmerged for its high attention; default by budget
    /// (0.12 at budgets >= 50%, 0.02 below).
    pub selected: Option<f64>,
    pub sigma: Sigma,
    /// Lower bound of the adaptive sigma.
    pub sigma_floor: f32,
    pub mass: MassRule,
    pub weights: MergeWeights,
    pub pivot: PivotRule,
    /// `false` disables merging (ablation: protected tokens plus eviction).
    pub merge: bool,
    /// Seed for the random-pivot ablation.
    pub seed: u64,
}

impl Default for KvMergerConfig {
    fn default() -> Self {
        Self {
            budget: Budget::default(),
            budget_mode: BudgetMode::default(),
            threshold: 0.75,
            compare_to: CompareTo::default(),
            recent: None,
            selected: None,
            sigma: Sigma::Fixed(5.0),
            sigma_floor: 1e-3,
            mass: MassRule::default(),
            weights: MergeWeights::default(),
            pivot: PivotRule::default(),
            merge: true,
            seed: 0,
        }
    }
}

impl KvMergerConfig {
    pub fn validate(&self) -> Result<()> {
        Ok(())
    }
}
