//! One file per method, each citing its paper.

mod cam;
mod full;
mod h2o;
mod kvmerger;
mod snapkv;
mod streaming_llm;

pub use cam::{CamConfig, CamEviction, CamProbability};
pub use full::FullCache;
pub use h2o::H2oConfig;
pub use kvmerger::{BudgetMode, CompareTo, KvMergerConfig, MassRule, MergeWeights, PivotRule, Sigma};
pub use snapkv::SnapKvConfig;
pub use streaming_llm::StreamingLlmConfig;
