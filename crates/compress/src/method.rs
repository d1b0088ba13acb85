//! The interface every compression method implements.

use serde::Serialize;

use crate::cache::HeadCache;
use crate::error::Result;

/// Attention statistics a method needs the engine to accumulate into the cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsRequest {
    /// Accumulate attention received per key into [`crate::EntryMeta::attention`]
    /// (prefill and decode), averaged over the query heads of each kv group.
    pub accumulated: bool,
    /// Accumulate into [`HeadCache::window_attention`] the attention received from the
    /// last `n` queries of the prompt (SnapKV's observation window).
    pub window: Option<usize>,
}

/// Where a head sits, for methods that draw seeded random numbers per head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadId {
    pub layer: usize,
    pub head: usize,
}

/// What compressing one head did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct HeadReport {
    /// Entries before compression.
    pub before: usize,
    /// Entries after compression.
    pub after: usize,
    /// Merging sets of size >= 2 (KVMerger only).
    pub merge_sets: usize,
    /// Tokens those sets held in total.
    pub merged_tokens: usize,
    /// Size of the largest merging set.
    pub largest_set: usize,
}

/// A KV-cache compression method. Methods see one head at a time and know nothing of
/// models or files.
pub trait CompressionMethod: Send + Sync {
    /// Short name, as on the command line.
    fn name(&self) -> &'static str;

    /// Statistics the engine must accumulate for this method.
    fn stats(&self) -> StatsRequest {
        StatsRequest::default()
    }

    /// Entries a head may keep after a prompt of `prompt_len` tokens (`prompt_len` for
    /// methods without a budget).
    fn budget_entries(&self, prompt_len: usize) -> usize;

    /// Entries a head of `layer` may keep; methods with per-layer budgets override this.
    fn layer_budget_entries(&self, _layer: usize, prompt_len: usize) -> usize {
        self.budget_entries(prompt_len)
    }

    /// Whether merged entries get `ln(count)` added to their attention logit.
    fn log_count_bias(&self) -> bool {
        false
    }

    /// Compresses one head right after the prompt was prefilled. `budget` is
    /// [`Self::budget_entries`] of the prompt length.
    fn compress(&self, id: HeadId, head: &mut HeadCache, budget: usize) -> Result<HeadReport>;

    /// Called after each decode step appended entries to the head. Methods that keep a
    /// fixed-size cache during generation (H2O, CaM, StreamingLLM) evict here.
    fn after_step(
        &self,
        _id: HeadId,
        _head: &mut HeadCache,
        _budget: usize,
        _step: usize,
    ) -> Result<()> {
        Ok(())
    }
}

impl StatsRequest {
    /// The same request without the prompt-window statistics (for steps after the prompt).
    pub fn without_window(self) -> Self {
        Self { window: None, ..self }
    }
}

impl StatsRequest {
    /// Everything either request asks for (one prefill serving several methods).
    pub fn union(self, other: Self) -> Self {
        Self {
            accumulated: self.accumulated || other.accumulated,
            window: match (self.window, other.window) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            },
        }
    }
}
