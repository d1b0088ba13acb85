//! Model hyper-parameters, read from the model file (never hard-coded).

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use serde::Deserialize;

use crate::error::{EngineError, Result};

/// Architectures whose forward pass this engine implements: the Llama family and its
/// relatives with per-head q/k norms (Qwen3), post-norms, GELU and sliding windows (Gemma 3)
/// or fused projections (Phi-3).
pub const SUPPORTED_ARCHITECTURES: [&str; 6] =
    ["llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3"];

/// Architectures loaded from Hugging Face folders.
const HF_ARCHITECTURES: [&str; 3] = ["llama", "mistral", "qwen2"];

/// Gemma 3: every sixth layer attends to the whole context, the others to a window, unless
/// `{arch}.attention.sliding_window_pattern` says otherwise.
const GEMMA3_GLOBAL_EVERY: usize = 6;
/// Gemma 3's window layers rotate with this base unless `{arch}.rope.freq_base_swa` says
/// otherwise (llama.cpp's default too; converters write the global layers' base only).
const GEMMA3_LOCAL_ROPE_THETA: f32 = 10_000.0;

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

/// The MLP's activation of the gate projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    /// `SiLU(gate) * up` (Llama, Qwen, Phi-3).
    #[default]
    Silu,
    /// `GELU(gate) * up` with GELU's tanh approximation (Gemma).
    GeluTanh,
}

/// Sliding-window attention: a layer with a window lets the query at position `p` see the
/// keys at positions `p - size + 1 ..= p` only.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlidingWindow {
    pub size: usize,
    /// `Some(n)`: layers `n-1, 2n-1, ...` attend to everything, the others have the window
    /// (Gemma 3, n = 6); `None`: every layer has it (Mistral 7B v0.1).
    pub global_every: Option<usize>,
    /// RoPE base of the window layers (`None`: the model's `rope_theta`). Window layers use
    /// no frequency scaling.
    pub local_rope_theta: Option<f32>,
}

/// What sets an architecture apart from plain Llama, besides optional tensors (biases, q/k
/// norms, post-norms) that the loader finds in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct ArchFeatures {
    pub activation: Activation,
    /// Multiplies the token embeddings (Gemma: `sqrt(hidden)`).
    pub embed_scale: f32,
    /// Multiplies the queries before attention, whose own scale is `1/sqrt(head_dim)`.
    pub query_scale: f32,
    pub sliding_window: Option<SlidingWindow>,
    /// Multiplies positions before rotation (linear RoPE scaling: `1 / factor`).
    pub rope_freq_scale: f32,
    /// Multiplies the rotation's cos and sin (`rope.scaling.attn_factor`, Phi-3 LongRoPE).
    pub rope_attn_factor: f32,
    /// `[head_dim / 2]` divisors of the rotation frequencies read from the file (Llama 3's
    /// `rope_freqs`, Phi-3's short LongRoPE factors).
    pub rope_freq_factors: Option<Vec<f32>>,
}

impl Default for ArchFeatures {
    fn default() -> Self {
        Self {
            activation: Activation::Silu,
            embed_scale: 1.0,
            query_scale: 1.0,
            sliding_window: None,
            rope_freq_scale: 1.0,
            rope_attn_factor: 1.0,
            rope_freq_factors: None,
        }
    }
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
    pub features: ArchFeatures,
}

impl ModelConfig {
    /// Reads the configuration from GGUF metadata (`{arch}.block_count`, ...). Tensors
    /// that change the computation (RoPE frequency factors) are added by the loader.
    pub fn from_gguf_metadata(md: &HashMap<String, Value>) -> Result<Self> {
        let arch =
            md.get("general.architecture").and_then(|v| v.to_string().ok()).cloned().ok_or_else(
                || EngineError::Config("GGUF metadata has no general.architecture".into()),
            )?;
        check_architecture(&arch)?;
        let keys = Metadata { md, arch: &arch };
        if keys.uint_or("expert_count", 0)? > 1 {
            return Err(EngineError::Unsupported(
                "mixture-of-experts models are not supported".into(),
            ));
        }
        let hidden_size = keys.uint("embedding_length")?;
        let n_heads = keys.uint("attention.head_count")?;
        let n_kv_heads = keys.uint_or("attention.head_count_kv", n_heads)?;
        let head_dim = keys.uint_or("attention.key_length", hidden_size / n_heads.max(1))?;
        let value_dim = keys.uint_or("attention.value_length", head_dim)?;
        if value_dim != head_dim {
            return Err(keys.unsupported(
                "attention.value_length",
                format!("{value_dim} differs from the key length {head_dim}"),
            ));
        }
        let rotated = keys.uint_or("rope.dimension_count", head_dim)?;
        if rotated != head_dim {
            return Err(keys.unsupported(
                "rope.dimension_count",
                format!("partial rotation ({rotated} of {head_dim} dimensions)"),
            ));
        }
        let vocab_size = md
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
            .map(|v| v.len())
            .ok_or_else(|| {
                EngineError::Config("GGUF metadata has no tokenizer.ggml.tokens".into())
            })?;
        let n_layers = keys.uint("block_count")?;
        let config = Self {
            // llama.cpp's converter permutes Llama's q/k rows for interleaved pairs; the
            // other architectures keep Hugging Face's halves (NeoX style).
            rope_interleaved: matches!(arch.as_str(), "llama" | "mistral"),
            n_layers,
            hidden_size,
            intermediate_size: keys.uint("feed_forward_length")?,
            n_heads,
            n_kv_heads,
            head_dim,
            vocab_size,
            rope_theta: keys.float_or("rope.freq_base", 10_000.0)?,
            rms_norm_eps: keys.float_or("attention.layer_norm_rms_epsilon", 1e-5)? as f64,
            context_length: keys.uint("context_length")?,
            rope_scaling: None,
            features: keys.features(n_layers, hidden_size, n_heads, head_dim)?,
            architecture: arch.clone(),
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
        // Folders load the plain Llama layout only; the other architectures come as GGUF.
        if !HF_ARCHITECTURES.contains(&arch.as_str()) {
            return Err(EngineError::Unsupported(format!(
                "architecture `{arch}` in a Hugging Face folder (supported: {}; use a GGUF file)",
                HF_ARCHITECTURES.join(", ")
            )));
        }
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
            features: ArchFeatures::default(),
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
        if self.features.sliding_window.is_some_and(|w| w.size == 0 || w.global_every == Some(0)) {
            return bad("a sliding window must be positive");
        }
        let f = &self.features;
        if ![f.query_scale, f.embed_scale, f.rope_freq_scale, f.rope_attn_factor]
            .iter()
            .all(|x| x.is_finite() && *x > 0.0)
        {
            return bad("query, embedding and RoPE scales must be positive");
        }
        let local_theta = self.features.sliding_window.and_then(|w| w.local_rope_theta);
        if local_theta.is_some_and(|t| !(t.is_finite() && t > 0.0)) {
            return bad("the window layers' rope theta must be positive");
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err(EngineError::Config(format!(
                "rms_norm_eps {} is invalid",
                self.rms_norm_eps
            )));
        }
        Ok(())
    }

    /// Adds RoPE frequency divisors read from the file's tensor `tensor` (`[head_dim / 2]`).
    /// `short_context`: they are Phi-3's short LongRoPE factors, valid up to
    /// `{arch}.rope.scaling.original_context_length` positions, to which the context is cut
    /// (llama.cpp uses them likewise for contexts up to that length).
    pub fn set_rope_freq_factors(
        &mut self,
        tensor: &str,
        factors: Vec<f32>,
        md: &HashMap<String, Value>,
        short_context: bool,
    ) -> Result<()> {
        let bad = |reason: String| EngineError::Metadata { key: tensor.to_string(), reason };
        if factors.len() != self.head_dim / 2 {
            return Err(bad(format!("{} factors for head_dim {}", factors.len(), self.head_dim)));
        }
        if let Some(f) = factors.iter().find(|f| !(f.is_finite() && **f > 0.0)) {
            return Err(bad(format!("factor {f} is not positive")));
        }
        if short_context {
            let keys = Metadata { md, arch: &self.architecture };
            let original =
                keys.uint_or("rope.scaling.original_context_length", self.context_length)?;
            if original == 0 {
                return Err(keys.bad("rope.scaling.original_context_length", "must be positive"));
            }
            self.context_length = self.context_length.min(original);
        }
        self.features.rope_freq_factors = Some(factors);
        Ok(())
    }

    /// The attention window of `layer`, if it has one.
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        let w = self.features.sliding_window?;
        match w.global_every {
            Some(n) if (layer + 1).is_multiple_of(n) => None,
            _ => Some(w.size),
        }
    }

    /// Query heads that share one kv head.
    pub fn group_size(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }
}

/// Typed reads of `{arch}.*` GGUF keys; every error names the key.
struct Metadata<'a> {
    md: &'a HashMap<String, Value>,
    arch: &'a str,
}

impl Metadata<'_> {
    fn key(&self, key: &str) -> String {
        format!("{}.{key}", self.arch)
    }

    fn bad(&self, key: &str, reason: impl std::fmt::Display) -> EngineError {
        EngineError::Metadata { key: self.key(key), reason: reason.to_string() }
    }

    fn unsupported(&self, key: &str, what: impl std::fmt::Display) -> EngineError {
        EngineError::Unsupported(format!("{what} (GGUF key `{}`)", self.key(key)))
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.md.get(&self.key(key))
    }

    fn uint(&self, key: &str) -> Result<usize> {
        let v = self.get(key).ok_or_else(|| self.bad(key, "missing"))?;
        v.to_u32()
            .map(|x| x as usize)
            .or_else(|_| v.to_u64().map(|x| x as usize))
            .map_err(|e| self.bad(key, e))
    }

    fn uint_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.get(key) {
            None => Ok(default),
            Some(_) => self.uint(key),
        }
    }

    fn float_or(&self, key: &str, default: f32) -> Result<f32> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => {
                let x = v.to_f32().map_err(|e| self.bad(key, e))?;
                if x.is_finite() {
                    Ok(x)
                } else {
                    Err(self.bad(key, format!("{x} is not finite")))
                }
            }
        }
    }

    fn string(&self, key: &str) -> Result<Option<&str>> {
        self.get(key)
            .map(|v| v.to_string().map(String::as_str).map_err(|e| self.bad(key, e)))
            .transpose()
    }

    /// Activation, scales, windows and RoPE scaling of the architecture.
    fn features(
        &self,
        n_layers: usize,
        hidden: usize,
        n_heads: usize,
        head_dim: usize,
    ) -> Result<ArchFeatures> {
        let mut f = ArchFeatures::default();
        match self.string("rope.scaling.type")? {
            None | Some("none" | "linear") => {}
            Some(other) => {
                return Err(self.unsupported("rope.scaling.type", format!("RoPE scaling `{other}`")))
            }
        }
        if self.string("rope.scaling.type")? != Some("none") {
            let factor = self.float_or("rope.scaling.factor", 1.0)?;
            if factor <= 0.0 {
                return Err(self.bad("rope.scaling.factor", format!("{factor} is not positive")));
            }
            f.rope_freq_scale = 1.0 / factor;
        }
        f.rope_attn_factor = self.float_or("rope.scaling.attn_factor", 1.0)?;
        if f.rope_attn_factor <= 0.0 {
            return Err(self.bad("rope.scaling.attn_factor", "must be positive"));
        }
        let window = match self.uint_or("attention.sliding_window", 0)? {
            0 => None,
            size => Some(size),
        };
        match self.arch {
            "gemma3" => {
                f.activation = Activation::GeluTanh;
                f.embed_scale = (hidden as f32).sqrt();
                let every =
                    self.uint_or("attention.sliding_window_pattern", GEMMA3_GLOBAL_EVERY)?;
                let theta = self.float_or("rope.freq_base_swa", GEMMA3_LOCAL_ROPE_THETA)?;
                f.sliding_window = window.map(|size| SlidingWindow {
                    size,
                    global_every: Some(every),
                    local_rope_theta: Some(theta),
                });
                // Gemma 3 27B scales queries by 1/sqrt(hidden / heads) instead of
                // 1/sqrt(head_dim); llama.cpp recognises it by its 62 layers, as here.
                if n_layers == 62 {
                    f.query_scale = (head_dim as f32 / (hidden / n_heads) as f32).sqrt();
                }
            }
            // llama.cpp disables Phi-3's window (its converters record it inconsistently).
            "phi3" => {}
            _ => {
                f.sliding_window = window.map(|size| SlidingWindow {
                    size,
                    global_every: None,
                    local_rope_theta: None,
                })
            }
        }
        Ok(f)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal valid header of `arch` with `extra` `{arch}.*` keys.
    fn metadata(arch: &str, extra: &[(&str, Value)]) -> HashMap<String, Value> {
        let mut md = HashMap::new();
        md.insert("general.architecture".into(), Value::String(arch.into()));
        let sizes = [
            ("block_count", 12),
            ("embedding_length", 64),
            ("attention.head_count", 4),
            ("feed_forward_length", 128),
            ("context_length", 256),
        ];
        for (key, v) in sizes {
            md.insert(format!("{arch}.{key}"), Value::U32(v));
        }
        let tokens = vec![Value::String("a".into()); 10];
        md.insert("tokenizer.ggml.tokens".into(), Value::Array(tokens));
        for (key, v) in extra {
            md.insert(format!("{arch}.{key}"), v.clone());
        }
        md
    }

    #[test]
    fn gemma3_has_window_layers_with_their_own_base_and_every_sixth_global() {
        let md = metadata(
            "gemma3",
            &[
                ("attention.sliding_window", Value::U32(512)),
                ("attention.key_length", Value::U32(32)),
            ],
        );
        let c = ModelConfig::from_gguf_metadata(&md).unwrap();
        let windows: Vec<_> = (0..12).map(|l| c.layer_window(l)).collect();
        assert_eq!(windows.iter().filter(|w| w.is_none()).count(), 2);
        assert_eq!((windows[5], windows[11], windows[0]), (None, None, Some(512)));
        let f = &c.features;
        assert_eq!((f.activation, f.embed_scale, c.head_dim), (Activation::GeluTanh, 8.0, 32));
        assert_eq!(f.sliding_window.unwrap().local_rope_theta, Some(10_000.0));
        assert!(!c.rope_interleaved, "Gemma rotates halves");
    }

    #[test]
    fn rope_scaling_is_read_and_unsupported_kinds_name_their_key() {
        let linear = [
            ("rope.scaling.type", Value::String("linear".into())),
            ("rope.scaling.factor", Value::F32(4.0)),
        ];
        let c = ModelConfig::from_gguf_metadata(&metadata("llama", &linear)).unwrap();
        assert_eq!(c.features.rope_freq_scale, 0.25);
        let yarn = [("rope.scaling.type", Value::String("yarn".into()))];
        let err = ModelConfig::from_gguf_metadata(&metadata("qwen3", &yarn)).unwrap_err();
        assert!(
            matches!(&err, EngineError::Unsupported(m) if m.contains("`qwen3.rope.scaling.type`")),
            "{err}"
        );
        let zero = [("rope.scaling.factor", Value::F32(0.0))];
        let err = ModelConfig::from_gguf_metadata(&metadata("llama", &zero)).unwrap_err();
        assert!(
            matches!(&err, EngineError::Metadata { key, .. } if key == "llama.rope.scaling.factor"),
            "{err}"
        );
        let partial = [("rope.dimension_count", Value::U32(8))];
        let err = ModelConfig::from_gguf_metadata(&metadata("phi3", &partial)).unwrap_err();
        assert!(err.to_string().contains("phi3.rope.dimension_count"), "{err}");
        let text = [("rope.freq_base", Value::String("1e6".into()))];
        let err = ModelConfig::from_gguf_metadata(&metadata("qwen3", &text)).unwrap_err();
        assert!(
            matches!(&err, EngineError::Metadata { key, .. } if key == "qwen3.rope.freq_base"),
            "{err}"
        );
        let missing = metadata("llama", &[]).into_iter().filter(|(k, _)| k != "llama.block_count");
        let err = ModelConfig::from_gguf_metadata(&missing.collect()).unwrap_err();
        assert!(
            matches!(&err, EngineError::Metadata { key, .. } if key == "llama.block_count"),
            "{err}"
        );
    }

    #[test]
    fn rope_factors_are_checked_and_short_longrope_factors_cut_the_context() {
        let md = metadata("phi3", &[("rope.scaling.original_context_length", Value::U32(64))]);
        let mut c = ModelConfig::from_gguf_metadata(&md).unwrap();
        let name = "rope_factors_short.weight";
        let err = c.set_rope_freq_factors(name, vec![1.0; 3], &md, true).unwrap_err();
        assert!(matches!(&err, EngineError::Metadata { key, .. } if key == name), "{err}");
        let err = c.set_rope_freq_factors(name, vec![-1.0; 8], &md, true).unwrap_err();
        assert!(err.to_string().contains(name), "{err}");
        c.set_rope_freq_factors(name, vec![2.0; 8], &md, true).unwrap();
        assert_eq!(c.context_length, 64);
        assert_eq!(c.features.rope_freq_factors.as_deref(), Some(&[2.0; 8][..]));
    }
}
