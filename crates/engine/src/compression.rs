//! Applying a compression method to a whole cache: once after the prompt, then after
//! every decode step. Called by [`crate::Sequence`] alone, for every command.

use std::time::Instant;

use kvmerger_compress::{CompressionMethod, HeadId, HeadReport, KvCache, KvDtype};
use rayon::prelude::*;
use serde::Serialize;

use crate::error::Result;

/// What compressing the prompt did, per layer and kv head.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CompressionReport {
    pub method: String,
    pub prompt_len: usize,
    /// Entry budget per head, per layer.
    pub budgets: Vec<usize>,
    /// `[layer][kv_head]`
    pub heads: Vec<Vec<HeadReport>>,
    pub compress_ms: f64,
    /// Bytes the cache held right after compression.
    pub resident_bytes: usize,
}

impl CompressionReport {
    /// Entries kept over all heads.
    pub fn kept_entries(&self) -> usize {
        self.heads.iter().flatten().map(|h| h.after).sum()
    }

    /// Entries kept over entries before, over all heads.
    pub fn achieved_ratio(&self) -> f64 {
        kept_share(self.heads.iter().flatten())
    }

    /// Heads whose method had to shrink a fixed part (sinks, observation window, protected
    /// shares) to fit the head's budget; see [`HeadReport::clamped`].
    pub fn clamped_heads(&self) -> usize {
        self.heads.iter().flatten().filter(|h| h.clamped.is_some()).count()
    }

    /// Achieved ratio of one layer.
    pub fn layer_ratio(&self, layer: usize) -> f64 {
        kept_share(&self.heads[layer])
    }
}

/// Entries kept over entries before, summed over `heads` (1 for no entries).
fn kept_share<'a>(heads: impl IntoIterator<Item = &'a HeadReport>) -> f64 {
    let (before, after) = heads.into_iter().fold((0, 0), |(b, a), h| (b + h.before, a + h.after));
    if before == 0 {
        1.0
    } else {
        after as f64 / before as f64
    }
}

/// Compresses every head of `cache` (holding a `prompt_len`-token prompt) to the method's
/// per-layer budget, releases the memory freed, and fixes the budgets and the log-count
/// bias on the cache for the decode steps that follow. A budget above what a head holds
/// (a token count beyond the prompt, or a share of 1) leaves the head whole, and stays the
/// bound while decoding: nothing is evicted until the head grows to it.
///
/// A method that computes new rows (merging) gets each head widened to f32 and narrowed back
/// to the cache's dtype once compressed, so merges compute in f32 and round once; a
/// selection moves the stored rows as they are.
pub fn compress_prompt(
    method: &dyn CompressionMethod,
    cache: &mut KvCache,
    prompt_len: usize,
) -> Result<CompressionReport> {
    let start = Instant::now();
    let n_layers = cache.n_layers();
    let budgets: Vec<usize> =
        (0..n_layers).map(|l| method.layer_budget_entries(l, n_layers, prompt_len)).collect();
    let heads = cache
        .layers
        .par_iter_mut()
        .zip(&budgets)
        .enumerate()
        .map(|(layer, (heads, &budget))| {
            let dtype = heads.first().map_or(KvDtype::F32, |h| h.dtype());
            let widen = method.computes_rows() && dtype != KvDtype::F32;
            if widen {
                heads.iter_mut().for_each(|h| h.convert(KvDtype::F32));
            }
            let reports = method.compress_layer(layer, heads, budget);
            for head in heads.iter_mut() {
                if widen {
                    head.convert(dtype);
                }
                // Resident memory follows the entries kept, whatever the method did.
                head.shrink_to_fit();
            }
            reports
        })
        .collect::<kvmerger_compress::Result<Vec<_>>>()?;
    cache.budgets = Some(budgets.clone());
    cache.log_count_bias = method.log_count_bias();
    Ok(CompressionReport {
        method: method.name().to_string(),
        prompt_len,
        budgets,
        heads,
        compress_ms: start.elapsed().as_secs_f64() * 1e3,
        resident_bytes: cache.resident_bytes(),
    })
}

/// Applies the method's decode-time policy (eviction to the budget) to every head after
/// decode step `step`; a no-op before the prompt was compressed. With `max_kv`, a head holds
/// at most that many entries after the step: the method's policy gets the smaller of its
/// budget and the bound, and a head still past the bound is brought back by
/// [`CompressionMethod::bound`], its buffers then sized to the bound plus the next step's
/// entry, so its resident bytes stay put. Layers run in parallel: H2O's policy scans every
/// entry of every head each step, and a serial scan would also let the threads fall asleep
/// before the next step.
pub fn after_decode_step(
    method: &dyn CompressionMethod,
    cache: &mut KvCache,
    step: usize,
    max_kv: Option<usize>,
) -> Result<()> {
    let Some(budgets) = &cache.budgets else { return Ok(()) };
    cache.layers.par_iter_mut().zip(budgets).enumerate().try_for_each(
        |(layer, (heads, &budget))| {
            heads.iter_mut().enumerate().try_for_each(|(head, cache)| {
                let id = HeadId { layer, head };
                let bound = max_kv.map_or(budget, |n| budget.min(n));
                method.after_step(id, cache, bound, step)?;
                if let Some(n) = max_kv.filter(|&n| cache.len() > n) {
                    method.bound(id, cache, n)?;
                    cache.reserve_exact((n + 1).saturating_sub(cache.len()));
                }
                Ok::<(), kvmerger_compress::CompressError>(())
            })
        },
    )?;
    Ok(())
}
