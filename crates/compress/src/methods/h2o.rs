//! H2O (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of
//! Large Language Models", NeurIPS 2023): keep a recent window plus the entries with the
//! largest accumulated attention; evict the lowest non-recent entry as decoding grows the cache.

use serde::{Deserialize, Serialize};

use crate::budget::Budget;
use crate::error::Result;

/// H2O parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct H2oConfig {
    pub budget: Budget,
    /// Share of the budget given to the recent window (paper: an even split, 0.5).
    pub recent_ratio: f64,
}

impl Default for H2oConfig {
    fn default() -> Self {
        Self { budget: Budget::default(), recent_ratio: 0.5 }
    }
}

impl H2oConfig {
    pub fn validate(&self) -> Result<()> {
        Ok(())
    }
}
