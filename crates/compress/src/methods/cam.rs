//! CaM (Zhang et al., "CaM: Cache Merging for Memory-efficient LLMs Inference", ICML 2024):
//! an eviction policy decides what leaves; before an entry leaves, `v / m` of its value is
//! added to each of the `m = merge_span` entries right after it, with a probability set by
//! its attention (a seeded Bernoulli draw). Keys are not changed.
//!
//! After a prompt, victims are merged one by one in the order a token-by-token sliding
//! window would evict them (oldest first), each into the entries that follow it at that
//! moment, victims still to leave included: merged mass cascades forward as in the
//! reference code, and no entry receives more than `m` shares of `1 / m`.

use std::ops::Range;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::budget::Budget;
use crate::cache::HeadCache;
use crate::error::{CompressError, Result};
use crate::method::{CompressionMethod, HeadId, HeadReport};
use crate::methods::h2o::{check_recent_ratio, lowest_non_recent};
use crate::methods::select::{heavy_hitters_and_recent, sinks_and_recent, sinks_within};
use crate::stats::{EvictionWindow, StatsRequest};

/// Which eviction policy decides what leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CamEviction {
    /// Start (sink) and recent tokens, as in the official code.
    #[default]
    Streaming,
    /// H2O's heavy hitters plus recent window.
    H2o,
}

/// How the merge probability of an evicted entry is computed. With the streaming eviction
/// after a prompt, `Mean` reads attention as it stood when the entry left the window (see
/// [`EvictionWindow`]); otherwise the attention accumulated so far is used.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CamProbability {
    /// `clamp(A_i / mean(A of the next m kept), 0, 1)` (paper).
    #[default]
    Mean,
    /// `clamp(A_i / max(A of the next m kept), 0, 1)` (some code variants).
    Max,
    /// A fixed probability, for ablations (0 reduces CaM to its eviction policy).
    Fixed(f64),
}

/// CaM parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CamConfig {
    pub budget: Budget,
    pub eviction: CamEviction,
    /// Sinks kept by the streaming eviction (4).
    pub sinks: usize,
    /// Recent share of the budget for the H2O eviction (0.5).
    pub recent_ratio: f64,
    /// Number of following kept entries an evicted value is merged into (official code: 32).
    pub merge_span: usize,
    pub probability: CamProbability,
    /// Seed of the Bernoulli draws.
    pub seed: u64,
}

impl Default for CamConfig {
    fn default() -> Self {
        Self {
            budget: Budget::default(),
            eviction: CamEviction::default(),
            sinks: 4,
            recent_ratio: 0.5,
            merge_span: 32,
            probability: CamProbability::default(),
            seed: 0,
        }
    }
}

impl CamConfig {
    pub fn validate(&self) -> Result<()> {
        check_recent_ratio(self.recent_ratio)?;
        if self.merge_span == 0 {
            return Err(CompressError::invalid("merge_span", "must be at least 1"));
        }
        if let CamProbability::Fixed(p) = self.probability {
            if !(0.0..=1.0).contains(&p) {
                return Err(CompressError::invalid(
                    "probability",
                    format!("a fixed probability must be in [0, 1], got {p}"),
                ));
            }
        }
        // Each eviction policy reads its own parameter; the other's would change nothing.
        let d = Self::default();
        let inert = match self.eviction {
            CamEviction::Streaming => {
                (self.recent_ratio != d.recent_ratio).then_some(("recent_ratio", "h2o"))
            }
            CamEviction::H2o => (self.sinks != d.sinks).then_some(("sinks", "streaming")),
        };
        match inert {
            Some((name, reader)) => Err(CompressError::invalid(
                name,
                format!("has no effect with this eviction: only eviction = {reader} reads it"),
            )),
            None => Ok(()),
        }
    }

    fn recent(&self, budget: usize) -> usize {
        (budget as f64 * self.recent_ratio).round() as usize
    }

    /// One RNG per (layer, head, step): reproducible whatever order heads are processed in.
    fn rng(&self, id: HeadId, step: usize) -> StdRng {
        let mix = (id.layer as u64) << 40 ^ (id.head as u64) << 20 ^ step as u64;
        StdRng::seed_from_u64(self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ mix)
    }

    /// The eviction window whose statistics the prompt compression reads, if any: the
    /// streaming eviction with the `Mean` probability, when the prompt exceeds `budget`.
    fn eviction_window(&self, prompt_len: usize, budget: usize) -> Option<EvictionWindow> {
        let at_eviction = self.eviction == CamEviction::Streaming
            && self.probability == CamProbability::Mean
            && prompt_len > budget;
        at_eviction.then(|| {
            let reach = budget - sinks_within(self.sinks, budget);
            EvictionWindow { reach, span: self.merge_span.min(reach) }
        })
    }

    /// Probability that entry `victim`'s value is merged into `targets`, from the
    /// attention accumulated so far. A zero reference attention gives 0: there is no
    /// evidence the evicted entry mattered more.
    fn merge_probability(&self, head: &HeadCache, victim: usize, targets: Range<usize>) -> f64 {
        let attention = |i: usize| head.meta()[i].attention as f64;
        let reference = match self.probability {
            CamProbability::Fixed(p) => return p,
            CamProbability::Mean => {
                let n = targets.len() as f64;
                targets.map(attention).sum::<f64>() / n
            }
            CamProbability::Max => targets.map(attention).fold(0.0, f64::max),
        };
        ratio_probability(attention(victim), reference)
    }

    /// Adds `v_victim / m` to each target with probability `p` (`1 / m` whatever the
    /// number of targets, as the reference code does near the end of the cache).
    fn maybe_merge(
        &self,
        head: &mut HeadCache,
        victim: usize,
        targets: Range<usize>,
        p: f64,
        rng: &mut StdRng,
    ) {
        if targets.is_empty() {
            return;
        }
        // Draw even when p is 0 or 1, so the random stream does not depend on p.
        if rng.random::<f64>() < p {
            head.spread_value(victim, targets, self.merge_span as f32);
        }
    }
}

/// `clamp(a / reference, 0, 1)`, 0 when the reference is not positive.
fn ratio_probability(a: f64, reference: f64) -> f64 {
    if reference <= 0.0 {
        0.0
    } else {
        (a / reference).clamp(0.0, 1.0)
    }
}

impl CompressionMethod for CamConfig {
    fn name(&self) -> &'static str {
        "cam"
    }

    fn stats(&self) -> StatsRequest {
        StatsRequest::accumulated()
    }

    fn prompt_stats(&self, prompt_len: usize) -> StatsRequest {
        let mut stats = self.stats();
        if let Some(e) = self.eviction_window(prompt_len, self.budget_entries(prompt_len)) {
            stats.evictions.insert(e);
        }
        stats
    }

    fn budget_entries(&self, prompt_len: usize) -> usize {
        self.budget.entries(prompt_len)
    }

    fn computes_rows(&self) -> bool {
        true
    }

    fn compress(&self, id: HeadId, head: &mut HeadCache, budget: usize) -> Result<HeadReport> {
        let before = head.len();
        if before <= budget {
            return Ok(HeadReport { before, after: before, ..Default::default() });
        }
        // `reach`: how far after a victim the cache extends when the victim leaves. A
        // sliding window of `budget - sinks` recent entries holds exactly that many.
        let (keep, reach, clamped) = match self.eviction {
            CamEviction::Streaming => {
                let sinks = sinks_within(self.sinks, budget);
                let keep = sinks_and_recent(before, budget, self.sinks);
                (keep, budget - sinks, (sinks < self.sinks).then_some("sinks"))
            }
            CamEviction::H2o => {
                (heavy_hitters_and_recent(head, budget, self.recent(budget)), before, None)
            }
        };
        let mut kept = vec![false; before];
        keep.iter().for_each(|&k| kept[k] = true);
        // Attention as it stood when each victim left the window, if this setting reads it.
        let at_eviction = match self.eviction_window(before, budget) {
            Some(e) => {
                let (received, targets) = head.eviction_attention(e).ok_or_else(|| {
                    CompressError::invalid(
                        "probability",
                        "mean needs the attention at eviction time, which was not recorded",
                    )
                })?;
                Some((received.to_vec(), targets.to_vec(), e.span))
            }
            None => None,
        };
        let mut rng = self.rng(id, 0);
        // Oldest victim first: each one's value, with whatever earlier victims merged into
        // it, goes to the entries right after it.
        for victim in (0..before).filter(|&i| !kept[i]) {
            let last = (victim + self.merge_span.min(reach)).min(before - 1);
            let targets = victim + 1..last + 1;
            let p = match &at_eviction {
                Some((received, sums, span)) => {
                    ratio_probability(received[victim] as f64, sums[victim] as f64 / *span as f64)
                }
                None => self.merge_probability(head, victim, targets.clone()),
            };
            self.maybe_merge(head, victim, targets, p, &mut rng);
        }
        head.retain_indices(&keep);
        head.shrink_to_fit();
        Ok(HeadReport { before, after: head.len(), clamped, ..Default::default() })
    }

    /// Its decode-time eviction keeps the bound (merging each victim's value forward).
    fn decode_bound_refusal(&self) -> Option<String> {
        None
    }

    fn after_step(
        &self,
        id: HeadId,
        head: &mut HeadCache,
        budget: usize,
        step: usize,
    ) -> Result<()> {
        let mut rng = self.rng(id, step);
        while head.len() > budget {
            let victim = match self.eviction {
                CamEviction::Streaming => sinks_within(self.sinks, budget),
                CamEviction::H2o => lowest_non_recent(head, self.recent(budget)),
            };
            let targets = victim + 1..head.len().min(victim + 1 + self.merge_span);
            let p = self.merge_probability(head, victim, targets.clone());
            self.maybe_merge(head, victim, targets, p, &mut rng);
            head.remove(victim);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::{test_util::random_head, H2oConfig, StreamingLlmConfig};

    const ID: HeadId = HeadId { layer: 2, head: 1 };

    /// Causal attention rows `[n][i + 1]`: random positive weights summing to 1 per query.
    fn random_attention(n: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n)
            .map(|i| {
                let row: Vec<f32> = (0..=i).map(|_| rng.random::<f32>().powi(4)).collect();
                let sum: f32 = row.iter().sum();
                row.into_iter().map(|a| a / sum).collect()
            })
            .collect()
    }

    /// Records the eviction statistics `cam` asks for from `attention`, as the engine does.
    fn record(cam: &CamConfig, head: &mut HeadCache, attention: &[Vec<f32>]) {
        for e in cam.prompt_stats(head.len()).evictions.iter() {
            let (received, targets) = head.eviction_attention_mut(e);
            for (query, row) in attention.iter().enumerate() {
                e.accumulate_row(query, row, 1.0, received, targets);
            }
        }
    }

    #[test]
    fn a_fixed_seed_is_reproducible_and_seeds_differ() {
        let run = |seed| {
            let mut head = random_head(60, 4, 9);
            let probability = CamProbability::Fixed(0.5);
            let cam =
                CamConfig { budget: Budget::Tokens(20), seed, probability, ..Default::default() };
            cam.compress(ID, &mut head, 20).unwrap();
            head
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1).values(), run(2).values());
    }

    #[test]
    fn zero_probability_equals_the_underlying_eviction() {
        for (eviction, seed) in [(CamEviction::Streaming, 3), (CamEviction::H2o, 4)] {
            let base = random_head(60, 4, seed);
            let mut cam_head = base.clone();
            let cam = CamConfig {
                budget: Budget::Tokens(20),
                eviction,
                probability: CamProbability::Fixed(0.0),
                ..Default::default()
            };
            cam.compress(ID, &mut cam_head, 20).unwrap();
            let mut plain = base.clone();
            match eviction {
                CamEviction::Streaming => {
                    StreamingLlmConfig { budget: Budget::Tokens(20), sinks: 4 }
                        .compress(ID, &mut plain, 20)
                }
                CamEviction::H2o => H2oConfig { budget: Budget::Tokens(20), recent_ratio: 0.5 }
                    .compress(ID, &mut plain, 20),
            }
            .unwrap();
            assert_eq!(cam_head, plain, "{eviction:?}");
        }
    }

    /// The prompt fed token by token through a sliding window of `budget` entries with
    /// `sinks` sinks: when token `j` arrives and the window overflows, the oldest non-sink
    /// entry leaves and, with probability its attention from queries `0..j` over the mean
    /// of its targets' (read straight from `attention`), `v / m` goes to each of the next
    /// `m` entries. Returns the final `(position, value)` of each entry.
    fn sliding_window(
        cam: &CamConfig,
        base: &HeadCache,
        budget: usize,
        attention: &[Vec<f32>],
    ) -> Vec<(usize, Vec<f32>)> {
        let mut rng = cam.rng(ID, 0);
        let mut window: Vec<(usize, Vec<f32>)> = Vec::new();
        for j in 0..base.len() {
            window.push((j, base.value(j).to_vec()));
            if window.len() <= budget {
                continue;
            }
            // Attention received by the entry at `position` from the queries before `j`.
            let received = |position: usize| -> f64 {
                attention[..j].iter().filter_map(|row| row.get(position)).map(|&a| a as f64).sum()
            };
            let victim = cam.sinks.min(budget - 1);
            let last = (victim + cam.merge_span).min(window.len() - 1);
            if last > victim {
                let targets = victim + 1..=last;
                let mean = window[targets.clone()].iter().map(|e| received(e.0)).sum::<f64>()
                    / targets.clone().count() as f64;
                let p = match cam.probability {
                    CamProbability::Fixed(p) => p,
                    _ if mean <= 0.0 => 0.0,
                    _ => (received(window[victim].0) / mean).clamp(0.0, 1.0),
                };
                if rng.random::<f64>() < p {
                    let share: Vec<f32> =
                        window[victim].1.iter().map(|v| v / cam.merge_span as f32).collect();
                    for t in targets {
                        window[t].1.iter_mut().zip(&share).for_each(|(v, s)| *v += s);
                    }
                }
            }
            window.remove(victim);
        }
        window
    }

    #[test]
    fn prompt_compression_equals_a_token_by_token_sliding_window() {
        for seed in 0..40u64 {
            let n = 10 + (seed as usize * 7) % 90;
            let budget = 1 + (seed as usize * 13) % n;
            let probability =
                if seed % 3 == 0 { CamProbability::Fixed(1.0) } else { CamProbability::Mean };
            let cam = CamConfig {
                budget: Budget::Tokens(budget),
                merge_span: 1 + seed as usize % 9,
                sinks: seed as usize % 5,
                probability,
                seed,
                ..Default::default()
            };
            let base = random_head(n, 3, seed);
            let attention = random_attention(n, seed + 100);
            let expected = sliding_window(&cam, &base, budget, &attention);
            let mut head = base.clone();
            record(&cam, &mut head, &attention);
            cam.compress(ID, &mut head, budget).unwrap();
            assert_eq!(head.len(), expected.len(), "seed {seed}");
            for (i, (position, value)) in expected.iter().enumerate() {
                assert_eq!(head.meta()[i].position, *position, "seed {seed}");
                for (a, b) in head.value(i).iter().zip(value) {
                    assert!((a - b).abs() < 1e-4, "seed {seed}: entry {i}: {a} vs {b}");
                }
                assert_eq!(head.key(i), base.key(*position), "keys are unchanged");
            }
        }
    }

    #[test]
    fn eviction_statistics_are_the_attention_when_the_victim_leaves() {
        for seed in 0..20u64 {
            let n = 5 + seed as usize * 3;
            let attention = random_attention(n, seed);
            let e = EvictionWindow { reach: 1 + seed as usize % 7, span: 1 + seed as usize % 4 };
            let e = EvictionWindow { span: e.span.min(e.reach), ..e };
            let (mut received, mut targets) = (vec![0.0; n], vec![0.0; n]);
            for (query, row) in attention.iter().enumerate() {
                e.accumulate_row(query, row, 0.5, &mut received, &mut targets);
            }
            // Victim t leaves when query t + reach arrives: queries t..t + reach saw it.
            let until = |t: usize, key: usize| -> f32 {
                (t..(t + e.reach).min(n)).map(|q| attention[q].get(key).unwrap_or(&0.0)).sum()
            };
            for t in 0..n {
                let band: f32 = (t + 1..=(t + e.span).min(n - 1)).map(|k| until(t, k)).sum();
                assert!((received[t] - 0.5 * until(t, t)).abs() < 1e-5, "seed {seed} t {t}");
                assert!((targets[t] - 0.5 * band).abs() < 1e-5, "seed {seed} t {t}");
            }
        }
    }

    #[test]
    fn mean_probability_without_recorded_statistics_is_an_error() {
        let mut head = random_head(30, 2, 1);
        let cam = CamConfig { budget: Budget::Tokens(10), ..Default::default() };
        assert!(cam.compress(ID, &mut head, 10).is_err());
    }

    #[test]
    fn merged_mass_cascades_forward_victim_by_victim() {
        let base = random_head(10, 2, 5);
        let mut head = base.clone();
        // Budget 6 with 4 sinks keeps 0..4 and 8..10; 4, 5, 6, 7 leave in that order, each
        // into the two entries after it, carrying what earlier victims gave it.
        let cam = CamConfig {
            budget: Budget::Tokens(6),
            merge_span: 2,
            probability: CamProbability::Fixed(1.0),
            ..Default::default()
        };
        cam.compress(ID, &mut head, 6).unwrap();
        for d in 0..2 {
            let v = |i: usize| base.value(i)[d];
            let v5 = v(5) + v(4) / 2.0;
            let v6 = v(6) + v(4) / 2.0 + v5 / 2.0;
            let v7 = v(7) + v5 / 2.0 + v6 / 2.0;
            let (v8, v9) = (v(8) + v6 / 2.0 + v7 / 2.0, v(9) + v7 / 2.0);
            assert!((head.value(4)[d] - v8).abs() < 1e-5 && (head.value(5)[d] - v9).abs() < 1e-5);
        }
        assert_eq!(head.key(4), base.key(8), "keys are unchanged");
    }
}
