//! Runs samples through the engine under every method of a comparison.
//!
//! Each sample's context is prefilled once, with the union of the statistics every method
//! needs; each method then starts from a clone of that cache, compresses it, reads the
//! question uncompressed (as kvpress does; `query_aware` compresses context and question
//! together) and answers greedily. The full cache's answer is the reference for the
//! fidelity figures: KL divergence and top-1 agreement of the next-token distributions
//! over that answer (teacher-forced), and how many greedy tokens match it.

use std::time::Instant;

use kvmerger_compress::{CompressionConfig, StatsRequest};
use kvmerger_engine::{argmax, LoadedModel, Logits, Prefilled, Sampler, SamplingConfig, Session};

use crate::error::{EvalError, Result};
use crate::metrics::Metric;
use crate::tasks::Sample;

/// How samples are run.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    /// Compress context and question together instead of the context alone.
    pub query_aware: bool,
    /// Queries per chunk of the explicit attention softmax.
    pub attention_chunk: usize,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self { query_aware: false, attention_chunk: 128 }
    }
}

/// What one method did on one sample.
#[derive(Debug, Clone)]
pub struct MethodOutcome {
    pub method: CompressionConfig,
    pub prediction: String,
    pub score: f64,
    pub achieved_ratio: f64,
    pub resident_kv_bytes: usize,
    pub full_kv_bytes: usize,
    pub context_tokens: usize,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    /// Mean KL(full || method) over the full cache's answer tokens.
    pub kl: f64,
    pub top1_agreement: f64,
    /// Greedy tokens equal to the full cache's before the first difference.
    pub matched_prefix_tokens: usize,
    /// Perplexity of the reference answer (or continuation) under this method.
    pub perplexity: f64,
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
    let question_text = format!("\n{}\n{}", sample.question, sample.answer_prefix);
    let (context_text, question_text) = if opts.query_aware {
        (format!("{}{}", sample.context, question_text), String::new())
    } else {
        (sample.context.clone(), question_text)
    };
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
    let stats = methods
        .iter()
        .try_fold(StatsRequest::default(), |acc, m| m.build().map(|b| acc.union(b.stats())))?;
    let prefilled = Prefilled::run(&model.model, &context, stats, opts.attention_chunk)?;

    // Perplexity samples score a given continuation; the others score a generated answer
    // and measure fidelity on the full cache's answer.
    let perplexity_task = sample.metric == Metric::Perplexity;
    let full = if perplexity_task {
        let continuation = sample
            .answers
            .first()
            .ok_or_else(|| EvalError::Task(format!("{}: no continuation to score", sample.id)))?;
        Answer {
            tokens: tok.encode(continuation, false)?,
            achieved_ratio: 1.0,
            resident_kv_bytes: 0,
            decode_ms: 0.0,
        }
    } else {
        answer(model, &CompressionConfig::Full, &prefilled, &question, sample.max_new_tokens)?
    };
    let reference =
        teacher_forced(model, &CompressionConfig::Full, &prefilled, &question, &full.tokens)?;
    let full_kv_bytes = 2
        * 4
        * context.len()
        * model.model.config.n_layers
        * model.model.config.n_kv_heads
        * model.model.config.head_dim;

    methods
        .iter()
        .map(|method| {
            let forced = if *method == CompressionConfig::Full {
                reference.clone()
            } else {
                teacher_forced(model, method, &prefilled, &question, &full.tokens)?
            };
            let ans = if perplexity_task {
                Answer {
                    tokens: Vec::new(),
                    achieved_ratio: forced.achieved_ratio,
                    resident_kv_bytes: forced.resident_kv_bytes,
                    decode_ms: 0.0,
                }
            } else if *method == CompressionConfig::Full {
                full.clone()
            } else {
                answer(model, method, &prefilled, &question, sample.max_new_tokens)?
            };
            let prediction = tok.decode(&ans.tokens)?;
            let matched = ans.tokens.iter().zip(&full.tokens).take_while(|(a, b)| a == b).count();
            let score = if perplexity_task {
                forced.perplexity
            } else {
                sample.metric.score(&prediction, &sample.answers, sample.all_classes.as_deref())
            };
            Ok(MethodOutcome {
                method: method.clone(),
                score,
                prediction,
                achieved_ratio: ans.achieved_ratio,
                resident_kv_bytes: ans.resident_kv_bytes,
                full_kv_bytes,
                context_tokens: context.len(),
                prefill_ms: prefilled.elapsed.as_secs_f64() * 1e3,
                decode_ms: ans.decode_ms,
                kl: mean_kl(&reference.log_probs, &forced.log_probs),
                top1_agreement: top1_agreement(&reference.log_probs, &forced.log_probs),
                matched_prefix_tokens: matched,
                perplexity: forced.perplexity,
            })
        })
        .collect()
}

#[derive(Debug, Clone)]
struct Answer {
    tokens: Vec<u32>,
    achieved_ratio: f64,
    resident_kv_bytes: usize,
    decode_ms: f64,
}

/// A session of `method` over a clone of the prefilled context, compressed. Returns it with
/// the last context logits, the achieved ratio and the bytes resident after compression.
fn compressed<'m>(
    model: &'m LoadedModel,
    method: &CompressionConfig,
    prefilled: &Prefilled,
) -> Result<(Session<'m>, Vec<f32>, f64, usize)> {
    let mut session = Session::new(&model.model, method)?;
    let logits = session.resume(prefilled.clone())?;
    let (ratio, bytes) =
        session.report().map_or((1.0, 0), |r| (r.achieved_ratio(), r.resident_bytes));
    Ok((session, logits, ratio, bytes))
}

/// Compresses the prefilled context, reads the question, answers greedily.
fn answer(
    model: &LoadedModel,
    method: &CompressionConfig,
    prefilled: &Prefilled,
    question: &[u32],
    max_new: usize,
) -> Result<Answer> {
    let (mut session, mut logits, achieved_ratio, resident_kv_bytes) =
        compressed(model, method, prefilled)?;
    let start = Instant::now();
    if !question.is_empty() {
        logits = session.extend(question, Logits::Last)?.swap_remove(0);
    }
    let mut greedy = Sampler::new(SamplingConfig::default());
    let tokens =
        session.generate(logits, max_new, &mut greedy, &model.tokenizer.eos_ids(), |_| true)?;
    Ok(Answer {
        tokens,
        achieved_ratio,
        resident_kv_bytes,
        decode_ms: start.elapsed().as_secs_f64() * 1e3,
    })
}

#[derive(Clone)]
struct Forced {
    /// `[target][vocab]` log-probabilities of the positions that predict each target token.
    log_probs: Vec<Vec<f32>>,
    perplexity: f64,
    achieved_ratio: f64,
    resident_kv_bytes: usize,
}

/// Feeds `question ++ targets` in one step after the compressed context and returns the
/// distributions that predict each target token.
fn teacher_forced(
    model: &LoadedModel,
    method: &CompressionConfig,
    prefilled: &Prefilled,
    question: &[u32],
    targets: &[u32],
) -> Result<Forced> {
    let (mut session, first, achieved_ratio, resident_kv_bytes) =
        compressed(model, method, prefilled)?;
    let mut rows = Vec::with_capacity(targets.len());
    if targets.is_empty() {
        return Ok(Forced {
            log_probs: rows,
            perplexity: f64::NAN,
            achieved_ratio,
            resident_kv_bytes,
        });
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
    Ok(Forced {
        perplexity: (nll / targets.len() as f64).exp(),
        log_probs: rows,
        achieved_ratio,
        resident_kv_bytes,
    })
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
    logits.iter().map(|l| l - lse).collect()
}

/// Mean over positions of KL(p || q), from log-probabilities.
pub fn mean_kl(p: &[Vec<f32>], q: &[Vec<f32>]) -> f64 {
    if p.is_empty() {
        return 0.0;
    }
    let total: f64 = p
        .iter()
        .zip(q)
        .map(|(lp, lq)| {
            lp.iter().zip(lq).map(|(a, b)| (a.exp() as f64) * (*a as f64 - *b as f64)).sum::<f64>()
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
