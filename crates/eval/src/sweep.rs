//! Sweeps: methods x budgets x tasks x lengths x depths x seeds, run sample by sample,
//! each row appended as soon as it is computed; resumable and shardable.

use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use kvmerger_compress::{Budget, CompressionConfig};
use kvmerger_engine::LoadedModel;
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::results::{row_key, ResultRow, ResultStore, Shard};
use crate::runner::{run_sample, RunOptions};
use crate::tasks::{generate, Sample, TaskInput, TaskKind};

/// One task's grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskGrid {
    pub task: TaskKind,
    /// Context lengths in tokens.
    pub lengths: Vec<usize>,
    /// Needle depths in [0, 1] (ignored by perplexity).
    pub depths: Vec<f64>,
    pub seeds: Vec<u64>,
}

/// A whole comparison, as a preset or a JSON file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepSpec {
    pub name: String,
    pub tasks: Vec<TaskGrid>,
    /// Methods compared with the full cache (which always runs, as the reference): a name,
    /// or a variant with parameters, `kvmerger:mass=log_count;sigma=adaptive`.
    pub methods: Vec<String>,
    /// Budgets, in the grammar of `--budget`: `0.35`, `"35%"`, `"512t"`, `{"ratio": 0.35}`.
    pub budgets: Vec<Budget>,
    /// Per-method parameter overrides, `name -> [(key, value)]`.
    #[serde(default)]
    pub params: std::collections::BTreeMap<String, Vec<(String, String)>>,
    #[serde(default)]
    pub query_aware: bool,
}

impl SweepSpec {
    /// Built-in presets: `default` (about 10 minutes on 2 cores), `long`, `ruler`.
    pub fn preset(name: &str) -> Result<Self> {
        let methods =
            ["kvmerger", "kvmerger:mass=log_count", "h2o", "cam", "streaming_llm", "snapkv"]
                .map(String::from)
                .to_vec();
        let grid = |task, lengths: &[usize], depths: &[f64], seeds: &[u64]| TaskGrid {
            task,
            lengths: lengths.to_vec(),
            depths: depths.to_vec(),
            seeds: seeds.to_vec(),
        };
        let (tasks, budgets) = match name {
            "default" => (
                vec![
                    grid(TaskKind::Passkey, &[1024, 2048], &[0.1, 0.5, 0.9], &[0, 1]),
                    grid(TaskKind::Needle, &[1536], &[0.25, 0.75], &[0, 1]),
                    grid(TaskKind::NiahSingle, &[1024], &[0.3, 0.7], &[0, 1]),
                    grid(TaskKind::Perplexity, &[1024], &[0.0], &[0, 1]),
                ],
                vec![Budget::Ratio(0.5), Budget::Ratio(0.35)],
            ),
            "long" => (
                vec![
                    grid(
                        TaskKind::Passkey,
                        &[1024, 2048, 4096, 7900],
                        &[0.1, 0.3, 0.5, 0.7, 0.9],
                        &[0, 1, 2],
                    ),
                    grid(TaskKind::Needle, &[2048, 4096], &[0.1, 0.5, 0.9], &[0, 1, 2]),
                    grid(TaskKind::Perplexity, &[2048, 4096], &[0.0], &[0, 1, 2]),
                ],
                vec![Budget::Ratio(0.5), Budget::Ratio(0.35), Budget::Ratio(0.2)],
            ),
            "ruler" => (
                [
                    TaskKind::NiahSingle,
                    TaskKind::NiahMultikey,
                    TaskKind::NiahMultivalue,
                    TaskKind::VariableTracking,
                ]
                .into_iter()
                .map(|t| grid(t, &[2048], &[0.2, 0.5, 0.8], &[0, 1, 2]))
                .collect(),
                vec![Budget::Ratio(0.5), Budget::Ratio(0.35), Budget::Ratio(0.2)],
            ),
            other => {
                return Err(EvalError::Task(format!(
                    "unknown preset `{other}` (default, long, ruler)"
                )))
            }
        };
        Ok(Self {
            name: name.to_string(),
            tasks,
            methods,
            budgets,
            params: Default::default(),
            query_aware: false,
        })
    }

    /// The method configurations: the full cache, then every method at every budget.
    pub fn configs(&self) -> Result<Vec<CompressionConfig>> {
        let mut out = vec![CompressionConfig::Full];
        for entry in self.methods.iter().filter(|m| m.as_str() != "full") {
            let (m, variant) = entry.split_once(':').unwrap_or((entry, ""));
            let mut params = self.params.get(m).cloned().unwrap_or_default();
            for kv in variant.split(';').filter(|kv| !kv.trim().is_empty()) {
                let (k, v) = kv.split_once('=').ok_or_else(|| {
                    EvalError::Task(format!("method variant `{entry}`: expected key=value"))
                })?;
                params.push((k.trim().to_string(), v.trim().to_string()));
            }
            for &b in &self.budgets {
                out.push(CompressionConfig::from_cli(m, Some(b), &params)?);
            }
        }
        Ok(out)
    }

    /// Every job of the sweep, in a fixed order (shards index into it).
    pub fn jobs(&self) -> Vec<Job> {
        let mut jobs = Vec::new();
        for g in &self.tasks {
            let depths: &[f64] = if g.task == TaskKind::Perplexity { &[0.0] } else { &g.depths };
            for &length in &g.lengths {
                for &depth in depths {
                    for &seed in &g.seeds {
                        jobs.push(Job::Generated { task: g.task, length, depth, seed });
                    }
                }
            }
        }
        jobs
    }
}

/// One sample to run.
#[derive(Debug, Clone)]
pub enum Job {
    Generated {
        task: TaskKind,
        length: usize,
        depth: f64,
        seed: u64,
    },
    /// A row of a user's dataset.
    Given(Box<Sample>),
}

/// What a sweep needs besides the model.
pub struct SweepInput<'a> {
    pub configs: Vec<CompressionConfig>,
    pub jobs: Vec<Job>,
    pub haystack: Option<&'a str>,
    pub options: RunOptions,
    pub shard: Shard,
    /// Draw a progress bar (off in tests).
    pub progress: bool,
}

/// Runs every job this shard owns that `store` lacks; returns the rows computed now.
pub fn run_sweep(
    model: &LoadedModel,
    input: &SweepInput<'_>,
    store: &mut ResultStore,
) -> Result<Vec<ResultRow>> {
    let owned: Vec<&Job> = input
        .jobs
        .iter()
        .enumerate()
        .filter(|(i, _)| input.shard.owns(*i))
        .map(|(_, j)| j)
        .collect();
    let bar =
        if input.progress { ProgressBar::new(owned.len() as u64) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} samples, ETA {eta} {msg}",
        )
        .expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(250));
    let count_tokens =
        |s: &str| model.tokenizer.encode(s, false).map(|t| t.len()).unwrap_or(usize::MAX);
    let mut computed = Vec::new();
    for job in owned {
        let sample = match job {
            Job::Generated { task, length, depth, seed } => {
                let ti = TaskInput {
                    length: *length,
                    depth: *depth,
                    seed: *seed,
                    count_tokens: &count_tokens,
                    haystack: input.haystack,
                };
                generate(*task, &ti)?
            }
            Job::Given(s) => (**s).clone(),
        };
        bar.set_message(sample.id.clone());
        let missing: Vec<CompressionConfig> = input
            .configs
            .iter()
            .filter(|c| !store.contains(&row_key(&sample.id, &c.label())))
            .cloned()
            .collect();
        if !missing.is_empty() {
            let (length, seed) = match job {
                Job::Generated { length, seed, .. } => (Some(*length), *seed),
                Job::Given(_) => (None, 0),
            };
            for outcome in run_sample(model, &sample, &missing, input.options)? {
                let row = ResultRow {
                    sample_id: sample.id.clone(),
                    task: sample.task.clone(),
                    method: outcome.method.label(),
                    config: serde_json::to_value(&outcome.method).unwrap_or_default(),
                    budget: outcome.method.budget().ratio(outcome.context_tokens),
                    context_tokens: outcome.context_tokens,
                    length: length.unwrap_or(outcome.context_tokens),
                    depth: sample.depth,
                    seed,
                    score: outcome.score,
                    prediction: outcome.prediction,
                    achieved_ratio: outcome.achieved_ratio,
                    resident_kv_bytes: outcome.resident_kv_bytes,
                    full_kv_bytes: outcome.full_kv_bytes,
                    prefill_ms: outcome.prefill_ms,
                    decode_ms: outcome.decode_ms,
                    kl: outcome.kl,
                    top1_agreement: outcome.top1_agreement,
                    matched_prefix_tokens: outcome.matched_prefix_tokens,
                    perplexity: outcome.perplexity,
                };
                store.append(&row)?;
                computed.push(row);
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(computed)
}

/// Reads a sweep specification from JSON.
pub fn load_spec(path: &Path) -> Result<SweepSpec> {
    let text = std::fs::read_to_string(path).map_err(EvalError::io(path))?;
    serde_json::from_str(&text).map_err(|e| EvalError::Task(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_expand_to_configs_and_jobs() {
        let spec = SweepSpec::preset("default").unwrap();
        let configs = spec.configs().unwrap();
        assert_eq!(configs.len(), 1 + spec.methods.len() * spec.budgets.len());
        assert_eq!(configs[0], CompressionConfig::Full);
        let jobs = spec.jobs();
        assert_eq!(jobs.len(), 2 * 3 * 2 + 2 * 2 + 2 * 2 + 2);
        assert!(SweepSpec::preset("nope").is_err());
        let variants = SweepSpec {
            methods: vec!["kvmerger:mass=log_count;sigma=adaptive".into()],
            budgets: vec![Budget::Ratio(0.5)],
            ..spec.clone()
        };
        assert_eq!(
            variants.configs().unwrap()[1].label(),
            "kvmerger(mass=log_count;sigma=adaptive)@50%"
        );
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<SweepSpec>(&json).unwrap(), spec);
    }
}
