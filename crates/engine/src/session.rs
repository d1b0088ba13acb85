//! A session: one [`Sequence`] driven by its caller (the evaluation, the CLI, benchmarks)
//! rather than by the serving runtime. The prompt goes through the sequence's chunked
//! prefill, compressed once or incrementally; the caller then feeds tokens of its own
//! (a question, a scored continuation) or generates with a sampler of its own.

use std::time::{Duration, Instant};

use kvmerger_compress::{CompressionConfig, KvCache};
use serde::Serialize;

use crate::compression::CompressionReport;
use crate::error::{EngineError, Result};
use crate::forward::{Logits, Phase};
use crate::model::Llama;
use crate::prefill::PrefillOptions;
use crate::sampler::Sampler;
use crate::sequence::{decode_batch, CachePeak, Prefilled, Sequence};

/// Timings of a generation.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Timings {
    pub prefill: Duration,
    /// Of `prefill`, the time KVzip's reconstruction pass took.
    pub scoring: Duration,
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

/// A model, a compression method and, once the prompt is in, its sequence.
pub struct Session<'m> {
    model: &'m Llama,
    compression: CompressionConfig,
    /// How the prompt is prefilled.
    pub options: PrefillOptions,
    /// Entries a head may hold while decoding (see [`Self::with_max_kv`]).
    max_kv: Option<usize>,
    seq: Option<Sequence>,
    /// What [`Self::cache`] shows before the prompt.
    empty: KvCache,
    pub timings: Timings,
}

impl<'m> Session<'m> {
    pub fn new(model: &'m Llama, config: &CompressionConfig) -> Result<Self> {
        config.check_model(model.config.n_layers)?;
        config.build()?;
        Ok(Self {
            model,
            compression: config.clone(),
            options: PrefillOptions::default(),
            max_kv: None,
            seq: None,
            empty: model.new_cache(),
            timings: Timings::default(),
        })
    }

    /// Prefills as `options` say (chunk, once or incremental, attention chunk).
    pub fn with_options(mut self, options: PrefillOptions) -> Self {
        self.options = options;
        self
    }

    /// Bounds the entries a head holds while decoding (`--max-kv`): after every step past
    /// the prompt, a head holds at most `max_kv` entries, kept by the method's own rule. A
    /// method that has none is refused when the prompt is prefilled (field `max_kv`).
    pub fn with_max_kv(mut self, max_kv: Option<usize>) -> Self {
        self.max_kv = max_kv;
        self
    }

    pub fn model(&self) -> &Llama {
        self.model
    }

    /// The compression report, once the prompt has been compressed.
    pub fn report(&self) -> Option<&CompressionReport> {
        self.seq.as_ref().and_then(Sequence::report)
    }

    /// The cache (empty before the prompt).
    pub fn cache(&self) -> &KvCache {
        self.seq.as_ref().map_or(&self.empty, |s| &s.cache)
    }

    /// The cache, to change in place (room reserved ahead, say); empty before the prompt.
    pub fn cache_mut(&mut self) -> &mut KvCache {
        self.seq.as_mut().map_or(&mut self.empty, |s| &mut s.cache)
    }

    /// The most the cache held at once during the prefill.
    pub fn peak(&self) -> CachePeak {
        self.seq.as_ref().map(Sequence::peak).unwrap_or_default()
    }

    /// Prefills the prompt in chunks with the statistics the method needs, compressing
    /// every head to the method's budget after it (and, incrementally, during it). Returns
    /// the last prompt token's logits `[vocab]`. Asked to compress incrementally, a method
    /// that cannot is an error that says why (field `prefill_compression`).
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.prefill_with_progress(tokens, |_| {})
    }

    /// [`Self::prefill`], calling `progress` with the number of prompt tokens prefilled
    /// after every chunk but the last (a long prompt runs for minutes).
    pub fn prefill_with_progress(
        &mut self,
        tokens: &[u32],
        mut progress: impl FnMut(usize),
    ) -> Result<Vec<f32>> {
        let mut seq = self.fresh_sequence(tokens)?;
        let start = Instant::now();
        let logits = loop {
            if let Some(logits) = seq.prefill_chunk(self.model, self.options.attention_chunk)? {
                break logits;
            }
            progress(seq.next_chunk().map_or(tokens.len(), |chunk| chunk.start));
        };
        self.timings.prefill += start.elapsed();
        self.timings.scoring += seq.scoring();
        self.timings.prefill_tokens += tokens.len();
        self.seq = Some(seq);
        Ok(logits)
    }

    /// Starts from a prompt prefilled once for several methods (see [`Prefilled`]) and
    /// compresses it. Returns the last prompt token's logits `[vocab]`.
    pub fn resume(&mut self, prefilled: Prefilled) -> Result<Vec<f32>> {
        let mut seq = self.fresh_sequence(&prefilled.tokens)?;
        let (elapsed, prompt_len) = (prefilled.elapsed, prefilled.prompt_len());
        // A reconstruction run for another method of the shared prefill is not this one's.
        let others = prefilled.scoring;
        let logits = seq.resume(prefilled)?;
        self.timings.prefill += elapsed.saturating_sub(others) + seq.scoring();
        self.timings.scoring += seq.scoring();
        self.timings.prefill_tokens += prompt_len;
        self.seq = Some(seq);
        Ok(logits)
    }

    /// The session's sequence for `tokens`, before anything ran.
    fn fresh_sequence(&self, tokens: &[u32]) -> Result<Sequence> {
        if self.seq.is_some() {
            return Err(EngineError::Setup("prefill must be the session's first call".into()));
        }
        Sequence::for_prompt(self.model, tokens, &self.compression, self.options, None, self.max_kv)
    }

    fn sequence(&mut self) -> Result<&mut Sequence> {
        self.seq.as_mut().ok_or_else(|| EngineError::Setup("no prompt was prefilled".into()))
    }

    /// A copy of the session at this point, to continue two ways (the eval scores a
    /// given continuation on one and generates on the other).
    pub fn fork(&self) -> Result<Session<'m>> {
        Ok(Self {
            model: self.model,
            compression: self.compression.clone(),
            options: self.options,
            max_kv: self.max_kv,
            seq: self.seq.as_ref().map(|s| s.fork(s.id)).transpose()?,
            empty: self.empty.clone(),
            timings: self.timings,
        })
    }

    /// Appends given tokens after the compressed prompt (a question, a continuation to
    /// score) as a prefill pass, then applies the method's decode-time policy. Returns
    /// logits as `logits` asks: `[rows][vocab]`, one row for [`Logits::Last`].
    pub fn extend(&mut self, tokens: &[u32], logits: Logits) -> Result<Vec<Vec<f32>>> {
        let (model, chunk) = (self.model, self.options.attention_chunk);
        self.sequence()?.extend(model, tokens, Phase::Prefill, logits, chunk)
    }

    /// Feeds one generated token as a decode step. Returns its logits `[vocab]`.
    pub fn step(&mut self, token: u32) -> Result<Vec<f32>> {
        let (model, chunk) = (self.model, self.options.attention_chunk);
        let mut rows =
            self.sequence()?.extend(model, &[token], Phase::Decode, Logits::Last, chunk)?;
        Ok(rows.swap_remove(0))
    }

    /// Generates up to `max_tokens` tokens after `logits` (the last logits returned by
    /// [`Self::prefill`], [`Self::extend`] or [`Self::step`]), stopping at any of `stop`.
    /// `on_token` sees each token as it is chosen and may stop generation by returning
    /// `false`.
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
            if self.cache().n_seen >= self.model.config.context_length {
                break;
            }
            logits = self.step(next)?;
            self.timings.decode_tokens += 1;
        }
        self.timings.decode += start.elapsed();
        Ok(out)
    }

    /// Generates for several sessions of one model side by side: `sessions[i]` from its
    /// last logits `logits[i]` with `samplers[i]`, up to `max_tokens` tokens, stopping at any
    /// of `stop`. Each step feeds every unfinished session's last token through one batched
    /// decode pass, which reads each weight block once for all of them, then applies each
    /// one's decode-time policy. Every session gets the tokens [`Self::generate`] gives it
    /// alone: a batched pass computes each row as a pass of that row alone does. Returns
    /// each session's tokens; a session's `timings.decode` grows by its share of the steps
    /// it took part in (a step's time split evenly over its sessions).
    pub fn generate_together(
        sessions: &mut [Session<'m>],
        logits: Vec<Vec<f32>>,
        max_tokens: usize,
        samplers: &mut [Sampler],
        stop: &[u32],
    ) -> Result<Vec<Vec<u32>>> {
        let Some((model, chunk)) = sessions.first().map(|s| (s.model, s.options.attention_chunk))
        else {
            return Ok(Vec::new());
        };
        if sessions.iter().any(|s| !std::ptr::eq(s.model, model)) {
            return Err(EngineError::Setup("sessions generated together share a model".into()));
        }
        if logits.len() != sessions.len() || samplers.len() != sessions.len() {
            return Err(EngineError::Setup("one logits row and sampler per session".into()));
        }
        let mut out = vec![Vec::new(); sessions.len()];
        let mut pending: Vec<Option<Vec<f32>>> = logits.into_iter().map(Some).collect();
        loop {
            let mut stepping = vec![false; sessions.len()];
            for (i, session) in sessions.iter().enumerate() {
                let Some(logits) = pending[i].take() else { continue };
                let next = samplers[i].sample(&logits);
                out[i].push(next);
                let full = session.cache().n_seen >= model.config.context_length;
                stepping[i] = !(stop.contains(&next) || out[i].len() >= max_tokens || full);
            }
            let live: Vec<usize> = (0..sessions.len()).filter(|&i| stepping[i]).collect();
            if live.is_empty() {
                return Ok(out);
            }
            let start = Instant::now();
            let tokens: Vec<u32> = live.iter().map(|&i| out[i][out[i].len() - 1]).collect();
            let mut seqs = sessions
                .iter_mut()
                .zip(&stepping)
                .filter(|(_, &stepping)| stepping)
                .map(|(s, _)| s.sequence())
                .collect::<Result<Vec<_>>>()?;
            let rows = decode_batch(model, &mut seqs, &tokens, chunk)?;
            for ((seq, row), &i) in seqs.iter_mut().zip(rows).zip(&live) {
                pending[i] = Some(row);
                seq.after_step()?;
            }
            drop(seqs);
            let share = start.elapsed() / live.len() as u32;
            for &i in &live {
                sessions[i].timings.decode += share;
                sessions[i].timings.decode_tokens += 1;
            }
        }
    }
}
