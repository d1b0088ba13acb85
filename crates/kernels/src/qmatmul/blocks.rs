//! GGUF's block formats read as 32-value sub-blocks, the activations' block size: what the
//! portable kernel computes with and what the SIMD kernels are tested against.
//!
//! A format stores its weights in units: a block of 32 values (Q4_0, Q4_1, Q5_0, Q8_0) or a
//! k-quant super-block of 256 (Q4_K, Q5_K, Q6_K), laid out as in ggml's `ggml-common.h`.
//! Every unit reads as sub-blocks of 32 small integers `q` with a multiplier per 16 values
//! and an offset per 32: `w = d * q + m`. Against an activation block `x ~= d_x * q_x` a
//! sub-block's dot product is then `d_x (d_lo sum_lo(q q_x) + d_hi sum_hi(q q_x)) + m s_x`
//! with `s_x = d_x sum(q_x)`: integer sums, one scale product per half, and the activation
//! block's own sum for the offset. Only Q6_K has two multipliers per 32 values (an 8-bit
//! scale per 16); its offset of 32 is kept in signed `q`, so no per-16 activation sums are
//! needed.

use super::{half_at, QuantKind};

/// The multipliers and offsets of one unit's sub-blocks.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct UnitScales {
    /// `d[2 * i]`, `d[2 * i + 1]`: the multipliers of sub-block `i`'s values 0..16 and 16..32.
    pub d: [f32; 16],
    /// `m[i]`: sub-block `i`'s offset (0 for the symmetric formats).
    pub m: [f32; 8],
}

/// Bytes of the 6-bit scales and mins of Q4_K and Q5_K, after `d` and `dmin`.
pub(super) const K_SCALES: usize = 12;

/// Q4_K's and Q5_K's eight 6-bit scales and eight mins, packed in 12 bytes as ggml's
/// `get_scale_min_k4` reads them (sub-blocks 0..4 in the low 6 bits of bytes `j` and `j + 4`;
/// sub-blocks 4..8 in the nibbles of byte `j + 4` and the top 2 bits of bytes `j - 4` and
/// `j`), unpacked four at a time in 32-bit words.
pub(super) fn k_scales_mins(packed: &[u8]) -> ([u8; 8], [u8; 8]) {
    const LOW6: u32 = 0x3f3f_3f3f;
    const NIBBLE: u32 = 0x0f0f_0f0f;
    const TOP2: u32 = 0x0303_0303;
    let word =
        |i: usize| u32::from_le_bytes([packed[i], packed[i + 1], packed[i + 2], packed[i + 3]]);
    let (w0, w1, w2) = (word(0), word(4), word(8));
    let scales_high = (w2 & NIBBLE) | (((w0 >> 6) & TOP2) << 4);
    let mins_high = ((w2 >> 4) & NIBBLE) | (((w1 >> 6) & TOP2) << 4);
    let join = |low: u32, high: u32| {
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(&low.to_le_bytes());
        bytes[4..].copy_from_slice(&high.to_le_bytes());
        bytes
    };
    (join(w0 & LOW6, scales_high), join(w1 & LOW6, mins_high))
}

/// Fills `s` with `unit`'s multipliers and offsets (`unit`: `kind.block_bytes()` bytes). Only
/// the entries of the unit's `kind.subs()` sub-blocks are written.
pub(super) fn unit_scales(kind: QuantKind, unit: &[u8], s: &mut UnitScales) {
    match kind {
        QuantKind::Q4_0 | QuantKind::Q5_0 | QuantKind::Q8_0 => {
            let d = half_at(unit, 0);
            s.d[0] = d;
            s.d[1] = d;
            // Q4_0 and Q5_0 store `q + 8` and `q + 16` as unsigned values.
            s.m[0] = match kind {
                QuantKind::Q4_0 => -8.0 * d,
                QuantKind::Q5_0 => -16.0 * d,
                _ => 0.0,
            };
        }
        QuantKind::Q4_1 => {
            s.d[0] = half_at(unit, 0);
            s.d[1] = s.d[0];
            s.m[0] = half_at(unit, 2);
        }
        QuantKind::Q4K | QuantKind::Q5K => {
            let (d, dmin) = (half_at(unit, 0), half_at(unit, 2));
            let (scales, mins) = k_scales_mins(&unit[4..4 + K_SCALES]);
            for (j, (&scale, &min)) in scales.iter().zip(&mins).enumerate() {
                s.d[2 * j] = d * scale as f32;
                s.d[2 * j + 1] = s.d[2 * j];
                s.m[j] = -dmin * min as f32;
            }
        }
        QuantKind::Q6K => {
            let d = half_at(unit, Q6K_D);
            for (i, &scale) in unit[Q6K_SCALES..Q6K_D].iter().enumerate() {
                s.d[i] = d * scale as i8 as f32;
            }
            s.m = [0.0; 8];
        }
    }
}

/// Where Q6_K's parts start: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 signed
/// 8-bit scales, then `d`.
pub(super) const Q6K_HIGH: usize = 128;
pub(super) const Q6K_SCALES: usize = 192;
pub(super) const Q6K_D: usize = 208;

/// Where Q5_K's parts start: `d`, `dmin`, the 12 bytes of scales, 32 bytes of fifth bits,
/// then the 128 bytes of nibbles (as Q4_K's from byte 16).
pub(super) const Q5K_HIGH: usize = 16;
pub(super) const Q5K_NIBBLES: usize = 48;
pub(super) const Q4K_NIBBLES: usize = 16;

/// Sub-block `sub`'s 32 integers `q` (so that `w = d * q + m` with [`unit_scales`]).
pub(super) fn sub_values(kind: QuantKind, unit: &[u8], sub: usize) -> [i8; 32] {
    let mut q = [0i8; 32];
    match kind {
        // 16 bytes from `at`: low nibbles are values 0..16, high nibbles 16..32.
        QuantKind::Q4_0 | QuantKind::Q4_1 => {
            let at = if kind == QuantKind::Q4_0 { 2 } else { 4 };
            for (j, &byte) in unit[at..at + 16].iter().enumerate() {
                q[j] = (byte & 0x0f) as i8;
                q[j + 16] = (byte >> 4) as i8;
            }
        }
        // Q4_0's layout after a 32-bit word whose bit `j` is value `j`'s fifth bit.
        QuantKind::Q5_0 => {
            let high = u32::from_le_bytes([unit[2], unit[3], unit[4], unit[5]]);
            for (j, &byte) in unit[6..22].iter().enumerate() {
                let fifth = |v: usize| (((high >> v) & 1) << 4) as u8;
                q[j] = ((byte & 0x0f) | fifth(j)) as i8;
                q[j + 16] = ((byte >> 4) | fifth(j + 16)) as i8;
            }
        }
        QuantKind::Q8_0 => q.iter_mut().zip(&unit[2..34]).for_each(|(q, &b)| *q = b as i8),
        // Sub-blocks 2i and 2i + 1 are the low and high nibbles of bytes 32i..32i + 32; Q5_K's
        // fifth bit of value `l` of sub-block `sub` is bit `sub` of its high byte `l`.
        QuantKind::Q4K | QuantKind::Q5K => {
            let nibbles = if kind == QuantKind::Q4K { Q4K_NIBBLES } else { Q5K_NIBBLES };
            let bytes = &unit[nibbles + 32 * (sub / 2)..][..32];
            for (l, (q, &byte)) in q.iter_mut().zip(bytes).enumerate() {
                let nibble = (byte >> (4 * (sub % 2))) & 0x0f;
                let fifth = match kind {
                    QuantKind::Q5K => ((unit[Q5K_HIGH + l] >> sub) & 1) << 4,
                    _ => 0,
                };
                *q = (nibble | fifth) as i8;
            }
        }
        // Each half of 128 values: sub-block `k` (0..4) takes the low (k < 2) or high nibbles
        // of low bytes `64 h + 32 (k % 2) + l` and bits `2k, 2k + 1` of high byte `32 h + l`,
        // less 32.
        QuantKind::Q6K => {
            let (half, k) = (sub / 4, sub % 4);
            let low = &unit[64 * half + 32 * (k % 2)..][..32];
            let high = &unit[Q6K_HIGH + 32 * half..][..32];
            for (q, (&lo, &hi)) in q.iter_mut().zip(low.iter().zip(high)) {
                let nibble = (lo >> (4 * (k / 2))) & 0x0f;
                let top = ((hi >> (2 * k)) & 3) << 4;
                *q = (nibble | top) as i8 - 32;
            }
        }
    }
    q
}

/// Whole units of `kind` from `blocks` as f32 values into `out` (`w = d * q + m`).
pub(super) fn dequantize(kind: QuantKind, blocks: &[u8], out: &mut [f32]) {
    let units = blocks.chunks_exact(kind.block_bytes());
    assert!(out.len() == units.len() * kind.block_values(), "dequantized size");
    let mut scales = UnitScales::default();
    for (unit, out) in units.zip(out.chunks_exact_mut(kind.block_values())) {
        unit_scales(kind, unit, &mut scales);
        for (sub, out) in out.chunks_exact_mut(32).enumerate() {
            let q = sub_values(kind, unit, sub);
            let (d, m) = (&scales.d[2 * sub..2 * sub + 2], scales.m[sub]);
            for (j, (w, &q)) in out.iter_mut().zip(&q).enumerate() {
                *w = d[j / 16] * q as f32 + m;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{dequantize, k_scales_mins, QuantKind};
    use crate::kv_blocks::{BlockQ4_0, BlockQ8_0};
    use crate::kv_rows::KvElement;

    /// Sub-block `j`'s scale and min read one at a time, as ggml's `get_scale_min_k4` does.
    fn k_scale_min(j: usize, packed: &[u8]) -> (u8, u8) {
        if j < 4 {
            (packed[j] & 63, packed[j + 4] & 63)
        } else {
            let scale = (packed[j + 4] & 0x0f) | ((packed[j - 4] >> 6) << 4);
            let min = (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4);
            (scale, min)
        }
    }

    /// The word-wise unpacking gives every scale and min as the byte-wise one, on patterns
    /// that set each bit alone and on mixed ones.
    #[test]
    fn k_scales_unpack_as_ggml_reads_them() {
        let mut patterns: Vec<[u8; 12]> = (0..96)
            .map(|bit| {
                let mut p = [0u8; 12];
                p[bit / 8] = 1 << (bit % 8);
                p
            })
            .collect();
        patterns
            .extend((0..64u32).map(|i| std::array::from_fn(|k| (i * 37 + k as u32 * 91) as u8)));
        for packed in patterns {
            let (scales, mins) = k_scales_mins(&packed);
            for j in 0..8 {
                assert_eq!((scales[j], mins[j]), k_scale_min(j, &packed), "{packed:?} {j}");
            }
        }
    }

    /// The KV cache's q8_0 and q4_0 blocks are GGUF's Q8_0 and Q4_0 units: their bytes (f16
    /// scale, then the quants) read by the weight kernels' reader give the values the blocks
    /// dequantize to, exactly (each product of a scale and a small integer is exact; a zero
    /// level may come back as -0 from one and +0 from the other, equal values).
    #[test]
    fn kv_cache_blocks_are_gguf_units() {
        let x: Vec<f32> = (0..4 * 32).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        let mut q8 = vec![BlockQ8_0::default(); 4];
        let mut q4 = vec![BlockQ4_0::default(); 4];
        KvElement::narrow(&x, &mut q8);
        KvElement::narrow(&x, &mut q4);
        let q8_bytes: Vec<u8> = q8
            .iter()
            .flat_map(|b| b.scale.to_le_bytes().into_iter().chain(b.quants.map(|q| q as u8)))
            .collect();
        let q4_bytes: Vec<u8> =
            q4.iter().flat_map(|b| b.scale.to_le_bytes().into_iter().chain(b.quants)).collect();
        assert_eq!(q8_bytes.len(), 4 * size_of::<BlockQ8_0>());
        assert_eq!(q4_bytes.len(), 4 * size_of::<BlockQ4_0>());
        let (mut from_q8, mut from_q4) = (vec![0.0f32; x.len()], vec![0.0f32; x.len()]);
        KvElement::widen(&q8, &mut from_q8);
        KvElement::widen(&q4, &mut from_q4);
        for (kind, bytes, expected) in
            [(QuantKind::Q8_0, q8_bytes, from_q8), (QuantKind::Q4_0, q4_bytes, from_q4)]
        {
            let mut read = vec![0.0f32; x.len()];
            dequantize(kind, &bytes, &mut read);
            assert_eq!(read, expected, "{kind:?}");
        }
    }
}
