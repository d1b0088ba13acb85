//! One file per method, each citing its paper.

mod cam;
mod full;
mod h2o;
mod kvmerger;
mod merging_sets;
mod select;
mod snapkv;
mod streaming_llm;
#[cfg(test)]
mod test_util;

pub use cam::{CamConfig, CamEviction, CamProbability};
pub use full::FullCache;
pub use h2o::H2oConfig;
pub use kvmerger::{BudgetMode, KvMergerConfig, MassRule, MergeWeights, PivotRule, Sigma};
pub use merging_sets::{cosine, merging_sets, CompareTo};
pub use snapkv::{avg_pool, SnapKvConfig};
pub use streaming_llm::StreamingLlmConfig;
