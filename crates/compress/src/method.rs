//! The interface every compression method implements.

use serde::Serialize;

use crate::cache::HeadCache;
use crate::error::Result;
use crate::stats::StatsRequest;

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
    /// The method's fixed part that did not fit in this head's budget and was shrunk to
    /// fit (`"sinks"`, `"window"`, `"protected"`), if any.
    pub clamped: Option<&'static str>,
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

    /// Statistics the prefill of a prompt of `prompt_len` tokens must accumulate: those of
    /// [`Self::stats`] plus any that depend on the budget (CaM's eviction windows).
    fn prompt_stats(&self, _prompt_len: usize) -> StatsRequest {
        self.stats()
    }

    /// Statistics each decode step must accumulate for [`Self::after_step`]: by default
    /// those of [`Self::stats`] without the prompt-only ones. A method whose decode-time
    /// policy reads none asks for none, so its steps skip the attention statistic.
    fn decode_stats(&self) -> StatsRequest {
        self.stats().after_prompt()
    }

    /// Entries a head may keep after a prompt of `prompt_len` tokens (`prompt_len` for
    /// methods without a budget).
    fn budget_entries(&self, prompt_len: usize) -> usize;

    /// Entries a head of `layer` (of a model of `n_layers`) may keep on average; methods
    /// with per-layer budgets override this. A method that shares a layer's budget among its
    /// heads ([`Self::compress_layer`]) holds the layer's total, `n_kv_heads` times this.
    fn layer_budget_entries(&self, _layer: usize, _n_layers: usize, prompt_len: usize) -> usize {
        self.budget_entries(prompt_len)
    }

    /// Whether compression leaves each layer at most its budget: false where a threshold
    /// decides what stays (KVMerger's `threshold` mode), whose heads are bounded only by
    /// the prompt.
    fn bounded_by_budget(&self) -> bool {
        true
    }

    /// Why this method cannot compress a prompt part by part during prefill, for a reason
    /// of its own rather than of the statistics it reads; `None` where it can.
    fn incremental_refusal(&self) -> Option<String> {
        None
    }

    /// Whether merged entries get `ln(count)` added to their attention logit.
    fn log_count_bias(&self) -> bool {
        false
    }

    /// Whether [`Self::compress`] computes new keys or values (merging) rather than only
    /// choosing which entries stay. The engine hands such a method its head widened to f32,
    /// so repeated merges round once when narrowed back; a selection moves stored rows.
    fn computes_rows(&self) -> bool {
        false
    }

    /// Compresses one head right after the prompt was prefilled. `budget` is
    /// [`Self::budget_entries`] of the prompt length.
    fn compress(&self, id: HeadId, head: &mut HeadCache, budget: usize) -> Result<HeadReport>;

    /// Compresses every kv head of `layer` right after the prompt, `budget` entries per head
    /// on average. By default each head is compressed alone to `budget` (or what it holds);
    /// a method that moves budget between heads (AdaKV) overrides this and keeps the
    /// layer's total, `budget * heads.len()`, instead.
    fn compress_layer(
        &self,
        layer: usize,
        heads: &mut [HeadCache],
        budget: usize,
    ) -> Result<Vec<HeadReport>> {
        heads
            .iter_mut()
            .enumerate()
            .map(|(head, cache)| {
                let held = budget.min(cache.len());
                self.compress(HeadId { layer, head }, cache, held)
            })
            .collect()
    }

    /// The method as a scorer, if it is one: a method that rates every entry of a head and
    /// keeps the best, which wrappers (AdaKV, merge-on-evict) can drive.
    fn scorer(&self) -> Option<&dyn Scorer> {
        None
    }

    /// Why the method cannot keep a head within a bound while decoding (`max_kv`), or
    /// `None` where it can: the engine hands the bound to [`Self::after_step`] as the
    /// budget, then calls [`Self::bound`] on a head still past it. A method opts in; by
    /// default it chooses what stays from statistics that only the prompt records.
    fn decode_bound_refusal(&self) -> Option<String> {
        Some(format!(
            "{} chooses what stays from statistics only the prompt records and has no rule \
             for the entries decoding adds; bound generation with h2o, tova, streaming_llm, \
             cam, knorm, keydiff or kvmerger",
            self.name()
        ))
    }

    /// Brings a head that decoding took past `max_entries` back to at most that many, by
    /// the method's own rule: by default its prompt compression, run again on what the
    /// head holds. Called only where [`Self::decode_bound_refusal`] is `None`.
    fn bound(&self, id: HeadId, head: &mut HeadCache, max_entries: usize) -> Result<()> {
        self.compress(id, head, max_entries).map(|_| ())
    }

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

/// A method that keeps a head's highest-scored entries (kvpress's `ScorerPress`): the
/// scores alone, for wrappers that decide differently what to do with them.
pub trait Scorer: Send + Sync {
    /// One score per entry of `head`, `[len]`, higher kept first. Entries the method always
    /// keeps (sinks, an observation window) score `f32::INFINITY`.
    fn score(&self, head: &HeadCache) -> Result<Vec<f32>>;
}
