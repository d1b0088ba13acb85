//! The serving runtime: sequences, the scheduler and the KV pool driven step by step, and
//! a thread that runs those steps behind a handle.
//!
//! [`Engine`] is synchronous (`add`, `cancel`, `step` returning per-sequence events) so it
//! can be tested without threads. [`EngineHandle`] runs it on its own thread: requests come
//! in over a channel, events go out through each request's [`EventSink`], and a sink that
//! closes (the client went away) cancels its sequence before the next step, freeing its
//! memory. A bad request is an error for that request, never a dead engine.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use kvmerger_compress::CompressError;
use rayon::prelude::*;

use crate::error::{EngineError, Result};
use crate::model::Llama;
use crate::pool::KvPool;
use crate::prefill::PrefillCompression;
use crate::request::{GenerationRequest, RequestError};
use crate::scheduler::{Refusal, Scheduler, SchedulerLimits};
use crate::sequence::{decode_batch, FinishReason, SeqId, SeqState, Sequence, Usage};

/// How the runtime is sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// Bytes of KV cache all sequences may hold together.
    pub kv_pool_bytes: usize,
    /// Requests waiting for memory at most; more are refused.
    pub max_queue: usize,
    /// Sequences admitted at once at most.
    pub max_running: usize,
    /// Prompt tokens per prefill chunk (one chunk runs between two decode steps).
    pub prefill_chunk: usize,
    /// When compressing requests compress their prompt.
    pub prefill_compression: PrefillCompression,
    /// Queries per chunk of the explicit attention softmax.
    pub attention_chunk: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            kv_pool_bytes: 1 << 30,
            max_queue: 64,
            max_running: 32,
            prefill_chunk: 256,
            prefill_compression: PrefillCompression::default(),
            attention_chunk: 128,
        }
    }
}

/// Why a request was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    /// The request cannot run as this engine runs (a rule that depends on the engine's
    /// configuration, such as a method that cannot compress in its prefill chunks).
    #[error(transparent)]
    Request(RequestError),
    /// The sequence could not be built (an internal error: the request was checked).
    #[error(transparent)]
    Invalid(EngineError),
    /// The queue is full, or the request can never fit the pool.
    #[error(transparent)]
    Refused(Refusal),
    /// The engine thread has stopped.
    #[error("the engine has stopped")]
    Stopped,
}

/// What happened to a sequence during a step.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A generated token; a stop token is not one (it ends the sequence: `Finished`
    /// with [`FinishReason::Stop`], and is counted in its usage).
    Token(u32),
    /// The sequence ended; its memory is free.
    Finished { reason: FinishReason, usage: Usage },
}

/// Counters and gauges of the runtime, shared with whoever reports them.
#[derive(Debug, Default)]
pub struct RuntimeMetrics {
    pub requests_completed: AtomicU64,
    pub requests_cancelled: AtomicU64,
    pub requests_failed: AtomicU64,
    pub requests_refused_queue_full: AtomicU64,
    pub requests_refused_too_large: AtomicU64,
    pub requests_invalid: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub active_sessions: AtomicUsize,
    pub active_sessions_peak: AtomicUsize,
    pub queued_sessions: AtomicUsize,
    pub kv_pool_bytes_used: AtomicUsize,
    pub kv_pool_bytes_peak: AtomicUsize,
    pub kv_pool_bytes_limit: AtomicUsize,
    /// Bytes the caches actually hold (at most the pool's reservations).
    pub kv_resident_bytes: AtomicUsize,
    /// Entries kept and entries before, summed over every compressed prompt.
    pub compressed_entries_kept: AtomicU64,
    pub compressed_entries_before: AtomicU64,
}

impl RuntimeMetrics {
    /// Entries kept over entries of the full cache, over all prompts compressed so far.
    pub fn achieved_ratio(&self) -> f64 {
        let before = self.compressed_entries_before.load(Ordering::Relaxed);
        if before == 0 {
            return 1.0;
        }
        self.compressed_entries_kept.load(Ordering::Relaxed) as f64 / before as f64
    }
}

/// The synchronous engine: add requests, cancel them, run steps.
pub struct Engine {
    model: Arc<Llama>,
    config: EngineConfig,
    scheduler: Scheduler,
    pool: KvPool,
    sequences: BTreeMap<SeqId, Sequence>,
    next_id: SeqId,
    metrics: Arc<RuntimeMetrics>,
}

impl Engine {
    pub fn new(model: Arc<Llama>, config: EngineConfig) -> Self {
        let limits =
            SchedulerLimits { max_queue: config.max_queue, max_running: config.max_running };
        let metrics = Arc::new(RuntimeMetrics::default());
        metrics.kv_pool_bytes_limit.store(config.kv_pool_bytes, Ordering::Relaxed);
        Self {
            model,
            config,
            scheduler: Scheduler::new(limits),
            pool: KvPool::new(config.kv_pool_bytes),
            sequences: BTreeMap::new(),
            next_id: 1,
            metrics,
        }
    }

    pub fn metrics(&self) -> Arc<RuntimeMetrics> {
        self.metrics.clone()
    }

    pub fn pool(&self) -> &KvPool {
        &self.pool
    }

    /// Queues a request; it is admitted at a later step when its memory fits.
    pub fn add(&mut self, request: GenerationRequest) -> std::result::Result<SeqId, AddError> {
        let m = &self.metrics;
        let c = &self.config;
        // The request's cache dtype, else the engine's.
        let kv_dtype = request.kv_dtype.unwrap_or(self.model.kv_dtype);
        let seq = Sequence::new(
            self.next_id,
            request,
            &self.model.config,
            c.prefill_chunk,
            c.prefill_compression,
        )
        .map(|s| s.with_kv_dtype(kv_dtype))
        .inspect_err(|_| {
            m.requests_invalid.fetch_add(1, Ordering::Relaxed);
        })
        .map_err(|e| match e {
            EngineError::Request(r) => AddError::Request(r),
            other => AddError::Invalid(other),
        })?;
        if let Err(refusal) = self.scheduler.submit(seq.id, seq.reservation(), &self.pool) {
            let counter = match refusal {
                Refusal::QueueFull { .. } => &m.requests_refused_queue_full,
                Refusal::NeverFits { .. } => &m.requests_refused_too_large,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            return Err(AddError::Refused(refusal));
        }
        let id = seq.id;
        self.next_id += 1;
        self.sequences.insert(id, seq);
        self.publish();
        Ok(id)
    }

    /// Stops a sequence at once and frees its memory. Returns its final event, if it was live.
    pub fn cancel(&mut self, id: SeqId) -> Option<Event> {
        self.sequences.contains_key(&id).then(|| self.end(id, FinishReason::Cancelled))
    }

    /// Whether nothing waits or runs.
    pub fn is_idle(&self) -> bool {
        self.scheduler.is_idle()
    }

    /// Live sequence ids (waiting or running).
    pub fn live(&self) -> Vec<SeqId> {
        self.sequences.keys().copied().collect()
    }

    /// A live sequence (its state, plan and cache).
    pub fn sequence(&self, id: SeqId) -> Option<&Sequence> {
        self.sequences.get(&id)
    }

    /// Admits what fits, prefills one chunk of the oldest admitted prompt, and decodes one
    /// token for every sequence past its prefill, all of them in one batched pass.
    pub fn step(&mut self) -> Vec<(SeqId, Event)> {
        let plan = self.scheduler.schedule(&mut self.pool);
        let mut events = Vec::new();
        if let Some(id) = plan.prefill {
            self.prefill_chunk(id, &mut events);
        }
        if !plan.decode.is_empty() {
            self.decode(&plan.decode, &mut events);
        }
        self.publish();
        events
    }

    fn prefill_chunk(&mut self, id: SeqId, events: &mut Vec<(SeqId, Event)>) {
        let Some(seq) = self.sequences.get_mut(&id) else { return };
        // Its cache is allocated when its prefill starts (in its first chunk), not when it
        // is admitted: only then does the pool hold its prefill headroom.
        let result = seq
            .prefill_chunk(&self.model, self.config.attention_chunk)
            .map(|logits| logits.map(|logits| seq.accept(&logits)));
        match result {
            Ok(None) => {}
            Ok(Some((token, finish))) => {
                if let Some(report) = seq.report() {
                    let m = &self.metrics;
                    let before: usize = report.heads.iter().flatten().map(|h| h.before).sum();
                    m.compressed_entries_before.fetch_add(before as u64, Ordering::Relaxed);
                    m.compressed_entries_kept
                        .fetch_add(report.kept_entries() as u64, Ordering::Relaxed);
                }
                self.pool.settle(id, seq.cache.resident_bytes());
                self.scheduler.prefilled(id);
                self.emit(id, token, finish, events);
            }
            Err(EngineError::Compress(CompressError::InvalidParameter { name, reason })) => {
                let reason = FinishReason::InvalidCompression { parameter: name, reason };
                events.push((id, self.end(id, reason)));
            }
            Err(e) => events.push((id, self.end(id, FinishReason::Error(e.to_string())))),
        }
    }

    fn decode(&mut self, ids: &[SeqId], events: &mut Vec<(SeqId, Event)>) {
        let mut order = Vec::with_capacity(ids.len());
        let mut tokens = Vec::with_capacity(ids.len());
        let mut batch = Vec::with_capacity(ids.len());
        for (id, seq) in self.sequences.iter_mut().filter(|(id, _)| ids.contains(id)) {
            // The token fed is the last one generated.
            let (Some(&token), SeqState::Decoding) = (seq.generated.last(), &seq.state) else {
                continue;
            };
            order.push(*id);
            tokens.push(token);
            batch.push(seq);
        }
        let result = decode_batch(&self.model, &mut batch, &tokens, self.config.attention_chunk);
        drop(batch);
        match result {
            Ok(rows) => {
                // Each sequence's decode-time eviction and sampling are independent of the
                // others': run them side by side rather than one after another.
                let mut work = Vec::with_capacity(rows.len());
                let mut rows = order.iter().copied().zip(rows).peekable();
                for (id, seq) in self.sequences.iter_mut() {
                    if let Some((_, logits)) = rows.next_if(|(next, _)| next == id) {
                        work.push((*id, seq, logits));
                    }
                }
                let outcomes: Vec<_> = work
                    .into_par_iter()
                    .map(|(id, seq, logits): (SeqId, &mut Sequence, Vec<f32>)| {
                        (id, seq.decoded(&logits))
                    })
                    .collect();
                for (id, outcome) in outcomes {
                    match outcome {
                        Ok((token, finish)) => self.emit(id, token, finish, events),
                        Err(e) => {
                            events.push((id, self.end(id, FinishReason::Error(e.to_string()))))
                        }
                    }
                }
            }
            Err(e) => {
                for id in order {
                    events.push((id, self.end(id, FinishReason::Error(e.to_string()))));
                }
            }
        }
    }

    /// Records a sampled token, delivered unless it is a stop token; ends the sequence if
    /// it finished.
    fn emit(
        &mut self,
        id: SeqId,
        token: u32,
        finish: Option<FinishReason>,
        events: &mut Vec<(SeqId, Event)>,
    ) {
        self.metrics.generated_tokens.fetch_add(1, Ordering::Relaxed);
        if finish != Some(FinishReason::Stop) {
            events.push((id, Event::Token(token)));
        }
        if let Some(reason) = finish {
            events.push((id, self.end(id, reason)));
        }
    }

    /// Removes a sequence, frees its memory, counts its outcome.
    fn end(&mut self, id: SeqId, reason: FinishReason) -> Event {
        self.scheduler.remove(id);
        self.pool.free(id);
        let usage = match self.sequences.remove(&id) {
            Some(mut seq) => {
                seq.finish(reason.clone());
                seq.usage()
            }
            None => Usage {
                prompt_tokens: 0,
                completion_tokens: 0,
                method: String::new(),
                achieved_ratio: 1.0,
                resident_kv_bytes: 0,
                full_kv_bytes: 0,
            },
        };
        let m = &self.metrics;
        let counter = match reason {
            FinishReason::Stop | FinishReason::Length => &m.requests_completed,
            FinishReason::Cancelled => &m.requests_cancelled,
            FinishReason::InvalidCompression { .. } => &m.requests_invalid,
            FinishReason::Error(_) => &m.requests_failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        m.prompt_tokens.fetch_add(usage.prompt_tokens as u64, Ordering::Relaxed);
        self.publish();
        Event::Finished { reason, usage }
    }

    /// Copies the gauges into the shared metrics.
    fn publish(&self) {
        let m = &self.metrics;
        let running = self.scheduler.running();
        m.active_sessions.store(running, Ordering::Relaxed);
        m.active_sessions_peak.fetch_max(running, Ordering::Relaxed);
        m.queued_sessions.store(self.scheduler.waiting(), Ordering::Relaxed);
        m.kv_pool_bytes_used.store(self.pool.used(), Ordering::Relaxed);
        m.kv_pool_bytes_peak.store(self.pool.peak(), Ordering::Relaxed);
        let resident = self
            .sequences
            .values()
            .filter(|s| s.state != SeqState::Waiting)
            .map(|s| s.cache.resident_bytes())
            .sum();
        m.kv_resident_bytes.store(resident, Ordering::Relaxed);
    }
}

/// Where a request's outcome goes: implemented by the server over its async channels.
pub trait EventSink: Send + 'static {
    /// The request was queued as `id`.
    fn accepted(&mut self, id: SeqId);
    /// The request was not queued.
    fn refused(&mut self, error: AddError);
    /// Delivers an event; `false` when the receiver is gone.
    fn send(&mut self, event: Event) -> bool;
    /// Whether the receiver is gone (the client disconnected).
    fn is_closed(&self) -> bool;
}

enum Command {
    /// Boxed: a request is far larger than a cancellation.
    Add(Box<GenerationRequest>, Box<dyn EventSink>),
    Cancel(SeqId),
}

/// The engine on its own thread. Cloning shares the same engine; the thread ends when the
/// last handle is dropped and no work is left.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    metrics: Arc<RuntimeMetrics>,
    thread: Arc<JoinHandle<()>>,
}

impl EngineHandle {
    pub fn spawn(model: Arc<Llama>, config: EngineConfig) -> Result<Self> {
        let engine = Engine::new(model, config);
        let metrics = engine.metrics();
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("kvmerger-engine".into())
            .spawn(move || run_loop(engine, rx))
            .map_err(|e| EngineError::Setup(format!("starting the engine thread: {e}")))?;
        Ok(Self { tx, metrics, thread: Arc::new(thread) })
    }

    /// Queues a request; `sink` hears whether it was accepted, then its events.
    pub fn submit(
        &self,
        request: GenerationRequest,
        sink: Box<dyn EventSink>,
    ) -> std::result::Result<(), AddError> {
        self.tx.send(Command::Add(Box::new(request), sink)).map_err(|_| AddError::Stopped)
    }

    /// Stops a sequence and frees its memory before the next step.
    pub fn cancel(&self, id: SeqId) {
        let _ = self.tx.send(Command::Cancel(id));
    }

    pub fn metrics(&self) -> Arc<RuntimeMetrics> {
        self.metrics.clone()
    }

    /// Whether the engine thread is still running.
    pub fn is_running(&self) -> bool {
        !self.thread.is_finished()
    }
}

fn run_loop(mut engine: Engine, rx: mpsc::Receiver<Command>) {
    let mut sinks: HashMap<SeqId, Box<dyn EventSink>> = HashMap::new();
    let handle = |engine: &mut Engine,
                  sinks: &mut HashMap<SeqId, Box<dyn EventSink>>,
                  command: Command| match command {
        Command::Add(request, mut sink) => match engine.add(*request) {
            Ok(id) => {
                sink.accepted(id);
                sinks.insert(id, sink);
            }
            Err(e) => sink.refused(e),
        },
        Command::Cancel(id) => {
            // The canceller may still listen (a stop sequence ended the text): tell it.
            if let (Some(event), Some(mut sink)) = (engine.cancel(id), sinks.remove(&id)) {
                sink.send(event);
            }
        }
    };
    loop {
        if engine.is_idle() {
            match rx.recv() {
                Ok(command) => handle(&mut engine, &mut sinks, command),
                Err(_) => return,
            }
        }
        while let Ok(command) = rx.try_recv() {
            handle(&mut engine, &mut sinks, command);
        }
        // Clients that went away free their memory before anything else runs.
        let closed: Vec<SeqId> =
            sinks.iter().filter(|(_, s)| s.is_closed()).map(|(&id, _)| id).collect();
        for id in closed {
            engine.cancel(id);
            sinks.remove(&id);
        }
        if engine.is_idle() {
            continue;
        }
        let events = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.step()));
        let events = events.unwrap_or_else(|panic| {
            // A bug, not a request, panicked: fail what was running and keep serving.
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "internal error".into());
            let live = engine.live();
            live.into_iter()
                .filter_map(|id| {
                    let ended = engine.cancel(id)?;
                    let Event::Finished { usage, .. } = ended else { return None };
                    Some((id, Event::Finished { reason: FinishReason::Error(what.clone()), usage }))
                })
                .collect()
        });
        for (id, event) in events {
            let finished = matches!(event, Event::Finished { .. });
            let delivered = sinks.get_mut(&id).is_some_and(|s| s.send(event));
            if finished {
                sinks.remove(&id);
            } else if !delivered {
                engine.cancel(id);
                sinks.remove(&id);
            }
        }
    }
}
