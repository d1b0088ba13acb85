//! Flags shared by several subcommands: which model, which method.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use kvmerger_compress::{Budget, CompressionConfig};
use kvmerger_engine::{LoadedModel, WeightFormat, WeightFormats};

/// Which model to load and how to store its weights.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A GGUF file or a Hugging Face folder (config.json, *.safetensors, tokenizer.json).
    /// Or a known model's name (smollm2-135m, qwen2.5-coder-0.5b), fetched into the cache
    /// folder on first use. Default: smollm2-135m.
    #[arg(long, env = "KVMERGER_MODEL")]
    pub model: Option<PathBuf>,
    /// Weight format of multi-token forward passes (prefill).
    #[arg(long, default_value = "f32")]
    pub prefill_weights: WeightFormat,
    /// Weight format of single-token forward passes (decode): q8 (requantized to Q8_0),
    /// quantized (the file's format) or f32. Default: the fastest measured for a known model
    /// (q8 for smollm2-135m, f32 for qwen2.5-coder-0.5b), else q8.
    #[arg(long)]
    pub decode_weights: Option<WeightFormat>,
}

impl ModelArgs {
    pub fn formats(&self, path: &std::path::Path) -> WeightFormats {
        let decode =
            self.decode_weights.unwrap_or_else(|| kvmerger_engine::fetch::decode_format_for(path));
        WeightFormats { prefill: self.prefill_weights, decode }
    }

    pub fn load(&self) -> Result<LoadedModel> {
        let path = kvmerger_engine::fetch::resolve_model(self.model.as_deref())
            .context("finding the model")?;
        kvmerger_engine::load_model(&path, self.formats(&path))
            .with_context(|| format!("loading {}", path.display()))
    }
}

/// Which compression method to apply, with its parameters.
#[derive(Debug, Clone, Args)]
pub struct MethodArgs {
    /// full, streaming_llm, h2o, snapkv, cam or kvmerger.
    #[arg(long, default_value = "full")]
    pub method: String,
    /// Entries each head keeps: a ratio (0.35, 35%) or a token count (512).
    #[arg(long)]
    pub budget: Option<Budget>,
    /// A method parameter, `name=value` (repeatable), e.g. `-p threshold=0.8 -p mass=log_count`.
    #[arg(short = 'p', long = "param", value_parser = parse_key_value)]
    pub params: Vec<(String, String)>,
    /// A JSON file holding a whole method configuration (overrides the flags above).
    #[arg(long)]
    pub method_config: Option<PathBuf>,
}

impl MethodArgs {
    pub fn config(&self) -> Result<CompressionConfig> {
        if let Some(path) = &self.method_config {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            return Ok(CompressionConfig::from_json(&text)?);
        }
        Ok(CompressionConfig::from_cli(&self.method, self.budget, &self.params)?)
    }
}

fn parse_key_value(s: &str) -> Result<(String, String)> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => bail!("expected name=value, got `{s}`"),
    }
}
