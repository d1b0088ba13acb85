//! The KV cache's block-quantized rows: llama.cpp's `q8_0` and `q4_0` formats, 32 elements
//! per block with an f16 scale, as the decode attention kernels read them.
//!
//! `q8_0` stores `round(x / d)` in an i8 with `d = max|x| / 127`; `q4_0` stores
//! `min(15, trunc(x / d + 8.5))` in a nibble with `d = -m / 8`, `m` the element of largest
//! magnitude (so `m` itself is exact), elements `i` and `i + 16` sharing byte `i`. Both round
//! as ggml's reference quantizers do, so a cache here holds what llama.cpp's would. These are
//! GGUF's Q8_0 and Q4_0 bytes too, which the weight kernels read from a file's bytes as they
//! are (`qmatmul/blocks.rs`, tested against these types there).

use half::f16;

/// Elements per block.
pub const BLOCK_ELEMENTS: usize = 32;

/// 32 elements as signed bytes times a scale: 34 bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[repr(C)]
pub struct BlockQ8_0 {
    pub scale: f16,
    pub quants: [i8; BLOCK_ELEMENTS],
}

/// 32 elements as nibbles offset by 8, times a scale: 18 bytes. Byte `i` holds element `i`
/// in its low nibble and element `i + 16` in its high one.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
#[repr(C)]
pub struct BlockQ4_0 {
    pub scale: f16,
    pub quants: [u8; BLOCK_ELEMENTS / 2],
}

impl BlockQ8_0 {
    /// `x`, 32 elements, quantized.
    pub fn quantize(x: &[f32]) -> Self {
        debug_assert_eq!(x.len(), BLOCK_ELEMENTS);
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
        Self {
            scale: f16::from_f32(d),
            quants: std::array::from_fn(|i| (x[i] * inverse).round() as i8),
        }
    }

    /// The 32 elements, into `out`.
    pub fn dequantize(&self, out: &mut [f32]) {
        let d = self.scale.to_f32();
        out.iter_mut().zip(&self.quants).for_each(|(o, &q)| *o = q as f32 * d);
    }
}

impl BlockQ4_0 {
    /// `x`, 32 elements, quantized.
    pub fn quantize(x: &[f32]) -> Self {
        debug_assert_eq!(x.len(), BLOCK_ELEMENTS);
        // The first element of largest magnitude, with its sign.
        let (mut amax, mut max) = (0.0f32, 0.0f32);
        for &v in x {
            if v.abs() > amax {
                (amax, max) = (v.abs(), v);
            }
        }
        let d = max / -8.0;
        let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
        // `as u8` truncates, as C's cast does; the argument lies in [0.5, 16.5].
        let nibble = |v: f32| ((v * inverse + 8.5) as u8).min(15);
        let half = BLOCK_ELEMENTS / 2;
        Self {
            scale: f16::from_f32(d),
            quants: std::array::from_fn(|i| nibble(x[i]) | (nibble(x[i + half]) << 4)),
        }
    }

    /// The 32 elements, into `out`.
    pub fn dequantize(&self, out: &mut [f32]) {
        let d = self.scale.to_f32();
        let (low, high) = out.split_at_mut(BLOCK_ELEMENTS / 2);
        for ((l, h), &q) in low.iter_mut().zip(high).zip(&self.quants) {
            *l = ((q & 0x0F) as i32 - 8) as f32 * d;
            *h = ((q >> 4) as i32 - 8) as f32 * d;
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// Blocks of varied scales: uniform, one outlier, all zero, tiny values.
    fn blocks() -> Vec<[f32; BLOCK_ELEMENTS]> {
        let mut rng = StdRng::seed_from_u64(1);
        let mut out = Vec::new();
        for scale in [1e-4f32, 0.3, 1.0, 40.0] {
            for _ in 0..50 {
                out.push(std::array::from_fn(|_| rng.random_range(-scale..scale)));
            }
            let mut outlier: [f32; BLOCK_ELEMENTS] =
                std::array::from_fn(|_| rng.random_range(-scale..scale) * 0.05);
            outlier[7] = -scale;
            out.push(outlier);
        }
        out.push([0.0; BLOCK_ELEMENTS]);
        out
    }

    /// Every element comes back within half a step of the scale that was computed, plus
    /// what rounding the scale to f16 moves the farthest level (127 steps).
    #[test]
    fn q8_0_round_trips_within_half_a_step() {
        for x in blocks() {
            let block = BlockQ8_0::quantize(&x);
            let mut back = [0.0; BLOCK_ELEMENTS];
            block.dequantize(&mut back);
            let exact = x.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
            let scale_error = (block.scale.to_f32() - exact).abs();
            for (a, b) in x.iter().zip(&back) {
                let bound = exact / 2.0 + 127.0 * scale_error + 1e-12;
                assert!((a - b).abs() <= bound * 1.0001, "{a} -> {b}, bound {bound}");
            }
        }
        assert_eq!(std::mem::size_of::<BlockQ8_0>(), 34);
    }

    /// Half a step, but a whole one for the elements at the far end (15 levels on the side
    /// of the largest element's opposite, where ggml clamps), plus the f16 scale's rounding.
    #[test]
    fn q4_0_round_trips_within_half_a_step_or_a_clamped_one() {
        for x in blocks() {
            let block = BlockQ4_0::quantize(&x);
            let mut back = [0.0; BLOCK_ELEMENTS];
            block.dequantize(&mut back);
            let max = x.iter().copied().fold(0.0f32, |m, v| if v.abs() > m.abs() { v } else { m });
            let exact = max / -8.0;
            let scale_error = (block.scale.to_f32() - exact).abs();
            for (a, b) in x.iter().zip(&back) {
                let clamped = exact != 0.0 && a / exact > 7.5;
                let step = if clamped { exact.abs() } else { exact.abs() / 2.0 };
                let bound = step + 8.0 * scale_error + 1e-12;
                assert!((a - b).abs() <= bound * 1.0001, "{a} -> {b}, bound {bound}");
            }
            // The largest element is exact up to its scale's rounding.
            let at = x.iter().position(|&v| v == max).unwrap();
            assert!((back[at] - max).abs() <= 8.0 * scale_error + 1e-12);
        }
        assert_eq!(std::mem::size_of::<BlockQ4_0>(), 18);
    }

    /// ggml's layout: element i in the low nibble of byte i, element i + 16 in the high one,
    /// offset by 8; the scale is minus the largest element over 8.
    #[test]
    fn q4_0_packs_as_ggml_does() {
        let mut x = [0.0f32; BLOCK_ELEMENTS];
        x[0] = -8.0;
        x[1] = 3.0;
        x[17] = 7.0;
        x[18] = 8.0;
        let block = BlockQ4_0::quantize(&x);
        assert_eq!(block.scale.to_f32(), 1.0);
        assert_eq!(block.quants[0] & 0x0F, 0, "-8 / 1 + 8");
        assert_eq!(block.quants[1] & 0x0F, 11);
        assert_eq!(block.quants[1] >> 4, 15, "7 + 8");
        assert_eq!(block.quants[2] >> 4, 15, "8 + 8 clamps to 15");
    }
}
