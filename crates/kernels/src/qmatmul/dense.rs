//! Many activation rows against a quantized weight (prefill): the weight's blocks dequantized
//! to f32 one tile of rows at a time, then an f32 GEMM (the `gemm` crate, as candle's f32
//! matrix product uses), so the weight stays resident as the file's blocks and is still
//! multiplied at the f32 GEMM's speed.
//!
//! Why not the 8-bit block kernels here: with AVX2 and no VNNI, a block product takes about
//! nine instructions per 32 multiply-adds for each activation row and weight row (two for the
//! byte products, then a conversion, a scale product and an FMA, the offset term and the
//! loads), where a tuned f32 GEMM takes four FMAs and a fraction of a load; measured on
//! Qwen2.5-Coder-0.5B's prefill, the block kernels took about 1.6 times as long as the f32
//! GEMM (docs/bench/kernels.md). The dequantization reads each weight once per product and
//! costs a few percent of a prefill.

use std::borrow::Cow;

use rayon::prelude::*;

use super::{blocks, interleaved, Layout, QuantKind, QuantMatrix, BLOCK};

/// f32 bytes of one dequantized tile: about an L2 cache, large enough for the GEMM to split
/// over the threads.
const TILE_BYTES: usize = 2 << 20;

/// Weight rows dequantized per parallel task.
const TASK_ROWS: usize = 16;

impl QuantMatrix {
    /// `out = x W^T` in f32: `x` `[rows, in_dim]`, `out` `[rows, out_dim]`.
    pub(super) fn matmul_dense(&self, x: &[f32], rows: usize, out: &mut [f32]) {
        let (n, k) = (self.out_dim, self.in_dim);
        assert!(x.len() == rows * k && out.len() == rows * n, "dense product sizes");
        let unit = if self.layout == Layout::Interleaved { interleaved::ROWS } else { 1 };
        let tile_rows = (TILE_BYTES / (4 * k)).max(1).next_multiple_of(unit);
        let row_bytes = self.row_bytes();
        let mut tile = vec![0.0f32; tile_rows.min(n) * k];
        let threads = rayon::current_num_threads();
        let parallelism =
            if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
        for first in (0..n).step_by(tile_rows) {
            let t = tile_rows.min(n - first);
            let bytes = &self.blocks[first * row_bytes..(first + t) * row_bytes];
            let row_major = match self.layout {
                Layout::Rows => Cow::Borrowed(bytes),
                layout => Cow::Owned(self.kind.rearrange(k / BLOCK, bytes, layout, Layout::Rows)),
            };
            let tile = &mut tile[..t * k];
            let tasks =
                tile.par_chunks_mut(TASK_ROWS * k).zip(row_major.par_chunks(TASK_ROWS * row_bytes));
            tasks.for_each(|(values, blocks)| dequantize(self.kind, blocks, values));
            // SAFETY: `x` is `rows x k` (row stride k); the tile is `t` weight rows of `k`
            // values, read as the `k x t` right operand (column stride k); the destination is
            // columns `first..first + t` of `out`, `rows x n` (row stride n), all checked
            // above.
            unsafe {
                gemm::gemm(
                    rows,
                    t,
                    k,
                    out.as_mut_ptr().add(first),
                    1,
                    n as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    tile.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    parallelism,
                );
            }
        }
    }
}

/// Whole units of `kind` from `blocks` as f32 values into `out`, on the fastest code this
/// CPU runs.
pub(super) fn dequantize(kind: QuantKind, blocks: &[u8], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx2_fma_f16c() {
        return super::avx2::dequantize(kind, blocks, out);
    }
    blocks::dequantize(kind, blocks, out)
}
