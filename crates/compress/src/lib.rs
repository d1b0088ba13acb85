//! KV-cache compression methods on a ragged per-head cache.
//!
//! This crate knows nothing about models or files: it takes the keys and values of one
//! (layer, kv head), with the attention statistics the method asked for, and rewrites them.
//! Any engine can use it; `kvmerger-engine` is ours.

mod attention_view;
mod budget;
mod cache;
mod config;
mod dtype;
mod error;
pub mod hadamard;
mod method;
pub mod methods;
pub mod quant;
mod queries;
mod stats;

pub use budget::Budget;
pub use cache::{EntryMeta, HeadCache, KvCache};
pub use config::{
    method_info, scale_layer_budgets, CompressionConfig, MethodInfo, METHODS, METHOD_NAMES,
};
pub use dtype::KvDtype;
pub use error::{CompressError, Result};
pub use kvmerger_kernels::{KvElement, RowsRef};
pub use method::{CompressionMethod, HeadId, HeadReport, Scorer};
pub use methods::{
    adjacent_cosine, cosine, merge_to_target, merging_sets, min_reachable, CompareTo, Linkage,
    RunScoring,
};
pub use queries::{QueryMoments, QueryStatistics};
pub use stats::{
    EvictionWindow, Evictions, Queries, Reconstruction, ReconstructionPass, SmallSet, StatsRequest,
    Windows, MAX_WINDOWS,
};
