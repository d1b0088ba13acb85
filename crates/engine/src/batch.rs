//! One forward pass over several sequences: the rows of every sequence are joined for the
//! linear layers (one matrix multiplication per weight for all of them), while RoPE and
//! attention run per sequence, at its own logical positions, on its own ragged cache.
//!
//! The weight format is chosen by phase, not by row count: a decode step of eight
//! sequences is still a decode step and reads the compact decode weights. Candle's
//! quantized matmul computes every output element with the same dot-product kernel
//! whatever the number of rows, so a sequence's decode logits are bit-identical whether
//! it runs alone or batched (see the tests).

use candle_core::Tensor;
use kvmerger_compress::{EntryMeta, KvCache, StatsRequest};
use rayon::prelude::*;

use crate::attention::{attend, AttentionOptions, AttentionShape};
use crate::error::{EngineError, Result};
use crate::linear::{WeightFormat, WeightFormats};
use crate::model::{Llama, Logits};

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

/// Weight formats of one batched pass.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PassFormats {
    /// Every linear layer of the blocks.
    pub body: WeightFormat,
    /// The output projection.
    pub head: WeightFormat,
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
        let c = &self.config;
        let shape =
            AttentionShape { n_heads: c.n_heads, n_kv_heads: c.n_kv_heads, head_dim: c.head_dim };
        let (qw, kw) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        let eps = c.rms_norm_eps as f32;
        let rows: usize = items.iter().map(|i| i.tokens.len()).sum();
        let ids: Vec<u32> = items.iter().flat_map(|i| i.tokens.iter().copied()).collect();
        let ids = Tensor::new(ids.as_slice(), self.device())?;
        // [rows, hidden]
        let mut x = self.embed.index_select(&ids, 0)?;
        for (layer, block) in self.blocks.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &block.attn_norm, eps)?;
            // [rows, n_heads * head_dim]
            let mut q = block.wq.forward_as(&h, formats.body)?.flatten_all()?.to_vec1::<f32>()?;
            // [rows, n_kv_heads * head_dim]
            let mut k = block.wk.forward_as(&h, formats.body)?.flatten_all()?.to_vec1::<f32>()?;
            let v = block.wv.forward_as(&h, formats.body)?.flatten_all()?.to_vec1::<f32>()?;
            // Split the joined rows back into each item's part.
            let mut parts = Vec::with_capacity(items.len());
            let (mut q_rest, mut k_rest, mut v_rest) = (&mut q[..], &mut k[..], &v[..]);
            for item in items.iter_mut() {
                let n = item.tokens.len();
                let (qi, qr) = std::mem::take(&mut q_rest).split_at_mut(n * qw);
                let (ki, kr) = std::mem::take(&mut k_rest).split_at_mut(n * kw);
                let (vi, vr) = v_rest.split_at(n * kw);
                (q_rest, k_rest, v_rest) = (qr, kr, vr);
                parts.push((item, qi, ki, vi));
            }
            let attn: Vec<Vec<f32>> = parts
                .into_par_iter()
                .map(|(item, q, k, v)| {
                    let seq = item.tokens.len();
                    let cache = &mut *item.cache;
                    let heads = &mut cache.layers[layer];
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
                    let opts = AttentionOptions {
                        chunk: attention_chunk,
                        stats: item.stats,
                        log_count_bias: cache.log_count_bias,
                    };
                    attend(q, seq, heads, shape, opts)
                })
                .collect();
            let attn = Tensor::from_vec(attn.concat(), (rows, qw), self.device())?;
            x = (x + block.wo.forward_as(&attn, formats.body)?)?;
            let h = candle_nn::ops::rms_norm(&x, &block.mlp_norm, eps)?;
            let gate = block.gate.forward_as(&h, formats.body)?.silu()?;
            let up = block.up.forward_as(&h, formats.body)?;
            x = (x + block.down.forward_as(&(gate * up)?, formats.body)?)?;
        }
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
        let x = x.index_select(&Tensor::new(picked.as_slice(), self.device())?, 0)?;
        let x = candle_nn::ops::rms_norm(&x, &self.final_norm, eps)?;
        let logits = self.lm_head.forward_as(&x, formats.head)?;
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
