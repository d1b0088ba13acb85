//! Model hyper-parameters, read from the model file (never hard-coded).

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use serde::Deserialize;

use crate::error::{EngineError, Result};

/// Architectures whose forward pass this engine implements (Llama family).
pub const SUPPORTED_ARCHITECTURES: [&str; 3] = ["llama", "mistral", "qwen2"];

/// Longest context accepted from a model file (1M positions).
pub const MAX_CONTEXT: usize = 1 << 20;

/// Llama-3 style RoPE frequency scaling.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

/// Hyper-parameters of a Llama-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: String,
    pub n_layers: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rope_theta: f32,
    pub rms_norm_eps: f64,
    /// Longest sequence the model was trained for.
    pub context_length: usize,
    /// GGUF files from llama.cpp's converter rotate interleaved pairs `(2i, 2i+1)`;
    /// Hugging Face checkpoints (and NeoX-style GGUF architectures) rotate halves `(i, i + d/2)`.
    pub rope_interleaved: bool,
    pub rope_scaling: Option<Llama3RopeScaling>,
}

impl ModelConfig {
    /// Reads the configuration from GGUF metadata (`{arch}.block_count`, ...).
    pub fn from_gguf_metadata(md: &HashMap<String, Value>) -> Result<Self> {
        let arch =
            md.get("general.architecture").and_then(|v| v.to_string().ok()).cloned().ok_or_else(
                || EngineError::Config("GGUF metadata has no general.architecture".into()),
            )?;
        check_architecture(&arch)?;
        let get = |key: &str| -> Result<&Value> {
            md.get(&format!("{arch}.{key}"))
                .ok_or_else(|| EngineError::Config(format!("GGUF metadata lacks {arch}.{key}")))
        };
        let uint = |key: &str| -> Result<usize> {
            let v = get(key)?;
            v.to_u32()
                .map(|x| x as usize)
                .or_else(|_| v.to_u64().map(|x| x as usize))
                .map_err(|e| EngineError::Config(format!("{arch}.{key}: {e}")))
        };
        let float = |key: &str| -> Result<f32> {
            get(key)?.to_f32().map_err(|e| EngineError::Config(format!("{arch}.{key}: {e}")))
        };
        if md.get(&format!("{arch}.expert_count")).and_then(|v| v.to_u32().ok()).unwrap_or(0) > 1 {
            return Err(EngineError::Unsupported(
                "mixture-of-experts models are not supported".into(),
            ));
        }
        let hidden_size = uint("embedding_length")?;
        let n_heads = uint("attention.head_count")?;
        let n_kv_heads = uint("attention.head_count_kv").unwrap_or(n_heads);
        let head_dim = uint("rope.dimension_count").unwrap_or(hidden_size / n_heads.max(1));
        let vocab_size = md
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
            .map(|v| v.len())
            .ok_or_else(|| {
                EngineError::Config("GGUF metadata has no tokenizer.ggml.tokens".into())
            })?;
        let config = Self {
            rope_interleaved: arch != "qwen2",
            n_layers: uint("block_count")?,
            hidden_size,
            intermediate_size: uint("feed_forward_length")?,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab_size,
            rope_theta: float("rope.freq_base").unwrap_or(10_000.0),
            rms_norm_eps: float("attention.layer_norm_rms_epsilon").unwrap_or(1e-5) as f64,
            context_length: uint("context_length")?,
            rope_scaling: None,
            architecture: arch,
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        #[derive(Deserialize)]
        struct Hf {
            #[serde(default)]
            model_type: Option<String>,
            hidden_size: usize,
            intermediate_size: usize,
            num_hidden_layers: usize,
            num_attention_heads: usize,
            num_key_value_heads: Option<usize>,
            head_dim: Option<usize>,
            vocab_size: usize,
            rope_theta: Option<f32>,
            rms_norm_eps: Option<f64>,
            max_position_embeddings: usize,
            rope_scaling: Option<serde_json::Value>,
        }
        let hf: Hf = serde_json::from_str(text)
            .map_err(|e| EngineError::Config(format!("config.json: {e}")))?;
        let arch = hf.model_type.unwrap_or_else(|| "llama".into());
        check_architecture(&arch)?;
        let rope_scaling = match hf.rope_scaling {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => {
                let kind = v
                    .get("rope_type")
                    .or_else(|| v.get("type"))
                    .and_then(|t| t.as_str())
                    .unwrap_or("");
                if kind != "llama3" {
                    return Err(EngineError::Unsupported(format!("rope_scaling type `{kind}`")));
                }
                Some(
                    serde_json::from_value(v)
                        .map_err(|e| EngineError::Config(format!("rope_scaling: {e}")))?,
                )
            }
        };
        let config = Self {
            architecture: arch,
            n_layers: hf.num_hidden_layers,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            n_heads: hf.num_attention_heads,
            n_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            head_dim: hf.head_dim.unwrap_or(hf.hidden_size / hf.num_attention_heads.max(1)),
            vocab_size: hf.vocab_size,
            rope_theta: hf.rope_theta.unwrap_or(10_000.0),
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-5),
            context_length: hf.max_position_embeddings,
            rope_interleaved: false,
            rope_scaling,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(EngineError::Config(what.to_string()));
        if self.n_layers == 0 || self.n_heads == 0 || self.n_kv_heads == 0 || self.head_dim == 0 {
            return bad("layers, heads and head_dim must be positive");
        }
        // Bounded so that products of two sizes cannot overflow; the tensors' shapes are
        // checked against these values at load.
        let sizes = [
            ("layers", self.n_layers),
            ("hidden size", self.hidden_size),
            ("intermediate size", self.intermediate_size),
            ("heads", self.n_heads),
            ("kv heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("vocabulary", self.vocab_size),
        ];
        if let Some((name, value)) = sizes.iter().find(|(_, v)| *v > 1 << 24) {
            return Err(EngineError::Config(format!("{name} {value} is absurdly large")));
        }
        if !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad("attention heads must be a multiple of kv heads");
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad("head_dim must be even for RoPE");
        }
        // RoPE tables are precomputed for the whole context.
        if self.context_length == 0 || self.context_length > MAX_CONTEXT {
            return Err(EngineError::Config(format!(
                "context length {} is outside 1..={MAX_CONTEXT}",
                self.context_length
            )));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(EngineError::Config(format!(
                "rope theta {} is not positive",
                self.rope_theta
            )));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err(EngineError::Config(format!(
                "rms_norm_eps {} is invalid",
                self.rms_norm_eps
            )));
        }
        Ok(())
    }

    /// Query heads that share one kv head.
    pub fn group_size(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }
}

fn check_architecture(arch: &str) -> Result<()> {
    if SUPPORTED_ARCHITECTURES.contains(&arch) {
        Ok(())
    } else {
        Err(EngineError::Unsupported(format!(
            "architecture `{arch}` (supported: {})",
            SUPPORTED_ARCHITECTURES.join(", ")
        )))
    }
}
