//! A head of the cache as the kernels' decode attention reads it: its rows as stored, and
//! of each entry the tokens it stands for and the attention it has received.

use kvmerger_kernels::{KvEntry, KvHead, RowsRef};

use crate::cache::{EntryMeta, HeadCache};

impl KvHead for HeadCache {
    type Entry = EntryMeta;
    fn keys(&self) -> RowsRef<'_> {
        self.stored_keys()
    }
    fn values(&self) -> RowsRef<'_> {
        self.stored_values()
    }
    fn entries(&self) -> &[EntryMeta] {
        self.meta()
    }
    fn entries_mut(&mut self) -> &mut [EntryMeta] {
        self.meta_mut()
    }
}

impl KvEntry for EntryMeta {
    fn count(&self) -> u32 {
        self.count
    }
    fn attention_mut(&mut self) -> &mut f32 {
        &mut self.attention
    }
}
