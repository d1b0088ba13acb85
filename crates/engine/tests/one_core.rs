//! A session drives the same sequence the server does: its logits are the sequence's, bit
//! for bit (the same code path, so exact equality is the right check); a prefill shared by
//! several methods continues exactly as each method's own prefill would; and an incremental
//! prefill holds at most budget plus one chunk per head whichever way it is driven.

use kvmerger_compress::{Budget, CompressionConfig, KvCache};
use kvmerger_engine::testing::{random_llama_with, tiny_config};
use kvmerger_engine::{
    argmax, BatchItem, EngineError, GenerationRequest, Llama, Logits, Phase, PrefillCompression,
    PrefillOptions, Prefilled, RequestError, RequestField, RequestLimits, RequestOptions, Sampler,
    SamplingConfig, Sequence, Session, WeightFormat, WeightFormats,
};

const PROMPT: usize = 200;
const CHUNK: usize = 64;
const STEPS: usize = 12;

/// Prefill and decode read different weight formats, so a pass in the wrong phase shows.
fn model() -> Llama {
    let formats = WeightFormats { prefill: WeightFormat::F32, decode: WeightFormat::File };
    random_llama_with(tiny_config(), 21, formats).unwrap()
}

fn prompt(seed: u32) -> Vec<u32> {
    (0..PROMPT as u32).map(|i| (i * 7 + seed * 13) % 61).collect()
}

fn method(name: &str, share: f64) -> CompressionConfig {
    CompressionConfig::from_cli(name, Some(Budget::Ratio(share)), &[]).unwrap()
}

fn options(compression: PrefillCompression) -> PrefillOptions {
    PrefillOptions { chunk: CHUNK, compression, attention_chunk: 16 }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The serving runtime's way: the sequence's own prefill, then decode steps batched with
/// a second sequence, each followed by the sequence's decode-time policy. Returns the
/// prompt's logits and each step's.
fn served(model: &Llama, config: &CompressionConfig, mode: PrefillCompression) -> Vec<Vec<f32>> {
    let limits = RequestLimits::of(&model.config, None);
    let request = |tokens: Vec<u32>| {
        let options = RequestOptions {
            max_tokens: Some(STEPS + 1),
            default_max_tokens: STEPS + 1,
            sampling: SamplingConfig::default(),
            compression: config.clone(),
            stop_tokens: vec![],
            max_kv: None,
            prefill_compression: None,
            kv_dtype: None,
        };
        GenerationRequest::new(tokens, options, &limits).unwrap()
    };
    let sequence = |id, tokens| {
        Sequence::new(id, request(tokens), &model.config, CHUNK, mode)
            .unwrap()
            .with_kv_dtype(model.kv_dtype)
    };
    let (mut seq, mut other) = (sequence(1, prompt(0)), sequence(2, prompt(1)));
    let prefill = |s: &mut Sequence| loop {
        if let Some(logits) = s.prefill_chunk(model, 16).unwrap() {
            break logits;
        }
    };
    let mut rows = vec![prefill(&mut seq)];
    prefill(&mut other);
    for _ in 0..STEPS {
        let tokens = [argmax(rows.last().unwrap()), 5];
        let (stats, other_stats) = (seq.decode_stats(), other.decode_stats());
        let mut items = [
            BatchItem {
                tokens: &tokens[..1],
                cache: &mut seq.cache,
                logits: Some(Logits::Last),
                stats,
            },
            BatchItem {
                tokens: &tokens[1..],
                cache: &mut other.cache,
                logits: Some(Logits::Last),
                stats: other_stats,
            },
        ];
        let out = model.forward_batch(&mut items, Phase::Decode, 16).unwrap();
        let logits: Vec<f32> = out[0].as_ref().unwrap().flatten_all().unwrap().to_vec1().unwrap();
        seq.decoded(&logits).unwrap();
        rows.push(logits);
    }
    rows
}

/// The same generation through a [`Session`].
fn session_rows(session: &mut Session<'_>, first: Vec<f32>) -> Vec<Vec<f32>> {
    let mut rows = vec![first];
    for _ in 0..STEPS {
        let next = argmax(rows.last().unwrap());
        rows.push(session.step(next).unwrap());
    }
    rows
}

#[test]
fn a_session_gives_the_logits_of_the_sequence_the_server_drives() {
    let model = model();
    for mode in [PrefillCompression::Once, PrefillCompression::Incremental] {
        for config in [CompressionConfig::Full, method("kvmerger", 0.3), method("h2o", 0.3)] {
            let mut session = Session::new(&model, &config).unwrap().with_options(options(mode));
            let first = session.prefill(&prompt(0)).unwrap();
            let ours = session_rows(&mut session, first);
            let theirs = served(&model, &config, mode);
            for (step, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                assert_eq!(bits(a), bits(b), "{} {mode:?}: step {step}", config.label());
            }
        }
    }
}

/// Progress names every chunk boundary of the prompt in order, and reporting it changes
/// nothing of the prefill.
#[test]
fn a_prefill_reports_each_chunk_it_finished() {
    let model = model();
    let config = method("kvmerger", 0.3);
    let mode = PrefillCompression::Incremental;
    let mut reported = Vec::new();
    let mut session = Session::new(&model, &config).unwrap().with_options(options(mode));
    let logits = session.prefill_with_progress(&prompt(0), |done| reported.push(done)).unwrap();
    let boundaries: Vec<usize> = (1..PROMPT.div_ceil(CHUNK)).map(|k| k * CHUNK).collect();
    assert_eq!(reported, boundaries);
    let mut plain = Session::new(&model, &config).unwrap().with_options(options(mode));
    assert_eq!(bits(&logits), bits(&plain.prefill(&prompt(0)).unwrap()));
}

#[test]
fn a_forked_prefill_continues_as_a_fresh_one() {
    let model = model();
    let tokens = prompt(0);
    for config in [method("kvmerger", 0.3), method("snapkv", 0.4), method("h2o", 0.3)] {
        let once = options(PrefillCompression::Once);
        let stats = config.build().unwrap().prompt_stats(tokens.len());
        let prefilled = Prefilled::run(&model, &tokens, stats, once).unwrap();
        let mut fresh = Session::new(&model, &config).unwrap().with_options(once);
        let mut resumed = Session::new(&model, &config).unwrap().with_options(once);
        let (a, b) = (fresh.prefill(&tokens).unwrap(), resumed.resume(prefilled).unwrap());
        assert_eq!(bits(&a), bits(&b), "{}: the prompt's logits", config.label());
        assert_eq!(fresh.cache(), resumed.cache(), "{}: the compressed cache", config.label());
        // A question read after the prompt, then a fork of each continued token by token.
        let question = [9, 4, 17, 33, 2, 8];
        let a = fresh.extend(&question, Logits::Last).unwrap().swap_remove(0);
        let b = resumed.extend(&question, Logits::Last).unwrap().swap_remove(0);
        assert_eq!(bits(&a), bits(&b), "{}: the question's logits", config.label());
        let mut forked = resumed.fork().unwrap();
        let (ours, forks, fresh_rows) = (
            session_rows(&mut resumed, b.clone()),
            session_rows(&mut forked, b),
            session_rows(&mut fresh, a),
        );
        for step in 0..=STEPS {
            assert_eq!(bits(&ours[step]), bits(&forks[step]), "{}: fork {step}", config.label());
            assert_eq!(bits(&ours[step]), bits(&fresh_rows[step]), "{}: {step}", config.label());
        }
        assert_eq!(resumed.cache(), fresh.cache());
    }
}

/// Entries of the fullest head.
fn fullest(cache: &KvCache) -> usize {
    cache.layers.iter().flatten().map(|h| h.len()).max().unwrap()
}

#[test]
fn an_incremental_session_holds_at_most_budget_plus_one_chunk() {
    let model = model();
    let tokens = prompt(0);
    for name in ["kvmerger", "h2o", "snapkv", "streamingllm", "tova"] {
        let config = method(name, 0.25);
        let budget = (0.25 * PROMPT as f64).round() as usize;
        let run = |mode| {
            let mut session = Session::new(&model, &config).unwrap().with_options(options(mode));
            session.prefill(&tokens).unwrap();
            (session.peak(), fullest(session.cache()))
        };
        let (once, once_kept) = run(PrefillCompression::Once);
        let (incremental, kept) = run(PrefillCompression::Incremental);
        assert_eq!(once.head_entries, PROMPT, "{name}: once holds the whole prompt first");
        assert!(incremental.head_entries <= budget + CHUNK, "{name}: {incremental:?}");
        assert!(
            incremental.head_entries > budget,
            "{name}: fills past the budget: {incremental:?}"
        );
        assert!(incremental.resident_bytes < once.resident_bytes, "{name}");
        assert_eq!((kept, once_kept), (budget, budget), "{name}: settles to the budget");
    }
}

#[test]
fn a_method_that_cannot_compress_incrementally_says_why() {
    let model = model();
    let incremental = options(PrefillCompression::Incremental);
    let mode = [("budget_mode".to_string(), "threshold".to_string())];
    let threshold = CompressionConfig::from_cli("kvmerger", None, &mode);
    let cases = [
        (method("cam", 0.3), "whole prompt"),
        (threshold.unwrap(), "threshold"),
        (method("snapkv", 0.3), "window"),
    ];
    for (config, why) in cases {
        let tiny_chunk = PrefillOptions { chunk: 8, ..incremental };
        let mut session = Session::new(&model, &config).unwrap().with_options(tiny_chunk);
        match session.prefill(&prompt(0)) {
            Err(EngineError::Request(RequestError::Invalid { field, reason })) => {
                assert_eq!(field, RequestField::PrefillCompression);
                assert!(reason.contains(why), "{}: {reason}", config.label());
            }
            other => panic!("{}: {:?}", config.label(), other.map(|l| l.len())),
        }
    }
    // Compressed once, each runs.
    let once = options(PrefillCompression::Once);
    let mut cam = Session::new(&model, &method("cam", 0.3)).unwrap().with_options(once);
    assert!(cam.prefill(&prompt(0)).is_ok());
}

/// A long generation under `--max-kv`: every method with a rule for decoded entries holds
/// at most the bound in every head after every step, brought back to it by the first step
/// (the prompt keeps more), and its resident bytes stay where that step left them, however
/// long it runs. A method without such a rule is refused before anything runs.
#[test]
fn a_bounded_generation_holds_the_bound_in_constant_memory() {
    const BOUND: usize = 64;
    let config = kvmerger_engine::ModelConfig { context_length: 1024, ..tiny_config() };
    let formats = WeightFormats { prefill: WeightFormat::F32, decode: WeightFormat::File };
    let model = random_llama_with(config, 21, formats).unwrap();
    let exact = [("budget_mode".to_string(), "exact".to_string())];
    let methods = [
        method("h2o", 0.5),
        method("tova", 0.5),
        method("streaming_llm", 0.5),
        method("cam", 0.5),
        method("knorm", 0.5),
        method("keydiff", 0.5),
        method("kvmerger", 0.5),
        CompressionConfig::from_cli("kvmerger", Some(Budget::Ratio(0.5)), &exact).unwrap(),
    ];
    for config in methods {
        let name = config.label();
        let mut session = Session::new(&model, &config)
            .unwrap()
            .with_options(options(PrefillCompression::Once))
            .with_max_kv(Some(BOUND));
        let mut logits = session.prefill(&prompt(0)).unwrap();
        assert_eq!(fullest(session.cache()), PROMPT / 2, "{name}: the prompt keeps its budget");
        let mut resident = None;
        for step in 0..600 {
            logits = session.step(argmax(&logits)).unwrap();
            let cache = session.cache();
            let held = fullest(cache);
            assert!(held <= BOUND, "{name}: {held} entries after step {step}");
            let bytes = cache.resident_bytes();
            assert_eq!(*resident.get_or_insert(bytes), bytes, "{name}: bytes at step {step}");
            assert!(logits.iter().all(|x| x.is_finite()), "{name}: step {step}");
        }
        // Nothing was lost from the count of tokens seen: positions go on.
        assert_eq!(session.cache().n_seen, PROMPT + 600, "{name}");
    }
    for refused in [method("snapkv", 0.5), CompressionConfig::Full] {
        let mut session = Session::new(&model, &refused).unwrap().with_max_kv(Some(BOUND));
        match session.prefill(&prompt(0)) {
            Err(EngineError::Request(RequestError::Invalid { field, reason })) => {
                assert_eq!(field, RequestField::MaxKv);
                assert!(reason.contains(refused.name()) || reason.contains("full"), "{reason}");
            }
            other => panic!("{}: {:?}", refused.label(), other.map(|l| l.len())),
        }
    }
}

/// Sessions generating together in batched decode passes get, bit for bit, the tokens,
/// logits and caches each gets generating alone (each row of a batched pass is computed
/// as that row alone is): prompts of different lengths, methods with and without a
/// decode-time policy, a decode bound, and a stop token that ends one session early.
#[test]
fn sessions_generating_together_match_each_generating_alone() {
    let model = model();
    let setups: Vec<(CompressionConfig, usize, Option<usize>)> = vec![
        (CompressionConfig::Full, 150, None),
        (method("h2o", 0.5), PROMPT, None),
        (method("kvmerger", 0.35), 90, Some(40)),
        (method("streaming_llm", 0.25), 177, None),
    ];
    let start = |(config, len, max_kv): &(CompressionConfig, usize, Option<usize>)| {
        let mut session = Session::new(&model, config)
            .unwrap()
            .with_options(options(PrefillCompression::Once))
            .with_max_kv(*max_kv);
        let logits = session.prefill(&prompt(*len as u32)[..*len]).unwrap();
        (session, logits)
    };
    let greedy = || Sampler::new(SamplingConfig::default());
    // A stop token: what the second session generates third when nothing stops it.
    let (mut probe, logits) = start(&setups[1]);
    let stop = [probe.generate(logits, 3, &mut greedy(), &[], |_| true).unwrap()[2]];

    let (mut alone, mut alone_tokens) = (Vec::new(), Vec::new());
    for setup in &setups {
        let (mut session, logits) = start(setup);
        alone_tokens.push(session.generate(logits, STEPS, &mut greedy(), &stop, |_| true).unwrap());
        alone.push(session);
    }
    let (mut together, first): (Vec<_>, Vec<_>) = setups.iter().map(start).unzip();
    let mut samplers: Vec<Sampler> = setups.iter().map(|_| greedy()).collect();
    let tokens =
        Session::generate_together(&mut together, first, STEPS, &mut samplers, &stop).unwrap();
    assert_eq!(tokens, alone_tokens);
    assert!(tokens[1].len() <= 3, "the stop token ends the second session by its third");
    // Each session ends at its own stop token or at the step limit, not when another does.
    for (i, generated) in tokens.iter().enumerate() {
        let stops = generated.iter().position(|t| stop.contains(t));
        let end = stops.map_or(STEPS, |at| at + 1);
        assert_eq!(generated.len(), end, "session {i}: {generated:?}");
    }
    for (i, (a, b)) in alone.iter_mut().zip(&mut together).enumerate() {
        assert_eq!(a.cache(), b.cache(), "session {i}: caches");
        assert_eq!(a.timings.decode_tokens, b.timings.decode_tokens, "session {i}");
        // Both continue from the same point: one more token gives the same logits.
        let next = *alone_tokens[i].last().unwrap();
        assert_eq!(bits(&a.step(next).unwrap()), bits(&b.step(next).unwrap()), "session {i}");
    }
}
