//! The full cache: keeps every entry; the reference every method is measured against.

use crate::cache::HeadCache;
use crate::error::Result;
use crate::method::{CompressionMethod, HeadId, HeadReport};

/// Keeps everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct FullCache;

impl CompressionMethod for FullCache {
    fn name(&self) -> &'static str {
        "full"
    }
    fn budget_entries(&self, prompt_len: usize) -> usize {
        prompt_len
    }
    fn compress(&self, _id: HeadId, head: &mut HeadCache, _budget: usize) -> Result<HeadReport> {
        Ok(HeadReport { before: head.len(), after: head.len(), ..Default::default() })
    }
    fn decode_bound_refusal(&self) -> Option<String> {
        Some("the full cache keeps every entry: it has no bound to keep while decoding".into())
    }
}
