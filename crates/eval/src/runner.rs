//! Runs samples through the engine under every method of a comparison.
//!
//! Compressing once, each sample's prompt is prefilled once, with the union of the
//! statistics every method needs; each method then starts from a copy of that prefill,
//! compresses it and answers greedily, up to eight methods' answers side by side in batched
//! decode passes (the same tokens as one by one: a batched pass computes each row as that
//! row alone). Compressing incrementally, each method prefills the
//! prompt itself, compressing as it goes (the full-cache reference is still prefilled once). Under [`Protocol::Context`] the question is read after compression, uncompressed
//! (kvpress's setting); under [`Protocol::Prompt`] it is part of what is compressed (the
//! setting of the KVMerger and H2O papers). The full cache's answer is the reference for the
//! fidelity figures: KL divergence and top-1 agreement of the next-token distributions over
//! that answer (teacher-forced), and how many greedy tokens match it.

use std::time::Instant;

use kvmerger_compress::{CompressionConfig, KvDtype, StatsRequest};
use kvmerger_engine::{
    argmax, Llama, LoadedModel, Logits, PrefillCompression, PrefillOptions, Prefilled, Sampler,
    SamplingConfig, Session,
};
use kvmerger_models::{ChatMessage, ChatTemplate};
use serde::{Deserialize, Serialize};

use crate::error::{EvalError, Result};
use crate::metrics::Metric;
use crate::tasks::Sample;

/// When the question is read.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// The context is compressed before the question is read (kvpress; cached documents).
    #[default]
    Context,
    /// The whole prompt, question included, is compressed (the KVMerger and H2O papers).
    /// Query-aware selectors such as SnapKV see the question in their observation window
    /// and win this protocol by construction.
    Prompt,
}

impl Protocol {
    pub const ALL: [Protocol; 2] = [Protocol::Context, Protocol::Prompt];

    pub fn name(self) -> &'static str {
        match self {
            Protocol::Context => "context",
            Protocol::Prompt => "prompt",
        }
    }

    /// How a report describes it.
    pub fn description(self) -> &'static str {
        match self {
            Protocol::Context => "question read after compression (kvpress)",
            Protocol::Prompt => "question compressed with the context (KVMerger, H2O papers)",
        }
    }
}

/// How samples are run.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    pub protocol: Protocol,
    /// Wrap context and question in the model's chat template (as kvpress does for
    /// instruct models). Perplexity samples, which have no question, are never wrapped.
    pub chat: bool,
    /// How prompts are prefilled: in chunks, compressed once or incrementally.
    pub prefill: PrefillOptions,
    /// Run the full-cache reference with its cache in this dtype (prefilled separately)
    /// instead of the model's, so the full cache's own row measures the storage's error.
    pub reference_kv_dtype: Option<KvDtype>,
    /// Entries a head of every method but the full cache (the reference) may hold while
    /// decoding.
    pub max_kv: Option<usize>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            protocol: Protocol::Context,
            chat: false,
            prefill: PrefillOptions::default(),
            reference_kv_dtype: None,
            max_kv: None,
        }
    }
}

/// Marks where the question starts inside a rendered chat prompt (never in real text).
const QUESTION_MARK: &str = "\u{1}kvmerger-question\u{1}";

/// The text a sample's prompt is made of: the part prefilled (and compressed), and the part
/// read after compression (empty under [`Protocol::Prompt`]).
///
/// Raw: `context`, then `\n question \n answer_prefix`. Chat: one user turn holding the
/// context and the question, then the assistant's turn starting with the answer prefix;
/// the template's text before the question goes with the context (kvpress's split).
pub fn prompt_texts(
    model: &LoadedModel,
    sample: &Sample,
    opts: RunOptions,
) -> Result<(String, String)> {
    let has_question = sample.metric != Metric::Perplexity;
    let (context, question) = if opts.chat && has_question {
        let template = ChatTemplate::for_tokenizer(&model.tokenizer)?;
        let user = format!("{}{QUESTION_MARK}\n{}", sample.context, sample.question);
        let rendered = template.render(&[ChatMessage::user(user)], true)?;
        let (before, after) = rendered
            .split_once(QUESTION_MARK)
            .filter(|(_, after)| !after.contains(QUESTION_MARK))
            .ok_or_else(|| {
                EvalError::Setup("the chat template did not keep the prompt intact".into())
            })?;
        (before.to_string(), format!("{after}{}", sample.answer_prefix))
    } else if has_question {
        (sample.context.clone(), format!("\n{}\n{}", sample.question, sample.answer_prefix))
    } else {
        (sample.context.clone(), String::new())
    };
    Ok(match opts.protocol {
        Protocol::Context => (context, question),
        Protocol::Prompt => (format!("{context}{question}"), String::new()),
    })
}

/// What one method did on one sample.
#[derive(Debug, Clone)]
pub struct MethodOutcome {
    pub method: CompressionConfig,
    pub prediction: String,
    pub score: f64,
    pub achieved_ratio: f64,
    pub resident_kv_bytes: usize,
    /// The most bytes the cache held at once during the prefill.
    pub peak_kv_bytes: usize,
    pub full_kv_bytes: usize,
    pub context_tokens: usize,
    pub prefill_ms: f64,
    /// Of `prefill_ms`, the method's own pass after the prompt (KVzip's reconstruction).
    pub scoring_ms: f64,
    pub decode_ms: f64,
    /// Mean KL(full || method) over the full cache's answer tokens.
    pub kl: f64,
    pub top1_agreement: f64,
    /// Greedy tokens equal to the full cache's before the first difference.
    pub matched_prefix_tokens: usize,
    /// Perplexity of the reference answer (or continuation) under this method.
    pub perplexity: f64,
    /// Heads whose fixed parts (sinks, window, protected shares) were clamped to fit the
    /// budget, and what the first of them clamped.
    pub clamped: Option<(usize, &'static str)>,
}

/// Runs `sample` under `methods` (the full cache is always run first, as the reference;
/// it is reported only if listed). Outcomes come in the order of `methods`.
pub fn run_sample(
    model: &LoadedModel,
    sample: &Sample,
    methods: &[CompressionConfig],
    opts: RunOptions,
) -> Result<Vec<MethodOutcome>> {
    let tok = &model.tokenizer;
    let (context_text, question_text) = prompt_texts(model, sample, opts)?;
    let context = tok.encode(&context_text, true)?;
    let question =
        if question_text.is_empty() { Vec::new() } else { tok.encode(&question_text, false)? };
    let limit = model.model.config.context_length;
    let needed = context.len() + question.len() + sample.max_new_tokens;
    if needed > limit {
        return Err(EvalError::Engine(kvmerger_engine::EngineError::ContextOverflow {
            needed,
            context: limit,
        }));
    }
    let incremental = opts.prefill.compression == PrefillCompression::Incremental;
    let shared_options = PrefillOptions { compression: PrefillCompression::Once, ..opts.prefill };
    // Only the methods compressed once read the shared prefill's statistics.
    let stats =
        methods.iter().filter(|_| !incremental).try_fold(StatsRequest::default(), |acc, m| {
            m.build().map(|b| acc.union(b.prompt_stats(context.len())))
        })?;
    let prefilled = Prefilled::run(&model.model, &context, stats, shared_options)?;
    // The reference's own model and prefill where its cache dtype differs from the rows'.
    let reference_model = opts.reference_kv_dtype.filter(|&d| d != model.model.kv_dtype).map(|d| {
        let mut m = model.model.clone();
        m.kv_dtype = d;
        m
    });
    let reference_prefilled = reference_model
        .as_ref()
        .map(|m| Prefilled::run(m, &context, StatsRequest::default(), shared_options))
        .transpose()?;
    let (reference_llama, reference_prefill) = match (&reference_model, &reference_prefilled) {
        (Some(m), Some(p)) => (m, p),
        _ => (&model.model, &prefilled),
    };

    // Perplexity samples score a given continuation; the others score a generated answer
    // and measure fidelity on the full cache's answer.
    let perplexity_task = sample.metric == Metric::Perplexity;
    let full = if perplexity_task {
        let continuation = sample
            .answers
            .first()
            .ok_or_else(|| EvalError::Task(format!("{}: no continuation to score", sample.id)))?;
        Answer { tokens: tok.encode(continuation, false)?, decode_ms: 0.0 }
    } else {
        let (session, logits, _, _) = compressed(
            reference_llama,
            &CompressionConfig::Full,
            Start::Shared(reference_prefill),
            None,
        )?;
        answer(model, session, logits, &question, sample.max_new_tokens)?
    };
    let (session, logits, full_ratio, full_bytes) = compressed(
        reference_llama,
        &CompressionConfig::Full,
        Start::Shared(reference_prefill),
        None,
    )?;
    let full_peak = session.peak().resident_bytes;
    let reference = teacher_forced(session, logits, &question, &full.tokens)?;
    let full_kv_bytes = 2
        * model.model.kv_dtype.row_bytes(model.model.config.head_dim)
        * context.len()
        * model.model.config.n_layers
        * model.model.config.n_kv_heads;

    let reference_row = Reference {
        full: &full,
        forced: &reference,
        full_ratio,
        full_bytes,
        full_peak,
        full_kv_bytes,
        context_tokens: context.len(),
    };
    let mut outcomes = Vec::with_capacity(methods.len());
    for group in methods.chunks(ANSWERED_TOGETHER) {
        // Each method's figures, and the sessions left to answer with the logits they
        // answer from (after reading the question).
        let mut rows = Vec::with_capacity(group.len());
        let (mut answering, mut first) = (Vec::new(), Vec::new());
        for method in group {
            if *method == CompressionConfig::Full && reference_model.is_none() {
                rows.push(MethodRow::reference(&reference_row, perplexity_task, &prefilled));
                continue;
            }
            let start = if incremental {
                Start::Alone(&context, opts.prefill)
            } else {
                Start::Shared(&prefilled)
            };
            let (mut session, logits, ratio, bytes) =
                compressed(&model.model, method, start, opts.max_kv)?;
            let forced = teacher_forced(session.fork()?, logits.clone(), &question, &full.tokens)?;
            let mut row = MethodRow::compressed(&session, ratio, bytes, forced);
            if !perplexity_task {
                let start = Instant::now();
                let logits = read_question(&mut session, logits, &question)?;
                row.answer.decode_ms = start.elapsed().as_secs_f64() * 1e3;
                answering.push((rows.len(), session));
                first.push(logits);
            }
            rows.push(row);
        }
        let (at, mut sessions): (Vec<usize>, Vec<Session<'_>>) = answering.into_iter().unzip();
        let mut samplers: Vec<Sampler> =
            sessions.iter().map(|_| Sampler::new(SamplingConfig::default())).collect();
        let eos = model.tokenizer.eos_ids();
        let generated = Session::generate_together(
            &mut sessions,
            first,
            sample.max_new_tokens,
            &mut samplers,
            &eos,
        )?;
        for ((i, tokens), session) in at.into_iter().zip(generated).zip(&sessions) {
            rows[i].answer.tokens = tokens;
            rows[i].answer.decode_ms += session.timings.decode.as_secs_f64() * 1e3;
        }
        for (method, row) in group.iter().zip(rows) {
            outcomes.push(row.outcome(method, sample, &reference_row, model, perplexity_task)?);
        }
    }
    Ok(outcomes)
}

/// Methods whose answers are generated side by side in batched decode passes (each weight
/// block read once for all of them); more would hold more compressed caches at once.
const ANSWERED_TOGETHER: usize = 8;

/// The full cache's reference answer and what it measured, for every method's row.
struct Reference<'a> {
    full: &'a Answer,
    forced: &'a Forced,
    full_ratio: f64,
    full_bytes: usize,
    full_peak: usize,
    full_kv_bytes: usize,
    context_tokens: usize,
}

/// A method's figures on a sample, before they are scored; `answer` is filled in once
/// generated (its `decode_ms`: reading the question, then the method's share of the
/// batched steps it answered in).
struct MethodRow {
    forced: Forced,
    answer: Answer,
    achieved_ratio: f64,
    resident_kv_bytes: usize,
    peak_kv_bytes: usize,
    prefill_ms: f64,
    scoring_ms: f64,
    clamped: Option<(usize, &'static str)>,
}

impl MethodRow {
    /// The full cache's row where it is the reference itself.
    fn reference(r: &Reference<'_>, perplexity_task: bool, prefilled: &Prefilled) -> Self {
        let answer = if perplexity_task {
            Answer { tokens: Vec::new(), decode_ms: 0.0 }
        } else {
            r.full.clone()
        };
        Self {
            forced: r.forced.clone(),
            answer,
            achieved_ratio: r.full_ratio,
            resident_kv_bytes: r.full_bytes,
            peak_kv_bytes: r.full_peak,
            prefill_ms: (prefilled.elapsed - prefilled.scoring).as_secs_f64() * 1e3,
            scoring_ms: 0.0,
            clamped: None,
        }
    }

    fn compressed(
        session: &Session<'_>,
        achieved_ratio: f64,
        resident_kv_bytes: usize,
        forced: Forced,
    ) -> Self {
        let clamped = session.report().filter(|r| r.clamped_heads() > 0).map(|report| {
            let what = report.heads.iter().flatten().find_map(|h| h.clamped);
            (report.clamped_heads(), what.unwrap_or("fixed parts"))
        });
        Self {
            forced,
            answer: Answer { tokens: Vec::new(), decode_ms: 0.0 },
            achieved_ratio,
            resident_kv_bytes,
            peak_kv_bytes: session.peak().resident_bytes,
            prefill_ms: session.timings.prefill.as_secs_f64() * 1e3,
            scoring_ms: session.timings.scoring.as_secs_f64() * 1e3,
            clamped,
        }
    }

    fn outcome(
        self,
        method: &CompressionConfig,
        sample: &Sample,
        reference: &Reference<'_>,
        model: &LoadedModel,
        perplexity_task: bool,
    ) -> Result<MethodOutcome> {
        let prediction = model.tokenizer.decode_plain(&self.answer.tokens)?;
        let full = &reference.full.tokens;
        let matched = self.answer.tokens.iter().zip(full).take_while(|(a, b)| a == b).count();
        let score = if perplexity_task {
            self.forced.perplexity
        } else {
            sample.metric.score(&prediction, &sample.answers, sample.all_classes.as_deref())
        };
        Ok(MethodOutcome {
            method: method.clone(),
            score,
            prediction,
            achieved_ratio: self.achieved_ratio,
            resident_kv_bytes: self.resident_kv_bytes,
            peak_kv_bytes: self.peak_kv_bytes,
            full_kv_bytes: reference.full_kv_bytes,
            context_tokens: reference.context_tokens,
            prefill_ms: self.prefill_ms,
            scoring_ms: self.scoring_ms,
            decode_ms: self.answer.decode_ms,
            kl: mean_kl(&reference.forced.log_probs, &self.forced.log_probs),
            top1_agreement: top1_agreement(&reference.forced.log_probs, &self.forced.log_probs),
            matched_prefix_tokens: matched,
            perplexity: self.forced.perplexity,
            clamped: self.clamped,
        })
    }
}

#[derive(Debug, Clone)]
struct Answer {
    tokens: Vec<u32>,
    decode_ms: f64,
}

/// Where a method's session starts.
#[derive(Clone, Copy)]
enum Start<'a> {
    /// From a copy of the prompt prefilled once for every method.
    Shared(&'a Prefilled),
    /// Prefilling the prompt itself as the options say (compressing as it goes).
    Alone(&'a [u32], PrefillOptions),
}

/// A session of `method` with the context prefilled and compressed, holding at most
/// `max_kv` entries per head while decoding. Returns it with the last context logits, the
/// achieved ratio and the bytes resident after compression.
fn compressed<'m>(
    model: &'m Llama,
    method: &CompressionConfig,
    start: Start<'_>,
    max_kv: Option<usize>,
) -> Result<(Session<'m>, Vec<f32>, f64, usize)> {
    let mut session = Session::new(model, method)?.with_max_kv(max_kv);
    let logits = match start {
        Start::Shared(prefilled) => session.resume(prefilled.clone())?,
        Start::Alone(context, options) => {
            session.options = options;
            session.prefill(context)?
        }
    };
    let (ratio, bytes) =
        session.report().map_or((1.0, 0), |r| (r.achieved_ratio(), r.resident_bytes));
    Ok((session, logits, ratio, bytes))
}

/// Reads the question after the compressed context and answers greedily.
fn answer(
    model: &LoadedModel,
    mut session: Session<'_>,
    logits: Vec<f32>,
    question: &[u32],
    max_new: usize,
) -> Result<Answer> {
    let start = Instant::now();
    let logits = read_question(&mut session, logits, question)?;
    let mut greedy = Sampler::new(SamplingConfig::default());
    let tokens =
        session.generate(logits, max_new, &mut greedy, &model.tokenizer.eos_ids(), |_| true)?;
    Ok(Answer { tokens, decode_ms: start.elapsed().as_secs_f64() * 1e3 })
}

/// Feeds the question after the context whose last logits are `logits`; returns the
/// logits the answer starts from.
fn read_question(
    session: &mut Session<'_>,
    logits: Vec<f32>,
    question: &[u32],
) -> Result<Vec<f32>> {
    if question.is_empty() {
        return Ok(logits);
    }
    Ok(session.extend(question, Logits::Last)?.swap_remove(0))
}

/// Teacher-forced distributions over a reference answer.
#[derive(Clone)]
pub struct Forced {
    /// `[target][vocab]` log-probabilities of the positions that predict each target token.
    pub log_probs: Vec<Vec<f32>>,
    pub perplexity: f64,
}

/// Feeds `question ++ targets` in one step after the compressed context (whose last logits
/// are `first`) and returns the distributions that predict each target token.
pub fn teacher_forced(
    mut session: Session<'_>,
    first: Vec<f32>,
    question: &[u32],
    targets: &[u32],
) -> Result<Forced> {
    let mut rows = Vec::with_capacity(targets.len());
    if targets.is_empty() {
        return Ok(Forced { log_probs: rows, perplexity: f64::NAN });
    }
    let input: Vec<u32> = question.iter().chain(&targets[..targets.len() - 1]).copied().collect();
    // The distribution predicting targets[0] is the last context row when there is no question.
    let skip = question.len().saturating_sub(1);
    if question.is_empty() {
        rows.push(log_softmax(&first));
    }
    if !input.is_empty() {
        let logits = session.extend(&input, Logits::All)?;
        rows.extend(logits.iter().skip(skip).map(|r| log_softmax(r)));
    }
    let nll: f64 = rows.iter().zip(targets).map(|(lp, &t)| -(lp[t as usize] as f64)).sum();
    Ok(Forced { perplexity: (nll / targets.len() as f64).exp(), log_probs: rows })
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
    logits.iter().map(|l| l - lse).collect()
}

/// Mean over positions of KL(p || q), from log-probabilities. Each position's KL is at
/// least 0; where p and q nearly agree, the rounding of f32 log-probabilities (whose
/// probabilities do not sum to exactly 1) can give a slightly negative sum, taken as 0.
pub fn mean_kl(p: &[Vec<f32>], q: &[Vec<f32>]) -> f64 {
    if p.is_empty() {
        return 0.0;
    }
    let total: f64 = p
        .iter()
        .zip(q)
        .map(|(lp, lq)| {
            let kl: f64 =
                lp.iter().zip(lq).map(|(a, b)| (a.exp() as f64) * (*a as f64 - *b as f64)).sum();
            kl.max(0.0)
        })
        .sum();
    total / p.len() as f64
}

/// Share of positions where both distributions have the same arg-max.
pub fn top1_agreement(p: &[Vec<f32>], q: &[Vec<f32>]) -> f64 {
    if p.is_empty() {
        return 1.0;
    }
    p.iter().zip(q).filter(|(a, b)| argmax(a) == argmax(b)).count() as f64 / p.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_of_identical_distributions_is_zero_and_positive_otherwise() {
        let p = vec![log_softmax(&[1.0, 2.0, 3.0])];
        assert!(mean_kl(&p, &p).abs() < 1e-9);
        let q = vec![log_softmax(&[3.0, 2.0, 1.0])];
        // KL(p||q) = sum p (log p - log q) with p = softmax(1,2,3): 0.0900, 0.2447, 0.6652;
        // log p - log q = (-2, 0, 2) -> 0.6652*2 - 0.0900*2 = 1.1504.
        assert!((mean_kl(&p, &q) - 1.1504).abs() < 1e-3);
        assert_eq!(top1_agreement(&p, &q), 0.0);
        assert_eq!(top1_agreement(&p, &p), 1.0);
    }
}
