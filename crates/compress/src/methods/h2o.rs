//! H2O (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of
//! Large Language Models", NeurIPS 2023): keep a recent window plus the entries with the
//! largest accumulated attention; as decoding grows the cache, evict the non-recent entry
//! with the lowest accumulated attention.

use serde::{Deserialize, Serialize};

use crate::budget::Budget;
use crate::cache::HeadCache;
use crate::error::{CompressError, Result};
use crate::method::{CompressionMethod, HeadId, HeadReport};
use crate::methods::select::heavy_hitters_and_recent;
use crate::stats::StatsRequest;

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
        check_recent_ratio(self.recent_ratio)
    }

    fn recent(&self, budget: usize) -> usize {
        (budget as f64 * self.recent_ratio).round() as usize
    }
}

/// Validates a recent-window share of the budget.
pub(crate) fn check_recent_ratio(r: f64) -> Result<()> {
    if (0.0..=1.0).contains(&r) {
        Ok(())
    } else {
        Err(CompressError::invalid("recent_ratio", format!("must be in [0, 1], got {r}")))
    }
}

/// Evicts the entry with the lowest accumulated attention outside the last `recent`
/// entries (the lowest index on ties). Returns its index.
pub(crate) fn lowest_non_recent(head: &HeadCache, recent: usize) -> usize {
    let end = head.len().saturating_sub(recent).max(1).min(head.len());
    let meta = head.meta();
    (0..end)
        .min_by(|&a, &b| meta[a].attention.total_cmp(&meta[b].attention).then(a.cmp(&b)))
        .unwrap_or(0)
}

/// The entry with the least accumulated attention among those older than the `recent`
/// newest positions and not at the first `sinks` positions (ties: the older), whatever the
/// order of entries; the oldest entry if every entry is protected. With no sinks, the same
/// choice as [`lowest_non_recent`] on a cache in position order.
pub(crate) fn lowest_older_than_recent(head: &HeadCache, sinks: usize, recent: usize) -> usize {
    let meta = head.meta();
    let newest = meta.iter().map(|m| m.position).max().unwrap_or(0);
    let cutoff = (newest + 1).saturating_sub(recent);
    // One pass comparing integer keys (this runs for every head after every decode step):
    // `(attention in f32::total_cmp's order, position)`, positions being distinct.
    let mut lowest: Option<(usize, (i32, usize))> = None;
    for (i, m) in meta.iter().enumerate() {
        let key = (total_order(m.attention), m.position);
        if (sinks..cutoff).contains(&m.position) && lowest.is_none_or(|(_, best)| key < best) {
            lowest = Some((i, key));
        }
    }
    lowest
        .map(|(i, _)| i)
        .or_else(|| (0..meta.len()).min_by_key(|&i| meta[i].position))
        .unwrap_or(0)
}

/// An integer ordered as [`f32::total_cmp`] orders `x` (its own definition).
fn total_order(x: f32) -> i32 {
    let bits = x.to_bits() as i32;
    bits ^ (((bits >> 31) as u32) >> 1) as i32
}

impl CompressionMethod for H2oConfig {
    fn name(&self) -> &'static str {
        "h2o"
    }

    fn stats(&self) -> StatsRequest {
        StatsRequest::accumulated()
    }

    fn budget_entries(&self, prompt_len: usize) -> usize {
        self.budget.entries(prompt_len)
    }

    fn compress(&self, _id: HeadId, head: &mut HeadCache, budget: usize) -> Result<HeadReport> {
        let before = head.len();
        head.retain_indices(&heavy_hitters_and_recent(head, budget, self.recent(budget)));
        head.shrink_to_fit();
        Ok(HeadReport { before, after: head.len(), ..Default::default() })
    }

    /// Its decode-time eviction keeps the bound (the lowest accumulated attention leaves).
    fn decode_bound_refusal(&self) -> Option<String> {
        None
    }

    fn after_step(
        &self,
        _id: HeadId,
        head: &mut HeadCache,
        budget: usize,
        _step: usize,
    ) -> Result<()> {
        // Recency is read from positions, not from the order of entries, so a victim's slot
        // can take another entry: two rows move per eviction instead of half the cache.
        while head.len() > budget {
            head.remove_unordered(lowest_older_than_recent(head, 0, self.recent(budget)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::test_util::random_head;

    /// The plain definition: sort everything outside the window by attention, take the best.
    fn reference(head: &HeadCache, budget: usize, recent: usize) -> Vec<usize> {
        let n = head.len();
        let mut order: Vec<usize> = (0..n - recent).collect();
        order.sort_by(|&a, &b| {
            head.meta()[b].attention.partial_cmp(&head.meta()[a].attention).unwrap().then(a.cmp(&b))
        });
        let mut keep: Vec<usize> = order[..budget - recent].to_vec();
        keep.extend(n - recent..n);
        keep.sort();
        keep
    }

    #[test]
    fn keeps_the_reference_selection_on_random_inputs() {
        for seed in 0..20 {
            let mut head = random_head(80, 4, seed);
            let budget = 10 + seed as usize;
            let cfg = H2oConfig { budget: Budget::Tokens(budget), recent_ratio: 0.5 };
            let expected = reference(&head, budget, cfg.recent(budget));
            cfg.compress(HeadId { layer: 0, head: 0 }, &mut head, budget).unwrap();
            let kept: Vec<usize> = head.meta().iter().map(|m| m.position).collect();
            assert_eq!(kept, expected, "seed {seed}");
        }
    }

    #[test]
    fn decode_eviction_removes_the_lowest_non_recent_entry() {
        let mut head = random_head(12, 4, 3);
        let cfg = H2oConfig { budget: Budget::Tokens(11), recent_ratio: 0.5 };
        let recent = cfg.recent(11);
        let victim = (0..12 - recent)
            .min_by(|&a, &b| head.meta()[a].attention.total_cmp(&head.meta()[b].attention))
            .unwrap();
        cfg.after_step(HeadId { layer: 0, head: 0 }, &mut head, 11, 1).unwrap();
        assert_eq!(head.len(), 11);
        assert!(head.meta().iter().all(|m| m.position != victim));
    }

    #[test]
    fn decode_eviction_in_any_order_evicts_what_shifting_evicts() {
        let id = HeadId { layer: 0, head: 0 };
        for seed in 0..20 {
            let budget = 8 + seed as usize % 5;
            let cfg = H2oConfig { budget: Budget::Tokens(budget), recent_ratio: 0.5 };
            let mut swapped = random_head(budget, 4, seed);
            let mut shifted = swapped.clone();
            let extra = random_head(40, 4, seed + 100);
            for step in 0..40 {
                for head in [&mut swapped, &mut shifted] {
                    let mut meta = extra.meta()[step];
                    meta.position = budget + step;
                    head.push(&extra.key(step), &extra.value(step), meta);
                }
                cfg.after_step(id, &mut swapped, budget, step + 1).unwrap();
                shifted.remove(lowest_non_recent(&shifted, cfg.recent(budget)));
                let mut a: Vec<usize> = swapped.meta().iter().map(|m| m.position).collect();
                a.sort();
                let b: Vec<usize> = shifted.meta().iter().map(|m| m.position).collect();
                assert_eq!(a, b, "seed {seed} step {step}");
                for (i, m) in swapped.meta().iter().enumerate() {
                    let j = b.binary_search(&m.position).unwrap();
                    assert_eq!(swapped.key(i), shifted.key(j), "rows move with their entry");
                    assert_eq!(swapped.value(i), shifted.value(j));
                }
            }
        }
    }

    /// The one-pass victim search picks what the plain definition (filter, then the least
    /// by `total_cmp` and position) picks, in any order of entries, with ties, zeros of
    /// both signs, and every entry recent.
    #[test]
    fn victim_search_matches_the_plain_definition() {
        let plain = |head: &HeadCache, recent: usize| {
            let meta = head.meta();
            let newest = meta.iter().map(|m| m.position).max().unwrap_or(0);
            let cutoff = (newest + 1).saturating_sub(recent);
            (0..meta.len())
                .filter(|&i| meta[i].position < cutoff)
                .min_by(|&a, &b| {
                    meta[a]
                        .attention
                        .total_cmp(&meta[b].attention)
                        .then(meta[a].position.cmp(&meta[b].position))
                })
                .or_else(|| (0..meta.len()).min_by_key(|&i| meta[i].position))
                .unwrap_or(0)
        };
        let values = [0.0, -0.0, 0.25, 0.25, 1e-30, 3.0, f32::MIN_POSITIVE];
        for seed in 0..200u64 {
            let n = 1 + seed as usize % 37;
            let mut head = random_head(n, 4, seed);
            // Shuffle positions (as swapping evictions leave them) and plant ties.
            let mut positions: Vec<usize> = (0..n).map(|i| i * 3 + seed as usize % 5).collect();
            positions.rotate_left(seed as usize % n);
            for (i, m) in head.meta_mut().iter_mut().enumerate() {
                m.position = positions[i];
                if (i + seed as usize).is_multiple_of(3) {
                    m.attention = values[(i * 7 + seed as usize) % values.len()];
                }
            }
            for recent in [0, 1, n / 2, n, n + 3] {
                let got = lowest_older_than_recent(&head, 0, recent);
                assert_eq!(got, plain(&head, recent), "seed {seed} recent {recent}");
            }
        }
        for x in [-1.0f32, -0.0, 0.0, 1e-40, 0.5, 2.0, f32::INFINITY, f32::NAN] {
            for y in [-1.0f32, -0.0, 0.0, 1e-40, 0.5, 2.0, f32::INFINITY, f32::NAN] {
                assert_eq!(total_order(x).cmp(&total_order(y)), x.total_cmp(&y), "{x} {y}");
            }
        }
    }

    #[test]
    fn recent_ratio_out_of_range_is_named() {
        let err = H2oConfig { recent_ratio: 1.5, ..Default::default() }.validate().unwrap_err();
        assert!(err.to_string().contains("recent_ratio"));
    }
}
