//! AVX-512 kernels: two weight blocks per 512-bit vector. Per weight block pair the nibbles
//! (or signed bytes) and the two scales are prepared once; per activation row it takes one
//! `vpdpbusd`, one conversion, one scale product and one or two FMAs (the AVX2 kernels take
//! about as many per single block).

use std::arch::x86_64::*;

use super::{Acts, Columns, QuantKind, BLOCK, LANES};

pub fn available() -> bool {
    crate::cpu::has_avx512_vnni()
}

kernel_by_rows!(q4_1, kernels::q4_1, Q4_1, 1, available);
kernel_by_rows!(q8_0, kernels::q8_0, Q8_0, 1, available);

/// The kernel for `kind` where this CPU runs one (Q4_1 and Q8_0).
pub(super) fn kernel(kind: QuantKind) -> Option<super::Kernel> {
    match kind {
        QuantKind::Q4_1 if available() => Some(q4_1),
        QuantKind::Q8_0 if available() => Some(q8_0),
        _ => None,
    }
}

/// [`super::quantize_block`] on 16 lanes, bit for bit: the same scale, the same product
/// `x * (1 / d)`, and rounding of halves away from zero (truncate, then step away from
/// zero where the exact remainder is at least one half).
pub fn quantize_block(x: &[f32], qs: &mut [i8]) -> (f32, i32) {
    assert!(available() && x.len() == super::BLOCK && qs.len() == super::BLOCK);
    // SAFETY: the CPU features and both lengths were checked above.
    unsafe { quantize(x, qs) }
}

#[target_feature(enable = "avx512f")]
unsafe fn quantize(x: &[f32], qs: &mut [i8]) -> (f32, i32) {
    // SAFETY: `x` holds 32 values (checked by `quantize_block`): two loads of 16.
    let halves = unsafe { [_mm512_loadu_ps(x.as_ptr()), _mm512_loadu_ps(x.as_ptr().add(16))] };
    let amax =
        _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(halves[0]), _mm512_abs_ps(halves[1])));
    let d = amax / 127.0;
    let inv = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
    let (half, one) = (_mm512_set1_ps(0.5), _mm512_set1_ps(1.0));
    let sign = _mm512_set1_epi32(i32::MIN);
    let mut sum = _mm512_setzero_si512();
    for (i, x) in halves.into_iter().enumerate() {
        let v = _mm512_mul_ps(x, inv);
        let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
        let away = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(_mm512_abs_ps(_mm512_sub_ps(v, t)), half);
        let step = _mm512_castsi512_ps(_mm512_or_si512(
            _mm512_and_si512(_mm512_castps_si512(v), sign),
            _mm512_castps_si512(one),
        ));
        let q = _mm512_cvtps_epi32(_mm512_mask_add_ps(t, away, t, step));
        sum = _mm512_add_epi32(sum, q);
        // SAFETY: `qs` holds 32 values (checked by `quantize_block`); `i` is 0 or 1.
        unsafe { _mm_storeu_si128(qs.as_mut_ptr().add(16 * i).cast(), _mm512_cvtepi32_epi8(q)) };
    }
    (d, _mm512_reduce_add_epi32(sum))
}

/// Masks of the activation loads for blocks `b` and `b + 1` of `nb`: both, or only `b`
/// (the last block of an odd count; the upper half then loads zeros).
fn masks(b: usize, nb: usize) -> (__mmask64, __mmask16) {
    if b + 1 < nb {
        (!0, !0)
    } else {
        (0xffff_ffff, 0x00ff)
    }
}

// Row indices address several per-row arrays at once.
#[allow(clippy::needless_range_loop)]
mod kernels {
    use std::arch::x86_64::*;

    use super::{masks, Acts, Columns, BLOCK, LANES};

    /// Q4_1 blocks whose offset terms are summed together, 16 per FMA, after their
    /// products: the offsets `m` are kept aside meanwhile.
    const SPAN: usize = 64;

    /// The 8-bit values of blocks `at` and `at + 1` of the group's rows (or only `at`, as
    /// `masks` says), signed (`acts.qs`) or offset to unsigned (`acts.qu`), and their
    /// scales `[d_at x 8, d_at+1 x 8]`.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn pair(
        acts: &Acts<'_>,
        unsigned: bool,
        at: usize,
        (bytes, lanes): (__mmask64, __mmask16),
    ) -> (__m512i, __m512) {
        let q = if unsigned { acts.qu.as_ptr() } else { acts.qs.as_ptr().cast() };
        // SAFETY: block `at` is one of the group's (the caller's promise), so its values and
        // scales lie inside `acts`.
        let (q, d) = unsafe { (q.add(at * BLOCK), acts.d.as_ptr().add(at * LANES)) };
        // Masked loads cost an extra micro-op on some CPUs: only the last odd block takes one.
        if lanes == !0 {
            // SAFETY: blocks `at` and `at + 1` are the group's: 64 values, 16 scales.
            unsafe { (_mm512_loadu_si512(q.cast()), _mm512_loadu_ps(d)) }
        } else {
            // SAFETY: the masks read block `at` alone (32 values, 8 scales).
            unsafe { (_mm512_maskz_loadu_epi8(bytes, q.cast()), _mm512_maskz_loadu_ps(lanes, d)) }
        }
    }

    /// `[v0 x 8, v1 x 8]` from lanes `i0` and `i1` of `v`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn spread(v: __m128, i0: i32, i1: i32) -> __m512 {
        let (a, b) = (_mm512_set1_epi32(i0), _mm512_set1_epi32(i1));
        let index = _mm512_mask_blend_epi32(0xff00, a, b);
        _mm512_permutexvar_ps(index, _mm512_castps128_ps512(v))
    }

    /// The integer dot products of one block pair for every row of the group, scaled and
    /// added to `$acc` (one of two accumulator sets, alternated by pair so that the FMAs
    /// of consecutive pairs do not wait for each other). `$weights(b, two)` gives the
    /// pair's `(weights, scales, initial sums)`: unsigned weights times signed activations
    /// from 0, or (`$signed_weights`) signed weights times the unsigned activations from
    /// `-128 * sum(w)`.
    macro_rules! pairs {
        ($acts:expr, $nb:expr, $range:expr, $acc:ident, $acc_next:ident, $weights:expr,
         $signed_weights:expr) => {
            for b in $range.clone().step_by(4) {
                for (b, acc) in [(b, &mut $acc), (b + 2, &mut $acc_next)] {
                    if b >= $range.end {
                        break;
                    }
                    let mask = masks(b, $nb);
                    let (w, d, init): (__m512i, __m512, __m512i) = $weights(b, b + 1 < $nb);
                    for r in 0..R {
                        // SAFETY: row `r` of the group's `R` and block `b` of its `nb` (with
                        // `b + 1` where the mask reads it) lie inside `acts`, whose sizes the
                        // kernel's entry checked.
                        let (q, ad) = unsafe { pair(&$acts, $signed_weights, r * $nb + b, mask) };
                        let dot = if $signed_weights {
                            _mm512_dpbusd_epi32(init, q, w)
                        } else {
                            _mm512_dpbusd_epi32(init, w, q)
                        };
                        let scale = _mm512_mul_ps(d, ad);
                        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r]);
                    }
                }
            }
        };
    }

    /// Q4_1: the 16 packed bytes of each block are placed twice in a 256-bit half and the
    /// second copy shifted right by 4 (`vpsrlvq`), so one AND gives weights 0..16 then
    /// 16..32 of both blocks. The offset term `sum_b m_b s_b` is one FMA per row per 16
    /// blocks: the span's `m` are kept aside while its products run.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn q4_1<const R: usize>(weights: &[u8], nb: usize, acts: Acts<'_>, out: Columns) {
        let low = _mm512_set1_epi8(0x0f);
        let shift = _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0);
        let odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
        // `[d_b, m_b]` of the span's blocks, in order.
        let mut dm_kept = [0.0f32; 2 * SPAN];
        let n_out = weights.len() / (nb * 20);
        for o in 0..n_out {
            // SAFETY: row `o` of `n_out` lies inside `weights` (20 bytes a block).
            let row = unsafe { weights.as_ptr().add(o * nb * 20) };
            let (mut even, mut odd_pairs) = ([_mm512_setzero_ps(); R], [_mm512_setzero_ps(); R]);
            for span in (0..nb).step_by(SPAN) {
                let blocks = span..(span + SPAN).min(nb);
                let kept = dm_kept.as_mut_ptr();
                // Block `b` of the row, and `b + 1` where `two`: `b < nb`, and `two` only
                // where `b + 1 < nb`, so every read stays in the row's `nb` blocks.
                let weights = |b: usize, two: bool| {
                    // SAFETY: `b < nb`: inside the row (one past it where `b + 1 == nb`).
                    let (block, next) = unsafe { (row.add(b * 20), row.add(b * 20 + 20)) };
                    // [d_b, m_b, d_b+1, m_b+1] from four f16.
                    // SAFETY: a Q4_1 block starts with `d` and `m`, two f16.
                    let dm0 = unsafe { (block as *const i32).read_unaligned() };
                    let dm1 = if two {
                        // SAFETY: as for `dm0`, block `b + 1` being in the row where `two`.
                        unsafe { (next as *const i32).read_unaligned() }
                    } else {
                        0
                    };
                    let dm = _mm_cvtph_ps(_mm_set_epi32(0, 0, dm1, dm0));
                    // SAFETY: pairs start at even offsets in their span, so the four floats
                    // from `2 (b - span)` end at or before `2 SPAN`, the end of `dm_kept`.
                    unsafe { _mm_storeu_ps(kept.add(2 * (b - span)), dm) };
                    // SAFETY: the block's 16 packed bytes follow its 4 bytes of `d`, `m`.
                    let p0 = _mm256_broadcastsi128_si256(unsafe {
                        _mm_loadu_si128(block.add(4).cast())
                    });
                    let p1 = if two {
                        // SAFETY: as for `p0`, block `b + 1` being in the row where `two`.
                        let bytes = unsafe { _mm_loadu_si128(next.add(4).cast()) };
                        _mm256_broadcastsi128_si256(bytes)
                    } else {
                        _mm256_setzero_si256()
                    };
                    let packed = _mm512_inserti64x4(_mm512_castsi256_si512(p0), p1, 1);
                    let nibbles = _mm512_and_si512(_mm512_srlv_epi64(packed, shift), low);
                    (nibbles, spread(dm, 0, 2), _mm512_setzero_si512())
                };
                pairs!(acts, nb, blocks, even, odd_pairs, weights, false);
                for k in blocks.clone().step_by(16) {
                    let lanes = (((1u32 << (blocks.end - k).min(16)) - 1) & 0xffff) as u16;
                    // SAFETY: `k - span` is a multiple of 16 below `SPAN`: 32 floats of the
                    // `2 SPAN` kept.
                    let (lo, hi) = unsafe {
                        let at = dm_kept.as_ptr().add(2 * (k - span));
                        (_mm512_loadu_ps(at), _mm512_loadu_ps(at.add(16)))
                    };
                    let m = _mm512_maskz_permutex2var_ps(lanes, lo, odd, hi);
                    for r in 0..R {
                        // SAFETY: the mask reads the sums of blocks `k..blocks.end` of row `r`,
                        // inside `acts.s` (`R` rows of `nb`).
                        let s = unsafe {
                            _mm512_maskz_loadu_ps(lanes, acts.s.as_ptr().add(r * nb + k))
                        };
                        even[r] = _mm512_fmadd_ps(m, s, even[r]);
                    }
                }
            }
            for r in 0..R {
                let sum = _mm512_add_ps(even[r], odd_pairs[r]);
                // SAFETY: `o` is one of the weight rows and `r` one of the rows handed over.
                unsafe { out.write(o, r, _mm512_reduce_add_ps(sum)) };
            }
        }
    }

    /// Q8_0: signed weights times the activations offset to unsigned (`q + 128`), from
    /// `-128 * sum(w)` per lane: one `vpdpbusd` per pair computes that sum for all rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn q8_0<const R: usize>(weights: &[u8], nb: usize, acts: Acts<'_>, out: Columns) {
        let offset_bytes = _mm512_set1_epi8(-128);
        let n_out = weights.len() / (nb * 34);
        for o in 0..n_out {
            // SAFETY: row `o` of `n_out` lies inside `weights` (34 bytes a block).
            let row = unsafe { weights.as_ptr().add(o * nb * 34) };
            let (mut even, mut odd) = ([_mm512_setzero_ps(); R], [_mm512_setzero_ps(); R]);
            // Block `b` of the row, and `b + 1` where `two`: `b < nb`, and `two` only where
            // `b + 1 < nb`, so every read stays in the row's `nb` blocks.
            let weights = |b: usize, two: bool| {
                // SAFETY: `b < nb`: inside the row (one past it where `b + 1 == nb`).
                let (block, next) = unsafe { (row.add(b * 34), row.add(b * 34 + 34)) };
                // SAFETY: a Q8_0 block starts with its f16 scale.
                let d0 = unsafe { (block as *const u16).read_unaligned() } as i32;
                let d1 = if two {
                    // SAFETY: as for `d0`, block `b + 1` being in the row where `two`.
                    (unsafe { (next as *const u16).read_unaligned() }) as i32
                } else {
                    0
                };
                // [d_b, 0, d_b+1, 0]
                let d = spread(_mm_cvtph_ps(_mm_set_epi32(0, 0, d1, d0)), 0, 2);
                // SAFETY: the block's 32 weights follow its 2-byte scale.
                let w0 = unsafe { _mm256_loadu_si256(block.add(2).cast()) };
                let w1 = if two {
                    // SAFETY: as for `w0`, block `b + 1` being in the row where `two`.
                    unsafe { _mm256_loadu_si256(next.add(2).cast()) }
                } else {
                    _mm256_setzero_si256()
                };
                let w = _mm512_inserti64x4(_mm512_castsi256_si512(w0), w1, 1);
                let offset = _mm512_dpbusd_epi32(_mm512_setzero_si512(), offset_bytes, w);
                (w, d, _mm512_sub_epi32(_mm512_setzero_si512(), offset))
            };
            pairs!(acts, nb, (0..nb), even, odd, weights, true);
            for r in 0..R {
                let sum = _mm512_add_ps(even[r], odd[r]);
                // SAFETY: `o` is one of the weight rows and `r` one of the rows handed over.
                unsafe { out.write(o, r, _mm512_reduce_add_ps(sum)) };
            }
        }
    }
}
