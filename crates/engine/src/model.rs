//! A Llama-family model's weights (Llama 2/3, Mistral, Qwen2/3, Gemma 3, Phi-3, SmolLM) and
//! what its forward
//! pass ([`crate::forward`]) needs beside them: RoPE tables, norms as plain values, the
//! thread policy.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use kvmerger_compress::{KvCache, KvDtype};
use kvmerger_kernels::AdaptiveThreads;

use crate::config::ModelConfig;
use crate::embedding::Embedding;
use crate::error::Result;
use crate::linear::{Linear, WeightFormats};
use crate::profile::StepProfile;
use crate::reconstruction::ReconstructionPrompt;
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
    pub extras: BlockNorms,
}

/// The norms some architectures add to a block, each `None` where the file has none.
#[derive(Debug, Clone, Default)]
pub struct BlockNorms {
    /// `[head_dim]`: RMSNorm of every query head before RoPE (Qwen3, Gemma 3).
    pub q_norm: Option<Tensor>,
    /// `[head_dim]`: RMSNorm of every key head before RoPE.
    pub k_norm: Option<Tensor>,
    /// `[hidden]`: RMSNorm of the attention output before the residual add (Gemma).
    pub post_attn_norm: Option<Tensor>,
    /// `[hidden]`: RMSNorm of the MLP output before the residual add (Gemma).
    pub post_mlp_norm: Option<Tensor>,
}

/// A block's norm weights as plain values, for the forward pass.
#[derive(Debug, Clone)]
pub(crate) struct NormValues {
    pub attn: Vec<f32>,
    pub mlp: Vec<f32>,
    pub q: Option<Vec<f32>>,
    pub k: Option<Vec<f32>>,
    pub post_attn: Option<Vec<f32>>,
    pub post_mlp: Option<Vec<f32>>,
}

impl NormValues {
    fn of(block: &Block) -> Result<Self> {
        let values = |t: &Option<Tensor>| t.as_ref().map(Tensor::to_vec1).transpose();
        let e = &block.extras;
        Ok(Self {
            attn: block.attn_norm.to_vec1()?,
            mlp: block.mlp_norm.to_vec1()?,
            q: values(&e.q_norm)?,
            k: values(&e.k_norm)?,
            post_attn: values(&e.post_attn_norm)?,
            post_mlp: values(&e.post_mlp_norm)?,
        })
    }
}

/// A Llama-family model ready to run.
#[derive(Debug, Clone)]
pub struct Llama {
    pub config: ModelConfig,
    /// `[vocab, hidden]`: the token embedding.
    pub embed: Embedding,
    pub blocks: Vec<Block>,
    /// `[hidden]`
    pub final_norm: Tensor,
    pub lm_head: Linear,
    pub formats: WeightFormats,
    /// How caches made for this model store keys and values (f16 unless set otherwise).
    pub kv_dtype: KvDtype,
    /// KVzip's instructions in this model's vocabulary (set where the tokenizer is known).
    pub reconstruction: Option<Arc<ReconstructionPrompt>>,
    pub(crate) rope: Rope,
    /// The rotation of sliding-window layers that have their own base (Gemma 3).
    pub(crate) window_rope: Option<Rope>,
    /// `[layer]`: every norm weight as plain values.
    pub(crate) norm_values: Vec<NormValues>,
    /// Whether every block's linear layers run on the quantized kernel.
    pub(crate) blocks_on_kernel: bool,
    pub(crate) profile: Option<Arc<StepProfile>>,
    /// Picks the thread count of each decode step (`None`: always every thread).
    pub(crate) adaptive_threads: Option<Arc<AdaptiveThreads>>,
}

impl Llama {
    pub fn new(
        config: ModelConfig,
        embed: Embedding,
        blocks: Vec<Block>,
        final_norm: Tensor,
        lm_head: Linear,
        formats: WeightFormats,
    ) -> Result<Self> {
        let rope = Rope::new(&config);
        let window_rope = Rope::for_window_layers(&config);
        let norm_values = blocks.iter().map(NormValues::of).collect::<Result<_>>()?;
        let blocks_on_kernel = blocks.iter().all(|b| {
            [&b.wq, &b.wk, &b.wv, &b.wo, &b.gate, &b.up, &b.down].iter().all(|l| l.has_kernel())
        });
        Ok(Self {
            config,
            embed,
            blocks,
            final_norm,
            lm_head,
            formats,
            kv_dtype: KvDtype::default(),
            reconstruction: None,
            rope,
            window_rope,
            norm_values,
            blocks_on_kernel,
            profile: None,
            adaptive_threads: AdaptiveThreads::from_env().map(Arc::new),
        })
    }

    /// Attaches (or with `None` detaches) a profile that every forward pass adds its parts'
    /// times to.
    pub fn set_profile(&mut self, profile: Option<Arc<StepProfile>>) {
        self.profile = profile;
    }

    /// Turns on or off the adaptive thread count of decode steps (on unless
    /// [`crate::ADAPTIVE_THREADS_ENV`] is `0`): each step runs on every thread or on one,
    /// whichever recent steps found faster. Results are the same either way.
    pub fn set_adaptive_threads(&mut self, on: bool) {
        self.adaptive_threads = on.then(|| Arc::new(AdaptiveThreads::default()));
    }

    /// The rotation of `layer`.
    pub(crate) fn rope_of(&self, layer: usize) -> &Rope {
        match (&self.window_rope, self.config.layer_window(layer)) {
            (Some(rope), Some(_)) => rope,
            _ => &self.rope,
        }
    }

    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    /// An empty cache shaped for this model.
    pub fn new_cache(&self) -> KvCache {
        let c = &self.config;
        KvCache::new(c.n_layers, c.n_kv_heads, c.head_dim, self.kv_dtype)
    }

    /// Bytes of weights held in memory.
    pub fn weight_bytes(&self) -> usize {
        let linears =
            self.blocks.iter().flat_map(|b| [&b.wq, &b.wk, &b.wv, &b.wo, &b.gate, &b.up, &b.down]);
        linears.map(Linear::weight_bytes).sum::<usize>()
            + self.lm_head.weight_bytes()
            + self.embed.weight_bytes(self.lm_head.kernel_matrix())
    }
}
