//! Budgets: how many entries each head may keep.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

use crate::error::{CompressError, Result};

/// A per-head entry budget: a share of the prompt's length or an absolute count.
///
/// JSON: `{"ratio": 0.5}` or `{"tokens": 512}`. On the command line: `0.5`, `50%` or `512`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Budget {
    /// Keep `round(ratio * T)` entries of a `T`-token prompt; `0 < ratio <= 1`.
    Ratio(f64),
    /// Keep this many entries per head (at most the prompt length).
    Tokens(usize),
}

impl Budget {
    pub fn validate(&self) -> Result<()> {
        match *self {
            Budget::Ratio(r) if !(r > 0.0 && r <= 1.0) => {
                Err(CompressError::invalid("budget", format!("ratio must be in (0, 1], got {r}")))
            }
            Budget::Tokens(0) => {
                Err(CompressError::invalid("budget", "token budget must be at least 1"))
            }
            _ => Ok(()),
        }
    }

    /// Entries a head of a `prompt_len`-token prompt may keep (at least 1, at most `prompt_len`).
    pub fn entries(&self, prompt_len: usize) -> usize {
        let b = match *self {
            Budget::Ratio(r) => (r * prompt_len as f64).round() as usize,
            Budget::Tokens(t) => t,
        };
        b.clamp(1.min(prompt_len), prompt_len)
    }

    /// The budget as a share of the prompt.
    pub fn ratio(&self, prompt_len: usize) -> f64 {
        if prompt_len == 0 {
            return 1.0;
        }
        self.entries(prompt_len) as f64 / prompt_len as f64
    }
}

impl Default for Budget {
    fn default() -> Self {
        Budget::Ratio(0.5)
    }
}

impl FromStr for Budget {
    type Err = CompressError;
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        let bad = || {
            CompressError::invalid(
                "budget",
                format!("`{s}` is not a ratio (0.35, 35%) or a token count (512)"),
            )
        };
        let budget = if let Some(p) = s.strip_suffix('%') {
            Budget::Ratio(p.trim().parse::<f64>().map_err(|_| bad())? / 100.0)
        } else if s.contains('.') || s.contains('e') {
            Budget::Ratio(s.parse::<f64>().map_err(|_| bad())?)
        } else {
            Budget::Tokens(s.parse::<usize>().map_err(|_| bad())?)
        };
        budget.validate()?;
        Ok(budget)
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Budget::Ratio(r) => write!(f, "{}%", (r * 1000.0).round() / 10.0),
            Budget::Tokens(t) => write!(f, "{t} tokens"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ratios_percentages_and_counts() {
        assert_eq!("0.35".parse::<Budget>().unwrap(), Budget::Ratio(0.35));
        assert_eq!("50%".parse::<Budget>().unwrap(), Budget::Ratio(0.5));
        assert_eq!("512".parse::<Budget>().unwrap(), Budget::Tokens(512));
        assert_eq!("1.0".parse::<Budget>().unwrap(), Budget::Ratio(1.0));
    }

    #[test]
    fn rejects_zero_and_over_one() {
        for bad in ["0", "0.0", "1.5", "-0.2", "150%", "abc", ""] {
            let err = bad.parse::<Budget>().unwrap_err();
            assert!(err.to_string().contains("budget"), "{bad}: {err}");
        }
    }

    #[test]
    fn entries_round_and_clamp() {
        assert_eq!(Budget::Ratio(0.35).entries(1000), 350);
        assert_eq!(Budget::Ratio(0.5).entries(7), 4);
        assert_eq!(Budget::Tokens(2000).entries(100), 100);
        assert_eq!(Budget::Ratio(0.01).entries(10), 1);
    }
}
