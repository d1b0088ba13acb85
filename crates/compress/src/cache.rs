//! The ragged KV cache: one contiguous key/value store per (layer, kv head).
//!
//! Compression methods rewrite each head independently, so heads of the same layer may
//! hold different numbers of entries. Every entry remembers the logical position it was
//! created at (a merged entry takes its pivot's), how many tokens were folded into it, and
//! the attention it has received; the engine reads positions and counts, methods read the
//! attention. Keys and values are stored in the cache's [`KvDtype`] (f16 by default) and
//! read and written as f32. A head knows how its rows are stored, not their basis: in a
//! rotated cache ([`KvDtype::rotated`]) every row a head holds is rotated, methods compute on
//! the rotated rows (an orthonormal rotation keeps dot products, norms, distances and
//! weighted sums), and only the model's side of the cache rotates: the new rows it appends
//! ([`HeadCache::push_rotated`]), the queries and the attention output.

use std::borrow::Cow;

use kvmerger_kernels::RowsRef;

use crate::dtype::{KvDtype, Rows};
use crate::error::{CompressError, Result};
use crate::queries::{QueryMoments, QueryStatistics};
use crate::stats::EvictionWindow;

/// Metadata of one cached entry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EntryMeta {
    /// Logical position the entry was created at (the pivot's for a merged entry).
    pub position: usize,
    /// Number of original tokens folded into this entry (1 for an unmerged token).
    pub count: u32,
    /// Accumulated attention received (`A_j`), averaged over the query heads of the group.
    pub attention: f32,
}

impl EntryMeta {
    pub fn new(position: usize) -> Self {
        Self { position, count: 1, attention: 0.0 }
    }
}

/// One (layer, kv head) cache. Keys and values are stored row-major, `[len, head_dim]`, in
/// one [`KvDtype`]; every accessor takes and gives f32 rows, narrowing on the way in.
///
/// Appending uses `Vec`'s amortised growth, so a decode step never copies the cache;
/// [`HeadCache::shrink_to_fit`] returns memory after a compression.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadCache {
    head_dim: usize,
    /// `[len, head_dim]`
    keys: Rows,
    /// `[len, head_dim]`
    values: Rows,
    meta: Vec<EntryMeta>,
    /// `(statistic, [len])`: prompt-only attention statistics, one row per distinct
    /// statistic a method asked for (SnapKV's windows, CaM's eviction windows); empty
    /// otherwise, and dropped by [`HeadCache::shrink_to_fit`] after compression.
    windows: Vec<(StatRow, Vec<f32>)>,
    /// Prompt-only query statistics, one per distinct request (Expected Attention's);
    /// dropped with the rows above.
    queries: Vec<(QueryStatistics, QueryMoments)>,
}

/// Which prompt-only statistic a row of a [`HeadCache`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StatRow {
    /// Attention received from the last `n` queries of the prompt.
    Window(usize),
    /// Attention received by the time the entry was evicted.
    Received(EvictionWindow),
    /// Summed attention its merge targets had received at that time.
    Targets(EvictionWindow),
    /// Most attention received from a reconstruction of the context (KVzip).
    Reconstruction,
}

impl HeadCache {
    pub fn new(head_dim: usize, dtype: KvDtype) -> Self {
        Self::with_capacity(head_dim, dtype, 0)
    }

    pub fn with_capacity(head_dim: usize, dtype: KvDtype, entries: usize) -> Self {
        Self {
            head_dim,
            keys: Rows::with_capacity(dtype, entries * head_dim),
            values: Rows::with_capacity(dtype, entries * head_dim),
            meta: Vec::with_capacity(entries),
            windows: Vec::new(),
            queries: Vec::new(),
        }
    }

    /// Builds a cache from whole key/value matrices (`[len, head_dim]` each), stored in
    /// `dtype`.
    pub fn from_parts(
        head_dim: usize,
        dtype: KvDtype,
        keys: Vec<f32>,
        values: Vec<f32>,
        meta: Vec<EntryMeta>,
    ) -> Result<Self> {
        if keys.len() != meta.len() * head_dim || values.len() != keys.len() {
            return Err(CompressError::Shape(format!(
                "{} entries of dim {head_dim} need {} floats, got keys {} values {}",
                meta.len(),
                meta.len() * head_dim,
                keys.len(),
                values.len()
            )));
        }
        Ok(Self {
            head_dim,
            keys: Rows::from_f32(dtype, keys),
            values: Rows::from_f32(dtype, values),
            meta,
            windows: Vec::new(),
            queries: Vec::new(),
        })
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    pub fn len(&self) -> usize {
        self.meta.len()
    }
    pub fn is_empty(&self) -> bool {
        self.meta.is_empty()
    }
    /// How keys and values are stored (a plain dtype: see [`KvDtype::storage`]).
    pub fn dtype(&self) -> KvDtype {
        self.keys.dtype()
    }
    /// Stores keys and values as `dtype` stores them from now on, converting those held
    /// (rounded to nearest, or quantized, when narrower; widening is exact). The rows'
    /// basis does not change.
    pub fn convert(&mut self, dtype: KvDtype) {
        self.keys.convert(dtype);
        self.values.convert(dtype);
    }
    /// `[len, head_dim]` in f32: borrowed when stored in f32, else widened (a method that
    /// reads many rows takes them all at once).
    pub fn keys(&self) -> Cow<'_, [f32]> {
        self.keys.view().widen(0..self.keys.len())
    }
    /// `[len, head_dim]` in f32, as [`Self::keys`].
    pub fn values(&self) -> Cow<'_, [f32]> {
        self.values.view().widen(0..self.values.len())
    }
    /// `[len, head_dim]` as stored, for kernels that widen blocks themselves.
    pub fn stored_keys(&self) -> RowsRef<'_> {
        self.keys.view()
    }
    /// `[len, head_dim]` as stored.
    pub fn stored_values(&self) -> RowsRef<'_> {
        self.values.view()
    }
    pub fn meta(&self) -> &[EntryMeta] {
        &self.meta
    }
    pub fn meta_mut(&mut self) -> &mut [EntryMeta] {
        &mut self.meta
    }
    /// Entry `i`'s key, `[head_dim]`, in f32.
    pub fn key(&self, i: usize) -> Cow<'_, [f32]> {
        self.keys.view().widen(self.row(i))
    }
    /// Entry `i`'s value, `[head_dim]`, in f32.
    pub fn value(&self, i: usize) -> Cow<'_, [f32]> {
        self.values.view().widen(self.row(i))
    }
    /// Adds entry `from`'s value divided by `divisor` to the value of each entry of `to`
    /// (which must not hold `from`), computing in f32 and allocating nothing.
    pub fn spread_value(&mut self, from: usize, to: std::ops::Range<usize>, divisor: f32) {
        assert!(!to.contains(&from), "an entry's value spreads to other entries");
        self.values.spread_row(self.head_dim, from, to, divisor);
    }
    fn row(&self, i: usize) -> std::ops::Range<usize> {
        i * self.head_dim..(i + 1) * self.head_dim
    }

    /// Attention each entry received from the last `window` prompt queries, `[len]`, if
    /// the engine recorded that window.
    pub fn window_attention(&self, window: usize) -> Option<&[f32]> {
        self.stat(StatRow::Window(window))
    }

    /// The row of `window` statistics, `[len]`, created as zeros if absent (for the engine
    /// accumulating it).
    pub fn window_attention_mut(&mut self, window: usize) -> &mut [f32] {
        self.stat_mut(StatRow::Window(window))
    }

    /// Sets the `window` statistics, `[len]`.
    pub fn set_window_attention(&mut self, window: usize, received: Vec<f32>) -> Result<()> {
        self.set_stat(StatRow::Window(window), received)
    }

    /// `([len], [len])`: for each entry, the attention it had received when the sliding
    /// window `eviction` evicted it, and the summed attention its merge targets had
    /// received by then (see [`EvictionWindow`]), if the engine recorded them.
    pub fn eviction_attention(&self, eviction: EvictionWindow) -> Option<(&[f32], &[f32])> {
        Some((self.stat(StatRow::Received(eviction))?, self.stat(StatRow::Targets(eviction))?))
    }

    /// The rows of `eviction` statistics, received then targets, created as zeros if absent
    /// (for the engine accumulating them).
    pub fn eviction_attention_mut(&mut self, eviction: EvictionWindow) -> (&mut [f32], &mut [f32]) {
        self.stat_mut(StatRow::Received(eviction));
        self.stat_mut(StatRow::Targets(eviction));
        let (mut received, mut targets) = (None, None);
        for (key, row) in &mut self.windows {
            if *key == StatRow::Received(eviction) {
                received = Some(row.as_mut_slice());
            } else if *key == StatRow::Targets(eviction) {
                targets = Some(row.as_mut_slice());
            }
        }
        match (received, targets) {
            (Some(received), Some(targets)) => (received, targets),
            _ => unreachable!("both rows were created above"),
        }
    }

    /// Sets the `eviction` statistics, `[len]` each.
    pub fn set_eviction_attention(
        &mut self,
        eviction: EvictionWindow,
        received: Vec<f32>,
        targets: Vec<f32>,
    ) -> Result<()> {
        self.set_stat(StatRow::Received(eviction), received)?;
        self.set_stat(StatRow::Targets(eviction), targets)
    }

    /// The most attention each entry received from the queries reconstructing the context
    /// (KVzip's score), `[len]`, if the engine ran that pass.
    pub fn reconstruction_attention(&self) -> Option<&[f32]> {
        self.stat(StatRow::Reconstruction)
    }

    /// The reconstruction scores, `[len]`, created as zeros if absent (for the engine
    /// recording them).
    pub fn reconstruction_attention_mut(&mut self) -> &mut [f32] {
        self.stat_mut(StatRow::Reconstruction)
    }

    /// Sets the reconstruction scores, `[len]`.
    pub fn set_reconstruction_attention(&mut self, scores: Vec<f32>) -> Result<()> {
        self.set_stat(StatRow::Reconstruction, scores)
    }

    /// The query statistics `which`, if the engine recorded them.
    pub fn query_moments(&self, which: QueryStatistics) -> Option<&QueryMoments> {
        self.queries.iter().find(|(k, _)| *k == which).map(|(_, m)| m)
    }

    /// The query statistics `which`, created empty for `group` query heads if absent (for
    /// the engine accumulating them).
    pub fn query_moments_mut(&mut self, which: QueryStatistics, group: usize) -> &mut QueryMoments {
        let at = match self.queries.iter().position(|(k, _)| *k == which) {
            Some(at) => at,
            None => {
                let moments = QueryMoments::new(group, self.head_dim, which.covariance);
                self.queries.push((which, moments));
                self.queries.len() - 1
            }
        };
        &mut self.queries[at].1
    }

    fn stat(&self, key: StatRow) -> Option<&[f32]> {
        self.windows.iter().find(|(k, _)| *k == key).map(|(_, a)| a.as_slice())
    }

    fn stat_mut(&mut self, key: StatRow) -> &mut [f32] {
        let (len, room) = (self.len(), self.meta.capacity());
        let at = match self.windows.iter().position(|(k, _)| *k == key) {
            Some(at) => at,
            None => {
                self.windows.push((key, Vec::with_capacity(room)));
                self.windows.len() - 1
            }
        };
        let row = &mut self.windows[at].1;
        row.reserve_exact(room.saturating_sub(row.len()));
        row.resize(len, 0.0);
        row
    }

    fn set_stat(&mut self, key: StatRow, received: Vec<f32>) -> Result<()> {
        if received.len() != self.len() {
            return Err(CompressError::Shape(format!(
                "attention statistics of {} entries for a head of {}",
                received.len(),
                self.len()
            )));
        }
        self.windows.retain(|(k, _)| *k != key);
        self.windows.push((key, received));
        Ok(())
    }

    /// Appends one entry (amortised O(1)).
    pub fn push(&mut self, key: &[f32], value: &[f32], meta: EntryMeta) {
        debug_assert_eq!(key.len(), self.head_dim);
        debug_assert_eq!(value.len(), self.head_dim);
        self.keys.extend_from_f32(key);
        self.values.extend_from_f32(value);
        self.meta.push(meta);
        // Statistic rows grow with the entries' capacity (which a server sizes in advance),
        // not by doubling on their own, so they never hold more than their share of it.
        let room = self.meta.capacity();
        for (_, row) in &mut self.windows {
            row.reserve_exact(room.saturating_sub(row.len()));
            row.push(0.0);
        }
    }

    /// Appends a new token's key and value, given in the model's basis, to a cache stored
    /// Hadamard-rotated: both are rotated (see [`crate::hadamard`]), then stored.
    pub fn push_rotated(&mut self, key: &[f32], value: &[f32], meta: EntryMeta) {
        let d = self.head_dim;
        let mut rotated = [0.0f32; 2 * ROTATION_BUFFER];
        if d > ROTATION_BUFFER {
            let (mut key, mut value) = (key.to_vec(), value.to_vec());
            crate::hadamard::rotate(&mut key);
            crate::hadamard::rotate(&mut value);
            return self.push(&key, &value, meta);
        }
        let (k, v) = rotated.split_at_mut(ROTATION_BUFFER);
        let (k, v) = (&mut k[..d], &mut v[..d]);
        k.copy_from_slice(key);
        v.copy_from_slice(value);
        crate::hadamard::rotate(k);
        crate::hadamard::rotate(v);
        self.push(k, v, meta);
    }

    /// Keeps only the entries at `keep` (strictly increasing indices), in place.
    pub fn retain_indices(&mut self, keep: &[usize]) {
        debug_assert!(keep.windows(2).all(|w| w[0] < w[1]), "keep must be strictly increasing");
        for (dst, &src) in keep.iter().enumerate() {
            self.move_entry(src, dst);
        }
        self.truncate(keep.len());
    }

    /// Removes one entry, shifting later entries down.
    pub fn remove(&mut self, index: usize) {
        let d = self.head_dim;
        self.keys.remove_range(index * d..(index + 1) * d);
        self.values.remove_range(index * d..(index + 1) * d);
        self.meta.remove(index);
        self.windows.iter_mut().for_each(|(_, a)| {
            a.remove(index);
        });
    }

    /// Removes one entry by moving another into its place: two rows copied instead of every
    /// later row shifted, for a decode-time policy to which the order of the older entries
    /// means nothing. The newest (last) entry stays last; entries keep their positions.
    pub fn remove_unordered(&mut self, index: usize) {
        let last = self.len() - 1;
        if index < last {
            self.move_entry(last - 1, index);
            self.move_entry(last, last - 1);
        }
        self.truncate(last);
    }

    /// Keeps the first `len` entries (and their statistics).
    pub fn truncate(&mut self, len: usize) {
        let d = self.head_dim;
        self.keys.truncate(len * d);
        self.values.truncate(len * d);
        self.meta.truncate(len);
        self.windows.iter_mut().for_each(|(_, a)| a.truncate(len));
    }

    /// Copies entry `src` over entry `dst`.
    fn move_entry(&mut self, src: usize, dst: usize) {
        if src == dst {
            return;
        }
        let d = self.head_dim;
        self.keys.copy_within(src * d..(src + 1) * d, dst * d);
        self.values.copy_within(src * d..(src + 1) * d, dst * d);
        self.meta[dst] = self.meta[src];
        self.windows.iter_mut().for_each(|(_, a)| a[dst] = a[src]);
    }

    /// Releases spare capacity so resident memory follows the entries kept.
    pub fn shrink_to_fit(&mut self) {
        self.keys.shrink_to_fit();
        self.values.shrink_to_fit();
        self.meta.shrink_to_fit();
        self.windows = Vec::new();
        self.queries = Vec::new();
    }

    /// Makes room for exactly `entries` more entries, so that appending them neither
    /// reallocates nor holds more than [`Self::resident_bytes`] then says (a server's
    /// memory pool reserves that room in advance).
    pub fn reserve_exact(&mut self, entries: usize) {
        self.keys.reserve_exact(entries * self.head_dim);
        self.values.reserve_exact(entries * self.head_dim);
        self.meta.reserve_exact(entries);
    }

    /// Bytes this head holds in memory (allocated capacity, not just length): keys and
    /// values at their dtype's size, metadata and statistics rows in f32.
    pub fn resident_bytes(&self) -> usize {
        let windows: usize = self.windows.iter().map(|(_, a)| a.capacity()).sum();
        let queries: usize = self.queries.iter().map(|(_, m)| m.resident_bytes()).sum();
        queries
            + self.keys.resident_bytes()
            + self.values.resident_bytes()
            + windows * std::mem::size_of::<f32>()
            + self.meta.capacity() * std::mem::size_of::<EntryMeta>()
    }

    /// Bytes one entry's key and value take in `dtype` (`head_dim` elements each, a
    /// quantized row's scales included).
    pub fn entry_kv_bytes(head_dim: usize, dtype: KvDtype) -> usize {
        2 * dtype.row_bytes(head_dim)
    }
}

/// The widest head [`HeadCache::push_rotated`] rotates on the stack (wider ones allocate).
const ROTATION_BUFFER: usize = 256;

/// The whole model's cache: `layers x kv_heads` ragged head caches plus the logical
/// position of the next token.
#[derive(Debug, Clone, PartialEq)]
pub struct KvCache {
    /// `[layer][kv_head]`
    pub layers: Vec<Vec<HeadCache>>,
    /// Tokens seen so far: the logical position the next token gets. Not the cache length.
    pub n_seen: usize,
    /// Whether attention adds `ln(count)` to a merged entry's logit (KVMerger `mass = log_count`).
    pub log_count_bias: bool,
    /// Per-layer entry budget fixed when the prompt was compressed; decode-time methods
    /// keep each head within it. `None` before compression (or for the full cache).
    pub budgets: Option<Vec<usize>>,
    /// How every head stores its keys and values.
    pub dtype: KvDtype,
}

impl KvCache {
    pub fn new(n_layers: usize, n_kv_heads: usize, head_dim: usize, dtype: KvDtype) -> Self {
        Self::with_capacity(n_layers, n_kv_heads, head_dim, dtype, 0)
    }

    /// An empty cache whose heads have room for `entries` entries each.
    pub fn with_capacity(
        n_layers: usize,
        n_kv_heads: usize,
        head_dim: usize,
        dtype: KvDtype,
        entries: usize,
    ) -> Self {
        Self {
            layers: (0..n_layers)
                .map(|_| {
                    (0..n_kv_heads)
                        .map(|_| HeadCache::with_capacity(head_dim, dtype, entries))
                        .collect()
                })
                .collect(),
            n_seen: 0,
            log_count_bias: false,
            budgets: None,
            dtype,
        }
    }

    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// Bytes resident in every head's buffers.
    pub fn resident_bytes(&self) -> usize {
        self.layers.iter().flatten().map(HeadCache::resident_bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(n: usize, d: usize) -> HeadCache {
        filled_as(n, d, KvDtype::F32)
    }

    fn filled_as(n: usize, d: usize, dtype: KvDtype) -> HeadCache {
        let mut h = HeadCache::new(d, dtype);
        for i in 0..n {
            let k: Vec<f32> = (0..d).map(|j| (i * d + j) as f32).collect();
            let v: Vec<f32> = k.iter().map(|x| -x).collect();
            h.push(&k, &v, EntryMeta::new(i));
        }
        h
    }

    #[test]
    fn retain_keeps_rows_and_metadata_in_order() {
        let mut h = filled(6, 3);
        h.retain_indices(&[0, 2, 5]);
        assert_eq!(h.len(), 3);
        assert_eq!(*h.key(1), [6.0, 7.0, 8.0]);
        assert_eq!(*h.value(2), [-15.0, -16.0, -17.0]);
        assert_eq!(h.meta().iter().map(|m| m.position).collect::<Vec<_>>(), vec![0, 2, 5]);
    }

    #[test]
    fn shrink_returns_memory_to_the_kept_size() {
        let mut h = filled(100, 8);
        let before = h.resident_bytes();
        h.retain_indices(&(0..10).collect::<Vec<_>>());
        h.shrink_to_fit();
        assert!(h.resident_bytes() < before / 5);
        assert_eq!(h.resident_bytes(), 10 * 8 * 4 * 2 + 10 * std::mem::size_of::<EntryMeta>());
    }

    #[test]
    fn statistic_rows_hold_no_more_than_the_entries_capacity() {
        let (n, d) = (100, 8);
        let mut h = HeadCache::with_capacity(d, KvDtype::F32, n);
        let (k, v) = (vec![1.0; d], vec![2.0; d]);
        (0..16).for_each(|i| h.push(&k, &v, EntryMeta::new(i)));
        // Rows created part-way through the prompt, as a chunked prefill does.
        h.eviction_attention_mut(EvictionWindow { reach: 4, span: 2 });
        (16..n).for_each(|i| h.push(&k, &v, EntryMeta::new(i)));
        h.window_attention_mut(8);
        let entry = 2 * d * 4 + std::mem::size_of::<EntryMeta>();
        assert_eq!(h.resident_bytes(), n * (entry + 3 * 4));
    }

    #[test]
    fn from_parts_rejects_bad_shapes() {
        let parts = |n| {
            HeadCache::from_parts(
                4,
                KvDtype::F16,
                vec![0.0; 8],
                vec![0.0; 8],
                vec![EntryMeta::new(0); n],
            )
        };
        assert!(parts(1).is_err());
        assert!(parts(2).is_ok());
    }

    #[test]
    fn half_precision_heads_hold_half_the_key_value_bytes() {
        let (n, d) = (50, 8);
        let meta = n * std::mem::size_of::<EntryMeta>();
        let mut full = filled_as(n, d, KvDtype::F32);
        full.shrink_to_fit();
        for dtype in [KvDtype::F16, KvDtype::Bf16] {
            let mut half = filled_as(n, d, dtype);
            half.shrink_to_fit();
            assert_eq!(half.resident_bytes() - meta, (full.resident_bytes() - meta) / 2);
            assert_eq!(half.resident_bytes() - meta, n * HeadCache::entry_kv_bytes(d, dtype));
        }
    }

    #[test]
    fn every_operation_keeps_rows_in_the_stored_dtype() {
        // Small integers are exact in every float dtype, so rows compare exactly.
        for dtype in KvDtype::FLOATS {
            let mut h = filled_as(8, 2, dtype);
            h.remove(1);
            h.retain_indices(&[0, 2, 3, 6]);
            h.spread_value(0, 1..3, 0.5);
            assert_eq!(h.dtype(), dtype);
            assert_eq!(*h.key(1), [6.0, 7.0], "{dtype}");
            assert_eq!((&*h.value(1), &*h.value(2)), (&[-6.0, -9.0][..], &[-8.0, -11.0][..]));
            assert_eq!(*h.value(3), [-14.0, -15.0], "{dtype}: outside the range, unchanged");
            assert_eq!(h.meta().iter().map(|m| m.position).collect::<Vec<_>>(), vec![0, 3, 4, 7]);
            let before = h.clone();
            h.convert(KvDtype::F32);
            assert_eq!((h.keys(), h.values()), (before.keys(), before.values()), "{dtype}");
            h.convert(dtype);
            assert_eq!(h, before, "{dtype}: widening then narrowing is exact");
        }
    }

    /// A quantized head counts its blocks' bytes, scales included: 34 (q8_0) or 18 (q4_0)
    /// per 32 elements of each key and value.
    #[test]
    fn quantized_heads_count_their_scales() {
        let (n, d) = (40, 64);
        let meta = n * std::mem::size_of::<EntryMeta>();
        for (dtype, block) in [(KvDtype::Q8_0, 34), (KvDtype::Q4_0, 18)] {
            let mut head = filled_as(n, d, dtype);
            head.shrink_to_fit();
            assert_eq!(head.resident_bytes() - meta, n * 2 * (d / 32) * block, "{dtype}");
            assert_eq!(
                HeadCache::entry_kv_bytes(d, dtype.with_rotation(true)),
                2 * (d / 32) * block
            );
        }
    }

    /// Rows appended to a rotated cache are stored rotated: the stored key's dot product with
    /// a rotated query is the plain one's.
    #[test]
    fn rotated_pushes_store_rotated_rows() {
        let d = 64;
        let key: Vec<f32> = (0..d).map(|i| (i as f32 * 0.37).sin()).collect();
        let value: Vec<f32> = (0..d).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut head = HeadCache::new(d, KvDtype::F32);
        head.push_rotated(&key, &value, EntryMeta::new(0));
        let mut expected = key.clone();
        crate::hadamard::rotate(&mut expected);
        assert_eq!(*head.key(0), *expected);
        let mut query: Vec<f32> = (0..d).map(|i| i as f32 / d as f32).collect();
        let plain: f32 = query.iter().zip(&key).map(|(a, b)| a * b).sum();
        crate::hadamard::rotate(&mut query);
        let rotated: f32 = query.iter().zip(head.key(0).iter()).map(|(a, b)| a * b).sum();
        assert!((plain - rotated).abs() < 1e-4, "{plain} vs {rotated}");
        let mut back = head.value(0).into_owned();
        crate::hadamard::rotate(&mut back);
        assert!(back.iter().zip(&value).all(|(a, b)| (a - b).abs() < 1e-5));
    }
}
