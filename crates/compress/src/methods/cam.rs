//! CaM (Zhang et al., "CaM: Cache Merging for Memory-efficient LLMs Inference", ICML 2024):
//! an eviction policy decides what leaves; before an entry leaves, its value is merged
//! into the next `merge_span` kept entries, with a probability set by its attention
//! (a seeded Bernoulli draw). Keys are not changed.

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

    /// Adds `v_victim / m` to each of the `m` targets with the merge probability.
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
                head.value(victim).iter().map(|v| v / targets.len() as f32).collect();
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
        let keep = match self.eviction {
            CamEviction::Streaming => sinks_and_recent(before, budget, self.sinks),
            CamEviction::H2o => heavy_hitters_and_recent(head, budget, self.recent(budget)),
        };
        let mut rng = self.rng(id, 0);
        let mut kept = keep.iter().peekable();
        for victim in 0..before {
            while kept.peek().is_some_and(|&&k| k < victim) {
                kept.next();
            }
            if kept.peek() == Some(&&victim) {
                continue;
            }
            let targets: Vec<usize> = kept.clone().copied().take(self.merge_span).collect();
            self.maybe_merge(head, victim, &targets, &mut rng);
        }
        head.retain_indices(&keep);
        head.shrink_to_fit();
        Ok(HeadReport { before, after: head.len(), ..Default::default() })
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

    #[test]
    fn certain_merges_add_the_evicted_value_to_the_next_kept_entries() {
        let base = random_head(10, 2, 5);
        let mut head = base.clone();
        // Budget 6 with 4 sinks keeps 0..4 and 8..10; entries 4..8 leave, each into 8 and 9.
        let cam = CamConfig {
            budget: Budget::Tokens(6),
            merge_span: 2,
            probability: CamProbability::Fixed(1.0),
            ..Default::default()
        };
        cam.compress(ID, &mut head, 6).unwrap();
        for (slot, orig) in [(4, 8), (5, 9)] {
            for d in 0..2 {
                let expected =
                    base.value(orig)[d] + (4..8).map(|i| base.value(i)[d] / 2.0).sum::<f32>();
                assert!((head.value(slot)[d] - expected).abs() < 1e-5);
            }
            assert_eq!(head.key(slot), base.key(orig), "keys are unchanged");
        }
    }
}
