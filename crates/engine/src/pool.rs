//! The KV memory pool: a byte budget shared by every sequence's cache.
//!
//! The pool is a ledger, not an allocator: each sequence's cache stays with the sequence
//! (it moves through the batched forward with it), and the pool records how many bytes each
//! one may hold. A sequence reserves its settled size when admitted and its prefill
//! headroom when its prefill starts (see [`crate::Scheduler`]), settles after its prompt to
//! what it holds, and frees everything when it ends or is cancelled.
//! The runtime sizes every cache's buffers so that resident bytes never exceed the
//! reservation.

use std::collections::HashMap;

use crate::sequence::SeqId;

/// Byte reservations against a fixed limit.
#[derive(Debug, Clone)]
pub struct KvPool {
    limit: usize,
    held: HashMap<SeqId, usize>,
    used: usize,
    peak: usize,
}

impl KvPool {
    pub fn new(limit: usize) -> Self {
        Self { limit, held: HashMap::new(), used: 0, peak: 0 }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes reserved by all sequences.
    pub fn used(&self) -> usize {
        self.used
    }

    /// The most bytes ever reserved at once.
    pub fn peak(&self) -> usize {
        self.peak
    }

    pub fn free_bytes(&self) -> usize {
        self.limit.saturating_sub(self.used)
    }

    /// Bytes `id` holds a reservation for.
    pub fn held(&self, id: SeqId) -> usize {
        self.held.get(&id).copied().unwrap_or(0)
    }

    /// Whether a reservation of `bytes` could be granted on an empty pool.
    pub fn can_ever_fit(&self, bytes: usize) -> bool {
        bytes <= self.limit
    }

    /// Reserves `bytes` for `id` (on top of what it holds) if they fit.
    pub fn try_reserve(&mut self, id: SeqId, bytes: usize) -> bool {
        if bytes > self.free_bytes() {
            return false;
        }
        *self.held.entry(id).or_insert(0) += bytes;
        self.used += bytes;
        self.peak = self.peak.max(self.used);
        true
    }

    /// Sets `id`'s reservation to `bytes`, what it holds now. Meant to shrink a
    /// reservation after compression; a larger value is recorded as is (the ledger never
    /// under-reports) and shows in [`Self::peak`].
    pub fn settle(&mut self, id: SeqId, bytes: usize) {
        let before = self.held.insert(id, bytes).unwrap_or(0);
        self.used = self.used - before + bytes;
        self.peak = self.peak.max(self.used);
    }

    /// Releases everything `id` holds; returns the bytes freed.
    pub fn free(&mut self, id: SeqId) -> usize {
        let bytes = self.held.remove(&id).unwrap_or(0);
        self.used -= bytes;
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_never_exceed_the_limit() {
        let mut pool = KvPool::new(100);
        assert!(pool.try_reserve(1, 60));
        assert!(!pool.try_reserve(2, 41), "41 bytes do not fit in the 40 left");
        assert!(pool.try_reserve(2, 40));
        assert_eq!((pool.used(), pool.free_bytes(), pool.peak()), (100, 0, 100));
        assert!(!pool.try_reserve(3, 1));
    }

    #[test]
    fn settle_gives_back_what_compression_saved_and_free_releases_all() {
        let mut pool = KvPool::new(100);
        assert!(pool.try_reserve(1, 80));
        assert!(!pool.try_reserve(2, 50));
        pool.settle(1, 30);
        assert_eq!((pool.held(1), pool.used()), (30, 30));
        assert!(pool.try_reserve(2, 50));
        assert_eq!(pool.free(1), 30);
        assert_eq!(pool.free(1), 0, "freeing twice frees nothing");
        assert_eq!((pool.used(), pool.peak()), (50, 80));
        assert!(pool.can_ever_fit(100) && !pool.can_ever_fit(101));
    }
}
