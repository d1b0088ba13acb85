//! Loading a model from a GGUF file or a Hugging Face folder.

use std::fs::File;
use std::io::{BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{gguf_file, QTensor};
use candle_core::{DType, Device, Tensor};
use kvmerger_kernels::QuantMatrix;

use crate::config::ModelConfig;
use crate::embedding::Embedding;
use crate::error::{EngineError, Result};
use crate::gguf_check::check_gguf;
use crate::linear::{Linear, WeightFormat, WeightFormats};
use crate::model::{Block, BlockNorms, Llama};
use crate::tokenizer::TextTokenizer;

/// Reads a GGUF file's header (metadata and tensor index), with clear errors for a
/// missing, truncated, inconsistent or non-GGUF file. The header is checked by a bounded
/// pass ([`check_gguf`]) before candle's reader allocates anything from it.
pub fn read_gguf_header(path: &Path) -> Result<(gguf_file::Content, BufReader<File>)> {
    if !path.exists() {
        return Err(EngineError::MissingFile(path.to_path_buf()));
    }
    let io = |error| EngineError::Io { path: path.to_path_buf(), error };
    let file = File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let mut reader = BufReader::new(file);
    let gguf_err = |reason: String| EngineError::Gguf { path: path.to_path_buf(), reason };
    check_gguf(&mut reader, len).map_err(gguf_err)?;
    reader.seek(SeekFrom::Start(0)).map_err(io)?;
    let content = gguf_file::Content::read(&mut reader).map_err(|e| gguf_err(e.to_string()))?;
    Ok((content, reader))
}

/// Fails unless tensor `name` has shape `expected` (`[rows, cols]` or `[len]`).
fn check_shape(name: &str, actual: &[usize], expected: &[usize]) -> Result<()> {
    if actual == expected {
        Ok(())
    } else {
        Err(EngineError::Config(format!(
            "tensor {name} has shape {actual:?}, but the configuration implies {expected:?}"
        )))
    }
}

/// Splits a `[rows, cols]` tensor into consecutive row blocks of `sizes` rows, each in the
/// tensor's own format (a row is a whole number of quantization blocks, so its bytes split
/// without requantizing): Phi-3's fused projections.
fn split_rows(t: QTensor, sizes: &[usize], device: &Device) -> Result<Vec<QTensor>> {
    let (rows, cols) = t.shape().dims2()?;
    let data = t.data()?;
    let row_bytes = data.len() / rows.max(1);
    let mut at = 0;
    sizes
        .iter()
        .map(|&n| {
            let part = &data[at * row_bytes..(at + n) * row_bytes];
            at += n;
            let dims = vec![n, cols];
            Ok(candle_core::quantized::ggml_file::qtensor_from_ggml(t.dtype(), part, dims, device)?)
        })
        .collect()
}

/// Loads a GGUF model of one of [`crate::config::SUPPORTED_ARCHITECTURES`].
/// Whether the token embedding stays in the file's blocks: where the kernel reads their
/// format, some phase multiplies the file's blocks (`file`) and none asks for the exact f32
/// values (`f32`, which keeps the f32 table the exact reference has always used).
fn embedding_in_blocks(table: &QTensor, formats: WeightFormats) -> bool {
    let uses = |f: WeightFormat| formats.prefill == f || formats.decode == f;
    QuantMatrix::reads(table.dtype()) && uses(WeightFormat::File) && !uses(WeightFormat::F32)
}

pub fn load_gguf(
    path: &Path,
    formats: WeightFormats,
    device: &Device,
) -> Result<(Llama, gguf_file::Content)> {
    let (content, mut reader) = read_gguf_header(path)?;
    let mut config = ModelConfig::from_gguf_metadata(&content.metadata)?;
    let gguf_err = |e: candle_core::Error| EngineError::Gguf {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let has = |name: &str| content.tensor_infos.contains_key(name);
    // RoPE frequency divisors: Llama 3's scaling, or Phi-3's LongRoPE factors (the short
    // ones: the context is cut to the length they hold for).
    let half = [config.head_dim / 2];
    for (name, short_context) in [("rope_freqs.weight", false), ("rope_factors_short.weight", true)]
    {
        if has(name) {
            let info = &content.tensor_infos[name];
            check_shape(name, info.shape.dims(), &half)?;
            let factors = content.tensor(&mut reader, name, device).map_err(gguf_err)?;
            let factors = factors.dequantize(device)?.to_vec1()?;
            config.set_rope_freq_factors(name, factors, &content.metadata, short_context)?;
        }
    }
    let c = &config;
    let (hidden, q_dim, kv_dim) =
        (c.hidden_size, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
    // Every shape is checked against the configuration before the tensor is read, so a
    // header that lies about sizes fails here instead of deep inside the forward pass.
    let mut tensor = |name: &str, shape: &[usize]| -> Result<_> {
        let info = content.tensor_infos.get(name).ok_or_else(|| EngineError::Gguf {
            path: path.to_path_buf(),
            reason: format!("tensor {name} is missing"),
        })?;
        check_shape(name, info.shape.dims(), shape)?;
        content.tensor(&mut reader, name, device).map_err(gguf_err)
    };
    let embed_q = tensor("token_embd.weight", &[c.vocab_size, hidden])?;
    let final_norm = tensor("output_norm.weight", &[hidden])?.dequantize(device)?;
    let in_blocks = embedding_in_blocks(&embed_q, formats);
    let (lm_head, embed) = if content.tensor_infos.contains_key("output.weight") {
        let lm_head = tensor("output.weight", &[c.vocab_size, hidden])?;
        let embed = match in_blocks.then(|| QuantMatrix::from_qtensor(&embed_q)).transpose()? {
            Some(Some(blocks)) => {
                Embedding::Blocks { matrix: Arc::new(blocks), device: device.clone() }
            }
            _ => Embedding::Dense(embed_q.dequantize(device)?),
        };
        (Linear::from_qtensor(lm_head, None, formats)?, embed)
    } else {
        // Tied: the output projection's blocks serve the lookup too.
        let dense = (!in_blocks).then(|| embed_q.dequantize(device)).transpose()?;
        let lm_head = Linear::from_qtensor(embed_q, None, formats)?;
        let embed = match (dense, lm_head.kernel_matrix()) {
            (Some(dense), _) => Embedding::Dense(dense),
            (None, Some(blocks)) => {
                Embedding::Blocks { matrix: blocks.clone(), device: device.clone() }
            }
            (None, None) => {
                unreachable!("file weights in a format the kernel reads keep their blocks")
            }
        };
        (lm_head, embed)
    };
    let mut blocks = Vec::new();
    for l in 0..c.n_layers {
        let name = |n: &str| format!("blk.{l}.{n}");
        let mut bias = |n: &str, len: usize| -> Result<Option<Tensor>> {
            if content.tensor_infos.contains_key(&name(n)) {
                Ok(Some(tensor(&name(n), &[len])?.dequantize(device)?))
            } else {
                Ok(None)
            }
        };
        let (bq, bk, bv) = (
            bias("attn_q.bias", q_dim)?,
            bias("attn_k.bias", kv_dim)?,
            bias("attn_v.bias", kv_dim)?,
        );
        let lin = |t: QTensor, b: Option<Tensor>| Linear::from_qtensor(t, b, formats);
        let inter = c.intermediate_size;
        let (wq, wk, wv) = if has(&name("attn_qkv.weight")) {
            // Phi-3: one projection, rows q, k, v.
            let fused = tensor(&name("attn_qkv.weight"), &[q_dim + 2 * kv_dim, hidden])?;
            let [q, k, v]: [QTensor; 3] = split_rows(fused, &[q_dim, kv_dim, kv_dim], device)?
                .try_into()
                .map_err(|_| EngineError::Setup("splitting attn_qkv".into()))?;
            (lin(q, bq)?, lin(k, bk)?, lin(v, bv)?)
        } else {
            (
                lin(tensor(&name("attn_q.weight"), &[q_dim, hidden])?, bq)?,
                lin(tensor(&name("attn_k.weight"), &[kv_dim, hidden])?, bk)?,
                lin(tensor(&name("attn_v.weight"), &[kv_dim, hidden])?, bv)?,
            )
        };
        let (gate, up) = if has(&name("ffn_gate.weight")) {
            (
                lin(tensor(&name("ffn_gate.weight"), &[inter, hidden])?, None)?,
                lin(tensor(&name("ffn_up.weight"), &[inter, hidden])?, None)?,
            )
        } else {
            // Phi-3: `ffn_up` holds the gate's rows, then the up projection's.
            let fused = tensor(&name("ffn_up.weight"), &[2 * inter, hidden])?;
            let [gate, up]: [QTensor; 2] =
                split_rows(fused, &[inter, inter], device)?
                    .try_into()
                    .map_err(|_| EngineError::Setup("splitting ffn_up".into()))?;
            (lin(gate, None)?, lin(up, None)?)
        };
        let (wo, down) = (
            lin(tensor(&name("attn_output.weight"), &[hidden, q_dim])?, None)?,
            lin(tensor(&name("ffn_down.weight"), &[hidden, inter])?, None)?,
        );
        let mut norm = |n: &str, len: usize| -> Result<Option<Tensor>> {
            match has(&name(n)) {
                true => Ok(Some(tensor(&name(n), &[len])?.dequantize(device)?)),
                false => Ok(None),
            }
        };
        let extras = BlockNorms {
            q_norm: norm("attn_q_norm.weight", c.head_dim)?,
            k_norm: norm("attn_k_norm.weight", c.head_dim)?,
            post_attn_norm: norm("post_attention_norm.weight", hidden)?,
            post_mlp_norm: norm("post_ffw_norm.weight", hidden)?,
        };
        blocks.push(Block {
            attn_norm: tensor(&name("attn_norm.weight"), &[hidden])?.dequantize(device)?,
            mlp_norm: tensor(&name("ffn_norm.weight"), &[hidden])?.dequantize(device)?,
            wq,
            wk,
            wv,
            wo,
            gate,
            up,
            down,
            extras,
        });
    }
    let model = Llama::new(config, embed, blocks, final_norm, lm_head, formats)?;
    Ok((model, content))
}

/// Loads a Hugging Face folder: `config.json` and one or more `*.safetensors`.
pub fn load_hf_folder(dir: &Path, device: &Device) -> Result<Llama> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .map_err(|error| EngineError::Io { path: config_path.clone(), error })?;
    let config = ModelConfig::from_hf_json(&text)?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|error| EngineError::Io { path: dir.to_path_buf(), error })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(EngineError::MissingFile(dir.join("*.safetensors")));
    }
    let mut tensors = std::collections::HashMap::new();
    for f in &files {
        let loaded = candle_core::safetensors::load(f, device)
            .map_err(|e| EngineError::Config(format!("{}: {e}", f.display())))?;
        tensors.extend(loaded);
    }
    // `Ok(None)` when the tensor is absent.
    let mut take_optional = |name: &str, shape: &[usize]| -> Result<Option<Tensor>> {
        let Some(t) = tensors.remove(name) else { return Ok(None) };
        check_shape(name, t.dims(), shape)?;
        Ok(Some(t.to_dtype(DType::F32)?))
    };
    let c = &config;
    let (hidden, q_dim, kv_dim) =
        (c.hidden_size, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
    let inter = c.intermediate_size;
    let required = |t: Option<Tensor>, name: &str| {
        t.ok_or_else(|| EngineError::Config(format!("missing tensor {name}")))
    };
    let embed_name = "model.embed_tokens.weight";
    let embed = required(take_optional(embed_name, &[c.vocab_size, hidden])?, embed_name)?;
    let final_norm = required(take_optional("model.norm.weight", &[hidden])?, "model.norm.weight")?;
    let lm_head = match take_optional("lm_head.weight", &[c.vocab_size, hidden])? {
        Some(w) => Linear::from_dense(w, None)?,
        None => Linear::from_dense(embed.clone(), None)?,
    };
    let mut blocks = Vec::new();
    for l in 0..c.n_layers {
        let p = format!("model.layers.{l}");
        let mut lin = |name: &str, shape: [usize; 2], with_bias: bool| -> Result<Linear> {
            let weight = format!("{p}.{name}.weight");
            let w = required(take_optional(&weight, &shape)?, &weight)?;
            let b = match with_bias {
                true => take_optional(&format!("{p}.{name}.bias"), &shape[..1])?,
                false => None,
            };
            Linear::from_dense(w, b)
        };
        let (attn_norm, mlp_norm) =
            (format!("{p}.input_layernorm.weight"), format!("{p}.post_attention_layernorm.weight"));
        blocks.push(Block {
            wq: lin("self_attn.q_proj", [q_dim, hidden], true)?,
            wk: lin("self_attn.k_proj", [kv_dim, hidden], true)?,
            wv: lin("self_attn.v_proj", [kv_dim, hidden], true)?,
            wo: lin("self_attn.o_proj", [hidden, q_dim], false)?,
            gate: lin("mlp.gate_proj", [inter, hidden], false)?,
            up: lin("mlp.up_proj", [inter, hidden], false)?,
            down: lin("mlp.down_proj", [hidden, inter], false)?,
            attn_norm: required(take_optional(&attn_norm, &[hidden])?, &attn_norm)?,
            mlp_norm: required(take_optional(&mlp_norm, &[hidden])?, &mlp_norm)?,
            extras: BlockNorms::default(),
        });
    }
    Llama::new(
        config,
        Embedding::Dense(embed),
        blocks,
        final_norm,
        lm_head,
        WeightFormats {
            prefill: crate::linear::WeightFormat::F32,
            decode: crate::linear::WeightFormat::F32,
        },
    )
}

/// A model with its tokenizer.
#[derive(Debug)]
pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: TextTokenizer,
    pub path: PathBuf,
}

/// Loads a GGUF file, or a Hugging Face folder with `tokenizer.json`, on the CPU.
pub fn load_model(path: &Path, formats: WeightFormats) -> Result<LoadedModel> {
    let device = Device::Cpu;
    let (model, tokenizer) = if path.is_dir() {
        (load_hf_folder(path, &device)?, TextTokenizer::from_file(path.join("tokenizer.json"))?)
    } else {
        let (model, content) = load_gguf(path, formats, &device)?;
        let tokenizer = TextTokenizer::from_gguf_metadata(&content.metadata)?;
        (model, tokenizer)
    };
    if tokenizer.vocab_size() > model.config.vocab_size {
        return Err(EngineError::Config(format!(
            "the tokenizer has {} tokens but the model's embedding has {} rows",
            tokenizer.vocab_size(),
            model.config.vocab_size
        )));
    }
    Ok(LoadedModel { model, tokenizer, path: path.to_path_buf() })
}
