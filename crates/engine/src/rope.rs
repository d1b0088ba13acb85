//! Rotary position embeddings applied at explicit logical positions.
//!
//! Positions are passed in, never derived from the cache length: after compression the
//! cache is shorter than the number of tokens seen.

use crate::config::ModelConfig;

/// Precomputed cos/sin tables for every position up to the model's context length.
#[derive(Debug, Clone)]
pub struct Rope {
    half: usize,
    /// `[head_dim / 2]`: each pair's angle per position.
    inv_freq: Vec<f64>,
    interleaved: bool,
    /// `[context_length, head_dim / 2]`
    cos: Vec<f32>,
    /// `[context_length, head_dim / 2]`
    sin: Vec<f32>,
}

impl Rope {
    /// The rotation of the model's full-attention layers: its base, scaling and the file's
    /// frequency factors.
    pub fn new(config: &ModelConfig) -> Self {
        let f = &config.features;
        let factors = f.rope_freq_factors.as_deref();
        Self::build(config, config.rope_theta, f.rope_freq_scale, factors, f.rope_attn_factor)
    }

    /// The rotation of sliding-window layers where they have their own base (Gemma 3):
    /// unscaled, at that base.
    pub fn for_window_layers(config: &ModelConfig) -> Option<Self> {
        let theta = config.features.sliding_window?.local_rope_theta?;
        Some(Self::build(config, theta, 1.0, None, 1.0))
    }

    /// Angle of pair `i` at position `p`: `p * freq_scale * theta^(-2i/d) / factors[i]`, as
    /// llama.cpp's `ggml_rope_ext`; cos and sin are multiplied by `attn_factor`.
    fn build(
        config: &ModelConfig,
        theta: f32,
        freq_scale: f32,
        factors: Option<&[f32]>,
        attn_factor: f32,
    ) -> Self {
        let half = config.head_dim / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| {
                let freq = 1.0 / (theta as f64).powf(2.0 * i as f64 / config.head_dim as f64);
                let freq = match &config.rope_scaling {
                    Some(s) => llama3_scale(freq, s),
                    None => freq,
                };
                let factor = factors.map_or(1.0, |f| f[i] as f64);
                freq * freq_scale as f64 / factor
            })
            .collect();
        let n = config.context_length;
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        let scale = attn_factor as f64;
        for pos in 0..n {
            for f in &inv_freq {
                let angle = pos as f64 * f;
                cos.push((angle.cos() * scale) as f32);
                sin.push((angle.sin() * scale) as f32);
            }
        }
        Self { half, inv_freq, interleaved: config.rope_interleaved, cos, sin }
    }

    /// The rotation [`Self::apply`] gives, averaged over `positions`: `[head_dim, head_dim]`
    /// row-major, `x -> R x` (Expected Attention's future queries). Computed from the
    /// frequencies, so positions past the context length are fine.
    pub fn mean_rotation(&self, positions: std::ops::Range<usize>) -> Vec<f32> {
        let d = 2 * self.half;
        let n = positions.len().max(1) as f64;
        let mut r = vec![0.0f32; d * d];
        for (i, f) in self.inv_freq.iter().enumerate() {
            let (cos, sin) = positions
                .clone()
                .map(|p| (p as f64 * f).sin_cos())
                .fold((0.0, 0.0), |(c, s), (sin, cos)| (c + cos, s + sin));
            let (cos, sin) = ((cos / n) as f32, (sin / n) as f32);
            let (a, b) = if self.interleaved { (2 * i, 2 * i + 1) } else { (i, i + self.half) };
            r[a * d + a] = cos;
            r[a * d + b] = -sin;
            r[b * d + a] = sin;
            r[b * d + b] = cos;
        }
        r
    }

    /// Rotates every head of one token's projection in place.
    /// `x`: `[n_heads, head_dim]` of the token at logical position `pos`.
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let (cos, sin) =
            (&self.cos[pos * self.half..][..self.half], &self.sin[pos * self.half..][..self.half]);
        for head in x.chunks_exact_mut(2 * self.half) {
            for i in 0..self.half {
                let (a, b) = if self.interleaved { (2 * i, 2 * i + 1) } else { (i, i + self.half) };
                let (x0, x1) = (head[a], head[b]);
                head[a] = x0 * cos[i] - x1 * sin[i];
                head[b] = x0 * sin[i] + x1 * cos[i];
            }
        }
    }
}

/// Llama 3.1's frequency-dependent RoPE scaling.
fn llama3_scale(freq: f64, s: &crate::config::Llama3RopeScaling) -> f64 {
    let wavelen = 2.0 * std::f64::consts::PI / freq;
    let old = s.original_max_position_embeddings as f64;
    let low_wavelen = old / s.low_freq_factor as f64;
    let high_wavelen = old / s.high_freq_factor as f64;
    if wavelen < high_wavelen {
        freq
    } else if wavelen > low_wavelen {
        freq / s.factor as f64
    } else {
        let smooth = (old / wavelen - s.low_freq_factor as f64)
            / (s.high_freq_factor - s.low_freq_factor) as f64;
        (1.0 - smooth) * freq / s.factor as f64 + smooth * freq
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::tiny_config;

    /// The averaged rotation is the mean of what `apply` does to each basis vector, in
    /// both pair layouts, also past the context length's tables (checked against them
    /// where they exist).
    #[test]
    fn mean_rotation_averages_what_apply_does() {
        for interleaved in [true, false] {
            let config = ModelConfig { rope_interleaved: interleaved, ..tiny_config() };
            let (rope, d) = (Rope::new(&config), config.head_dim);
            let positions = 100..140;
            let r = rope.mean_rotation(positions.clone());
            for k in 0..d {
                let mut column = vec![0.0f32; d];
                for p in positions.clone() {
                    let mut e = vec![0.0f32; d];
                    e[k] = 1.0;
                    rope.apply(&mut e, p);
                    column.iter_mut().zip(&e).for_each(|(c, x)| *c += x / positions.len() as f32);
                }
                for (i, c) in column.iter().enumerate() {
                    assert!((r[i * d + k] - c).abs() < 1e-5, "{interleaved}: R[{i}][{k}]");
                }
            }
            let beyond = rope.mean_rotation(250..300);
            assert!(beyond.iter().all(|x| x.is_finite() && x.abs() <= 1.0));
        }
    }
}
