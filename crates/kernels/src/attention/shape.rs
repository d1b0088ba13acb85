//! What one attention call is told: its shapes and the options that change what it
//! computes besides the output.

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    /// Query heads that share one KV head.
    pub fn group(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// The query heads of KV head `kv`'s group for the queries `positions` of `q`
    /// (`[seq, n_heads * head_dim]`), gathered side by side: `[positions * group, head_dim]`,
    /// the rows a [`crate::CausalBlock`] takes.
    pub fn group_queries(
        &self,
        q: &[f32],
        positions: std::ops::Range<usize>,
        kv: usize,
    ) -> Vec<f32> {
        let (d, group) = (self.head_dim, self.group());
        let mut rows = Vec::with_capacity(positions.len() * group * d);
        for i in positions {
            let at = (i * self.n_heads + kv * group) * d;
            rows.extend_from_slice(&q[at..at + group * d]);
        }
        rows
    }
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
