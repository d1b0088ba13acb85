//! What decode attention reads of a layer's kv heads, and writes.
//!
//! A decode step splits all the heads of a layer into parts that run in one parallel region
//! (see `decode.rs`), so it takes the layer's heads together: a slice of the caller's own
//! head type, read through [`KvHead`] without a copy or a per-step list of views. Of each
//! entry it reads how many tokens it stands for and, when asked, adds to the attention it
//! has received: nothing else of the caller's cache.

use crate::kv_rows::RowsRef;

/// One kv head's cached rows, `[len, head_dim]` keys and values as stored, and its `len`
/// entries.
pub trait KvHead: Send + Sync {
    type Entry: KvEntry;
    fn keys(&self) -> RowsRef<'_>;
    fn values(&self) -> RowsRef<'_>;
    fn entries(&self) -> &[Self::Entry];
    fn entries_mut(&mut self) -> &mut [Self::Entry];
}

/// One cached entry, as decode attention reads and writes it.
pub trait KvEntry: Send + Sync {
    /// Tokens folded into the entry (its logit gets `ln(count)` with a count bias).
    fn count(&self) -> u32;
    /// The attention the entry has received, which a step asked to keep adds to.
    fn attention_mut(&mut self) -> &mut f32;
}
