//! Choosing the next token from logits: greedy, or temperature with top-k and nucleus (top-p)
//! sampling, after an optional repetition penalty (as llama.cpp applies them).

use std::collections::VecDeque;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingConfig {
    /// 0 means greedy (arg-max).
    pub temperature: f32,
    /// Nucleus mass kept before sampling, in (0, 1].
    pub top_p: f32,
    /// Only the `top_k` most likely tokens are candidates; 0 keeps all.
    pub top_k: usize,
    /// Logits of tokens among the last `repeat_last_n` are divided by this when positive and
    /// multiplied when negative (CTRL's penalty, as in llama.cpp); 1 is off.
    pub repeat_penalty: f32,
    /// How many recent tokens (prompt included) the repeat penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

/// A seeded sampler that remembers the recent tokens for the repeat penalty.
#[derive(Debug, Clone)]
pub struct Sampler {
    config: SamplingConfig,
    rng: StdRng,
    /// The last `repeat_last_n` tokens, oldest first.
    recent: VecDeque<u32>,
}

impl Sampler {
    pub fn new(config: SamplingConfig) -> Self {
        Self { rng: StdRng::seed_from_u64(config.seed), config, recent: VecDeque::new() }
    }

    /// Records tokens the repeat penalty should see (the prompt; sampled tokens are recorded
    /// by [`Self::sample`] itself).
    pub fn remember(&mut self, tokens: &[u32]) {
        let n = self.config.repeat_last_n;
        for &t in &tokens[tokens.len().saturating_sub(n)..] {
            self.recent.push_back(t);
        }
        while self.recent.len() > n {
            self.recent.pop_front();
        }
    }

    /// Picks a token id from one row of logits and remembers it.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let id = if self.config.repeat_penalty != 1.0 && !self.recent.is_empty() {
            let mut penalized = logits.to_vec();
            self.penalize(&mut penalized);
            self.pick(&penalized)
        } else {
            self.pick(logits)
        };
        self.remember(&[id]);
        id
    }

    /// Applies the repeat penalty once to every distinct recent token.
    fn penalize(&self, logits: &mut [f32]) {
        let mut seen = std::collections::HashSet::new();
        for &t in &self.recent {
            let Some(l) = logits.get_mut(t as usize) else { continue };
            if seen.insert(t) {
                *l = if *l > 0.0 {
                    *l / self.config.repeat_penalty
                } else {
                    *l * self.config.repeat_penalty
                };
            }
        }
    }

    fn pick(&mut self, logits: &[f32]) -> u32 {
        if self.config.temperature <= 0.0 {
            return argmax(logits);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) / self.config.temperature).exp()))
            .collect();
        // Ties broken by token id, so sampling is deterministic for a seed.
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if self.config.top_k > 0 {
            probs.truncate(self.config.top_k);
        }
        let total: f32 = probs.iter().map(|p| p.1).sum();
        let mut kept = 0.0;
        let mut cut = probs.len();
        for (i, p) in probs.iter().enumerate() {
            kept += p.1 / total;
            if kept >= self.config.top_p {
                cut = i + 1;
                break;
            }
        }
        probs.truncate(cut);
        let mass: f32 = probs.iter().map(|p| p.1).sum();
        let mut r = self.rng.random::<f32>() * mass;
        for (id, p) in &probs {
            if r < *p {
                return *id;
            }
            r -= p;
        }
        probs.last().map_or(0, |p| p.0)
    }
}

/// Index of the largest value; the lowest index wins ties. NaN counts as no value (0 if
/// every value is NaN).
///
/// Two passes that each vectorise, the maximum over 16 lanes and then the first chunk that
/// holds it: a running best index waits on each comparison in turn, which made this a
/// scalar loop that took about 2% of a four-sequence decode step's CPU time (49,152 logits
/// per sequence).
pub fn argmax(values: &[f32]) -> u32 {
    const LANES: usize = 16;
    let chunks = values.chunks_exact(LANES);
    let tail = chunks.remainder().iter().copied();
    let mut lanes = [f32::NEG_INFINITY; LANES];
    for chunk in chunks {
        lanes.iter_mut().zip(chunk).for_each(|(l, &v)| *l = if v > *l { v } else { *l });
    }
    let max =
        lanes.into_iter().chain(tail).fold(f32::NEG_INFINITY, |m, v| if v > m { v } else { m });
    let holds_max = |chunk: &[f32]| chunk.iter().fold(false, |found, &v| found | (v == max));
    let chunk = values.chunks(4 * LANES).position(holds_max).unwrap_or(0);
    let start = chunk * 4 * LANES;
    let within = values[start..].iter().position(|&v| v == max).unwrap_or(0);
    (start + within) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_the_maximum() {
        let mut s = Sampler::new(SamplingConfig::default());
        assert_eq!(s.sample(&[0.1, 3.0, 2.0, 3.0]), 1);
    }

    #[test]
    fn argmax_is_the_first_index_of_the_maximum() {
        let naive = |v: &[f32]| {
            let mut best = 0;
            for (i, x) in v.iter().enumerate() {
                if *x > v[best] {
                    best = i;
                }
            }
            best as u32
        };
        let mut rng = StdRng::seed_from_u64(5);
        for len in [1, 15, 16, 17, 64, 65, 1000, 49152] {
            let mut v: Vec<f32> = (0..len).map(|_| rng.random_range(-5.0..5.0)).collect();
            assert_eq!(argmax(&v), naive(&v), "length {len}");
            // A tie later than the first maximum, and one in the tail.
            let at = naive(&v) as usize;
            v[len - 1] = v[at];
            assert_eq!(argmax(&v), at as u32, "tie, length {len}");
            v[len - 1] = v[at] + 1.0;
            assert_eq!(argmax(&v), len as u32 - 1, "maximum last, length {len}");
        }
        assert_eq!(argmax(&[f32::NAN, 1.0, f32::NAN, 2.0, 2.0]), 3);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        let mut s = Sampler::new(SamplingConfig {
            temperature: 1.0,
            top_p: 0.5,
            seed: 7,
            ..Default::default()
        });
        // Token 2 holds almost all the mass: a 0.5 nucleus contains it alone.
        for _ in 0..50 {
            assert_eq!(s.sample(&[0.0, 1.0, 10.0, 2.0]), 2);
        }
    }

    #[test]
    fn same_seed_same_samples() {
        let logits = [0.5, 0.4, 0.3, 0.2, 0.1];
        let run = |seed| {
            let mut s =
                Sampler::new(SamplingConfig { temperature: 1.0, seed, ..Default::default() });
            (0..32).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(3), run(3));
        assert!(run(3).iter().collect::<std::collections::HashSet<_>>().len() > 1);
    }

    #[test]
    fn top_k_keeps_only_the_k_most_likely() {
        let logits = [1.0, 0.9, 0.8, 0.7, 0.6];
        let config = SamplingConfig { temperature: 1.0, top_k: 2, seed: 1, ..Default::default() };
        let mut s = Sampler::new(config);
        let picked: std::collections::HashSet<u32> = (0..200).map(|_| s.sample(&logits)).collect();
        assert_eq!(picked, [0, 1].into_iter().collect());
        let mut one = Sampler::new(SamplingConfig { top_k: 1, ..config });
        assert!((0..50).all(|_| one.sample(&logits) == 0));
    }

    #[test]
    fn repeat_penalty_divides_positive_and_multiplies_negative_logits() {
        let greedy = |penalty, last_n, history: &[u32], logits: &[f32]| {
            let config = SamplingConfig {
                repeat_penalty: penalty,
                repeat_last_n: last_n,
                ..Default::default()
            };
            let mut s = Sampler::new(config);
            s.remember(history);
            s.sample(logits)
        };
        // 2.0 / 1.1 = 1.82 falls below 1.9.
        assert_eq!(greedy(1.1, 64, &[0], &[2.0, 1.9]), 1);
        assert_eq!(greedy(1.0, 64, &[0], &[2.0, 1.9]), 0);
        // -1.0 * 1.5 = -1.5 falls below -1.2.
        assert_eq!(greedy(1.5, 64, &[0], &[-1.0, -1.2]), 1);
        // Applied once per distinct token, however often it occurred: 2.0 / 1.1 > 1.8.
        assert_eq!(greedy(1.1, 64, &[0, 0, 0], &[2.0, 1.8]), 0);
        // Only the last `repeat_last_n` tokens count: token 0 slid out of a window of 2.
        assert_eq!(greedy(1.1, 2, &[0, 2, 2], &[2.0, 1.9, -5.0]), 0);
    }

    #[test]
    fn sampled_tokens_count_as_repeats() {
        let config = SamplingConfig { repeat_penalty: 1.1, ..Default::default() };
        let mut s = Sampler::new(config);
        let logits = [2.0, 1.9];
        assert_eq!((s.sample(&logits), s.sample(&logits)), (0, 1));
    }
}
