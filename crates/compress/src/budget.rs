//! Budgets: how many entries each head may keep, in one grammar for the command line, JSON
//! configurations and sweep specifications.

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

use crate::error::{CompressError, Result};

/// A per-head entry budget: a share of the prompt's length or an absolute count.
///
/// Written as a share, `0.35`, `35%` or `1` (everything), or as a token count, `512t`
/// (`512 tokens` too; units in any case). A bare number above 1 is refused: `512` could
/// mean either. JSON
/// takes the same numbers and strings, or `{"ratio": 0.35}` and `{"tokens": 512}`, which is
/// also how a budget is written out.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Budget {
    /// Keep `round(ratio * T)` entries of a `T`-token prompt; `0 < ratio <= 1`. A share of
    /// 1 keeps everything, also while decoding.
    Ratio(f64),
    /// Keep at most this many entries per head: an absolute bound. A head under it (a
    /// shorter prompt) keeps everything, and keeps growing while decoding until it is
    /// reached.
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

    /// Entries a head may hold after a `prompt_len`-token prompt and while decoding: a
    /// share of the prompt (at least 1), [`Budget::EVERYTHING`] for a share of 1, or the
    /// token count, which may exceed the prompt (nothing is then dropped until the head
    /// grows to it).
    pub fn entries(&self, prompt_len: usize) -> usize {
        match *self {
            Budget::Ratio(r) if r >= 1.0 => Self::EVERYTHING,
            Budget::Ratio(r) => ((r * prompt_len as f64).round() as usize).max(1.min(prompt_len)),
            Budget::Tokens(t) => t,
        }
    }

    /// The share of a `prompt_len`-token prompt the budget keeps right after the prompt.
    pub fn ratio(&self, prompt_len: usize) -> f64 {
        if prompt_len == 0 {
            return 1.0;
        }
        self.entries(prompt_len).min(prompt_len) as f64 / prompt_len as f64
    }
}

impl Default for Budget {
    fn default() -> Self {
        Budget::Ratio(0.5)
    }
}

impl Budget {
    /// The entry bound of a budget that keeps everything (a share of 1): no bound.
    pub const EVERYTHING: usize = usize::MAX;

    /// A bare number: a share up to 1; above 1 it is refused, naming the token form.
    fn from_number(x: f64, written: &str) -> Result<Self> {
        if x > 1.0 && x.is_finite() {
            let hint = if x.fract() == 0.0 {
                format!("for {x} tokens per head write `{x}t`, for a share `0.35` or `35%`")
            } else {
                "a share is at most 1 (or 100%)".to_string()
            };
            return Err(CompressError::invalid(
                "budget",
                format!("`{written}` is above 1: {hint}"),
            ));
        }
        let budget = Budget::Ratio(x);
        budget.validate()?;
        Ok(budget)
    }
}

impl FromStr for Budget {
    type Err = CompressError;
    /// `0.35`, `35%`, `1` (everything), `512t` or `512 tokens` (units in any case).
    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        let lower = s.to_ascii_lowercase();
        let bad = || {
            CompressError::invalid(
                "budget",
                format!("`{s}` is not a share (0.35, 35%, 1) or a token count (512t)"),
            )
        };
        let number = |t: &str| t.trim().parse::<f64>().ok().filter(|x| x.is_finite());
        let tokens = ["tokens", "token", "t"].iter().find_map(|unit| lower.strip_suffix(unit));
        let budget = if let Some(p) = s.strip_suffix('%') {
            Budget::Ratio(number(p).ok_or_else(bad)? / 100.0)
        } else if let Some(t) = tokens {
            Budget::Tokens(t.trim().parse::<usize>().map_err(|_| bad())?)
        } else {
            return Budget::from_number(number(s).ok_or_else(bad)?, s);
        };
        budget.validate()?;
        Ok(budget)
    }
}

impl<'de> Deserialize<'de> for Budget {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        deserializer.deserialize_any(BudgetVisitor)
    }
}

/// Reads a number (a share), a string in the command-line grammar, or `{"ratio": x}` /
/// `{"tokens": n}`.
struct BudgetVisitor;

impl<'de> Visitor<'de> for BudgetVisitor {
    type Value = Budget;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(r#"a budget: 0.35, "35%", "512t", {"ratio": 0.35} or {"tokens": 512}"#)
    }

    fn visit_f64<E: de::Error>(self, x: f64) -> std::result::Result<Budget, E> {
        Budget::from_number(x, &x.to_string()).map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, x: u64) -> std::result::Result<Budget, E> {
        Budget::from_number(x as f64, &x.to_string()).map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, x: i64) -> std::result::Result<Budget, E> {
        Budget::from_number(x as f64, &x.to_string()).map_err(E::custom)
    }

    fn visit_str<E: de::Error>(self, s: &str) -> std::result::Result<Budget, E> {
        s.parse().map_err(E::custom)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Budget, A::Error> {
        let key: String =
            map.next_key()?.ok_or_else(|| de::Error::custom("an empty budget object"))?;
        let budget = match key.as_str() {
            "ratio" => Budget::Ratio(map.next_value()?),
            "tokens" => Budget::Tokens(map.next_value()?),
            other => return Err(de::Error::unknown_field(other, &["ratio", "tokens"])),
        };
        if let Some(extra) = map.next_key::<String>()? {
            return Err(de::Error::custom(format!(
                "a budget object has one field, `ratio` or `tokens`; `{extra}` is extra"
            )));
        }
        budget.validate().map_err(de::Error::custom)?;
        Ok(budget)
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Budget::Ratio(r) => write!(f, "{}%", (r * 1000.0).round() / 10.0),
            Budget::Tokens(1) => write!(f, "1 token"),
            Budget::Tokens(t) => write!(f, "{t} tokens"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_shares_percentages_and_token_counts() {
        for (text, budget) in [
            ("0.35", Budget::Ratio(0.35)),
            ("35%", Budget::Ratio(0.35)),
            (" 50 % ", Budget::Ratio(0.5)),
            ("1", Budget::Ratio(1.0)),
            ("1.0", Budget::Ratio(1.0)),
            ("100%", Budget::Ratio(1.0)),
            ("5e-1", Budget::Ratio(0.5)),
            ("512t", Budget::Tokens(512)),
            ("512 tokens", Budget::Tokens(512)),
            ("1 token", Budget::Tokens(1)),
            ("1t", Budget::Tokens(1)),
            ("512T", Budget::Tokens(512)),
            ("512 Tokens", Budget::Tokens(512)),
        ] {
            assert_eq!(text.parse::<Budget>().unwrap(), budget, "{text}");
        }
    }

    #[test]
    fn display_reads_back() {
        for b in [Budget::Ratio(0.35), Budget::Ratio(1.0), Budget::Tokens(1), Budget::Tokens(512)] {
            assert_eq!(b.to_string().parse::<Budget>().unwrap(), b);
        }
        assert_eq!(Budget::Tokens(1).to_string(), "1 token");
        assert_eq!(Budget::Tokens(512).to_string(), "512 tokens");
        assert_eq!(Budget::Ratio(0.35).to_string(), "35%");
    }

    #[test]
    fn rejects_zero_over_one_and_bare_counts() {
        for bad in [
            "0", "0.0", "0%", "0t", "1.5", "-0.2", "150%", "abc", "", "nan", "inf", "NaN%", "t",
            "1.5t", "-3t", "512",
        ] {
            let err = bad.parse::<Budget>().unwrap_err();
            assert!(err.to_string().contains("budget"), "{bad}: {err}");
        }
        let err = "512".parse::<Budget>().unwrap_err().to_string();
        assert!(err.contains("512t"), "{err}");
    }

    #[test]
    fn json_takes_numbers_strings_and_objects() {
        let parse = |json: &str| serde_json::from_str::<Budget>(json).map_err(|e| e.to_string());
        for (json, budget) in [
            ("0.35", Budget::Ratio(0.35)),
            ("1", Budget::Ratio(1.0)),
            (r#""35%""#, Budget::Ratio(0.35)),
            (r#""512t""#, Budget::Tokens(512)),
            (r#"{"ratio": 0.35}"#, Budget::Ratio(0.35)),
            (r#"{"tokens": 512}"#, Budget::Tokens(512)),
        ] {
            assert_eq!(parse(json).unwrap(), budget, "{json}");
        }
        for (json, needle) in [
            ("512", "512t"),
            ("1.5", "at most 1"),
            ("0", "ratio"),
            (r#""512""#, "512t"),
            (r#""lots""#, "lots"),
            (r#"{"ratio": 0}"#, "ratio"),
            (r#"{"ratio": 2}"#, "ratio"),
            (r#"{"tokens": 0}"#, "at least 1"),
            (r#"{"tokens": 1.5}"#, "1.5"),
            (r#"{"share": 0.5}"#, "share"),
            (r#"{"ratio": 0.5, "tokens": 3}"#, "extra"),
            ("true", "budget"),
        ] {
            let err = parse(json).unwrap_err();
            assert!(err.contains(needle), "{json}: {err}");
        }
        let written = serde_json::to_string(&Budget::Tokens(512)).unwrap();
        assert_eq!(written, r#"{"tokens":512}"#);
        assert_eq!(parse(&written).unwrap(), Budget::Tokens(512));
    }

    #[test]
    fn entries_round_and_token_counts_are_absolute() {
        assert_eq!(Budget::Ratio(0.35).entries(1000), 350);
        assert_eq!(Budget::Ratio(0.5).entries(7), 4);
        assert_eq!(Budget::Ratio(0.01).entries(10), 1);
        // A token count is a bound, not cut to the prompt; a share of 1 is everything.
        assert_eq!(Budget::Tokens(2000).entries(100), 2000);
        assert_eq!(Budget::Ratio(1.0).entries(100), Budget::EVERYTHING);
        assert_eq!(Budget::Tokens(2000).ratio(100), 1.0);
        assert_eq!(Budget::Ratio(1.0).ratio(100), 1.0);
    }
}
