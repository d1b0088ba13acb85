//! Integration tests on the real default model (fetched on first use), on short inputs.

use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama;
use kvmerger_compress::{CompressionConfig, KvDtype};
use kvmerger_engine::testing::{
    compare_prefill, compare_with_reference, forward, Agreement, ForwardOptions,
};
use kvmerger_engine::{LoadedModel, Phase, WeightFormat, WeightFormats};
use kvmerger_models::load_model;

const PROMPT: &str =
    "The history of the lighthouse begins with fires lit on hilltops to guide ships at night. \
Over the centuries these fires were moved onto towers, and the towers grew taller and brighter. \
By the nineteenth century, lenses designed by Augustin Fresnel concentrated the light of a single \
lamp into a beam that could be seen more than twenty miles away. Keepers lived at the stations \
with their families, trimming wicks and winding clockwork every few hours. Today";

/// f32 weights and an f32 cache, to compare with f32 references.
fn f32_model() -> LoadedModel {
    let path = kvmerger_models::ensure_default_model().expect("default model");
    let mut loaded =
        load_model(&path, WeightFormats { prefill: WeightFormat::F32, decode: WeightFormat::F32 })
            .expect("load");
    loaded.model.kv_dtype = KvDtype::F32;
    loaded
}

fn reference_model() -> quantized_llama::ModelWeights {
    // quantized_llama reads this on the loading thread to dequantize every weight to f32.
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    let path = kvmerger_models::ensure_default_model().unwrap();
    let (content, mut reader) = kvmerger_engine::read_gguf_header(&path).unwrap();
    quantized_llama::ModelWeights::from_gguf(content, &mut reader, &Device::Cpu).unwrap()
}

/// Our f32 path against candle-transformers' f32 `quantized_llama` on the same weights.
/// Cross-path (the same arithmetic in another order): bounded, not bit-exact.
#[test]
fn logits_agree_with_candle_transformers() {
    let ours = f32_model();
    let tokens = ours.tokenizer.encode(PROMPT, true).unwrap();
    assert!(tokens.len() >= 64, "prompt has {} tokens", tokens.len());
    let mut reference = reference_model();

    let agreement = compare_with_reference(&ours.model, &tokens, 32, |input, position| {
        let input = Tensor::new(input, &Device::Cpu)?.unsqueeze(0)?;
        Ok(reference.forward(&input, position)?.flatten_all()?.to_vec1()?)
    })
    .unwrap();
    eprintln!("f32 against candle-transformers: {agreement}");
    assert!(agreement.logits_error < 1e-3, "{agreement}");
    assert!(agreement.mean_kl < 1e-5 && agreement.max_kl < 1e-4, "{agreement}");
    assert!(agreement.top1_agreement >= 0.9, "{agreement}");
}

/// Storing keys and values in f16 (the default) or bf16 against an f32 cache. Cross-path:
/// bounded by the rounding of the stored keys and values.
#[test]
fn half_precision_caches_stay_close_to_the_f32_cache() {
    let wide = f32_model();
    let tokens = wide.tokenizer.encode(PROMPT, true).unwrap();
    for (dtype, tolerance, kl_bound) in [(KvDtype::F16, 2e-3, 1e-5), (KvDtype::Bf16, 2e-2, 5e-4)] {
        let mut narrow = wide.model.clone();
        narrow.kv_dtype = dtype;
        let mut cache = wide.model.new_cache();
        let agreement = compare_with_reference(&narrow, &tokens, 32, |input, _| {
            let logits =
                forward(&wide.model, Phase::Prefill, input, &mut cache, ForwardOptions::default())?;
            Ok(logits.flatten_all()?.to_vec1()?)
        })
        .unwrap();
        eprintln!("{dtype} cache against f32: {agreement}");
        assert!(agreement.logits_error < tolerance, "{dtype}: {agreement}");
        assert!(agreement.mean_kl < kl_bound, "{dtype}: {agreement}");
        assert!(agreement.top1_agreement >= 0.9, "{dtype}: {agreement}");
    }
}

#[test]
fn positions_reach_the_models_own_context_length() {
    // candle-transformers' llama code stops at 4096; SmolLM2 is trained for 8192.
    let m = f32_model();
    let context = m.model.config.context_length;
    assert_eq!(context, 8192);
    let mut cache = m.model.new_cache();
    // Pretend 8190 tokens were seen and evicted: the next two take positions 8190 and 8191.
    cache.n_seen = context - 2;
    let logits =
        forward(&m.model, Phase::Decode, &[42, 43], &mut cache, ForwardOptions::default()).unwrap();
    let row: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
    assert!(row.iter().all(|x| x.is_finite()));
    assert_eq!(cache.layers[0][0].meta()[1].position, context - 1);
    let err =
        forward(&m.model, Phase::Decode, &[44], &mut cache, ForwardOptions::default()).unwrap_err();
    assert!(err.to_string().contains("8192"), "{err}");
}

#[test]
fn every_method_generates_on_the_real_model() {
    let m = load_model(&kvmerger_models::ensure_default_model().unwrap(), WeightFormats::default())
        .unwrap();
    let tokens = m.tokenizer.encode(PROMPT, true).unwrap();
    for method in kvmerger_compress::METHOD_NAMES {
        let budget = (method != "full").then_some(kvmerger_compress::Budget::Ratio(0.5));
        let params =
            if method == "snapkv" { vec![("window".to_string(), "8".to_string())] } else { vec![] };
        let config = CompressionConfig::from_cli(method, budget, &params).unwrap();
        let mut session = kvmerger_engine::Session::new(&m.model, &config).unwrap();
        let logits = session.prefill(&tokens).unwrap();
        // The budget holds over the cache: AdaKV's heads and PyramidKV's layers differ.
        let heads: Vec<usize> = session.cache().layers.iter().flatten().map(|h| h.len()).collect();
        let (kept, bound) = (heads.iter().sum::<usize>(), tokens.len().div_ceil(2) * heads.len());
        if method != "full" {
            assert!(kept <= bound, "{method} kept {kept} of {}", tokens.len() * heads.len());
        }
        let mut sampler = kvmerger_engine::Sampler::new(Default::default());
        let out =
            session.generate(logits, 12, &mut sampler, &m.tokenizer.eos_ids(), |_| true).unwrap();
        let text = m.tokenizer.decode(&out).unwrap();
        assert!(out.len() >= 4 && text.chars().any(char::is_alphabetic), "{method}: {text:?}");
    }
}

/// Decodes with `decode` weights against the f32 path on the same prompt and tokens.
fn decode_against_f32(exact: &LoadedModel, decode: WeightFormat) -> Agreement {
    let path = kvmerger_models::ensure_default_model().unwrap();
    let other = load_model(&path, WeightFormats { prefill: WeightFormat::F32, decode }).unwrap();
    let tokens = exact.tokenizer.encode(PROMPT, true).unwrap();
    let mut exact_cache = exact.model.new_cache();
    compare_with_reference(&other.model, &tokens, 32, |input, _| {
        let logits = forward(
            &exact.model,
            Phase::Prefill,
            input,
            &mut exact_cache,
            ForwardOptions::default(),
        )?;
        Ok(logits.flatten_all()?.to_vec1()?)
    })
    .unwrap()
}

/// The quantized decode paths against f32, at whatever kernel level runs
/// (`KVMERGER_KERNEL_LEVEL`). Cross-path: our kernel's only loss is quantizing activations to
/// 8 bits (as llama.cpp does); Q8_0 requantization and candle's quantized product round the
/// weights or activations on top. The bounds are several times what any level measures.
#[test]
fn quantized_decode_stays_close_to_the_f32_path() {
    let exact = f32_model();
    let level = kvmerger_engine::KernelLevel::active();
    for (decode, kl_bound) in
        [(WeightFormat::File, 1e-2), (WeightFormat::Q8, 2e-2), (WeightFormat::Quantized, 2e-2)]
    {
        let agreement = decode_against_f32(&exact, decode);
        eprintln!("{decode:?} decode weights against f32 ({level} kernels): {agreement}");
        assert!(agreement.mean_kl < kl_bound, "{decode:?}: {agreement}");
        assert!(agreement.top1_agreement >= 0.85, "{decode:?}: {agreement}");
    }
}

/// Prefill with the file's blocks against the f32 path, every position of the prompt (more
/// rows than the block kernels take: the file's blocks dequantized a tile at a time into an
/// f32 product). The weights are the same values, so only the order of the sums and the
/// kernel path's own norms differ: measured 1.3e-11 nats per token at level avx2, bounded
/// at 1e-8 (a thousand times that).
#[test]
fn file_prefill_stays_close_to_the_f32_path() {
    let exact = f32_model();
    let path = kvmerger_models::ensure_default_model().unwrap();
    let file = WeightFormats { prefill: WeightFormat::File, decode: WeightFormat::File };
    let mut ours = load_model(&path, file).unwrap();
    ours.model.kv_dtype = KvDtype::F32;
    let tokens = exact.tokenizer.encode(PROMPT, true).unwrap();
    assert!(tokens.len() >= 64, "a prefill of many rows: {} tokens", tokens.len());
    let agreement = compare_prefill(&ours.model, &exact.model, &tokens).unwrap();
    let level = kvmerger_engine::KernelLevel::active();
    eprintln!("file prefill against f32 ({level} kernels): {agreement}");
    assert!(agreement.mean_kl < 1e-8 && agreement.max_kl < 1e-7, "{agreement}");
    assert!(agreement.top1_agreement >= 0.95, "{agreement}");
}
