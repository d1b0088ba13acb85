//! Attention of one new query per sequence (a decode step) over its ragged cache.
//!
//! Every key and value row is read once for (a tile of) the query heads of its group. With
//! AVX2, FMA and F16C and f32 or f16 rows, the rows load straight into vector registers, f16
//! converting inside the multiply-add loop, with keys prefetched ahead ([`fused`]; on 512-bit
//! vectors where the CPU has AVX-512F and the head is a multiple of 64 wide); otherwise they
//! are widened to f32 a block of [`BLOCK`] rows at a time (the block stays in L1 with the
//! group's queries). A long head is split into parts that run on different threads
//! (flash-decoding): each part returns its own maximum logit, sum of exponentials and
//! weighted values, and the parts are combined exactly, so a model with fewer kv heads than
//! threads still uses them all. The accumulated attention statistic is the exact softmax,
//! rescaled from each part's exponentials. Parts, their results and the kept exponentials
//! live in per-thread buffers: a decode step allocates nothing here once they have grown.

use std::cell::RefCell;
use std::ops::Range;
use std::sync::LazyLock;

use rayon::prelude::*;

use super::head::{KvEntry, KvHead};
use super::shape::{AttentionShape, DecodeOptions};
use super::softmax::exponentiate_row;
use crate::kv_rows::RowsRef;

/// Rows widened at a time: 64 rows of a 64-wide head are 16 KiB of f32.
const BLOCK: usize = 64;

/// Threads the parts are sized for, whatever the pool holds: the split (and so the rounding
/// of the combined result) depends on sizes only, and a decode step gives the same result
/// on one thread or many (see `threads.rs`).
const SPLIT_THREADS: usize = 8;

/// Fewest entries worth a task of their own: below this, splitting costs more than it saves.
const MIN_PART: usize = 256;

/// Per-thread buffers, reused across steps so a decode step allocates no per-part memory.
#[derive(Default)]
struct Scratch {
    /// `[group, part rows]`: logits, then exponentials.
    scores: Vec<f32>,
    /// `[BLOCK, head_dim]`: widened keys or values.
    block: Vec<f32>,
    /// `[part rows]`: the entries' log-count biases.
    bias: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
    /// Per-part results of the steps under way on this thread, reused across steps: a
    /// stack, because a thread waiting in a parallel region may start another sequence's
    /// step (a batch's sequences run side by side), which takes a buffer of its own.
    static PARTS: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// How a layer's heads are split into parts: about two per thread in all, none shorter
/// than [`MIN_PART`] (unless the head is), each a whole number of blocks. Parts are numbered
/// head by head, in row order; within a head they are equally long but the last.
#[derive(Debug, Clone, Copy)]
struct Split {
    /// Parts a head is cut into when it is long enough.
    per_head: usize,
}

impl Split {
    fn new(n_kv_heads: usize, threads: usize) -> Self {
        Self { per_head: (2 * threads).div_ceil(n_kv_heads.max(1)).max(1) }
    }

    /// Rows of every part but the last of a head of `n` entries.
    fn part_len(self, n: usize) -> usize {
        n.div_ceil(self.per_head).max(MIN_PART).next_multiple_of(BLOCK)
    }

    /// Parts of a head of `n` entries.
    fn count(self, n: usize) -> usize {
        n.div_ceil(self.part_len(n))
    }

    /// Parts of all `heads`.
    fn total(self, heads: &[impl KvHead]) -> usize {
        heads.iter().map(|h| self.count(entries(h))).sum()
    }

    /// The most rows of any part of `heads`.
    fn longest(self, heads: &[impl KvHead]) -> usize {
        heads.iter().map(|h| self.part_len(entries(h)).min(entries(h))).max().unwrap_or(0)
    }

    /// Part `i`: its head and rows.
    fn part(self, heads: &[impl KvHead], mut i: usize) -> (usize, Range<usize>) {
        for (h, head) in heads.iter().enumerate() {
            let (n, count) = (entries(head), self.count(entries(head)));
            if i < count {
                let len = self.part_len(n);
                return (h, i * len..((i + 1) * len).min(n));
            }
            i -= count;
        }
        unreachable!("part index past the split")
    }
}

/// Entries `head` holds.
fn entries(head: &impl KvHead) -> usize {
    head.entries().len()
}

/// Where a part's results lie in its stretch of the per-part buffer: `[group]` maxima,
/// `[group]` sums, `[group, d]` weighted values (what [`attend_part`] writes), then
/// `[group]` shares of the head's softmax (the combination's), then, when the statistic is
/// kept, `[group, rows]` exponentials.
#[derive(Debug, Clone, Copy)]
struct PartLayout {
    group: usize,
    d: usize,
    /// Floats per part: every part's stretch is as long as the longest part's.
    stride: usize,
}

impl PartLayout {
    fn new(group: usize, d: usize, kept_rows: usize) -> Self {
        Self { group, d, stride: group * (d + 3) + group * kept_rows }
    }

    /// The end of what [`attend_part`] writes.
    fn partial_len(self) -> usize {
        self.group * (self.d + 2)
    }

    fn scale(self, part: &[f32]) -> &[f32] {
        &part[self.partial_len()..][..self.group]
    }

    /// The first `rows` exponentials' places of each query head, `[group, rows]`.
    fn exps(self, part: &[f32], rows: usize) -> &[f32] {
        &part[self.partial_len() + self.group..][..self.group * rows]
    }
}

/// The attention of one query per kv-head group over a layer's `heads`, whose last entry is
/// that query's own key (every entry is visible). `q`: `[n_heads, head_dim]`, rotated.
/// Writes `out`, `[n_heads, head_dim]`. With `opts.accumulate`, adds each entry's attention
/// (the mean over its group's query heads) to [`KvEntry::attention_mut`].
pub fn decode_attention<H: KvHead>(
    q: &[f32],
    heads: &mut [H],
    shape: AttentionShape,
    opts: DecodeOptions,
    out: &mut [f32],
) {
    let AttentionShape { n_heads, n_kv_heads, head_dim } = shape;
    assert_eq!(heads.len(), n_kv_heads);
    assert_eq!(q.len(), n_heads * head_dim);
    assert_eq!(out.len(), q.len(), "one output row per query row");
    // On a one-thread pool (a busy machine, see `threads.rs`) a parallel region runs
    // nothing side by side: the parts run here without one. On more threads they run in
    // parallel however short the cache: with two threads, one sequence's 30 layers of 32
    // to 1,024 entries per head took 17-95% longer on the calling thread (32 entries 17%,
    // 128 and more 40% or more), and four sequences side by side (as a batch runs them)
    // within a few percent of the parallel time either way (`benches/attention.rs`, short
    // caches).
    let parallel = rayon::current_num_threads() > 1;
    attend_split(q, heads, shape, opts, SPLIT_THREADS, parallel, out)
}

/// [`decode_attention`] with parts sized for `threads` threads, run in parallel regions or, if
/// not `parallel`, one after another on this thread (the same parts and the same
/// combination: the same result, bit for bit).
fn attend_split<H: KvHead>(
    q: &[f32],
    heads: &mut [H],
    shape: AttentionShape,
    opts: DecodeOptions,
    threads: usize,
    parallel: bool,
    out: &mut [f32],
) {
    let AttentionShape { n_heads, n_kv_heads, head_dim: d } = shape;
    let group = n_heads / n_kv_heads;
    let split = Split::new(heads.len(), threads);
    let n_parts = split.total(heads);
    let keep = opts.accumulate;
    let layout = PartLayout::new(group, d, if keep { split.longest(heads) } else { 0 });
    // Every part overwrites what it reads later: stale values from an earlier step are
    // never read.
    let mut buffer = PARTS.with_borrow_mut(Vec::pop).unwrap_or_default();
    buffer.resize(n_parts * layout.stride, 0.0);

    let heads_read: &[H] = heads;
    let run_part = |(i, stretch): (usize, &mut [f32])| {
        let (h, rows) = split.part(heads_read, i);
        let queries = &q[h * group * d..(h + 1) * group * d];
        let (partial, rest) = stretch.split_at_mut(layout.partial_len());
        let exps = if keep { Some(&mut rest[group..][..group * rows.len()]) } else { None };
        let log_count_bias = opts.log_count_bias;
        let part = PartInput { queries, head: &heads_read[h], head_dim: d, rows, log_count_bias };
        attend_part(part, partial, exps);
    };
    if parallel {
        buffer.par_chunks_mut(layout.stride).enumerate().for_each(run_part);
    } else {
        buffer.chunks_mut(layout.stride).enumerate().for_each(run_part);
    }

    out.fill(0.0);
    let mut first = 0;
    for (h, head) in heads.iter().enumerate() {
        let count = split.count(entries(head));
        let mine = &mut buffer[first * layout.stride..(first + count) * layout.stride];
        // Per query head of the group: the largest maximum, and the softmax denominator.
        for g in 0..group {
            let max =
                mine.chunks_exact(layout.stride).map(|p| p[g]).fold(f32::NEG_INFINITY, f32::max);
            let total: f32 =
                mine.chunks_exact(layout.stride).map(|p| p[group + g] * (p[g] - max).exp()).sum();
            let o = &mut out[(h * group + g) * d..][..d];
            for p in mine.chunks_exact_mut(layout.stride) {
                // This part's share of its head's softmax, for query head `g`.
                let s = (p[g] - max).exp() / total;
                p[layout.partial_len() + g] = s;
                let values = &p[2 * group + g * d..][..d];
                o.iter_mut().zip(values).for_each(|(o, v)| *o += s * v);
            }
        }
        first += count;
    }
    if keep {
        accumulate_attention(heads, split, layout, &buffer, parallel);
    }
    PARTS.with_borrow_mut(|stack| stack.push(buffer));
}

/// Adds each part's exact softmax, its share times its exponentials averaged over the
/// `group` query heads, to its entries' accumulated attention: in parallel (if `parallel`)
/// over parts (each owns its entries), right after the parts' own parallel region while its
/// threads are still awake. `parts`: the parts' stretches, in order.
fn accumulate_attention<H: KvHead>(
    heads: &mut [H],
    split: Split,
    layout: PartLayout,
    parts: &[f32],
    parallel: bool,
) {
    if let [head] = heads {
        let len = split.part_len(entries(head));
        let add = |(meta, part): (&mut [H::Entry], &[f32])| add_part_attention(meta, part, layout);
        let meta = head.entries_mut();
        if parallel {
            meta.par_chunks_mut(len).zip(parts.par_chunks(layout.stride)).for_each(add);
        } else {
            meta.chunks_mut(len).zip(parts.chunks(layout.stride)).for_each(add);
        }
        return;
    }
    // Halves of the heads side by side (no list of parts to build).
    let (left, right) = heads.split_at_mut(heads.len() / 2);
    let (left_parts, right_parts) = parts.split_at(split.total(left) * layout.stride);
    if parallel {
        rayon::join(
            || accumulate_attention(left, split, layout, left_parts, true),
            || accumulate_attention(right, split, layout, right_parts, true),
        );
    } else {
        accumulate_attention(left, split, layout, left_parts, false);
        accumulate_attention(right, split, layout, right_parts, false);
    }
}

/// [`accumulate_attention`] for one part's entries: one read-modify-write of an entry's
/// metadata for the whole group, adding its terms in query-head order, as one head at a
/// time would.
fn add_part_attention(meta: &mut [impl KvEntry], part: &[f32], layout: PartLayout) {
    let (group, n) = (layout.group, meta.len());
    let inv_group = 1.0 / group as f32;
    let (scale, exps) = (layout.scale(part), layout.exps(part, n));
    for (j, m) in meta.iter_mut().enumerate() {
        let m = m.attention_mut();
        let mut attention = *m;
        for g in 0..group {
            attention += scale[g] * inv_group * exps[g * n + j];
        }
        *m = attention;
    }
}

/// Counts whose logit bias is looked up rather than computed: merged entries are mostly
/// small sets, and a logarithm per entry costs more than the rest of its logit.
const TABULATED_COUNTS: usize = 64;

/// The logit bias of an entry standing for `count` tokens: `ln(count)`, 0 for one token.
fn log_count(count: u32) -> f32 {
    if count > 1 {
        (count as f32).ln()
    } else {
        0.0
    }
}

/// `out = [log_count(m.count()) for m in meta]`, the same values, from a table for the
/// counts below [`TABULATED_COUNTS`].
fn log_count_biases(meta: &[impl KvEntry], out: &mut Vec<f32>) {
    static TABLE: LazyLock<[f32; TABULATED_COUNTS]> =
        LazyLock::new(|| std::array::from_fn(|c| log_count(c as u32)));
    let table = &*TABLE;
    out.clear();
    out.extend(
        meta.iter()
            .map(|m| m.count())
            .map(|count| table.get(count as usize).copied().unwrap_or_else(|| log_count(count))),
    );
}

/// One part's softmax pieces for the `group` queries of one kv head.
///
/// `part.queries`: `[group, d]`. Writes `partial` = `[group]` maxima, `[group]` sums of
/// `exp(logit - max)`, `[group, d]` values weighted by those exponentials; and, if given,
/// the exponentials themselves into `exps`, `[group, rows]`.
fn attend_part<H: KvHead>(part: PartInput<'_, H>, partial: &mut [f32], exps: Option<&mut [f32]>) {
    SCRATCH.with_borrow_mut(|scratch| {
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::has_avx2_fma_f16c() {
            let fused =
                fused_width(part.head_dim).filter(|_| fuses(part.head.keys(), part.head.values()));
            // SAFETY: the CPU has the features these copies are compiled for.
            unsafe {
                match fused {
                    Some(width) => fused_part(width, part, partial, exps, scratch),
                    None => part_kernel_avx2(part, partial, exps, scratch),
                }
            }
            return;
        }
        part_kernel(part, partial, exps, scratch, false)
    })
}

/// Which fused kernel runs a head of width `d` here, if one does (the CPU has AVX2, FMA and
/// F16C).
#[cfg(target_arch = "x86_64")]
fn fused_width(d: usize) -> Option<FusedWidth> {
    use fused::Width;
    if crate::cpu::has_avx512f() && d.is_multiple_of(fused::Avx512::COLUMNS) {
        Some(FusedWidth::Avx512)
    } else if d.is_multiple_of(fused::Avx2::COLUMNS) {
        Some(FusedWidth::Avx2)
    } else {
        None
    }
}

/// The vector width of a fused part kernel.
#[cfg(target_arch = "x86_64")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FusedWidth {
    Avx2,
    Avx512,
}

/// Whether keys and values stored as these have a fused kernel: f32, f16, q8_0 and q4_0
/// rows load straight into registers (bf16 rows are widened a block at a time).
#[cfg(target_arch = "x86_64")]
fn fuses(keys: RowsRef<'_>, values: RowsRef<'_>) -> bool {
    matches!(
        (keys, values),
        (RowsRef::F32(_), RowsRef::F32(_))
            | (RowsRef::F16(_), RowsRef::F16(_))
            | (RowsRef::Q8_0(_), RowsRef::Q8_0(_))
            | (RowsRef::Q4_0(_), RowsRef::Q4_0(_))
    )
}

/// [`fused::part_kernel`] on `width`, over the head's rows as stored.
///
/// # Safety
/// The CPU has AVX2, FMA, F16C and, for [`FusedWidth::Avx512`], AVX-512F; the head's rows
/// are of a dtype that [`fuses`].
#[cfg(target_arch = "x86_64")]
unsafe fn fused_part<H: KvHead>(
    width: FusedWidth,
    part: PartInput<'_, H>,
    partial: &mut [f32],
    exps: Option<&mut [f32]>,
    scratch: &mut Scratch,
) {
    let (keys, values) = (part.head.keys(), part.head.values());
    // SAFETY: the caller's contract.
    unsafe {
        match (keys, values) {
            (RowsRef::F32(k), RowsRef::F32(v)) => {
                fused_typed(width, part, k, v, partial, exps, scratch)
            }
            (RowsRef::F16(k), RowsRef::F16(v)) => {
                fused_typed(width, part, k, v, partial, exps, scratch)
            }
            (RowsRef::Q8_0(k), RowsRef::Q8_0(v)) => {
                fused_typed(width, part, k, v, partial, exps, scratch)
            }
            (RowsRef::Q4_0(k), RowsRef::Q4_0(v)) => {
                fused_typed(width, part, k, v, partial, exps, scratch)
            }
            _ => unreachable!("the caller checked that the rows fuse"),
        }
    }
}

/// [`fused_part`] for one stored type.
///
/// # Safety
/// As [`fused_part`].
#[cfg(target_arch = "x86_64")]
unsafe fn fused_typed<T: fused::Lanes, H: KvHead>(
    width: FusedWidth,
    part: PartInput<'_, H>,
    keys: &[T],
    values: &[T],
    partial: &mut [f32],
    exps: Option<&mut [f32]>,
    scratch: &mut Scratch,
) {
    // SAFETY: the caller's contract.
    unsafe {
        match width {
            FusedWidth::Avx2 => {
                fused::part_kernel::<T, fused::Avx2, H>(part, keys, values, partial, exps, scratch)
            }
            FusedWidth::Avx512 => fused::part_kernel::<T, fused::Avx512, H>(
                part, keys, values, partial, exps, scratch,
            ),
        }
    }
}

/// What [`attend_part`] reads.
struct PartInput<'a, H> {
    queries: &'a [f32],
    head: &'a H,
    head_dim: usize,
    rows: Range<usize>,
    log_count_bias: bool,
}

/// [`part_kernel`] compiled for AVX2, FMA and F16C (the build targets baseline x86-64,
/// whose vectors are half as wide, with no fused multiply-add and no f16 conversion).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn part_kernel_avx2<H: KvHead>(
    part: PartInput<'_, H>,
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
fn part_kernel<H: KvHead>(
    part: PartInput<'_, H>,
    partial: &mut [f32],
    exps: Option<&mut [f32]>,
    Scratch { scores, block, bias: biases }: &mut Scratch,
    f16c: bool,
) {
    let PartInput { queries, head, head_dim: d, rows, log_count_bias } = part;
    let group = queries.len() / d;
    let n = rows.len();
    let scale = 1.0 / (d as f32).sqrt();
    let meta = &head.entries()[rows.clone()];
    let (keys, values) = (head.keys(), head.values());
    if log_count_bias {
        log_count_biases(meta, biases);
    }
    {
        scores.resize(group * n, 0.0);
        // Logits: each key row is read once for the whole group.
        for start in rows.clone().step_by(BLOCK) {
            let end = (start + BLOCK).min(rows.end);
            let block = widen(keys, start * d..end * d, block, f16c);
            for (r, key) in block.chunks_exact(d).enumerate() {
                let j = start - rows.start + r;
                let bias = if log_count_bias { biases[j] } else { 0.0 };
                for (g, query) in queries.chunks_exact(d).enumerate() {
                    scores[g * n + j] = dot(query, key) * scale + bias;
                }
            }
        }
        let weighted = exponentiate(&mut scores[..group * n], n, partial);
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

/// Turns `scores`' logits, `[group, n]`, into `exp(logit - max)` per query head, writes
/// `partial`'s `[group]` maxima and `[group]` sums, and returns its `[group, d]` rest.
#[inline(always)]
fn exponentiate<'p>(scores: &mut [f32], n: usize, partial: &'p mut [f32]) -> &'p mut [f32] {
    let group = scores.len() / n.max(1);
    let (maxima, rest) = partial.split_at_mut(group);
    let (sums, weighted) = rest.split_at_mut(group);
    for (g, row) in scores.chunks_exact_mut(n.max(1)).enumerate() {
        (maxima[g], sums[g]) = exponentiate_row(row);
    }
    weighted
}

/// The part kernel with f16 (or f32) rows read straight into vector registers: a key or value
/// chunk converts inside the multiply-add loop (no widened copy in memory) and serves up to
/// [`fused::TILE`] query heads of the group at once. [`fused::Avx512`] and [`fused::Avx2`]
/// give the logits and the weighing; the rest of a part is shared.
#[cfg(target_arch = "x86_64")]
mod fused {
    use std::arch::x86_64::*;

    pub(super) use crate::attention::lanes::Lanes;

    use super::{exponentiate, log_count_biases, KvHead, PartInput, Scratch, BLOCK};

    /// Query heads per pass: with AVX2, 3 heads x 2 row phases x 2 registers of accumulators,
    /// plus the value chunk and the weight, fill 15 of the 16 vector registers.
    pub(super) const TILE: usize = 3;

    /// How far ahead of the row being read the keys are prefetched, in bytes (64 rows of a
    /// 64-wide f16 head).
    const PREFETCH: usize = 8192;

    /// The logits and the weighing of a part on one vector width.
    pub(super) trait Width {
        /// head_dim must be a multiple of this.
        const COLUMNS: usize;

        /// `out[g * n + j] = queries[g] . keys[j]` for the `G` queries, `[G, d]`, and the
        /// `n` key rows, `[n, d]`: each key chunk is loaded (and converted) once for all `G`.
        /// Keys are prefetched [`PREFETCH`] bytes ahead and, if given, the value rows
        /// `[n, d]` row by row: a part's rows come from memory, and the out-of-order window
        /// holds too few rows to keep enough reads in flight by itself.
        ///
        /// # Safety
        /// The CPU has the width's features.
        unsafe fn logits<T: Lanes, const G: usize>(
            queries: &[f32],
            keys: &[T],
            values: Option<&[T]>,
            d: usize,
            out: &mut [f32],
            n: usize,
        );

        /// `out[g] = sum over j of weights[g * n + j] * values[j]` for the `G` query heads,
        /// `out` `[G, d]`, `values` `[n, d]`, a [`BLOCK`] of rows at a time.
        ///
        /// # Safety
        /// The CPU has the width's features.
        unsafe fn weigh<T: Lanes, const G: usize>(
            weights: &[f32],
            values: &[T],
            d: usize,
            out: &mut [f32],
            n: usize,
        );
    }

    /// 256-bit vectors with FMA and F16C.
    pub(super) struct Avx2;
    /// 512-bit vectors (AVX-512F): a 64-wide row is four registers, so four rows' logits of
    /// three query heads, or one row's weighted values of three, stay in registers.
    pub(super) struct Avx512;

    /// Asks for row `j` (`d` elements a row) of the keys [`PREFETCH`] bytes ahead and of the
    /// values (if given) now.
    #[inline(always)]
    fn prefetch_part_row<T: Lanes>(keys: *const T, values: Option<&[T]>, d: usize, j: usize) {
        let row_bytes = d / T::ELEMENTS * size_of::<T>();
        let key = T::address_of(keys, j * d);
        crate::cpu::prefetch(key.wrapping_add(PREFETCH), row_bytes);
        if let Some(values) = values {
            crate::cpu::prefetch(T::address_of(values.as_ptr(), j * d), row_bytes);
        }
    }

    /// [`super::part_kernel`] over `keys` and `values`, `[len, d]` with `d` a multiple of
    /// `W::COLUMNS`.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA, F16C and `W`'s features.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn part_kernel<T: Lanes, W: Width, H: KvHead>(
        part: PartInput<'_, H>,
        keys: &[T],
        values: &[T],
        partial: &mut [f32],
        exps: Option<&mut [f32]>,
        scratch: &mut Scratch,
    ) {
        let Scratch { scores, bias, .. } = scratch;
        let PartInput { queries, head, head_dim: d, rows, log_count_bias } = part;
        let group = queries.len() / d;
        let n = rows.len();
        assert!(
            d.is_multiple_of(W::COLUMNS)
                && d.is_multiple_of(T::ELEMENTS)
                && rows.end * d <= T::elements(keys)
                && rows.end * d <= T::elements(values)
        );
        let scale = 1.0 / (d as f32).sqrt();
        let meta = &head.entries()[rows.clone()];
        scores.resize(group * n, 0.0);
        let units = rows.start * d / T::ELEMENTS..rows.end * d / T::ELEMENTS;
        let (keys, values) = (&keys[units.clone()], &values[units]);
        for g0 in (0..group).step_by(TILE) {
            let tile = &queries[g0 * d..(g0 + TILE).min(group) * d];
            let out = &mut scores[g0 * n..];
            // The first pass over the keys also asks for the values, which the weighing reads
            // next.
            let values = (g0 == 0).then_some(values);
            // SAFETY: bounds asserted above; the features are the caller's.
            unsafe {
                match tile.len() / d {
                    1 => W::logits::<T, 1>(tile, keys, values, d, out, n),
                    2 => W::logits::<T, 2>(tile, keys, values, d, out, n),
                    _ => W::logits::<T, 3>(tile, keys, values, d, out, n),
                }
            }
        }
        // One bias per entry for the whole group, then each query head's row in one pass.
        if log_count_bias {
            log_count_biases(meta, bias);
            for row in scores[..group * n].chunks_exact_mut(n.max(1)) {
                row.iter_mut().zip(bias.iter()).for_each(|(s, b)| *s = *s * scale + b);
            }
        } else {
            scores[..group * n].iter_mut().for_each(|s| *s *= scale);
        }
        let weighted = exponentiate(&mut scores[..group * n], n, partial);
        for g0 in (0..group).step_by(TILE) {
            let g1 = (g0 + TILE).min(group);
            let (weights, out) = (&scores[g0 * n..g1 * n], &mut weighted[g0 * d..g1 * d]);
            // SAFETY: as above.
            unsafe {
                match g1 - g0 {
                    1 => W::weigh::<T, 1>(weights, values, d, out, n),
                    2 => W::weigh::<T, 2>(weights, values, d, out, n),
                    _ => W::weigh::<T, 3>(weights, values, d, out, n),
                }
            }
        }
        if let Some(exps) = exps {
            exps.copy_from_slice(&scores[..group * n]);
        }
    }

    impl Width for Avx2 {
        /// Columns of a value chunk per pass.
        const COLUMNS: usize = 16;

        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn logits<T: Lanes, const G: usize>(
            queries: &[f32],
            keys: &[T],
            values: Option<&[T]>,
            d: usize,
            out: &mut [f32],
            n: usize,
        ) {
            assert!(
                queries.len() == G * d
                    && T::elements(keys) >= n * d
                    && out.len() >= (G - 1) * n + n
            );
            assert!(values.is_none_or(|v| T::elements(v) >= n * d));
            let (q, k) = (queries.as_ptr(), keys.as_ptr());
            for j in 0..n {
                let mut acc = [_mm256_setzero_ps(); G];
                prefetch_part_row(k, values, d, j);
                // SAFETY: `j * d + c + 8 <= n * d` and `g * d + c + 8 <= G * d`, asserted.
                unsafe {
                    for c in (0..d).step_by(8) {
                        let key = T::load8(k, j * d + c);
                        for (g, acc) in acc.iter_mut().enumerate() {
                            *acc = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(g * d + c)), key, *acc);
                        }
                    }
                }
                for (g, acc) in acc.into_iter().enumerate() {
                    out[g * n + j] = horizontal_sum(acc);
                }
            }
        }

        /// Per [`BLOCK`] rows and [`Self::COLUMNS`] columns, the accumulators stay in
        /// registers, in two phases (even and odd rows) so consecutive multiply-adds do not
        /// wait on each other.
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn weigh<T: Lanes, const G: usize>(
            weights: &[f32],
            values: &[T],
            d: usize,
            out: &mut [f32],
            n: usize,
        ) {
            assert!(weights.len() == G * n && T::elements(values) >= n * d && out.len() == G * d);
            let (w, v, o) = (weights.as_ptr(), values.as_ptr(), out.as_mut_ptr());
            out.fill(0.0);
            for start in (0..n).step_by(BLOCK) {
                let end = (start + BLOCK).min(n);
                for c in (0..d).step_by(Self::COLUMNS) {
                    let zero = _mm256_setzero_ps();
                    // [phase][g][half of the 16 columns]
                    let mut acc = [[[zero; 2]; G]; 2];
                    let mut j = start;
                    // Rows `j < n`, columns `c + 16 <= d`, weights `g * n + j < G * n`, all
                    // asserted above, bound every access below.
                    while j + 1 < end {
                        for (phase, acc) in acc.iter_mut().enumerate() {
                            let row = (j + phase) * d + c;
                            // SAFETY: row `j + phase < n`, columns `c..c + 16` of `d`.
                            let (lo, hi) = unsafe { (T::load8(v, row), T::load8(v, row + 8)) };
                            for (g, acc) in acc.iter_mut().enumerate() {
                                // SAFETY: weight `g * n + j + phase < G * n`.
                                let weight =
                                    unsafe { _mm256_broadcast_ss(&*w.add(g * n + j + phase)) };
                                acc[0] = _mm256_fmadd_ps(weight, lo, acc[0]);
                                acc[1] = _mm256_fmadd_ps(weight, hi, acc[1]);
                            }
                        }
                        j += 2;
                    }
                    if j < end {
                        let row = j * d + c;
                        // SAFETY: row `j < n`, columns `c..c + 16` of `d`.
                        let (lo, hi) = unsafe { (T::load8(v, row), T::load8(v, row + 8)) };
                        for (g, acc) in acc[0].iter_mut().enumerate() {
                            // SAFETY: weight `g * n + j < G * n`.
                            let weight = unsafe { _mm256_broadcast_ss(&*w.add(g * n + j)) };
                            acc[0] = _mm256_fmadd_ps(weight, lo, acc[0]);
                            acc[1] = _mm256_fmadd_ps(weight, hi, acc[1]);
                        }
                    }
                    let [even, odd] = acc;
                    for (g, (even, odd)) in even.into_iter().zip(odd).enumerate() {
                        for (half, (even, odd)) in even.into_iter().zip(odd).enumerate() {
                            let sum = _mm256_add_ps(even, odd);
                            // SAFETY: columns `c + 8 half..+ 8` of row `g` of `out` (`G * d`).
                            unsafe {
                                let at = o.add(g * d + c + 8 * half);
                                _mm256_storeu_ps(at, _mm256_add_ps(_mm256_loadu_ps(at), sum));
                            }
                        }
                    }
                }
            }
        }
    }

    /// Rows of keys whose logits are summed across lanes together.
    const ROWS_512: usize = 4;
    /// 16-lane registers per pass of a row: 64 columns.
    const CHUNKS_512: usize = 4;

    impl Width for Avx512 {
        const COLUMNS: usize = 16 * CHUNKS_512;

        /// Four key rows at a time, so the lanes of their `G * 4` sums fold into four sums
        /// per query head in a few shuffles, not a full horizontal sum per logit.
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        unsafe fn logits<T: Lanes, const G: usize>(
            queries: &[f32],
            keys: &[T],
            values: Option<&[T]>,
            d: usize,
            out: &mut [f32],
            n: usize,
        ) {
            assert!(
                queries.len() == G * d
                    && T::elements(keys) >= n * d
                    && out.len() >= (G - 1) * n + n
            );
            assert!(values.is_none_or(|v| T::elements(v) >= n * d) && d.is_multiple_of(16));
            let (q, k, o) = (queries.as_ptr(), keys.as_ptr(), out.as_mut_ptr());
            let mut j = 0;
            // Rows `j + r < n`, columns `c + 16 <= d`, outputs `g * n + j + 4 <= (G - 1) * n
            // + n`, all asserted above, bound every access below.
            while j + ROWS_512 <= n {
                let mut acc = [[_mm512_setzero_ps(); ROWS_512]; G];
                for r in 0..ROWS_512 {
                    prefetch_part_row(k, values, d, j + r);
                }
                for c in (0..d).step_by(16) {
                    for r in 0..ROWS_512 {
                        // SAFETY: key row `j + r < n`, columns `c..c + 16` of `d`.
                        let key = unsafe { T::load16(k, (j + r) * d + c) };
                        for (g, acc) in acc.iter_mut().enumerate() {
                            // SAFETY: query `g < G`, columns `c..c + 16` of `d`.
                            let query = unsafe { _mm512_loadu_ps(q.add(g * d + c)) };
                            acc[r] = _mm512_fmadd_ps(query, key, acc[r]);
                        }
                    }
                }
                for (g, acc) in acc.into_iter().enumerate() {
                    // SAFETY: outputs `g * n + j..+ 4`, inside `out`.
                    unsafe { _mm_storeu_ps(o.add(g * n + j), sums_of_four(acc)) };
                }
                j += ROWS_512;
            }
            for j in j..n {
                let mut acc = [_mm512_setzero_ps(); G];
                prefetch_part_row(k, values, d, j);
                for c in (0..d).step_by(16) {
                    // SAFETY: key row `j < n`, columns `c..c + 16` of `d`.
                    let key = unsafe { T::load16(k, j * d + c) };
                    for (g, acc) in acc.iter_mut().enumerate() {
                        // SAFETY: query `g < G`, columns `c..c + 16` of `d`.
                        let query = unsafe { _mm512_loadu_ps(q.add(g * d + c)) };
                        *acc = _mm512_fmadd_ps(query, key, *acc);
                    }
                }
                for (g, acc) in acc.into_iter().enumerate() {
                    out[g * n + j] = _mm512_reduce_add_ps(acc);
                }
            }
        }

        /// Per [`BLOCK`] rows and 64 columns, `G x 4` accumulators stay in registers: each
        /// row gives every one of them an independent multiply-add.
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        unsafe fn weigh<T: Lanes, const G: usize>(
            weights: &[f32],
            values: &[T],
            d: usize,
            out: &mut [f32],
            n: usize,
        ) {
            assert!(weights.len() == G * n && T::elements(values) >= n * d && out.len() == G * d);
            assert!(d.is_multiple_of(Self::COLUMNS));
            let (w, v, o) = (weights.as_ptr(), values.as_ptr(), out.as_mut_ptr());
            out.fill(0.0);
            for start in (0..n).step_by(BLOCK) {
                let end = (start + BLOCK).min(n);
                for c in (0..d).step_by(Self::COLUMNS) {
                    let mut acc = [[_mm512_setzero_ps(); CHUNKS_512]; G];
                    // Rows `j < n`, columns `c + 64 <= d`, weights `g * n + j < G * n`, all
                    // asserted above, bound every access below.
                    for j in start..end {
                        let row = j * d + c;
                        let chunks: [__m512; CHUNKS_512] =
                            // SAFETY: row `j < n`, columns `c + 16 i..+ 16` of `d`.
                            std::array::from_fn(|i| unsafe { T::load16(v, row + 16 * i) });
                        for (g, acc) in acc.iter_mut().enumerate() {
                            // SAFETY: weight `g * n + j < G * n`.
                            let weight = _mm512_set1_ps(unsafe { *w.add(g * n + j) });
                            for (acc, chunk) in acc.iter_mut().zip(chunks) {
                                *acc = _mm512_fmadd_ps(weight, chunk, *acc);
                            }
                        }
                    }
                    for (g, acc) in acc.into_iter().enumerate() {
                        for (i, acc) in acc.into_iter().enumerate() {
                            // SAFETY: columns `c + 16 i..+ 16` of row `g` of `out` (`G * d`).
                            unsafe {
                                let at = o.add(g * d + c + 16 * i);
                                _mm512_storeu_ps(at, _mm512_add_ps(_mm512_loadu_ps(at), acc));
                            }
                        }
                    }
                }
            }
        }
    }

    /// The sums of the 16 lanes of each of `x`'s four vectors, in order: pairs of vectors
    /// interleaved and added until each 128-bit lane holds one partial sum of each vector,
    /// then the four 128-bit lanes added.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn sums_of_four(x: [__m512; 4]) -> __m128 {
        // Per 128-bit lane, [a0 + a2, b0 + b2, a1 + a3, b1 + b3] of vectors a, b.
        let ab = _mm512_add_ps(_mm512_unpacklo_ps(x[0], x[1]), _mm512_unpackhi_ps(x[0], x[1]));
        let cd = _mm512_add_ps(_mm512_unpacklo_ps(x[2], x[3]), _mm512_unpackhi_ps(x[2], x[3]));
        // Per 128-bit lane, one partial sum of each of a, b, c, d.
        let lanes = _mm512_add_ps(
            _mm512_shuffle_ps::<0b01_00_01_00>(ab, cd),
            _mm512_shuffle_ps::<0b11_10_11_10>(ab, cd),
        );
        let halves = _mm256_add_ps(
            _mm512_castps512_ps256(lanes),
            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(lanes))),
        );
        _mm_add_ps(_mm256_castps256_ps128(halves), _mm256_extractf128_ps::<1>(halves))
    }

    /// The sum of `x`'s 8 lanes.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn horizontal_sum(x: __m256) -> f32 {
        let quad = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
        let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
        _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)))
    }
}

/// `a . b`, in eight independent lanes so the compiler vectorises it.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
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
    use std::any::type_name;

    use half::{bf16, f16};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::attention::block::{attend_block, CausalBlock};
    use crate::attention::test_head::{TestEntry, TestHead};
    use crate::kv_blocks::{BlockQ4_0, BlockQ8_0};
    use crate::kv_rows::KvElement;

    const SHAPE: AttentionShape = AttentionShape { n_heads: 6, n_kv_heads: 2, head_dim: 16 };

    /// Ragged heads (`lens` entries each) of random rows stored as `T`, entry `i` standing for
    /// `1 + i % 3` tokens.
    fn heads<T: KvElement>(lens: &[usize], seed: u64) -> Vec<TestHead<T>> {
        TestHead::layer(SHAPE.head_dim, lens, 3, seed)
    }

    fn query(seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..SHAPE.n_heads * SHAPE.head_dim).map(|_| rng.random_range(-2.0..2.0)).collect()
    }

    fn opts(log_count_bias: bool) -> DecodeOptions {
        DecodeOptions { log_count_bias, accumulate: true }
    }

    fn attention<T>(heads: &[TestHead<T>]) -> Vec<f32> {
        heads.iter().flat_map(|h| h.entries.iter().map(|e| e.attention)).collect()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// The reference: the explicit softmax of [`attend_block`] over each head's widened rows,
    /// its probabilities averaged over the group's query heads (as a prompt's last query
    /// sees the cache). Returns the output and each entry's attention, head after head.
    fn explicit<H: KvHead>(
        q: &[f32],
        heads: &[H],
        shape: AttentionShape,
        log_count_bias: bool,
    ) -> (Vec<f32>, Vec<f32>) {
        let (d, group) = (shape.head_dim, shape.n_heads / shape.n_kv_heads);
        let (mut out, mut attention) = (vec![0.0; q.len()], Vec::new());
        for (h, head) in heads.iter().enumerate() {
            let n = head.entries().len();
            let (keys, values) = (head.keys().widen(0..n * d), head.values().widen(0..n * d));
            let bias: Vec<f32> =
                head.entries().iter().map(|e| (e.count().max(1) as f32).ln()).collect();
            let block = CausalBlock {
                queries: &q[h * group * d..(h + 1) * group * d],
                keys: &keys,
                head_dim: d,
                group,
                first_seen: n,
                bias: log_count_bias.then_some(&bias[..]),
                window: None,
            };
            let mut probabilities = vec![0.0; group * n];
            let out = &mut out[h * group * d..(h + 1) * group * d];
            attend_block(block, &values, &mut probabilities, out);
            let mut received = vec![0.0f32; n];
            for row in probabilities.chunks_exact(n) {
                received.iter_mut().zip(row).for_each(|(a, p)| *a += p / group as f32);
            }
            attention.extend(received);
        }
        (out, attention)
    }

    /// Split into several parts per head (ragged lengths, a tail shorter than a block), the
    /// kernel gives the explicit softmax's outputs and statistics, in every float type.
    /// Cross-path (sums in another order): bounded.
    #[test]
    fn split_parts_combine_to_the_explicit_softmax() {
        fn check<T: KvElement>() {
            for bias in [false, true] {
                let mut split_heads = heads::<T>(&[1000, 77], 3);
                let q = query(4);
                let split = Split::new(SHAPE.n_kv_heads, 4);
                assert_eq!(split.total(&split_heads), 5, "the 1000-entry head in 4 parts");
                let (expected, expected_attention) = explicit(&q, &split_heads, SHAPE, bias);
                let mut out = vec![0.0; q.len()];
                attend_split(&q, &mut split_heads, SHAPE, opts(bias), 4, true, &mut out);
                assert!(max_diff(&out, &expected) < 1e-5, "{} bias {bias}", type_name::<T>());
                assert!(max_diff(&attention(&split_heads), &expected_attention) < 1e-6);
                let total: f32 = attention(&split_heads).iter().sum();
                assert!((total - SHAPE.n_kv_heads as f32).abs() < 1e-4, "each head's sums to 1");
            }
        }
        check::<f16>();
        check::<bf16>();
        check::<f32>();
    }

    /// Run one after another on the calling thread, the parts give the parallel run's
    /// output and statistic bit for bit, step after step, with and without the statistic
    /// (identical by construction: the same parts, combined in the same order).
    #[test]
    fn parts_on_one_thread_give_the_parallel_result() {
        fn check<T: KvElement>() {
            for keep in [false, true] {
                let mut parallel = heads::<T>(&[1000, 77], 13);
                let mut serial = parallel.clone();
                assert_eq!(Split::new(SHAPE.n_kv_heads, 4).total(&parallel), 5);
                let options = DecodeOptions { accumulate: keep, ..opts(true) };
                for step in 0..3 {
                    let q = query(30 + step);
                    let (mut a, mut b) = (vec![0.0; q.len()], vec![0.0; q.len()]);
                    attend_split(&q, &mut parallel, SHAPE, options, 4, true, &mut a);
                    attend_split(&q, &mut serial, SHAPE, options, 4, false, &mut b);
                    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&a), bits(&b), "{} output, step {step}", type_name::<T>());
                    assert_eq!(bits(&attention(&parallel)), bits(&attention(&serial)));
                }
                assert_eq!(attention(&serial).iter().any(|&a| a > 0.0), keep);
            }
        }
        check::<f16>();
        check::<bf16>();
        check::<f32>();
    }

    /// Every head's parts cover its entries in order, each a whole number of blocks but
    /// the last, none shorter than MIN_PART unless its head is, about two per thread.
    #[test]
    fn parts_tile_every_head() {
        let lens = [0, 1, 255, 256, 700, 5000];
        let heads = heads::<f32>(&lens, 1);
        let split = Split::new(lens.len(), 4);
        let mut covered = vec![0; lens.len()];
        for i in 0..split.total(&heads) {
            let (h, rows) = split.part(&heads, i);
            assert_eq!(rows.start, covered[h], "part {i} follows its head's previous one");
            assert!(rows.len() >= MIN_PART.min(lens[h]) && rows.len() <= split.longest(&heads));
            assert!(rows.end == lens[h] || rows.len().is_multiple_of(BLOCK));
            covered[h] = rows.end;
        }
        assert_eq!(covered, lens);
        assert_eq!(split.count(5000), 2, "8 parts over 6 heads: 2 per head");
        assert_eq!(split.longest(&heads), 2560);
    }

    /// The fused AVX2 kernel gives the portable kernel's softmax pieces and exponentials, on
    /// f32, f16, q8_0 and q4_0 rows (the portable kernel dequantizes blocks into memory, the
    /// fused one in registers), for a group of 7 (tiles of 3, 3 and 1), an odd part (a lone
    /// last row) and a count bias. Cross-path (vector sums in another order): bounded. Runs
    /// the widths the active kernel level allows (`KVMERGER_KERNEL_LEVEL`).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_fused_kernels_match_the_portable_one() {
        fn check<T: KvElement>(width: FusedWidth, d: usize, queries: &[f32], rng: &mut StdRng) {
            let group = queries.len() / d;
            let head = TestHead::<T>::random(d, 300, 4, rng);
            // 199 rows: the 512-bit logits' groups of four rows and a tail of three.
            let rows = 37..236;
            let input = || PartInput {
                queries,
                head: &head,
                head_dim: d,
                rows: rows.clone(),
                log_count_bias: true,
            };
            let stride = group * (d + 2);
            let (mut expected, mut got) = (vec![0.0; stride], vec![0.0; stride]);
            let (mut expected_exps, mut got_exps) =
                (vec![0.0; group * rows.len()], vec![0.0; group * rows.len()]);
            part_kernel(
                input(),
                &mut expected,
                Some(&mut expected_exps),
                &mut Scratch::default(),
                false,
            );
            let (got_exps_out, scratch) = (Some(&mut got_exps[..]), &mut Scratch::default());
            assert!(fuses(head.keys(), head.values()));
            // SAFETY: the caller detected the features; the rows fuse (asserted).
            unsafe { fused_part(width, input(), &mut got, got_exps_out, scratch) };
            let case = format!("{width:?}, d {d}, {}", type_name::<T>());
            assert!(max_diff(&got[..group], &expected[..group]) < 1e-4, "{case} maxima");
            let relative = |a: &[f32], b: &[f32]| {
                let error = |(x, y): (&f32, &f32)| (x - y).abs() / y.abs().max(1.0);
                a.iter().zip(b).map(error).fold(0.0, f32::max)
            };
            assert!(relative(&got[group..], &expected[group..]) < 1e-4, "{case} sums, values");
            assert!(max_diff(&got_exps, &expected_exps) < 1e-5, "{case} exponentials");
        }
        if !crate::cpu::has_avx2_fma_f16c() {
            return;
        }
        let group = 7;
        let mut rng = StdRng::seed_from_u64(11);
        let cases = [(FusedWidth::Avx2, 32), (FusedWidth::Avx2, 64), (FusedWidth::Avx512, 64)];
        let cases = cases.into_iter().chain([(FusedWidth::Avx512, 128)]);
        for (width, d) in cases {
            if width == FusedWidth::Avx512 && !crate::cpu::has_avx512f() {
                continue;
            }
            let queries: Vec<f32> = (0..group * d).map(|_| rng.random_range(-2.0..2.0)).collect();
            check::<f32>(width, d, &queries, &mut rng);
            check::<f16>(width, d, &queries, &mut rng);
            check::<BlockQ8_0>(width, d, &queries, &mut rng);
            check::<BlockQ4_0>(width, d, &queries, &mut rng);
        }
    }

    /// The tabulated biases are `log_count`'s values, bit for bit, below and above the table.
    #[test]
    fn tabulated_log_counts_are_the_computed_ones() {
        let meta: Vec<TestEntry> = (0..3 * TABULATED_COUNTS as u32)
            .map(|count| TestEntry { count, attention: 0.0 })
            .collect();
        let mut biases = Vec::new();
        log_count_biases(&meta, &mut biases);
        for (m, b) in meta.iter().zip(&biases) {
            assert_eq!(b.to_bits(), log_count(m.count).to_bits(), "count {}", m.count);
        }
        assert_eq!((biases[0], biases[1]), (0.0, 0.0));
    }

    /// Keeping the statistic (H2O) or not (the full cache, KVMerger after its prompt) leaves
    /// the attention output bit for bit the same, step after step (the kept exponentials'
    /// buffer is reused).
    #[test]
    fn the_statistic_does_not_change_the_output() {
        let mut with = heads::<f16>(&[900, 450], 7);
        let mut without = with.clone();
        for step in 0..3 {
            let q = query(20 + step);
            let stats = opts(true);
            let plain = DecodeOptions { accumulate: false, ..stats };
            let (mut a, mut b) = (vec![0.0; q.len()], vec![0.0; q.len()]);
            decode_attention(&q, &mut with, SHAPE, stats, &mut a);
            decode_attention(&q, &mut without, SHAPE, plain, &mut b);
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "step {step}");
            assert!(attention(&with).iter().any(|&a| a > 0.0));
            assert!(attention(&without).iter().all(|&a| a == 0.0));
        }
    }

    /// An f16 (bf16) cache holding the same rows as an f32 one attends within the rounding of
    /// its keys and values: f16 rounds to 2^-11 relative, bf16 to 2^-8 (cross-path: bounded).
    #[test]
    fn half_precision_caches_agree_with_f32() {
        fn decode<T: KvElement>(q: &[f32]) -> Vec<f32> {
            let mut out = vec![0.0; q.len()];
            decode_attention(q, &mut heads::<T>(&[600, 600], 5), SHAPE, opts(false), &mut out);
            out
        }
        let q = query(9);
        let expected = decode::<f32>(&q);
        for (out, name, tolerance) in
            [(decode::<f16>(&q), "f16", 5e-3), (decode::<bf16>(&q), "bf16", 4e-2)]
        {
            let diff = max_diff(&out, &expected);
            assert!(diff < tolerance, "{name}: {diff}");
        }
    }

    /// On quantized rows (64-wide heads: two blocks a row), the decode kernel at the active
    /// level gives the explicit softmax over the dequantized rows, and both stay within the
    /// quantization's error of f32 rows holding the same values. Cross-path: bounded.
    #[test]
    fn quantized_caches_decode_as_the_explicit_softmax_and_near_f32() {
        const WIDE: AttentionShape = AttentionShape { n_heads: 6, n_kv_heads: 2, head_dim: 64 };
        fn check<T: KvElement>(q: &[f32], exact: &[f32], tolerance: f32) {
            let name = type_name::<T>();
            let mut decode = TestHead::<T>::layer(WIDE.head_dim, &[700, 333], 3, 21);
            let (expected, expected_attention) = explicit(q, &decode, WIDE, true);
            let mut out = vec![0.0; q.len()];
            decode_attention(q, &mut decode, WIDE, opts(true), &mut out);
            assert!(max_diff(&out, &expected) < 1e-5, "{name}: decode against explicit");
            assert!(max_diff(&attention(&decode), &expected_attention) < 1e-6, "{name}");
            let error = max_diff(&out, exact);
            assert!(error < tolerance, "{name}: {error} from f32");
            assert!(error > 0.0, "{name}: quantization changed nothing");
        }
        let mut rng = StdRng::seed_from_u64(22);
        let q: Vec<f32> = (0..6 * 64).map(|_| rng.random_range(-1.0..1.0)).collect();
        let mut wide = TestHead::<f32>::layer(WIDE.head_dim, &[700, 333], 3, 21);
        let mut exact = vec![0.0; q.len()];
        decode_attention(&q, &mut wide, WIDE, opts(true), &mut exact);
        check::<BlockQ8_0>(&q, &exact, 5e-3);
        check::<BlockQ4_0>(&q, &exact, 8e-2);
    }
}
