//! What one attention call is told: its shapes and the options that change what it
//! computes besides the output.

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// What a decode step computes besides its output.
#[derive(Debug, Clone, Copy, Default)]
pub struct DecodeOptions {
    /// Add `ln(count)` to the logit of entries that stand for several tokens.
    pub log_count_bias: bool,
    /// Add each entry's attention, averaged over the query heads of its group, to
    /// [`crate::KvEntry::attention_mut`].
    pub accumulate: bool,
}
