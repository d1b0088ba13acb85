//! StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks",
//! ICLR 2024): keep the first `sinks` tokens and the most recent `budget - sinks`.

use serde::{Deserialize, Serialize};

use crate::budget::Budget;
use crate::error::{CompressError, Result};

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
    pub fn validate(&self) -> Result<()> {
        let _ = CompressError::invalid;
        Ok(())
    }
}
