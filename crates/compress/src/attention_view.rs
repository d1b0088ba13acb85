//! A head of the cache as the kernels' decode attention reads it: its rows as stored, and
//! of each entry the tokens it stands for and the attention it has received. Inlined: the
//! kernel reads an entry's count and attention in its loops, as it read the fields before.

use kvmerger_kernels::{KvEntry, KvHead, RowsRef};

use crate::cache::{EntryMeta, HeadCache};

impl KvHead for HeadCache {
    type Entry = EntryMeta;
    #[inline]
    fn keys(&self) -> RowsRef<'_> {
        self.stored_keys()
    }
    #[inline]
    fn values(&self) -> RowsRef<'_> {
        self.stored_values()
    }
    #[inline]
    fn entries(&self) -> &[EntryMeta] {
        self.meta()
    }
    #[inline]
    fn entries_mut(&mut self) -> &mut [EntryMeta] {
        self.meta_mut()
    }
}

impl KvEntry for EntryMeta {
    #[inline]
    fn count(&self) -> u32 {
        self.count
    }
    #[inline]
    fn attention_mut(&mut self) -> &mut f32 {
        &mut self.attention
    }
}
