//! AVX2 kernels for every block format, in chunks of 8 consecutive 32-value sub-blocks of a
//! weight row ([`super::blocks`] is the portable reading they are tested against): a
//! k-quant super-block, or 8 blocks of the 32-value formats.
//!
//! Per sub-block the 32 values are unpacked into one vector of bytes once for all the
//! activation rows of the group; per activation row each sub-block then costs one load and
//! one byte dot product (`vpmaddubsw`, then `vpmaddwd` with the k-quants' integer scales as
//! its 16-bit operand, or AVX-VNNI's `vpdpbusd` where there is no integer scale). The eight
//! sub-blocks' integer sums of a row are gathered into the 8 lanes of one vector (a tree of
//! `vphaddd`), which takes the float scales of the chunk in one conversion, one product and
//! one FMA, and the offsets `m * s_x` in one more FMA: per sub-block and row about four
//! instructions, where scaling each sub-block apart took nine. Unsigned values (Q4_0, Q4_1,
//! Q5_0, Q4_K, Q5_K) go straight into the unsigned operand; signed ones (Q8_0, Q6_K) take the
//! sign of each weight over to the activation (`vpsignb`).

use std::arch::x86_64::*;

use super::blocks::{
    self, K_SCALES, Q4K_NIBBLES, Q5K_HIGH, Q5K_NIBBLES, Q6K_D, Q6K_HIGH, Q6K_SCALES,
};
use super::chunked;
use super::{Acts, Columns, Kernel, QuantKind, BLOCK};
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

/// [`super::quantize_block`] on 8 lanes, bit for bit, as `avx512::quantize_block` computes
/// it: the same scale, the same product `x * (1 / d)`, and halves rounded away from zero
/// (truncate, then step away from zero where the exact remainder is at least one half).
pub fn quantize_block(x: &[f32], qs: &mut [i8]) -> (f32, i32) {
    assert!(has_avx2_fma_f16c() && x.len() == BLOCK && qs.len() == BLOCK);
    // SAFETY: the CPU features and both lengths were checked above.
    unsafe { quantize(x, qs) }
}

#[target_feature(enable = "avx2")]
unsafe fn quantize(x: &[f32], qs: &mut [i8]) -> (f32, i32) {
    // SAFETY: `x` holds 32 values (checked by `quantize_block`): four loads of 8.
    let v: [__m256; 4] = std::array::from_fn(|i| unsafe { _mm256_loadu_ps(x.as_ptr().add(8 * i)) });
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX));
    let max = v.iter().fold(_mm256_setzero_ps(), |m, &v| _mm256_max_ps(m, _mm256_and_ps(v, abs)));
    let max = _mm_max_ps(_mm256_castps256_ps128(max), _mm256_extractf128_ps::<1>(max));
    let max = _mm_max_ps(max, _mm_movehl_ps(max, max));
    let amax = _mm_cvtss_f32(_mm_max_ss(max, _mm_shuffle_ps::<1>(max, max)));
    let d = amax / 127.0;
    let inv = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
    let (half, one) = (_mm256_set1_ps(0.5), _mm256_set1_ps(1.0));
    let sign = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MIN));
    let q: [__m256i; 4] = std::array::from_fn(|i| {
        let v = _mm256_mul_ps(v[i], inv);
        let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
        let away = _mm256_cmp_ps::<_CMP_GE_OQ>(_mm256_and_ps(_mm256_sub_ps(v, t), abs), half);
        let step = _mm256_or_ps(_mm256_and_ps(v, sign), one);
        _mm256_cvtps_epi32(_mm256_add_ps(t, _mm256_and_ps(away, step)))
    });
    let sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    let sum = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256::<1>(sum));
    let sum = _mm_add_epi32(sum, _mm_unpackhi_epi64(sum, sum));
    let sum = _mm_cvtsi128_si32(_mm_add_epi32(sum, _mm_shuffle_epi32::<1>(sum)));
    // The packs work within 128-bit lanes: 4-byte groups come out in the order
    // q0[0..4] q1[0..4] q2[0..4] q3[0..4] q0[4..8] ..., put back in order by one permute.
    let bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    // SAFETY: `qs` holds 32 values (checked by `quantize_block`).
    unsafe { _mm256_storeu_si256(qs.as_mut_ptr().cast(), bytes) };
    (d, sum)
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

/// Sub-blocks whose integer sums share one vector of float scales.
const CHUNK: usize = 8;

/// Whole units of `kind` from `blocks` as f32 values into `out` (`w = d * (k q) + m`, with
/// the integer scale `k` of the k-quants, one FMA per 8 values).
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
    // The units read as one long row: chunks never depend on where a row ends.
    let subs = blocks.len() / kind.block_bytes() * kind.subs();
    let row = blocks.as_ptr();
    for c in 0..subs.div_ceil(CHUNK) {
        let n = (subs - CHUNK * c).min(CHUNK);
        // SAFETY: chunk `c` holds sub-blocks `8c..8c + n` of the `subs` in `blocks`.
        let chunk = unsafe { U::chunk(row, c, n) };
        let (mut d, mut m) = ([0.0f32; CHUNK], [0.0f32; CHUNK]);
        // SAFETY: `d` holds 8 floats.
        unsafe { _mm256_storeu_ps(d.as_mut_ptr(), chunk.d) };
        // SAFETY: `m` holds 8 floats.
        unsafe { _mm256_storeu_ps(m.as_mut_ptr(), chunk.m) };
        for j in 0..n {
            // SAFETY: sub-block `8c + j` is one of the `subs` in `blocks`.
            let (w, multiplier) = unsafe { U::sub(row, c, j, &chunk.ints) };
            // SAFETY: `out` holds 32 values per sub-block (the caller's promise).
            let at = unsafe { out.as_mut_ptr().add(BLOCK * (CHUNK * c + j)) };
            let halves = [_mm256_castsi256_si128(w), _mm256_extracti128_si256::<1>(w)];
            // Values 0..16 take the low half's integer scale, 16..32 the high half's.
            let scales = [
                _mm256_permute2x128_si256::<0x00>(multiplier, multiplier),
                _mm256_permute2x128_si256::<0x11>(multiplier, multiplier),
            ];
            for h in 0..2 {
                let wide = if kind.signed() {
                    _mm256_cvtepi8_epi16(halves[h])
                } else {
                    _mm256_cvtepu8_epi16(halves[h])
                };
                let scaled = if U::SCALED { _mm256_mullo_epi16(wide, scales[h]) } else { wide };
                let eights =
                    [_mm256_castsi256_si128(scaled), _mm256_extracti128_si256::<1>(scaled)];
                for (e, eight) in eights.into_iter().enumerate() {
                    let v = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(eight));
                    let v = _mm256_fmadd_ps(v, _mm256_set1_ps(d[j]), _mm256_set1_ps(m[j]));
                    // SAFETY: values `16 h + 8 e..+ 8` of the sub-block's 32 in `out`.
                    unsafe { _mm256_storeu_ps(at.add(16 * h + 8 * e), v) };
                }
            }
        }
    }
}

/// What the sub-blocks of one chunk share.
#[derive(Clone, Copy)]
struct Chunk<I> {
    /// Lane `j`: sub-block `j`'s float multiplier (beside its integer scale, if any).
    d: __m256,
    /// Lane `j`: sub-block `j`'s offset `m` (0 where the format has none).
    m: __m256,
    /// The chunk's integer scales, as the format keeps them.
    ints: I,
}

/// One format's chunks and sub-blocks as vectors.
///
/// # Safety
/// The methods need AVX2, FMA and F16C; `row` must hold the chunk's whole units.
trait Unpack {
    const KIND: QuantKind;
    /// Whether sub-blocks carry 16-bit integer scales (the k-quants); the others multiply by 1.
    const SCALED: bool;
    type Ints: Copy;

    /// The scales and offsets of sub-blocks `8c..8c + n` of `row` (`n` is 8 but at a row's
    /// end); lanes from `n` are 0.
    unsafe fn chunk(row: *const u8, c: usize, n: usize) -> Chunk<Self::Ints>;

    /// Sub-block `8c + j` of `row`: its 32 values `q` as bytes and the integer scale of each
    /// 16-bit pair product (lanes 0..8: values 0..16; lanes 8..16: values 16..32).
    unsafe fn sub(row: *const u8, c: usize, j: usize, ints: &Self::Ints) -> (__m256i, __m256i);

    /// [`Self::chunk`] for a whole chunk as the kernels store it: rearranged for the 32-value
    /// formats ([`super::chunked`]), a super-block as it is for the k-quants.
    unsafe fn packed_chunk(row: *const u8, c: usize) -> Chunk<Self::Ints> {
        // SAFETY: the same contract, for a whole chunk.
        unsafe { Self::chunk(row, c, CHUNK) }
    }

    /// [`Self::sub`] in a whole chunk as the kernels store it.
    unsafe fn packed_sub(
        row: *const u8,
        c: usize,
        j: usize,
        ints: &Self::Ints,
    ) -> (__m256i, __m256i) {
        // SAFETY: the same contract, in a whole chunk.
        unsafe { Self::sub(row, c, j, ints) }
    }
}

/// Chunk `c` of a row of the 32-value format `kind` rearranged ([`super::chunked`]): where
/// it starts, and its 8 scales `d` with offsets `offset * d`.
///
/// # Safety
/// AVX2, FMA and F16C; `row` holds chunk `c` whole.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn packed_block_chunk(
    kind: QuantKind,
    row: *const u8,
    c: usize,
    offset: f32,
) -> (*const u8, Chunk<()>) {
    // SAFETY: chunk `c` lies in `row` (the caller's promise).
    let start = unsafe { row.add(CHUNK * kind.block_bytes() * c) };
    // SAFETY: a rearranged chunk starts with its 8 blocks' f16 scales, 16 bytes.
    let d = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(start.cast()) });
    (start, Chunk { d, m: _mm256_mul_ps(d, _mm256_set1_ps(offset)), ints: () })
}

/// Block `j`'s 32 values of a rearranged chunk of a 4-bit format: the low or high nibbles of
/// its pair's 32 bytes.
///
/// # Safety
/// AVX2; `start` is a whole rearranged chunk's first byte.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn packed_nibbles(kind: QuantKind, start: *const u8, j: usize) -> __m256i {
    // SAFETY: block pair `j / 2`'s 32 bytes of nibbles lie in the chunk.
    unsafe { bits_of_32(start.add(chunked::values_at(kind) + 32 * (j / 2)), 4 * (j % 2), 15) }
}

/// The f16 at `at`.
///
/// # Safety
/// AVX2 and F16C; two bytes readable at `at`.
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn half(at: *const u8) -> f32 {
    // SAFETY: the caller's promise; the read is unaligned.
    let bits = unsafe { (at as *const u16).read_unaligned() } as i32;
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
}

/// The `n` (at most 8) f16 values at `first`, `first + stride`, ... in lanes `0..n`.
///
/// # Safety
/// AVX2 and F16C; two bytes readable at each of the `n` places.
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn halves(first: *const u8, stride: usize, n: usize) -> __m256 {
    // SAFETY: called for `j < n` only: one of the caller's places.
    let at = |j: usize| unsafe { (first.add(j * stride) as *const i16).read_unaligned() };
    let bits = if n == CHUNK {
        _mm_set_epi16(at(7), at(6), at(5), at(4), at(3), at(2), at(1), at(0))
    } else {
        let mut bits = [0i16; CHUNK];
        bits.iter_mut().take(n).enumerate().for_each(|(j, b)| *b = at(j));
        // SAFETY: `bits` holds 8 i16, 16 bytes.
        unsafe { _mm_loadu_si128(bits.as_ptr().cast()) }
    };
    _mm256_cvtph_ps(bits)
}

/// The 32 values of 16 packed bytes at `at`: low nibbles first, then high nibbles.
///
/// # Safety
/// AVX2; 16 bytes readable at `at`.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn nibbles_of_16(at: *const u8) -> __m256i {
    // SAFETY: the caller's promise.
    let packed = unsafe { _mm_loadu_si128(at.cast()) };
    let both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
}

/// The low (`shift` 0) or high (`shift` 4) nibbles of the 32 bytes at `at`, or any 4-bit
/// field: `(byte >> shift) & mask` per byte.
///
/// # Safety
/// AVX2; 32 bytes readable at `at`.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn bits_of_32(at: *const u8, shift: usize, mask: i8) -> __m256i {
    // SAFETY: the caller's promise.
    let bytes = unsafe { _mm256_loadu_si256(at.cast()) };
    let shifted = _mm256_srl_epi16(bytes, _mm_cvtsi32_si128(shift as i32));
    _mm256_and_si256(shifted, _mm256_set1_epi8(mask))
}

/// `0x10` in byte `j` where bit `j` of `bits` is set, else 0 (ggml's `bytes_from_bits_32`:
/// byte `j` takes byte `j / 8` of the word, then all its bits but bit `j % 8` are set).
#[target_feature(enable = "avx2")]
#[inline]
fn fifth_bits(bits: u32) -> __m256i {
    let spread =
        _mm256_set_epi64x(0x0303_0303_0303_0303, 0x0202_0202_0202_0202, 0x0101_0101_0101_0101, 0);
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), spread);
    let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
    let set = _mm256_cmpeq_epi8(_mm256_or_si256(bytes, others), _mm256_set1_epi64x(-1));
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// Lane `j`: the sum of the 8 lanes of `p[j]` (two rounds of `vphaddd` within each 128-bit
/// half, then the halves' partial sums added across).
#[target_feature(enable = "avx2")]
#[inline]
fn lane_sums(p: &[__m256i; CHUNK]) -> __m256i {
    let first = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
    let second = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
    let low = _mm256_permute2x128_si256::<0x20>(first, second);
    let high = _mm256_permute2x128_si256::<0x31>(first, second);
    _mm256_add_epi32(low, high)
}

/// A load mask of the first `n` (at most 8) f32 lanes.
#[target_feature(enable = "avx2")]
#[inline]
fn first_lanes(n: usize) -> __m256i {
    _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
}

struct Q4_0;
struct Q4_1;
struct Q5_0;
struct Q8_0;
struct Q4K;
struct Q5K;
struct Q6K;

/// The 32-value block `8c + j` of `row` (`bb` bytes a block).
///
/// # Safety
/// Block `8c + j` lies in `row`, or just past its end.
#[inline(always)]
unsafe fn block_at(row: *const u8, bb: usize, c: usize, j: usize) -> *const u8 {
    // SAFETY: the caller's promise.
    unsafe { row.add(bb * (CHUNK * c + j)) }
}

/// The chunk of a 32-value format: the blocks' own `d` (at each block's start) and an offset
/// of `offset * d`.
///
/// # Safety
/// AVX2, FMA and F16C; `row` holds blocks `8c..8c + n`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn block_chunk(row: *const u8, bb: usize, c: usize, n: usize, offset: f32) -> Chunk<()> {
    // SAFETY: each of the `n` blocks starts with its f16 scale.
    let d = unsafe { halves(block_at(row, bb, c, 0), bb, n) };
    Chunk { d, m: _mm256_mul_ps(d, _mm256_set1_ps(offset)), ints: () }
}

impl Unpack for Q4_0 {
    const KIND: QuantKind = QuantKind::Q4_0;
    const SCALED: bool = false;
    type Ints = ();

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn chunk(row: *const u8, c: usize, n: usize) -> Chunk<()> {
        // SAFETY: the chunk's units lie in `row` (the trait's contract).
        unsafe { block_chunk(row, Self::KIND.block_bytes(), c, n, -8.0) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn sub(row: *const u8, c: usize, j: usize, _: &()) -> (__m256i, __m256i) {
        // SAFETY: the chunk's units lie in `row` (the trait's contract): the block's 16
        // bytes of nibbles follow its 2-byte scale.
        (unsafe { nibbles_of_16(block_at(row, 18, c, j).add(2)) }, _mm256_set1_epi16(1))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn packed_chunk(row: *const u8, c: usize) -> Chunk<()> {
        // SAFETY: the chunk's units lie in `row` (the trait's contract).
        unsafe { packed_block_chunk(Self::KIND, row, c, -8.0).1 }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn packed_sub(row: *const u8, c: usize, j: usize, _: &()) -> (__m256i, __m256i) {
        // SAFETY: the chunk's units lie in `row` (the trait's contract).
        let start = unsafe { row.add(CHUNK * Self::KIND.block_bytes() * c) };
        // SAFETY: `start` begins a whole rearranged chunk.
        (unsafe { packed_nibbles(Self::KIND, start, j) }, _mm256_set1_epi16(1))
    }
}

impl Unpack for Q4_1 {
    const KIND: QuantKind = QuantKind::Q4_1;
    const SCALED: bool = false;
    type Ints = ();

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn chunk(row: *const u8, c: usize, n: usize) -> Chunk<()> {
        // SAFETY: the chunk's units lie in `row` (the trait's contract): each block starts
        // with its f16 `d` and `m`.
        let (d, m) = unsafe {
            let first = block_at(row, 20, c, 0);
            (halves(first, 20, n), halves(first.add(2), 20, n))
        };
        Chunk { d, m, ints: () }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn sub(row: *const u8, c: usize, j: usize, _: &()) -> (__m256i, __m256i) {
        // SAFETY: the chunk's units lie in `row` (the trait's contract): the block's 16
        // bytes of nibbles follow its 4 bytes of `d` and `m`.
        (unsafe { nibbles_of_16(block_at(row, 20, c, j).add(4)) }, _mm256_set1_epi16(1))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn packed_chunk(row: *const u8, c: usize) -> Chunk<()> {
        // SAFETY: the chunk's units lie in `row` (the trait's contract).
        let (start, chunk) = unsafe { packed_block_chunk(Self::KIND, row, c, 0.0) };
        // SAFETY: the 8 f16 offsets follow the 8 scales at the rearranged chunk's start.
        let m = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(start.add(2 * CHUNK).cast()) });
        Chunk { m, ..chunk }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn packed_sub(row: *const u8, c: usize, j: usize, _: &()) -> (__m256i, __m256i) {
        // SAFETY: the chunk's units lie in `row` (the trait's contract).
        let start = unsafe { row.add(CHUNK * Self::KIND.block_bytes() * c) };
        // SAFETY: `start` begins a whole rearranged chunk.
        (unsafe { packed_nibbles(Self::KIND, start, j) }, _mm256_set1_epi16(1))
    }
}

impl Unpack for Q5_0 {
    const KIND: QuantKind = QuantKind::Q5_0;
    const SCALED: bool = false;
    type Ints = ();

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn chunk(row: *const u8, c: usize, n: usize) -> Chunk<()> {
        // SAFETY: the chunk's units lie in `row` (the trait's contract).
        unsafe { block_chunk(row, Self::KIND.block_bytes(), c, n, -16.0) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn sub(row: *const u8, c: usize, j: usize, _: &()) -> (__m256i, __m256i) {
        // SAFETY: the chunk's units lie in `row` (the trait's contract).
        let p = unsafe { block_at(row, 22, c, j) };
        // SAFETY: a Q5_0 block is a 2-byte scale, 4 bytes of fifth bits, 16 of nibbles.
        let fifth = fifth_bits(unsafe { (p.add(2) as *const u32).read_unaligned() });
        // SAFETY: as above.
        let nibbles = unsafe { nibbles_of_16(p.add(6)) };
        (_mm256_or_si256(nibbles, fifth), _mm256_set1_epi16(1))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn packed_chunk(row: *const u8, c: usize) -> Chunk<()> {
        // SAFETY: the chunk's units lie in `row` (the trait's contract).
        unsafe { packed_block_chunk(Self::KIND, row, c, -16.0).1 }
    }

    /// Bit `j` of each byte of the chunk's fifth bits moved to bit 4 (a 16-bit shift: the
    /// bits it carries across bytes are masked off).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn packed_sub(row: *const u8, c: usize, j: usize, _: &()) -> (__m256i, __m256i) {
        // SAFETY: the chunk's units lie in `row` (the trait's contract).
        let start = unsafe { row.add(CHUNK * Self::KIND.block_bytes() * c) };
        // SAFETY: the chunk's 32 bytes of fifth bits lie in it.
        let bits = unsafe { _mm256_loadu_si256(start.add(chunked::fifth_at(Self::KIND)).cast()) };
        let moved = if j <= 4 {
            _mm256_sll_epi16(bits, _mm_cvtsi32_si128(4 - j as i32))
        } else {
            _mm256_srl_epi16(bits, _mm_cvtsi32_si128(j as i32 - 4))
        };
        let fifth = _mm256_and_si256(moved, _mm256_set1_epi8(0x10));
        // SAFETY: `start` begins a whole rearranged chunk.
        let nibbles = unsafe { packed_nibbles(Self::KIND, start, j) };
        let values = _mm256_or_si256(nibbles, fifth);
        (values, _mm256_set1_epi16(1))
    }
}

impl Unpack for Q8_0 {
    const KIND: QuantKind = QuantKind::Q8_0;
    const SCALED: bool = false;
    type Ints = ();

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn chunk(row: *const u8, c: usize, n: usize) -> Chunk<()> {
        // SAFETY: the chunk's units lie in `row` (the trait's contract).
        unsafe { block_chunk(row, Self::KIND.block_bytes(), c, n, 0.0) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn sub(row: *const u8, c: usize, j: usize, _: &()) -> (__m256i, __m256i) {
        // SAFETY: the chunk's units lie in `row` (the trait's contract): the block's 32
        // values follow its 2-byte scale.
        let values = unsafe { _mm256_loadu_si256(block_at(row, 34, c, j).add(2).cast()) };
        (values, _mm256_set1_epi16(1))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn packed_chunk(row: *const u8, c: usize) -> Chunk<()> {
        // SAFETY: the chunk's units lie in `row` (the trait's contract).
        unsafe { packed_block_chunk(Self::KIND, row, c, 0.0).1 }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn packed_sub(row: *const u8, c: usize, j: usize, _: &()) -> (__m256i, __m256i) {
        // SAFETY: the chunk's units lie in `row` (the trait's contract).
        let start = unsafe { row.add(CHUNK * Self::KIND.block_bytes() * c) };
        // SAFETY: block `j`'s 32 values lie in the rearranged chunk.
        let values = unsafe {
            _mm256_loadu_si256(start.add(chunked::values_at(Self::KIND) + 32 * j).cast())
        };
        (values, _mm256_set1_epi16(1))
    }
}

/// Q4_K's and Q5_K's chunk (one super-block of `bb` bytes): the super-block's `d` in every
/// lane with the 6-bit scales kept as integers, and offsets `-dmin * min`.
///
/// # Safety
/// AVX2, FMA and F16C; `row` holds super-block `c` whole.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn k_chunk(row: *const u8, bb: usize, c: usize) -> Chunk<[u8; CHUNK]> {
    // SAFETY: the caller's promise.
    let unit = unsafe { row.add(bb * c) };
    // SAFETY: a Q4_K or Q5_K super-block starts with `d`, `dmin` (f16 each) and the packed
    // scales; the bytes are not written while the kernel reads them.
    let packed = unsafe { std::slice::from_raw_parts(unit.add(4), K_SCALES) };
    let (scales, mins) = blocks::k_scales_mins(packed);
    // SAFETY: `mins` holds 8 bytes.
    let mins = unsafe { _mm_loadl_epi64(mins.as_ptr().cast()) };
    let mins = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(mins));
    // SAFETY: `dmin` is the super-block's second f16.
    let dmin = _mm256_set1_ps(-unsafe { half(unit.add(2)) });
    // SAFETY: `d` is the super-block's first f16.
    let d = _mm256_set1_ps(unsafe { half(unit) });
    Chunk { d, m: _mm256_mul_ps(dmin, mins), ints: scales }
}

impl Unpack for Q4K {
    const KIND: QuantKind = QuantKind::Q4K;
    const SCALED: bool = true;
    type Ints = [u8; CHUNK];

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn chunk(row: *const u8, c: usize, _: usize) -> Chunk<[u8; CHUNK]> {
        // SAFETY: the chunk's units lie in `row` (the trait's contract).
        unsafe { k_chunk(row, Self::KIND.block_bytes(), c) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn sub(row: *const u8, c: usize, j: usize, scales: &[u8; CHUNK]) -> (__m256i, __m256i) {
        // SAFETY: the chunk's units lie in `row` (the trait's contract): sub-blocks `j` and
        // `j + 1` share 32 bytes of nibbles in the super-block.
        let nibbles =
            unsafe { bits_of_32(row.add(144 * c + Q4K_NIBBLES + 32 * (j / 2)), 4 * (j % 2), 15) };
        (nibbles, _mm256_set1_epi16(scales[j] as i16))
    }
}

impl Unpack for Q5K {
    const KIND: QuantKind = QuantKind::Q5K;
    const SCALED: bool = true;
    type Ints = [u8; CHUNK];

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn chunk(row: *const u8, c: usize, _: usize) -> Chunk<[u8; CHUNK]> {
        // SAFETY: the chunk's units lie in `row` (the trait's contract).
        unsafe { k_chunk(row, Self::KIND.block_bytes(), c) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn sub(row: *const u8, c: usize, j: usize, scales: &[u8; CHUNK]) -> (__m256i, __m256i) {
        // SAFETY: the chunk's units lie in `row` (the trait's contract).
        let unit = unsafe { row.add(176 * c) };
        // SAFETY: sub-blocks `j` and `j + 1` share 32 bytes of nibbles in the super-block.
        let nibbles = unsafe { bits_of_32(unit.add(Q5K_NIBBLES + 32 * (j / 2)), 4 * (j % 2), 15) };
        // SAFETY: the super-block's 32 bytes of fifth bits.
        let fifth = _mm256_slli_epi16(unsafe { bits_of_32(unit.add(Q5K_HIGH), j, 1) }, 4);
        (_mm256_or_si256(nibbles, fifth), _mm256_set1_epi16(scales[j] as i16))
    }
}

impl Unpack for Q6K {
    const KIND: QuantKind = QuantKind::Q6K;
    const SCALED: bool = true;
    /// The 16 signed scales as 16-bit lanes.
    type Ints = __m256i;

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn chunk(row: *const u8, c: usize, _: usize) -> Chunk<__m256i> {
        // SAFETY: the chunk's units lie in `row` (the trait's contract).
        let unit = unsafe { row.add(210 * c) };
        // SAFETY: the super-block's 16 signed scales.
        let scales = _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(unit.add(Q6K_SCALES).cast()) });
        // SAFETY: the super-block's f16 `d`.
        let d = _mm256_set1_ps(unsafe { half(unit.add(Q6K_D)) });
        Chunk { d, m: _mm256_setzero_ps(), ints: scales }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn sub(row: *const u8, c: usize, j: usize, scales: &__m256i) -> (__m256i, __m256i) {
        // SAFETY: the chunk's units lie in `row` (the trait's contract).
        let unit = unsafe { row.add(210 * c) };
        let (half, k) = (j / 4, j % 4);
        // SAFETY: 32 of the super-block's 128 bytes of low nibbles.
        let nibbles = unsafe { bits_of_32(unit.add(64 * half + 32 * (k % 2)), 4 * (k / 2), 15) };
        // SAFETY: 32 of the super-block's 64 bytes of high bits.
        let top = unsafe { bits_of_32(unit.add(Q6K_HIGH + 32 * half), 2 * k, 3) };
        let top = _mm256_slli_epi16(top, 4);
        let values = _mm256_sub_epi8(_mm256_or_si256(nibbles, top), _mm256_set1_epi8(32));
        // Every 32-bit lane takes scales 2j and 2j + 1; the low 128 bits keep the first
        // 16-bit half of each lane, the high 128 bits the second.
        let pair = _mm256_permutevar8x32_epi32(*scales, _mm256_set1_epi32(j as i32));
        let spread = _mm256_setr_epi8(
            0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2,
            3, 2, 3,
        );
        (values, _mm256_shuffle_epi8(pair, spread))
    }
}

/// The kernel for one way of taking 32 byte products into 8 lanes of i32 (`$dot`, used where
/// the format has no integer scales), compiled for `$features`.
macro_rules! kernels {
    ($module:ident, $features:literal, $dot:ident) => {
        mod $module {
            use std::arch::x86_64::*;

            use super::{first_lanes, hsum, lane_sums, $dot, Unpack, CHUNK};
            use crate::qmatmul::{Acts, Columns, BLOCK};

            /// Every weight row of `weights` against the group's `R` activation rows.
            #[target_feature(enable = $features)]
            pub unsafe fn rows<U: Unpack, const R: usize>(
                weights: &[u8],
                nb: usize,
                acts: Acts<'_>,
                out: Columns,
            ) {
                for (o, row) in weights.chunks_exact(U::KIND.row_bytes(nb)).enumerate() {
                    let mut acc = [_mm256_setzero_ps(); R];
                    for c in 0..nb.div_ceil(CHUNK) {
                        let n = (nb - CHUNK * c).min(CHUNK);
                        // SAFETY: `row` holds `nb` sub-blocks and `acts` `R` rows of `nb`
                        // blocks (checked by the kernel's entry); chunk `c` is one of the row's.
                        unsafe {
                            if n == CHUNK {
                                chunk::<U, R, true>(row.as_ptr(), nb, c, n, acts, &mut acc);
                            } else {
                                chunk::<U, R, false>(row.as_ptr(), nb, c, n, acts, &mut acc);
                            }
                        }
                    }
                    for (r, &acc) in acc.iter().enumerate() {
                        // SAFETY: `o` is one of the weight rows and `r` one of the rows
                        // handed over.
                        unsafe { out.write(o, r, hsum(acc)) };
                    }
                }
            }

            /// Chunk `c` (sub-blocks `8c..8c + n`) of `row` into each row's accumulator. Every
            /// chunk takes 8 sub-blocks, so that the loop over them unrolls with constant
            /// offsets and its sums stay in registers: a short chunk at a row's end (not
            /// `WHOLE`) reads its last sub-block again in the missing places, and its float
            /// scales, 0 in those lanes, drop them.
            #[target_feature(enable = $features)]
            #[inline]
            unsafe fn chunk<U: Unpack, const R: usize, const WHOLE: bool>(
                row: *const u8,
                nb: usize,
                c: usize,
                n: usize,
                acts: Acts<'_>,
                acc: &mut [__m256; R],
            ) {
                let signed = U::KIND.signed();
                // SAFETY: chunk `c` of `row` holds `n` sub-blocks (8 where `WHOLE`), stored
                // rearranged where whole (the caller's promise).
                let chunk = unsafe {
                    if WHOLE {
                        U::packed_chunk(row, c)
                    } else {
                        U::chunk(row, c, n)
                    }
                };
                let mut sums = [[_mm256_setzero_si256(); CHUNK]; R];
                for j in 0..CHUNK {
                    let j = if WHOLE { j } else { j.min(n - 1) };
                    // SAFETY: `j < n`: one of the chunk's sub-blocks.
                    let (w, multiplier) = unsafe {
                        if WHOLE {
                            U::packed_sub(row, c, j, &chunk.ints)
                        } else {
                            U::sub(row, c, j, &chunk.ints)
                        }
                    };
                    let magnitude = if signed { _mm256_sign_epi8(w, w) } else { w };
                    for (r, sums) in sums.iter_mut().enumerate() {
                        let at = (r * nb + CHUNK * c + j) * BLOCK;
                        // SAFETY: block `8c + j` of row `r`: 32 bytes inside `acts.qs`.
                        let q = unsafe { _mm256_loadu_si256(acts.qs.as_ptr().add(at).cast()) };
                        let q = if signed { _mm256_sign_epi8(q, w) } else { q };
                        sums[j] = if U::SCALED {
                            _mm256_madd_epi16(_mm256_maddubs_epi16(magnitude, q), multiplier)
                        } else {
                            $dot(magnitude, q)
                        };
                    }
                }
                let lanes = first_lanes(n);
                for (r, (acc, sums)) in acc.iter_mut().zip(&sums).enumerate() {
                    let at = r * nb + CHUNK * c;
                    // SAFETY: the mask reads the scales of the chunk's `n` blocks of row `r`.
                    let dx = unsafe { _mm256_maskload_ps(acts.block_d.as_ptr().add(at), lanes) };
                    let total = _mm256_cvtepi32_ps(lane_sums(sums));
                    *acc = _mm256_fmadd_ps(total, _mm256_mul_ps(chunk.d, dx), *acc);
                    if !signed {
                        // SAFETY: the mask reads the sums of the chunk's `n` blocks of row `r`.
                        let sx = unsafe { _mm256_maskload_ps(acts.s.as_ptr().add(at), lanes) };
                        *acc = _mm256_fmadd_ps(chunk.m, sx, *acc);
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
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}
