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

use kvmerger_compress::HeadCache;
use rayon::prelude::*;

use crate::attention::{AttentionOptions, AttentionShape};

/// Rows widened at a time: 64 rows of a 64-wide head are 16 KiB of f32.
const BLOCK: usize = 64;

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
    attend_split(q, heads, shape, opts, rayon::current_num_threads())
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
    let mut exps =
        vec![
            0.0f32;
            if keep { group * parts.iter().map(|p| p.rows.len()).sum::<usize>() } else { 0 }
        ];
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
    let d = head.head_dim();
    let group = queries.len() / d;
    let n = rows.len();
    let scale = 1.0 / (d as f32).sqrt();
    let meta = &head.meta()[rows.clone()];
    let (keys, values) = (head.stored_keys(), head.stored_values());
    SCRATCH.with_borrow_mut(|Scratch { scores, block }| {
        scores.resize(group * n, 0.0);
        // Logits: each key row is read once for the whole group.
        for start in rows.clone().step_by(BLOCK) {
            let end = (start + BLOCK).min(rows.end);
            let block = keys.widen_block(start * d..end * d, block);
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
                *s = (*s - max).exp();
                sum += *s;
            }
            (maxima[g], sums[g]) = (max, sum);
        }
        // Weighted values: each value row is read once for the whole group.
        weighted.fill(0.0);
        for start in rows.clone().step_by(BLOCK) {
            let end = (start + BLOCK).min(rows.end);
            let block = values.widen_block(start * d..end * d, block);
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
    });
}

/// `a . b`, in eight independent lanes so the compiler vectorises it.
#[inline]
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
