//! A generation session: one cache, one compression method, the prompt prefilled and
//! compressed once, then tokens appended under the method's decode-time policy.

use std::time::{Duration, Instant};

use kvmerger_compress::{CompressionConfig, CompressionMethod, KvCache, StatsRequest};
use serde::Serialize;

use crate::compression::{after_decode_step, compress_prompt, CompressionReport};
use crate::error::{EngineError, Result};
use crate::forward::{ForwardOptions, Logits};
use crate::model::Llama;
use crate::profile::{timed, Part};
use crate::sampler::Sampler;

/// Timings of a generation.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Timings {
    pub prefill: Duration,
    pub prefill_tokens: usize,
    pub decode: Duration,
    pub decode_tokens: usize,
}

impl Timings {
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prefill_tokens as f64 / self.prefill.as_secs_f64().max(1e-9)
    }
    pub fn decode_tokens_per_s(&self) -> f64 {
        self.decode_tokens as f64 / self.decode.as_secs_f64().max(1e-9)
    }
}

/// A prompt prefilled with full attention, ready to be compressed by one or more methods.
///
/// Prefill is the expensive part of an evaluation; every method of a comparison starts
/// from a clone of the same prefilled cache, with the union of their statistics.
#[derive(Debug, Clone)]
pub struct Prefilled {
    pub cache: KvCache,
    /// `[vocab]` logits after the last prompt token.
    pub logits: Vec<f32>,
    pub prompt_len: usize,
    pub stats: StatsRequest,
    pub elapsed: Duration,
}

impl Prefilled {
    pub fn run(
        model: &Llama,
        tokens: &[u32],
        stats: StatsRequest,
        attention_chunk: usize,
    ) -> Result<Self> {
        let start = Instant::now();
        let mut cache = model.new_cache();
        let opts = ForwardOptions { logits: Logits::Last, stats, attention_chunk };
        let logits = model.forward(tokens, &mut cache, opts)?.flatten_all()?.to_vec1()?;
        Ok(Self { cache, logits, prompt_len: tokens.len(), stats, elapsed: start.elapsed() })
    }
}

/// A model, a cache and a compression method.
pub struct Session<'m> {
    model: &'m Llama,
    pub cache: KvCache,
    method: Box<dyn CompressionMethod>,
    /// Queries per chunk of the explicit attention softmax.
    pub attention_chunk: usize,
    report: Option<CompressionReport>,
    steps: usize,
    pub timings: Timings,
}

impl<'m> Session<'m> {
    pub fn new(model: &'m Llama, config: &CompressionConfig) -> Result<Self> {
        config.check_model(model.config.n_layers)?;
        Ok(Self {
            model,
            cache: model.new_cache(),
            method: config.build()?,
            attention_chunk: ForwardOptions::default().attention_chunk,
            report: None,
            steps: 0,
            timings: Timings::default(),
        })
    }

    pub fn model(&self) -> &Llama {
        self.model
    }

    /// The compression report, once the prompt has been compressed.
    pub fn report(&self) -> Option<&CompressionReport> {
        self.report.as_ref()
    }

    /// Prefills the prompt with the statistics the method needs, then compresses every
    /// head to the method's budget. Returns the last prompt token's logits `[vocab]`.
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        if self.cache.n_seen != 0 {
            return Err(EngineError::Setup("prefill must be the session's first call".into()));
        }
        let stats = self.method.prompt_stats(tokens.len());
        let prefilled = Prefilled::run(self.model, tokens, stats, self.attention_chunk)?;
        self.resume(prefilled)
    }

    /// Starts from a prompt prefilled once for several methods (see [`Prefilled`]) and
    /// compresses it. Returns the last prompt token's logits `[vocab]`.
    pub fn resume(&mut self, prefilled: Prefilled) -> Result<Vec<f32>> {
        // Each method reads exactly the statistics it asked for: a wider observation window
        // recorded for another method does not stand in for its own.
        if !prefilled.stats.covers(&self.method.prompt_stats(prefilled.prompt_len)) {
            return Err(EngineError::Setup(format!(
                "the prefilled cache lacks statistics {} needs",
                self.method.name()
            )));
        }
        self.cache = prefilled.cache;
        self.timings.prefill += prefilled.elapsed;
        self.timings.prefill_tokens += prefilled.prompt_len;
        self.compress(prefilled.prompt_len)?;
        Ok(prefilled.logits)
    }

    fn compress(&mut self, prompt_len: usize) -> Result<()> {
        self.report = Some(compress_prompt(&*self.method, &mut self.cache, prompt_len)?);
        Ok(())
    }

    /// Appends tokens after the compressed prompt (a question, or one decoded token) and
    /// applies the method's decode-time policy. Returns logits as `logits` asks:
    /// `[rows][vocab]`, one row for [`Logits::Last`].
    pub fn extend(&mut self, tokens: &[u32], logits: Logits) -> Result<Vec<Vec<f32>>> {
        let opts = ForwardOptions {
            logits,
            stats: self.method.decode_stats(),
            attention_chunk: self.attention_chunk,
        };
        let out = self.model.forward(tokens, &mut self.cache, opts)?;
        self.steps += 1;
        timed(self.model.profile.as_deref(), Part::Policy, || {
            after_decode_step(&*self.method, &mut self.cache, self.steps)
        })?;
        Ok(out.to_vec2()?)
    }

    /// Generates up to `max_tokens` tokens after `logits` (the last logits returned by
    /// [`Self::prefill`] or [`Self::extend`]), stopping at any of `stop`. `on_token` sees
    /// each token as it is chosen and may stop generation by returning `false`.
    pub fn generate(
        &mut self,
        mut logits: Vec<f32>,
        max_tokens: usize,
        sampler: &mut Sampler,
        stop: &[u32],
        mut on_token: impl FnMut(u32) -> bool,
    ) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        let start = Instant::now();
        while out.len() < max_tokens {
            let next = sampler.sample(&logits);
            out.push(next);
            if stop.contains(&next) || !on_token(next) || out.len() == max_tokens {
                break;
            }
            if self.cache.n_seen >= self.model.config.context_length {
                break;
            }
            logits = self.extend(&[next], Logits::Last)?.swap_remove(0);
            self.timings.decode_tokens += 1;
        }
        self.timings.decode += start.elapsed();
        Ok(out)
    }
}
