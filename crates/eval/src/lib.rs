//! Evaluation: tasks, metrics, the runner that drives the engine, sweeps, reports and
//! plots, and the analyses behind `kvmerger analyze`.

pub mod analyze;
pub mod corpus;
pub mod dataset;
mod error;
pub mod fingerprint;
pub mod metrics;
pub mod plot;
pub mod report;
pub mod results;
pub mod ruler;
pub mod runner;
mod sample;
pub mod stats;
pub mod sweep;
pub mod tasks;

pub use error::{EvalError, Result};
