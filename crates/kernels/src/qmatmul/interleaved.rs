//! The weight layout and kernels for batched decode on AVX-512 VNNI, after llama.cpp's
//! repacked quantized types: runs of [`ROWS`] weight rows are stored block by block, with the
//! same value positions of the 16 rows side by side, so that one `vpdpbusd` multiplies four
//! weights of each of 16 rows by the same four activation bytes (broadcast), and every float
//! instruction scales and adds 16 different outputs.
//!
//! In the row-major GGUF layout ([`super::avx512`]) a 512-bit vector holds two blocks of one
//! row; its 16 sums belong to two outputs, so each activation row pays a conversion, a scale
//! product and an FMA per two blocks, and the weights take about nine instructions per two
//! blocks to unpack. Here an activation row pays per block and 16 outputs eight `vpdpbusd`
//! and four or five other instructions, and unpacking takes about one instruction per block
//! and weight row: batched rows cost less each, and one row is closer to reading memory.
//!
//! Layout, per run of 16 rows, per block `b`, `16 * block_bytes` bytes:
//! - Q4_1: the 16 scales `d` (f16), the 16 offsets `m` (f16), then four 64-byte vectors; in
//!   vector `j`, bytes `4i..4i + 4` are row `i`'s packed bytes `4j..4j + 4` (whose low
//!   nibbles are values `4j..4j + 4`, high nibbles values `16 + 4j..`).
//! - Q8_0: the 16 scales `d` (f16), then eight 64-byte vectors; in vector `j`, bytes
//!   `4i..4i + 4` are row `i`'s values `4j..4j + 4`, plus 128 (unsigned, as `vpdpbusd`
//!   takes its first operand; the activations' per-block `-128 * sum(q)` takes it back).
//!
//! Each output is still one kernel call's sum over its own activation row, so a row's result
//! does not depend on the other rows of a batch.

use super::QuantKind;

/// Weight rows stored side by side: the f32 lanes of a 512-bit vector.
pub(super) const ROWS: usize = 16;

/// Whether this CPU runs the kernels (the layout is only chosen where it does).
pub(super) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::avx512::available()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the layout and its kernels exist for `kind` (Q4_1, Q8_0).
pub(super) fn reads(kind: QuantKind) -> bool {
    matches!(kind, QuantKind::Q4_1 | QuantKind::Q8_0)
}

/// Bytes of a block's scales (`d`, and Q4_1's `m`), which lead it in both layouts.
fn scale_bytes(kind: QuantKind) -> usize {
    match kind {
        QuantKind::Q4_1 => 4,
        QuantKind::Q8_0 => 2,
        other => unreachable!("no interleaved layout for {other:?}"),
    }
}

/// Moves GGUF row-major blocks (`[out_dim, nb]` blocks of `kind`, `out_dim` a multiple of
/// [`ROWS`]) into the interleaved layout, or back with `to_interleaved` false.
pub(super) fn rearrange(kind: QuantKind, nb: usize, from: &[u8], to_interleaved: bool) -> Vec<u8> {
    let bb = kind.block_bytes();
    let (head, values) = (scale_bytes(kind), bb - scale_bytes(kind));
    // Q8_0 values are stored plus 128: XOR with 0x80, its own inverse, both ways.
    let flip = if kind == QuantKind::Q8_0 { 0x80 } else { 0 };
    let mut to = vec![0u8; from.len()];
    for run in 0..from.len() / (ROWS * nb * bb) {
        for b in 0..nb {
            let packed = (run * nb + b) * ROWS * bb;
            for i in 0..ROWS {
                let row = ((run * ROWS + i) * nb + b) * bb;
                // (row-major offset, interleaved offset, length, XOR) of each piece of the block.
                let scales =
                    (0..head / 2).map(|k| (row + 2 * k, packed + 2 * (k * ROWS + i), 2, 0));
                let words = (0..values / 4)
                    .map(|j| (row + head + 4 * j, packed + ROWS * head + 64 * j + 4 * i, 4, flip));
                for (r, p, len, xor) in scales.chain(words) {
                    let (src, dst) = if to_interleaved { (r, p) } else { (p, r) };
                    let pairs = to[dst..dst + len].iter_mut().zip(&from[src..src + len]);
                    pairs.for_each(|(t, f)| *t = f ^ xor);
                }
            }
        }
    }
    to
}

/// The kernel for `kind`, one that [`reads`].
#[cfg(target_arch = "x86_64")]
pub(super) fn kernel(kind: QuantKind) -> super::Kernel {
    match kind {
        QuantKind::Q4_1 => kernels::q4_1,
        QuantKind::Q8_0 => kernels::q8_0,
        other => unreachable!("no interleaved kernel for {other:?}"),
    }
}

// Row indices address several per-row arrays at once.
#[allow(clippy::needless_range_loop)]
#[cfg(target_arch = "x86_64")]
mod kernels {
    use std::arch::x86_64::*;

    use super::ROWS;
    use crate::qmatmul::{Acts, Columns, QuantKind, BLOCK, LANES};

    /// How far ahead the weights are prefetched, in bytes.
    const PREFETCH: usize = 8192;

    kernel_by_rows!(q4_1, q4_1_rows, Q4_1, ROWS, super::available);
    kernel_by_rows!(q8_0, q8_0_rows, Q8_0, ROWS, super::available);

    /// The four activation bytes from byte `at` in every 32-bit lane.
    #[target_feature(enable = "avx512f")]
    #[inline]
    ///
    /// # Safety
    /// The four bytes from `bytes + at` are readable.
    unsafe fn broadcast(bytes: *const u8, at: usize) -> __m512i {
        // SAFETY: the caller's promise; the read is unaligned.
        _mm512_set1_epi32(unsafe { (bytes.add(at) as *const i32).read_unaligned() })
    }

    /// Block `b` of run `run` (`bb` bytes a row's block): its address, its weights
    /// [`PREFETCH`] bytes on asked for, and its 16 scales `d`. The prefetch: with several
    /// rows' arithmetic per block, the out-of-order window holds too few blocks to keep
    /// enough of memory's reads in flight by itself.
    ///
    /// # Safety
    /// The CPU has AVX-512F and F16C; `weights` holds run `run`'s `nb` blocks of 16 rows.
    #[target_feature(enable = "avx512f,f16c")]
    #[inline]
    unsafe fn block_start(
        weights: &[u8],
        run: usize,
        nb: usize,
        b: usize,
        bb: usize,
    ) -> (*const u8, __m512) {
        // SAFETY: block `b` of run `run` lies inside `weights` (the caller's promise).
        let block = unsafe { weights.as_ptr().add((run * nb + b) * ROWS * bb) };
        crate::cpu::prefetch(block.wrapping_add(PREFETCH), ROWS * bb);
        // SAFETY: an interleaved block starts with its 16 rows' f16 scales, 32 bytes.
        (block, _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(block.cast()) }))
    }

    /// Writes the 16 outputs of `acc` to rows `r` and columns `o..o + 16`.
    ///
    /// # Safety
    /// The CPU has AVX-512F; row `r` and columns `o..o + 16` are the caller's to write.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn store(out: Columns, o: usize, r: usize, acc: __m512) {
        // SAFETY: the caller's promise covers the 16 columns written.
        unsafe { _mm512_storeu_ps(out.at_mut(o, r), acc) }
    }

    /// Q4_1: per block, four vectors of packed bytes give eight of nibbles (AND, and shift
    /// then AND); each activation row takes them in two chains of four `vpdpbusd` (unsigned
    /// nibbles times broadcast signed activations), then `sum * d * d_x + m * s_x` for the 16
    /// rows. Two chains, not one: the out-of-order window does not hide a chain of eight
    /// (about 40 cycles). In a copy of this loop with the weights in cache, a block took
    /// about 36 cycles at four rows and 15 at one, against 42 and 17 with one chain.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    unsafe fn q4_1_rows<const R: usize>(weights: &[u8], nb: usize, acts: Acts<'_>, out: Columns) {
        let low = _mm512_set1_epi8(0x0f);
        let bb = QuantKind::Q4_1.block_bytes();
        let qs = acts.qs.as_ptr().cast::<u8>();
        for run in 0..weights.len() / (ROWS * nb * bb) {
            let mut acc = [_mm512_setzero_ps(); R];
            for b in 0..nb {
                // SAFETY: `run` and `b` count the runs and blocks `weights` holds.
                let (block, d) = unsafe { block_start(weights, run, nb, b, bb) };
                // SAFETY: a Q4_1 run block is 16 scales, 16 offsets (32 bytes each), then
                // 256 bytes of nibbles: every read below lies inside it.
                let m = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(block.add(32).cast()) });
                let mut nibbles = [_mm512_setzero_si512(); 8];
                for j in 0..4 {
                    // SAFETY: bytes `64 + 64 j..128 + 64 j` of the block, as above.
                    let packed = unsafe { _mm512_loadu_si512(block.add(64 + 64 * j).cast()) };
                    nibbles[j] = _mm512_and_si512(packed, low);
                    nibbles[4 + j] = _mm512_and_si512(_mm512_srli_epi16::<4>(packed), low);
                }
                for r in 0..R {
                    let at = (r * nb + b) * BLOCK;
                    let (mut lo, mut hi) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                    for j in 0..4 {
                        // SAFETY: `acts` holds `R` rows of `nb` blocks of 32 bytes (checked by
                        // the kernel's entry), so bytes `at..at + 32` are this block's.
                        let (x_lo, x_hi) =
                            unsafe { (broadcast(qs, at + 4 * j), broadcast(qs, at + 16 + 4 * j)) };
                        lo = _mm512_dpbusd_epi32(lo, nibbles[j], x_lo);
                        hi = _mm512_dpbusd_epi32(hi, nibbles[4 + j], x_hi);
                    }
                    let sum = _mm512_cvtepi32_ps(_mm512_add_epi32(lo, hi));
                    // SAFETY: `acts.d` holds `LANES` scales per block of the `R` rows.
                    let dx = _mm512_set1_ps(unsafe { *acts.d.get_unchecked((r * nb + b) * LANES) });
                    // SAFETY: `acts.s` holds one sum per block of the `R` rows.
                    let sx = _mm512_set1_ps(unsafe { *acts.s.get_unchecked(r * nb + b) });
                    acc[r] = _mm512_fmadd_ps(sum, _mm512_mul_ps(d, dx), acc[r]);
                    acc[r] = _mm512_fmadd_ps(m, sx, acc[r]);
                }
            }
            for r in 0..R {
                // SAFETY: the run's 16 weight rows are columns the caller handed over.
                unsafe { store(out, run * ROWS, r, acc[r]) };
            }
        }
    }

    /// Q8_0: the weights stored plus 128 (unsigned) times the signed activations, each row's
    /// block sum started from the activations' `-128 * sum(q)`, in two chains of four
    /// `vpdpbusd` per activation row (as in [`q4_1_rows`]), then `sum * d * d_x` for the 16
    /// rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    unsafe fn q8_0_rows<const R: usize>(weights: &[u8], nb: usize, acts: Acts<'_>, out: Columns) {
        let bb = QuantKind::Q8_0.block_bytes();
        let qs = acts.qs.as_ptr().cast::<u8>();
        for run in 0..weights.len() / (ROWS * nb * bb) {
            let mut acc = [_mm512_setzero_ps(); R];
            for b in 0..nb {
                // SAFETY: `run` and `b` count the runs and blocks `weights` holds.
                let (block, d) = unsafe { block_start(weights, run, nb, b, bb) };
                let mut w = [_mm512_setzero_si512(); 8];
                for (j, w) in w.iter_mut().enumerate() {
                    // SAFETY: a Q8_0 run block is 16 scales (32 bytes), then 512 bytes of
                    // weights: bytes `32 + 64 j..96 + 64 j` lie inside it.
                    *w = unsafe { _mm512_loadu_si512(block.add(32 + 64 * j).cast()) };
                }
                for r in 0..R {
                    let at = (r * nb + b) * BLOCK;
                    // SAFETY: `acts.offsets` holds one offset per block of the `R` rows.
                    let offset = unsafe { *acts.offsets.get_unchecked(r * nb + b) };
                    let (mut first, mut second) =
                        (_mm512_set1_epi32(offset), _mm512_setzero_si512());
                    for j in 0..4 {
                        // SAFETY: `acts` holds `R` rows of `nb` blocks of 32 bytes (checked by
                        // the kernel's entry), so bytes `at..at + 32` are this block's.
                        let (x_lo, x_hi) =
                            unsafe { (broadcast(qs, at + 4 * j), broadcast(qs, at + 16 + 4 * j)) };
                        first = _mm512_dpbusd_epi32(first, w[j], x_lo);
                        second = _mm512_dpbusd_epi32(second, w[4 + j], x_hi);
                    }
                    let sum = _mm512_cvtepi32_ps(_mm512_add_epi32(first, second));
                    // SAFETY: `acts.d` holds `LANES` scales per block of the `R` rows.
                    let dx = _mm512_set1_ps(unsafe { *acts.d.get_unchecked((r * nb + b) * LANES) });
                    acc[r] = _mm512_fmadd_ps(sum, _mm512_mul_ps(d, dx), acc[r]);
                }
            }
            for r in 0..R {
                // SAFETY: the run's 16 weight rows are columns the caller handed over.
                unsafe { store(out, run * ROWS, r, acc[r]) };
            }
        }
    }
}
