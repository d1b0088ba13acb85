//! `kvmerger bench --breakdown`: where a decode step's time goes (weight products per
//! matrix, with the bytes they read per step and the rate, to hold against the kernel
//! benchmark's; activation quantization; attention over the cache; norms; RoPE and cache
//! append; SiLU product and residual adds; the rest; sampling) at each
//! context length, for each decode weight format and each cache (`--breakdown-methods`: the
//! full cache, or a method holding `--budget` of the prompt, whose decode-time policy is a
//! part of its own); with `--busy-cores N`, the same with N other processes spinning, to show
//! what a shared machine costs.

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::args::ModelSource;
use anyhow::{bail, Context, Result};
use clap::Args;
use kvmerger_compress::{Budget, CompressionConfig};
use kvmerger_engine::{
    argmax, Linear, Llama, Part, Session, StepProfile, WeightFormat, WeightFormats,
};

#[derive(Debug, Clone, Args)]
pub struct BreakdownArgs {
    /// Print where each decode step's time goes at each length, for each of
    /// `--breakdown-formats`, instead of comparing engines.
    #[arg(long)]
    pub breakdown: bool,
    /// Decode weight formats the breakdown measures, interleaved in one run.
    #[arg(long, value_delimiter = ',', default_values_t = vec!["q8".to_string(), "file".to_string()])]
    pub breakdown_formats: Vec<String>,
    /// Caches the breakdown measures, interleaved in one run: `full`, or a compression
    /// method holding `--budget` of the prompt.
    #[arg(long, value_delimiter = ',', default_values_t = vec!["full".to_string()])]
    pub breakdown_methods: Vec<String>,
    /// Also measure each step while this many processes spin on the CPU (started and stopped
    /// by the bench), alternating with quiet rounds.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub busy_cores: usize,
}

/// Processes that keep cores busy until dropped.
struct Burners(Vec<Child>);

impl Burners {
    fn start(n: usize) -> Result<Self> {
        let spawn = |_| {
            Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .context("--busy-cores: starting a spinning `sh` process")
        };
        let burners = Self((0..n).map(spawn).collect::<Result<_>>()?);
        // Let the scheduler place them before measuring.
        std::thread::sleep(Duration::from_millis(50));
        Ok(burners)
    }
}

impl Drop for Burners {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Summed part times over some decode steps, and their wall time.
#[derive(Default)]
struct Totals {
    parts: Vec<Duration>,
    sampling: Duration,
    wall: Duration,
    steps: usize,
}

impl Totals {
    fn add(&mut self, profile: &StepProfile, sampling: Duration, wall: Duration, steps: usize) {
        if self.parts.is_empty() {
            self.parts = vec![Duration::ZERO; Part::ALL.len()];
        }
        for (total, part) in self.parts.iter_mut().zip(Part::ALL) {
            *total += profile.get(part);
        }
        self.sampling += sampling;
        self.wall += wall;
        self.steps += steps;
    }

    fn ms_per_step(&self, d: Duration) -> f64 {
        d.as_secs_f64() * 1e3 / self.steps.max(1) as f64
    }

    /// `(name, ms per step, weight bytes read per step)`: the parts, the rest of the forward
    /// pass, sampling, and all weight products together. Bytes are known for the products on
    /// the file's blocks (`bytes`, from [`weight_bytes`]).
    fn rows(&self, bytes: &WeightBytes) -> Vec<(String, f64, Option<usize>)> {
        let mut rows: Vec<(String, f64, Option<usize>)> = Part::ALL
            .iter()
            .zip(&self.parts)
            .map(|(p, d)| (p.name().to_string(), self.ms_per_step(*d), bytes.get(*p)))
            .collect();
        let weights: f64 = Part::ALL
            .iter()
            .zip(&self.parts)
            .filter(|(p, _)| p.is_weight_product())
            .map(|(_, d)| self.ms_per_step(*d))
            .sum();
        let accounted: Duration = self.parts.iter().sum::<Duration>() + self.sampling;
        let rest = self.wall.saturating_sub(accounted);
        rows.push(("rest (plumbing between parts)".into(), self.ms_per_step(rest), None));
        rows.push(("sampling (argmax)".into(), self.ms_per_step(self.sampling), None));
        rows.push(("= all weight products".into(), weights, bytes.total()));
        rows
    }
}

/// Weight bytes each weight-product part reads per decode step, where every matrix of the
/// part is multiplied on the file's blocks (the kernel reads each byte once per step).
struct WeightBytes(Vec<(Part, Option<usize>)>);

impl WeightBytes {
    fn get(&self, part: Part) -> Option<usize> {
        self.0.iter().find(|(p, _)| *p == part).and_then(|(_, b)| *b)
    }

    fn total(&self) -> Option<usize> {
        self.0.iter().map(|(_, b)| *b).sum()
    }
}

/// The bytes of `model`'s matrices per weight-product part, on the file's blocks.
fn weight_bytes(model: &Llama, decode: WeightFormat) -> WeightBytes {
    let sum = |layers: &mut dyn Iterator<Item = &Linear>| -> Option<usize> {
        let on_blocks = decode == WeightFormat::File;
        layers.map(|l| l.kernel_matrix().filter(|_| on_blocks).map(|k| k.bytes())).sum()
    };
    let blocks = &model.blocks;
    WeightBytes(vec![
        (Part::Qkv, sum(&mut blocks.iter().flat_map(|b| [&b.wq, &b.wk, &b.wv]))),
        (Part::Output, sum(&mut blocks.iter().map(|b| &b.wo))),
        (Part::GateUp, sum(&mut blocks.iter().flat_map(|b| [&b.gate, &b.up]))),
        (Part::Down, sum(&mut blocks.iter().map(|b| &b.down))),
        (Part::LmHead, sum(&mut std::iter::once(&model.lm_head))),
    ])
}

/// Measures the model at `path` (loaded through `source`, so its cache dtype applies).
pub fn run(
    args: &BreakdownArgs,
    source: &ModelSource,
    path: &Path,
    lengths: &[usize],
    steps: usize,
    budget: Budget,
) -> Result<()> {
    let configs = args
        .breakdown_methods
        .iter()
        .map(|m| match m.trim() {
            "full" => Ok(CompressionConfig::Full),
            m => CompressionConfig::from_cli(m, Some(budget), &[]).map_err(anyhow::Error::from),
        })
        .collect::<Result<Vec<_>>>()
        .context("--breakdown-methods")?;
    let formats = args
        .breakdown_formats
        .iter()
        .map(|f| f.parse::<WeightFormat>().map_err(anyhow::Error::msg))
        .collect::<Result<Vec<_>>>()
        .context("--breakdown-formats")?;
    let mut models = Vec::new();
    for &decode in &formats {
        let mut loaded = source.load(path, WeightFormats { prefill: WeightFormat::F32, decode })?;
        let profile = Arc::new(StepProfile::new());
        loaded.model.set_profile(Some(profile.clone()));
        models.push((decode, loaded, profile));
    }
    let text = "The quick brown fox jumps over the lazy dog while the river runs past the old \
                mill. "
        .repeat(800);
    let all_tokens = models[0].1.tokenizer.encode(&text, false)?;
    let conditions: &[bool] = if args.busy_cores > 0 { &[false, true] } else { &[false] };
    let mut out = std::io::stdout().lock();
    for &n in lengths {
        if n > all_tokens.len() {
            bail!("length {n} exceeds the sample text ({} tokens)", all_tokens.len());
        }
        // [format, method]
        let mut sessions = Vec::new();
        for (m, (_, loaded, profile)) in models.iter().enumerate() {
            for config in &configs {
                let mut session = Session::new(&loaded.model, config)?;
                let logits = session.prefill(&all_tokens[..n])?;
                profile.reset();
                sessions.push((m, config.label(), session, logits));
            }
        }
        // [format, method][condition]
        let mut totals: Vec<Vec<Totals>> = sessions
            .iter()
            .map(|_| conditions.iter().map(|_| Totals::default()).collect())
            .collect();
        // Rounds alternate formats and conditions so that machine noise spreads evenly.
        let rounds = 2;
        let per_round = steps.div_ceil(rounds).max(1);
        for _ in 0..rounds {
            for (c, &busy) in conditions.iter().enumerate() {
                let _burners = if busy { Some(Burners::start(args.busy_cores)?) } else { None };
                for (s, (m, _, session, logits)) in sessions.iter_mut().enumerate() {
                    if session.cache().n_seen + per_round > session.model().config.context_length {
                        bail!("length {n} leaves no room for {per_round} decode steps");
                    }
                    let profile = &models[*m].2;
                    profile.reset();
                    let (mut sampling, start) = (Duration::ZERO, Instant::now());
                    for _ in 0..per_round {
                        let t = Instant::now();
                        let next = argmax(logits);
                        sampling += t.elapsed();
                        *logits = session.step(next)?;
                    }
                    totals[s][c].add(profile, sampling, start.elapsed(), per_round);
                }
            }
        }
        let names: Vec<String> = sessions
            .iter()
            .map(|(m, label, session, _)| {
                let entries: usize = session.cache().layers.iter().flatten().map(|h| h.len()).sum();
                let per_head = entries / session.cache().layers.iter().flatten().count().max(1);
                format!(
                    "decode weights {:?}, {label} ({per_head} entries per head after the steps)",
                    models[*m].0
                )
            })
            .collect();
        let bytes: Vec<WeightBytes> = sessions
            .iter()
            .map(|(m, ..)| weight_bytes(&models[*m].1.model, models[*m].0))
            .collect();
        print_tables(&mut out, n, &names, &bytes, &totals, args.busy_cores)?;
    }
    Ok(())
}

fn print_tables(
    out: &mut impl Write,
    n: usize,
    names: &[String],
    bytes: &[WeightBytes],
    totals: &[Vec<Totals>],
    busy_cores: usize,
) -> Result<()> {
    for ((name, totals), bytes) in names.iter().zip(totals).zip(bytes) {
        let quiet = &totals[0];
        let quiet_ms = quiet.ms_per_step(quiet.wall);
        write!(out, "\n{n} tokens, {name}: {quiet_ms:.2} ms/step")?;
        if let Some(busy) = totals.get(1) {
            let busy_ms = busy.ms_per_step(busy.wall);
            let ratio = busy_ms / quiet_ms;
            write!(out, "; {busy_ms:.2} ms/step with {busy_cores} core(s) busy ({ratio:.2}x)")?;
        }
        writeln!(out)?;
        write!(out, "| part | weight MB | ms/step | share | GB/s |")?;
        if totals.len() > 1 {
            write!(out, " busy ms/step | busy share | busy GB/s |")?;
        }
        let busy_columns = if totals.len() > 1 { "---:|---:|---:|" } else { "" };
        writeln!(out, "\n|---|---:|---:|---:|---:|{busy_columns}")?;
        let rows: Vec<Vec<_>> = totals.iter().map(|t| t.rows(bytes)).collect();
        let walls: Vec<f64> = totals.iter().map(|t| t.ms_per_step(t.wall)).collect();
        for i in 0..rows[0].len() {
            let (name, _, part_bytes) = &rows[0][i];
            let mb = part_bytes.map_or("-".to_string(), |b| format!("{:.1}", b as f64 / 1e6));
            write!(out, "| {name} | {mb} |")?;
            for (r, wall) in rows.iter().zip(&walls) {
                let ms = r[i].1;
                // GB/s: bytes / (ms / 1e3) / 1e9.
                let rate =
                    part_bytes.map_or("-".to_string(), |b| format!("{:.1}", b as f64 / (ms * 1e6)));
                write!(out, " {ms:.3} | {:.1}% | {rate} |", 100.0 * ms / wall)?;
            }
            writeln!(out)?;
        }
    }
    Ok(())
}
