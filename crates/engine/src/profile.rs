//! Where a forward pass's time goes, part by part: off unless a [`StepProfile`] is attached
//! to the model ([`crate::Llama::set_profile`]), so normal runs pay one branch per part.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A part of a forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Token embedding lookup.
    Embedding,
    /// RMSNorms, per-head q/k norms and the query scale.
    Norms,
    /// Quantizing activation rows to 8 bits for the decode kernel.
    Quantize,
    /// Query, key and value projections.
    Qkv,
    /// RoPE on queries and keys, and appending keys and values to the cache.
    RopeAppend,
    /// Attention over the cache.
    Attention,
    /// The attention output projection (on candle tensors with its residual add).
    Output,
    /// Gate and up projections (on candle tensors with the SiLU product).
    GateUp,
    /// Down projection (on candle tensors with its residual add).
    Down,
    /// The SiLU (GELU) product and the residual adds of the decode kernel's path.
    Elementwise,
    /// The output projection to the vocabulary.
    LmHead,
    /// The compression method's decode-time policy after the pass (H2O's eviction), timed
    /// by [`crate::Sequence::extend`].
    Policy,
}

impl Part {
    pub const ALL: [Part; 12] = [
        Part::Embedding,
        Part::Norms,
        Part::Quantize,
        Part::Qkv,
        Part::RopeAppend,
        Part::Attention,
        Part::Output,
        Part::GateUp,
        Part::Down,
        Part::Elementwise,
        Part::LmHead,
        Part::Policy,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Part::Embedding => "embedding",
            Part::Norms => "norms",
            Part::Quantize => "activation quantization",
            Part::Qkv => "q/k/v projections",
            Part::RopeAppend => "rope + cache append",
            Part::Attention => "attention over the cache",
            Part::Output => "output projection",
            Part::GateUp => "gate/up projections",
            Part::Down => "down projection",
            Part::Elementwise => "SiLU product + residual adds",
            Part::LmHead => "lm_head",
            Part::Policy => "compression policy (eviction)",
        }
    }

    /// Whether the part is a weight matrix product.
    pub fn is_weight_product(self) -> bool {
        matches!(self, Part::Qkv | Part::Output | Part::GateUp | Part::Down | Part::LmHead)
    }
}

/// Time summed per [`Part`] over the passes run while attached. Parts run in parallel for
/// several sequences (rope, attention) add each sequence's time.
#[derive(Debug, Default)]
pub struct StepProfile {
    nanos: [AtomicU64; Part::ALL.len()],
    passes: AtomicU64,
}

impl StepProfile {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the time since `start` to `part`.
    pub fn add(&self, part: Part, start: Instant) {
        let nanos = start.elapsed().as_nanos() as u64;
        self.nanos[part as usize].fetch_add(nanos, Ordering::Relaxed);
    }

    pub(crate) fn count_pass(&self) {
        self.passes.fetch_add(1, Ordering::Relaxed);
    }

    /// Forward passes run while attached.
    pub fn passes(&self) -> u64 {
        self.passes.load(Ordering::Relaxed)
    }

    /// Total time of `part`.
    pub fn get(&self, part: Part) -> Duration {
        Duration::from_nanos(self.nanos[part as usize].load(Ordering::Relaxed))
    }

    pub fn reset(&self) {
        self.nanos.iter().for_each(|n| n.store(0, Ordering::Relaxed));
        self.passes.store(0, Ordering::Relaxed);
    }
}

/// Runs `f`, adding its time to `part` when profiling.
pub(crate) fn timed<T>(profile: Option<&StepProfile>, part: Part, f: impl FnOnce() -> T) -> T {
    match profile {
        None => f(),
        Some(p) => {
            let start = Instant::now();
            let out = f();
            p.add(part, start);
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_add_up_and_reset() {
        let p = StepProfile::new();
        timed(Some(&p), Part::Qkv, || std::thread::sleep(Duration::from_millis(2)));
        timed(Some(&p), Part::Qkv, || std::thread::sleep(Duration::from_millis(2)));
        assert!(p.get(Part::Qkv) >= Duration::from_millis(4));
        assert_eq!(p.get(Part::Down), Duration::ZERO);
        p.count_pass();
        assert_eq!(p.passes(), 1);
        p.reset();
        assert_eq!((p.get(Part::Qkv), p.passes()), (Duration::ZERO, 0));
        assert_eq!(timed(None, Part::Down, || 7), 7);
    }
}
