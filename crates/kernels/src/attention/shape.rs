//! What one attention call is told: its shapes and the options that change what it
//! computes besides the output.

use kvmerger_compress::StatsRequest;

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// Options that change what is computed, not the result.
#[derive(Debug, Clone, Copy)]
pub struct AttentionOptions {
    /// Queries per chunk of the explicit softmax; any value gives the same result.
    pub chunk: usize,
    pub stats: StatsRequest,
    /// Add `ln(count)` to the logit of entries that stand for several tokens.
    pub log_count_bias: bool,
    /// Sliding window: a query at position `p` sees only keys at positions `> p - window`
    /// (by the entries' logical positions). Decode steps see their window because the
    /// forward pass drops older entries first; this masks within a block of queries.
    pub window: Option<usize>,
}
