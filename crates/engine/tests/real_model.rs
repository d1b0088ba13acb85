//! Integration tests on the real default model (fetched on first use), on short inputs.

use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama;
use kvmerger_compress::{CompressionConfig, KvDtype};
use kvmerger_engine::testing::compare_with_reference;
use kvmerger_engine::{load_model, ForwardOptions, LoadedModel, WeightFormat, WeightFormats};

const PROMPT: &str =
    "The history of the lighthouse begins with fires lit on hilltops to guide ships at night. \
Over the centuries these fires were moved onto towers, and the towers grew taller and brighter. \
By the nineteenth century, lenses designed by Augustin Fresnel concentrated the light of a single \
lamp into a beam that could be seen more than twenty miles away. Keepers lived at the stations \
with their families, trimming wicks and winding clockwork every few hours. Today";

/// f32 weights and an f32 cache, to compare with f32 references.
fn f32_model() -> LoadedModel {
    let path = kvmerger_engine::fetch::ensure_default_model().expect("default model");
    let mut loaded =
        load_model(&path, WeightFormats { prefill: WeightFormat::F32, decode: WeightFormat::F32 })
            .expect("load");
    loaded.model.kv_dtype = KvDtype::F32;
    loaded
}

fn reference_model() -> quantized_llama::ModelWeights {
    // quantized_llama reads this on the loading thread to dequantize every weight to f32.
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    let path = kvmerger_engine::fetch::ensure_default_model().unwrap();
    let (content, mut reader) = kvmerger_engine::read_gguf_header(&path).unwrap();
    quantized_llama::ModelWeights::from_gguf(content, &mut reader, &Device::Cpu).unwrap()
}

#[test]
fn logits_and_greedy_tokens_agree_with_candle_transformers() {
    let ours = f32_model();
    let tokens = ours.tokenizer.encode(PROMPT, true).unwrap();
    assert!(tokens.len() >= 64, "prompt has {} tokens", tokens.len());
    let mut reference = reference_model();

    let agreement = compare_with_reference(&ours.model, &tokens, 32, |input, position| {
        let input = Tensor::new(input, &Device::Cpu)?.unsqueeze(0)?;
        Ok(reference.forward(&input, position)?.flatten_all()?.to_vec1()?)
    })
    .unwrap();
    assert!(agreement.logits_error < 1e-3, "relative L2 {}", agreement.logits_error);
    assert_eq!(
        agreement.ours,
        agreement.reference,
        "greedy continuations differ: {:?}",
        ours.tokenizer.decode(&agreement.ours)
    );
}

/// Storing keys and values in f16 (the default) or bf16 leaves the greedy continuation of the
/// f32 cache unchanged for 32 tokens, with last-prompt logits within the rounding of the
/// stored keys and values.
#[test]
fn half_precision_caches_generate_what_the_f32_cache_generates() {
    let wide = f32_model();
    let tokens = wide.tokenizer.encode(PROMPT, true).unwrap();
    for (dtype, tolerance) in [(KvDtype::F16, 2e-3), (KvDtype::Bf16, 2e-2)] {
        let mut narrow = wide.model.clone();
        narrow.kv_dtype = dtype;
        let mut cache = wide.model.new_cache();
        let agreement = compare_with_reference(&narrow, &tokens, 32, |input, _| {
            let logits = wide.model.forward(input, &mut cache, ForwardOptions::default())?;
            Ok(logits.flatten_all()?.to_vec1()?)
        })
        .unwrap();
        assert!(agreement.logits_error < tolerance, "{dtype}: {}", agreement.logits_error);
        assert_eq!(
            agreement.ours,
            agreement.reference,
            "{dtype}: greedy continuations differ: {:?}",
            wide.tokenizer.decode(&agreement.ours)
        );
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
    let logits = m.model.forward(&[42, 43], &mut cache, ForwardOptions::default()).unwrap();
    let row: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
    assert!(row.iter().all(|x| x.is_finite()));
    assert_eq!(cache.layers[0][0].meta()[1].position, context - 1);
    let err = m.model.forward(&[44], &mut cache, ForwardOptions::default()).unwrap_err();
    assert!(err.to_string().contains("8192"), "{err}");
}

#[test]
fn every_method_generates_on_the_real_model() {
    let m = load_model(
        &kvmerger_engine::fetch::ensure_default_model().unwrap(),
        WeightFormats::default(),
    )
    .unwrap();
    let tokens = m.tokenizer.encode(PROMPT, true).unwrap();
    for method in ["full", "streaming_llm", "h2o", "snapkv", "cam", "kvmerger"] {
        let budget = (method != "full").then_some(kvmerger_compress::Budget::Ratio(0.5));
        let params =
            if method == "snapkv" { vec![("window".to_string(), "8".to_string())] } else { vec![] };
        let config = CompressionConfig::from_cli(method, budget, &params).unwrap();
        let mut session = kvmerger_engine::Session::new(&m.model, &config).unwrap();
        let logits = session.prefill(&tokens).unwrap();
        let kept = session.cache.layers[0][0].len();
        if method != "full" {
            assert!(kept <= tokens.len().div_ceil(2), "{method} kept {kept} of {}", tokens.len());
        }
        let mut sampler = kvmerger_engine::Sampler::new(Default::default());
        let out =
            session.generate(logits, 12, &mut sampler, &m.tokenizer.eos_ids(), |_| true).unwrap();
        let text = m.tokenizer.decode(&out).unwrap();
        assert!(out.len() >= 4 && text.chars().any(char::is_alphabetic), "{method}: {text:?}");
    }
}

/// Mean KL divergence `KL(p || q)` in nats between the softmaxes of two logit rows.
fn kl(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    let log_softmax = |l: &[f32]| -> Vec<f64> {
        let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let sum: f64 = l.iter().map(|&v| (v as f64 - max).exp()).sum();
        l.iter().map(|&v| v as f64 - max - sum.ln()).collect()
    };
    let (p, q) = (log_softmax(p_logits), log_softmax(q_logits));
    p.iter().zip(&q).map(|(a, b)| a.exp() * (a - b)).sum()
}

/// Decodes 32 greedy tokens with `decode` weights and with the f32 path, each following its
/// own choices; returns both continuations and the mean KL of the `decode` path's
/// distributions from f32's when both are fed f32's continuation.
fn decode_against_f32(exact: &LoadedModel, decode: WeightFormat) -> (Vec<u32>, Vec<u32>, f64) {
    let path = kvmerger_engine::fetch::ensure_default_model().unwrap();
    let other = load_model(&path, WeightFormats { prefill: WeightFormat::F32, decode }).unwrap();
    let tokens = exact.tokenizer.encode(PROMPT, true).unwrap();
    let opts = ForwardOptions::default();
    let mut exact_cache = exact.model.new_cache();
    let agreement = compare_with_reference(&other.model, &tokens, 32, |input, _| {
        Ok(exact.model.forward(input, &mut exact_cache, opts)?.flatten_all()?.to_vec1()?)
    })
    .unwrap();
    let (mut a, mut b) = (exact.model.new_cache(), other.model.new_cache());
    exact.model.forward(&tokens, &mut a, opts).unwrap();
    other.model.forward(&tokens, &mut b, opts).unwrap();
    let step = |model: &kvmerger_engine::Llama, cache: &mut _, t: u32| -> Vec<f32> {
        model.forward(&[t], cache, opts).unwrap().flatten_all().unwrap().to_vec1().unwrap()
    };
    let total: f64 = agreement
        .reference
        .iter()
        .map(|&t| kl(&step(&exact.model, &mut a, t), &step(&other.model, &mut b, t)))
        .sum();
    (agreement.ours, agreement.reference, total / 32.0)
}

#[test]
fn kernel_decode_keeps_the_f32_paths_greedy_tokens() {
    let exact = f32_model();
    let (kernel, f32_tokens, kernel_kl) = decode_against_f32(&exact, WeightFormat::File);
    assert_eq!(kernel, f32_tokens, "greedy continuations differ");
    // Quantizing activations to 8 bits (as llama.cpp does) is the kernel's only loss; Q8_0
    // requantization adds rounding of the weights on top.
    let (_, _, q8_kl) = decode_against_f32(&exact, WeightFormat::Q8);
    assert!(kernel_kl < q8_kl, "mean KL {kernel_kl} nats/token, Q8_0 requantized {q8_kl}");
    eprintln!(
        "mean KL from f32 over 32 steps: kernel {kernel_kl:.2e}, Q8_0 {q8_kl:.2e} nats/token"
    );
}
