//! Merge-on-evict, kvpress's `MergingPress` (after Token Merging, Bolya et al., ICLR 2023,
//! and D2O, Wan et al., 2024): any scorer decides which entries stay, as it would alone;
//! then, instead of being dropped, each evicted entry's value is folded into the kept
//! entry whose key is most like its own (cosine), weighted by that similarity and by the
//! share of the two values' norms that is its own:
//!
//! `w = max(cos, 0) * |v_e| / (|v_e| + |v_t| + eps)`, and each target's value becomes
//! `(v_t + sum w v_e) / (1 + sum w)` over the entries merged into it.
//!
//! Keys stay as they are (their rotary positions stay right). `similarity_threshold`
//! leaves out evicted entries less similar than it to every kept entry; `merge_fraction`
//! merges only that share of the evicted entries, the most similar. A merged entry
//! counts the tokens folded into it, but gets no `ln(count)` bias, as in kvpress. Acts
//! once, after the prompt; the cache grows while decoding.

use serde::{Deserialize, Serialize};

use crate::budget::Budget;
use crate::cache::HeadCache;
use crate::error::{CompressError, Result};
use crate::method::{CompressionMethod, HeadId, HeadReport};
use crate::methods::inner::InnerMethod;
use crate::methods::select::top_k;
use crate::stats::StatsRequest;

/// kvpress's `_EPS`: guards the norms and the weights' denominator.
const EPS: f32 = 1e-6;

/// Merge-on-evict parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MergeOnEvictConfig {
    pub budget: Budget,
    /// Decides which entries stay (kvpress: any `ScorerPress`).
    pub scorer: InnerMethod,
    /// Least cosine similarity for an evicted entry to be merged (kvpress: 0; in [0, 1]).
    pub similarity_threshold: f32,
    /// Share of the evicted entries merged, the most similar first (kvpress: 1; in (0, 1]).
    pub merge_fraction: f32,
}

impl Default for MergeOnEvictConfig {
    fn default() -> Self {
        Self {
            budget: Budget::default(),
            scorer: InnerMethod::named("keydiff").expect("keydiff is a method"),
            similarity_threshold: 0.0,
            merge_fraction: 1.0,
        }
    }
}

impl MergeOnEvictConfig {
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.similarity_threshold) {
            return Err(CompressError::invalid(
                "similarity_threshold",
                format!("must be in [0, 1], got {}", self.similarity_threshold),
            ));
        }
        if !(self.merge_fraction > 0.0 && self.merge_fraction <= 1.0) {
            return Err(CompressError::invalid(
                "merge_fraction",
                format!("must be in (0, 1], got {}", self.merge_fraction),
            ));
        }
        self.scorer.scorer("scorer")?;
        Ok(())
    }
}

/// Row `i` of a `[len, d]` matrix scaled to unit length (norm clamped at [`EPS`]).
fn unit(rows: &[f32], d: usize, i: usize) -> Vec<f32> {
    let row = &rows[i * d..(i + 1) * d];
    let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(EPS);
    row.iter().map(|x| x / norm).collect()
}

fn norm(row: &[f32]) -> f32 {
    row.iter().map(|x| x * x).sum::<f32>().sqrt()
}

/// The `q`-quantile of `x` with linear interpolation (`torch.quantile`'s default). Entries
/// of `-inf` (those a threshold already left out) are passed over when the interpolation
/// would meet one, so the quantile lands among the finite ones, as kvpress intends.
fn quantile(x: &[f32], q: f32) -> f32 {
    let mut sorted = x.to_vec();
    sorted.sort_by(f32::total_cmp);
    let at = q * (sorted.len() - 1) as f32;
    let (lo, hi) = (sorted[at.floor() as usize], sorted[at.ceil() as usize]);
    if lo == f32::NEG_INFINITY {
        hi
    } else {
        lo + (hi - lo) * at.fract()
    }
}

impl CompressionMethod for MergeOnEvictConfig {
    fn name(&self) -> &'static str {
        "merge"
    }

    fn stats(&self) -> StatsRequest {
        self.scorer.method().stats()
    }

    fn prompt_stats(&self, prompt_len: usize) -> StatsRequest {
        self.scorer.method().prompt_stats(prompt_len)
    }

    fn decode_stats(&self) -> StatsRequest {
        StatsRequest::default()
    }

    fn budget_entries(&self, prompt_len: usize) -> usize {
        self.budget.entries(prompt_len)
    }

    fn computes_rows(&self) -> bool {
        true
    }

    fn compress(&self, _id: HeadId, head: &mut HeadCache, budget: usize) -> Result<HeadReport> {
        let len = head.len();
        if len <= budget {
            return Ok(HeadReport { before: len, after: len, ..Default::default() });
        }
        let scores = self.scorer.scorer("scorer")?.score(head)?;
        let kept = top_k(0..len, |i| scores[i], budget);
        let mut is_kept = vec![false; len];
        kept.iter().for_each(|&i| is_kept[i] = true);
        let evicted: Vec<usize> = (0..len).filter(|&i| !is_kept[i]).collect();
        if kept.is_empty() {
            head.retain_indices(&kept);
            return Ok(HeadReport { before: len, after: 0, ..Default::default() });
        }

        let d = head.head_dim();
        let (keys, values) = (head.keys().into_owned(), head.values().into_owned());
        let kept_units: Vec<Vec<f32>> = kept.iter().map(|&k| unit(&keys, d, k)).collect();
        // The most similar kept entry of each evicted one (the first of equals).
        let nearest: Vec<(usize, f32)> = evicted
            .iter()
            .map(|&e| {
                let u = unit(&keys, d, e);
                let sims = kept_units.iter().map(|k| k.iter().zip(&u).map(|(a, b)| a * b).sum());
                sims.enumerate().fold((0, f32::NEG_INFINITY), |best, (t, s): (usize, f32)| {
                    if s > best.1 {
                        (t, s)
                    } else {
                        best
                    }
                })
            })
            .collect();
        let mut merge: Vec<bool> =
            nearest.iter().map(|&(_, s)| s >= self.similarity_threshold).collect();
        if self.merge_fraction < 1.0 && merge.iter().any(|&m| m) {
            let gated: Vec<f32> = nearest
                .iter()
                .zip(&merge)
                .map(|(&(_, s), &m)| if m { s } else { f32::NEG_INFINITY })
                .collect();
            let least = quantile(&gated, 1.0 - self.merge_fraction);
            merge.iter_mut().zip(&nearest).for_each(|(m, &(_, s))| *m &= s >= least);
        }

        let row = |i: usize| &values[i * d..(i + 1) * d];
        let mut sums = vec![0.0f32; kept.len() * d];
        let mut weights = vec![0.0f32; kept.len()];
        let mut counts = vec![0u32; kept.len()];
        for ((&e, &(t, sim)), _) in evicted.iter().zip(&nearest).zip(&merge).filter(|(_, &m)| m) {
            let (evicted_norm, target_norm) = (norm(row(e)), norm(row(kept[t])));
            let w = sim.max(0.0) * evicted_norm / (evicted_norm + target_norm + EPS);
            sums[t * d..(t + 1) * d].iter_mut().zip(row(e)).for_each(|(s, v)| *s += w * v);
            weights[t] += w;
            counts[t] += head.meta()[e].count;
        }

        head.retain_indices(&kept);
        let mut merged = Vec::with_capacity(kept.len() * d);
        let (mut merge_sets, mut merged_tokens, mut largest_set) = (0, 0, 0);
        for (t, &k) in kept.iter().enumerate() {
            let value = row(k);
            if weights[t] > 0.0 {
                let sum = &sums[t * d..(t + 1) * d];
                merged.extend(value.iter().zip(sum).map(|(v, s)| (v + s) / (1.0 + weights[t])));
            } else {
                merged.extend_from_slice(value);
            }
            let meta = &mut head.meta_mut()[t];
            meta.count += counts[t];
            if counts[t] > 0 {
                merge_sets += 1;
                merged_tokens += meta.count as usize;
                largest_set = largest_set.max(meta.count as usize);
            }
        }
        let meta = head.meta().to_vec();
        let kept_keys = head.keys().into_owned();
        *head = head.with_entries(kept_keys, merged, meta)?;
        head.shrink_to_fit();
        Ok(HeadReport {
            before: len,
            after: head.len(),
            merge_sets,
            merged_tokens,
            largest_set,
            clamped: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CompressionConfig;
    use crate::methods::test_util::random_head;

    /// kvpress's `MergingPress.merge` computed the plain way, in f64, for KNorm's kept set:
    /// returns the kept positions and their values.
    fn kvpress_merged(
        head: &HeadCache,
        budget: usize,
        threshold: f64,
    ) -> (Vec<usize>, Vec<Vec<f64>>) {
        let n = head.len();
        let f = |row: &[f32]| row.iter().map(|&x| x as f64).collect::<Vec<f64>>();
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let keys: Vec<Vec<f64>> = (0..n).map(|i| f(&head.key(i))).collect();
        let values: Vec<Vec<f64>> = (0..n).map(|i| f(&head.value(i))).collect();
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| norm(&keys[a]).total_cmp(&norm(&keys[b])).then(a.cmp(&b)));
        let mut kept = order[..budget].to_vec();
        kept.sort();
        let unit = |v: &[f64]| v.iter().map(|x| x / norm(v).max(1e-6)).collect::<Vec<f64>>();
        let mut acc = vec![vec![0.0; head.head_dim()]; budget];
        let mut wsum = vec![0.0; budget];
        for e in (0..n).filter(|e| !kept.contains(e)) {
            let cos = |t: usize| {
                unit(&keys[e]).iter().zip(unit(&keys[kept[t]])).map(|(a, b)| a * b).sum::<f64>()
            };
            let t = (0..budget).fold(0, |best, t| if cos(t) > cos(best) { t } else { best });
            if cos(t) < threshold {
                continue;
            }
            let (ne, nt) = (norm(&values[e]), norm(&values[kept[t]]));
            let w = cos(t).max(0.0) * ne / (ne + nt + 1e-6);
            acc[t].iter_mut().zip(&values[e]).for_each(|(a, v)| *a += w * v);
            wsum[t] += w;
        }
        let merged = (0..budget)
            .map(|t| {
                let v = &values[kept[t]];
                if wsum[t] > 0.0 {
                    v.iter().zip(&acc[t]).map(|(v, a)| (v + a) / (1.0 + wsum[t])).collect()
                } else {
                    v.clone()
                }
            })
            .collect();
        (kept, merged)
    }

    fn merge(params: &[(&str, &str)]) -> MergeOnEvictConfig {
        let params: Vec<(String, String)> =
            params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        match CompressionConfig::from_cli("merge", None, &params).unwrap() {
            CompressionConfig::Merge(c) => c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn merges_what_kvpress_merges() {
        for seed in 0..10 {
            for threshold in ["0", "0.3"] {
                let mut head = random_head(40, 6, seed);
                let budget = 8 + seed as usize;
                let (kept, values) = kvpress_merged(&head, budget, threshold.parse().unwrap());
                let cfg = merge(&[("scorer", "knorm"), ("similarity_threshold", threshold)]);
                let report = cfg.compress(HeadId { layer: 0, head: 0 }, &mut head, budget);
                let report = report.unwrap();
                let positions: Vec<usize> = head.meta().iter().map(|m| m.position).collect();
                assert_eq!(positions, kept, "seed {seed}");
                for (t, expected) in values.iter().enumerate() {
                    for (a, b) in head.value(t).iter().zip(expected) {
                        assert!((*a as f64 - b).abs() < 1e-5, "seed {seed} entry {t}");
                    }
                }
                assert_eq!(report.after, budget);
                let tokens: u32 = head.meta().iter().map(|m| m.count).sum();
                assert!(tokens as usize <= 40 && tokens as usize >= budget);
                if threshold == "0" {
                    assert!(report.merge_sets > 0);
                }
            }
        }
    }

    #[test]
    fn keys_stay_and_a_fraction_merges_only_the_most_similar() {
        let head = random_head(50, 4, 3);
        let budget = 10;
        let mut all = head.clone();
        merge(&[("scorer", "knorm")]).compress(HeadId { layer: 0, head: 0 }, &mut all, 10).unwrap();
        let mut some = head.clone();
        let cfg = merge(&[("scorer", "knorm"), ("merge_fraction", "0.25")]);
        cfg.compress(HeadId { layer: 0, head: 0 }, &mut some, budget).unwrap();
        let kept: Vec<usize> = all.meta().iter().map(|m| m.position).collect();
        for (t, &k) in kept.iter().enumerate() {
            assert_eq!(*all.key(t), *head.key(k), "keys are not merged");
        }
        let tokens = |h: &HeadCache| h.meta().iter().map(|m| m.count).sum::<u32>() as usize;
        // Every evicted entry has some kept entry with positive similarity here.
        assert_eq!(tokens(&all), 50);
        // A quarter of the 40 evicted, by linear interpolation of the 0.75-quantile.
        assert_eq!(tokens(&some) - budget, 10);
        assert_eq!(quantile(&[f32::NEG_INFINITY, 0.2, 0.4], 0.25), 0.2);
        assert!((quantile(&[0.0, 1.0, 2.0, 3.0], 0.5) - 1.5).abs() < 1e-6);
    }

    #[test]
    fn parameters_out_of_range_and_non_scorers_are_refused() {
        for (k, v) in [("similarity_threshold", "1.5"), ("merge_fraction", "0"), ("scorer", "h2o")]
        {
            let params = [(k.to_string(), v.to_string())];
            let err = CompressionConfig::from_cli("merge", None, &params).unwrap_err();
            assert!(err.to_string().contains(k), "{err}");
        }
    }
}
