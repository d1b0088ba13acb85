//! The serving runtime on the tiny random model: batched decode equals decode alone,
//! whatever the weight format; requests served together give the tokens they give alone;
//! the pool is never exceeded and a cancelled request frees its memory at once; a request
//! stores its cache in the dtype it asks for.

use std::sync::Arc;

use kvmerger_compress::{Budget, CompressionConfig, KvDtype};
use kvmerger_engine::testing::{random_llama, random_llama_with, tiny_config};
use kvmerger_engine::{
    AddError, BatchItem, Engine, EngineConfig, Event, FinishReason, GenerationRequest, Llama,
    Logits, Phase, PrefillCompression, Refusal, RequestError, RequestField, RequestLimits,
    RequestOptions, SamplingConfig, SeqId, Sequence, Session, WeightFormat, WeightFormats,
};

fn models() -> Vec<(&'static str, Llama)> {
    let q8 = WeightFormats { prefill: WeightFormat::F32, decode: WeightFormat::Q8 };
    let file = WeightFormats { prefill: WeightFormat::F32, decode: WeightFormat::File };
    vec![
        ("f32", random_llama(tiny_config(), 3).unwrap()),
        ("q8 decode", random_llama_with(tiny_config(), 3, q8).unwrap()),
        ("kernel decode", random_llama_with(tiny_config(), 3, file).unwrap()),
    ]
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| (i * 7 + seed * 13 + i * i % 5) % 60 + 1).collect()
}

fn config(method: &str, budget: f64) -> CompressionConfig {
    let budget = (method != "full").then_some(Budget::Ratio(budget));
    CompressionConfig::from_cli(method, budget, &[]).unwrap()
}

/// A greedy request's options on the tiny model: no stop tokens, no bound, the engine's
/// prefill mode.
fn options(max_tokens: usize, compression: CompressionConfig) -> RequestOptions {
    RequestOptions {
        max_tokens: Some(max_tokens),
        default_max_tokens: max_tokens,
        sampling: SamplingConfig::default(),
        compression,
        stop_tokens: vec![],
        max_kv: None,
        prefill_compression: None,
        kv_dtype: None,
    }
}

/// `options` checked against the tiny model's limits.
fn checked(prompt: Vec<u32>, options: RequestOptions) -> GenerationRequest {
    GenerationRequest::new(prompt, options, &RequestLimits::of(&tiny_config(), None)).unwrap()
}

/// A checked greedy request on the tiny model without stop tokens.
fn request(
    prompt: Vec<u32>,
    max_tokens: usize,
    compression: CompressionConfig,
) -> GenerationRequest {
    checked(prompt, options(max_tokens, compression))
}

/// Identical by construction (each row's arithmetic does not depend on the others in its
/// batch), whatever the weight format and kernel level: bit-exact.
#[test]
fn a_batched_decode_step_equals_each_sequence_alone_bit_for_bit() {
    for (name, model) in models() {
        let lens = [5usize, 17, 40, 9];
        let mut caches: Vec<_> = lens.iter().map(|_| model.new_cache()).collect();
        // Prefill each alone, then decode one token for all together and for each alone.
        for (i, cache) in caches.iter_mut().enumerate() {
            let p = prompt(i as u32, lens[i]);
            let mut item =
                [BatchItem { tokens: &p, cache, logits: None, stats: Default::default() }];
            model.forward_batch(&mut item, Phase::Prefill, 16).unwrap();
        }
        let next: Vec<[u32; 1]> = (0..lens.len()).map(|i| [(i as u32 * 11) % 60]).collect();
        let mut alone_caches = caches.clone();
        let mut items: Vec<BatchItem<'_>> = caches
            .iter_mut()
            .zip(&next)
            .map(|(cache, t)| BatchItem::last_logits(t, cache))
            .collect();
        let batched = model.forward_batch(&mut items, Phase::Decode, 16).unwrap();
        for (i, cache) in alone_caches.iter_mut().enumerate() {
            let mut item = [BatchItem::last_logits(&next[i], cache)];
            let alone = model.forward_batch(&mut item, Phase::Decode, 16).unwrap();
            let a: Vec<f32> = alone[0].as_ref().unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> =
                batched[i].as_ref().unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(a, b, "{name}: sequence {i} differs batched vs alone");
        }
        assert_eq!(caches, alone_caches, "{name}: caches differ batched vs alone");
    }
}

/// Runs requests to the end; returns each one's tokens (by submission order) and checks
/// the pool at every step.
fn serve(model: &Arc<Llama>, requests: &[GenerationRequest], pool: usize) -> Vec<Vec<u32>> {
    let cfg = EngineConfig { kv_pool_bytes: pool, prefill_chunk: 16, ..EngineConfig::default() };
    let mut engine = Engine::new(model.clone(), cfg);
    let ids: Vec<SeqId> = requests.iter().map(|r| engine.add(r.clone()).unwrap()).collect();
    let mut out = vec![Vec::new(); requests.len()];
    let mut done = 0;
    let mut steps = 0;
    while done < requests.len() {
        for (id, event) in engine.step() {
            let at = ids.iter().position(|&i| i == id).unwrap();
            match event {
                Event::Token(t) => out[at].push(t),
                Event::Finished { reason, usage } => {
                    assert!(matches!(reason, FinishReason::Stop | FinishReason::Length));
                    assert_eq!(usage.completion_tokens, out[at].len());
                    done += 1;
                }
            }
        }
        let metrics = engine.metrics();
        let resident = metrics.kv_resident_bytes.load(std::sync::atomic::Ordering::Relaxed);
        assert!(engine.pool().used() <= pool, "pool exceeded");
        assert!(resident <= engine.pool().used(), "caches hold more than they reserved");
        steps += 1;
        assert!(steps < 10_000, "the engine stopped making progress");
    }
    out
}

fn requests() -> Vec<GenerationRequest> {
    let methods = [
        ("full", 1.0),
        ("h2o", 0.35),
        ("kvmerger", 0.5),
        ("snapkv", 0.4),
        ("streaming_llm", 0.5),
        ("cam", 0.5),
    ];
    methods
        .iter()
        .enumerate()
        .map(|(i, &(m, b))| {
            // SnapKV's window does not fit twice in the chunks of 16 and CaM reads the whole
            // prompt's attention: each asks to be compressed once, as a client must.
            let once = matches!(m, "snapkv" | "cam").then_some(PrefillCompression::Once);
            let asked = RequestOptions { prefill_compression: once, ..options(12, config(m, b)) };
            checked(prompt(i as u32, 40 + 13 * i), asked)
        })
        .collect()
}

#[test]
fn greedy_requests_give_the_same_tokens_alone_or_together() {
    for (name, model) in models() {
        let model = Arc::new(model);
        let reqs = requests();
        let together = serve(&model, &reqs, 64 << 20);
        for (i, r) in reqs.iter().enumerate() {
            let alone = serve(&model, std::slice::from_ref(r), 64 << 20);
            assert_eq!(alone[0], together[i], "{name}: request {i} ({})", r.compression().label());
            assert_eq!(alone[0].len(), 12);
        }
    }
}

#[test]
fn a_small_pool_serves_everyone_in_turn_without_exceeding_its_limit() {
    let model = Arc::new(random_llama(tiny_config(), 3).unwrap());
    let reqs = requests();
    let alone = serve(&model, &reqs, 64 << 20);
    // Room for about two of the largest requests at once.
    let entry = kvmerger_engine::entry_bytes(tiny_config().head_dim, model.kv_dtype);
    let heads = tiny_config().n_layers * tiny_config().n_kv_heads;
    let pool = 2 * (40 + 13 * 5 + 12) * entry * heads;
    assert_eq!(serve(&model, &reqs, pool), alone);
}

/// A request's `kv_dtype` is its own cache's, beside a request on the engine's dtype: it
/// generates what an engine storing that dtype generates (the same arithmetic, so
/// bit-exact), in the memory that dtype takes. A block dtype the heads cannot hold is
/// refused, naming the field.
#[test]
fn a_request_stores_its_cache_in_the_dtype_it_asks_for() {
    let model = Arc::new(random_llama(tiny_config(), 3).unwrap());
    assert_eq!(model.kv_dtype, KvDtype::F32, "the tiny model's own dtype");
    let ask = |kv_dtype| {
        checked(prompt(4, 40), RequestOptions { kv_dtype, ..options(8, config("h2o", 0.5)) })
    };
    let mut f16_model = (*model).clone();
    f16_model.kv_dtype = KvDtype::F16;
    let on_f16_engine = serve(&Arc::new(f16_model), &[ask(None)], 64 << 20);
    let together = serve(&model, &[ask(Some(KvDtype::F16)), ask(None)], 64 << 20);
    assert_eq!(together[0], on_f16_engine[0]);
    let on_f32_engine = serve(&model, &[ask(None)], 64 << 20);
    assert_eq!(together[1], on_f32_engine[0]);

    let reserved = |kv_dtype| {
        let cfg = EngineConfig { kv_pool_bytes: 64 << 20, ..EngineConfig::default() };
        let mut engine = Engine::new(model.clone(), cfg);
        engine.add(ask(kv_dtype)).unwrap();
        engine.step();
        engine.pool().used()
    };
    let (f16, f32) = (reserved(Some(KvDtype::F16)), reserved(None));
    let entry = |d| kvmerger_engine::entry_bytes(tiny_config().head_dim, d);
    assert_eq!(f16 * entry(KvDtype::F32), f32 * entry(KvDtype::F16), "{f16} and {f32} bytes");

    let q8 =
        RequestOptions { kv_dtype: Some(KvDtype::Q8_0), ..options(8, CompressionConfig::Full) };
    match GenerationRequest::new(prompt(4, 40), q8, &RequestLimits::of(&tiny_config(), None)) {
        Err(RequestError::Invalid { field: RequestField::KvDtype, reason }) => {
            assert!(reason.contains("8 wide"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

/// The engine and a session run the same forward on the same single chunk (the prompt is
/// shorter than the engine's chunk): identical by construction, so bit-exact.
#[test]
fn the_engine_generates_what_a_session_generates() {
    let model = Arc::new(random_llama(tiny_config(), 5).unwrap());
    let p = prompt(9, 70);
    let req = request(p.clone(), 10, CompressionConfig::Full);
    let served = serve(&model, &[req], 64 << 20);
    let mut session = Session::new(&model, &CompressionConfig::Full).unwrap();
    let logits = session.prefill(&p).unwrap();
    let mut sampler = kvmerger_engine::Sampler::new(SamplingConfig::default());
    let generated = session.generate(logits, 10, &mut sampler, &[], |_| true).unwrap();
    assert_eq!(served[0], generated);
}

#[test]
fn cancel_frees_memory_at_once_and_refusals_name_why() {
    let model = Arc::new(random_llama(tiny_config(), 3).unwrap());
    let cfg = EngineConfig {
        kv_pool_bytes: 4 << 20,
        max_queue: 1,
        prefill_chunk: 16,
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(model, cfg);
    let req =
        |len: usize, max_tokens: usize| request(prompt(1, len), max_tokens, config("h2o", 0.5));
    let a = engine.add(req(100, 20)).unwrap();
    engine.step();
    assert!(engine.pool().used() > 0);
    assert!(matches!(
        engine.cancel(a),
        Some(Event::Finished { reason: FinishReason::Cancelled, .. })
    ));
    assert_eq!(engine.pool().used(), 0, "cancel frees the reservation");
    assert!(engine.is_idle());
    // Queue bound: nothing is admitted between adds, so one waits and the next is refused.
    engine.add(req(200, 40)).unwrap();
    let err = engine.add(req(200, 40)).unwrap_err();
    assert!(matches!(err, AddError::Refused(Refusal::QueueFull { max_queue: 1 })), "{err}");
    // A request larger than the whole pool can never fit.
    let small = EngineConfig { kv_pool_bytes: 10_000, ..cfg };
    let mut engine = Engine::new(Arc::new(random_llama(tiny_config(), 3).unwrap()), small);
    let err = engine.add(req(100, 20)).unwrap_err();
    assert!(matches!(err, AddError::Refused(Refusal::NeverFits { .. })), "{err}");
}

#[test]
fn incremental_prefill_never_holds_more_than_budget_plus_one_chunk_per_head() {
    let model = random_llama(tiny_config(), 3).unwrap();
    let chunk = 16;
    let window = [("window".to_string(), "8".to_string())];
    let methods = [
        config("h2o", 0.3),
        config("kvmerger", 0.3),
        config("streaming_llm", 0.3),
        CompressionConfig::from_cli("snapkv", Some(Budget::Ratio(0.3)), &window).unwrap(),
    ];
    for compression in methods {
        let name = compression.label();
        let request = request(prompt(4, 200), 5, compression);
        let mode = PrefillCompression::Incremental;
        let mut seq = Sequence::new(1, request.clone(), &model.config, chunk, mode).unwrap();
        let budget = 60;
        let reserved = seq.reservation().peak();
        seq.start();
        let (mut most, mut compressions) = (0, 0);
        // The runtime's prefill, with the heads measured right after each chunk's forward
        // pass, before any compression.
        while let Some(range) = seq.next_chunk() {
            let last = range.end == 200;
            let stats = seq.chunk_stats(&range);
            let mut item = [BatchItem {
                tokens: &request.prompt()[range.clone()],
                cache: &mut seq.cache,
                logits: last.then_some(Logits::Last),
                stats,
            }];
            let logits = model.forward_batch(&mut item, Phase::Prefill, 16).unwrap();
            let held = seq.cache.layers.iter().flatten().map(|h| h.len()).max().unwrap();
            assert!(held <= budget + chunk, "{name}: a head holds {held} > {budget} + {chunk}");
            assert!(seq.cache.resident_bytes() <= reserved, "{name}: over its reservation");
            most = most.max(held);
            let logits: Option<Vec<f32>> =
                logits[0].as_ref().map(|t| t.flatten_all().unwrap().to_vec1().unwrap());
            seq.chunk_done(range, logits.as_deref()).unwrap();
            let after = seq.cache.layers.iter().flatten().map(|h| h.len()).max().unwrap();
            compressions += usize::from(after < held);
        }
        assert_eq!(most, budget + chunk, "{name}: heads fill up to budget + chunk");
        assert!(compressions >= 5, "{name}: compressed {compressions} times");
        assert!(seq.cache.layers.iter().flatten().all(|h| h.len() == budget), "{name}");
        assert_eq!(
            seq.cache.resident_bytes(),
            seq.reservation().settled,
            "{name}: settles exactly"
        );
        assert_eq!(seq.usage().achieved_ratio, 0.3, "{name}: kept over the whole prompt");
    }
}

#[test]
fn once_and_incremental_agree_where_the_prompt_fits_budget_plus_a_chunk() {
    // A 40-token prompt at 60% (budget 24) in chunks of 16: no compression before the last
    // chunk either way, so both modes give the same tokens.
    let model = Arc::new(random_llama(tiny_config(), 3).unwrap());
    let request = request(prompt(2, 40), 8, config("kvmerger", 0.6));
    let run = |mode| {
        let cfg = EngineConfig {
            prefill_chunk: 16,
            prefill_compression: mode,
            ..EngineConfig::default()
        };
        let mut engine = Engine::new(model.clone(), cfg);
        engine.add(request.clone()).unwrap();
        let mut tokens = Vec::new();
        while !engine.is_idle() {
            for (_, e) in engine.step() {
                if let Event::Token(t) = e {
                    tokens.push(t);
                }
            }
        }
        tokens
    };
    assert_eq!(run(PrefillCompression::Incremental), run(PrefillCompression::Once));
}

/// The server compresses during prefill by default; a request whose method cannot is
/// refused with the method and the reason (as every other command refuses it), and runs
/// once it asks for `prefill_compression = once` itself.
#[test]
fn a_request_whose_method_cannot_compress_during_prefill_is_refused_with_the_reason() {
    let model = Arc::new(random_llama(tiny_config(), 3).unwrap());
    let mut engine = Engine::new(model, EngineConfig::default());
    let asked =
        |mode| RequestOptions { prefill_compression: mode, ..options(4, config("cam", 0.3)) };
    match engine.add(checked(prompt(1, 100), asked(None))) {
        Err(AddError::Request(RequestError::Invalid { field, reason })) => {
            assert_eq!(field, RequestField::PrefillCompression);
            assert!(reason.contains("cam") && reason.contains("whole prompt"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let id = engine.add(checked(prompt(1, 100), asked(Some(PrefillCompression::Once)))).unwrap();
    assert!(!engine.sequence(id).unwrap().plan().is_incremental());
}

/// A stop token ends the sequence without being delivered as a token; its usage counts it.
#[test]
fn a_stop_token_ends_generation_and_is_not_delivered() {
    let model = Arc::new(random_llama(tiny_config(), 3).unwrap());
    let run = |stop_tokens: Vec<u32>| {
        let mut engine = Engine::new(model.clone(), EngineConfig::default());
        let req = checked(
            prompt(6, 30),
            RequestOptions { stop_tokens, ..options(12, CompressionConfig::Full) },
        );
        engine.add(req).unwrap();
        let (mut tokens, mut end) = (Vec::new(), None);
        while !engine.is_idle() {
            for (_, event) in engine.step() {
                match event {
                    Event::Token(t) => tokens.push(t),
                    Event::Finished { reason, usage } => end = Some((reason, usage)),
                }
            }
        }
        (tokens, end.expect("the sequence finished"))
    };
    let (all, _) = run(vec![]);
    // The last token that did not occur before it (the first one at least): generation
    // stops right there.
    let at = (0..all.len()).rev().find(|&i| !all[..i].contains(&all[i])).unwrap();
    let (tokens, (reason, usage)) = run(vec![all[at]]);
    assert_eq!(tokens, all[..at]);
    assert_eq!(reason, FinishReason::Stop);
    assert_eq!(usage.completion_tokens, at + 1);
}
