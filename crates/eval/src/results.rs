//! Results as JSON lines: one row per (sample, method), appended and flushed as soon as it
//! is computed, so an interrupted sweep resumes where it stopped and nothing finished is lost.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use kvmerger_compress::KvDtype;
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::runner::Protocol;

/// One sample under one method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultRow {
    pub sample_id: String,
    pub task: String,
    /// `full`, or `method@budget` (see `CompressionConfig::label`).
    pub method: String,
    /// Whether the question was read after compression or compressed with the context.
    #[serde(default)]
    pub protocol: Protocol,
    /// Whether the prompt was wrapped in the model's chat template.
    #[serde(default)]
    pub chat: bool,
    /// Hash of everything that produced the row (sample, method, model, options): a resumed
    /// sweep recomputes rows whose fingerprint no longer matches.
    #[serde(default)]
    pub fingerprint: String,
    /// The whole method configuration.
    pub config: serde_json::Value,
    /// Requested budget ratio (1 for the full cache).
    pub budget: f64,
    pub context_tokens: usize,
    pub length: usize,
    pub depth: Option<f64>,
    pub seed: u64,
    #[serde(with = "finite_or_null")]
    pub score: f64,
    pub prediction: String,
    /// The sample's reference answers (empty for perplexity, whose reference is long text).
    #[serde(default)]
    pub answers: Vec<String>,
    pub achieved_ratio: f64,
    /// How the cache stored keys and values (rows written before caches had a choice were
    /// f32); the byte counts below are at its size.
    #[serde(default = "f32_cache")]
    pub kv_dtype: KvDtype,
    /// The cache dtype of the full-cache reference the fidelity figures compare with, where
    /// it differs from [`Self::kv_dtype`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_kv_dtype: Option<KvDtype>,
    pub resident_kv_bytes: usize,
    /// The most bytes the cache held at once during the prefill (0 in rows written before
    /// it was measured).
    #[serde(default)]
    pub peak_kv_bytes: usize,
    pub full_kv_bytes: usize,
    pub prefill_ms: f64,
    /// Of `prefill_ms`, the method's own pass over the prompt after prefilling it (KVzip's
    /// reconstruction; 0 for every other method and in rows written before it was measured).
    #[serde(default)]
    pub scoring_ms: f64,
    pub decode_ms: f64,
    #[serde(with = "finite_or_null")]
    pub kl: f64,
    pub top1_agreement: f64,
    pub matched_prefix_tokens: usize,
    /// NaN (JSON `null`) where there was nothing to score.
    #[serde(with = "finite_or_null")]
    pub perplexity: f64,
}

fn f32_cache() -> KvDtype {
    KvDtype::F32
}

/// JSON has no NaN: a non-finite number is written as `null` and read back as NaN.
mod finite_or_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
        if x.is_finite() {
            s.serialize_f64(*x)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

impl ResultRow {
    /// The key a sweep uses to know the row is done.
    pub fn key(&self) -> String {
        row_key(&self.sample_id, self.protocol, &self.method)
    }

    /// The method's name without its budget.
    pub fn method_name(&self) -> &str {
        self.method.split('@').next().unwrap_or(&self.method)
    }
}

/// Key of a (sample, protocol, method) triple.
pub fn row_key(sample_id: &str, protocol: Protocol, method: &str) -> String {
    format!("{sample_id}|{}|{method}", protocol.name())
}

/// An append-only JSONL file of rows. A key written twice (a row recomputed because its
/// fingerprint changed) means its last row.
pub struct ResultStore {
    path: PathBuf,
    file: File,
    /// Key -> fingerprint of its last row.
    done: HashMap<String, String>,
}

impl ResultStore {
    /// Opens (or creates) the store and reads the rows already there. A truncated last
    /// line (a run killed mid-write) is dropped and the file is cut back to its last full row.
    pub fn open(path: &Path) -> Result<(Self, Vec<ResultRow>)> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(EvalError::io(dir))?;
        }
        let text = if path.exists() {
            std::fs::read_to_string(path).map_err(EvalError::io(path))?
        } else {
            String::new()
        };
        let mut rows = Vec::new();
        let mut valid_len = 0;
        let lines: Vec<&str> = text.split_inclusive('\n').collect();
        for (i, line) in lines.iter().enumerate() {
            match serde_json::from_str::<ResultRow>(line.trim_end()) {
                Ok(row) if line.ends_with('\n') => {
                    rows.push(row);
                    valid_len += line.len();
                }
                _ if line.trim().is_empty() => valid_len += line.len(),
                // Only the last line can be cut short by an interrupted write.
                _ if i + 1 == lines.len() => break,
                result => {
                    let message = result
                        .err()
                        .map_or_else(|| "incomplete line".to_string(), |e| e.to_string());
                    return Err(EvalError::Dataset {
                        path: path.to_path_buf(),
                        line: i + 1,
                        message,
                    });
                }
            }
        }
        let file =
            OpenOptions::new().create(true).append(true).open(path).map_err(EvalError::io(path))?;
        file.set_len(valid_len as u64).map_err(EvalError::io(path))?;
        let rows = last_of_each_key(rows);
        let done = rows.iter().map(|r| (r.key(), r.fingerprint.clone())).collect();
        Ok((Self { path: path.to_path_buf(), file, done }, rows))
    }

    /// Whether the store holds `key` computed from exactly `fingerprint`.
    pub fn is_current(&self, key: &str, fingerprint: &str) -> bool {
        self.done.get(key).is_some_and(|f| f == fingerprint)
    }

    /// Whether the store holds `key`, computed from something else than `fingerprint`.
    pub fn is_stale(&self, key: &str, fingerprint: &str) -> bool {
        self.done.get(key).is_some_and(|f| f != fingerprint)
    }

    /// Rewrites the file with only the last row of each key (dropping rows superseded by a
    /// recomputation). Returns how many rows were dropped.
    pub fn compact(&mut self) -> Result<usize> {
        let text = std::fs::read_to_string(&self.path).map_err(EvalError::io(&self.path))?;
        let rows: Vec<ResultRow> =
            text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        let before = rows.len();
        let rows = last_of_each_key(rows);
        if rows.len() == before {
            return Ok(0);
        }
        let mut out = String::new();
        for row in &rows {
            out.push_str(&serde_json::to_string(row).map_err(|e| EvalError::Setup(e.to_string()))?);
            out.push('\n');
        }
        // Write aside and rename, so an interruption leaves one whole file or the other.
        let tmp = self.path.with_extension("jsonl.tmp");
        std::fs::write(&tmp, out).map_err(EvalError::io(&tmp))?;
        std::fs::rename(&tmp, &self.path).map_err(EvalError::io(&self.path))?;
        self.file =
            OpenOptions::new().append(true).open(&self.path).map_err(EvalError::io(&self.path))?;
        Ok(before - rows.len())
    }

    /// Writes one row and flushes it to disk.
    pub fn append(&mut self, row: &ResultRow) -> Result<()> {
        let line = serde_json::to_string(row).map_err(|e| EvalError::Setup(e.to_string()))?;
        writeln!(self.file, "{line}")
            .and_then(|_| self.file.sync_data())
            .map_err(EvalError::io(&self.path))?;
        self.done.insert(row.key(), row.fingerprint.clone());
        Ok(())
    }
}

/// Part `index` of `count` of a sweep (`--shard 2/4`, 1-based), for job arrays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub const WHOLE: Shard = Shard { index: 1, count: 1 };

    /// Whether this shard runs job `job` (0-based, in the sweep's fixed order).
    pub fn owns(&self, job: usize) -> bool {
        job % self.count == self.index - 1
    }
}

impl FromStr for Shard {
    type Err = EvalError;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || EvalError::Shard(s.to_string());
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) =
            (i.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
        if count == 0 || index == 0 || index > count {
            return Err(bad());
        }
        Ok(Self { index, count })
    }
}

/// The last row of each key, in the order keys first appear.
fn last_of_each_key(rows: Vec<ResultRow>) -> Vec<ResultRow> {
    let mut at: HashMap<String, usize> = HashMap::new();
    let mut out: Vec<ResultRow> = Vec::with_capacity(rows.len());
    for row in rows {
        match at.get(&row.key()) {
            Some(&i) => out[i] = row,
            None => {
                at.insert(row.key(), out.len());
                out.push(row);
            }
        }
    }
    out
}

/// Reads several stores (shards of one sweep) into one list, each (sample, protocol,
/// method) once: a key met again (a recomputed row) means its later row.
pub fn merge_shards(paths: &[PathBuf]) -> Result<Vec<ResultRow>> {
    let mut rows = Vec::new();
    let mut unreadable = HashSet::new();
    for path in paths {
        let text = std::fs::read_to_string(path).map_err(EvalError::io(path))?;
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            match serde_json::from_str::<ResultRow>(line) {
                Ok(row) => rows.push(row),
                Err(e) => {
                    if unreadable.insert(path.clone()) {
                        eprintln!(
                            "warning: {}, line {}: not a result row, skipped ({e})",
                            path.display(),
                            i + 1
                        );
                    }
                }
            }
        }
    }
    Ok(last_of_each_key(rows))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn row(sample: &str, method: &str, budget: f64, score: f64) -> ResultRow {
        ResultRow {
            sample_id: sample.into(),
            task: "passkey".into(),
            method: method.into(),
            protocol: Protocol::Context,
            chat: false,
            fingerprint: "fp".into(),
            config: serde_json::json!({"method": method}),
            budget,
            context_tokens: 100,
            length: 100,
            depth: Some(0.5),
            seed: 0,
            score,
            prediction: "x".into(),
            answers: vec!["x".into()],
            achieved_ratio: budget,
            kv_dtype: KvDtype::F16,
            reference_kv_dtype: None,
            resident_kv_bytes: 10,
            peak_kv_bytes: 0,
            full_kv_bytes: 20,
            prefill_ms: 1.0,
            scoring_ms: 0.0,
            decode_ms: 1.0,
            kl: 0.1,
            top1_agreement: 1.0,
            matched_prefix_tokens: 3,
            perplexity: 2.0,
        }
    }

    fn temp(name: &str) -> PathBuf {
        let p = std::env::temp_dir()
            .join(format!("kvmerger-results-{}-{name}.jsonl", std::process::id()));
        let _ = std::fs::remove_file(&p);
        p
    }

    /// A sweep over 6 jobs that computes rows deterministically; `stop_after` interrupts it.
    fn sweep(path: &Path, stop_after: Option<usize>) -> usize {
        let (mut store, _) = ResultStore::open(path).unwrap();
        let mut computed = 0;
        for job in 0..6 {
            let r = row(&format!("s{job}"), "h2o@50%", 0.5, job as f64 / 10.0);
            if store.is_current(&r.key(), &r.fingerprint) {
                continue;
            }
            if stop_after == Some(computed) {
                return computed;
            }
            store.append(&r).unwrap();
            computed += 1;
        }
        computed
    }

    #[test]
    fn an_interrupted_sweep_resumes_to_the_same_rows() {
        let (whole, parts) = (temp("whole"), temp("parts"));
        assert_eq!(sweep(&whole, None), 6);
        assert_eq!(sweep(&parts, Some(2)), 2);
        // A crash mid-write leaves half a line; it is dropped on resume.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&parts)
            .unwrap()
            .write_all(b"{\"sample_id\": \"s2\", \"ta")
            .unwrap();
        assert_eq!(sweep(&parts, None), 4, "only the missing rows are computed");
        assert_eq!(
            std::fs::read_to_string(&whole).unwrap(),
            std::fs::read_to_string(&parts).unwrap()
        );
    }

    #[test]
    fn shards_split_jobs_and_merge_back() {
        let s: Shard = "2/3".parse().unwrap();
        assert_eq!((0..9).filter(|&j| s.owns(j)).collect::<Vec<_>>(), vec![1, 4, 7]);
        for bad in ["0/3", "4/3", "1/0", "x", "1-2"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
        let (a, b) = (temp("a"), temp("b"));
        let (mut sa, _) = ResultStore::open(&a).unwrap();
        let (mut sb, _) = ResultStore::open(&b).unwrap();
        sa.append(&row("s0", "full", 1.0, 1.0)).unwrap();
        sb.append(&row("s1", "full", 1.0, 0.0)).unwrap();
        sb.append(&row("s0", "full", 1.0, 1.0)).unwrap();
        assert_eq!(merge_shards(&[a, b]).unwrap().len(), 2);
    }
}
