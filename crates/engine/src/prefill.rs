//! How a served prompt is prefilled: its chunks, where the cache is compressed, and how
//! many entries each head holds at most. Pure arithmetic over token counts, so the memory a
//! sequence reserves is known before it runs.
//!
//! With [`PrefillCompression::Incremental`], a compressing request never holds its whole
//! prompt: whenever the next chunk would take a head past its final budget `B` plus the
//! longest chunk `M`, every head is compressed to `B` first, so a head holds at most
//! `B + M` entries. The last compression runs after the last chunk, as in
//! [`PrefillCompression::Once`], which prefills the whole prompt and compresses it once.

use std::ops::Range;
use std::str::FromStr;

/// When a served prompt is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrefillCompression {
    /// Compress to the final budget during the chunked prefill, whenever the next chunk
    /// would not fit beside the budget; a head holds at most budget plus one chunk.
    #[default]
    Incremental,
    /// Prefill the whole prompt, then compress once (what an evaluation does); the request
    /// holds its full prompt cache during prefill.
    Once,
}

impl PrefillCompression {
    /// As the command line spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Incremental => "incremental",
            Self::Once => "once",
        }
    }
}

impl FromStr for PrefillCompression {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "incremental" => Ok(Self::Incremental),
            "once" => Ok(Self::Once),
            other => Err(format!("expected `incremental` or `once`, got `{other}`")),
        }
    }
}

/// How a command prefills a prompt: the same chunked prefill in every command, the
/// server's included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefillOptions {
    /// Prompt tokens per forward pass.
    pub chunk: usize,
    pub compression: PrefillCompression,
    /// Queries per chunk of the explicit attention softmax.
    pub attention_chunk: usize,
}

impl Default for PrefillOptions {
    /// Compressing once, as an evaluation does; chunks long enough that a prompt's linear
    /// layers run as wide matrix products.
    fn default() -> Self {
        Self { chunk: 512, compression: PrefillCompression::Once, attention_chunk: 128 }
    }
}

/// The chunks of one prompt and the entries its heads hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefillPlan {
    /// Consecutive ranges covering the prompt; each at most `max(chunk, window)` tokens,
    /// the last at least `min(window, prompt)`.
    pub chunks: Vec<Range<usize>>,
    /// `compress_after[k]`: the cache is compressed to the final budgets after chunk `k`
    /// (never set for the last chunk, which is always followed by the final compression).
    pub compress_after: Vec<bool>,
    /// Per layer, the most entries a head holds during prefill.
    pub peak_entries: Vec<usize>,
    /// Per layer, the entries a head holds after the final compression.
    pub kept_entries: Vec<usize>,
}

impl PrefillPlan {
    /// Plans a `prompt_len`-token prompt in chunks of `chunk` tokens whose last chunk holds
    /// at least `window` tokens (an observation window seen in one pass). `budgets` are the
    /// per-layer entry budgets a head settles to (`prompt_len` for a method that keeps
    /// everything or whose result is not bounded by its budget). With `incremental`, the
    /// cache is compressed whenever the next chunk would take a head past its budget plus
    /// the longest chunk.
    pub fn new(
        prompt_len: usize,
        chunk: usize,
        window: usize,
        budgets: &[usize],
        incremental: bool,
    ) -> Self {
        let chunks = split(prompt_len, chunk.max(1), window.clamp(1, prompt_len.max(1)));
        let longest = chunks.iter().map(|c| c.len()).max().unwrap_or(0);
        let mut held = vec![0; budgets.len()];
        let mut peak = vec![0; budgets.len()];
        let mut compress_after = vec![false; chunks.len()];
        for (k, c) in chunks.iter().enumerate() {
            held.iter_mut().zip(&mut peak).for_each(|(h, p)| {
                *h += c.len();
                *p = (*p).max(*h);
            });
            let Some(next) = chunks.get(k + 1) else { break };
            let overflows =
                held.iter().zip(budgets).any(|(&h, &b)| h + next.len() > b.saturating_add(longest));
            if incremental && overflows {
                compress_after[k] = true;
                held.iter_mut().zip(budgets).for_each(|(h, &b)| *h = (*h).min(b));
            }
        }
        let kept_entries = budgets.iter().map(|&b| b.min(prompt_len)).collect();
        Self { chunks, compress_after, peak_entries: peak, kept_entries }
    }

    /// Index of the chunk that starts at `start`.
    pub fn chunk_at(&self, start: usize) -> Option<usize> {
        self.chunks.iter().position(|c| c.start == start)
    }

    /// Whether any compression happens before the last chunk.
    pub fn is_incremental(&self) -> bool {
        self.compress_after.iter().any(|&c| c)
    }
}

/// Chunks of `chunk` tokens; when the tail would leave a last chunk shorter than `window`,
/// the chunk before it is shortened instead, so no chunk exceeds `max(chunk, window)`.
fn split(n: usize, chunk: usize, window: usize) -> Vec<Range<usize>> {
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < n {
        let rest = n - start;
        let len = if rest <= chunk.max(window) {
            rest
        } else if rest - chunk < window {
            rest - window
        } else {
            chunk
        };
        chunks.push(start..start + len);
        start += len;
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_prompt_and_the_last_holds_the_window() {
        for (n, chunk, window) in [(100, 16, 32), (100, 16, 1), (1040, 256, 32), (20, 16, 32)] {
            let plan = PrefillPlan::new(n, chunk, window, &[n], false);
            let c = &plan.chunks;
            assert_eq!((c[0].start, c.last().unwrap().end), (0, n));
            assert!(c.windows(2).all(|w| w[0].end == w[1].start));
            assert!(c.last().unwrap().len() >= window.min(n), "{c:?}");
            assert!(c.iter().all(|r| !r.is_empty() && r.len() <= chunk.max(window)), "{c:?}");
        }
        // 1040 = 4 x 256 + 16: the fourth chunk gives 16 tokens to the 32-token window.
        let plan = PrefillPlan::new(1040, 256, 32, &[1040], false);
        assert_eq!(
            plan.chunks.iter().map(|c| c.len()).collect::<Vec<_>>(),
            [256, 256, 256, 240, 32]
        );
    }

    #[test]
    fn once_holds_the_prompt_and_incremental_holds_budget_plus_one_chunk() {
        let once = PrefillPlan::new(3000, 256, 1, &[1050, 700], false);
        assert_eq!(once.peak_entries, [3000, 3000]);
        assert_eq!(once.kept_entries, [1050, 700]);
        assert!(!once.is_incremental());
        let inc = PrefillPlan::new(3000, 256, 1, &[1050, 700], true);
        // Layer 1 (budget 700) sets the pace: compressed whenever 700 + 256 would overflow.
        assert_eq!(inc.peak_entries, [1050 + 256, 700 + 256]);
        assert_eq!(inc.kept_entries, [1050, 700]);
        // Replaying the plan never holds more than budget + longest chunk.
        let mut held = [0usize; 2];
        for (k, c) in inc.chunks.iter().enumerate() {
            for (h, b) in held.iter_mut().zip([1050, 700]) {
                *h += c.len();
                assert!(*h <= b + 256);
                if inc.compress_after[k] {
                    *h = (*h).min(b);
                }
            }
        }
        assert!(!inc.compress_after.last().unwrap());
        // First compression: after 768 tokens, since 768 + 256 > 700 + 256.
        assert_eq!(inc.compress_after.iter().position(|&c| c), Some(2));
    }

    #[test]
    fn a_budget_as_large_as_the_prompt_never_compresses_early() {
        let plan = PrefillPlan::new(500, 64, 1, &[500, 500], true);
        assert!(!plan.is_incremental());
        assert_eq!(plan.peak_entries, [500, 500]);
        let short = PrefillPlan::new(200, 256, 32, &[70], true);
        assert_eq!((short.chunks.len(), short.peak_entries[0]), (1, 200));
        assert_eq!("once".parse::<PrefillCompression>(), Ok(PrefillCompression::Once));
        assert!("twice".parse::<PrefillCompression>().unwrap_err().contains("incremental"));
    }
}
