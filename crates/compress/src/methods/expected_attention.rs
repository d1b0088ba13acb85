//! Expected Attention (Devoto, Jeblick, Jégou, "Expected Attention: KV Cache Compression by
//! Estimating Attention from Future Queries Distribution", 2025), as kvpress's
//! `ExpectedAttentionPress`: queries are modelled as Gaussian, with the mean `mu` and
//! covariance `C` of the prompt's queries before RoPE, rotated by RoPE's rotation averaged
//! over the `n_future_positions` positions after the prompt (`R mu`, `R C R^T`). Under
//! that model the expected unnormalised attention a key gets is
//! `exp(k . mu / sqrt(d) + k^T C k / (2 d))`; softmax over the entries gives each one's
//! expected share, averaged over the query heads of the kv group, then scaled by its
//! value's norm, `(score + epsilon) * |v|`. The first `n_sink` entries always stay (and
//! their queries are left out of the statistics). Acts once, after the prompt.

use serde::{Deserialize, Serialize};

use crate::budget::Budget;
use crate::cache::HeadCache;
use crate::error::{CompressError, Result};
use crate::method::{CompressionMethod, HeadId, HeadReport, Scorer};
use crate::methods::select::{retain_top_scored, row_norms};
use crate::queries::QueryStatistics;
use crate::stats::{Queries, StatsRequest};

/// Expected Attention parameters (kvpress's defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExpectedAttentionConfig {
    pub budget: Budget,
    /// Positions after the prompt RoPE's rotation is averaged over (kvpress: 512).
    pub n_future_positions: usize,
    /// First entries always kept, their queries left out of the statistics (kvpress: 4).
    pub n_sink: usize,
    /// Include the queries' covariance, not only their mean (kvpress: true).
    pub use_covariance: bool,
    /// Scale each score by its value's norm (kvpress: true).
    pub use_vnorm: bool,
    /// Added to the scores before the value-norm scaling (kvpress: 0).
    pub epsilon: f32,
}

impl Default for ExpectedAttentionConfig {
    fn default() -> Self {
        Self {
            budget: Budget::default(),
            n_future_positions: 512,
            n_sink: 4,
            use_covariance: true,
            use_vnorm: true,
            epsilon: 0.0,
        }
    }
}

impl ExpectedAttentionConfig {
    pub fn validate(&self) -> Result<()> {
        if self.n_future_positions == 0 {
            return Err(CompressError::invalid("n_future_positions", "must be at least 1"));
        }
        if self.epsilon.is_nan() || self.epsilon < 0.0 {
            return Err(CompressError::invalid(
                "epsilon",
                format!("must be at least 0, got {}", self.epsilon),
            ));
        }
        Ok(())
    }

    fn query_statistics(&self) -> QueryStatistics {
        QueryStatistics {
            skip: self.n_sink,
            future: self.n_future_positions,
            covariance: self.use_covariance,
        }
    }
}

/// Softmax of `logits` in place (f64, shifted by the maximum).
fn softmax(logits: &mut [f64]) {
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut sum = 0.0;
    logits.iter_mut().for_each(|x| {
        *x = (*x - max).exp();
        sum += *x;
    });
    logits.iter_mut().for_each(|x| *x /= sum);
}

impl Scorer for ExpectedAttentionConfig {
    fn score(&self, head: &HeadCache) -> Result<Vec<f32>> {
        let moments = head.query_moments(self.query_statistics()).ok_or_else(|| {
            CompressError::Shape("Expected Attention needs the prompt's query statistics".into())
        })?;
        let (len, d) = (head.len(), head.head_dim());
        let sinks = self.n_sink.min(len);
        let keys = head.keys();
        let keys: Vec<&[f32]> = keys.chunks_exact(d).skip(sinks).collect();
        let mut mean_share = vec![0.0f64; keys.len()];
        for g in 0..moments.group() {
            let mu = moments.future_mean(g);
            let cov = moments.future_covariance(g);
            let mut logits: Vec<f64> = keys
                .iter()
                .map(|k| {
                    let k: Vec<f64> = k.iter().map(|&x| x as f64).collect();
                    let mean: f64 = k.iter().zip(&mu).map(|(a, b)| a * b).sum::<f64>();
                    let spread = cov.as_ref().map_or(0.0, |c| {
                        let ck = c
                            .chunks_exact(d)
                            .map(|row| row.iter().zip(&k).map(|(a, b)| a * b).sum::<f64>());
                        ck.zip(&k).map(|(a, b)| a * b).sum::<f64>()
                    });
                    mean / (d as f64).sqrt() + spread / d as f64 / 2.0
                })
                .collect();
            softmax(&mut logits);
            mean_share.iter_mut().zip(&logits).for_each(|(m, p)| *m += p);
        }
        let group = moments.group().max(1) as f64;
        let norms = row_norms(&head.values(), d);
        let mut scores = vec![f32::INFINITY; sinks];
        scores.extend(mean_share.iter().zip(&norms[sinks..]).map(|(&s, &n)| {
            let share = (s / group) as f32;
            if self.use_vnorm {
                (share + self.epsilon) * n
            } else {
                share
            }
        }));
        Ok(scores)
    }
}

impl CompressionMethod for ExpectedAttentionConfig {
    fn name(&self) -> &'static str {
        "expected_attention"
    }

    fn stats(&self) -> StatsRequest {
        StatsRequest { queries: Queries::one(self.query_statistics()), ..StatsRequest::default() }
    }

    fn budget_entries(&self, prompt_len: usize) -> usize {
        self.budget.entries(prompt_len)
    }

    fn compress(&self, _id: HeadId, head: &mut HeadCache, budget: usize) -> Result<HeadReport> {
        retain_top_scored(head, budget, 0, 0, |head| self.score(head))
    }

    fn scorer(&self) -> Option<&dyn Scorer> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::test_util::random_head;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// kvpress's `ExpectedAttentionPress.score` written out in f64 from its formulas: the
    /// queries' mean and centred covariance over the non-sink queries, `mu R^T` and
    /// `R C R^T`, `k mu / sqrt(d) + k C k / d / 2` over the non-sink keys, softmax, mean
    /// over the group, times `|v|`, sinks first. Returns the kept positions.
    fn kvpress_kept(
        head: &HeadCache,
        queries: &[Vec<Vec<f64>>],
        rotation: &[Vec<f64>],
        n_sink: usize,
        budget: usize,
    ) -> Vec<usize> {
        let d = head.head_dim();
        let group = queries[0].len();
        let n = queries.len() as f64;
        let keys: Vec<Vec<f64>> =
            (n_sink..head.len()).map(|i| head.key(i).iter().map(|&x| x as f64).collect()).collect();
        let mut share = vec![0.0; keys.len()];
        for g in 0..group {
            let mu: Vec<f64> =
                (0..d).map(|j| queries.iter().map(|q| q[g][j]).sum::<f64>() / n).collect();
            let cov: Vec<Vec<f64>> = (0..d)
                .map(|i| {
                    (0..d)
                        .map(|j| {
                            queries
                                .iter()
                                .map(|q| (q[g][i] - mu[i]) * (q[g][j] - mu[j]))
                                .sum::<f64>()
                                / n
                        })
                        .collect()
                })
                .collect();
            let r = rotation;
            let mu_r: Vec<f64> = (0..d).map(|i| (0..d).map(|j| r[i][j] * mu[j]).sum()).collect();
            let cov_r: Vec<Vec<f64>> = (0..d)
                .map(|i| {
                    (0..d)
                        .map(|j| {
                            (0..d)
                                .map(|a| (0..d).map(|b| r[i][a] * cov[a][b] * r[j][b]).sum::<f64>())
                                .sum()
                        })
                        .collect()
                })
                .collect();
            let logits: Vec<f64> = keys
                .iter()
                .map(|k| {
                    let lin: f64 = (0..d).map(|i| k[i] * mu_r[i]).sum::<f64>() / (d as f64).sqrt();
                    let quad: f64 = (0..d)
                        .map(|i| (0..d).map(|j| k[i] * cov_r[i][j] * k[j]).sum::<f64>())
                        .sum();
                    lin + quad / d as f64 / 2.0
                })
                .collect();
            let z: f64 = logits.iter().map(|x| x.exp()).sum();
            share.iter_mut().zip(&logits).for_each(|(s, x)| *s += x.exp() / z / group as f64);
        }
        let norm = |i: usize| head.value(i).iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        let mut scores = vec![f64::MAX; n_sink];
        scores.extend(share.iter().enumerate().map(|(i, s)| s * norm(i + n_sink)));
        let mut order: Vec<usize> = (0..head.len()).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        let mut kept = order[..budget].to_vec();
        kept.sort();
        kept
    }

    /// A NeoX-layout rotation averaged over random angles per frequency pair.
    fn mean_rotation(d: usize, rng: &mut StdRng) -> Vec<Vec<f64>> {
        let mut r = vec![vec![0.0; d]; d];
        for i in 0..d / 2 {
            let angles: Vec<f64> = (0..7).map(|_| rng.random_range(0.0..6.3)).collect();
            let c = angles.iter().map(|a: &f64| a.cos()).sum::<f64>() / 7.0;
            let s = angles.iter().map(|a: &f64| a.sin()).sum::<f64>() / 7.0;
            let (a, b) = (i, i + d / 2);
            (r[a][a], r[a][b], r[b][a], r[b][b]) = (c, -s, s, c);
        }
        r
    }

    #[test]
    fn keeps_what_kvpress_keeps() {
        let (n, d, group) = (48, 8, 3);
        for seed in 0..8 {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut head = random_head(n, d, seed);
            let cfg = ExpectedAttentionConfig { budget: Budget::Tokens(12), ..Default::default() };
            // Queries leaning on a shared direction, as real ones do.
            let queries: Vec<Vec<Vec<f64>>> = (0..n - cfg.n_sink)
                .map(|_| {
                    (0..group)
                        .map(|g| {
                            (0..d)
                                .map(|j| rng.random_range(-1.0..1.0) + (j == g) as u8 as f64)
                                .collect()
                        })
                        .collect()
                })
                .collect();
            let rotation = mean_rotation(d, &mut rng);
            let moments = head.query_moments_mut(cfg.query_statistics(), group);
            for q in &queries {
                let flat: Vec<f32> = q.iter().flatten().map(|&x| x as f32).collect();
                moments.add(&flat);
            }
            moments.set_rotation(rotation.iter().flatten().map(|&x| x as f32).collect());
            let budget = 8 + 2 * seed as usize;
            let expected = kvpress_kept(&head, &queries, &rotation, cfg.n_sink, budget);
            let report = cfg.compress(HeadId { layer: 0, head: 0 }, &mut head, budget).unwrap();
            let kept: Vec<usize> = head.meta().iter().map(|m| m.position).collect();
            assert_eq!(kept, expected, "seed {seed}");
            assert_eq!(report.after, budget);
        }
    }

    #[test]
    fn missing_statistics_and_bad_parameters_are_errors() {
        let mut head = random_head(20, 4, 1);
        let err =
            ExpectedAttentionConfig::default().compress(HeadId { layer: 0, head: 0 }, &mut head, 5);
        assert!(err.unwrap_err().to_string().contains("query statistics"));
        let cfg = ExpectedAttentionConfig { n_future_positions: 0, ..Default::default() };
        assert!(cfg.validate().unwrap_err().to_string().contains("n_future_positions"));
    }
}
