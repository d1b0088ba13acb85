//! Random heads for the methods' tests.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::cache::{EntryMeta, HeadCache};
use crate::dtype::KvDtype;

/// A head of `n` entries with seeded random keys, values and accumulated attention;
/// entry `i` sits at position `i`. Stored in f32.
pub fn random_head(n: usize, d: usize, seed: u64) -> HeadCache {
    random_head_as(n, d, seed, KvDtype::F32)
}

/// [`random_head`] stored in `dtype`, its keys centered on their own mean where the
/// dtype centers keys (as the engine centers a head on its first chunk).
pub fn random_head_as(n: usize, d: usize, seed: u64, dtype: KvDtype) -> HeadCache {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut rows = Vec::with_capacity(n);
    for i in 0..n {
        let k: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let v: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let meta = EntryMeta { position: i, count: 1, attention: rng.random_range(0.0..5.0) };
        rows.push((k, v, meta));
    }
    let mut head = HeadCache::new(d, dtype);
    if dtype.centered() {
        head.center_keys_on(rows.iter().map(|(k, _, _)| k.as_slice()), false);
    }
    for (k, v, meta) in &rows {
        head.push(k, v, *meta);
    }
    head
}
