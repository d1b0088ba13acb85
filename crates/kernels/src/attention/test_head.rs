//! A kv head of owned rows in one stored type, for decode attention's tests and its bench
//! (which includes this file): random rows, entries standing for 1 to `counts` tokens.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

// The parent's names: the attention module's in the kernels' tests, the bench's imports in
// the bench.
use super::{KvElement, KvEntry, KvHead, RowsRef};

/// What a test keeps of an entry.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TestEntry {
    pub count: u32,
    pub attention: f32,
}

impl KvEntry for TestEntry {
    fn count(&self) -> u32 {
        self.count
    }
    fn attention_mut(&mut self) -> &mut f32 {
        &mut self.attention
    }
}

/// `[len, head_dim]` keys and values stored as `T`.
#[derive(Debug, Clone)]
pub struct TestHead<T> {
    pub keys: Vec<T>,
    pub values: Vec<T>,
    pub entries: Vec<TestEntry>,
}

impl<T: KvElement> KvHead for TestHead<T> {
    type Entry = TestEntry;
    fn keys(&self) -> RowsRef<'_> {
        T::view(&self.keys)
    }
    fn values(&self) -> RowsRef<'_> {
        T::view(&self.values)
    }
    fn entries(&self) -> &[TestEntry] {
        &self.entries
    }
    fn entries_mut(&mut self) -> &mut [TestEntry] {
        &mut self.entries
    }
}

impl<T: KvElement> TestHead<T> {
    /// `len` entries of `head_dim` (whole blocks for a block type): keys in `[-2, 2)`, values
    /// in `[-1, 1)`, entry `i` standing for `1 + i % counts` tokens.
    pub fn random(head_dim: usize, len: usize, counts: u32, rng: &mut StdRng) -> Self {
        let mut row = |scale: f32| -> Vec<f32> {
            (0..len * head_dim).map(|_| rng.random_range(-scale..scale)).collect()
        };
        let (keys, values) = (row(2.0), row(1.0));
        let narrow = |x: &[f32]| {
            let mut stored = vec![T::default(); T::units(0..x.len()).end];
            T::narrow(x, &mut stored);
            stored
        };
        let entries = (0..len as u32)
            .map(|i| TestEntry { count: 1 + i % counts.max(1), attention: 0.0 })
            .collect();
        Self { keys: narrow(&keys), values: narrow(&values), entries }
    }

    /// A layer of heads of `lens` entries, from `seed`.
    pub fn layer(head_dim: usize, lens: &[usize], counts: u32, seed: u64) -> Vec<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        lens.iter().map(|&n| Self::random(head_dim, n, counts, &mut rng)).collect()
    }
}
