//! Attention of one new query per sequence (a decode step) over its ragged cache.
//!
//! Memory-bound: every key and value row is read once for all the query heads of its group,
//! widened to f32 a block of [`BLOCK`] rows at a time (the block stays in L1 with the
//! group's queries and partial outputs). A long head is split into parts that run on
//! different threads (flash-decoding): each part returns its own maximum logit, sum of
//! exponentials and weighted values, and the parts are combined exactly, so a model with
//! fewer kv heads than threads still uses them all. The accumulated attention statistic is
//! the exact softmax, rescaled from each part's exponentials.

use std::cell::RefCell;
use std::ops::Range;

use kvmerger_compress::{HeadCache, RowsRef};
use rayon::prelude::*;

use crate::attention::{AttentionOptions, AttentionShape};

/// Rows widened at a time: 64 rows of a 64-wide head are 16 KiB of f32.
const BLOCK: usize = 64;

/// Threads the parts are sized for, whatever the pool holds: the split (and so the rounding
/// of the combined result) depends on sizes only, and a decode step gives the same result
/// on one thread or many (see `threads.rs`).
const SPLIT_THREADS: usize = 8;

/// Fewest entries worth a task of their own: below this, splitting costs more than it saves.
const MIN_PART: usize = 256;

/// One part of one kv head's entries.
#[derive(Debug, Clone)]
struct Part {
    head: usize,
    rows: Range<usize>,
}

/// Per-thread buffers, reused across steps so a decode step allocates no per-part memory.
#[derive(Default)]
struct Scratch {
    /// `[group, part rows]`: logits, then exponentials.
    scores: Vec<f32>,
    /// `[BLOCK, head_dim]`: widened keys or values.
    block: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// The attention of one query per head over `heads`, whose last entry is that query's own
/// key (every entry is visible). `q`: `[n_heads, head_dim]`, rotated. Returns
/// `[n_heads, head_dim]`. Accumulates `opts.stats.accumulated` into the entries' metadata;
/// prompt-only statistics (windows, evictions) are not computed here.
pub(crate) fn attend_one(
    q: &[f32],
    heads: &mut [HeadCache],
    shape: AttentionShape,
    opts: AttentionOptions,
) -> Vec<f32> {
    attend_split(q, heads, shape, opts, SPLIT_THREADS)
}

/// [`attend_one`] with parts sized for `threads` threads.
fn attend_split(
    q: &[f32],
    heads: &mut [HeadCache],
    shape: AttentionShape,
    opts: AttentionOptions,
    threads: usize,
) -> Vec<f32> {
    let AttentionShape { n_heads, n_kv_heads, head_dim: d } = shape;
    let group = n_heads / n_kv_heads;
    let parts = split(heads, threads);
    // Per part: [group] maxima, [group] sums, [group, d] weighted values.
    let stride = group * (d + 2);
    let mut partials = vec![0.0f32; parts.len() * stride];
    let keep = opts.stats.accumulated;
    // Per part, `[group, part rows]` exponentials, kept for the attention statistic.
    let kept = if keep { group * parts.iter().map(|p| p.rows.len()).sum::<usize>() } else { 0 };
    let mut exps = vec![0.0f32; kept];
    let mut exps_of_parts: Vec<&mut [f32]> = Vec::with_capacity(parts.len());
    let mut rest = exps.as_mut_slice();
    for part in &parts {
        let n = if keep { group * part.rows.len() } else { 0 };
        let (mine, more) = std::mem::take(&mut rest).split_at_mut(n);
        exps_of_parts.push(mine);
        rest = more;
    }
    let heads_read: &[HeadCache] = heads;
    parts.par_iter().zip(partials.par_chunks_mut(stride)).zip(exps_of_parts).for_each(
        |((part, partial), exps)| {
            let queries = &q[part.head * group * d..(part.head + 1) * group * d];
            let head = &heads_read[part.head];
            let exps = keep.then_some(exps);
            attend_part(queries, head, part.rows.clone(), opts.log_count_bias, partial, exps);
        },
    );

    let mut out = vec![0.0f32; n_heads * d];
    let mut first = 0;
    let mut exps_at = 0;
    for (h, head) in heads.iter_mut().enumerate() {
        let count = parts[first..].iter().take_while(|p| p.head == h).count();
        let mine = &partials[first * stride..(first + count) * stride];
        // Per query head of the group: the largest maximum, and the softmax denominator.
        let mut scale = vec![0.0f32; count * group];
        for g in 0..group {
            let max = mine.chunks_exact(stride).map(|p| p[g]).fold(f32::NEG_INFINITY, f32::max);
            let total: f32 =
                mine.chunks_exact(stride).map(|p| p[group + g] * (p[g] - max).exp()).sum();
            let o = &mut out[(h * group + g) * d..][..d];
            for (i, p) in mine.chunks_exact(stride).enumerate() {
                let s = (p[g] - max).exp() / total;
                scale[i * group + g] = s;
                let values = &p[2 * group + g * d..][..d];
                o.iter_mut().zip(values).for_each(|(o, v)| *o += s * v);
            }
        }
        if keep {
            let inv_group = 1.0 / group as f32;
            for (i, part) in parts[first..first + count].iter().enumerate() {
                let n = part.rows.len();
                let e = &exps[exps_at..exps_at + group * n];
                exps_at += group * n;
                let meta = &mut head.meta_mut()[part.rows.clone()];
                for g in 0..group {
                    let s = scale[i * group + g] * inv_group;
                    let row = &e[g * n..(g + 1) * n];
                    meta.iter_mut().zip(row).for_each(|(m, e)| m.attention += s * e);
                }
            }
        }
        first += count;
    }
    out
}

/// Splits every head's entries into parts, about two per thread in all, none shorter than
/// [`MIN_PART`] (unless the head is), each a whole number of blocks but the last.
fn split(heads: &[HeadCache], threads: usize) -> Vec<Part> {
    let per_head = (2 * threads).div_ceil(heads.len().max(1)).max(1);
    let mut parts = Vec::with_capacity(heads.len() * per_head);
    for (head, cache) in heads.iter().enumerate() {
        let n = cache.len();
        let len = n.div_ceil(per_head).max(MIN_PART).next_multiple_of(BLOCK);
        let mut start = 0;
        while start < n {
            let end = (start + len).min(n);
            parts.push(Part { head, rows: start..end });
            start = end;
        }
    }
    parts
}

/// One part's softmax pieces for the `group` queries of one kv head.
///
/// `queries`: `[group, d]`. Writes `partial` = `[group]` maxima, `[group]` sums of
/// `exp(logit - max)`, `[group, d]` values weighted by those exponentials; and, if given,
/// the exponentials themselves into `exps`, `[group, rows]`.
fn attend_part(
    queries: &[f32],
    head: &HeadCache,
    rows: Range<usize>,
    log_count_bias: bool,
    partial: &mut [f32],
    exps: Option<&mut [f32]>,
) {
    SCRATCH.with_borrow_mut(|scratch| {
        let part = PartInput { queries, head, rows, log_count_bias };
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            // SAFETY: the CPU has the features this copy is compiled for.
            return unsafe { part_kernel_avx2(part, partial, exps, scratch) };
        }
        part_kernel(part, partial, exps, scratch, false)
    })
}

/// What [`attend_part`] reads.
struct PartInput<'a> {
    queries: &'a [f32],
    head: &'a HeadCache,
    rows: Range<usize>,
    log_count_bias: bool,
}

/// [`part_kernel`] compiled for AVX2, FMA and F16C (the build targets baseline x86-64,
/// whose vectors are half as wide, with no fused multiply-add and no f16 conversion).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn part_kernel_avx2(
    part: PartInput<'_>,
    partial: &mut [f32],
    exps: Option<&mut [f32]>,
    scratch: &mut Scratch,
) {
    part_kernel(part, partial, exps, scratch, true)
}

/// Rows `range` of `rows` in f32, in `scratch` unless stored in f32. With `f16c` (only in
/// [`part_kernel_avx2`]), f16 rows convert inline, 8 per instruction: `half`'s slice
/// conversion makes one call per 8 elements, which costs more than the dot products.
#[inline(always)]
fn widen<'s>(
    rows: RowsRef<'s>,
    range: Range<usize>,
    scratch: &'s mut Vec<f32>,
    f16c: bool,
) -> &'s [f32] {
    #[cfg(target_arch = "x86_64")]
    if let (true, RowsRef::F16(v)) = (f16c, rows) {
        scratch.resize(range.len(), 0.0);
        // SAFETY: `f16c` is only true in the copy compiled for (and run on) F16C.
        unsafe { widen_f16c(&v[range], scratch) };
        return scratch;
    }
    let _ = f16c;
    rows.widen_block(range, scratch)
}

/// `dst = src` widened with F16C's 8-wide conversion.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
#[inline]
unsafe fn widen_f16c(src: &[half::f16], dst: &mut [f32]) {
    use std::arch::x86_64::{_mm256_cvtph_ps, _mm256_storeu_ps, _mm_loadu_si128};
    let (chunks, tail) = (src.chunks_exact(8), src.len() / 8 * 8);
    for (s, d) in chunks.zip(dst.chunks_exact_mut(8)) {
        // SAFETY: `s` holds 8 f16 (16 bytes) and `d` 8 f32 (32 bytes); both unaligned.
        unsafe {
            _mm256_storeu_ps(d.as_mut_ptr(), _mm256_cvtph_ps(_mm_loadu_si128(s.as_ptr().cast())))
        };
    }
    for (s, d) in src[tail..].iter().zip(&mut dst[tail..]) {
        *d = s.to_f32();
    }
}

/// The body of [`attend_part`], inlined into each compiled copy.
#[inline(always)]
fn part_kernel(
    part: PartInput<'_>,
    partial: &mut [f32],
    exps: Option<&mut [f32]>,
    Scratch { scores, block }: &mut Scratch,
    f16c: bool,
) {
    let PartInput { queries, head, rows, log_count_bias } = part;
    let d = head.head_dim();
    let group = queries.len() / d;
    let n = rows.len();
    let scale = 1.0 / (d as f32).sqrt();
    let meta = &head.meta()[rows.clone()];
    let (keys, values) = (head.stored_keys(), head.stored_values());
    {
        scores.resize(group * n, 0.0);
        // Logits: each key row is read once for the whole group.
        for start in rows.clone().step_by(BLOCK) {
            let end = (start + BLOCK).min(rows.end);
            let block = widen(keys, start * d..end * d, block, f16c);
            for (r, key) in block.chunks_exact(d).enumerate() {
                let j = start - rows.start + r;
                let bias = if log_count_bias { (meta[j].count.max(1) as f32).ln() } else { 0.0 };
                for (g, query) in queries.chunks_exact(d).enumerate() {
                    scores[g * n + j] = dot(query, key) * scale + bias;
                }
            }
        }
        let (maxima, rest) = partial.split_at_mut(group);
        let (sums, weighted) = rest.split_at_mut(group);
        for g in 0..group {
            let row = &mut scores[g * n..(g + 1) * n];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for s in row.iter_mut() {
                *s = exp_nonpositive(*s - max);
                sum += *s;
            }
            (maxima[g], sums[g]) = (max, sum);
        }
        // Weighted values: each value row is read once for the whole group.
        weighted.fill(0.0);
        for start in rows.clone().step_by(BLOCK) {
            let end = (start + BLOCK).min(rows.end);
            let block = widen(values, start * d..end * d, block, f16c);
            for (r, value) in block.chunks_exact(d).enumerate() {
                let j = start - rows.start + r;
                for (g, out) in weighted.chunks_exact_mut(d).enumerate() {
                    let w = scores[g * n + j];
                    out.iter_mut().zip(value).for_each(|(o, v)| *o += w * v);
                }
            }
        }
        if let Some(exps) = exps {
            exps.copy_from_slice(&scores[..group * n]);
        }
    }
}

/// `e^x` for `x <= 0` to about 2 ulp, branch-free so a loop of it vectorises (the libm call
/// does not, and would cost more than the dot products). Below -87 it returns about
/// `e^-87` (1.6e-38) instead of smaller: nothing next to the softmax's largest term, 1.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // Adding 1.5 * 2^23 rounds to an integer, which the low mantissa bits then hold.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.max(-87.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    // x = n ln2 + r, |r| <= ln2 / 2, with ln2 split so n ln2 is exact.
    let r = x - n * LN2_HI - n * LN2_LO;
    // Cephes' expf polynomial for e^r.
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    // 2^n: the exponent field n + 127 (n in -126..=0), from t's low mantissa bits.
    let two_n = f32::from_bits(t.to_bits().wrapping_add(127) << 23);
    er * two_n
}

/// `a . b`, in eight independent lanes so the compiler vectorises it.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    let mut lanes = [0.0f32; 8];
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use kvmerger_compress::{EntryMeta, KvDtype, StatsRequest};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::attention::attend_chunks;

    const SHAPE: AttentionShape = AttentionShape { n_heads: 6, n_kv_heads: 2, head_dim: 16 };

    /// Ragged heads (`lens` entries each) of random rows in `dtype`, some merged entries.
    fn heads(lens: &[usize], dtype: KvDtype, seed: u64) -> Vec<HeadCache> {
        let mut rng = StdRng::seed_from_u64(seed);
        let d = SHAPE.head_dim;
        lens.iter()
            .map(|&n| {
                let mut h = HeadCache::new(d, dtype);
                for i in 0..n {
                    let k: Vec<f32> = (0..d).map(|_| rng.random_range(-2.0..2.0)).collect();
                    let v: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
                    h.push(
                        &k,
                        &v,
                        EntryMeta { position: i, count: 1 + (i % 3) as u32, attention: 0.0 },
                    );
                }
                h
            })
            .collect()
    }

    fn query(seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..SHAPE.n_heads * SHAPE.head_dim).map(|_| rng.random_range(-2.0..2.0)).collect()
    }

    fn opts(log_count_bias: bool) -> AttentionOptions {
        AttentionOptions { chunk: 8, stats: StatsRequest::accumulated(), log_count_bias }
    }

    fn attention(heads: &[HeadCache]) -> Vec<f32> {
        heads.iter().flat_map(|h| h.meta().iter().map(|m| m.attention)).collect()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// Split into several parts per head (ragged lengths, a tail shorter than a block), the
    /// kernel gives the explicit softmax's outputs and statistics, in every dtype.
    #[test]
    fn the_fast_exponential_matches_the_standard_one() {
        for i in 0..87_000 {
            let x = -(i as f32) * 1e-3;
            let (fast, exact) = (exp_nonpositive(x), x.exp());
            assert!((fast - exact).abs() <= 4.0 * f32::EPSILON * exact, "{x}: {fast} vs {exact}");
        }
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(-1e4) < 2e-38 && exp_nonpositive(f32::NEG_INFINITY) < 2e-38);
    }

    #[test]
    fn split_parts_combine_to_the_explicit_softmax() {
        for dtype in KvDtype::ALL {
            for bias in [false, true] {
                let mut split_heads = heads(&[1000, 77], dtype, 3);
                let mut reference = split_heads.clone();
                let q = query(4);
                assert_eq!(split(&split_heads, 4).len(), 5, "the 1000-entry head in 4 parts");
                let out = attend_split(&q, &mut split_heads, SHAPE, opts(bias), 4);
                let expected = attend_chunks(&q, 1, &mut reference, SHAPE, opts(bias));
                assert!(max_diff(&out, &expected) < 1e-5, "{dtype} bias {bias}");
                assert!(max_diff(&attention(&split_heads), &attention(&reference)) < 1e-6);
                let total: f32 = attention(&split_heads).iter().sum();
                assert!((total - SHAPE.n_kv_heads as f32).abs() < 1e-4, "each head's sums to 1");
            }
        }
    }

    /// An f16 (bf16) cache holding the same rows as an f32 one attends within the rounding of
    /// its keys and values: f16 rounds to 2^-11 relative, bf16 to 2^-8.
    #[test]
    fn half_precision_caches_agree_with_f32() {
        let q = query(9);
        let mut wide = heads(&[600, 600], KvDtype::F32, 5);
        let expected = attend_one(&q, &mut wide, SHAPE, opts(false));
        for (dtype, tolerance) in [(KvDtype::F16, 5e-3), (KvDtype::Bf16, 4e-2)] {
            let mut narrow = heads(&[600, 600], dtype, 5);
            let out = attend_one(&q, &mut narrow, SHAPE, opts(false));
            let diff = max_diff(&out, &expected);
            assert!(diff < tolerance, "{dtype}: {diff}");
        }
    }
}
