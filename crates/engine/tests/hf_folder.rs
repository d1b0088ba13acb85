//! A Hugging Face folder (config.json, safetensors, tokenizer.json) loads, and its forward
//! agrees with candle-transformers' `llama` (half-split RoPE, untied head, llama3 scaling).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::llama as reference;
use kvmerger_compress::KvDtype;
use kvmerger_engine::testing::{forward, relative_l2, ForwardOptions};
use kvmerger_engine::{load_model, Phase, WeightFormats};

const CONFIG: &str = r#"{
  "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "vocab_size": 64,
  "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
  "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 128,
  "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2,
  "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
}"#;

fn write_folder() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kvmerger-hf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), CONFIG).unwrap();
    let dev = Device::Cpu;
    let mut t = HashMap::new();
    let mut add = |name: String, shape: (usize, usize), scale: f64| {
        let w = (Tensor::randn(0f32, 1.0, shape, &dev).unwrap() * scale).unwrap();
        t.insert(name, w);
    };
    add("model.embed_tokens.weight".into(), (64, 32), 1.0);
    add("lm_head.weight".into(), (64, 32), 0.2);
    for l in 0..2 {
        let p = format!("model.layers.{l}");
        add(format!("{p}.self_attn.q_proj.weight"), (32, 32), 0.5);
        add(format!("{p}.self_attn.k_proj.weight"), (16, 32), 0.5);
        add(format!("{p}.self_attn.v_proj.weight"), (16, 32), 0.2);
        add(format!("{p}.self_attn.o_proj.weight"), (32, 32), 0.2);
        add(format!("{p}.mlp.gate_proj.weight"), (64, 32), 0.2);
        add(format!("{p}.mlp.up_proj.weight"), (64, 32), 0.2);
        add(format!("{p}.mlp.down_proj.weight"), (32, 64), 0.1);
    }
    for name in ["model.norm.weight".to_string()].into_iter().chain((0..2).flat_map(|l| {
        [
            format!("model.layers.{l}.input_layernorm.weight"),
            format!("model.layers.{l}.post_attention_layernorm.weight"),
        ]
    })) {
        t.insert(
            name,
            (Tensor::rand(0.5f32, 1.5, 32, &dev).unwrap()).to_dtype(DType::F32).unwrap(),
        );
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    let vocab: Vec<String> = (0..64).map(|i| format!("\"w{i}\": {i}")).collect();
    let tokenizer = format!(
        r#"{{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
            "pre_tokenizer": {{"type": "Whitespace"}}, "post_processor": null, "decoder": null,
            "model": {{"type": "WordLevel", "vocab": {{{}}}, "unk_token": "w0"}}}}"#,
        vocab.join(", ")
    );
    std::fs::write(dir.join("tokenizer.json"), tokenizer).unwrap();
    dir
}

#[test]
fn hf_folder_matches_candle_transformers_llama() {
    let dir = write_folder();
    let mut ours = load_model(&dir, WeightFormats::default()).unwrap();
    // An f32 reference at 1e-4 is compared with an f32 cache.
    ours.model.kv_dtype = KvDtype::F32;
    let tokens = ours
        .tokenizer
        .encode("w5 w9 w12 w3 w40 w41 w7 w63 w2 w18 w33 w21 w8 w9 w10 w11 w5 w50 w51 w52", false)
        .unwrap();
    assert_eq!(tokens.len(), 20);
    assert_eq!(tokens[..3], [5, 9, 12]);
    let mut cache = ours.model.new_cache();
    let a: Vec<f32> =
        forward(&ours.model, Phase::Prefill, &tokens, &mut cache, ForwardOptions::default())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();

    let cfg: reference::LlamaConfig = serde_json::from_str(CONFIG).unwrap();
    let cfg = cfg.into_config(false);
    let dev = Device::Cpu;
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &dev,
        )
        .unwrap()
    };
    let model = reference::Llama::load(vb, &cfg).unwrap();
    let mut rc = reference::Cache::new(true, DType::F32, &cfg, &dev).unwrap();
    let input = Tensor::new(tokens.as_slice(), &dev).unwrap().unsqueeze(0).unwrap();
    let b: Vec<f32> =
        model.forward(&input, 0, &mut rc).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let err = relative_l2(&a, &b);
    assert!(err < 1e-4, "relative L2 {err}");
}

#[test]
fn hf_folder_without_weights_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("kvmerger-hf-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), CONFIG).unwrap();
    let err = load_model(&dir, WeightFormats::default()).unwrap_err();
    assert!(err.to_string().contains("safetensors"), "{err}");
}
