//! One generation: its tokens, method, budgets, sampler, stop set, cache and state; the
//! only generation core. No channels and no threads: the serving runtime drives many
//! sequences in batched passes (the scheduler orders them, the pool accounts for their
//! caches), and [`crate::Session`] drives one. Either way a prompt goes through
//! [`Sequence::prefill_chunk`] (one forward pass per planned chunk, compressing where the
//! plan says) and the tokens after it take the decode-time policy in
//! [`Sequence::after_step`]: the weight format of every pass is its [`Phase`]'s.

use std::ops::Range;
use std::time::{Duration, Instant};

use kvmerger_compress::{
    CompressionConfig, CompressionMethod, EntryMeta, HeadCache, KvCache, KvDtype, QueryMoments,
    StatsRequest,
};
use serde::Serialize;

use crate::compression::CompressionReport;
use crate::compression::{after_decode_step, compress_prompt};
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::forward::{BatchItem, Logits, Phase};
use crate::model::Llama;
use crate::prefill::{PrefillCompression, PrefillOptions, PrefillPlan};
use crate::profile::{timed, Part};
use crate::reconstruction_pass::score_by_reconstruction;
use crate::request::{check_decode_bound, check_incremental_prefill};
use crate::request::{GenerationRequest, RequestError, RequestField, RequestLimits};
use crate::sampler::{Sampler, SamplingConfig};

/// A request's id inside the engine.
pub type SeqId = u64;

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
    /// Queued, or admitted with its prefill not started: no cache allocated yet.
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

/// The memory a sequence can need, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reservation {
    /// What its cache holds once the prompt is compressed: per head the entries kept plus
    /// room for `max_tokens`. Held from admission to the end.
    pub settled: usize,
    /// What its prefill holds on top of `settled` at its peak (the entries of one chunk
    /// past the budget, or the whole prompt when compressed once, plus the prompt-window
    /// statistics); needed only while it prefills.
    pub headroom: usize,
}

impl Reservation {
    /// The most the sequence ever holds.
    pub fn peak(&self) -> usize {
        self.settled + self.headroom
    }
}

/// The most a sequence's cache held at once during its prefill, measured after every
/// prefill chunk's forward pass, before the compression that may follow it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CachePeak {
    /// Entries of the fullest head.
    pub head_entries: usize,
    /// Bytes resident in the whole cache (allocated capacity).
    pub resident_bytes: usize,
}

impl CachePeak {
    fn observe(&mut self, cache: &KvCache) {
        let fullest = cache.layers.iter().flatten().map(HeadCache::len).max().unwrap_or(0);
        self.head_entries = self.head_entries.max(fullest);
        self.resident_bytes = self.resident_bytes.max(cache.resident_bytes());
    }
}

/// A prompt prefilled once with full attention, ready for several methods to compress
/// (see [`Sequence::resume`]): prefill is the expensive part of an evaluation, so every
/// method of a comparison starts from a copy of the same prefill, which records the union
/// of their statistics. Its chunks are those the methods' own prefills would run, and it
/// stops where theirs would compress, so a resumed sequence continues bit for bit as a
/// fresh one would (compressing once).
#[derive(Debug, Clone)]
pub struct Prefilled {
    pub tokens: Vec<u32>,
    pub cache: KvCache,
    /// `[vocab]` logits after the last prompt token.
    pub logits: Vec<f32>,
    pub stats: StatsRequest,
    pub elapsed: Duration,
    /// The part of `elapsed` spent on KVzip's reconstruction pass (zero without it).
    pub scoring: Duration,
    pub peak: CachePeak,
}

impl Prefilled {
    /// Prefills `tokens` in chunks of `options.chunk`, recording `stats`. A shared prefill
    /// compresses nothing: `options.compression` must be [`PrefillCompression::Once`].
    pub fn run(
        model: &Llama,
        tokens: &[u32],
        stats: StatsRequest,
        options: PrefillOptions,
    ) -> Result<Self> {
        if options.compression != PrefillCompression::Once {
            return Err(RequestError::invalid(
                RequestField::PrefillCompression,
                "a prefill shared by several methods is compressed once; an incremental \
                 prefill belongs to one method",
            )
            .into());
        }
        let start = Instant::now();
        let mut seq = Sequence::for_prompt(
            model,
            tokens,
            &CompressionConfig::Full,
            options,
            Some(stats),
            None,
        )?;
        let logits = loop {
            let (chunk, logits) = seq.forward_chunk(model, options.attention_chunk)?;
            if chunk.end == tokens.len() {
                break logits.ok_or_else(|| {
                    EngineError::Setup("the last prefill chunk returned no logits".into())
                })?;
            }
            seq.chunk_done(chunk, None)?;
        };
        Ok(Self {
            tokens: tokens.to_vec(),
            cache: seq.cache,
            logits,
            stats,
            elapsed: start.elapsed(),
            scoring: seq.scoring,
            peak: seq.peak,
        })
    }

    pub fn prompt_len(&self) -> usize {
        self.tokens.len()
    }
}

/// A generation: a request being served, or a [`crate::Session`]'s one sequence.
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
    plan: PrefillPlan,
    /// What the prompt's forward passes record: the method's own statistics, or for a
    /// prefill shared by several methods the union of theirs.
    prompt_stats: StatsRequest,
    /// Entries per head reserved after the prompt for the tokens that follow.
    decode_room: usize,
    peak: CachePeak,
    /// Time spent on KVzip's reconstruction pass after the prompt.
    scoring: Duration,
    n_layers: usize,
    n_kv_heads: usize,
    /// Query heads per kv head.
    group: usize,
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
    /// Builds the request's method and plans its prefill in chunks of `prefill_chunk`
    /// tokens, compressed as `mode` says unless the request says otherwise. The request
    /// was checked (see [`GenerationRequest::new`]); what depends on the built method and
    /// the engine's chunk is refused here naming the field: a method that cannot compress
    /// during prefill when asked to (`prefill_compression`), or cannot keep `max_kv`.
    pub fn new(
        id: SeqId,
        request: GenerationRequest,
        config: &ModelConfig,
        prefill_chunk: usize,
        mode: PrefillCompression,
    ) -> Result<Self> {
        Self::build(id, request, config, prefill_chunk, mode, None)
    }

    /// A sequence of `tokens` under `compression` for a caller that feeds the tokens after
    /// the prompt itself (a session, a shared prefill): generation may run to the end of
    /// the context, no room is reserved after the prompt, the cache is in the model's
    /// dtype, and the prompt's passes record `stats` where given, else the method's own.
    pub(crate) fn for_prompt(
        model: &Llama,
        tokens: &[u32],
        compression: &CompressionConfig,
        options: PrefillOptions,
        stats: Option<StatsRequest>,
        max_kv: Option<usize>,
    ) -> Result<Self> {
        // A session's bound reaches here from its caller: the request layer's rule.
        check_decode_bound(max_kv, &*compression.build()?)?;
        let context = model.config.context_length;
        let request = GenerationRequest {
            prompt: tokens.to_vec(),
            max_tokens: context.saturating_sub(tokens.len()).max(1),
            sampling: SamplingConfig::default(),
            compression: compression.clone(),
            stop_tokens: Vec::new(),
            max_kv,
            prefill_compression: None,
            kv_dtype: None,
            limits: RequestLimits::of(&model.config, None),
        };
        let seq =
            Self::build(0, request, &model.config, options.chunk, options.compression, stats)?;
        Ok(seq.with_kv_dtype(model.kv_dtype).without_decode_room())
    }

    fn build(
        id: SeqId,
        request: GenerationRequest,
        config: &ModelConfig,
        prefill_chunk: usize,
        mode: PrefillCompression,
        stats: Option<StatsRequest>,
    ) -> Result<Self> {
        if !request.limits.fit(config) {
            return Err(EngineError::Setup(format!(
                "a request checked against {:?} cannot run on this model",
                request.limits
            )));
        }
        // A session's prompt reaches here unchecked by a front end: these are the forward
        // pass's own bounds, not a request's rules.
        let prompt_len = request.prompt.len();
        if prompt_len == 0 {
            return Err(EngineError::EmptyPrompt);
        }
        let context = request.limits.context_length;
        if prompt_len + request.max_tokens > context {
            return Err(EngineError::ContextOverflow {
                needed: prompt_len + request.max_tokens,
                context,
            });
        }
        let method = request.compression.build()?;
        let prompt_stats = stats.unwrap_or_else(|| method.prompt_stats(prompt_len));
        // Asked to compress during prefill, a method that cannot is refused, in every
        // command alike: compressing it once instead would hold the whole prompt, against
        // the memory bound the mode was chosen for.
        let mode = request.prefill_compression.unwrap_or(mode);
        let incremental = mode == PrefillCompression::Incremental;
        if incremental {
            check_incremental_prefill(&*method, &prompt_stats, prefill_chunk)?;
        }
        let plan =
            plan_prefill(&*method, &prompt_stats, prompt_len, prefill_chunk, incremental, config);
        Ok(Self {
            id,
            sampler: Sampler::new(request.sampling),
            method,
            decode_room: request.max_tokens,
            request,
            cache: KvCache::new(0, 0, config.head_dim, KvDtype::default()),
            state: SeqState::Waiting,
            generated: Vec::new(),
            report: None,
            decode_steps: 0,
            plan,
            prompt_stats,
            peak: CachePeak::default(),
            scoring: Duration::ZERO,
            n_layers: config.n_layers,
            n_kv_heads: config.n_kv_heads,
            group: config.n_heads / config.n_kv_heads,
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

    /// Reserves no room after the prompt: the cache grows as tokens come (a session, whose
    /// `max_tokens` is only the context's bound).
    pub(crate) fn without_decode_room(mut self) -> Self {
        self.decode_room = 0;
        self
    }

    /// The most the cache held during the prefill.
    pub fn peak(&self) -> CachePeak {
        self.peak
    }

    /// Time spent on KVzip's reconstruction pass after the prompt (zero without it).
    pub fn scoring(&self) -> Duration {
        self.scoring
    }

    pub fn prompt_len(&self) -> usize {
        self.request.prompt.len()
    }

    /// The memory the sequence can need (see [`Reservation`]): per head, at most
    /// [`PrefillPlan::peak_entries`] during prefill with a row per prompt statistic (and
    /// the query statistics' fixed size), then
    /// [`PrefillPlan::kept_entries`] plus room for `max_tokens`.
    pub fn reservation(&self) -> Reservation {
        let entry = entry_bytes(self.head_dim, self.kv_dtype);
        let stats = self.prompt_stats;
        let rows = stats.windows.iter().count()
            + 2 * stats.evictions.iter().count()
            + usize::from(stats.reconstruction.is_some());
        let per_entry = entry + rows * std::mem::size_of::<f32>();
        let moments: usize = stats
            .queries
            .iter()
            .map(|q| QueryMoments::bytes(self.group, self.head_dim, q.covariance))
            .sum();
        // A centered cache's key center, whatever the head holds.
        let fixed = HeadCache::fixed_bytes(self.head_dim, self.kv_dtype);
        let (mut settled, mut peak) = (0, 0);
        for (&during, &kept) in self.plan.peak_entries.iter().zip(&self.plan.kept_entries) {
            let after = fixed
                + (kept + decode_entries(self.request.max_kv, kept, self.request.max_tokens))
                    * entry;
            settled += after * self.n_kv_heads;
            peak += (fixed + during * per_entry + moments).max(after) * self.n_kv_heads;
        }
        Reservation { settled, headroom: peak - settled }
    }

    /// The sequence's prefill plan.
    pub fn plan(&self) -> &PrefillPlan {
        &self.plan
    }

    /// Bytes of the uncompressed prompt cache.
    pub fn full_prompt_bytes(&self) -> usize {
        self.prompt_len()
            * entry_bytes(self.head_dim, self.kv_dtype)
            * self.n_layers
            * self.n_kv_heads
    }

    /// Starts the prefill: allocates an empty cache with room for exactly the entries a
    /// head holds at most during prefill.
    pub fn start(&mut self) {
        let (d, dtype) = (self.head_dim, self.kv_dtype);
        self.cache = KvCache::new(0, 0, d, dtype);
        self.cache.layers = self
            .plan
            .peak_entries
            .iter()
            .map(|&n| (0..self.n_kv_heads).map(|_| HeadCache::with_capacity(d, dtype, n)).collect())
            .collect();
        self.state = SeqState::Prefilling { done: 0 };
    }

    /// The prompt tokens of the next prefill chunk (see [`PrefillPlan::chunks`]).
    pub fn next_chunk(&self) -> Option<Range<usize>> {
        let SeqState::Prefilling { done } = self.state else { return None };
        self.plan.chunk_at(done).map(|k| self.plan.chunks[k].clone())
    }

    /// Statistics the forward pass of `chunk` must accumulate: the prompt-window
    /// statistics only on a chunk a compression follows (they describe the last queries
    /// before it).
    pub fn chunk_stats(&self, chunk: &Range<usize>) -> StatsRequest {
        let stats = self.prompt_stats;
        let compressed_after = chunk.end == self.prompt_len()
            || self.plan.chunk_at(chunk.start).is_some_and(|k| self.plan.compress_after[k]);
        if compressed_after {
            stats
        } else {
            stats.without_window()
        }
    }

    /// Runs the next prefill chunk through `model` (starting the prefill if it has not
    /// started) and records it with [`Self::chunk_done`]. Returns the last prompt token's
    /// logits `[vocab]` once the prompt is prefilled and compressed.
    pub fn prefill_chunk(
        &mut self,
        model: &Llama,
        attention_chunk: usize,
    ) -> Result<Option<Vec<f32>>> {
        let (chunk, logits) = self.forward_chunk(model, attention_chunk)?;
        self.chunk_done(chunk, logits.as_deref())
    }

    /// The forward pass of the next prefill chunk, without what follows it. Returns the
    /// chunk, and the last prompt token's logits if it was the last.
    fn forward_chunk(
        &mut self,
        model: &Llama,
        attention_chunk: usize,
    ) -> Result<(Range<usize>, Option<Vec<f32>>)> {
        if self.state == SeqState::Waiting {
            self.start();
        }
        let chunk = self
            .next_chunk()
            .ok_or_else(|| EngineError::Setup("the sequence has no prefill chunk left".into()))?;
        let last = chunk.end == self.prompt_len();
        let stats = self.chunk_stats(&chunk);
        let mut item = [BatchItem {
            tokens: &self.request.prompt[chunk.clone()],
            cache: &mut self.cache,
            logits: last.then_some(Logits::Last),
            stats,
        }];
        let logits = model.forward_batch(&mut item, Phase::Prefill, attention_chunk)?;
        self.peak.observe(&self.cache);
        let logits = match logits.into_iter().next().flatten() {
            Some(t) => Some(t.flatten_all()?.to_vec1::<f32>()?),
            None => None,
        };
        if let Some(how) = stats.reconstruction.filter(|_| last) {
            let start = Instant::now();
            let piece = self.plan.chunks.iter().map(|c| c.len()).max().unwrap_or(1);
            let prompt = model.reconstruction.as_ref();
            let tokens = &self.request.prompt;
            score_by_reconstruction(
                model,
                prompt,
                tokens,
                &mut self.cache,
                how,
                piece,
                attention_chunk,
            )?;
            self.scoring += start.elapsed();
        }
        Ok((chunk, logits))
    }

    /// Records that `chunk` was prefilled. After a chunk the plan compresses after, brings
    /// every head to its final budget and restores room for the next chunk. After the last
    /// chunk, compresses the cache as [`Self::finish_prefill`] does and returns the last
    /// prompt token's `logits`.
    pub fn chunk_done(
        &mut self,
        chunk: Range<usize>,
        logits: Option<&[f32]>,
    ) -> Result<Option<Vec<f32>>> {
        let prompt_len = self.prompt_len();
        if chunk.end < prompt_len {
            let k = self.plan.chunk_at(chunk.start);
            if k.is_some_and(|k| self.plan.compress_after[k]) {
                compress_prompt(&*self.method, &mut self.cache, prompt_len)?;
                // Decode-time budgets apply once the prompt is done.
                self.cache.budgets = None;
                for (heads, &peak) in self.cache.layers.iter_mut().zip(&self.plan.peak_entries) {
                    heads.iter_mut().for_each(|h| h.reserve_exact(peak.saturating_sub(h.len())));
                }
            }
            self.state = SeqState::Prefilling { done: chunk.end };
            return Ok(None);
        }
        let logits = logits.ok_or_else(|| {
            EngineError::Setup("the last prefill chunk returned no logits".into())
        })?;
        crate::attention::release_prefill_scratch();
        self.finish_prefill()?;
        Ok(Some(logits.to_vec()))
    }

    /// After the whole prompt is in the cache: compresses it to the final budgets, sizes
    /// every head's buffers for the room reserved after the prompt, and starts decoding.
    /// The one place a prompt is compressed, whether its prefill ran here or was shared.
    fn finish_prefill(&mut self) -> Result<()> {
        let prompt_len = self.prompt_len();
        let mut report = compress_prompt(&*self.method, &mut self.cache, prompt_len)?;
        // Earlier compressions saw parts of the prompt: the ratio is over the whole prompt.
        report.heads.iter_mut().flatten().for_each(|h| h.before = prompt_len);
        self.report = Some(report);
        // Under a bound, a session (no room reserved) still sizes its heads for it once.
        let room = match self.request.max_kv {
            Some(_) => self.request.max_tokens,
            None => self.decode_room,
        };
        if room > 0 {
            let max_kv = self.request.max_kv;
            for head in self.cache.layers.iter_mut().flatten() {
                head.reserve_exact(decode_entries(max_kv, head.len(), room));
            }
        }
        self.state = SeqState::Decoding;
        Ok(())
    }

    /// Continues from a prompt prefilled once for several methods: takes a copy of its
    /// cache and compresses it with this sequence's method, as if this sequence had
    /// prefilled it. Errors unless `prefilled` is this prompt's and recorded every
    /// statistic the method reads. Returns the last prompt token's logits.
    pub fn resume(&mut self, prefilled: Prefilled) -> Result<Vec<f32>> {
        if self.state != SeqState::Waiting {
            return Err(EngineError::Setup("resume must be the sequence's first step".into()));
        }
        if prefilled.tokens != self.request.prompt {
            return Err(EngineError::Setup("the prefilled prompt is another prompt".into()));
        }
        // Each method reads exactly the statistics it asked for: a wider observation window
        // recorded for another method does not stand in for its own.
        if !prefilled.stats.covers(&self.prompt_stats) {
            return Err(EngineError::Setup(format!(
                "the prefilled cache lacks statistics {} needs",
                self.method.name()
            )));
        }
        self.cache = prefilled.cache;
        self.peak = prefilled.peak;
        if self.prompt_stats.reconstruction.is_some() {
            self.scoring = prefilled.scoring;
        }
        self.finish_prefill()?;
        Ok(prefilled.logits)
    }

    /// Feeds `tokens` after the prompt (a question or a scored continuation as
    /// [`Phase::Prefill`], a generated token as [`Phase::Decode`]) and applies the method's
    /// decode-time policy. Returns logits as `logits` asks: `[rows][vocab]`.
    pub fn extend(
        &mut self,
        model: &Llama,
        tokens: &[u32],
        phase: Phase,
        logits: Logits,
        attention_chunk: usize,
    ) -> Result<Vec<Vec<f32>>> {
        if self.state != SeqState::Decoding {
            return Err(EngineError::Setup("tokens follow a prefilled prompt".into()));
        }
        let mut item = [BatchItem {
            tokens,
            cache: &mut self.cache,
            logits: Some(logits),
            stats: self.method.decode_stats(),
        }];
        let out = model.forward_batch(&mut item, phase, attention_chunk)?;
        let rows = out
            .into_iter()
            .next()
            .flatten()
            .ok_or_else(|| EngineError::Setup("a forward pass returned no logits".into()))?
            .to_vec2()?;
        timed(model.profile.as_deref(), Part::Policy, || self.after_step())?;
        Ok(rows)
    }

    /// A copy of this sequence with its method built anew, to continue two ways from the
    /// same point (its sampler starts afresh).
    pub fn fork(&self, id: SeqId) -> Result<Self> {
        Ok(Self {
            id,
            request: self.request.clone(),
            method: self.request.compression.build()?,
            sampler: Sampler::new(self.request.sampling),
            cache: self.cache.clone(),
            state: self.state.clone(),
            generated: self.generated.clone(),
            report: self.report.clone(),
            decode_steps: self.decode_steps,
            plan: self.plan.clone(),
            prompt_stats: self.prompt_stats,
            decode_room: self.decode_room,
            peak: self.peak,
            scoring: self.scoring,
            n_layers: self.n_layers,
            n_kv_heads: self.n_kv_heads,
            group: self.group,
            head_dim: self.head_dim,
            kv_dtype: self.kv_dtype,
            context: self.context,
        })
    }

    /// Statistics a decode step accumulates (attention received, for H2O-like methods).
    pub fn decode_stats(&self) -> StatsRequest {
        self.method.decode_stats()
    }

    /// After a decode step: applies the method's decode-time policy and samples the next
    /// token from `logits`.
    pub fn decoded(&mut self, logits: &[f32]) -> Result<(u32, Option<FinishReason>)> {
        self.after_step()?;
        Ok(self.accept(logits))
    }

    /// The method's decode-time policy after a forward pass past the prompt.
    pub(crate) fn after_step(&mut self) -> Result<()> {
        self.decode_steps += 1;
        after_decode_step(&*self.method, &mut self.cache, self.decode_steps, self.request.max_kv)
    }

    /// Samples a token with the sequence's own sampler; says whether generation ends
    /// with it.
    pub fn accept(&mut self, logits: &[f32]) -> (u32, Option<FinishReason>) {
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

/// One decode step of several sequences at once, `tokens[i]` fed to `seqs[i]`: the
/// weights are read once for the whole batch. Returns each sequence's next-token logits;
/// the decode-time policy (`after_step`) and sampling are the caller's.
pub(crate) fn decode_batch(
    model: &Llama,
    seqs: &mut [&mut Sequence],
    tokens: &[u32],
    attention_chunk: usize,
) -> Result<Vec<Vec<f32>>> {
    let mut items: Vec<BatchItem<'_>> = seqs
        .iter_mut()
        .zip(tokens)
        .map(|(seq, token)| BatchItem {
            tokens: std::slice::from_ref(token),
            stats: seq.decode_stats(),
            cache: &mut seq.cache,
            logits: Some(Logits::Last),
        })
        .collect();
    model
        .forward_batch(&mut items, Phase::Decode, attention_chunk)?
        .into_iter()
        .map(|row| match row {
            Some(row) => Ok(row.flatten_all()?.to_vec1::<f32>()?),
            None => Err(EngineError::Setup("a decode step returned no logits".into())),
        })
        .collect()
}

/// Room a head that keeps `kept` entries after the prompt needs for the tokens that follow:
/// `room`, or under a bound `max_kv = N` no more than up to `max(kept, N)` plus the entry of
/// the step that the bound then brings back.
fn decode_entries(max_kv: Option<usize>, kept: usize, room: usize) -> usize {
    match max_kv {
        Some(n) => room.min(n.max(kept) + 1 - kept),
        None => room,
    }
}

/// Plans a prefill in chunks of `chunk` tokens whose last holds the largest observation
/// window `stats` record; with `incremental` (the method can, and the request asks), the
/// cache is compressed whenever the next chunk would not fit beside the budget. A head
/// settles to the method's budget, or keeps the prompt where the result is not bounded
/// by the budget.
fn plan_prefill(
    method: &dyn CompressionMethod,
    stats: &StatsRequest,
    prompt_len: usize,
    chunk: usize,
    incremental: bool,
    config: &ModelConfig,
) -> PrefillPlan {
    let window = stats.windows.iter().max().unwrap_or(1);
    let bounded = method.bounded_by_budget();
    let budgets: Vec<usize> = (0..config.n_layers)
        .map(|l| {
            if bounded {
                method.layer_budget_entries(l, config.n_layers, prompt_len)
            } else {
                prompt_len
            }
        })
        .collect();
    PrefillPlan::new(prompt_len, chunk, window, &budgets, incremental)
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
            max_kv: None,
            prefill_compression: None,
            kv_dtype: None,
            limits: RequestLimits::of(&tiny_config(), None),
        }
    }

    fn seq(r: GenerationRequest, chunk: usize, mode: PrefillCompression) -> Sequence {
        Sequence::new(1, r, &tiny_config(), chunk, mode).unwrap()
    }

    /// The field an incremental prefill of `r` in chunks of `chunk` is refused for.
    fn refused(r: GenerationRequest, chunk: usize) -> String {
        match Sequence::new(1, r, &tiny_config(), chunk, PrefillCompression::Incremental) {
            Err(EngineError::Request(RequestError::Invalid { field, .. })) => field.name().into(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reservations_are_exact_bytes_of_the_planned_entries() {
        use PrefillCompression::{Incremental, Once};
        // Tiny model: 2 layers x 2 kv heads, head_dim 8: an entry is a key and a value of
        // 8 numbers in the cache's dtype, plus its metadata.
        let dtype = KvDtype::default();
        let entry = entry_bytes(8, dtype);
        assert_eq!(entry, 2 * dtype.row_bytes(8) + std::mem::size_of::<EntryMeta>());
        let heads = 4;
        let r = |settled: usize, headroom: usize| Reservation { settled, headroom };
        // The full cache holds its prompt plus room for max_tokens from the start.
        let full = seq(request(100, 10, "full", 1.0), 16, Incremental);
        assert_eq!(full.reservation(), r(110 * entry * heads, 0));
        // H2O at 35% of 100 tokens: budget 35. Chunks of 16 (the last 4): compressed to 35
        // whenever 16 more would pass 35 + 16, so a head peaks at 51 entries.
        let h2o = seq(request(100, 10, "h2o", 0.35), 16, Incremental);
        assert_eq!(h2o.plan().peak_entries, [51, 51]);
        assert_eq!(h2o.reservation(), r(45 * entry * heads, (51 - 45) * entry * heads));
        // Compressed once, it holds the whole prompt during prefill.
        let once = seq(request(100, 10, "h2o", 0.35), 16, Once);
        assert_eq!(once.reservation(), r(45 * entry * heads, (100 - 45) * entry * heads));
        // Room for max_tokens beyond the prefill peak: nothing more is needed to prefill.
        let long = seq(request(100, 90, "h2o", 0.35), 16, Incremental);
        assert_eq!(long.reservation(), r(125 * entry * heads, 0));
        // SnapKV's 32-query window needs chunks of at least 64 to compress during prefill
        // (asked to in chunks of 16, it is refused); its window statistics take one f32 row
        // per entry.
        let with_row = entry + 4;
        assert_eq!(refused(request(100, 10, "snapkv", 0.5), 16), "prefill_compression");
        let snap16 = seq(request(100, 10, "snapkv", 0.5), 16, Once);
        assert_eq!(
            snap16.reservation(),
            r(60 * entry * heads, (100 * with_row - 60 * entry) * heads)
        );
        // 200 tokens in chunks 64, 64, 40, 32 (the last holds the window); budget 100:
        // compressed after 128 and after 140 tokens; a head peaks at 140 entries.
        let snap64 = seq(request(200, 10, "snapkv", 0.5), 64, Incremental);
        let plan = snap64.plan();
        assert_eq!(plan.chunks.iter().map(|c| c.len()).collect::<Vec<_>>(), [64, 64, 40, 32]);
        assert_eq!(plan.compress_after, [false, true, true, false]);
        assert_eq!(plan.peak_entries, [140, 140]);
        assert_eq!(
            snap64.reservation(),
            r(110 * entry * heads, (140 * with_row - 110 * entry) * heads)
        );
        // CaM's statistics at eviction time span the whole prompt, and AdaKV's heads share
        // their layer's budget: asked to compress during prefill, both are refused.
        assert_eq!(refused(request(100, 10, "cam", 0.5), 16), "prefill_compression");
        assert_eq!(refused(request(100, 10, "adakv", 0.5), 64), "prefill_compression");
        let mut cam = request(100, 10, "cam", 0.5);
        cam.prefill_compression = Some(Once);
        let cam = seq(cam, 16, Incremental);
        assert!(!cam.plan().is_incremental());
        assert_eq!(cam.plan().peak_entries, [100, 100]);
        // Expected Attention's query statistics (2 query heads per kv head of 8 numbers,
        // with covariance) add their fixed size to each head's prefill peak.
        let plain = seq(request(200, 10, "knorm", 0.5), 64, Incremental);
        let ea = seq(request(200, 10, "expected_attention", 0.5), 64, Incremental);
        assert!(ea.plan().is_incremental());
        assert_eq!(ea.plan().peak_entries, plain.plan().peak_entries);
        let (settled, headroom) = (plain.reservation().settled, plain.reservation().headroom);
        let moments = QueryMoments::bytes(2, 8, true);
        assert_eq!(ea.reservation(), r(settled, headroom + moments * heads));
    }

    #[test]
    fn windows_are_recorded_only_before_a_compression() {
        let s = seq(request(200, 10, "snapkv", 0.5), 64, PrefillCompression::Incremental);
        let windows: Vec<bool> =
            s.plan().chunks.iter().map(|c| !s.chunk_stats(c).windows.is_empty()).collect();
        assert_eq!(windows, [false, true, true, true]);
    }

    #[test]
    fn a_bound_while_decoding_caps_the_room_reserved_after_the_prompt() {
        let entry = entry_bytes(8, KvDtype::default());
        // H2O at 35% of 100 tokens keeps 35; 150 tokens may follow, but with a bound of 50 a
        // head holds at most 50 between steps and 51 within one.
        let mut r = request(100, 150, "h2o", 0.35);
        r.max_kv = Some(50);
        let bounded = seq(r, 16, PrefillCompression::Once);
        assert_eq!(bounded.reservation().settled, 51 * entry * 4);
        // A bound below what the prompt keeps: the first step brings the head back to it.
        let mut r = request(100, 150, "h2o", 0.35);
        r.max_kv = Some(20);
        let below = seq(r, 16, PrefillCompression::Once);
        assert_eq!(below.reservation().settled, 36 * entry * 4);
        // A bound the generation never reaches reserves what the tokens need.
        let mut r = request(100, 5, "h2o", 0.35);
        r.max_kv = Some(50);
        assert_eq!(seq(r, 16, PrefillCompression::Once).reservation().settled, 40 * entry * 4);
    }
}
