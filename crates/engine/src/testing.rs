//! Small random-weight models, a tiny tokenizer and a naive reference forward, for tests
//! and benchmarks.
//!
//! The reference forward recomputes every position from scratch with plain loops and a
//! caller-chosen visibility rule, so the cached, chunked, compressed path can be checked
//! against something too simple to be wrong.

use std::sync::Arc;

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use candle_core::{Device, Tensor};
use kvmerger_compress::{CompressionConfig, KvCache, KvDtype, StatsRequest};
use kvmerger_kernels::Product;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::config::ModelConfig;
use crate::embedding::Embedding;
use crate::error::{EngineError, Result};
use crate::forward::{BatchItem, Logits, Phase};
use crate::linear::{Linear, WeightFormats};
use crate::model::{Block, Llama};
use crate::reconstruction::ReconstructionPrompt;
use crate::rope::Rope;
use crate::session::Session;
use crate::tokenizer::{TextTokenizer, TOKEN_TYPE_CONTROL, TOKEN_TYPE_NORMAL};

/// A tiny Llama config: 2 layers, 4 query heads over 2 kv heads, head_dim 8.
pub fn tiny_config() -> ModelConfig {
    ModelConfig {
        architecture: "llama".into(),
        n_layers: 2,
        hidden_size: 32,
        intermediate_size: 64,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: 8,
        vocab_size: 64,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        context_length: 256,
        rope_interleaved: true,
        rope_scaling: None,
        features: Default::default(),
    }
}

/// A model with seeded random weights, f32 on every path (its caches too, so it agrees
/// with [`reference_forward`] to f32 rounding).
pub fn random_llama(config: ModelConfig, seed: u64) -> Result<Llama> {
    let formats =
        WeightFormats { prefill: crate::WeightFormat::F32, decode: crate::WeightFormat::F32 };
    let mut model = random_llama_with(config, seed, formats)?;
    model.kv_dtype = KvDtype::F32;
    Ok(model)
}

/// A model with seeded random weights held in `formats` (quantized formats requantize the
/// random f32 weights, as loading a GGUF file does).
pub fn random_llama_with(config: ModelConfig, seed: u64, formats: WeightFormats) -> Result<Llama> {
    let mut rng = StdRng::seed_from_u64(seed);
    let dev = Device::Cpu;
    let mut mat = |rows: usize, cols: usize, scale: f32| -> Result<Tensor> {
        let data: Vec<f32> =
            (0..rows * cols).map(|_| rng.random_range(-1.0f32..1.0) * scale).collect();
        Ok(Tensor::from_vec(data, (rows, cols), &dev)?)
    };
    let (h, q, kv, i) = (
        config.hidden_size,
        config.n_heads * config.head_dim,
        config.n_kv_heads * config.head_dim,
        config.intermediate_size,
    );
    let quantized =
        formats.prefill != crate::WeightFormat::F32 || formats.decode != crate::WeightFormat::F32;
    let linear = |w: Tensor| -> Result<Linear> {
        if quantized {
            // The kernel format reads Q4_1 as in SmolLM2's file; the others requantize Q8_0.
            let dtype = match formats.decode {
                crate::WeightFormat::File => candle_core::quantized::GgmlDType::Q4_1,
                _ => candle_core::quantized::GgmlDType::Q8_0,
            };
            let q = candle_core::quantized::QTensor::quantize(&w, dtype)?;
            Linear::from_qtensor(q, None, formats)
        } else {
            Linear::from_dense(w, None)
        }
    };
    let s = 1.0 / (h as f32).sqrt();
    let embed = mat(config.vocab_size, h, 1.0)?;
    let mut blocks = Vec::new();
    for _ in 0..config.n_layers {
        blocks.push(Block {
            attn_norm: (mat(1, h, 0.2)?.squeeze(0)? + 1.0)?,
            // Larger query/key weights give peaked attention, so masking errors show.
            wq: linear(mat(q, h, 3.0 * s)?)?,
            wk: linear(mat(kv, h, 3.0 * s)?)?,
            wv: linear(mat(kv, h, s)?)?,
            wo: linear(mat(h, q, s)?)?,
            mlp_norm: (mat(1, h, 0.2)?.squeeze(0)? + 1.0)?,
            gate: linear(mat(i, h, s)?)?,
            up: linear(mat(i, h, s)?)?,
            down: linear(mat(h, i, 1.0 / (i as f32).sqrt())?)?,
            extras: Default::default(),
        });
    }
    let final_norm = Tensor::ones(h, candle_core::DType::F32, &dev)?;
    let lm_head = linear(embed.clone())?;
    let mut model =
        Llama::new(config, Embedding::Dense(embed), blocks, final_norm, lm_head, formats)?;
    model.reconstruction = Some(Arc::new(random_reconstruction_prompt()));
    Ok(model)
}

/// KVzip's instructions for a random model, which has no tokenizer: fixed token ids.
pub fn random_reconstruction_prompt() -> ReconstructionPrompt {
    ReconstructionPrompt { first: vec![1, 2, 3], later: vec![4, 5], suffix: vec![6, 7] }
}

/// What one [`forward`] pass returns and records.
#[derive(Debug, Clone, Copy)]
pub struct ForwardOptions {
    pub logits: Logits,
    pub stats: StatsRequest,
    /// Queries per chunk of the explicit attention softmax.
    pub attention_chunk: usize,
}

impl Default for ForwardOptions {
    fn default() -> Self {
        Self { logits: Logits::Last, stats: StatsRequest::default(), attention_chunk: 128 }
    }
}

/// One sequence's forward pass of `tokens` after `cache` in `phase`'s weight format,
/// outside any [`crate::Sequence`]: for tests of the forward pass itself. Returns logits
/// `[rows, vocab]` as `opts.logits` asks.
pub fn forward(
    model: &Llama,
    phase: Phase,
    tokens: &[u32],
    cache: &mut KvCache,
    opts: ForwardOptions,
) -> Result<Tensor> {
    let mut item = [BatchItem { tokens, cache, logits: Some(opts.logits), stats: opts.stats }];
    let logits = model.forward_batch(&mut item, phase, opts.attention_chunk)?;
    logits
        .into_iter()
        .next()
        .flatten()
        .ok_or_else(|| EngineError::Setup("a forward pass asking for logits returned none".into()))
}

/// Output of [`reference_forward`].
pub struct ReferenceOutput {
    /// `[seq][vocab]`
    pub logits: Vec<Vec<f32>>,
    /// `[layer][kv_head][key]`: attention each key received from every query, averaged
    /// over the query heads of its group.
    pub received: Vec<Vec<Vec<f32>>>,
    /// `[layer][query][n_heads * head_dim]`: the queries before RoPE.
    pub queries: Vec<Vec<Vec<f32>>>,
    /// `[layer][position][n_kv_heads * head_dim]`: the keys after RoPE.
    pub keys: Vec<Vec<Vec<f32>>>,
}

/// Recomputes the whole sequence naively. Query `i` of layer `l`, kv head `h` attends to
/// key `j <= i` when `visible(l, h, i, j)`; positions are `0..seq`.
pub fn reference_forward(
    model: &Llama,
    tokens: &[u32],
    visible: impl Fn(usize, usize, usize, usize) -> bool,
) -> Result<ReferenceOutput> {
    let c = &model.config;
    let (seq, d, group) = (tokens.len(), c.head_dim, c.group_size());
    let rope = Rope::new(c);
    let eps = c.rms_norm_eps as f32;
    // The whole sequence at once, as a prompt: every layer in the prefill format.
    let format = model.formats.prefill;
    let mut x = model.embed.rows(tokens)?;
    let mut received = vec![vec![vec![0.0f32; seq]; c.n_kv_heads]; c.n_layers];
    let mut queries = Vec::with_capacity(c.n_layers);
    let mut rotated_keys = Vec::with_capacity(c.n_layers);
    for (l, b) in model.blocks.iter().enumerate() {
        let hdn = candle_nn::ops::rms_norm(&x, &b.attn_norm, eps)?;
        let mut q = b.wq.forward_as(&hdn, format, Product::Dense)?.to_vec2::<f32>()?;
        let mut k = b.wk.forward_as(&hdn, format, Product::Dense)?.to_vec2::<f32>()?;
        let v = b.wv.forward_as(&hdn, format, Product::Dense)?.to_vec2::<f32>()?;
        queries.push(q.clone());
        for i in 0..seq {
            rope.apply(&mut q[i], i);
            rope.apply(&mut k[i], i);
        }
        rotated_keys.push(k.clone());
        let mut out = vec![vec![0.0f32; c.n_heads * d]; seq];
        for i in 0..seq {
            for qh in 0..c.n_heads {
                let kh = qh / group;
                let qv = &q[i][qh * d..(qh + 1) * d];
                let keys: Vec<usize> = (0..=i).filter(|&j| visible(l, kh, i, j)).collect();
                let logits: Vec<f32> = keys
                    .iter()
                    .map(|&j| {
                        qv.iter().zip(&k[j][kh * d..(kh + 1) * d]).map(|(a, b)| a * b).sum::<f32>()
                            / (d as f32).sqrt()
                    })
                    .collect();
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let exps: Vec<f32> = logits.iter().map(|x| (x - max).exp()).collect();
                let sum: f32 = exps.iter().sum();
                for (&j, e) in keys.iter().zip(&exps) {
                    let p = e / sum;
                    received[l][kh][j] += p / group as f32;
                    for t in 0..d {
                        out[i][qh * d + t] += p * v[j][kh * d + t];
                    }
                }
            }
        }
        let attn = Tensor::new(out, model.device())?;
        x = (x + b.wo.forward_as(&attn, format, Product::Dense)?)?;
        let hdn = candle_nn::ops::rms_norm(&x, &b.mlp_norm, eps)?;
        let gate = b.gate.forward_as(&hdn, format, Product::Dense)?.silu()?;
        let up = b.up.forward_as(&hdn, format, Product::Dense)?;
        x = (x + b.down.forward_as(&(gate * up)?, format, Product::Dense)?)?;
    }
    let x = candle_nn::ops::rms_norm(&x, &model.final_norm, eps)?;
    let logits = model.lm_head.forward_as(&x, format, Product::Dense)?.to_vec2::<f32>()?;
    Ok(ReferenceOutput { logits, received, queries, keys: rotated_keys })
}

/// Relative L2 distance `|a - b| / |b|`.
pub fn relative_l2(a: &[f32], b: &[f32]) -> f32 {
    let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f32 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Mean KL divergence `KL(p || q)` in nats between the softmaxes of two logit rows, in f64.
pub fn kl_divergence(p_logits: &[f32], q_logits: &[f32]) -> f64 {
    let log_softmax = |l: &[f32]| -> Vec<f64> {
        let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let sum: f64 = l.iter().map(|&v| (v as f64 - max).exp()).sum();
        l.iter().map(|&v| v as f64 - max - sum.ln()).collect()
    };
    let (p, q) = (log_softmax(p_logits), log_softmax(q_logits));
    p.iter().zip(&q).map(|(a, b)| a.exp() * (a - b)).sum()
}

/// How our model and another computation of the same model (candle-transformers, an f32
/// path, a wider cache) compare on one prompt and its continuation, both fed the same
/// tokens. Two paths that round differently can pick different greedy tokens where two
/// logits are within rounding of each other, and then continue differently for good; fed
/// the same tokens, their distributions can be compared at every step on any CPU.
#[derive(Debug, Clone, PartialEq)]
pub struct Agreement {
    /// Relative L2 distance between the two last-prompt-position logit rows.
    pub logits_error: f32,
    /// Mean `KL(reference || ours)` in nats per token over the last prompt position and
    /// every decode step.
    pub mean_kl: f64,
    /// The largest of those KL divergences.
    pub max_kl: f64,
    /// Share of those positions where both pick the same most likely token.
    pub top1_agreement: f64,
    /// The reference's greedy continuation, which both were fed.
    pub reference: Vec<u32>,
}

impl std::fmt::Display for Agreement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "relative L2 {:.2e}, mean KL {:.2e} (max {:.2e}) nats/token, top-1 agreement {:.3} \
             over {} positions",
            self.logits_error,
            self.mean_kl,
            self.max_kl,
            self.top1_agreement,
            self.reference.len() + 1
        )
    }
}

/// Prefills `tokens` into a full-cache [`Session`] of `model` and into `reference`, then
/// decodes `steps` tokens with both, each step feeding both the reference's greedy choice.
/// `reference(tokens, position)` feeds `tokens` at logical `position` and returns the last
/// token's logits `[vocab]`.
pub fn compare_with_reference(
    model: &Llama,
    tokens: &[u32],
    steps: usize,
    mut reference: impl FnMut(&[u32], usize) -> Result<Vec<f32>>,
) -> Result<Agreement> {
    let mut session = Session::new(model, &CompressionConfig::Full)?;
    let (mut ours, mut theirs) = (session.prefill(tokens)?, reference(tokens, 0)?);
    let logits_error = relative_l2(&ours, &theirs);
    let (mut kls, mut agreed, mut fed) = (Vec::new(), 0usize, Vec::with_capacity(steps));
    for i in 0..=steps {
        kls.push(kl_divergence(&theirs, &ours));
        let next = crate::argmax(&theirs);
        agreed += usize::from(crate::argmax(&ours) == next);
        if i == steps {
            break;
        }
        fed.push(next);
        ours = session.step(next)?;
        theirs = reference(&[next], tokens.len() + i)?;
    }
    Ok(Agreement {
        logits_error,
        mean_kl: kls.iter().sum::<f64>() / kls.len() as f64,
        max_kl: kls.iter().copied().fold(0.0, f64::max),
        top1_agreement: agreed as f64 / kls.len() as f64,
        reference: fed,
    })
}

/// Prefills `tokens` into `model` and into `reference` (each with an empty cache), asking for
/// every position's logits, and compares them position by position: `logits_error` over
/// all rows, KL and top-1 agreement at each position; `reference` holds the reference's most
/// likely token at every position but the last.
pub fn compare_prefill(model: &Llama, reference: &Llama, tokens: &[u32]) -> Result<Agreement> {
    let all_logits = |m: &Llama| -> Result<Vec<f32>> {
        let opts = ForwardOptions { logits: crate::forward::Logits::All, ..Default::default() };
        let logits = forward(m, crate::forward::Phase::Prefill, tokens, &mut m.new_cache(), opts)?;
        Ok(logits.flatten_all()?.to_vec1()?)
    };
    let (ours, theirs) = (all_logits(model)?, all_logits(reference)?);
    let vocab = ours.len() / tokens.len();
    let rows = ours.chunks_exact(vocab).zip(theirs.chunks_exact(vocab));
    let kls: Vec<f64> = rows.clone().map(|(o, t)| kl_divergence(t, o)).collect();
    let agreed = rows.clone().filter(|(o, t)| crate::argmax(o) == crate::argmax(t)).count();
    let mut picks: Vec<u32> = theirs.chunks_exact(vocab).map(crate::argmax).collect();
    picks.pop();
    Ok(Agreement {
        logits_error: relative_l2(&ours, &theirs),
        mean_kl: kls.iter().sum::<f64>() / kls.len() as f64,
        max_kl: kls.iter().copied().fold(0.0, f64::max),
        top1_agreement: agreed as f64 / kls.len() as f64,
        reference: picks,
    })
}

/// A small SentencePiece vocabulary: control tokens, the 256 byte tokens and a few
/// pieces that spell "hello world".
pub fn tiny_sentencepiece() -> TextTokenizer {
    let mut tokens = vec!["<unk>".to_string(), "<s>".to_string(), "</s>".to_string()];
    let mut types = vec![2, TOKEN_TYPE_CONTROL, TOKEN_TYPE_CONTROL];
    for byte in 0..=255u8 {
        tokens.push(format!("<0x{byte:02X}>"));
        types.push(6);
    }
    let pieces = [
        "▁", "h", "e", "l", "o", "w", "r", "d", "ll", "▁h", "▁he", "llo", "▁hello", "▁w", "or",
        "▁wor", "ld", "▁world",
    ];
    let piece_scores = [
        -1.0, -2.0, -2.0, -2.0, -2.0, -2.0, -2.0, -2.0, -3.0, -3.0, -4.0, -4.0, -5.0, -3.0, -3.0,
        -4.0, -3.0, -5.0,
    ];
    let mut scores = vec![0.0f32; tokens.len()];
    for (piece, score) in pieces.iter().zip(piece_scores) {
        tokens.push(piece.to_string());
        types.push(TOKEN_TYPE_NORMAL);
        scores.push(score);
    }
    let md: HashMap<String, Value> = [
        ("tokenizer.ggml.model", Value::String("llama".into())),
        ("tokenizer.ggml.tokens", Value::Array(tokens.into_iter().map(Value::String).collect())),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.into_iter().map(|t| Value::I32(t as i32)).collect()),
        ),
        ("tokenizer.ggml.scores", Value::Array(scores.into_iter().map(Value::F32).collect())),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    TextTokenizer::from_gguf_metadata(&md).expect("tiny SentencePiece tokenizer")
}
