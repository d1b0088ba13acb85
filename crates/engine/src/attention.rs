//! Attention of a layer's new queries over its ragged per-head caches, with the attention
//! statistics compression methods ask for: the cache's side of the kernels' attention.
//!
//! A decode step (one query per sequence, no prompt-only statistics) goes to the kernels'
//! [`decode_attention`], which reads the heads in place and adds to the entries' accumulated
//! attention itself. A prompt goes one chunk of queries at a time per head, in parallel over
//! (head, chunk): the kernels' [`attend_block`] computes the chunk's softmax explicitly, so
//! memory stays `O(chunk x cache_len)` instead of `O(n^2)`, and its probabilities are summed
//! here into the statistics the request names: attention received per entry, from each
//! observation window, and at each eviction window. Query heads map to kv heads as in
//! grouped-query attention (query head `h` reads kv head `h / group`); statistics are the
//! mean over the query heads of a group.

use std::borrow::Cow;
use std::cell::RefCell;

use kvmerger_compress::{EvictionWindow, HeadCache, StatsRequest};
use kvmerger_kernels::{
    attend_block, decode_attention, AttentionShape, CausalBlock, DecodeOptions, SlidingWindow,
};
use rayon::prelude::*;

/// Options that change what is computed, not the result.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttentionOptions {
    /// Queries per chunk of the explicit softmax; any value gives the same result.
    pub chunk: usize,
    pub stats: StatsRequest,
    /// Add `ln(count)` to the logit of entries that stand for several tokens.
    pub log_count_bias: bool,
    /// Sliding window: a query at position `p` sees only keys at positions `> p - window`
    /// (by the entries' logical positions). Decode steps see their window because the
    /// forward pass drops older entries first; this masks within a block of queries.
    pub window: Option<usize>,
}

/// Attention of `seq` new queries over heads whose last `seq` entries are those queries'
/// own keys. Query `i` sees every entry up to and including its own (`base + i`), where
/// `base = head.len() - seq`: the mask is built from physical indices, whatever the
/// logical positions are.
///
/// `q`: `[seq, n_heads, head_dim]`, already rotated; `out`: `[seq, n_heads, head_dim]`
/// (overwritten). Accumulates statistics into `heads[h].meta_mut()[j].attention` and, for
/// each window `w` of `opts.stats`, into `heads[h].window_attention(w)`, and for each
/// eviction window `e` into `heads[h].eviction_attention(e)`, as `opts.stats` asks. A decode
/// step allocates nothing once the kernels' per-thread buffers have grown.
pub(crate) fn attend_into(
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
        let decode = DecodeOptions {
            log_count_bias: opts.log_count_bias,
            accumulate: opts.stats.accumulated,
        };
        return decode_attention(q, heads, shape, decode, out);
    }
    attend_chunks(q, seq, heads, shape, opts, out);
}

/// [`attend_into`] one chunk of queries at a time, whatever `seq` is (the decode kernel's
/// reference in tests). Every row of `out` is written.
fn attend_chunks(
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

    // Heads in parallel, and each head's chunks in parallel, so that a head's rows are
    // widened to f32 once for all its chunks, and about one head per thread is at a time.
    let results: Vec<Vec<ChunkResult>> = heads
        .par_iter()
        .enumerate()
        .map(|(h, head)| {
            let rows = HeadRows::of(head, head_dim, opts);
            (0..n_chunks)
                .into_par_iter()
                .map(|c| {
                    let queries = c * chunk..((c + 1) * chunk).min(seq);
                    PROBABILITIES.with_borrow_mut(|scores| {
                        attend_chunk(q, &rows, scores, seq, queries, h, shape, group, opts)
                    })
                })
                .collect()
        })
        .collect();

    for (h, head_results) in results.into_iter().enumerate() {
        for (c, res) in head_results.into_iter().enumerate() {
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
}

/// What every chunk of queries reads of a head, prepared once for all of them.
struct HeadRows<'a> {
    head: &'a HeadCache,
    /// `[len, head_dim]` each, in f32 (borrowed when the cache is f32).
    keys: Cow<'a, [f32]>,
    values: Cow<'a, [f32]>,
    /// `ln(count)` per entry, when `opts.log_count_bias` asks for it.
    bias: Option<Vec<f32>>,
    /// Each entry's logical position, for a sliding window.
    positions: Option<Vec<usize>>,
}

impl<'a> HeadRows<'a> {
    fn of(head: &'a HeadCache, head_dim: usize, opts: AttentionOptions) -> Self {
        let n = head.len() * head_dim;
        let meta = head.meta();
        Self {
            head,
            keys: head.stored_keys().widen(0..n),
            values: head.stored_values().widen(0..n),
            bias: opts
                .log_count_bias
                .then(|| meta.iter().map(|m| (m.count.max(1) as f32).ln()).collect()),
            positions: opts.window.map(|_| meta.iter().map(|m| m.position).collect()),
        }
    }
}

thread_local! {
    /// A chunk's `[rows, visible]` probabilities, kept by each thread from one chunk to the
    /// next (until [`release_prefill_scratch`]): at 9,000 keys a chunk of 128 queries of
    /// Qwen2.5-0.5B's 7-head groups takes 32 MiB, which allocated afresh per chunk cost a
    /// quarter of a prefill's CPU time in page faults once the allocator returned it to
    /// the system each time.
    static PROBABILITIES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Frees every thread's probability buffer (those of the current rayon pool and the
/// caller's). A prompt's last chunk leaves them at their largest, `O(chunk x cache_len)`
/// each, which decode steps never read: without this a server that once prefilled a long
/// prompt would hold them while idle.
pub(crate) fn release_prefill_scratch() {
    rayon::broadcast(|_| drop(PROBABILITIES.take()));
    drop(PROBABILITIES.take());
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
    head_rows: &HeadRows<'_>,
    scores: &mut Vec<f32>,
    seq: usize,
    queries: std::ops::Range<usize>,
    h: usize,
    shape: AttentionShape,
    group: usize,
    opts: AttentionOptions,
) -> ChunkResult {
    let d = shape.head_dim;
    let head = head_rows.head;
    let base = head.len() - seq;
    let rows = queries.len() * group;
    // Keys visible to the last query of the chunk; earlier queries mask the tail.
    let visible = base + queries.end;

    let qs = shape.group_queries(q, queries.clone(), h);

    let window = opts.window.zip(head_rows.positions.as_deref());
    let block = CausalBlock {
        queries: &qs,
        keys: &head_rows.keys[..visible * d],
        head_dim: d,
        group,
        first_seen: base + queries.start + 1,
        bias: head_rows.bias.as_deref().map(|b| &b[..visible]),
        window: window
            .map(|(window, positions)| SlidingWindow { window, positions: &positions[..visible] }),
    };
    // [rows, visible] probabilities (attend_block writes every element), [rows, d] outputs.
    scores.resize(rows * visible, 0.0);
    let mut out = vec![0.0f32; rows * d];
    attend_block(block, &head_rows.values[..visible * d], scores, &mut out);

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

    for (r, row) in scores.chunks_exact(visible).enumerate() {
        let i = queries.start + r / group;
        let seen = base + i + 1;
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

    let windows = windows.into_iter().map(|(_, w, received)| (w, received)).collect();
    ChunkResult { out, accumulated, windows, evictions }
}

#[cfg(test)]
mod tests {
    use kvmerger_compress::{EntryMeta, KvDtype};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    const SHAPE: AttentionShape = AttentionShape { n_heads: 6, n_kv_heads: 2, head_dim: 64 };

    fn opts(stats: StatsRequest) -> AttentionOptions {
        AttentionOptions { chunk: 8, stats, log_count_bias: true, window: None }
    }

    /// Ragged heads of random rows in `dtype`, entries standing for 1 to 3 tokens.
    fn heads(dtype: KvDtype) -> Vec<HeadCache> {
        let mut rng = StdRng::seed_from_u64(21);
        let d = SHAPE.head_dim;
        [700usize, 333]
            .iter()
            .map(|&n| {
                let mut h = HeadCache::new(d, dtype);
                for i in 0..n {
                    let k: Vec<f32> = (0..d).map(|_| rng.random_range(-2.0..2.0)).collect();
                    let v: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
                    let count = 1 + (i % 3) as u32;
                    h.push(&k, &v, EntryMeta { position: i, count, attention: 0.0 });
                }
                h
            })
            .collect()
    }

    fn attention(heads: &[HeadCache]) -> Vec<f32> {
        heads.iter().flat_map(|h| h.meta().iter().map(|m| m.attention)).collect()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// One query over caches in every storage dtype: a decode step (the kernels' split
    /// kernel, reading the cache in place) and the prompt's chunked path (explicit softmax
    /// over widened rows) give the same output and accumulated attention. Asking for an
    /// observation window sends the query down the chunked path, whose window statistic is
    /// then that query's attention. Cross-path: bounded.
    #[test]
    fn a_decode_step_attends_as_the_prompt_path() {
        let mut rng = StdRng::seed_from_u64(22);
        let q: Vec<f32> = (0..6 * 64).map(|_| rng.random_range(-1.0..1.0)).collect();
        for dtype in KvDtype::ALL.map(KvDtype::storage) {
            let mut decode = heads(dtype);
            let mut prompt = decode.clone();
            let (mut out, mut expected) = (vec![0.0; q.len()], vec![0.0; q.len()]);
            attend_into(&q, 1, &mut decode, SHAPE, opts(StatsRequest::accumulated()), &mut out);
            let with_window = StatsRequest::window(1, true);
            attend_into(&q, 1, &mut prompt, SHAPE, opts(with_window), &mut expected);
            assert!(max_diff(&out, &expected) < 1e-5, "{dtype}: output");
            let (got, reference) = (attention(&decode), attention(&prompt));
            assert!(max_diff(&got, &reference) < 1e-6, "{dtype}: accumulated attention");
            let window: Vec<f32> =
                prompt.iter().flat_map(|h| h.window_attention(1).unwrap().to_vec()).collect();
            assert_eq!(window, reference, "{dtype}: one query's window is its attention");
            let total: f32 = got.iter().sum();
            assert!((total - 2.0).abs() < 1e-4, "{dtype}: each head's attention sums to 1");
        }
    }

    /// The probability buffers a prompt's chunks leave on the pool's threads are freed by
    /// [`release_prefill_scratch`]. A pool of its own, so other tests' prompts cannot refill
    /// them between the release and the check.
    #[test]
    fn releasing_the_prefill_scratch_frees_every_threads_buffer() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let held = || {
            let mut held = rayon::broadcast(|_| PROBABILITIES.with_borrow(Vec::capacity));
            held.push(PROBABILITIES.with_borrow(Vec::capacity));
            held
        };
        pool.install(|| {
            let seq = 40;
            let mut rng = StdRng::seed_from_u64(23);
            let q: Vec<f32> = (0..seq * 6 * 64).map(|_| rng.random_range(-1.0..1.0)).collect();
            let mut out = vec![0.0; q.len()];
            let mut cache = heads(KvDtype::F16);
            attend_into(&q, seq, &mut cache, SHAPE, opts(StatsRequest::accumulated()), &mut out);
            assert!(
                held().iter().any(|&c| c >= 8 * 3 * 333),
                "a chunk's probabilities: {:?}",
                held()
            );
            release_prefill_scratch();
            assert_eq!(held(), vec![0; 3], "every thread's buffer freed");
        });
    }
}
