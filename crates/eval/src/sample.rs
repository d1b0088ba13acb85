//! What a task generator is given and what it gives: the sample, in kvpress's columns, and
//! the text the passkey and RULER's noise haystack repeat. Below both our generators
//! ([`crate::tasks`]) and RULER's ([`crate::ruler`]), which share them.

use serde::{Deserialize, Serialize};

use crate::metrics::Metric;

/// The classic passkey filler (Mohtashami and Jaggi, 2023), also RULER's noise haystack.
pub const PASSKEY_FILLER: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";

/// One evaluation sample, in kvpress's column convention.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub id: String,
    pub task: String,
    /// Compressed.
    pub context: String,
    /// Read after the compressed context, uncompressed (unless query-aware).
    pub question: String,
    pub answer_prefix: String,
    pub answers: Vec<String>,
    pub max_new_tokens: usize,
    /// Where the needle sits, as a share of the context.
    pub depth: Option<f64>,
    pub metric: Metric,
    pub all_classes: Option<Vec<String>>,
}

/// What a generator needs to know besides the task.
#[derive(Clone, Copy)]
pub struct TaskInput<'a> {
    /// Target context length in tokens; for RULER's tasks, of the whole prompt and the
    /// answer's allowance, as RULER counts it.
    pub length: usize,
    /// Needle depth in [0, 1], where the task takes one (`TaskKind::takes_depth`).
    pub depth: f64,
    pub seed: u64,
    /// Counts tokens the way the model will see them.
    pub count_tokens: &'a dyn Fn(&str) -> usize,
    /// Real text for the tasks that read a haystack (`TaskKind::needs_haystack`).
    pub haystack: Option<&'a str>,
}
