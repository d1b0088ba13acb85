//! Loading a model from a GGUF file or a Hugging Face folder.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};

use crate::chat::ChatTemplate;
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::linear::{Linear, WeightFormats};
use crate::model::{Block, Llama};
use crate::tokenizer::TextTokenizer;

/// Reads a GGUF file's header (metadata and tensor index), with clear errors for a
/// missing, truncated or non-GGUF file.
pub fn read_gguf_header(path: &Path) -> Result<(gguf_file::Content, BufReader<File>)> {
    if !path.exists() {
        return Err(EngineError::MissingFile(path.to_path_buf()));
    }
    let file =
        File::open(path).map_err(|source| EngineError::Io { path: path.to_path_buf(), source })?;
    let mut reader = BufReader::new(file);
    let content = gguf_file::Content::read(&mut reader)
        .map_err(|e| EngineError::Gguf { path: path.to_path_buf(), reason: e.to_string() })?;
    Ok((content, reader))
}

/// Loads a Llama-family GGUF model.
pub fn load_gguf(
    path: &Path,
    formats: WeightFormats,
    device: &Device,
) -> Result<(Llama, gguf_file::Content)> {
    let (content, mut reader) = read_gguf_header(path)?;
    let config = ModelConfig::from_gguf_metadata(&content.metadata)?;
    let gguf_err = |e: candle_core::Error| EngineError::Gguf {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let mut tensor = |name: &str| content.tensor(&mut reader, name, device).map_err(gguf_err);
    let embed_q = tensor("token_embd.weight")?;
    let embed = embed_q.dequantize(device)?;
    let final_norm = tensor("output_norm.weight")?.dequantize(device)?;
    let lm_head = match tensor("output.weight") {
        Ok(w) => Linear::from_qtensor(w, None, formats)?,
        Err(_) => Linear::from_qtensor(embed_q, None, formats)?,
    };
    let mut blocks = Vec::with_capacity(config.n_layers);
    for l in 0..config.n_layers {
        let name = |n: &str| format!("blk.{l}.{n}");
        let mut bias = |n: &str| -> Result<Option<Tensor>> {
            if content.tensor_infos.contains_key(&name(n)) {
                Ok(Some(tensor(&name(n))?.dequantize(device)?))
            } else {
                Ok(None)
            }
        };
        let (bq, bk, bv) = (bias("attn_q.bias")?, bias("attn_k.bias")?, bias("attn_v.bias")?);
        let mut linear =
            |n: &str, b: Option<Tensor>| Linear::from_qtensor(tensor(&name(n))?, b, formats);
        let (wq, wk, wv) = (
            linear("attn_q.weight", bq)?,
            linear("attn_k.weight", bk)?,
            linear("attn_v.weight", bv)?,
        );
        let (wo, gate, up, down) = (
            linear("attn_output.weight", None)?,
            linear("ffn_gate.weight", None)?,
            linear("ffn_up.weight", None)?,
            linear("ffn_down.weight", None)?,
        );
        blocks.push(Block {
            attn_norm: tensor(&name("attn_norm.weight"))?.dequantize(device)?,
            mlp_norm: tensor(&name("ffn_norm.weight"))?.dequantize(device)?,
            wq,
            wk,
            wv,
            wo,
            gate,
            up,
            down,
        });
    }
    let model = Llama::new(config, embed, blocks, final_norm, lm_head, formats);
    Ok((model, content))
}

/// Loads a Hugging Face folder: `config.json` and one or more `*.safetensors`.
pub fn load_hf_folder(dir: &Path, device: &Device) -> Result<Llama> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .map_err(|source| EngineError::Io { path: config_path.clone(), source })?;
    let config = ModelConfig::from_hf_json(&text)?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| EngineError::Io { path: dir.to_path_buf(), source })?
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
    let mut take = |name: &str| -> Result<Tensor> {
        tensors
            .remove(name)
            .ok_or_else(|| EngineError::Config(format!("missing tensor {name}")))?
            .to_dtype(DType::F32)
            .map_err(EngineError::from)
    };
    let embed = take("model.embed_tokens.weight")?;
    let final_norm = take("model.norm.weight")?;
    let lm_head = match take("lm_head.weight") {
        Ok(w) => Linear::from_dense(w, None)?,
        Err(_) => Linear::from_dense(embed.clone(), None)?,
    };
    let mut blocks = Vec::with_capacity(config.n_layers);
    for l in 0..config.n_layers {
        let p = format!("model.layers.{l}");
        let mut lin = |name: &str, with_bias: bool| -> Result<Linear> {
            let w = take(&format!("{p}.{name}.weight"))?;
            let b = if with_bias { take(&format!("{p}.{name}.bias")).ok() } else { None };
            Linear::from_dense(w, b)
        };
        blocks.push(Block {
            wq: lin("self_attn.q_proj", true)?,
            wk: lin("self_attn.k_proj", true)?,
            wv: lin("self_attn.v_proj", true)?,
            wo: lin("self_attn.o_proj", false)?,
            gate: lin("mlp.gate_proj", false)?,
            up: lin("mlp.up_proj", false)?,
            down: lin("mlp.down_proj", false)?,
            attn_norm: take(&format!("{p}.input_layernorm.weight"))?,
            mlp_norm: take(&format!("{p}.post_attention_layernorm.weight"))?,
        });
    }
    Ok(Llama::new(
        config,
        embed,
        blocks,
        final_norm,
        lm_head,
        WeightFormats {
            prefill: crate::linear::WeightFormat::F32,
            decode: crate::linear::WeightFormat::F32,
        },
    ))
}

/// A model with its tokenizer.
#[derive(Debug)]
pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: TextTokenizer,
    pub path: PathBuf,
}

impl LoadedModel {
    /// The model's chat template, compiled (see [`ChatTemplate`]).
    pub fn chat_template(&self) -> Result<ChatTemplate> {
        ChatTemplate::for_tokenizer(&self.tokenizer)
    }
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
