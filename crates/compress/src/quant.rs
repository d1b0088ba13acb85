//! Block-quantized rows: llama.cpp's `q8_0` and `q4_0` formats, 32 elements per block with
//! an f16 scale. The block types are the kernels' (their data layout, which decode attention
//! reads in registers); they are named here for the cache's users.

pub use kvmerger_kernels::{BlockQ4_0, BlockQ8_0, BLOCK_ELEMENTS};
