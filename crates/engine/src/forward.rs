//! The Llama-family forward pass: RMSNorm, RoPE at explicit positions, grouped-query
//! attention over the ragged cache, SwiGLU; and what its relatives add: per-head q/k norms,
//! post-norms, GELU, scaled embeddings, sliding-window layers.
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
use kvmerger_compress::{hadamard, EntryMeta, KvCache, StatsRequest};
use kvmerger_kernels::{gelu_tanh_product, silu_product, AttentionShape, Product, QuantizedRows};

use crate::attention::{attend_into, AttentionOptions};
use crate::config::{Activation, ModelConfig};
use crate::error::{EngineError, Result};
use crate::linear::{Linear, WeightFormat, WeightFormats};
use crate::model::Llama;
use crate::profile::{timed, Part};
use crate::query_moments::record_queries;
use crate::reconstruction::record_reconstruction;

/// Which path a batch belongs to; picks the weight format of every linear layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Tokens given rather than generated, however many (compute-bound):
    /// [`WeightFormats::prefill`].
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

/// Which rows of logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's: `[1, vocab]`.
    Last,
    /// Every token's: `[seq, vocab]` (teacher-forced scoring).
    All,
}

impl Llama {
    /// Runs every item's tokens after its cache in one pass, in the format of `phase`.
    /// Returns, per item, its logits `[rows, vocab]` as `item.logits` asks (`None` where
    /// it asks for none).
    pub fn forward_batch(
        &self,
        items: &mut [BatchItem<'_>],
        phase: Phase,
        attention_chunk: usize,
    ) -> Result<Vec<Option<Tensor>>> {
        for item in items.iter() {
            self.check_item(item)?;
        }
        if items.is_empty() {
            return Ok(Vec::new());
        }
        match &self.adaptive_threads {
            Some(adaptive) if phase == Phase::Decode => {
                adaptive.run(|| self.pass(items, phase, attention_chunk))
            }
            _ => self.pass(items, phase, attention_chunk),
        }
    }

    /// [`Self::forward_batch`] on the current rayon pool, `items` checked and not empty.
    fn pass(
        &self,
        items: &mut [BatchItem<'_>],
        phase: Phase,
        attention_chunk: usize,
    ) -> Result<Vec<Option<Tensor>>> {
        let format = self.formats.for_phase(phase);
        // On the file's blocks, prefill multiplies its many rows in f32 against tiles of the
        // dequantized blocks, decode its few 8-bit rows against the blocks themselves.
        let product = match phase {
            Phase::Prefill => Product::Dense,
            Phase::Decode => Product::Blocks,
        };
        let profile = self.profile.as_deref();
        if let Some(p) = profile {
            p.count_pass();
        }
        let eps = self.config.rms_norm_eps as f32;
        let rows: usize = items.iter().map(|i| i.tokens.len()).sum();
        let ids: Vec<u32> = items.iter().flat_map(|i| i.tokens.iter().copied()).collect();
        // [rows, hidden]
        let x = timed(profile, Part::Embedding, || -> Result<_> {
            let x = self.embed.rows(&ids)?;
            match self.config.features.embed_scale {
                1.0 => Ok(x),
                scale => Ok((x * scale as f64)?),
            }
        })?;
        let x = if format == WeightFormat::File && self.blocks_on_kernel {
            let hidden = self.config.hidden_size;
            let x = self.blocks_on_kernel(
                items,
                x.flatten_all()?.to_vec1()?,
                product,
                attention_chunk,
            )?;
            Tensor::from_vec(x, (rows, hidden), self.device())?
        } else {
            self.blocks_on_tensors(items, x, format, product, attention_chunk)?
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
        let logits = timed(profile, Part::LmHead, || self.lm_head.forward_as(&x, format, product))?;
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
        product: Product,
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
                    Ok(l.forward_as(&h, format, product)?.flatten_all()?.to_vec1::<f32>()?)
                };
                Ok((project(&block.wq)?, project(&block.wk)?, project(&block.wv)?))
            })?;
            self.prepare_queries_keys(layer, &mut q, &mut k);
            let mut attn = vec![0.0f32; rows * qw];
            let layer_rows = LayerRows { q: &mut q, k: &mut k, v: &v, out: &mut attn };
            self.attend_items(layer, items, layer_rows, attention_chunk);
            let post_norm = |y: Tensor, norm: &Option<Tensor>| -> Result<Tensor> {
                match norm {
                    Some(w) => Ok(candle_nn::ops::rms_norm(&y, w, eps)?),
                    None => Ok(y),
                }
            };
            x = timed(profile, Part::Output, || -> Result<_> {
                let attn = Tensor::from_vec(attn, (rows, qw), self.device())?;
                let out = post_norm(
                    block.wo.forward_as(&attn, format, product)?,
                    &block.extras.post_attn_norm,
                )?;
                Ok((&x + out)?)
            })?;
            let h =
                timed(profile, Part::Norms, || candle_nn::ops::rms_norm(&x, &block.mlp_norm, eps))?;
            let inner = timed(profile, Part::GateUp, || -> Result<_> {
                let gate = block.gate.forward_as(&h, format, product)?;
                let gate = match self.config.features.activation {
                    Activation::Silu => gate.silu()?,
                    Activation::GeluTanh => gate.gelu()?,
                };
                Ok((gate * block.up.forward_as(&h, format, product)?)?)
            })?;
            x = timed(profile, Part::Down, || -> Result<_> {
                let out = post_norm(
                    block.down.forward_as(&inner, format, product)?,
                    &block.extras.post_mlp_norm,
                )?;
                Ok((&x + out)?)
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
        product: Product,
        attention_chunk: usize,
    ) -> Result<Vec<f32>> {
        let profile = self.profile.as_deref();
        let c = &self.config;
        let eps = c.rms_norm_eps as f32;
        let (hidden, inter) = (c.hidden_size, c.intermediate_size);
        let rows = x.len() / hidden;
        let (qw, kw) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        let mut h = vec![0.0f32; rows * hidden];
        let mut act = QuantizedRows::for_product(product);
        let (mut q, mut k, mut v) =
            (vec![0.0f32; rows * qw], vec![0.0f32; rows * kw], vec![0.0f32; rows * kw]);
        let mut attn = vec![0.0f32; rows * qw];
        let mut out = vec![0.0f32; rows * hidden];
        let (mut gate, mut up) = (vec![0.0f32; rows * inter], vec![0.0f32; rows * inter]);
        for (layer, block) in self.blocks.iter().enumerate() {
            let norms = &self.norm_values[layer];
            timed(profile, Part::Norms, || rms_norm_rows(&x, &norms.attn, eps, &mut h));
            timed(profile, Part::Quantize, || act.quantize(&h, rows));
            timed(profile, Part::Qkv, || {
                let layers = [&block.wq, &block.wk, &block.wv];
                Linear::forward_quantized(layers, &act, [&mut q, &mut k, &mut v]);
            });
            timed(profile, Part::Norms, || self.prepare_queries_keys(layer, &mut q, &mut k));
            let layer_rows = LayerRows { q: &mut q, k: &mut k, v: &v, out: &mut attn };
            self.attend_items(layer, items, layer_rows, attention_chunk);
            timed(profile, Part::Quantize, || act.quantize(&attn, rows));
            timed(profile, Part::Output, || {
                Linear::forward_quantized([&block.wo], &act, [&mut out])
            });
            timed(profile, Part::Elementwise, || {
                add_residual(&mut x, &mut out, norms.post_attn.as_deref(), eps)
            });
            timed(profile, Part::Norms, || rms_norm_rows(&x, &norms.mlp, eps, &mut h));
            timed(profile, Part::Quantize, || act.quantize(&h, rows));
            timed(profile, Part::GateUp, || {
                Linear::forward_quantized([&block.gate, &block.up], &act, [&mut gate, &mut up]);
            });
            timed(profile, Part::Elementwise, || {
                gate_product(c.features.activation, &mut gate, &up)
            });
            timed(profile, Part::Quantize, || act.quantize(&gate, rows));
            timed(profile, Part::Down, || {
                Linear::forward_quantized([&block.down], &act, [&mut out])
            });
            timed(profile, Part::Elementwise, || {
                add_residual(&mut x, &mut out, norms.post_mlp.as_deref(), eps)
            });
        }
        Ok(x)
    }

    /// Per-head q/k RMSNorms (Qwen3, Gemma 3) and the query scale, before RoPE.
    /// `q`: `[rows, n_heads * head_dim]`, `k`: `[rows, n_kv_heads * head_dim]`.
    fn prepare_queries_keys(&self, layer: usize, q: &mut [f32], k: &mut [f32]) {
        let norms = &self.norm_values[layer];
        let eps = self.config.rms_norm_eps as f32;
        if let Some(w) = &norms.q {
            rms_norm_in_place(q, w, eps);
        }
        if let Some(w) = &norms.k {
            rms_norm_in_place(k, w, eps);
        }
        let scale = self.config.features.query_scale;
        if scale != 1.0 {
            q.iter_mut().for_each(|v| *v *= scale);
        }
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
        let (rope, window) = (self.rope_of(layer), c.layer_window(layer));
        // A cache stored Hadamard-rotated gets rotated keys and values, attends with rotated
        // queries and gives rotated outputs, which are rotated back (see `hadamard`).
        let rotated = cache.dtype.rotated();
        if !item.stats.queries.is_empty() {
            let which = item.stats.queries;
            record_queries(rope, q, cache.n_seen, heads, shape, which);
        }
        timed(profile, Part::RopeAppend, || {
            if let Some(window) = window {
                heads.iter_mut().for_each(|h| drop_outside_window(h, cache.n_seen, window));
            }
            for i in 0..seq {
                let pos = cache.n_seen + i;
                rope.apply(&mut q[i * qw..(i + 1) * qw], pos);
                rope.apply(&mut k[i * kw..(i + 1) * kw], pos);
            }
            // A centered cache fixes each head's key center on the first keys it stores.
            if cache.dtype.centered() {
                for (kh, head) in heads.iter_mut().enumerate() {
                    let at = |i: usize| i * kw + kh * c.head_dim;
                    head.center_keys_on((0..seq).map(|i| &k[at(i)..at(i) + c.head_dim]), rotated);
                }
            }
            for i in 0..seq {
                let pos = cache.n_seen + i;
                for (kh, head) in heads.iter_mut().enumerate() {
                    let at = i * kw + kh * c.head_dim;
                    let (key, value) = (&k[at..at + c.head_dim], &v[at..at + c.head_dim]);
                    if rotated {
                        head.push_rotated(key, value, EntryMeta::new(pos));
                    } else {
                        head.push(key, value, EntryMeta::new(pos));
                    }
                }
            }
            if rotated {
                hadamard::rotate_rows(&mut q[..seq * qw], c.head_dim);
            }
        });
        if let Some(pass) = item.stats.reconstruction_pass {
            timed(profile, Part::Attention, || {
                record_reconstruction(q, seq, heads, shape, pass);
            });
        }
        let opts = AttentionOptions {
            chunk: attention_chunk,
            stats: item.stats,
            log_count_bias: cache.log_count_bias,
            window,
        };
        timed(profile, Part::Attention, || {
            attend_into(q, seq, heads, shape, opts, out);
            if rotated {
                hadamard::rotate_rows(out, c.head_dim);
            }
        });
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

/// Drops the entries of a sliding-window layer's head that no query from position
/// `first_query` on can see (`first_query - position >= window`): the window layer holds
/// its window, whatever a compression method kept.
fn drop_outside_window(head: &mut kvmerger_compress::HeadCache, first_query: usize, window: usize) {
    let visible = |m: &EntryMeta| m.position + window > first_query;
    if head.meta().iter().all(visible) {
        return;
    }
    let keep: Vec<usize> =
        head.meta().iter().enumerate().filter(|(_, m)| visible(m)).map(|(i, _)| i).collect();
    head.retain_indices(&keep);
}

/// `x += out`, `out` first RMS-normed by `post_norm` where the architecture has one (Gemma).
/// `gate[i] = act(gate[i]) * up[i]` for the model's activation.
fn gate_product(activation: Activation, gate: &mut [f32], up: &[f32]) {
    match activation {
        Activation::Silu => silu_product(gate, up),
        Activation::GeluTanh => gelu_tanh_product(gate, up),
    }
}

fn add_residual(x: &mut [f32], out: &mut [f32], post_norm: Option<&[f32]>, eps: f32) {
    if let Some(w) = post_norm {
        rms_norm_in_place(out, w, eps);
    }
    x.iter_mut().zip(out.iter()).for_each(|(x, o)| *x += o);
}

/// `1 / sqrt(mean(row^2) + eps)`.
fn inverse_rms(row: &[f32], eps: f32) -> f32 {
    /// Running sums of squares per row: independent additions vectorise, where one running
    /// sum waits on each addition in turn.
    const LANES: usize = 16;
    let mut sums = [0.0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    for chunk in chunks {
        sums.iter_mut().zip(chunk).for_each(|(s, v)| *s += v * v);
    }
    let mean_square = (sums.iter().sum::<f32>() + tail) / row.len() as f32;
    1.0 / (mean_square + eps).sqrt()
}

/// RMSNorm of each row of `x` `[rows, width]` into `out`: `x / sqrt(mean(x^2) + eps) * weight`.
fn rms_norm_rows(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    for (row, out) in x.chunks_exact(weight.len()).zip(out.chunks_exact_mut(weight.len())) {
        let inv = inverse_rms(row, eps);
        out.iter_mut().zip(row).zip(weight).for_each(|((o, v), w)| *o = v * inv * w);
    }
}

/// [`rms_norm_rows`] in place, over rows of `weight.len()` (a hidden row or one head).
fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    for row in x.chunks_exact_mut(weight.len()) {
        let inv = inverse_rms(row, eps);
        row.iter_mut().zip(weight).for_each(|(v, w)| *v *= inv * w);
    }
}
