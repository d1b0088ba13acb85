//! The CPU kernels of the decode path, below the engine: products of activation rows with
//! GGUF-quantized weights ([`QuantMatrix`]), attention of new queries over a layer's ragged
//! KV rows ([`decode_attention`], [`attend_block`]) in the types a KV cache stores them in
//! ([`RowsRef`], [`BlockQ8_0`], [`BlockQ4_0`]), the MLP activations, and the CPU feature
//! dispatch they share ([`KernelLevel`]), with the thread pools decode steps run on. Slices
//! in, slices out: nothing here knows a model or a cache.
//!
//! Each SIMD kernel sits beside the portable one it is tested against (`qmatmul`'s scalar
//! kernel beside `qmatmul/avx2.rs` and `qmatmul/avx512.rs`, the portable decode attention
//! beside its fused kernels). What is exported is safe: every `unsafe` operation stays inside
//! this crate, in its own block with the reason it holds.

#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod activation;
mod attention;
mod cpu;
mod error;
mod kv_blocks;
mod kv_rows;
mod qmatmul;
mod threads;

pub use activation::{gelu_tanh_product, silu_product};
pub use attention::{
    attend_block, causal_softmax, decode_attention, dot, AttentionShape, CausalBlock,
    DecodeOptions, KvEntry, KvHead, SlidingWindow,
};
pub use cpu::{kernel_report, KernelLevel, UnknownKernelLevel, KERNEL_LEVEL_ENV};
pub use error::{KernelError, Result};
pub use kv_blocks::{BlockQ4_0, BlockQ8_0, BLOCK_ELEMENTS};
pub use kv_rows::{KvElement, RowsRef};
pub use qmatmul::{Product, QuantKind, QuantMatrix, QuantizedRows, FILE_PATH};
pub use threads::{AdaptiveThreads, ADAPTIVE_THREADS_ENV};
