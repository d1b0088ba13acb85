//! CaM (Zhang et al., "CaM: Cache Merging for Memory-efficient LLMs Inference", ICML 2024):
//! an eviction policy decides what leaves; before an entry leaves, `v / m` of its value is
//! added to each of the `m = merge_span` entries right after it, with a probability set by
//! its attention (a seeded Bernoulli draw). Keys are not changed.
//!
//! After a prompt, victims are merged one by one in the order a token-by-token sliding
//! window would evict them (oldest first), each into the entries that follow it at that
//! moment, victims still to leave included: merged mass cascades forward as in the
//! reference code, and no entry receives more than `m` shares of `1 / m`.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::budget::Budget;
use crate::cache::HeadCache;
use crate::error::{CompressError, Result};
use crate::method::{CompressionMethod, HeadId, HeadReport, StatsRequest};
use crate::methods::h2o::{check_recent_ratio, lowest_non_recent};
use crate::methods::select::{heavy_hitters_and_recent, sinks_and_recent, sinks_within};

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

/// How the merge probability of an evicted entry is computed.
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
        Ok(())
    }

    fn recent(&self, budget: usize) -> usize {
        (budget as f64 * self.recent_ratio).round() as usize
    }

    /// One RNG per (layer, head, step): reproducible whatever order heads are processed in.
    fn rng(&self, id: HeadId, step: usize) -> StdRng {
        let mix = (id.layer as u64) << 40 ^ (id.head as u64) << 20 ^ step as u64;
        StdRng::seed_from_u64(self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ mix)
    }

    /// Probability that entry `victim`'s value is merged into `targets`. A zero reference
    /// attention gives 0: there is no evidence the evicted entry mattered more.
    fn merge_probability(&self, head: &HeadCache, victim: usize, targets: &[usize]) -> f64 {
        let a = head.meta()[victim].attention as f64;
        let reference = match self.probability {
            CamProbability::Fixed(p) => return p,
            CamProbability::Mean => {
                targets.iter().map(|&t| head.meta()[t].attention as f64).sum::<f64>()
                    / targets.len() as f64
            }
            CamProbability::Max => {
                targets.iter().map(|&t| head.meta()[t].attention as f64).fold(0.0, f64::max)
            }
        };
        if reference <= 0.0 {
            0.0
        } else {
            (a / reference).clamp(0.0, 1.0)
        }
    }

    /// Adds `v_victim / m` to each target with the merge probability (`1 / m` whatever the
    /// number of targets, as the reference code does near the end of the cache).
    fn maybe_merge(
        &self,
        head: &mut HeadCache,
        victim: usize,
        targets: &[usize],
        rng: &mut StdRng,
    ) {
        if targets.is_empty() {
            return;
        }
        let p = self.merge_probability(head, victim, targets);
        // Draw even when p is 0 or 1, so the random stream does not depend on p.
        if rng.random::<f64>() < p {
            let share: Vec<f32> =
                head.value(victim).iter().map(|v| v / self.merge_span as f32).collect();
            for &t in targets {
                head.value_mut(t).iter_mut().zip(&share).for_each(|(v, s)| *v += s);
            }
        }
    }
}

impl CompressionMethod for CamConfig {
    fn name(&self) -> &'static str {
        "cam"
    }

    fn stats(&self) -> StatsRequest {
        StatsRequest::accumulated()
    }

    fn budget_entries(&self, prompt_len: usize) -> usize {
        self.budget.entries(prompt_len)
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
        let mut rng = self.rng(id, 0);
        // Oldest victim first: each one's value, with whatever earlier victims merged into
        // it, goes to the entries right after it.
        for victim in (0..before).filter(|&i| !kept[i]) {
            let last = (victim + self.merge_span.min(reach)).min(before - 1);
            let targets: Vec<usize> = (victim + 1..=last).collect();
            self.maybe_merge(head, victim, &targets, &mut rng);
        }
        head.retain_indices(&keep);
        head.shrink_to_fit();
        Ok(HeadReport { before, after: head.len(), clamped, ..Default::default() })
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
            let targets: Vec<usize> = (victim + 1..head.len()).take(self.merge_span).collect();
            self.maybe_merge(head, victim, &targets, &mut rng);
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

    #[test]
    fn a_fixed_seed_is_reproducible_and_seeds_differ() {
        let run = |seed| {
            let mut head = random_head(60, 4, 9);
            CamConfig { budget: Budget::Tokens(20), seed, ..Default::default() }
                .compress(ID, &mut head, 20)
                .unwrap();
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
    /// `sinks` sinks: when the window overflows, the oldest non-sink entry leaves and, with
    /// its merge probability, `v / m` goes to each of the next `m` entries. Returns the
    /// final `(position, value)` of each entry.
    fn sliding_window(cam: &CamConfig, base: &HeadCache, budget: usize) -> Vec<(usize, Vec<f32>)> {
        let mut rng = cam.rng(ID, 0);
        let mut window: Vec<(usize, Vec<f32>, f64)> = Vec::new();
        for j in 0..base.len() {
            window.push((j, base.value(j).to_vec(), base.meta()[j].attention as f64));
            if window.len() <= budget {
                continue;
            }
            let victim = cam.sinks.min(budget - 1);
            let last = (victim + cam.merge_span).min(window.len() - 1);
            if last > victim {
                let targets = victim + 1..=last;
                let mean = window[targets.clone()].iter().map(|e| e.2).sum::<f64>()
                    / targets.clone().count() as f64;
                let p = match cam.probability {
                    CamProbability::Fixed(p) => p,
                    _ if mean <= 0.0 => 0.0,
                    _ => (window[victim].2 / mean).clamp(0.0, 1.0),
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
        window.into_iter().map(|(p, v, _)| (p, v)).collect()
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
            let expected = sliding_window(&cam, &base, budget);
            let mut head = base.clone();
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
