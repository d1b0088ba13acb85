//! Attention of new queries over one layer's ragged per-head KV rows: a decode step's one
//! query per sequence ([`decode_attention`]) and a block of prompt queries over one head
//! ([`attend_block`]).
//!
//! Query heads map to kv heads as in grouped-query attention: query head `h` reads kv head
//! `h / group`. Rows may be stored narrower than f32 (see [`crate::RowsRef`]); attention
//! widens what it reads and accumulates in f32. A block of prompt queries reads rows its
//! caller widened once, and keeps its explicit softmax for the statistics its caller
//! accumulates; a decode step widens small blocks (or loads rows straight into registers) and
//! splits long heads across threads.

mod block;
mod decode;
mod head;
#[cfg(target_arch = "x86_64")]
mod lanes;
mod shape;
mod softmax;
#[cfg(test)]
mod test_head;

pub use block::{attend_block, causal_softmax, CausalBlock, SlidingWindow};
pub use decode::{decode_attention, dot};
pub use head::{KvEntry, KvHead};
pub use shape::{AttentionShape, DecodeOptions};

/// For `test_head`, which the bench includes too and which names these from its parent.
#[cfg(test)]
use crate::kv_rows::{KvElement, RowsRef};
