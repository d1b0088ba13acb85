//! The Llama-family forward pass (Llama 2/3, Mistral, Qwen2, SmolLM): RMSNorm, RoPE at
//! explicit positions, grouped-query attention over the ragged cache, SwiGLU.

use candle_core::{Device, Tensor};
use kvmerger_compress::{KvCache, StatsRequest};

use crate::attention::{attend, AttentionOptions, AttentionShape};
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::linear::{Linear, WeightFormats};
use crate::rope::Rope;

/// One transformer block's weights.
#[derive(Debug, Clone)]
pub struct Block {
    /// `[hidden]`
    pub attn_norm: Tensor,
    pub wq: Linear,
    pub wk: Linear,
    pub wv: Linear,
    pub wo: Linear,
    /// `[hidden]`
    pub mlp_norm: Tensor,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

/// Which rows of logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's: `[1, vocab]`.
    Last,
    /// Every token's: `[seq, vocab]` (teacher-forced scoring).
    All,
}

/// What a forward pass records besides logits.
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

/// A Llama-family model ready to run.
#[derive(Debug, Clone)]
pub struct Llama {
    pub config: ModelConfig,
    /// `[vocab, hidden]`, f32 for the embedding lookup.
    pub embed: Tensor,
    pub blocks: Vec<Block>,
    /// `[hidden]`
    pub final_norm: Tensor,
    pub lm_head: Linear,
    pub formats: WeightFormats,
    rope: Rope,
}

impl Llama {
    pub fn new(
        config: ModelConfig,
        embed: Tensor,
        blocks: Vec<Block>,
        final_norm: Tensor,
        lm_head: Linear,
        formats: WeightFormats,
    ) -> Self {
        let rope = Rope::new(&config);
        Self { config, embed, blocks, final_norm, lm_head, formats, rope }
    }

    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    /// An empty cache shaped for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.config.n_layers, self.config.n_kv_heads, self.config.head_dim)
    }

    /// Runs `tokens` after whatever `cache` holds. Token `i` gets logical position
    /// `cache.n_seen + i`; its key and value are appended to every head; attention masks
    /// come from each head's physical length. Returns logits as `opts.logits` asks.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        opts: ForwardOptions,
    ) -> Result<Tensor> {
        let seq = tokens.len();
        if seq == 0 {
            return Err(EngineError::EmptyPrompt);
        }
        let needed = cache.n_seen + seq;
        if needed > self.config.context_length {
            return Err(EngineError::ContextOverflow {
                needed,
                context: self.config.context_length,
            });
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            return Err(EngineError::Tokenizer(format!(
                "token id {bad} is outside the vocabulary ({})",
                self.config.vocab_size
            )));
        }
        let c = &self.config;
        let shape =
            AttentionShape { n_heads: c.n_heads, n_kv_heads: c.n_kv_heads, head_dim: c.head_dim };
        let attn_opts = AttentionOptions {
            chunk: opts.attention_chunk,
            stats: opts.stats,
            log_count_bias: cache.log_count_bias,
        };
        let eps = c.rms_norm_eps as f32;
        let ids = Tensor::new(tokens, self.device())?;
        // [seq, hidden]
        let mut x = self.embed.index_select(&ids, 0)?;
        for (layer, block) in self.blocks.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &block.attn_norm, eps)?;
            // [seq, n_heads * head_dim]
            let mut q = block.wq.forward(&h, self.formats)?.flatten_all()?.to_vec1::<f32>()?;
            // [seq, n_kv_heads * head_dim]
            let mut k = block.wk.forward(&h, self.formats)?.flatten_all()?.to_vec1::<f32>()?;
            let v = block.wv.forward(&h, self.formats)?.flatten_all()?.to_vec1::<f32>()?;
            let heads = &mut cache.layers[layer];
            let (qw, kw) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
            for i in 0..seq {
                let pos = cache.n_seen + i;
                self.rope.apply(&mut q[i * qw..(i + 1) * qw], pos);
                self.rope.apply(&mut k[i * kw..(i + 1) * kw], pos);
                for (kh, head) in heads.iter_mut().enumerate() {
                    let at = i * kw + kh * c.head_dim;
                    head.push(
                        &k[at..at + c.head_dim],
                        &v[at..at + c.head_dim],
                        kvmerger_compress::EntryMeta::new(pos),
                    );
                }
            }
            let attn = attend(&q, seq, heads, shape, attn_opts);
            let attn = Tensor::from_vec(attn, (seq, qw), self.device())?;
            x = (x + block.wo.forward(&attn, self.formats)?)?;
            let h = candle_nn::ops::rms_norm(&x, &block.mlp_norm, eps)?;
            let gate = block.gate.forward(&h, self.formats)?.silu()?;
            let up = block.up.forward(&h, self.formats)?;
            x = (x + block.down.forward(&(gate * up)?, self.formats)?)?;
        }
        cache.n_seen += seq;
        let x = match opts.logits {
            Logits::Last => x.narrow(0, seq - 1, 1)?,
            Logits::All => x,
        };
        let x = candle_nn::ops::rms_norm(&x, &self.final_norm, eps)?;
        self.lm_head.forward(&x, self.formats)
    }

    /// Bytes of weights held in memory.
    pub fn weight_bytes(&self) -> usize {
        let linears =
            self.blocks.iter().flat_map(|b| [&b.wq, &b.wk, &b.wv, &b.wo, &b.gate, &b.up, &b.down]);
        linears.map(Linear::weight_bytes).sum::<usize>()
            + self.lm_head.weight_bytes()
            + self.embed.elem_count() * 4
    }
}
