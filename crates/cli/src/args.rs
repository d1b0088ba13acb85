//! Flags shared by several subcommands, named as in llama.cpp where it has them: which model
//! (`-m`), how many threads (`-t`), the context limit (`-c`), sampling (`-n`, `--top-k`, ...)
//! and the compression method (`--method`, `--budget`, `-P`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use kvmerger_compress::{Budget, CompressionConfig, KvDtype};
use kvmerger_engine::{
    check_prompt, check_sampling, resolve_max_tokens, LoadedModel, PrefillCompression,
    PrefillOptions, RequestError, RequestField, RequestLimits, SamplingConfig, WeightFormat,
    WeightFormats,
};

/// Which model file, and how many threads compute with it.
#[derive(Debug, Clone, Args)]
pub struct ModelSource {
    /// A GGUF file or a Hugging Face folder (config.json, *.safetensors, tokenizer.json).
    /// Or a known model's name (smollm2-135m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b,
    /// gemma3-270m), fetched into the cache folder on first use. Default: smollm2-135m.
    #[arg(short = 'm', long, env = "KVMERGER_MODEL", value_name = "PATH|NAME")]
    pub model: Option<PathBuf>,
    /// Threads of the compute pools (rayon's global pool and candle's matrix products).
    /// 0: $RAYON_NUM_THREADS if set, else one per physical core.
    #[arg(short = 't', long, default_value_t = 0, value_name = "N")]
    pub threads: usize,
    /// How the KV cache stores keys and values: f16, bf16, f32, llama.cpp's q8_0 and q4_0
    /// blocks (32 elements and an f16 scale; heads a multiple of 32 wide) over each head's
    /// keys minus a fixed key center, or q8_0r and q4_0r, the same blocks of
    /// Hadamard-rotated keys and values; a `u` suffix (q8_0u, q4_0ru, ...) stores the keys
    /// uncentered, as llama.cpp does. A name means the same here, in sweep specs and in
    /// reports. Attention and compression compute in f32 whatever is stored.
    #[arg(long, default_value_t = KvDtype::F16, value_name = "DTYPE")]
    pub kv_dtype: KvDtype,
    /// Shorthand for the rotated form of a quantized --kv-dtype: `--kv-dtype q4_0
    /// --kv-rotate` is q4_0r (queries rotated to match, outputs rotated back: attention is
    /// unchanged in exact arithmetic, outlier channels spread before quantization).
    #[arg(long)]
    pub kv_rotate: bool,
    /// Whether a quantized --kv-dtype stores the keys centered: `--kv-dtype q8_0 --kv-center
    /// off` is q8_0u. The name decides when this is not given (the plain names center).
    #[arg(long, value_name = "on|off", value_parser = clap::builder::BoolishValueParser::new())]
    pub kv_center: Option<bool>,
}

impl ModelSource {
    /// Sizes the thread pools, then returns the model's path (fetching a known model, or the
    /// default one if none was given). Call before any computation: rayon's global pool is
    /// built once.
    pub fn prepare(&self) -> Result<PathBuf> {
        set_threads(self.threads)?;
        // clap fills --model from the environment: say so when that is where it came from.
        let from_env = self.model.is_some()
            && std::env::var_os("KVMERGER_MODEL").map(PathBuf::from) == self.model;
        kvmerger_models::resolve_model(self.model.as_deref()).with_context(|| {
            if from_env {
                "finding the model named by $KVMERGER_MODEL"
            } else {
                "finding the model"
            }
        })
    }

    /// Loads the model at `path` (from [`Self::prepare`]) in `formats`, its caches in
    /// `--kv-dtype`.
    pub fn load(&self, path: &std::path::Path, formats: WeightFormats) -> Result<LoadedModel> {
        let mut loaded = kvmerger_models::load_model(path, formats)
            .with_context(|| format!("loading {}", path.display()))?;
        let dtype = self.kv_dtype()?;
        dtype.check_head_dim(loaded.model.config.head_dim)?;
        loaded.model.kv_dtype = dtype;
        Ok(loaded)
    }

    /// `--kv-dtype`, rotated where `--kv-rotate` asks and its keys centered or not as
    /// `--kv-center` says (only a quantized cache rotates or centers).
    pub fn kv_dtype(&self) -> Result<KvDtype> {
        let dtype = self.kv_dtype;
        let center = self.kv_center.unwrap_or(dtype.centered());
        if !dtype.is_quantized() && (self.kv_rotate || center) {
            let what = if self.kv_rotate { "--kv-rotate rotates" } else { "--kv-center centers" };
            bail!("{what} a quantized cache (q8_0 or q4_0); --kv-dtype is {dtype}");
        }
        Ok(dtype.quantized_as(self.kv_rotate || dtype.rotated(), center))
    }
}

/// Sets the size of rayon's global pool and of candle's pool (which reads `RAYON_NUM_THREADS`
/// when first used); 0 keeps their defaults.
pub(crate) fn set_threads(threads: usize) -> Result<()> {
    if threads == 0 {
        return Ok(());
    }
    // Still single-threaded here: nothing has started a pool yet.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .context("--threads: rayon's global thread pool was already started")
}

/// How a prompt is prefilled: the chunked prefill `serve` runs, in every command.
#[derive(Debug, Clone, Args)]
pub struct PrefillArgs {
    /// When the prompt is compressed: `once` (after the whole prompt is prefilled; the
    /// cache holds the whole prompt first) or `incremental` (during the chunked prefill,
    /// whenever the next chunk would not fit beside the budget, so a head holds at most
    /// its budget plus one chunk). A method that cannot compress incrementally says why.
    #[arg(long, default_value = "once", value_name = "once|incremental")]
    pub prefill_compression: PrefillCompression,
    /// Prompt tokens per prefill forward pass.
    #[arg(long, default_value_t = PrefillOptions::default().chunk, value_name = "N")]
    pub prefill_chunk: usize,
}

impl PrefillArgs {
    pub fn options(&self) -> Result<PrefillOptions> {
        if self.prefill_chunk == 0 {
            bail!("--prefill-chunk must be at least 1");
        }
        Ok(PrefillOptions {
            chunk: self.prefill_chunk,
            compression: self.prefill_compression,
            ..PrefillOptions::default()
        })
    }
}

/// A bound on the cache while generating.
#[derive(Debug, Clone, Args)]
pub struct MaxKvArgs {
    /// Entries (tokens) a head may hold while decoding, so a long generation runs in
    /// constant memory: eviction methods evict by their own score, KVMerger merges the
    /// older unprotected entries; a method with no rule for decoded entries (the full
    /// cache, SnapKV) is refused. Not applied to the full-cache reference of `eval`.
    #[arg(long, value_name = "N")]
    pub max_kv: Option<usize>,
}

impl MaxKvArgs {
    pub fn bound(&self) -> Result<Option<usize>> {
        kvmerger_engine::check_max_kv(self.max_kv).map_err(flag_error)?;
        Ok(self.max_kv)
    }
}

/// Which model to load, how many threads run it, and how to store its weights.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    #[command(flatten)]
    pub source: ModelSource,
    /// Weight format of multi-token forward passes (prefill): file (the file's blocks,
    /// dequantized a tile at a time into an f32 product), f32 (an f32 copy of every weight
    /// made at load: the exact reference), q8 or quantized (as for decode). Default: file.
    #[arg(long)]
    pub prefill_weights: Option<WeightFormat>,
    /// Weight format of single-token forward passes (decode): file (the file's Q4_0, Q4_1,
    /// Q5_0, Q8_0, Q4_K, Q5_K and Q6_K blocks on our kernel, other types requantized to
    /// Q8_0), q8 (requantized to Q8_0 on candle's kernel), quantized (the file's format on
    /// candle's kernel) or f32. Default: the fastest measured for a known model (file for
    /// both), else file.
    #[arg(long)]
    pub decode_weights: Option<WeightFormat>,
}

impl ModelArgs {
    pub fn formats(&self, path: &std::path::Path) -> WeightFormats {
        let decode =
            self.decode_weights.unwrap_or_else(|| kvmerger_models::decode_format_for(path));
        let prefill = self.prefill_weights.unwrap_or(WeightFormats::default().prefill);
        WeightFormats { prefill, decode }
    }

    /// Sizes the thread pools and loads the model.
    pub fn load(&self) -> Result<LoadedModel> {
        let path = self.source.prepare()?;
        self.source.load(&path, self.formats(&path))
    }
}

/// The context limit of one sequence (prompt plus generated tokens).
#[derive(Debug, Clone, Args)]
pub struct ContextArgs {
    /// Most tokens of a sequence, prompt plus generated; 0: the model's context length.
    #[arg(short = 'c', long, default_value_t = 0, value_name = "N")]
    pub ctx_size: usize,
}

impl ContextArgs {
    /// The limit in tokens for a model whose context length is `model_context`.
    pub fn limit(&self, model_context: usize) -> Result<usize> {
        match self.ctx_size {
            0 => Ok(model_context),
            n if n > model_context => {
                bail!("--ctx-size {n} exceeds the model's context length {model_context}")
            }
            n => Ok(n),
        }
    }
}

/// Tokens `generate` makes when `-n` is not given.
const DEFAULT_MAX_TOKENS: usize = 128;

/// How generated tokens are chosen.
#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// Most tokens to generate; more than the context leaves after the prompt is an error.
    /// Default: 128, or what the context leaves if less.
    #[arg(short = 'n', long, value_name = "N")]
    pub max_tokens: Option<usize>,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, value_parser = finite_f32, allow_hyphen_values = true)]
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass, in (0, 1].
    #[arg(long, default_value_t = 1.0, value_parser = finite_f32, allow_hyphen_values = true)]
    pub top_p: f32,
    /// Keep only the k most likely tokens before sampling; 0 keeps all.
    #[arg(long, default_value_t = 0, value_name = "K")]
    pub top_k: usize,
    /// Divide the positive logits (multiply the negative ones) of recently seen tokens by
    /// this; 1 is off.
    #[arg(long, default_value_t = 1.0, value_parser = finite_f32, allow_hyphen_values = true)]
    pub repeat_penalty: f32,
    /// How many of the last tokens (prompt included) the repeat penalty looks at.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub repeat_last_n: usize,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl SamplingArgs {
    /// Checks the encoded prompt and returns the tokens to generate after it: `-n` if it
    /// fits, else an error; the server's rules (see [`kvmerger_engine::GenerationRequest`]).
    pub fn max_tokens(&self, prompt: &[u32], limits: &RequestLimits) -> Result<usize> {
        check_prompt(prompt, limits).map_err(flag_error)?;
        resolve_max_tokens(self.max_tokens, DEFAULT_MAX_TOKENS, prompt.len(), limits)
            .map_err(flag_error)
    }

    /// The sampler's configuration, checked by the server's rules; errors name the flag.
    pub fn config(&self) -> Result<SamplingConfig> {
        let config = SamplingConfig {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed: self.seed,
        };
        check_sampling(&config).map_err(flag_error)?;
        Ok(config)
    }
}

/// A refused request in the words of the command line: the reason after the field's flag
/// (the prompt's reasons name it already).
pub fn flag_error(e: RequestError) -> anyhow::Error {
    let RequestError::Invalid { field, reason } = e else { return e.into() };
    let flag = match field {
        RequestField::Prompt => return anyhow::anyhow!("{reason}"),
        RequestField::MaxTokens => "-n/--max-tokens",
        RequestField::Temperature => "--temperature",
        RequestField::TopP => "--top-p",
        RequestField::RepeatPenalty => "--repeat-penalty",
        RequestField::MaxKv => "--max-kv",
        RequestField::PrefillCompression => "--prefill-compression",
        RequestField::KvDtype => "--kv-dtype",
    };
    anyhow::anyhow!("{flag} {reason}")
}

/// Which compression method to apply, with its parameters.
///
/// With `--method-config`, the file gives the configuration and `--budget` and `-P` then
/// override its fields; `--method` cannot be combined with it (the file names the method).
#[derive(Debug, Clone, Args)]
pub struct MethodArgs {
    /// `full` (no compression) or a compression method: `kvmerger methods` lists every one
    /// with its parameters.
    #[arg(long, default_value = "full", conflicts_with = "method_config")]
    pub method: String,
    /// Entries each head keeps: a ratio (0.35, 35%, 1 = everything) or a token count (512t).
    /// Default: the method's own (50%).
    #[arg(long, allow_hyphen_values = true)]
    pub budget: Option<Budget>,
    /// A method parameter, `name=value` (repeatable), e.g. `-P recent=0.1 -P sigma=adaptive`.
    /// A parameter the chosen mode does not read is an error.
    #[arg(short = 'P', long = "param", value_name = "NAME=VALUE", value_parser = parse_key_value)]
    pub params: Vec<(String, String)>,
    /// A JSON file holding a whole method configuration; `--budget` and `-P` override its
    /// fields.
    #[arg(long, value_name = "FILE")]
    pub method_config: Option<PathBuf>,
}

impl MethodArgs {
    pub fn config(&self) -> Result<CompressionConfig> {
        match &self.method_config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                let base = CompressionConfig::from_json(&text)
                    .with_context(|| format!("--method-config {}", path.display()))?;
                Ok(base.with_overrides(self.budget, &self.params)?)
            }
            None => Ok(CompressionConfig::from_cli(&self.method, self.budget, &self.params)?),
        }
    }
}

fn parse_key_value(s: &str) -> Result<(String, String)> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
        _ => bail!("expected name=value, got `{s}`"),
    }
}

/// A float flag's value: any finite number (NaN and infinities are refused).
pub fn finite_f32(s: &str) -> Result<f32> {
    let x: f32 = s.trim().parse().with_context(|| format!("`{s}` is not a number"))?;
    if !x.is_finite() {
        bail!("must be a finite number, got `{s}`");
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        source: ModelSource,
    }

    fn kv_dtype(args: &[&str]) -> Result<KvDtype> {
        let cli = Cli::try_parse_from(std::iter::once("kvmerger").chain(args.iter().copied()))?;
        cli.source.kv_dtype()
    }

    /// One rule everywhere: a dtype's name is what `--kv-dtype` takes, what a sweep spec
    /// and a result row hold, and what reports print; `--kv-rotate` and `--kv-center` only
    /// spell the rotated and (un)centered names another way.
    #[test]
    fn a_kv_dtype_name_means_one_storage_everywhere() {
        for d in KvDtype::ALL {
            assert_eq!(kv_dtype(&["--kv-dtype", d.name()]).unwrap(), d);
            assert_eq!(serde_json::from_str::<KvDtype>(&format!("\"{d}\"")).unwrap(), d);
            assert_eq!(d.to_string(), d.name());
        }
        assert_eq!(kv_dtype(&[]).unwrap(), KvDtype::F16);
        assert!(!kv_dtype(&["--kv-dtype", "q4_0"]).unwrap().rotated(), "plain llama.cpp blocks");
        for (plain, rotated) in [("q8_0", KvDtype::Q8_0Rotated), ("q4_0", KvDtype::Q4_0Rotated)] {
            assert_eq!(kv_dtype(&["--kv-dtype", plain, "--kv-rotate"]).unwrap(), rotated);
            let named = format!("{plain}r");
            assert_eq!(kv_dtype(&["--kv-dtype", &named, "--kv-rotate"]).unwrap(), rotated);
        }
        let err = kv_dtype(&["--kv-dtype", "f16", "--kv-rotate"]).unwrap_err().to_string();
        assert!(err.contains("--kv-rotate") && err.contains("f16"), "{err}");
        assert!(kv_dtype(&["--kv-dtype", "q4_0", "--kv-rotate", "false"]).is_err());
        let centered = |args: &[&str]| kv_dtype(args).unwrap().name();
        assert_eq!(centered(&["--kv-dtype", "q8_0", "--kv-center", "off"]), "q8_0u");
        assert_eq!(
            centered(&["--kv-dtype", "q4_0", "--kv-rotate", "--kv-center", "off"]),
            "q4_0ru"
        );
        assert_eq!(centered(&["--kv-dtype", "q8_0ru", "--kv-center", "on"]), "q8_0r");
        assert_eq!(centered(&["--kv-dtype", "q4_0u", "--kv-rotate"]), "q4_0ru");
        let err = kv_dtype(&["--kv-dtype", "bf16", "--kv-center", "on"]).unwrap_err().to_string();
        assert!(err.contains("--kv-center") && err.contains("bf16"), "{err}");
        assert_eq!(kv_dtype(&["--kv-dtype", "f32", "--kv-center", "off"]).unwrap(), KvDtype::F32);
    }
}
