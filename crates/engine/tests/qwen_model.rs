//! Qwen2.5-Coder-0.5B-Instruct (qwen2: half-split RoPE, q/k/v biases, tied embeddings,
//! Qwen2 pre-tokenizer) against candle-transformers' `quantized_qwen2` on the same file.
//!
//! Ignored by default: the model is a 491 MB download (`kvmerger fetch --model
//! qwen2.5-coder-0.5b`). Run with `cargo test --release -p kvmerger-engine --test
//! qwen_model -- --ignored`.

mod common;

use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_qwen2;
use kvmerger_compress::KvCache;
use kvmerger_engine::testing::{compare_prefill, compare_with_reference, forward, ForwardOptions};
use kvmerger_engine::{argmax, load_model, LoadedModel, Phase, WeightFormat, WeightFormats};
use kvmerger_models::{ChatMessage, ChatTemplate};

fn qwen_path() -> std::path::PathBuf {
    let model = kvmerger_models::known_model("qwen2.5-coder-0.5b").unwrap();
    kvmerger_models::ensure_known_model(model, &kvmerger_models::cache_dir())
        .expect("the Qwen model")
}

fn greedy(m: &LoadedModel, prompt: &[u32], steps: usize) -> Vec<u32> {
    let mut cache: KvCache = m.model.new_cache();
    let mut logits =
        forward(&m.model, Phase::Prefill, prompt, &mut cache, ForwardOptions::default()).unwrap();
    let mut out = Vec::new();
    for _ in 0..steps {
        let next = argmax(&logits.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        if m.tokenizer.eos_ids().contains(&next) {
            break;
        }
        out.push(next);
        logits = forward(&m.model, Phase::Decode, &[next], &mut cache, ForwardOptions::default())
            .unwrap();
    }
    out
}

#[test]
#[ignore = "needs the 491 MB Qwen2.5-Coder-0.5B model"]
fn qwen_logits_agree_with_candle_transformers() {
    let path = qwen_path();
    let f32_only = WeightFormats { prefill: WeightFormat::F32, decode: WeightFormat::F32 };
    let mut ours = load_model(&path, f32_only).unwrap();
    // Compared with an f32 reference: an f32 cache.
    ours.model.kv_dtype = kvmerger_compress::KvDtype::F32;
    assert_eq!(ours.model.config.architecture, "qwen2");
    assert!(!ours.model.config.rope_interleaved, "qwen2 rotates halves");
    assert!(
        ours.model.blocks[0]
            .wq
            .forward_as(
                &Tensor::zeros((1, 896), candle_core::DType::F32, &Device::Cpu).unwrap(),
                WeightFormat::F32,
                kvmerger_kernels::Product::Dense,
            )
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0,
        "the q projection carries its bias"
    );

    let text = "def quicksort(xs):\n    \"\"\"Sort a list.\"\"\"\n    if len(xs) <= 1:\n        return xs\n";
    let tokens = ours.tokenizer.encode(text, true).unwrap();
    // quantized_qwen2 reads this on the loading thread to dequantize every weight to f32.
    std::env::set_var("CANDLE_DEQUANTIZE_ALL", "1");
    let (content, mut reader) = kvmerger_engine::read_gguf_header(&path).unwrap();
    let mut reference =
        quantized_qwen2::ModelWeights::from_gguf(content, &mut reader, &Device::Cpu).unwrap();
    let agreement = compare_with_reference(&ours.model, &tokens, 12, |input, position| {
        let input = Tensor::new(input, &Device::Cpu)?.unsqueeze(0)?;
        Ok(reference.forward(&input, position)?.flatten_all()?.to_vec1()?)
    })
    .unwrap();
    // Cross-path (the same f32 arithmetic in another order): bounded, not bit-exact.
    eprintln!("qwen2 f32 against candle-transformers: {agreement}");
    assert!(agreement.logits_error < 1e-3, "{agreement}");
    assert!(agreement.mean_kl < 1e-5 && agreement.top1_agreement >= 0.9, "{agreement}");
}

#[test]
#[ignore = "needs the 491 MB Qwen2.5-Coder-0.5B model"]
fn qwen_generates_code_in_chat_and_raw_modes() {
    let m = load_model(&qwen_path(), WeightFormats::default()).unwrap();
    let template = ChatTemplate::for_tokenizer(&m.tokenizer).unwrap();
    let chat = template
        .render(
            &[ChatMessage::user("Write a Python function `add(a, b)` that returns a + b.")],
            true,
        )
        .unwrap();
    assert!(chat.contains("<|im_start|>assistant"), "{chat}");
    let ids = m.tokenizer.encode(&chat, true).unwrap();
    let reply = m.tokenizer.decode(&greedy(&m, &ids, 40)).unwrap();
    assert!(reply.contains("def add(a, b)") && reply.contains("return a + b"), "{reply}");

    let ids =
        m.tokenizer.encode("# Return the n-th Fibonacci number\ndef fib(n):\n", true).unwrap();
    let body = m.tokenizer.decode(&greedy(&m, &ids, 30)).unwrap();
    assert!(body.contains("if n") && body.contains("return"), "{body}");
}

#[test]
#[ignore = "needs the 491 MB Qwen2.5-Coder-0.5B model"]
fn qwen_token_ids_match_the_python_tokenizers_package() {
    let path = qwen_path();
    let (content, _) = kvmerger_engine::read_gguf_header(&path).unwrap();
    let tok =
        kvmerger_engine::tokenizer::TextTokenizer::from_gguf_metadata(&content.metadata).unwrap();
    let texts = [
        "def f(x):\n    return x**2  # square\n\n",
        "Hello, 世界! 12345 café  tabs\tand\r\nCRLF",
        "<|im_start|>user\nhi<|im_end|>",
        "   leading and trailing   ",
        "I'm sure they'll say it's done; WE'RE done.",
        "Emoji 🎉🚀 and 👨‍👩‍👧, 日本語のテキスト",
    ];
    let python = common::python_ids(&path, &texts);
    for (text, expected) in texts.iter().zip(python) {
        assert_eq!(tok.encode(text, false).unwrap(), expected, "{text:?}");
    }
}

/// Qwen's Q5_0, Q8_0, Q4_K and Q6_K blocks as the file stores them against the f32 path:
/// the prefill (a dequantized tile at a time into an f32 product) at every prompt position,
/// then 16 decode steps on the block kernels (8-bit activations). Bounds: about a thousand
/// times the measured prefill KL (6e-12 at level avx2), 40 times the decode KL (1.1e-4).
#[test]
#[ignore = "needs the 491 MB Qwen2.5-Coder-0.5B model"]
fn qwen_file_blocks_stay_close_to_the_f32_path() {
    let path = qwen_path();
    let mut exact =
        load_model(&path, WeightFormats { prefill: WeightFormat::F32, decode: WeightFormat::F32 })
            .unwrap();
    let file = WeightFormats { prefill: WeightFormat::File, decode: WeightFormat::File };
    let mut ours = load_model(&path, file).unwrap();
    exact.model.kv_dtype = kvmerger_compress::KvDtype::F32;
    ours.model.kv_dtype = kvmerger_compress::KvDtype::F32;
    let level = kvmerger_engine::KernelLevel::active();
    let text = "def quicksort(items):\n    \"\"\"Sort a list of numbers in place and return it, \
                recursing on the items below and above a pivot.\"\"\"\n    if len(items) <= 1:\n";
    let tokens = ours.tokenizer.encode(text, false).unwrap();
    assert!(tokens.len() >= 36, "a prefill of many rows: {} tokens", tokens.len());
    let prefill = compare_prefill(&ours.model, &exact.model, &tokens).unwrap();
    eprintln!("Qwen file prefill against f32 ({level} kernels): {prefill}");
    assert!(prefill.mean_kl < 1e-8 && prefill.max_kl < 1e-7, "{prefill}");
    let mut exact_cache = exact.model.new_cache();
    let decode = compare_with_reference(&ours.model, &tokens, 16, |input, _| {
        let options = ForwardOptions::default();
        let logits = forward(&exact.model, Phase::Prefill, input, &mut exact_cache, options)?;
        Ok(logits.flatten_all()?.to_vec1()?)
    })
    .unwrap();
    eprintln!("Qwen file decode against f32 ({level} kernels): {decode}");
    assert!(decode.mean_kl < 5e-3 && decode.top1_agreement >= 0.8, "{decode}");
}
