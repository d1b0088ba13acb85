//! Sweeps: methods x budgets x tasks x lengths x depths x seeds, run sample by sample,
//! each sample's rows appended (and synced) as soon as its methods ran; resumable and shardable.

use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use kvmerger_compress::{Budget, CompressionConfig, KvDtype};
use kvmerger_engine::{LoadedModel, PrefillCompression, PrefillOptions};
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::fingerprint::Fnv64;
use crate::results::{row_key, ResultRow, ResultStore, Shard};
use crate::ruler::RulerTask;
use crate::runner::{run_sample, Protocol, RunOptions};
use crate::tasks::{generate, Sample, TaskInput, TaskKind};

/// One task's grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskGrid {
    pub task: TaskKind,
    /// Context lengths in tokens.
    pub lengths: Vec<usize>,
    /// Needle depths in [0, 1], for the tasks that take one ([`TaskKind::takes_depth`]).
    pub depths: Vec<f64>,
    pub seeds: Vec<u64>,
}

/// Seeds of the development split: defaults (KVMerger's parameters, the chat choice, the
/// preset sizes) were chosen on these, and on nothing else.
pub const DEV_SEEDS: std::ops::Range<u64> = 0..1000;
/// First seed of the held-out split, which the `default` and `paper` presets report on.
pub const HELD_OUT_SEED: u64 = 1000;

/// A whole comparison, as a preset or a JSON file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<TaskGrid>,
    /// A JSONL dataset run instead of generated tasks (set by `--dataset`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<DatasetSource>,
    /// Methods compared with the full cache (which always runs, as the reference): a name,
    /// or a variant with parameters, `kvmerger:mass=log_count;sigma=adaptive`.
    pub methods: Vec<String>,
    /// Budgets, in the grammar of `--budget`: `0.35`, `"35%"`, `"512t"`, `{"ratio": 0.35}`.
    pub budgets: Vec<Budget>,
    /// Per-method parameter overrides, `name -> [(key, value)]`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub params: std::collections::BTreeMap<String, Vec<(String, String)>>,
    /// When the question is read; both by default.
    #[serde(default = "all_protocols")]
    pub protocols: Vec<Protocol>,
    /// Wrap prompts in the model's chat template.
    #[serde(default)]
    pub chat: bool,
    /// Run the full-cache reference with its cache in this dtype, whatever `--kv-dtype`
    /// stores the rows' caches in (the `kv-dtype` preset: f32).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_kv_dtype: Option<KvDtype>,
    /// Caches stored in other dtypes, each running the full cache and every method at the
    /// stack's budgets against the same reference (the `frontier` presets: merging,
    /// eviction and quantization compared at equal bytes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kv_stacks: Vec<KvStack>,
}

/// Methods on a cache stored in another dtype than `--kv-dtype`'s: rows labelled
/// `full/q8_0`, `kvmerger/q8_0@50%`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvStack {
    pub kv_dtype: KvDtype,
    /// Budgets of every method on this cache; none runs the full cache alone.
    #[serde(default)]
    pub budgets: Vec<Budget>,
}

/// Where a dataset sweep's samples came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetSource {
    pub path: String,
    pub metric: crate::metrics::Metric,
    pub samples: usize,
}

fn all_protocols() -> Vec<Protocol> {
    Protocol::ALL.to_vec()
}

impl SweepSpec {
    /// Built-in presets. `default` (about 10 minutes on 2 cores) and `paper` (about an
    /// hour) report on held-out seeds; `dev` is `default`'s grid on development seeds, for
    /// choosing defaults; `long` is longer contexts; `ruler` is RULER's 11 synthetic
    /// subtasks at 4,096 tokens (hours), `ruler-quick` the same at 1,024 tokens with fewer
    /// samples and the field's current methods beside KVMerger and its RULER variant
    /// (minutes on SmolLM2); `kv-dtype` (a few minutes) compares the cache stored as
    /// `--kv-dtype` with an f32 full-cache reference, on development seeds.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "kv-dtype" => return Ok(Self::kv_dtype_preset()),
            "frontier" => return Ok(Self::frontier_preset(name, &FRONTIER_QUICK_SUBTASKS, 512, 2)),
            "frontier-4k" => return Ok(Self::frontier_preset(name, &RulerTask::ALL, 4096, 20)),
            _ => {}
        }
        let methods =
            ["kvmerger", "kvmerger:mass=scale_values", "h2o", "cam", "streaming_llm", "snapkv"]
                .map(String::from)
                .to_vec();
        let seeds = |first: u64, n: u64| (first..first + n).collect::<Vec<u64>>();
        let grid = |task, lengths: &[usize], depths: &[f64], seeds: Vec<u64>| TaskGrid {
            task,
            lengths: lengths.to_vec(),
            depths: depths.to_vec(),
            seeds,
        };
        let three = vec![Budget::Ratio(0.5), Budget::Ratio(0.35), Budget::Ratio(0.2)];
        // RULER as kvpress reports it: 50%, 75% and 87.5% of the cache removed. Its methods
        // are the field's and KVMerger with its best variant on development seeds, without
        // the ablation variant that breaks the model.
        let ruler_budgets = vec![Budget::Ratio(0.5), Budget::Ratio(0.25), Budget::Ratio(0.125)];
        let ruler_methods: Vec<String> = [
            "kvmerger",
            KVMERGER_RULER_VARIANT,
            "h2o",
            "cam",
            "streaming_llm",
            "snapkv",
            "knorm",
            "keydiff",
            "tova",
            "adakv",
            "pyramidkv",
            "merge",
            "expected_attention",
            "kvzip",
        ]
        .map(String::from)
        .to_vec();
        // `default` and `dev` share one grid, on different seeds. Sized (docs/eval-sizing.md)
        // for 12 samples per task and protocol where KL is compared: enough to separate,
        // with paired differences, two methods whose KL differs by 20% at 35%.
        let small = |first: u64| {
            vec![
                grid(TaskKind::Passkey, &[1024], &[0.2, 0.5, 0.8], seeds(first, 4)),
                grid(TaskKind::Needle, &[1024], &[0.25, 0.75], seeds(first, 3)),
                grid(TaskKind::Perplexity, &[1024], &[0.0], seeds(first, 12)),
            ]
        };
        let (tasks, budgets, methods) = match name {
            "default" => (small(HELD_OUT_SEED), three, methods),
            "dev" => (small(DEV_SEEDS.start), three, methods),
            "paper" => (
                vec![
                    grid(
                        TaskKind::Passkey,
                        &[1024, 2048],
                        &[0.1, 0.3, 0.5, 0.7, 0.9],
                        seeds(HELD_OUT_SEED, 5),
                    ),
                    grid(TaskKind::Needle, &[1024], &[0.25, 0.5, 0.75], seeds(HELD_OUT_SEED, 6)),
                    grid(
                        TaskKind::Ruler(RulerTask::NiahSingle1),
                        &[1024],
                        &[0.0],
                        seeds(HELD_OUT_SEED, 12),
                    ),
                    grid(TaskKind::Perplexity, &[1024], &[0.0], seeds(HELD_OUT_SEED, 24)),
                    grid(TaskKind::Perplexity, &[2048], &[0.0], seeds(HELD_OUT_SEED + 100, 8)),
                ],
                three,
                methods,
            ),
            "long" => (
                vec![
                    grid(
                        TaskKind::Passkey,
                        &[1024, 2048, 4096, 7900],
                        &[0.1, 0.3, 0.5, 0.7, 0.9],
                        seeds(HELD_OUT_SEED, 3),
                    ),
                    grid(
                        TaskKind::Needle,
                        &[2048, 4096],
                        &[0.1, 0.5, 0.9],
                        seeds(HELD_OUT_SEED, 3),
                    ),
                    grid(TaskKind::Perplexity, &[2048, 4096], &[0.0], seeds(HELD_OUT_SEED, 3)),
                ],
                three,
                methods,
            ),
            "ruler" => (ruler_grid(4096, 20), ruler_budgets, ruler_methods),
            "ruler-quick" => {
                (seed_major_grid(&RulerTask::ALL, 1024, 2), ruler_budgets, ruler_quick_methods())
            }
            other => {
                return Err(EvalError::Task(format!(
                    "unknown preset `{other}` (default, paper, dev, long, ruler, ruler-quick, \
                     kv-dtype, frontier, frontier-4k)"
                )))
            }
        };
        // The quick run keeps to the main protocol (question after compression) to stay
        // within minutes.
        let protocols =
            if name == "ruler-quick" { vec![Protocol::Context] } else { all_protocols() };
        Ok(Self {
            name: name.to_string(),
            tasks,
            dataset: None,
            methods,
            budgets,
            params: Default::default(),
            protocols,
            chat: false,
            reference_kv_dtype: None,
            kv_stacks: Vec::new(),
        })
    }

    /// RULER's `subtasks` at `length` tokens (`seeds_each` held-out samples each, the question
    /// read after compression) under three families at equal bytes: quantization (the
    /// full cache in q8_0, q4_0 and q4_0r), merging and eviction (KVMerger and KeyDiff, the
    /// best evictor of the RULER quick run, at four budgets in f16), and
    /// both stacked (each method at 50% and 35% on q8_0 and q4_0r caches). Plain q4_0 runs
    /// the full cache only: it loses every passkey on SmolLM2 (docs/eval-kv-dtype), so
    /// stacking on it would measure nothing.
    fn frontier_preset(name: &str, subtasks: &[RulerTask], length: usize, seeds_each: u64) -> Self {
        let stacked = vec![Budget::Ratio(0.5), Budget::Ratio(0.35)];
        let stack =
            |kv_dtype, budgets: &Vec<Budget>| KvStack { kv_dtype, budgets: budgets.clone() };
        Self {
            name: name.into(),
            tasks: seed_major_grid(subtasks, length, seeds_each),
            dataset: None,
            methods: ["kvmerger", "keydiff"].map(String::from).to_vec(),
            budgets: [0.5, 0.25, 0.125, 0.08].map(Budget::Ratio).to_vec(),
            params: Default::default(),
            protocols: vec![Protocol::Context],
            chat: false,
            reference_kv_dtype: None,
            kv_stacks: vec![
                stack(KvDtype::Q8_0, &stacked),
                stack(KvDtype::Q4_0Rotated, &stacked),
                stack(KvDtype::Q4_0, &Vec::new()),
            ],
        }
    }

    /// The full cache and KVMerger at 35%, on the default grid's perplexity continuations
    /// and passkeys (development seeds, fewer of them), against an f32 full cache.
    fn kv_dtype_preset() -> Self {
        let grid = |task, depths: &[f64], seeds| TaskGrid {
            task,
            lengths: vec![1024],
            depths: depths.to_vec(),
            seeds: (DEV_SEEDS.start..DEV_SEEDS.start + seeds).collect(),
        };
        Self {
            name: "kv-dtype".into(),
            tasks: vec![grid(TaskKind::Perplexity, &[0.0], 4), grid(TaskKind::Passkey, &[0.5], 3)],
            dataset: None,
            methods: vec!["kvmerger".into()],
            budgets: vec![Budget::Ratio(0.35)],
            params: Default::default(),
            protocols: vec![Protocol::Context],
            chat: false,
            reference_kv_dtype: Some(KvDtype::F32),
            kv_stacks: Vec::new(),
        }
    }

    /// The method configurations: the full cache, then every method at every budget.
    pub fn configs(&self) -> Result<Vec<CompressionConfig>> {
        self.configs_at(&self.budgets)
    }

    /// Each stack's dtype with its configurations: the full cache, then every method at the
    /// stack's budgets.
    pub fn stack_configs(&self) -> Result<Vec<(KvDtype, Vec<CompressionConfig>)>> {
        self.kv_stacks.iter().map(|s| Ok((s.kv_dtype, self.configs_at(&s.budgets)?))).collect()
    }

    fn configs_at(&self, budgets: &[Budget]) -> Result<Vec<CompressionConfig>> {
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
            for &b in budgets {
                out.push(CompressionConfig::from_cli(m, Some(b), &params)?);
            }
        }
        Ok(out)
    }

    /// Every job of the sweep, in a fixed order (shards index into it).
    pub fn jobs(&self) -> Vec<Job> {
        let mut jobs = Vec::new();
        for g in &self.tasks {
            let depths: &[f64] = if g.task.takes_depth() { &g.depths } else { &[0.0] };
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

/// KVMerger's best variant on RULER's development seeds (docs/eval-kvmerger-ruler-dev).
pub const KVMERGER_RULER_VARIANT: &str = "kvmerger:protect_by=key_diff;recent=0.02;selected=0.15";

/// The quick RULER run's methods: KVMerger, its best variant on development seeds, and the
/// field's current methods (the classic H2O, CaM, StreamingLLM and SnapKV stay in `ruler`).
fn ruler_quick_methods() -> Vec<String> {
    let field =
        ["tova", "knorm", "keydiff", "expected_attention", "pyramidkv", "adakv", "kvzip", "merge"];
    ["kvmerger", KVMERGER_RULER_VARIANT].into_iter().chain(field).map(String::from).collect()
}

/// The subtasks of the quick frontier: those whose answers are a few numbers (so a sample
/// takes seconds to answer, not a minute of decoding a wrong word list) and whose full
/// cache SmolLM2 answers at least half the time in the RULER quick run.
const FRONTIER_QUICK_SUBTASKS: [RulerTask; 4] = [
    RulerTask::NiahSingle1,
    RulerTask::NiahSingle2,
    RulerTask::NiahMultikey1,
    RulerTask::NiahMultivalue,
];

/// RULER's `subtasks` at `length` tokens, `seeds_each` held-out seeds each, seed by seed:
/// every subtask in each round, so that a run stopped early (or a shard) still averages over
/// all subtasks.
fn seed_major_grid(subtasks: &[RulerTask], length: usize, seeds_each: u64) -> Vec<TaskGrid> {
    (HELD_OUT_SEED..HELD_OUT_SEED + seeds_each)
        .flat_map(|seed| {
            subtasks.iter().map(move |&t| TaskGrid {
                task: TaskKind::Ruler(t),
                lengths: vec![length],
                depths: vec![0.0],
                seeds: vec![seed],
            })
        })
        .collect()
}

/// RULER's 11 subtasks at `length` tokens, `seeds_each` held-out seeds each (one job per
/// seed: the generators draw the depths).
fn ruler_grid(length: usize, seeds_each: u64) -> Vec<TaskGrid> {
    RulerTask::ALL
        .into_iter()
        .map(|t| TaskGrid {
            task: TaskKind::Ruler(t),
            lengths: vec![length],
            depths: vec![0.0],
            seeds: (HELD_OUT_SEED..HELD_OUT_SEED + seeds_each).collect(),
        })
        .collect()
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
    /// Each sample runs under each of these (perplexity samples, which have no question,
    /// under [`Protocol::Context`] only).
    pub protocols: Vec<Protocol>,
    pub chat: bool,
    /// How prompts are prefilled: the chunk and attention chunk of every mode.
    pub prefill: PrefillOptions,
    /// Each method runs under each of these (the full cache, which compresses nothing,
    /// under the first only); rows compressed incrementally are labelled apart
    /// ([`prefill_label`]), so a report shows both side by side.
    pub prefill_modes: Vec<PrefillCompression>,
    /// See [`SweepSpec::reference_kv_dtype`].
    pub reference_kv_dtype: Option<KvDtype>,
    /// Configurations run again on caches stored in other dtypes ([`SweepSpec::kv_stacks`]),
    /// against the reference of the rows above (the model's dtype unless
    /// `reference_kv_dtype` says otherwise).
    pub kv_stacks: Vec<(KvDtype, Vec<CompressionConfig>)>,
    /// Entries a head of every compressed method may hold while decoding (`--max-kv`).
    pub max_kv: Option<usize>,
    /// What identifies the model and how it runs (file identity, weight formats, cache
    /// dtype): part of every row's fingerprint.
    pub model_fingerprint: String,
    pub shard: Shard,
    /// Draw a progress bar (off in tests).
    pub progress: bool,
}

/// What a sweep did.
#[derive(Debug, Default)]
pub struct SweepOutcome {
    /// Rows computed by this run.
    pub computed: Vec<ResultRow>,
    /// Of those, rows the store held with another fingerprint (sample, method, model or
    /// options changed since they were written).
    pub stale: usize,
    /// Keys of every row of this sweep (this shard), computed now or before.
    pub keys: std::collections::HashSet<String>,
}

/// Bumped when the runner changes what it computes, so that old rows are recomputed.
const RUNNER_REVISION: &str = "2";

/// The fingerprint of one row: everything that determines its numbers.
pub fn row_fingerprint(
    sample: &Sample,
    config: &CompressionConfig,
    protocol: Protocol,
    mode: PrefillCompression,
    stacked_on: Option<KvDtype>,
    input: &SweepInput<'_>,
) -> String {
    let mut h = Fnv64::default();
    h.field(RUNNER_REVISION);
    h.field(&serde_json::to_string(sample).unwrap_or_default());
    h.field(&serde_json::to_string(config).unwrap_or_default());
    // Token budgets and a share of 1 became bounds that nothing is evicted below while
    // decoding (they were cut to the prompt): their rows are recomputed, the others kept.
    let budget = config.budget();
    if *config != CompressionConfig::Full
        && (matches!(budget, Budget::Tokens(_)) || budget == Budget::Ratio(1.0))
    {
        h.field("absolute bound");
    }
    h.field(protocol.name());
    h.field(if input.chat { "chat" } else { "raw" });
    h.field(&input.prefill.attention_chunk.to_string());
    h.field(&format!("prefill {} in chunks of {}", mode.name(), input.prefill.chunk));
    h.field(&input.model_fingerprint);
    if let Some(dtype) = input.reference_kv_dtype {
        h.field(&format!("reference kv {dtype}"));
    }
    if let Some(dtype) = stacked_on {
        h.field(&format!("stacked on kv {}", dtype.fingerprint()));
    }
    if let Some(n) = input.max_kv {
        h.field(&format!("max_kv {n}"));
    }
    h.hex()
}

/// Runs every job this shard owns whose rows `store` lacks or holds with another
/// fingerprint.
pub fn run_sweep(
    model: &mut LoadedModel,
    input: &SweepInput<'_>,
    store: &mut ResultStore,
) -> Result<SweepOutcome> {
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
    // indicatif draws nothing when stderr is not a terminal (a long run logging to a file):
    // such a run reports each finished sample on its own line instead.
    let log_lines = input.progress && !std::io::stderr().is_terminal();
    let started = Instant::now();
    let tokenizer = model.tokenizer.clone();
    let count_tokens = |s: &str| tokenizer.encode(s, false).map(|t| t.len()).unwrap_or(usize::MAX);
    let mut outcome = SweepOutcome::default();
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
        let protocols: &[Protocol] = if sample.metric == crate::metrics::Metric::Perplexity {
            &[Protocol::Context]
        } else {
            &input.protocols
        };
        let runs = protocols.iter().flat_map(|&p| {
            input.prefill_modes.iter().enumerate().map(move |(i, &mode)| (p, mode, i == 0))
        });
        let passes = std::iter::once((None, &input.configs))
            .chain(input.kv_stacks.iter().map(|(dtype, configs)| (Some(*dtype), configs)));
        let passes: Vec<(Option<KvDtype>, &Vec<CompressionConfig>)> = passes.collect();
        for (protocol, mode, first_mode) in runs {
            for &(stacked_on, configs) in &passes {
                let pass = Pass { sample: &sample, job, protocol, mode, first_mode, stacked_on };
                // A stack runs on the same model with its cache in another dtype; the model
                // gets its own dtype back whatever the pass did.
                let own = model.model.kv_dtype;
                model.model.kv_dtype = stacked_on.unwrap_or(own);
                let done = run_pass(model, input, configs, &pass, own, store, &mut outcome, &bar);
                model.model.kv_dtype = own;
                done?;
            }
        }
        bar.inc(1);
        if log_lines {
            eprintln!(
                "[{:>6.0} s] {}/{} samples: {} done",
                started.elapsed().as_secs_f64(),
                bar.position(),
                bar.length().unwrap_or(0),
                sample.id
            );
        }
    }
    bar.finish_and_clear();
    Ok(outcome)
}

/// One sample under one protocol, prefill mode and cache dtype.
struct Pass<'a> {
    sample: &'a Sample,
    job: &'a Job,
    protocol: Protocol,
    mode: PrefillCompression,
    /// Whether `mode` is the first of the sweep's (the only one the full cache runs under).
    first_mode: bool,
    /// The stack's dtype, `None` for the model's own.
    stacked_on: Option<KvDtype>,
}

/// Runs the configurations of `pass` whose rows `store` lacks or holds with another
/// fingerprint, on `model` (its cache already in the pass's dtype; `own` is the sweep's).
#[allow(clippy::too_many_arguments)]
fn run_pass(
    model: &LoadedModel,
    input: &SweepInput<'_>,
    configs: &[CompressionConfig],
    pass: &Pass<'_>,
    own: KvDtype,
    store: &mut ResultStore,
    outcome: &mut SweepOutcome,
    bar: &ProgressBar,
) -> Result<()> {
    let (sample, protocol, mode) = (pass.sample, pass.protocol, pass.mode);
    let label = |config: &CompressionConfig| {
        let label = prefill_label(config, mode);
        match pass.stacked_on {
            Some(dtype) => variant_label(&label, dtype.name()),
            None => label,
        }
    };
    let mut missing = Vec::new();
    for config in configs.iter().filter(|c| pass.first_mode || **c != CompressionConfig::Full) {
        let key = row_key(&sample.id, protocol, &label(config));
        let fingerprint = row_fingerprint(sample, config, protocol, mode, pass.stacked_on, input);
        if !store.is_current(&key, &fingerprint) {
            outcome.stale += usize::from(store.is_stale(&key, &fingerprint));
            missing.push((config.clone(), fingerprint));
        }
        outcome.keys.insert(key);
    }
    if missing.is_empty() {
        return Ok(());
    }
    let (length, seed) = match pass.job {
        Job::Generated { length, seed, .. } => (Some(*length), *seed),
        Job::Given(_) => (None, 0),
    };
    // A stack is compared with the reference of the sweep's own rows.
    let reference_kv_dtype = match pass.stacked_on {
        Some(_) => Some(input.reference_kv_dtype.unwrap_or(own)),
        None => input.reference_kv_dtype,
    };
    let options = RunOptions {
        protocol,
        chat: input.chat,
        prefill: PrefillOptions { compression: mode, ..input.prefill },
        reference_kv_dtype,
        max_kv: input.max_kv,
    };
    let configs: Vec<CompressionConfig> = missing.iter().map(|m| m.0.clone()).collect();
    let results = run_sample(model, sample, &configs, options)?;
    for (result, (_, fingerprint)) in results.into_iter().zip(missing) {
        if let Some((heads, what)) = result.clamped {
            bar.suspend(|| {
                eprintln!(
                    "warning: {} ({} protocol), {}: {what} clamped to the budget in {heads} heads",
                    sample.id,
                    protocol.name(),
                    result.method.label()
                )
            });
        }
        let row = ResultRow {
            sample_id: sample.id.clone(),
            task: sample.task.clone(),
            method: label(&result.method),
            protocol,
            chat: input.chat,
            fingerprint,
            config: serde_json::to_value(&result.method).unwrap_or_default(),
            budget: result.method.budget().ratio(result.context_tokens),
            context_tokens: result.context_tokens,
            length: length.unwrap_or(result.context_tokens),
            depth: sample.depth,
            seed,
            score: result.score,
            prediction: result.prediction,
            answers: if sample.metric == crate::metrics::Metric::Perplexity {
                Vec::new()
            } else {
                sample.answers.clone()
            },
            achieved_ratio: result.achieved_ratio,
            kv_dtype: model.model.kv_dtype,
            reference_kv_dtype: reference_kv_dtype.filter(|&d| d != model.model.kv_dtype),
            resident_kv_bytes: result.resident_kv_bytes,
            peak_kv_bytes: result.peak_kv_bytes,
            full_kv_bytes: result.full_kv_bytes,
            prefill_ms: result.prefill_ms,
            scoring_ms: result.scoring_ms,
            decode_ms: result.decode_ms,
            kl: result.kl,
            top1_agreement: result.top1_agreement,
            matched_prefix_tokens: result.matched_prefix_tokens,
            perplexity: result.perplexity,
        };
        store.append(&row)?;
        outcome.computed.push(row);
    }
    Ok(())
}

/// A row's method label: the method's own when its prompt was compressed once, its name
/// marked `/incremental` otherwise (`kvmerger/incremental@35%`), so the two are two methods
/// of a report, paired sample by sample.
pub fn prefill_label(config: &CompressionConfig, mode: PrefillCompression) -> String {
    let label = config.label();
    match mode {
        PrefillCompression::Once => label,
        PrefillCompression::Incremental => variant_label(&label, "incremental"),
    }
}

/// `label` with `/variant` after the method's name, before its budget (`kvmerger/q8_0@50%`,
/// `full/q8_0`), so a report groups the variant as a method of its own.
pub fn variant_label(label: &str, variant: &str) -> String {
    match label.split_once('@') {
        Some((name, rest)) => format!("{name}/{variant}@{rest}"),
        None => format!("{label}/{variant}"),
    }
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
        let expected: usize = spec
            .tasks
            .iter()
            .map(|g| {
                let depths = if g.task.takes_depth() { g.depths.len() } else { 1 };
                g.lengths.len() * depths * g.seeds.len()
            })
            .sum();
        assert_eq!(jobs.len(), expected);
        // Reported presets run on held-out seeds only; `dev` on development seeds only.
        for (name, held_out) in [
            ("default", true),
            ("paper", true),
            ("ruler", true),
            ("ruler-quick", true),
            ("frontier", true),
            ("frontier-4k", true),
            ("dev", false),
        ] {
            let p = SweepSpec::preset(name).unwrap();
            for g in &p.tasks {
                assert!(g.seeds.iter().all(|s| DEV_SEEDS.contains(s) != held_out), "{name}");
            }
        }
        assert!(SweepSpec::preset("nope").is_err());
        // RULER: every subtask, 20 held-out seeds each at 4,096 tokens, one job per seed (its
        // generator draws the depths); the field's methods, KVMerger's RULER variant and no
        // ablation variant.
        let ruler = SweepSpec::preset("ruler").unwrap();
        assert_eq!(ruler.tasks.len(), RulerTask::ALL.len());
        assert!(ruler.tasks.iter().all(|g| g.lengths == [4096] && g.seeds.len() == 20));
        assert_eq!(ruler.jobs().len(), 11 * 20);
        for m in [
            "keydiff",
            "tova",
            "kvmerger",
            "adakv",
            "pyramidkv",
            "merge",
            "expected_attention",
            "kvzip",
        ] {
            assert!(ruler.methods.iter().any(|x| x == m), "{m}");
        }
        let variants: Vec<&String> = ruler.methods.iter().filter(|m| m.contains(':')).collect();
        assert_eq!(variants, [KVMERGER_RULER_VARIANT]);
        assert_eq!(ruler.configs().unwrap().len(), 1 + 14 * 3);
        let quick = SweepSpec::preset("ruler-quick").unwrap();
        assert_eq!(
            (quick.jobs().len(), quick.protocols.as_slice()),
            (11 * 2, &[Protocol::Context][..])
        );
        // Seed-major, so that a run stopped early averages over every subtask; KVMerger,
        // its variant and every method of the field's that `ruler` compares.
        assert!(quick.tasks[..11].iter().all(|g| g.seeds == [HELD_OUT_SEED]));
        assert!(quick.methods.iter().any(|m| m == KVMERGER_RULER_VARIANT));
        for m in ruler
            .methods
            .iter()
            .filter(|m| !["h2o", "cam", "streaming_llm", "snapkv"].contains(&m.as_str()))
        {
            assert!(quick.methods.contains(m), "{m}");
        }
        assert_eq!(quick.configs().unwrap().len(), 1 + 10 * 3);
        assert_eq!(ruler.protocols, Protocol::ALL);
        // The frontier: every subtask in each round of seeds; the full cache and both
        // methods again on q8_0 and q4_0r at 50% and 35%, the full cache alone on q4_0.
        let frontier = SweepSpec::preset("frontier").unwrap();
        let jobs = frontier.jobs();
        assert_eq!(jobs.len(), 4 * 2);
        let seed = |j: &Job| match j {
            Job::Generated { seed, .. } => *seed,
            Job::Given(_) => unreachable!("generated"),
        };
        assert!(jobs[..4].iter().all(|j| seed(j) == HELD_OUT_SEED), "seed-major order");
        let stacks = frontier.stack_configs().unwrap();
        let dtypes: Vec<KvDtype> = stacks.iter().map(|s| s.0).collect();
        assert_eq!(dtypes, [KvDtype::Q8_0, KvDtype::Q4_0Rotated, KvDtype::Q4_0]);
        assert_eq!(stacks[0].1.len(), 1 + frontier.methods.len() * 2);
        assert_eq!(stacks[2].1, [CompressionConfig::Full]);
        let json = serde_json::to_string(&frontier).unwrap();
        assert_eq!(serde_json::from_str::<SweepSpec>(&json).unwrap(), frontier);
        assert_eq!(SweepSpec::preset("frontier-4k").unwrap().jobs().len(), 11 * 20);
        let variants = SweepSpec {
            methods: vec!["kvmerger:mass=scale_values;sigma=adaptive".into()],
            budgets: vec![Budget::Ratio(0.5)],
            ..spec.clone()
        };
        assert_eq!(
            variants.configs().unwrap()[1].label(),
            "kvmerger(mass=scale_values;sigma=adaptive)@50%"
        );
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(serde_json::from_str::<SweepSpec>(&json).unwrap(), spec);
    }
}
