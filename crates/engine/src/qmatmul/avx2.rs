//! AVX2 kernels for every block format, through 32-value sub-blocks ([`super::blocks`]):
//! per weight unit the scales are read once, per sub-block the 32 values are unpacked into
//! one vector of bytes once, then every activation row of the group takes one byte dot
//! product (`vpmaddubsw` + `vpmaddwd`, or AVX-VNNI's `vpdpbusd`), one conversion and one FMA
//! with the per-lane multipliers: lanes 0..4 hold values 0..16 and lanes 4..8 values 16..32,
//! so Q6_K's scale per 16 values costs nothing more. Unsigned values (Q4_0, Q4_1, Q5_0, Q4_K,
//! Q5_K) go straight into the unsigned operand and add `m * s_x` per row; signed ones (Q8_0,
//! Q6_K) take the sign of each weight over to the activation (`vpsignb`).

use std::arch::x86_64::*;

use super::blocks::{self, UnitScales, Q4K_NIBBLES, Q5K_HIGH, Q5K_NIBBLES, Q6K_HIGH};
use super::{Acts, Columns, Kernel, QuantKind};
use crate::cpu::has_avx2_fma_f16c;

pub fn vnni_available() -> bool {
    crate::cpu::has_avx_vnni()
}

/// The kernel for `kind`, with AVX-VNNI's byte products where `vnni`.
pub(super) fn kernel(kind: QuantKind, vnni: bool) -> Kernel {
    match (kind, vnni) {
        (QuantKind::Q4_0, false) => q4_0,
        (QuantKind::Q4_1, false) => q4_1,
        (QuantKind::Q5_0, false) => q5_0,
        (QuantKind::Q8_0, false) => q8_0,
        (QuantKind::Q4K, false) => q4_k,
        (QuantKind::Q5K, false) => q5_k,
        (QuantKind::Q6K, false) => q6_k,
        (QuantKind::Q4_0, true) => q4_0_vnni,
        (QuantKind::Q4_1, true) => q4_1_vnni,
        (QuantKind::Q5_0, true) => q5_0_vnni,
        (QuantKind::Q8_0, true) => q8_0_vnni,
        (QuantKind::Q4K, true) => q4_k_vnni,
        (QuantKind::Q5K, true) => q5_k_vnni,
        (QuantKind::Q6K, true) => q6_k_vnni,
    }
}

kernel_by_rows!(q4_0, maddubs::rows<Q4_0>, Q4_0, 1, has_avx2_fma_f16c);
kernel_by_rows!(q4_1, maddubs::rows<Q4_1>, Q4_1, 1, has_avx2_fma_f16c);
kernel_by_rows!(q5_0, maddubs::rows<Q5_0>, Q5_0, 1, has_avx2_fma_f16c);
kernel_by_rows!(q8_0, maddubs::rows<Q8_0>, Q8_0, 1, has_avx2_fma_f16c);
kernel_by_rows!(q4_k, maddubs::rows<Q4K>, Q4K, 1, has_avx2_fma_f16c);
kernel_by_rows!(q5_k, maddubs::rows<Q5K>, Q5K, 1, has_avx2_fma_f16c);
kernel_by_rows!(q6_k, maddubs::rows<Q6K>, Q6K, 1, has_avx2_fma_f16c);
kernel_by_rows!(q4_0_vnni, vnni::rows<Q4_0>, Q4_0, 1, vnni_available);
kernel_by_rows!(q4_1_vnni, vnni::rows<Q4_1>, Q4_1, 1, vnni_available);
kernel_by_rows!(q5_0_vnni, vnni::rows<Q5_0>, Q5_0, 1, vnni_available);
kernel_by_rows!(q8_0_vnni, vnni::rows<Q8_0>, Q8_0, 1, vnni_available);
kernel_by_rows!(q4_k_vnni, vnni::rows<Q4K>, Q4K, 1, vnni_available);
kernel_by_rows!(q5_k_vnni, vnni::rows<Q5K>, Q5K, 1, vnni_available);
kernel_by_rows!(q6_k_vnni, vnni::rows<Q6K>, Q6K, 1, vnni_available);

/// Whole units of `kind` from `blocks` as f32 values into `out` (`w = d * q + m`, one FMA
/// per 8 values).
pub(super) fn dequantize(kind: QuantKind, blocks: &[u8], out: &mut [f32]) {
    assert!(has_avx2_fma_f16c());
    let units = blocks.len() / kind.block_bytes();
    let whole = blocks.len() == units * kind.block_bytes();
    assert!(whole && out.len() == units * kind.block_values(), "dequantized size");
    // SAFETY: the CPU features and the sizes of both slices were checked above.
    unsafe {
        match kind {
            QuantKind::Q4_0 => dequantize_units::<Q4_0>(blocks, out),
            QuantKind::Q4_1 => dequantize_units::<Q4_1>(blocks, out),
            QuantKind::Q5_0 => dequantize_units::<Q5_0>(blocks, out),
            QuantKind::Q8_0 => dequantize_units::<Q8_0>(blocks, out),
            QuantKind::Q4K => dequantize_units::<Q4K>(blocks, out),
            QuantKind::Q5K => dequantize_units::<Q5K>(blocks, out),
            QuantKind::Q6K => dequantize_units::<Q6K>(blocks, out),
        }
    }
}

/// # Safety
/// AVX2, FMA and F16C; `out` holds `kind.block_values()` values per unit of `blocks`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dequantize_units<U: Unpack>(blocks: &[u8], out: &mut [f32]) {
    let kind = U::KIND;
    let mut scales = UnitScales::default();
    let units = blocks.chunks_exact(kind.block_bytes());
    for (unit, out) in units.zip(out.chunks_exact_mut(kind.block_values())) {
        U::scales(unit, &mut scales);
        for sub in 0..kind.subs() {
            let (w, d, m) = U::sub(unit, sub, &scales);
            // Values 0..16 take the low half's multiplier, 16..32 the high half's.
            let halves =
                [_mm256_permute2f128_ps::<0x00>(d, d), _mm256_permute2f128_ps::<0x11>(d, d)];
            let (m, at) = (_mm256_set1_ps(m), out.as_mut_ptr().add(32 * sub));
            let bytes = [_mm256_castsi256_si128(w), _mm256_extracti128_si256::<1>(w)];
            for j in 0..4 {
                let eight =
                    if j % 2 == 0 { bytes[j / 2] } else { _mm_srli_si128::<8>(bytes[j / 2]) };
                let wide = if kind.signed() {
                    _mm256_cvtepi8_epi32(eight)
                } else {
                    _mm256_cvtepu8_epi32(eight)
                };
                let v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(wide), halves[j / 2], m);
                _mm256_storeu_ps(at.add(8 * j), v);
            }
        }
    }
}

/// One format's sub-blocks as vectors.
///
/// # Safety
/// The methods need AVX2, FMA and F16C, and `unit` must hold a whole unit of `KIND`
/// (`KIND.block_bytes()` bytes).
trait Unpack {
    const KIND: QuantKind;

    /// The multipliers and offsets the unit's sub-blocks share, where they are not in the
    /// sub-block itself (the k-quants' packed scales).
    unsafe fn scales(_unit: &[u8], _scales: &mut UnitScales) {}

    /// Sub-block `sub`: its 32 values as bytes, the multiplier of each i32 lane of a byte
    /// product (`[d_lo x 4, d_hi x 4]`) and the offset `m`.
    unsafe fn sub(unit: &[u8], sub: usize, scales: &UnitScales) -> (__m256i, __m256, f32);
}

/// The f16 at `at`.
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn half(at: *const u8) -> f32 {
    let bits = (at as *const u16).read_unaligned() as i32;
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
}

/// The 32 values of 16 packed bytes at `at`: low nibbles first, then high nibbles.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn nibbles_of_16(at: *const u8) -> __m256i {
    let packed = _mm_loadu_si128(at.cast());
    let both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
}

/// The low (`shift` 0) or high (`shift` 4) nibbles of the 32 bytes at `at`, or any 4-bit
/// field: `(byte >> shift) & mask` per byte.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn bits_of_32(at: *const u8, shift: usize, mask: i8) -> __m256i {
    let bytes = _mm256_loadu_si256(at.cast());
    let shifted = _mm256_srl_epi16(bytes, _mm_cvtsi32_si128(shift as i32));
    _mm256_and_si256(shifted, _mm256_set1_epi8(mask))
}

/// `0x10` in byte `j` where bit `j` of `bits` is set, else 0 (ggml's `bytes_from_bits_32`:
/// byte `j` takes byte `j / 8` of the word, then all its bits but bit `j % 8` are set).
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn fifth_bits(bits: u32) -> __m256i {
    let spread =
        _mm256_set_epi64x(0x0303_0303_0303_0303, 0x0202_0202_0202_0202, 0x0101_0101_0101_0101, 0);
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), spread);
    let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
    let set = _mm256_cmpeq_epi8(_mm256_or_si256(bytes, others), _mm256_set1_epi64x(-1));
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

struct Q4_0;
struct Q4_1;
struct Q5_0;
struct Q8_0;
struct Q4K;
struct Q5K;
struct Q6K;

impl Unpack for Q4_0 {
    const KIND: QuantKind = QuantKind::Q4_0;

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn sub(unit: &[u8], _: usize, _: &UnitScales) -> (__m256i, __m256, f32) {
        let d = half(unit.as_ptr());
        (nibbles_of_16(unit.as_ptr().add(2)), _mm256_set1_ps(d), -8.0 * d)
    }
}

impl Unpack for Q4_1 {
    const KIND: QuantKind = QuantKind::Q4_1;

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn sub(unit: &[u8], _: usize, _: &UnitScales) -> (__m256i, __m256, f32) {
        let p = unit.as_ptr();
        (nibbles_of_16(p.add(4)), _mm256_set1_ps(half(p)), half(p.add(2)))
    }
}

impl Unpack for Q5_0 {
    const KIND: QuantKind = QuantKind::Q5_0;

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn sub(unit: &[u8], _: usize, _: &UnitScales) -> (__m256i, __m256, f32) {
        let p = unit.as_ptr();
        let d = half(p);
        let fifth = fifth_bits((p.add(2) as *const u32).read_unaligned());
        (_mm256_or_si256(nibbles_of_16(p.add(6)), fifth), _mm256_set1_ps(d), -16.0 * d)
    }
}

impl Unpack for Q8_0 {
    const KIND: QuantKind = QuantKind::Q8_0;

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn sub(unit: &[u8], _: usize, _: &UnitScales) -> (__m256i, __m256, f32) {
        let p = unit.as_ptr();
        (_mm256_loadu_si256(p.add(2).cast()), _mm256_set1_ps(half(p)), 0.0)
    }
}

impl Unpack for Q4K {
    const KIND: QuantKind = QuantKind::Q4K;

    unsafe fn scales(unit: &[u8], scales: &mut UnitScales) {
        blocks::unit_scales(Self::KIND, unit, scales)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn sub(unit: &[u8], sub: usize, s: &UnitScales) -> (__m256i, __m256, f32) {
        let values = bits_of_32(unit.as_ptr().add(Q4K_NIBBLES + 32 * (sub / 2)), 4 * (sub % 2), 15);
        (values, _mm256_set1_ps(s.d[2 * sub]), s.m[sub])
    }
}

impl Unpack for Q5K {
    const KIND: QuantKind = QuantKind::Q5K;

    unsafe fn scales(unit: &[u8], scales: &mut UnitScales) {
        blocks::unit_scales(Self::KIND, unit, scales)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn sub(unit: &[u8], sub: usize, s: &UnitScales) -> (__m256i, __m256, f32) {
        let p = unit.as_ptr();
        let nibbles = bits_of_32(p.add(Q5K_NIBBLES + 32 * (sub / 2)), 4 * (sub % 2), 15);
        let fifth = _mm256_slli_epi16(bits_of_32(p.add(Q5K_HIGH), sub, 1), 4);
        (_mm256_or_si256(nibbles, fifth), _mm256_set1_ps(s.d[2 * sub]), s.m[sub])
    }
}

impl Unpack for Q6K {
    const KIND: QuantKind = QuantKind::Q6K;

    unsafe fn scales(unit: &[u8], scales: &mut UnitScales) {
        blocks::unit_scales(Self::KIND, unit, scales)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn sub(unit: &[u8], sub: usize, s: &UnitScales) -> (__m256i, __m256, f32) {
        let p = unit.as_ptr();
        let (half, k) = (sub / 4, sub % 4);
        let nibbles = bits_of_32(p.add(64 * half + 32 * (k % 2)), 4 * (k / 2), 15);
        let top = _mm256_slli_epi16(bits_of_32(p.add(Q6K_HIGH + 32 * half), 2 * k, 3), 4);
        let values = _mm256_sub_epi8(_mm256_or_si256(nibbles, top), _mm256_set1_epi8(32));
        let d = _mm256_set_m128(_mm_set1_ps(s.d[2 * sub + 1]), _mm_set1_ps(s.d[2 * sub]));
        (values, d, 0.0)
    }
}

/// The kernel for one way of taking 32 byte products into 8 lanes of i32 (`$dot`), compiled
/// for `$features`.
macro_rules! kernels {
    ($module:ident, $features:literal, $dot:ident) => {
        mod $module {
            use std::arch::x86_64::*;

            use super::{hsum, $dot, Unpack};
            use crate::qmatmul::blocks::UnitScales;
            use crate::qmatmul::{Acts, Columns, BLOCK, LANES};

            /// Every weight row of `weights` against the group's `R` activation rows.
            // Row indices address several per-row arrays at once.
            #[allow(clippy::needless_range_loop)]
            #[target_feature(enable = $features)]
            pub unsafe fn rows<U: Unpack, const R: usize>(
                weights: &[u8],
                nb: usize,
                acts: Acts<'_>,
                out: Columns,
            ) {
                let kind = U::KIND;
                let (bb, subs) = (kind.block_bytes(), kind.subs());
                let mut scales = UnitScales::default();
                for (o, row) in weights.chunks_exact(kind.row_bytes(nb)).enumerate() {
                    let mut acc = [_mm256_setzero_ps(); R];
                    let mut offsets = [0.0f32; R];
                    for (u, unit) in row.chunks_exact(bb).enumerate() {
                        U::scales(unit, &mut scales);
                        for sub in 0..subs {
                            let (w, d, m) = U::sub(unit, sub, &scales);
                            let magnitude = if kind.signed() { _mm256_sign_epi8(w, w) } else { w };
                            for r in 0..R {
                                let at = r * nb + u * subs + sub;
                                let q = _mm256_loadu_si256(acts.qs.as_ptr().add(at * BLOCK).cast());
                                let q = if kind.signed() { _mm256_sign_epi8(q, w) } else { q };
                                let dot = _mm256_cvtepi32_ps($dot(magnitude, q));
                                let dx = _mm256_loadu_ps(acts.d.as_ptr().add(at * LANES));
                                acc[r] = _mm256_fmadd_ps(dot, _mm256_mul_ps(d, dx), acc[r]);
                                if !kind.signed() {
                                    offsets[r] += m * *acts.s.get_unchecked(at);
                                }
                            }
                        }
                    }
                    for r in 0..R {
                        out.write(o, r, hsum(acc[r]) + offsets[r]);
                    }
                }
            }
        }
    };
}
kernels!(maddubs, "avx2,fma,f16c", dot_maddubs);
kernels!(vnni, "avx2,fma,f16c,avxvnni", dot_vnni);

/// `sum of 4 adjacent u8 * i8 products` per i32 lane, with AVX2 (`vpmaddubsw` then
/// `vpmaddwd`; the i16 pair sums stay below saturation for unsigned values up to 128 against
/// |activations| <= 127).
#[target_feature(enable = "avx2")]
#[inline]
fn dot_maddubs(unsigned: __m256i, signed: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(unsigned, signed), _mm256_set1_epi16(1))
}

/// The same sums in one instruction (`vpdpbusd`, AVX-VNNI).
#[target_feature(enable = "avx2,avxvnni")]
#[inline]
fn dot_vnni(unsigned: __m256i, signed: __m256i) -> __m256i {
    _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), unsigned, signed)
}

#[target_feature(enable = "avx2")]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}
