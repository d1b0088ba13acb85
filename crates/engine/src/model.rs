//! A Llama-family model's weights (Llama 2/3, Mistral, Qwen2, SmolLM) and what its forward
//! pass ([`crate::forward`]) needs beside them: RoPE tables, norms as plain values, the
//! thread policy.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use kvmerger_compress::{KvCache, KvDtype};

use crate::config::ModelConfig;
use crate::error::Result;
use crate::linear::{Linear, WeightFormats};
use crate::profile::StepProfile;
use crate::rope::Rope;
use crate::threads::AdaptiveThreads;

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
    /// How caches made for this model store keys and values (f16 unless set otherwise).
    pub kv_dtype: KvDtype,
    pub(crate) rope: Rope,
    /// `[layer] -> (attn_norm, mlp_norm)` as plain values, for the kernel path.
    pub(crate) norm_values: Vec<(Vec<f32>, Vec<f32>)>,
    /// Whether every block's linear layers run on the quantized kernel.
    pub(crate) blocks_on_kernel: bool,
    pub(crate) profile: Option<Arc<StepProfile>>,
    /// Picks the thread count of each decode step (`None`: always every thread).
    pub(crate) adaptive_threads: Option<Arc<AdaptiveThreads>>,
}

impl Llama {
    pub fn new(
        config: ModelConfig,
        embed: Tensor,
        blocks: Vec<Block>,
        final_norm: Tensor,
        lm_head: Linear,
        formats: WeightFormats,
    ) -> Result<Self> {
        let rope = Rope::new(&config);
        let norm_values = blocks
            .iter()
            .map(|b| Ok((b.attn_norm.to_vec1()?, b.mlp_norm.to_vec1()?)))
            .collect::<Result<_>>()?;
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
            rope,
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
            + self.embed.elem_count() * 4
    }
}
