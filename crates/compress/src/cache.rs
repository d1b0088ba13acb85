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
//!
//! A head may also store its keys minus a fixed vector, its key center (a quantized cache
//! does, see [`KvDtype::centered`]): a query's score against every stored key then drops by
//! the same `q . c`, so softmax, the attention output and every statistic computed from the
//! weights are unchanged, while the per-channel offsets that a model's key biases put in
//! every key (and that would set each block's scale) are gone before quantization. Methods
//! never see the shift: [`HeadCache::keys`] and [`HeadCache::key`] add the center back.

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
    /// `[head_dim]` subtracted from every key before it is stored, in the stored basis;
    /// empty for none. Fixed once set (see [`HeadCache::center_keys_on`]).
    key_center: Vec<f32>,
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
            key_center: Vec::new(),
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
            key_center: Vec::new(),
            windows: Vec::new(),
            queries: Vec::new(),
        })
    }

    /// A head stored as this one is (dtype and key center) holding the given entries:
    /// whole key/value matrices in f32 (`[len, head_dim]` each, true keys), as a method that
    /// computes new rows rebuilds a head.
    pub fn with_entries(
        &self,
        mut keys: Vec<f32>,
        values: Vec<f32>,
        meta: Vec<EntryMeta>,
    ) -> Result<Self> {
        self.center(&mut keys);
        let mut head = Self::from_parts(self.head_dim, self.dtype(), keys, values, meta)?;
        head.key_center = self.key_center.clone();
        Ok(head)
    }

    /// Fixes this head's key center, in the stored basis, from the first keys it will hold
    /// (`keys`, in the model's basis; `rotate` when the head stores Hadamard-rotated rows):
    /// their per-channel mean, which removes a channel's constant offset (on
    /// Qwen2.5-Coder-0.5B's dev seeds it beat the per-channel midrange: docs/eval-kv-dtype).
    /// Only an empty head without a center takes one: a center set later would have to
    /// requantize every stored key.
    pub fn center_keys_on<'k>(&mut self, keys: impl Iterator<Item = &'k [f32]>, rotate: bool) {
        if !self.is_empty() || !self.key_center.is_empty() {
            return;
        }
        let (mut sum, mut n) = (vec![0.0f64; self.head_dim], 0usize);
        for key in keys {
            sum.iter_mut().zip(key).for_each(|(s, &k)| *s += k as f64);
            n += 1;
        }
        if n == 0 {
            return;
        }
        let mut center: Vec<f32> = sum.iter().map(|s| (s / n as f64) as f32).collect();
        if center.iter().any(|c| !c.is_finite()) {
            return;
        }
        if rotate {
            crate::hadamard::rotate(&mut center);
        }
        self.key_center = center;
    }

    /// The vector subtracted from every stored key (`[head_dim]`, stored basis), if any.
    pub fn key_center(&self) -> Option<&[f32]> {
        (!self.key_center.is_empty()).then_some(self.key_center.as_slice())
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
    /// `[len, head_dim]` in f32, the true keys (the center added back): borrowed when
    /// stored in f32 without a center, else widened (a method that reads many rows takes
    /// them all at once).
    pub fn keys(&self) -> Cow<'_, [f32]> {
        self.uncentered(self.keys.view().widen(0..self.keys.len()))
    }
    /// `[len, head_dim]` in f32, as [`Self::keys`].
    pub fn values(&self) -> Cow<'_, [f32]> {
        self.values.view().widen(0..self.values.len())
    }
    /// `[len, head_dim]` as stored, for kernels that widen blocks themselves: each row is
    /// the key minus [`Self::key_center`], which shifts all of a query's scores alike.
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
    /// Entry `i`'s key, `[head_dim]`, in f32 (the true key).
    pub fn key(&self, i: usize) -> Cow<'_, [f32]> {
        self.uncentered(self.keys.view().widen(self.row(i)))
    }
    /// Subtracts the key center from each row of `keys` (`[n, head_dim]`, true keys), as
    /// they are stored; nothing without a center.
    fn center(&self, keys: &mut [f32]) {
        if self.key_center.is_empty() {
            return;
        }
        for row in keys.chunks_exact_mut(self.head_dim) {
            row.iter_mut().zip(&self.key_center).for_each(|(k, c)| *k -= c);
        }
    }
    /// Stored key rows with the center added back.
    fn uncentered<'a>(&self, stored: Cow<'a, [f32]>) -> Cow<'a, [f32]> {
        if self.key_center.is_empty() {
            return stored;
        }
        let mut keys = stored.into_owned();
        for row in keys.chunks_exact_mut(self.head_dim) {
            row.iter_mut().zip(&self.key_center).for_each(|(k, c)| *k += c);
        }
        Cow::Owned(keys)
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
        if self.key_center.is_empty() {
            self.keys.extend_from_f32(key);
        } else {
            let mut on_stack = [0.0f32; ROW_BUFFER];
            let mut on_heap = Vec::new();
            let centered = if key.len() <= ROW_BUFFER {
                &mut on_stack[..key.len()]
            } else {
                on_heap.resize(key.len(), 0.0);
                on_heap.as_mut_slice()
            };
            centered.copy_from_slice(key);
            self.center(centered);
            self.keys.extend_from_f32(centered);
        }
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
        let mut rotated = [0.0f32; 2 * ROW_BUFFER];
        if d > ROW_BUFFER {
            let (mut key, mut value) = (key.to_vec(), value.to_vec());
            crate::hadamard::rotate(&mut key);
            crate::hadamard::rotate(&mut value);
            return self.push(&key, &value, meta);
        }
        let (k, v) = rotated.split_at_mut(ROW_BUFFER);
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
        self.key_center.shrink_to_fit();
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
    /// values at their dtype's size, metadata, statistics rows and the key center in f32.
    pub fn resident_bytes(&self) -> usize {
        let windows: usize = self.windows.iter().map(|(_, a)| a.capacity()).sum();
        let queries: usize = self.queries.iter().map(|(_, m)| m.resident_bytes()).sum();
        queries
            + self.keys.resident_bytes()
            + self.values.resident_bytes()
            + (windows + self.key_center.capacity()) * std::mem::size_of::<f32>()
            + self.meta.capacity() * std::mem::size_of::<EntryMeta>()
    }

    /// Bytes one entry's key and value take in `dtype` (`head_dim` elements each, a
    /// quantized row's scales included).
    pub fn entry_kv_bytes(head_dim: usize, dtype: KvDtype) -> usize {
        2 * dtype.row_bytes(head_dim)
    }

    /// Bytes a head holds whatever its length in `dtype`: the key center of a centered one.
    pub fn fixed_bytes(head_dim: usize, dtype: KvDtype) -> usize {
        if dtype.centered() {
            head_dim * std::mem::size_of::<f32>()
        } else {
            0
        }
    }
}

/// The widest head whose new rows are rotated or centered on the stack (wider ones allocate).
const ROW_BUFFER: usize = 256;

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

    /// Keys with a large fixed offset in a few channels, as a model's key biases put there,
    /// plus noise of unit size: `n` rows of `d`.
    fn offset_keys(n: usize, d: usize, seed: u64) -> Vec<Vec<f32>> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let offset: Vec<f32> = (0..d)
            .map(|j| if j % 16 == 5 { 60.0 - j as f32 } else { 0.3 * j as f32 / d as f32 })
            .collect();
        (0..n)
            .map(|_| offset.iter().map(|o| o + rng.random_range(-1.0f32..1.0)).collect())
            .collect()
    }

    fn softmax_scores(query: &[f32], keys: &[f32], d: usize) -> Vec<f64> {
        let scores: Vec<f64> = keys
            .chunks_exact(d)
            .map(|k| k.iter().zip(query).map(|(a, b)| (*a as f64) * (*b as f64)).sum())
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = scores.iter().map(|s| (s - max).exp()).sum();
        scores.iter().map(|s| (s - max).exp() / sum).collect()
    }

    /// A centered head's stored keys give every query the attention weights (and so the
    /// output) of the true keys, to f32 rounding; `keys()` and `key(i)` are the true keys,
    /// and a head rebuilt from them keeps the center.
    #[test]
    fn centering_leaves_attention_weights_unchanged() {
        let (n, d) = (48, 64);
        let keys = offset_keys(n, d, 5);
        let value =
            |i: usize| -> Vec<f32> { (0..d).map(|j| ((i * 7 + j) % 11) as f32 - 5.0).collect() };
        for rotate in [false, true] {
            let (mut centered, mut plain) =
                (HeadCache::new(d, KvDtype::F32), HeadCache::new(d, KvDtype::F32));
            centered.center_keys_on(keys[..16].iter().map(Vec::as_slice), rotate);
            let center = centered.key_center().expect("an empty head takes a center").to_vec();
            for (i, k) in keys.iter().enumerate() {
                let (mut k, mut v) = (k.clone(), value(i));
                if rotate {
                    crate::hadamard::rotate(&mut k);
                    crate::hadamard::rotate(&mut v);
                }
                centered.push(&k, &v, EntryMeta::new(i));
                plain.push(&k, &v, EntryMeta::new(i));
            }
            let stored = centered.stored_keys().widen(0..n * d).into_owned();
            assert!(stored.iter().map(|x| x.abs()).fold(0.0, f32::max) < 5.0, "offsets removed");
            for (a, b) in centered.keys().iter().zip(plain.keys().iter()) {
                assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "true keys: {a} vs {b}");
            }
            assert_eq!(*centered.key(7), centered.keys()[7 * d..8 * d]);
            for seed in 0..8u64 {
                let query: Vec<f32> = (0..d)
                    .map(|j| ((j as u64 * 31 + seed * 17) % 13) as f32 / 26.0 - 0.25)
                    .collect();
                let (ours, truth) =
                    (softmax_scores(&query, &stored, d), softmax_scores(&query, &plain.keys(), d));
                for (a, b) in ours.iter().zip(&truth) {
                    assert!((a - b).abs() <= 1e-5, "weights {a} vs {b}");
                }
                let output = |w: &[f64]| -> Vec<f64> {
                    (0..d)
                        .map(|j| {
                            w.iter().enumerate().map(|(i, w)| w * plain.value(i)[j] as f64).sum()
                        })
                        .collect()
                };
                for (a, b) in output(&ours).iter().zip(&output(&truth)) {
                    assert!((a - b).abs() <= 1e-4, "output {a} vs {b}");
                }
            }
            // Fixed once set: a second call on a non-empty head changes nothing.
            centered.center_keys_on(keys[16..].iter().map(Vec::as_slice), rotate);
            assert_eq!(centered.key_center(), Some(center.as_slice()));
            let rebuilt = centered
                .with_entries(
                    centered.keys().into_owned(),
                    centered.values().into_owned(),
                    centered.meta().to_vec(),
                )
                .unwrap();
            assert_eq!(rebuilt.key_center(), Some(center.as_slice()));
            for (a, b) in rebuilt.stored_keys().widen(0..n * d).iter().zip(&stored) {
                assert!((a - b).abs() <= 1e-4, "rebuilt rows are centered alike: {a} vs {b}");
            }
        }
        assert!(HeadCache::new(8, KvDtype::F32).key_center().is_none());
    }

    /// With a per-channel offset 60 times the noise, the offset sets every block's scale
    /// uncentered; centered, the blocks see only the noise. Measured worst key error
    /// (max over elements, 64 rows): q8_0 0.22 uncentered against 0.0045 centered, q4_0 3.4
    /// against 0.13; asserted with a factor of 10 to spare.
    #[test]
    fn centering_removes_a_channel_offset_before_quantization() {
        let (n, d) = (64, 64);
        let keys = offset_keys(n, d, 9);
        let worst = |dtype: KvDtype| {
            let mut head = HeadCache::new(d, dtype);
            if dtype.centered() {
                head.center_keys_on(keys[..32].iter().map(Vec::as_slice), false);
            }
            keys.iter().enumerate().for_each(|(i, k)| head.push(k, k, EntryMeta::new(i)));
            let error = head
                .keys()
                .iter()
                .zip(keys.concat())
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            error
        };
        for (centered, uncentered) in
            [(KvDtype::Q8_0, KvDtype::Q8_0Uncentered), (KvDtype::Q4_0, KvDtype::Q4_0Uncentered)]
        {
            let (with, without) = (worst(centered), worst(uncentered));
            assert!(with * 10.0 < without, "{centered}: {with} centered against {without}");
        }
    }

    /// The center is resident data: 4 bytes a channel beside the blocks.
    #[test]
    fn a_centered_head_counts_its_center() {
        let (n, d) = (40, 64);
        let keys = offset_keys(n, d, 2);
        for dtype in [KvDtype::Q8_0, KvDtype::Q4_0Rotated] {
            let mut head = HeadCache::new(d, dtype);
            head.center_keys_on(keys.iter().map(Vec::as_slice), dtype.rotated());
            keys.iter().enumerate().for_each(|(i, k)| head.push(k, k, EntryMeta::new(i)));
            head.shrink_to_fit();
            let rows = n * (HeadCache::entry_kv_bytes(d, dtype) + std::mem::size_of::<EntryMeta>());
            assert_eq!(HeadCache::fixed_bytes(d, dtype), 4 * d);
            assert_eq!(head.resident_bytes(), rows + HeadCache::fixed_bytes(d, dtype), "{dtype}");
        }
        assert_eq!(HeadCache::fixed_bytes(d, KvDtype::Q8_0Uncentered), 0);
        assert_eq!(HeadCache::fixed_bytes(d, KvDtype::F16), 0);
    }
}
