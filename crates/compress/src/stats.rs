//! The attention statistics a method asks the engine to accumulate while it runs the
//! prompt (and decode steps), and the window types they are keyed by.

use crate::queries::QueryStatistics;

/// Most distinct observation windows (or eviction windows) one prefill records.
pub const MAX_WINDOWS: usize = 8;

/// A small set of distinct statistics parameters, smallest first. `Copy`, so statistics
/// requests travel by value through the forward pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SmallSet<T> {
    len: usize,
    sizes: [T; MAX_WINDOWS],
}

/// Observation-window lengths.
pub type Windows = SmallSet<usize>;

/// Eviction windows (CaM's attention at eviction time).
pub type Evictions = SmallSet<EvictionWindow>;

/// Query statistics (Expected Attention's).
pub type Queries = SmallSet<QueryStatistics>;

/// The attention a prompt entry had received when a token-by-token sliding window evicted
/// it: entry `t` leaves when the query at physical index `t + reach` arrives, so it has
/// been seen by the queries before that one. Alongside, the summed attention the entries
/// `t + 1 ..= t + span` (its merge targets) had received from the same queries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct EvictionWindow {
    /// Recent entries the sliding window holds besides its sinks.
    pub reach: usize,
    /// Merge targets after each victim (at most `reach`).
    pub span: usize,
}

impl EvictionWindow {
    /// Adds one query's attention row to the statistics: `row` holds the probabilities of
    /// the query at physical index `query` over entries `0..=query`, scaled by `weight`.
    /// `received` and `targets` are `[len]`, indexed by victim.
    pub fn accumulate_row(
        &self,
        query: usize,
        row: &[f32],
        weight: f32,
        received: &mut [f32],
        targets: &mut [f32],
    ) {
        debug_assert_eq!(row.len(), query + 1);
        // Victims still in the window when `query` arrives: `t + reach > query`.
        let first = (query + 1).saturating_sub(self.reach);
        for t in first..=query {
            received[t] += weight * row[t];
        }
        // band = sum of row[t + 1 ..= min(t + span, query)], slid from the last victim down.
        let mut band = 0.0f32;
        for t in (first..query).rev() {
            band += row[t + 1];
            if t + 1 + self.span <= query {
                band -= row[t + 1 + self.span];
            }
            targets[t] += weight * band;
        }
    }
}

impl<T: Copy + Ord + Default> SmallSet<T> {
    /// The set holding one element.
    pub fn one(window: T) -> Self {
        let mut w = Self::default();
        w.insert(window);
        w
    }

    /// Adds a window; returns `false` (and leaves the set as it was) when the set already
    /// holds [`MAX_WINDOWS`] other windows.
    pub fn insert(&mut self, window: T) -> bool {
        let sizes = &mut self.sizes[..self.len];
        match sizes.binary_search(&window) {
            Ok(_) => true,
            Err(_) if self.len == MAX_WINDOWS => false,
            Err(at) => {
                self.sizes.copy_within(at..self.len, at + 1);
                self.sizes[at] = window;
                self.len += 1;
                true
            }
        }
    }

    pub fn contains(&self, window: T) -> bool {
        self.sizes[..self.len].binary_search(&window).is_ok()
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Elements, smallest first.
    pub fn iter(&self) -> impl Iterator<Item = T> + '_ {
        self.sizes[..self.len].iter().copied()
    }

    /// Whether every window of `other` is in this set.
    pub fn contains_all(&self, other: &Self) -> bool {
        other.iter().all(|w| self.contains(w))
    }
}

/// KVzip's scoring pass, as a method asks for it: once the prompt is in the cache, the
/// engine feeds the model a request to repeat its context followed by the context itself,
/// `chunk` context tokens at a time, and records for every prompt entry the most attention
/// any of those queries paid it ([`crate::HeadCache::reconstruction_attention`]). The
/// entries the pass appends are dropped again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reconstruction {
    /// Context tokens repeated per pass (kvpress: 2048).
    pub chunk: usize,
    /// First entries that every scoring softmax includes (kvpress: 4).
    pub sinks: usize,
}

/// One forward pass of a [`Reconstruction`], set by the engine on the pass: the entries its
/// queries are scored against. Each query's softmax runs over the first `sinks` entries,
/// the context chunk `context_start..context_end` being repeated and the entries the
/// reconstruction appended up to its own (`appended..`), as KVzip scores it; the chunk's
/// probabilities are folded into the running maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconstructionPass {
    pub sinks: usize,
    pub context_start: usize,
    pub context_end: usize,
    /// Index of the first entry the reconstruction appended.
    pub appended: usize,
}

/// Attention statistics a method needs the engine to accumulate into the cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsRequest {
    /// Accumulate attention received per key into [`crate::EntryMeta::attention`]
    /// (prefill and decode), averaged over the query heads of each kv group.
    pub accumulated: bool,
    /// For each window `n`, accumulate into [`crate::HeadCache::window_attention`]`(n)` the
    /// attention received from the last `n` queries of the prompt (SnapKV's observation
    /// window). Several methods sharing one prefill each read their own window.
    pub windows: Windows,
    /// For each eviction window, accumulate [`crate::HeadCache::eviction_attention`] over the
    /// whole prompt (CaM's merge probability at eviction time).
    pub evictions: Evictions,
    /// For each entry, accumulate [`crate::HeadCache::query_moments`] over the prompt's
    /// queries (every chunk of it), and set the rotation for the positions after it.
    pub queries: Queries,
    /// Run KVzip's scoring pass after the prompt (see [`Reconstruction`]).
    pub reconstruction: Option<Reconstruction>,
    /// Set by the engine on the forward passes of that scoring pass.
    pub reconstruction_pass: Option<ReconstructionPass>,
}

impl StatsRequest {
    /// Accumulated attention only.
    pub fn accumulated() -> Self {
        Self { accumulated: true, ..Self::default() }
    }

    /// One observation window, with or without accumulated attention.
    pub fn window(window: usize, accumulated: bool) -> Self {
        Self { accumulated, windows: Windows::one(window), ..Self::default() }
    }

    /// The same request without the prompt-window statistics (for prefill chunks before
    /// the last one).
    pub fn without_window(self) -> Self {
        Self { windows: Windows::default(), ..self }
    }

    /// The same request without any prompt-only statistics (for steps after the prompt).
    pub fn after_prompt(self) -> Self {
        Self { accumulated: self.accumulated, ..Self::default() }
    }

    /// Everything either request asks for (one prefill serving several methods): each
    /// distinct window is kept, so every method reads the window it asked for. Beyond
    /// [`MAX_WINDOWS`] distinct windows the extra ones are left out, and
    /// [`Self::covers`] tells the methods that needed them; so is a second, different
    /// reconstruction (one scoring pass per prefill).
    pub fn union(self, other: Self) -> Self {
        let mut windows = self.windows;
        for w in other.windows.iter() {
            windows.insert(w);
        }
        let mut evictions = self.evictions;
        for e in other.evictions.iter() {
            evictions.insert(e);
        }
        let mut queries = self.queries;
        for q in other.queries.iter() {
            queries.insert(q);
        }
        Self {
            accumulated: self.accumulated || other.accumulated,
            windows,
            evictions,
            queries,
            reconstruction: self.reconstruction.or(other.reconstruction),
            reconstruction_pass: None,
        }
    }

    /// Whether statistics recorded for `self` serve a method that asks for `needs`.
    pub fn covers(&self, needs: &Self) -> bool {
        (self.accumulated || !needs.accumulated)
            && self.windows.contains_all(&needs.windows)
            && self.evictions.contains_all(&needs.evictions)
            && self.queries.contains_all(&needs.queries)
            && (needs.reconstruction.is_none() || self.reconstruction == needs.reconstruction)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn union_keeps_each_distinct_window() {
        let a = StatsRequest::window(64, false);
        let b = StatsRequest::window(32, true);
        let u = a.union(b).union(a);
        assert!(u.accumulated);
        assert_eq!(u.windows.iter().collect::<Vec<_>>(), vec![32, 64]);
        assert!(u.covers(&a) && u.covers(&b));
        assert!(!a.covers(&b), "a 64-query window does not serve a 32-query one");
        assert!(u.covers(&StatsRequest::default()));
        let kvzip = |chunk| StatsRequest {
            reconstruction: Some(Reconstruction { chunk, sinks: 4 }),
            ..StatsRequest::default()
        };
        let both = u.union(kvzip(64)).union(kvzip(32));
        assert!(both.covers(&kvzip(64)) && both.covers(&a));
        assert!(!both.covers(&kvzip(32)), "one scoring pass per prefill");
        assert!(!u.covers(&kvzip(64)));
    }

    #[test]
    fn windows_beyond_the_capacity_are_reported_missing() {
        let mut u = StatsRequest::default();
        for w in 1..=MAX_WINDOWS + 2 {
            u = u.union(StatsRequest::window(w, false));
        }
        assert_eq!(u.windows.iter().count(), MAX_WINDOWS);
        assert!(!u.covers(&StatsRequest::window(MAX_WINDOWS + 1, false)));
        assert!(u.covers(&StatsRequest::window(1, false)));
    }
}
