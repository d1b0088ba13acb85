//! A decode step's attention allocates nothing once its per-thread buffers have grown: on a
//! one-thread pool (parts on the calling thread) and a two-thread one (parts in parallel
//! regions), short and long caches, with and without H2O's accumulated-attention statistic,
//! inside a pool worker as decode steps run. Counted by a global allocator
//! (`counting_allocator`), so this file holds one test.

use kvmerger_compress::{EntryMeta, HeadCache, KvDtype};
use kvmerger_kernels::{decode_attention, AttentionShape, DecodeOptions};

mod counting_allocator;
use counting_allocator::allocations_of;

/// SmolLM2-135M's attention shape.
const SHAPE: AttentionShape = AttentionShape { n_heads: 9, n_kv_heads: 3, head_dim: 64 };

/// A layer of `entries` entries per kv head.
fn layer(entries: usize) -> Vec<HeadCache> {
    let d = SHAPE.head_dim;
    (0..SHAPE.n_kv_heads)
        .map(|h| {
            let mut head = HeadCache::with_capacity(d, KvDtype::F16, entries);
            for i in 0..entries {
                let row = |s: usize| -> Vec<f32> {
                    (0..d).map(|c| ((i * 31 + c * 7 + h * 13 + s) as f32 * 0.37).sin()).collect()
                };
                head.push(&row(0), &row(1), EntryMeta::new(i));
            }
            head
        })
        .collect()
}

/// Steps of 4 layers of `sequences` sequences on a pool of `threads`, the sequences of a
/// layer side by side (halves joined, as a batch runs them): 10 warm-up steps, then the
/// fewest allocations of 8 more. The count is process-wide, so a thread of a pool dropped
/// just before may still be exiting during a counted step; an allocation that recurs every
/// step shows in the fewest, a stray one does not.
fn allocations_of_a_step(
    threads: usize,
    sequences: usize,
    entries: usize,
    opts: DecodeOptions,
) -> usize {
    let layers = 4;
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("a pool");
    let q: Vec<f32> =
        (0..SHAPE.n_heads * SHAPE.head_dim).map(|i| (i as f32 * 0.11).cos()).collect();
    // [sequence][layer]
    let mut caches: Vec<Vec<Vec<HeadCache>>> =
        (0..sequences).map(|_| (0..layers).map(|_| layer(entries)).collect()).collect();
    let mut outs = vec![vec![0.0f32; q.len()]; sequences];
    fn side_by_side(
        q: &[f32],
        layer: usize,
        caches: &mut [Vec<Vec<HeadCache>>],
        outs: &mut [Vec<f32>],
        opts: DecodeOptions,
    ) {
        if let ([cache], [out]) = (&mut *caches, &mut *outs) {
            return decode_attention(q, &mut cache[layer], SHAPE, opts, out);
        }
        let half = caches.len() / 2;
        let (left, right) = caches.split_at_mut(half);
        let (left_out, right_out) = outs.split_at_mut(half);
        rayon::join(
            || side_by_side(q, layer, left, left_out, opts),
            || side_by_side(q, layer, right, right_out, opts),
        );
    }
    let mut step = || (0..layers).for_each(|l| side_by_side(&q, l, &mut caches, &mut outs, opts));
    pool.install(|| {
        for _ in 0..10 {
            step();
        }
        (0..8).map(|_| allocations_of(&mut step)).min().expect("8 counted steps")
    })
}

#[test]
fn decode_attention_allocates_nothing_per_layer() {
    for (accumulate, name) in [(false, "no"), (true, "H2O")] {
        let opts = DecodeOptions { log_count_bias: true, accumulate };
        for entries in [100, 3000] {
            // One thread: the parts run on the calling thread. Four sequences side by
            // side, but on one thread which buffers grow is the same in every step.
            let one_thread = allocations_of_a_step(1, 4, entries, opts);
            assert_eq!(one_thread, 0, "one thread, {entries} entries per head, {name} statistic");
            // Two threads: the parts in parallel regions. One sequence, so no thread waiting
            // in a region starts another sequence's step (and needs a buffer more) only in
            // the counted step.
            let two_threads = allocations_of_a_step(2, 1, entries, opts);
            assert_eq!(two_threads, 0, "two threads, {entries} entries per head, {name} statistic");
        }
    }
}
