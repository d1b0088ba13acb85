//! Bring-your-own data: JSONL rows in kvpress's column convention
//! (`context, question, answer_prefix, answer, max_new_tokens`), scored with a LongBench
//! metric chosen per file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Deserialize;

use crate::error::{EvalError, Result};
use crate::metrics::Metric;
use crate::tasks::Sample;

/// What to do with a malformed line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadPolicy {
    /// Report it and go on.
    #[default]
    Skip,
    /// Stop at it.
    Fatal,
}

/// A malformed line that was skipped.
#[derive(Debug, Clone, PartialEq)]
pub struct LineError {
    pub line: usize,
    pub message: String,
}

/// A dataset file, read.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded {
    pub samples: Vec<Sample>,
    /// Malformed lines that were skipped.
    pub errors: Vec<LineError>,
    /// Columns the rows had besides the known ones (`task`, `length` in RULER exports):
    /// ignored, and named once.
    pub ignored_columns: BTreeSet<String>,
}

#[derive(Deserialize)]
struct Row {
    #[serde(default)]
    id: Option<String>,
    context: String,
    question: String,
    #[serde(default)]
    answer_prefix: String,
    #[serde(deserialize_with = "answers")]
    answer: Vec<String>,
    #[serde(default = "default_max_new_tokens")]
    max_new_tokens: usize,
    #[serde(default)]
    all_classes: Option<Vec<String>>,
    #[serde(flatten)]
    other: BTreeMap<String, serde_json::Value>,
}

fn default_max_new_tokens() -> usize {
    32
}

/// `answer`: one string or a list of them (any of which counts as right).
fn answers<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<String>, D::Error> {
    use serde::de::Error;
    let wrong = |v: &serde_json::Value| {
        D::Error::custom(format!("`answer` must be a string or a list of strings, got {v}"))
    };
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(a) => Ok(vec![a]),
        serde_json::Value::Array(items) => items
            .into_iter()
            .map(|v| match v {
                serde_json::Value::String(a) => Ok(a),
                other => Err(wrong(&other)),
            })
            .collect(),
        other => Err(wrong(&other)),
    }
}

/// Reads a JSONL file into samples scored by `metric`. Empty lines are ignored; malformed
/// ones are skipped and reported, or fatal, as `policy` says; unknown columns are ignored.
pub fn load_jsonl(path: &Path, metric: Metric, policy: LoadPolicy) -> Result<Loaded> {
    // Bytes, not a string: invalid UTF-8 is an error of its line, not of the whole file.
    let bytes = std::fs::read(path).map_err(EvalError::io(path))?;
    let task = path.file_stem().unwrap_or_default().to_string_lossy().to_string();
    let mut samples = Vec::new();
    let mut errors = Vec::new();
    let mut ignored_columns = BTreeSet::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let line_no = i + 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.trim_ascii().is_empty() {
            continue;
        }
        let parsed = std::str::from_utf8(line)
            .map_err(|e| format!("invalid UTF-8: {e}"))
            .and_then(|line| serde_json::from_str::<Row>(line).map_err(|e| e.to_string()))
            .and_then(|row| match row.max_new_tokens {
                0 => Err("`max_new_tokens` must be at least 1".to_string()),
                _ => Ok(row),
            });
        match parsed {
            Ok(row) => {
                ignored_columns.extend(row.other.into_keys());
                samples.push(Sample {
                    id: row.id.unwrap_or_else(|| format!("{task}-{line_no}")),
                    task: task.clone(),
                    context: row.context,
                    question: row.question,
                    answer_prefix: row.answer_prefix,
                    answers: row.answer,
                    max_new_tokens: row.max_new_tokens,
                    depth: None,
                    metric,
                    all_classes: row.all_classes,
                });
            }
            Err(message) => {
                if policy == LoadPolicy::Fatal {
                    return Err(EvalError::Dataset {
                        path: path.to_path_buf(),
                        line: line_no,
                        message,
                    });
                }
                errors.push(LineError { line: line_no, message });
            }
        }
    }
    Ok(Loaded { samples, errors, ignored_columns })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(content: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!(
            "kvmerger-dataset-{}-{}.jsonl",
            std::process::id(),
            content.len()
        ));
        std::fs::write(&path, content).unwrap();
        path
    }

    const GOOD: &str = r#"{"context": "c", "question": "q?", "answer_prefix": "A:", "answer": "x", "max_new_tokens": 5}"#;

    #[test]
    fn malformed_lines_are_reported_with_their_numbers() {
        let content = format!(
            "{GOOD}\n\n{{not json\n{}\n{}\n{}\n{}\n",
            r#"{"question": "q", "answer": "x"}"#,
            r#"{"context": "c", "question": "q", "answer": 5}"#,
            r#"{"context": "c", "question": "q", "answer": ["a", "b"], "all_classes": ["a", "b"]}"#,
            r#"{"context": "c", "question": "q", "answer": "x", "max_new_tokens": 0}"#
        );
        let path = file(&content);
        let Loaded { samples, errors, ignored_columns } =
            load_jsonl(&path, Metric::QaF1, LoadPolicy::Skip).unwrap();
        assert!(ignored_columns.is_empty());
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[1].answers, vec!["a", "b"]);
        assert_eq!(samples[1].max_new_tokens, 32);
        assert_eq!(errors.iter().map(|e| e.line).collect::<Vec<_>>(), vec![3, 4, 5, 7]);
        assert!(errors[1].message.contains("context"), "{}", errors[1].message);
        let answer = &errors[2].message;
        assert!(answer.contains("`answer` must be a string or a list of strings"), "{answer}");
        assert!(errors[3].message.contains("max_new_tokens"), "{}", errors[3].message);
        let err = load_jsonl(&path, Metric::QaF1, LoadPolicy::Fatal).unwrap_err();
        assert!(err.to_string().contains("line 3"), "{err}");
    }

    #[test]
    fn unknown_columns_are_ignored_and_named_once() {
        // A RULER export: `task` and `length` besides kvpress's columns, on every row.
        let row = |i: usize| {
            format!(
                r#"{{"context": "c{i}", "question": "q", "answer": ["x"], "task": "niah_single_1", "length": 4096{}}}"#,
                if i == 1 { r#", "index": 1"# } else { "" }
            )
        };
        let path = file(&format!("{}\n{}\n{}\n", row(0), row(1), row(2)));
        let loaded = load_jsonl(&path, Metric::Contains, LoadPolicy::Fatal).unwrap();
        assert_eq!(loaded.samples.len(), 3);
        assert_eq!(loaded.samples[2].context, "c2");
        assert!(loaded.errors.is_empty());
        assert_eq!(
            loaded.ignored_columns.into_iter().collect::<Vec<_>>(),
            vec!["index", "length", "task"]
        );
    }

    #[test]
    fn a_missing_file_is_an_io_error() {
        let err = load_jsonl(Path::new("/nonexistent/data.jsonl"), Metric::QaF1, LoadPolicy::Skip)
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/data.jsonl"));
    }
}
