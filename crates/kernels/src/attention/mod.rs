//! Causal attention of a block of new queries over ragged per-head caches, with the
//! attention statistics compression methods ask for.
//!
//! The softmax is computed explicitly, one chunk of queries at a time, so memory stays
//! `O(chunk x cache_len)` instead of `O(n^2)` and the probabilities are there to be summed.
//! Query heads are mapped to kv heads as in grouped-query attention: query head `h` reads
//! kv head `h / group`. Statistics are the mean over the query heads of a group.
//!
//! The cache may store keys and values narrower than f32 (see [`kvmerger_compress::KvDtype`]);
//! attention widens what it reads and accumulates in f32. A prefill chunk widens the keys and
//! values it sees once; a decode step (one query per sequence) goes to [`decode`],
//! which widens small blocks and splits long heads across threads.

use kvmerger_compress::{EvictionWindow, HeadCache};
use rayon::prelude::*;

mod decode;
#[cfg(target_arch = "x86_64")]
mod lanes;
mod shape;

use decode::attend_one;
pub use decode::dot;
pub use shape::{AttentionOptions, AttentionShape};

/// Attention of `seq` new queries over heads whose last `seq` entries are those queries'
/// own keys. Query `i` sees every entry up to and including its own (`base + i`), where
/// `base = head.len() - seq`: the mask is built from physical indices, whatever the
/// logical positions are.
///
/// `q`: `[seq, n_heads, head_dim]`, already rotated. Returns `[seq, n_heads, head_dim]`.
/// Accumulates statistics into `heads[h].meta_mut()[j].attention` and, for each window `w`
/// of `opts.stats`, into `heads[h].window_attention(w)`, and for each eviction window `e`
/// into `heads[h].eviction_attention(e)`, as `opts.stats` asks.
pub fn attend(
    q: &[f32],
    seq: usize,
    heads: &mut [HeadCache],
    shape: AttentionShape,
    opts: AttentionOptions,
) -> Vec<f32> {
    let mut out = vec![0.0f32; q.len()];
    attend_into(q, seq, heads, shape, opts, &mut out);
    out
}

/// [`attend`] into `out`, `[seq, n_heads, head_dim]` (overwritten): the decode path's form,
/// which allocates nothing per call once its per-thread buffers have grown.
pub fn attend_into(
    q: &[f32],
    seq: usize,
    heads: &mut [HeadCache],
    shape: AttentionShape,
    opts: AttentionOptions,
    out: &mut [f32],
) {
    let AttentionShape { n_heads, n_kv_heads, head_dim } = shape;
    assert_eq!(heads.len(), n_kv_heads);
    assert_eq!(q.len(), seq * n_heads * head_dim);
    assert_eq!(out.len(), q.len(), "one output row per query row");
    if seq == 1 && opts.stats.windows.is_empty() && opts.stats.evictions.is_empty() {
        return attend_one(q, heads, shape, opts, out);
    }
    attend_chunks(q, seq, heads, shape, opts, out);
}

/// [`attend_into`] one chunk of queries at a time, whatever `seq` is (the decode kernel's
/// reference in tests). Every row of `out` is written.
pub(crate) fn attend_chunks(
    q: &[f32],
    seq: usize,
    heads: &mut [HeadCache],
    shape: AttentionShape,
    opts: AttentionOptions,
    out: &mut [f32],
) {
    let AttentionShape { n_heads, n_kv_heads, head_dim } = shape;
    let group = n_heads / n_kv_heads;
    let chunk = opts.chunk.max(1);
    let n_chunks = seq.div_ceil(chunk);

    let tasks: Vec<(usize, usize)> =
        (0..n_kv_heads).flat_map(|h| (0..n_chunks).map(move |c| (h, c))).collect();
    let results: Vec<ChunkResult> = tasks
        .par_iter()
        .map(|&(h, c)| {
            let start = c * chunk;
            let end = (start + chunk).min(seq);
            attend_chunk(q, &heads[h], seq, start..end, h, shape, group, opts)
        })
        .collect();

    for (&(h, c), res) in tasks.iter().zip(results) {
        let start = c * chunk;
        let rows = res.out.chunks_exact(head_dim);
        for (r, row) in rows.enumerate() {
            let (i, g) = (start + r / group, r % group);
            let qh = h * group + g;
            out[(i * n_heads + qh) * head_dim..][..head_dim].copy_from_slice(row);
        }
        let head = &mut heads[h];
        if let Some(acc) = res.accumulated {
            for (m, a) in head.meta_mut().iter_mut().zip(acc) {
                m.attention += a;
            }
        }
        for (window, received) in res.windows {
            add(head.window_attention_mut(window), &received);
        }
        for (eviction, received, targets) in res.evictions {
            let (head_received, head_targets) = head.eviction_attention_mut(eviction);
            add(head_received, &received);
            add(head_targets, &targets);
        }
    }
}

fn add(total: &mut [f32], part: &[f32]) {
    total.iter_mut().zip(part).for_each(|(t, p)| *t += p);
}

struct ChunkResult {
    /// `[rows, head_dim]`, rows ordered `(query, head-in-group)`.
    out: Vec<f32>,
    accumulated: Option<Vec<f32>>,
    /// `(window, [visible])` for each window some query of the chunk falls in.
    windows: Vec<(usize, Vec<f32>)>,
    /// `(eviction, received [visible], targets [visible])` for each eviction window.
    evictions: Vec<(EvictionWindow, Vec<f32>, Vec<f32>)>,
}

#[allow(clippy::too_many_arguments)]
fn attend_chunk(
    q: &[f32],
    head: &HeadCache,
    seq: usize,
    queries: std::ops::Range<usize>,
    h: usize,
    shape: AttentionShape,
    group: usize,
    opts: AttentionOptions,
) -> ChunkResult {
    let d = shape.head_dim;
    let base = head.len() - seq;
    let rows = queries.len() * group;
    // Keys visible to the last query of the chunk; earlier queries mask the tail.
    let visible = base + queries.end;

    // [rows, head_dim]: the group's query heads, gathered contiguously.
    let mut qs = Vec::with_capacity(rows * d);
    for i in queries.clone() {
        let off = (i * shape.n_heads + h * group) * d;
        qs.extend_from_slice(&q[off..off + group * d]);
    }

    // [visible, d] each, in f32 (borrowed when the cache is f32).
    let keys = head.stored_keys().widen(0..visible * d);
    let values = head.stored_values().widen(0..visible * d);

    // [rows, visible] = Q K^T / sqrt(d)
    let mut scores = vec![0.0f32; rows * visible];
    let scale = 1.0 / (d as f32).sqrt();
    // SAFETY: every pointer covers the extent described by its dimensions and strides:
    // scores is rows x visible (row stride visible), qs is rows x d, keys hold visible rows of d.
    unsafe {
        gemm::gemm(
            rows,
            visible,
            d,
            scores.as_mut_ptr(),
            1,
            visible as isize,
            false,
            qs.as_ptr(),
            1,
            d as isize,
            keys.as_ptr(),
            d as isize,
            1,
            0.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }

    let meta = head.meta();
    let bias: Option<Vec<f32>> = opts
        .log_count_bias
        .then(|| meta[..visible].iter().map(|m| (m.count.max(1) as f32).ln()).collect());
    let mut accumulated = opts.stats.accumulated.then(|| vec![0.0f32; visible]);
    // `(first query of the window, window, [visible])` for each window this chunk reaches.
    let mut windows: Vec<(usize, usize, Vec<f32>)> = opts
        .stats
        .windows
        .iter()
        .map(|w| (seq.saturating_sub(w), w))
        .filter(|&(start, _)| queries.end > start)
        .map(|(start, w)| (start, w, vec![0.0f32; visible]))
        .collect();
    let mut evictions: Vec<(EvictionWindow, Vec<f32>, Vec<f32>)> = opts
        .stats
        .evictions
        .iter()
        .map(|e| (e, vec![0.0f32; visible], vec![0.0f32; visible]))
        .collect();
    let inv_group = 1.0 / group as f32;

    for (r, row) in scores.chunks_exact_mut(visible).enumerate() {
        let i = queries.start + r / group;
        let seen = base + i + 1;
        if let Some(b) = &bias {
            for (s, b) in row[..seen].iter_mut().zip(b) {
                *s += b;
            }
        }
        if let Some(window) = opts.window {
            let query = meta[base + i].position;
            for (s, m) in row[..seen].iter_mut().zip(meta) {
                if query.saturating_sub(m.position) >= window {
                    *s = f32::NEG_INFINITY;
                }
            }
        }
        let max = row[..seen].iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for s in &mut row[..seen] {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        row[..seen].iter_mut().for_each(|s| *s *= inv);
        row[seen..].fill(0.0);
        if let Some(acc) = &mut accumulated {
            for (a, p) in acc.iter_mut().zip(&row[..seen]) {
                *a += p * inv_group;
            }
        }
        for (start, _, received) in &mut windows {
            if i >= *start {
                for (a, p) in received.iter_mut().zip(&row[..seen]) {
                    *a += p * inv_group;
                }
            }
        }
        for (e, received, targets) in &mut evictions {
            e.accumulate_row(base + i, &row[..seen], inv_group, received, targets);
        }
    }

    // [rows, d] = P V
    let mut out = vec![0.0f32; rows * d];
    // SAFETY: scores is rows x visible, values hold visible rows of d, out is rows x d.
    unsafe {
        gemm::gemm(
            rows,
            d,
            visible,
            out.as_mut_ptr(),
            1,
            d as isize,
            false,
            scores.as_ptr(),
            1,
            visible as isize,
            values.as_ptr(),
            1,
            d as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    let windows = windows.into_iter().map(|(_, w, received)| (w, received)).collect();
    ChunkResult { out, accumulated, windows, evictions }
}
