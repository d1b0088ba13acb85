//! SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", 2024):
//! score prefix tokens by the attention of the prompt's last `window` queries, smoothed by
//! 1-D average pooling, and keep the top scorers plus the window itself.

use serde::{Deserialize, Serialize};

use crate::budget::Budget;
use crate::error::Result;

/// SnapKV parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SnapKvConfig {
    pub budget: Budget,
    /// Observation window: the last queries of the prompt (paper: 32 or 64).
    pub window: usize,
    /// Average-pooling kernel size over key positions (paper: 5); 1 disables pooling.
    pub kernel: usize,
}

impl Default for SnapKvConfig {
    fn default() -> Self {
        Self { budget: Budget::default(), window: 32, kernel: 5 }
    }
}

impl SnapKvConfig {
    pub fn validate(&self) -> Result<()> {
        Ok(())
    }
}
