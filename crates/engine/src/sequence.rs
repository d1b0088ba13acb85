//! One request's generation: its tokens, method, budgets, sampler, stop set, cache and
//! state. No channels and no threads: the runtime drives sequences, the scheduler orders
//! them, the pool accounts for their caches.

use std::ops::Range;

use kvmerger_compress::{
    CompressionConfig, CompressionMethod, EntryMeta, HeadCache, KvCache, KvDtype,
};
use serde::Serialize;

use crate::compression::{after_decode_step, compress_prompt};
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::sampler::{Sampler, SamplingConfig};
use crate::session::CompressionReport;

/// A request's id inside the engine.
pub type SeqId = u64;

/// What a client asks the engine to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    /// At least 1; the prompt and these tokens must fit the model's context.
    pub max_tokens: usize,
    pub sampling: SamplingConfig,
    pub compression: CompressionConfig,
    /// Tokens that end generation (the model's end-of-sequence tokens).
    pub stop_tokens: Vec<u32>,
}

/// Why a sequence ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token was generated.
    Stop,
    /// `max_tokens` were generated, or the context is full.
    Length,
    /// The client went away or asked to stop.
    Cancelled,
    /// The request's compression cannot apply to its prompt (a parameter does not fit
    /// the prompt, e.g. SnapKV's window over a small budget); names the parameter.
    InvalidCompression { parameter: String, reason: String },
    /// The forward pass or the method failed for this sequence.
    Error(String),
}

/// Where a sequence is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeqState {
    /// Queued, holding no memory.
    Waiting,
    /// Admitted; `done` prompt tokens are in the cache.
    Prefilling {
        done: usize,
    },
    /// Prompt compressed; one token per step.
    Decoding,
    Finished(FinishReason),
}

/// What a finished sequence reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    /// Tokens generated, a final stop token included.
    pub completion_tokens: usize,
    /// The method with its budget, e.g. `kvmerger@35%`.
    pub method: String,
    /// Cache entries kept over entries of the full prompt cache (1 for the full cache).
    pub achieved_ratio: f64,
    /// Bytes the cache held right after compression (room for `max_tokens` not included).
    pub resident_kv_bytes: usize,
    /// Bytes the uncompressed prompt cache held.
    pub full_kv_bytes: usize,
}

/// Bytes one cached entry of one head takes: its key and value rows in `dtype` and its
/// metadata.
pub fn entry_bytes(head_dim: usize, dtype: KvDtype) -> usize {
    HeadCache::entry_kv_bytes(head_dim, dtype) + std::mem::size_of::<EntryMeta>()
}

/// A request being served.
pub struct Sequence {
    pub id: SeqId,
    pub request: GenerationRequest,
    method: Box<dyn CompressionMethod>,
    sampler: Sampler,
    pub cache: KvCache,
    pub state: SeqState,
    /// Tokens generated so far; the last one is fed at the next decode step.
    pub generated: Vec<u32>,
    report: Option<CompressionReport>,
    decode_steps: usize,
    /// Prompt tokens per prefill chunk.
    chunk: usize,
    n_layers: usize,
    n_kv_heads: usize,
    head_dim: usize,
    kv_dtype: KvDtype,
    context: usize,
}

impl std::fmt::Debug for Sequence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sequence")
            .field("id", &self.id)
            .field("state", &self.state)
            .field("prompt", &self.request.prompt.len())
            .field("generated", &self.generated.len())
            .finish()
    }
}

impl Sequence {
    /// Checks the request against the model and builds its method. Errors name the field.
    pub fn new(
        id: SeqId,
        request: GenerationRequest,
        config: &ModelConfig,
        prefill_chunk: usize,
    ) -> Result<Self> {
        let invalid = |field: &str, reason: String| EngineError::InvalidRequest {
            field: field.to_string(),
            reason,
        };
        let prompt_len = request.prompt.len();
        if prompt_len == 0 {
            return Err(invalid("prompt", "the prompt is empty".into()));
        }
        if let Some(&bad) = request.prompt.iter().find(|&&t| t as usize >= config.vocab_size) {
            return Err(invalid(
                "prompt",
                format!("token id {bad} is outside the vocabulary ({})", config.vocab_size),
            ));
        }
        let context = config.context_length;
        if prompt_len >= context {
            return Err(invalid(
                "prompt",
                format!("the prompt has {prompt_len} tokens; the model's context is {context}"),
            ));
        }
        if request.max_tokens == 0 {
            return Err(invalid("max_tokens", "must be at least 1".into()));
        }
        if prompt_len + request.max_tokens > context {
            return Err(invalid(
                "max_tokens",
                format!(
                    "{} tokens after a {prompt_len}-token prompt exceed the model's context of \
                     {context} (at most {} fit)",
                    request.max_tokens,
                    context - prompt_len
                ),
            ));
        }
        let s = request.sampling;
        if !(s.temperature >= 0.0 && s.temperature.is_finite()) {
            return Err(invalid(
                "temperature",
                format!("must be at least 0, got {}", s.temperature),
            ));
        }
        if !(s.top_p > 0.0 && s.top_p <= 1.0) {
            return Err(invalid("top_p", format!("must be in (0, 1], got {}", s.top_p)));
        }
        let method = request.compression.build()?;
        Ok(Self {
            id,
            sampler: Sampler::new(request.sampling),
            method,
            request,
            cache: KvCache::new(0, 0, config.head_dim, KvDtype::default()),
            state: SeqState::Waiting,
            generated: Vec::new(),
            report: None,
            decode_steps: 0,
            chunk: prefill_chunk.max(1),
            n_layers: config.n_layers,
            n_kv_heads: config.n_kv_heads,
            head_dim: config.head_dim,
            kv_dtype: KvDtype::default(),
            context,
        })
    }

    /// Stores the cache in `dtype` (f16 unless set), from admission on.
    pub fn with_kv_dtype(mut self, dtype: KvDtype) -> Self {
        self.kv_dtype = dtype;
        self
    }

    pub fn prompt_len(&self) -> usize {
        self.request.prompt.len()
    }

    /// Bytes the sequence can ever hold: the full prompt cache during prefill (with the
    /// prompt-window statistics if the method asks for them), then per head its budget
    /// plus room for `max_tokens`.
    pub fn reservation(&self) -> usize {
        let entry = entry_bytes(self.head_dim, self.kv_dtype);
        let prompt = self.prompt_len();
        let stats = self.method.prompt_stats(prompt);
        let rows = stats.windows.iter().count() + 2 * stats.evictions.iter().count();
        let window = rows * std::mem::size_of::<f32>();
        let prefill = prompt * (entry + window);
        (0..self.n_layers)
            .map(|l| {
                let after =
                    (self.method.layer_budget_entries(l, prompt) + self.request.max_tokens) * entry;
                prefill.max(after) * self.n_kv_heads
            })
            .sum()
    }

    /// Bytes of the uncompressed prompt cache.
    pub fn full_prompt_bytes(&self) -> usize {
        self.prompt_len()
            * entry_bytes(self.head_dim, self.kv_dtype)
            * self.n_layers
            * self.n_kv_heads
    }

    /// Admits the sequence: allocates an empty cache with room for exactly the prompt.
    pub fn start(&mut self) {
        let (d, n) = (self.head_dim, self.prompt_len());
        self.cache = KvCache::with_capacity(self.n_layers, self.n_kv_heads, d, self.kv_dtype, n);
        self.state = SeqState::Prefilling { done: 0 };
    }

    /// The prompt tokens of the next prefill chunk. Chunks are `chunk` tokens, except the
    /// last, which holds at least the method's observation window (so that SnapKV's window
    /// statistics see its whole window in one pass).
    pub fn next_chunk(&self) -> Option<Range<usize>> {
        let SeqState::Prefilling { done } = self.state else { return None };
        let n = self.prompt_len();
        let window = self.method.stats().windows.iter().max().unwrap_or(1).clamp(1, n);
        let last_start = (n - window) / self.chunk * self.chunk;
        Some(if done < last_start { done..done + self.chunk } else { done..n })
    }

    /// Statistics the forward pass of `chunk` must accumulate.
    pub fn chunk_stats(&self, chunk: &Range<usize>) -> kvmerger_compress::StatsRequest {
        let stats = self.method.prompt_stats(self.prompt_len());
        if chunk.end == self.prompt_len() {
            stats
        } else {
            stats.without_window()
        }
    }

    /// Records that `chunk` was prefilled. After the last chunk, compresses the cache,
    /// sizes its buffers for exactly `max_tokens` more entries per head, and samples the
    /// first token from `logits`. Returns that token once the prefill is complete.
    pub fn chunk_done(
        &mut self,
        chunk: Range<usize>,
        logits: Option<&[f32]>,
    ) -> Result<Option<(u32, Option<FinishReason>)>> {
        if chunk.end < self.prompt_len() {
            self.state = SeqState::Prefilling { done: chunk.end };
            return Ok(None);
        }
        let logits = logits.ok_or_else(|| {
            EngineError::Setup("the last prefill chunk returned no logits".into())
        })?;
        let prompt_len = self.prompt_len();
        let report = compress_prompt(&*self.method, &mut self.cache, prompt_len)?;
        self.report = Some(report);
        let room = self.request.max_tokens;
        self.cache.layers.iter_mut().flatten().for_each(|h| h.reserve_exact(room));
        self.state = SeqState::Decoding;
        Ok(Some(self.accept(logits)))
    }

    /// Statistics a decode step accumulates (attention received, for H2O-like methods).
    pub fn decode_stats(&self) -> kvmerger_compress::StatsRequest {
        self.method.stats().after_prompt()
    }

    /// After a decode step: applies the method's decode-time policy and samples the next
    /// token from `logits`.
    pub fn decoded(&mut self, logits: &[f32]) -> Result<(u32, Option<FinishReason>)> {
        self.decode_steps += 1;
        after_decode_step(&*self.method, &mut self.cache, self.decode_steps)?;
        Ok(self.accept(logits))
    }

    /// Samples a token; says whether generation ends with it.
    fn accept(&mut self, logits: &[f32]) -> (u32, Option<FinishReason>) {
        let token = self.sampler.sample(logits);
        self.generated.push(token);
        let finish = if self.request.stop_tokens.contains(&token) {
            Some(FinishReason::Stop)
        } else if self.generated.len() >= self.request.max_tokens
            || self.cache.n_seen + 1 >= self.context
        {
            Some(FinishReason::Length)
        } else {
            None
        };
        if let Some(reason) = &finish {
            self.state = SeqState::Finished(reason.clone());
        }
        (token, finish)
    }

    /// Ends the sequence and drops its cache.
    pub fn finish(&mut self, reason: FinishReason) {
        self.state = SeqState::Finished(reason);
        self.cache = KvCache::new(0, 0, self.head_dim, self.kv_dtype);
    }

    pub fn report(&self) -> Option<&CompressionReport> {
        self.report.as_ref()
    }

    pub fn usage(&self) -> Usage {
        let (achieved_ratio, resident_kv_bytes) =
            self.report.as_ref().map_or((1.0, 0), |r| (r.achieved_ratio(), r.resident_bytes));
        Usage {
            prompt_tokens: self.prompt_len(),
            completion_tokens: self.generated.len(),
            method: self.request.compression.label(),
            achieved_ratio,
            resident_kv_bytes,
            full_kv_bytes: self.full_prompt_bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::tiny_config;
    use kvmerger_compress::Budget;

    fn request(prompt: usize, max_tokens: usize, method: &str, budget: f64) -> GenerationRequest {
        let budget = (method != "full").then_some(Budget::Ratio(budget));
        GenerationRequest {
            prompt: (0..prompt as u32).map(|t| t % 60).collect(),
            max_tokens,
            sampling: SamplingConfig::default(),
            compression: CompressionConfig::from_cli(method, budget, &[]).unwrap(),
            stop_tokens: vec![],
        }
    }

    #[test]
    fn chunks_cover_the_prompt_and_the_last_holds_the_window() {
        let config = tiny_config();
        let mut seq = Sequence::new(1, request(100, 4, "snapkv", 0.5), &config, 16).unwrap();
        seq.start();
        let window = kvmerger_compress::methods::SnapKvConfig::default().window;
        let mut chunks = Vec::new();
        while let Some(c) = seq.next_chunk() {
            chunks.push(c.clone());
            seq.state = if c.end == 100 {
                SeqState::Decoding
            } else {
                SeqState::Prefilling { done: c.end }
            };
        }
        assert_eq!(chunks.first().unwrap().start, 0);
        assert!(chunks.windows(2).all(|w| w[0].end == w[1].start));
        let last = chunks.last().unwrap();
        assert_eq!(last.end, 100);
        assert!(last.len() >= window.min(100), "{chunks:?}");
        assert!(chunks[..chunks.len() - 1].iter().all(|c| c.len() == 16));
    }

    #[test]
    fn reservation_is_the_larger_of_prompt_and_budget_plus_room() {
        let config = tiny_config();
        let entry = entry_bytes(config.head_dim, KvDtype::default());
        let heads = config.n_layers * config.n_kv_heads;
        let full = Sequence::new(1, request(100, 10, "full", 1.0), &config, 16).unwrap();
        assert_eq!(full.reservation(), (100 + 10) * entry * heads);
        let h2o = Sequence::new(2, request(100, 10, "h2o", 0.35), &config, 16).unwrap();
        assert_eq!(h2o.reservation(), 100 * entry * heads, "prefill needs the whole prompt");
        let long = Sequence::new(3, request(100, 90, "h2o", 0.35), &config, 16).unwrap();
        assert_eq!(long.reservation(), (35 + 90) * entry * heads);
    }

    #[test]
    fn bad_requests_name_the_field() {
        let config = tiny_config();
        let field = |r: GenerationRequest| match Sequence::new(1, r, &config, 16) {
            Err(EngineError::InvalidRequest { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(request(0, 4, "full", 1.0)), "prompt");
        assert_eq!(field(request(300, 4, "full", 1.0)), "prompt");
        assert_eq!(field(request(10, 0, "full", 1.0)), "max_tokens");
        assert_eq!(field(request(200, 57, "full", 1.0)), "max_tokens");
        let mut r = request(10, 4, "full", 1.0);
        r.sampling.top_p = 0.0;
        assert_eq!(field(r), "top_p");
    }
}
