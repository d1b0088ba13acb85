//! The Llama-family forward pass: RMSNorm, RoPE at explicit positions, grouped-query
//! attention over the ragged cache, SwiGLU.
//!
//! One forward pass runs over several sequences: the rows of every sequence are joined for the
//! linear layers (one matrix multiplication per weight for all of them), while RoPE and
//! attention run per sequence, at its own logical positions, on its own ragged cache.
//!
//! The weight format is chosen by phase, not by row count: a decode step of eight
//! sequences is still a decode step and reads the compact decode weights. The decode
//! kernel ([`crate::QuantMatrix`]) and candle's quantized matmul compute every output
//! element from its own row with the same code whatever the number of rows, and the
//! elementwise steps work per element, so a sequence's decode logits are bit-identical
//! whether it runs alone or batched (see the tests).

use candle_core::Tensor;
use kvmerger_compress::{EntryMeta, KvCache, StatsRequest};

use crate::activation::silu_product;
use crate::attention::{attend_into, AttentionOptions, AttentionShape};
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::linear::DECODE_ROWS;
use crate::linear::{Linear, WeightFormat, WeightFormats};
use crate::model::Llama;
use crate::profile::{timed, Part};
use crate::qmatmul::QuantizedRows;
use crate::query_moments::record_queries;

/// Which path a batch belongs to; picks the weight format of every linear layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Prompt tokens (compute-bound): [`WeightFormats::prefill`].
    Prefill,
    /// One new token per sequence (memory-bound): [`WeightFormats::decode`].
    Decode,
}

impl WeightFormats {
    pub fn for_phase(&self, phase: Phase) -> WeightFormat {
        match phase {
            Phase::Prefill => self.prefill,
            Phase::Decode => self.decode,
        }
    }
}

/// One sequence's part of a batch.
#[derive(Debug)]
pub struct BatchItem<'a> {
    /// Tokens appended after what `cache` holds, at logical positions `cache.n_seen..`.
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    /// Which logits rows to return; `None` for none (a prefill chunk before the last).
    pub logits: Option<Logits>,
    pub stats: StatsRequest,
}

impl<'a> BatchItem<'a> {
    /// `tokens` after `cache`, returning the last row's logits and recording no statistics:
    /// a decode step's item.
    pub fn last_logits(tokens: &'a [u32], cache: &'a mut KvCache) -> Self {
        Self { tokens, cache, logits: Some(Logits::Last), stats: StatsRequest::default() }
    }
}

/// Weight formats of one batched pass.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PassFormats {
    /// Every linear layer of the blocks.
    pub body: WeightFormat,
    /// The output projection.
    pub head: WeightFormat,
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

impl Llama {
    /// Runs `tokens` after whatever `cache` holds. Token `i` gets logical position
    /// `cache.n_seen + i`; its key and value are appended to every head; attention masks
    /// come from each head's physical length. Returns logits as `opts.logits` asks.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        opts: ForwardOptions,
    ) -> Result<Tensor> {
        // Single sequences keep choosing the weight format by row count, as before
        // batching existed: prefill in the prefill format, short extensions in the decode one.
        let format = |rows: usize| {
            if rows <= DECODE_ROWS {
                self.formats.decode
            } else {
                self.formats.prefill
            }
        };
        let logit_rows = match opts.logits {
            Logits::Last => 1,
            Logits::All => tokens.len(),
        };
        let formats = PassFormats { body: format(tokens.len()), head: format(logit_rows) };
        let mut item = [BatchItem { tokens, cache, logits: Some(opts.logits), stats: opts.stats }];
        let logits = self.run_batch(&mut item, formats, opts.attention_chunk)?;
        logits.into_iter().next().flatten().ok_or_else(|| {
            EngineError::Setup("a forward pass asking for logits returned none".into())
        })
    }

    /// Runs every item's tokens after its cache in one pass, in the format of `phase`.
    /// Returns, per item, its logits `[rows, vocab]` as `item.logits` asks (`None` where
    /// it asks for none).
    pub fn forward_batch(
        &self,
        items: &mut [BatchItem<'_>],
        phase: Phase,
        attention_chunk: usize,
    ) -> Result<Vec<Option<Tensor>>> {
        let format = self.formats.for_phase(phase);
        self.run_batch(items, PassFormats { body: format, head: format }, attention_chunk)
    }

    pub(crate) fn run_batch(
        &self,
        items: &mut [BatchItem<'_>],
        formats: PassFormats,
        attention_chunk: usize,
    ) -> Result<Vec<Option<Tensor>>> {
        for item in items.iter() {
            self.check_item(item)?;
        }
        if items.is_empty() {
            return Ok(Vec::new());
        }
        match &self.adaptive_threads {
            Some(adaptive) if items.iter().all(|i| i.tokens.len() == 1) => {
                adaptive.run(|| self.pass(items, formats, attention_chunk))
            }
            _ => self.pass(items, formats, attention_chunk),
        }
    }

    /// [`Self::run_batch`] on the current rayon pool, `items` checked and not empty.
    fn pass(
        &self,
        items: &mut [BatchItem<'_>],
        formats: PassFormats,
        attention_chunk: usize,
    ) -> Result<Vec<Option<Tensor>>> {
        let profile = self.profile.as_deref();
        if let Some(p) = profile {
            p.count_pass();
        }
        let eps = self.config.rms_norm_eps as f32;
        let rows: usize = items.iter().map(|i| i.tokens.len()).sum();
        let ids: Vec<u32> = items.iter().flat_map(|i| i.tokens.iter().copied()).collect();
        // [rows, hidden]
        let x = timed(profile, Part::Embedding, || {
            self.embed.index_select(&Tensor::new(ids.as_slice(), self.device())?, 0)
        })?;
        let x = if formats.body == WeightFormat::File && self.blocks_on_kernel {
            let hidden = self.config.hidden_size;
            let x = self.blocks_on_kernel(items, x.flatten_all()?.to_vec1()?, attention_chunk)?;
            Tensor::from_vec(x, (rows, hidden), self.device())?
        } else {
            self.blocks_on_tensors(items, x, formats.body, attention_chunk)?
        };
        // The rows whose logits are asked for, and how many each item gets.
        let mut picked: Vec<u32> = Vec::new();
        let mut counts = Vec::with_capacity(items.len());
        let mut start = 0;
        for item in items.iter_mut() {
            let n = item.tokens.len();
            item.cache.n_seen += n;
            let wanted = match item.logits {
                None => 0..0,
                Some(Logits::Last) => n - 1..n,
                Some(Logits::All) => 0..n,
            };
            picked.extend(wanted.clone().map(|r| (start + r) as u32));
            counts.push(item.logits.map(|_| wanted.len()));
            start += n;
        }
        if picked.is_empty() {
            return Ok(vec![None; items.len()]);
        }
        let x = timed(profile, Part::Norms, || {
            let x = x.index_select(&Tensor::new(picked.as_slice(), self.device())?, 0)?;
            candle_nn::ops::rms_norm(&x, &self.final_norm, eps)
        })?;
        let logits = timed(profile, Part::LmHead, || self.lm_head.forward_as(&x, formats.head))?;
        let mut at = 0;
        counts
            .into_iter()
            .map(|n| {
                n.map(|n| {
                    let rows = logits.narrow(0, at, n);
                    at += n;
                    rows
                })
                .transpose()
                .map_err(EngineError::from)
            })
            .collect()
    }

    /// The transformer blocks on candle tensors, every linear layer in `format`.
    /// `x`: `[rows, hidden]`, returned updated.
    fn blocks_on_tensors(
        &self,
        items: &mut [BatchItem<'_>],
        mut x: Tensor,
        format: WeightFormat,
        attention_chunk: usize,
    ) -> Result<Tensor> {
        let profile = self.profile.as_deref();
        let eps = self.config.rms_norm_eps as f32;
        let rows = x.dim(0)?;
        let qw = self.config.n_heads * self.config.head_dim;
        for (layer, block) in self.blocks.iter().enumerate() {
            let h = timed(profile, Part::Norms, || {
                candle_nn::ops::rms_norm(&x, &block.attn_norm, eps)
            })?;
            let (mut q, mut k, v) = timed(profile, Part::Qkv, || -> Result<_> {
                let project = |l: &crate::linear::Linear| -> Result<Vec<f32>> {
                    Ok(l.forward_as(&h, format)?.flatten_all()?.to_vec1::<f32>()?)
                };
                Ok((project(&block.wq)?, project(&block.wk)?, project(&block.wv)?))
            })?;
            let mut attn = vec![0.0f32; rows * qw];
            let layer_rows = LayerRows { q: &mut q, k: &mut k, v: &v, out: &mut attn };
            self.attend_items(layer, items, layer_rows, attention_chunk);
            x = timed(profile, Part::Output, || -> Result<_> {
                let attn = Tensor::from_vec(attn, (rows, qw), self.device())?;
                Ok((&x + block.wo.forward_as(&attn, format)?)?)
            })?;
            let h =
                timed(profile, Part::Norms, || candle_nn::ops::rms_norm(&x, &block.mlp_norm, eps))?;
            let inner = timed(profile, Part::GateUp, || -> Result<_> {
                let gate = block.gate.forward_as(&h, format)?.silu()?;
                Ok((gate * block.up.forward_as(&h, format)?)?)
            })?;
            x = timed(profile, Part::Down, || -> Result<_> {
                Ok((&x + block.down.forward_as(&inner, format)?)?)
            })?;
        }
        Ok(x)
    }

    /// The transformer blocks on the quantized kernel with plain buffers, allocated once
    /// per pass: the decode path, where candle's per-operation tensors cost as much as the
    /// arithmetic. `x`: `[rows, hidden]`, returned updated.
    fn blocks_on_kernel(
        &self,
        items: &mut [BatchItem<'_>],
        mut x: Vec<f32>,
        attention_chunk: usize,
    ) -> Result<Vec<f32>> {
        let profile = self.profile.as_deref();
        let c = &self.config;
        let eps = c.rms_norm_eps as f32;
        let (hidden, inter) = (c.hidden_size, c.intermediate_size);
        let rows = x.len() / hidden;
        let (qw, kw) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        let mut h = vec![0.0f32; rows * hidden];
        let mut act = QuantizedRows::default();
        let (mut q, mut k, mut v) =
            (vec![0.0f32; rows * qw], vec![0.0f32; rows * kw], vec![0.0f32; rows * kw]);
        let mut attn = vec![0.0f32; rows * qw];
        let mut out = vec![0.0f32; rows * hidden];
        let (mut gate, mut up) = (vec![0.0f32; rows * inter], vec![0.0f32; rows * inter]);
        for (layer, block) in self.blocks.iter().enumerate() {
            let (attn_norm, mlp_norm) = &self.norm_values[layer];
            timed(profile, Part::Norms, || {
                rms_norm_rows(&x, attn_norm, eps, &mut h);
                act.quantize(&h, rows);
            });
            timed(profile, Part::Qkv, || {
                let layers = [&block.wq, &block.wk, &block.wv];
                Linear::forward_quantized(layers, &act, [&mut q, &mut k, &mut v]);
            });
            let layer_rows = LayerRows { q: &mut q, k: &mut k, v: &v, out: &mut attn };
            self.attend_items(layer, items, layer_rows, attention_chunk);
            timed(profile, Part::Output, || {
                act.quantize(&attn, rows);
                Linear::forward_quantized([&block.wo], &act, [&mut out]);
                x.iter_mut().zip(&out).for_each(|(x, o)| *x += o);
            });
            timed(profile, Part::Norms, || {
                rms_norm_rows(&x, mlp_norm, eps, &mut h);
                act.quantize(&h, rows);
            });
            timed(profile, Part::GateUp, || {
                let layers = [&block.gate, &block.up];
                Linear::forward_quantized(layers, &act, [&mut gate, &mut up]);
                silu_product(&mut gate, &up);
                act.quantize(&gate, rows);
            });
            timed(profile, Part::Down, || {
                Linear::forward_quantized([&block.down], &act, [&mut out]);
                x.iter_mut().zip(&out).for_each(|(x, o)| *x += o);
            });
        }
        Ok(x)
    }

    /// RoPE, cache append and attention of one layer for every item, the items side by side
    /// (halves of the batch in parallel, down to one item each: no per-call allocation).
    fn attend_items(
        &self,
        layer: usize,
        items: &mut [BatchItem<'_>],
        rows: LayerRows<'_>,
        attention_chunk: usize,
    ) {
        let [item] = items else {
            let (left, right) = items.split_at_mut(items.len() / 2);
            let left_rows = left.iter().map(|i| i.tokens.len()).sum();
            let (left_part, right_part) = rows.split_at(left_rows, &self.config);
            rayon::join(
                || self.attend_items(layer, left, left_part, attention_chunk),
                || self.attend_items(layer, right, right_part, attention_chunk),
            );
            return;
        };
        let profile = self.profile.as_deref();
        let c = &self.config;
        let shape =
            AttentionShape { n_heads: c.n_heads, n_kv_heads: c.n_kv_heads, head_dim: c.head_dim };
        let (qw, kw) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        let LayerRows { q, k, v, out } = rows;
        let seq = item.tokens.len();
        let cache = &mut *item.cache;
        let heads = &mut cache.layers[layer];
        if !item.stats.queries.is_empty() {
            let which = item.stats.queries;
            record_queries(&self.rope, q, cache.n_seen, heads, shape, which);
        }
        timed(profile, Part::RopeAppend, || {
            for i in 0..seq {
                let pos = cache.n_seen + i;
                self.rope.apply(&mut q[i * qw..(i + 1) * qw], pos);
                self.rope.apply(&mut k[i * kw..(i + 1) * kw], pos);
                for (kh, head) in heads.iter_mut().enumerate() {
                    let at = i * kw + kh * c.head_dim;
                    head.push(
                        &k[at..at + c.head_dim],
                        &v[at..at + c.head_dim],
                        EntryMeta::new(pos),
                    );
                }
            }
        });
        let opts = AttentionOptions {
            chunk: attention_chunk,
            stats: item.stats,
            log_count_bias: cache.log_count_bias,
        };
        timed(profile, Part::Attention, || attend_into(q, seq, heads, shape, opts, out));
    }

    /// Rejects what would make a forward pass fail half-way: no tokens, a context
    /// overflow, a token outside the vocabulary.
    fn check_item(&self, item: &BatchItem<'_>) -> Result<()> {
        let seq = item.tokens.len();
        if seq == 0 {
            return Err(EngineError::EmptyPrompt);
        }
        let needed = item.cache.n_seen + seq;
        if needed > self.config.context_length {
            return Err(EngineError::ContextOverflow {
                needed,
                context: self.config.context_length,
            });
        }
        if let Some(&bad) = item.tokens.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            return Err(EngineError::Tokenizer(format!(
                "token id {bad} is outside the vocabulary ({})",
                self.config.vocab_size
            )));
        }
        Ok(())
    }
}

/// One layer's rows of a batch, rows ordered by item.
struct LayerRows<'a> {
    /// `[rows, n_heads * head_dim]`, rotated in place.
    q: &'a mut [f32],
    /// `[rows, n_kv_heads * head_dim]`, rotated in place.
    k: &'a mut [f32],
    /// `[rows, n_kv_heads * head_dim]`
    v: &'a [f32],
    /// `[rows, n_heads * head_dim]`: the attention output.
    out: &'a mut [f32],
}

impl<'a> LayerRows<'a> {
    /// The first `rows` rows, and the rest.
    fn split_at(self, rows: usize, c: &ModelConfig) -> (Self, Self) {
        let (qw, kw) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        let (q, q_rest) = self.q.split_at_mut(rows * qw);
        let (k, k_rest) = self.k.split_at_mut(rows * kw);
        let (v, v_rest) = self.v.split_at(rows * kw);
        let (out, out_rest) = self.out.split_at_mut(rows * qw);
        (Self { q, k, v, out }, Self { q: q_rest, k: k_rest, v: v_rest, out: out_rest })
    }
}

/// RMSNorm of each row of `x` `[rows, width]` into `out`: `x / sqrt(mean(x^2) + eps) * weight`.
fn rms_norm_rows(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    /// Running sums of squares per row: independent additions vectorise, where one running
    /// sum waits on each addition in turn.
    const LANES: usize = 16;
    for (row, out) in x.chunks_exact(weight.len()).zip(out.chunks_exact_mut(weight.len())) {
        let mut sums = [0.0f32; LANES];
        let chunks = row.chunks_exact(LANES);
        let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
        for chunk in chunks {
            sums.iter_mut().zip(chunk).for_each(|(s, v)| *s += v * v);
        }
        let mean_square = (sums.iter().sum::<f32>() + tail) / row.len() as f32;
        let inv = 1.0 / (mean_square + eps).sqrt();
        out.iter_mut().zip(row).zip(weight).for_each(|((o, v), w)| *o = v * inv * w);
    }
}
