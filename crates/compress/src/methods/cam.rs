//! CaM (Zhang et al., "CaM: Cache Merging for Memory-efficient LLMs Inference", ICML 2024):
//! an eviction policy decides what leaves; before an entry leaves, its value is merged into
//! the next `merge_span` kept entries with a seeded Bernoulli draw. Keys are unchanged.

use serde::{Deserialize, Serialize};

use crate::budget::Budget;
use crate::error::Result;

/// Which eviction policy decides what leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CamEviction {
    /// Start (sink) and recent tokens, as in the official code.
    #[default]
    Streaming,
    /// H2O's heavy hitters plus recent window.
    H2o,
}

/// How the merge probability of an evicted entry is computed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CamProbability {
    /// `clamp(A_i / mean(A of the next m kept), 0, 1)` (paper).
    #[default]
    Mean,
    /// `clamp(A_i / max(A of the next m kept), 0, 1)` (some code variants).
    Max,
    /// A fixed probability, for ablations (0 reduces CaM to its eviction policy).
    Fixed(f64),
}

/// CaM parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CamConfig {
    pub budget: Budget,
    pub eviction: CamEviction,
    /// Sinks kept by the streaming eviction (4).
    pub sinks: usize,
    /// Recent share of the budget for the H2O eviction (0.5).
    pub recent_ratio: f64,
    /// Number of following kept entries an evicted value is merged into (official code: 32).
    pub merge_span: usize,
    pub probability: CamProbability,
    /// Seed of the Bernoulli draws.
    pub seed: u64,
}

impl Default for CamConfig {
    fn default() -> Self {
        Self {
            budget: Budget::default(),
            eviction: CamEviction::default(),
            sinks: 4,
            recent_ratio: 0.5,
            merge_span: 32,
            probability: CamProbability::default(),
            seed: 0,
        }
    }
}

impl CamConfig {
    pub fn validate(&self) -> Result<()> {
        Ok(())
    }
}
