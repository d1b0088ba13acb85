//! Products of a few activation rows with GGUF-quantized weights: the decode path's kernel.
//!
//! Decode is memory-bound: each step reads every weight once, so the fewest bytes per weight
//! win, provided the arithmetic keeps up. candle 0.11's Q4_1 dot product is scalar and its
//! quantized matmul reads a weight row once per activation row; this kernel reads each weight
//! block once for all activation rows of a step (weights outer, rows inner), so a batched
//! decode step of 8 sequences reads the weights once, not 8 times.
//!
//! As in ggml, activations are quantized to 8 bits per block of 32 values (`d = max|x| / 127`,
//! `q = round(x / d)`, and `s = d * sum(q)` for the Q4_1 offset term), then each block's
//! integer dot product is scaled in f32:
//! - Q4_1 weight `w = d_w * n + m_w` (`n` in 0..16): `d_w d_x sum(n q) + m_w s_x`;
//! - Q8_0 weight `w = d_w * n` (`n` in -127..=127): `d_w d_x sum(n q)`.
//!
//! Kernels, picked at run time by CPU feature: with AVX-512 VNNI, weights whose row count is a
//! multiple of 16 are stored interleaved at load, 16 rows side by side ([`interleaved`]), and
//! the others row-major with two blocks per `vpdpbusd` ([`avx512`]); AVX-VNNI or AVX2 (one
//! block per instruction); else a scalar loop computing the same sums. Each output is
//! computed by one kernel call from its own activation row and weight row only, so a row's
//! result never depends on the other rows of a batch.

use candle_core::quantized::{GgmlDType, QTensor};
use rayon::prelude::*;

use crate::error::{KernelError, Result};

/// Defines `$name`, a [`Kernel`] that checks the CPU (`$available`) and the sizes of what it
/// reads (whole weight rows of `$kind`, a multiple of `$unit` of them), then runs
/// `$kernel::<$T.., R>` for the group's row count `R`, so each variant keeps its accumulators
/// in registers.
#[cfg(target_arch = "x86_64")]
macro_rules! kernel_by_rows {
    ($name:ident, $($kernel:ident)::+ $(<$($t:ty),+>)?, $kind:ident, $unit:expr, $available:path) => {
        /// # Safety
        /// As a [`Kernel`](crate::qmatmul::Kernel)'s.
        pub unsafe fn $name(
            weights: &[u8],
            nb: usize,
            acts: Acts<'_>,
            rows: usize,
            out: Columns,
        ) {
            assert!($available());
            let row_bytes = crate::qmatmul::QuantKind::$kind.row_bytes(nb);
            let n_out = weights.len() / row_bytes.max(1);
            assert!(n_out > 0 && n_out.is_multiple_of($unit) && weights.len() == n_out * row_bytes);
            assert!(acts.fits(rows, nb));
            // SAFETY: the CPU features were checked above; the sizes of `weights` and `acts`
            // were checked against what the kernel reads; `out` is the caller's promise.
            unsafe {
                match rows {
                    1 => $($kernel)::+::<$($($t,)+)? 1>(weights, nb, acts, out),
                    2 => $($kernel)::+::<$($($t,)+)? 2>(weights, nb, acts, out),
                    3 => $($kernel)::+::<$($($t,)+)? 3>(weights, nb, acts, out),
                    4 => $($kernel)::+::<$($($t,)+)? 4>(weights, nb, acts, out),
                    5 => $($kernel)::+::<$($($t,)+)? 5>(weights, nb, acts, out),
                    6 => $($kernel)::+::<$($($t,)+)? 6>(weights, nb, acts, out),
                    7 => $($kernel)::+::<$($($t,)+)? 7>(weights, nb, acts, out),
                    8 => $($kernel)::+::<$($($t,)+)? 8>(weights, nb, acts, out),
                    _ => unreachable!("row groups hold 1 to 8 rows"),
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod blocks;
mod chunked;
mod dense;
mod interleaved;

/// What the engine's `WeightFormat::File` computes, for the fingerprints of stored results: the
/// block types multiplied as the file stores them (others are requantized to Q8_0), and the
/// dense path's row count. Change it with any change to what those products compute.
pub const FILE_PATH: &str = "blocks Q4_0 Q4_1 Q5_0 Q8_0 Q4_K Q5_K Q6_K as stored, 8-bit \
                             activations when decoding, scaled in chunks of 8 sub-blocks, f32 \
                             GEMM of dequantized tiles in prefill";

/// Values per quantized block, for weights and activations alike.
pub const BLOCK: usize = 32;

/// Weight rows per parallel task: enough bytes that a task outweighs its scheduling, and
/// several tasks per thread so that an idle thread can take over a slow one's share.
const TASK_BYTES: usize = 32 * 1024;

/// Activation rows computed together against each weight block (a register's worth).
const ROW_GROUP: usize = 8;

/// Block formats the kernel reads, as GGUF stores them (ggml's `ggml-common.h`; [`blocks`]
/// reads them as 32-value sub-blocks). The discriminants index [`QuantKind::ALL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum QuantKind {
    /// 18 bytes per 32 weights: f16 scale `d`, 16 bytes of 4-bit values `n`, `w = d (n - 8)`
    /// (low nibbles are weights 0..16, high nibbles weights 16..32).
    Q4_0,
    /// 20 bytes per 32 weights: f16 scale `d`, f16 offset `m`, 16 bytes of 4-bit values
    /// (low nibbles are weights 0..16, high nibbles weights 16..32).
    Q4_1,
    /// 22 bytes per 32 weights: f16 `d`, 32 fifth bits, then Q4_0's nibbles: `w = d (n - 16)`.
    Q5_0,
    /// 34 bytes per 32 weights: f16 scale `d`, 32 signed bytes.
    Q8_0,
    /// 144 bytes per 256 weights: f16 `d` and `dmin`, a 6-bit scale and min per 32 weights,
    /// 4-bit values: `w = d sc n - dmin mn`.
    Q4K,
    /// 176 bytes per 256 weights: Q4_K with a fifth bit per weight.
    Q5K,
    /// 210 bytes per 256 weights: 6-bit values less 32, a signed 8-bit scale per 16 weights,
    /// f16 `d`.
    Q6K,
}

impl QuantKind {
    /// Every kind, in discriminant order.
    pub const ALL: [QuantKind; 7] =
        [Self::Q4_0, Self::Q4_1, Self::Q5_0, Self::Q8_0, Self::Q4K, Self::Q5K, Self::Q6K];

    /// Bytes of one unit: a block of 32 weights or a k-quant super-block of 256.
    pub const fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q8_0 => 34,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
        }
    }

    /// Weights per unit.
    pub const fn block_values(self) -> usize {
        match self {
            Self::Q4K | Self::Q5K | Self::Q6K => 256,
            _ => BLOCK,
        }
    }

    /// Sub-blocks of 32 weights (one activation block each) per unit.
    const fn subs(self) -> usize {
        self.block_values() / BLOCK
    }

    /// Whether [`blocks::sub_values`] gives signed values (the others are unsigned, with an
    /// offset term where the format has one).
    const fn signed(self) -> bool {
        matches!(self, Self::Q8_0 | Self::Q6K)
    }

    /// Bytes of a weight row of `nb` activation blocks (`nb` a multiple of [`Self::subs`]).
    const fn row_bytes(self, nb: usize) -> usize {
        nb / self.subs() * self.block_bytes()
    }

    /// Rows of `nb` blocks stored in layout `from`, stored in layout `to`.
    fn rearrange(self, nb: usize, blocks: &[u8], from: Layout, to: Layout) -> Vec<u8> {
        let rows = match from {
            Layout::Rows => std::borrow::Cow::Borrowed(blocks),
            Layout::Interleaved => interleaved::rearrange(self, nb, blocks, false).into(),
            Layout::Chunked => chunked::rearrange(self, nb, blocks, false).into(),
        };
        match to {
            Layout::Rows => rows.into_owned(),
            Layout::Interleaved => interleaved::rearrange(self, nb, &rows, true),
            Layout::Chunked => chunked::rearrange(self, nb, &rows, true),
        }
    }

    /// The kind whose discriminant is `index` (a const generic parameter of the kernels).
    const fn from_index(index: u8) -> Self {
        Self::ALL[index as usize]
    }

    fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.ggml() == dtype)
    }

    fn ggml(self) -> GgmlDType {
        match self {
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q5_0 => GgmlDType::Q5_0,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4K => GgmlDType::Q4K,
            Self::Q5K => GgmlDType::Q5K,
            Self::Q6K => GgmlDType::Q6K,
        }
    }
}

/// How a [`QuantMatrix`] stores its blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// GGUF's: row-major, `in_dim / 32` blocks a row.
    Rows,
    /// Runs of 16 rows side by side, block by block ([`interleaved`]): chosen where the CPU
    /// runs its kernels and `out_dim` is a multiple of 16.
    Interleaved,
    /// Rows of GGUF blocks with each run of 8 blocks rearranged for the AVX2 kernels
    /// ([`chunked`]): chosen for the 32-value formats where those kernels run.
    Chunked,
}

impl Layout {
    /// The layout the fastest kernel of this CPU reads for `kind` with `out_dim` rows.
    fn for_kernel(kind: QuantKind, out_dim: usize) -> Self {
        if interleaved::available()
            && interleaved::reads(kind)
            && out_dim.is_multiple_of(interleaved::ROWS)
        {
            return Self::Interleaved;
        }
        #[cfg(target_arch = "x86_64")]
        if chunked::reads(kind) && crate::cpu::has_avx2_fma_f16c() && avx512::kernel(kind).is_none()
        {
            return Self::Chunked;
        }
        Self::Rows
    }
}

/// A weight matrix `[out_dim, in_dim]` in GGUF blocks, `in_dim / 32` blocks a row, stored in
/// the layout the fastest kernel of this CPU reads.
#[derive(Debug, Clone)]
pub struct QuantMatrix {
    kind: QuantKind,
    out_dim: usize,
    in_dim: usize,
    layout: Layout,
    blocks: Vec<u8>,
}

impl QuantMatrix {
    /// The tensor's own blocks when the kernel reads its format ([`QuantKind`]); `None`
    /// otherwise.
    pub fn from_qtensor(weight: &QTensor) -> Result<Option<Self>> {
        let Some(kind) = QuantKind::from_ggml(weight.dtype()) else { return Ok(None) };
        let (out_dim, in_dim) = weight.shape().dims2()?;
        let blocks = weight.data()?.into_owned();
        Self::from_blocks(kind, out_dim, in_dim, blocks).map(Some)
    }

    /// Whether [`Self::from_qtensor`] keeps tensors of `dtype` as they are.
    pub fn reads(dtype: GgmlDType) -> bool {
        QuantKind::from_ggml(dtype).is_some()
    }

    /// Quantizes f32 weights `[out_dim, in_dim]` to `kind` (candle's quantizer, as ggml's).
    pub fn quantize(weight: &candle_core::Tensor, kind: QuantKind) -> Result<Self> {
        let q = QTensor::quantize(weight, kind.ggml())?;
        let (out_dim, in_dim) = q.shape().dims2()?;
        Self::from_blocks(kind, out_dim, in_dim, q.data()?.into_owned())
    }

    fn from_blocks(
        kind: QuantKind,
        out_dim: usize,
        in_dim: usize,
        blocks: Vec<u8>,
    ) -> Result<Self> {
        let unit = kind.block_values();
        let expected = out_dim * (in_dim / unit) * kind.block_bytes();
        if !in_dim.is_multiple_of(unit) || blocks.len() != expected {
            return Err(KernelError::Weight(format!(
                "a {kind:?} weight [{out_dim}, {in_dim}] needs a multiple of {unit} columns and \
                 {expected} bytes, got {} bytes",
                blocks.len()
            )));
        }
        let rows = Self { kind, out_dim, in_dim, layout: Layout::Rows, blocks };
        Ok(rows.with_layout(Layout::for_kernel(kind, out_dim)))
    }

    /// The same matrix stored in `layout`.
    fn with_layout(self, layout: Layout) -> Self {
        if layout == self.layout {
            return self;
        }
        let blocks = self.kind.rearrange(self.in_dim / BLOCK, &self.blocks, self.layout, layout);
        Self { layout, blocks, ..self }
    }

    pub fn kind(&self) -> QuantKind {
        self.kind
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    /// Bytes of weight data held.
    pub fn bytes(&self) -> usize {
        self.blocks.len()
    }

    fn row_bytes(&self) -> usize {
        self.kind.row_bytes(self.in_dim / BLOCK)
    }

    /// Row `row`'s values into `out` (`in_dim` of them), as the dense path dequantizes the
    /// whole matrix.
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        assert!(row < self.out_dim && out.len() == self.in_dim, "a row inside the matrix");
        let nb = self.in_dim / BLOCK;
        let row_bytes = self.row_bytes();
        // The interleaved layout keeps runs of rows together: take the row's run.
        let run = if self.layout == Layout::Interleaved { interleaved::ROWS } else { 1 };
        let first = row / run * run;
        let stored = &self.blocks[first * row_bytes..(first + run) * row_bytes];
        let rows = self.kind.rearrange(nb, stored, self.layout, Layout::Rows);
        let at = (row - first) * row_bytes;
        dense::dequantize(self.kind, &rows[at..at + row_bytes], out);
    }

    /// `out = x W^T`: `x` is `[rows, in_dim]` quantized, `out` is `[rows, out_dim]`.
    /// Splits the weight rows over rayon's pool in tasks of about [`TASK_BYTES`].
    pub fn matmul(&self, x: &QuantizedRows, out: &mut [f32]) {
        Self::matmul_many(&[self], x, &mut [out])
    }

    /// [`Self::matmul`] with the plain scalar kernel (the reference the SIMD ones are tested
    /// against, and the fallback on CPUs without AVX2), on a row-major copy if need be.
    pub fn matmul_scalar(&self, x: &QuantizedRows, out: &mut [f32]) {
        let rows = self.clone().with_layout(Layout::Rows);
        Self::run(&[&rows], x, &mut [out], scalar_kernel)
    }

    /// `outs[i] = x W_i^T` for several weights that read the same activations, in one
    /// parallel region (one wait for the slowest thread instead of one per matrix).
    /// Rows kept for [`Product::Dense`] take the dense path: each weight dequantized a tile
    /// at a time and multiplied with the unquantized rows in f32.
    pub fn matmul_many(weights: &[&QuantMatrix], x: &QuantizedRows, outs: &mut [&mut [f32]]) {
        if x.product == Product::Blocks {
            return Self::run(weights, x, outs, kernel_for);
        }
        assert_eq!(weights.len(), outs.len(), "one output per weight");
        for (w, out) in weights.iter().zip(outs.iter_mut()) {
            w.matmul_dense(&x.values, x.rows, out);
        }
    }

    fn run(
        weights: &[&QuantMatrix],
        x: &QuantizedRows,
        outs: &mut [&mut [f32]],
        kernel_of: fn(QuantKind, Layout) -> Kernel,
    ) {
        let rows = x.rows;
        assert_eq!(weights.len(), outs.len(), "one output per weight");
        for (w, out) in weights.iter().zip(outs.iter()) {
            assert_eq!(x.blocks_per_row * BLOCK, w.in_dim, "activation width");
            assert_eq!(out.len(), rows * w.out_dim, "output size");
        }
        // Each task owns a contiguous run of weight rows, so the columns of `out` it writes.
        let tasks = weights.par_iter().zip(outs.par_iter_mut()).flat_map(|(w, out)| {
            let unit = if w.layout == Layout::Interleaved { interleaved::ROWS } else { 1 };
            let task_rows = (TASK_BYTES / w.row_bytes()).clamp(4, w.out_dim.max(4));
            let task_rows = task_rows.next_multiple_of(unit);
            let out = Columns { ptr: out.as_mut_ptr(), stride: w.out_dim };
            (0..w.out_dim.div_ceil(task_rows)).into_par_iter().map(move |i| {
                let first = i * task_rows;
                (*w, first..(first + task_rows).min(w.out_dim), out)
            })
        });
        tasks.for_each(|(w, columns, out)| {
            let row_bytes = w.row_bytes();
            let blocks = &w.blocks[columns.start * row_bytes..columns.end * row_bytes];
            let kernel = kernel_of(w.kind, w.layout);
            for group in (0..rows).step_by(ROW_GROUP) {
                let group_rows = (rows - group).min(ROW_GROUP);
                let acts = x.group(group, group_rows);
                // SAFETY: rows `group..group + group_rows` and columns `columns` lie inside
                // `out` (`[rows, out_dim]`, checked above), and no other task writes them.
                unsafe {
                    kernel(blocks, x.blocks_per_row, acts, group_rows, out.at(group, columns.start))
                };
            }
        });
    }
}

/// Where a kernel writes its products: `out[r * stride + o]` for its activation rows `r` and
/// weight rows `o`, counted from `ptr`. A pointer, not a slice, because the parallel tasks
/// of one product write interleaved parts of the same `[rows, out_dim]` output: each task
/// its own columns of every row. Each output is written by exactly one kernel call.
#[derive(Debug, Clone, Copy)]
struct Columns {
    ptr: *mut f32,
    stride: usize,
}

// SAFETY: tasks that share a `Columns` write disjoint elements (see `QuantMatrix::run`), and
// the output it points into outlives the parallel region.
unsafe impl Send for Columns {}
// SAFETY: as for `Send`: no two tasks write the same element, and none reads.
unsafe impl Sync for Columns {}

impl Columns {
    /// The same output, counted from row `r` and column `o`.
    ///
    /// # Safety
    /// The element at `(r, o)` must lie inside the output.
    unsafe fn at(self, r: usize, o: usize) -> Self {
        // SAFETY: `(r, o)` lies inside the output (the caller's promise).
        Self { ptr: unsafe { self.ptr.add(r * self.stride + o) }, ..self }
    }

    /// Writes `v` to `(r, o)`.
    ///
    /// # Safety
    /// `(r, o)` must be inside what the caller handed this kernel call: one of its rows and
    /// one of its weight rows.
    #[inline(always)]
    unsafe fn write(self, o: usize, r: usize, v: f32) {
        // SAFETY: `(r, o)` lies inside the output (the caller's promise).
        let at = unsafe { self.at_mut(o, r) };
        // SAFETY: `at` is one element of the output that no other task writes.
        unsafe { *at = v };
    }

    /// Where `(r, o)` is, for a vector store of the columns from `o`.
    ///
    /// # Safety
    /// As [`Self::write`]'s, for every column written there.
    #[inline(always)]
    unsafe fn at_mut(self, o: usize, r: usize) -> *mut f32 {
        // SAFETY: `(r, o)` lies inside the output (the caller's promise).
        unsafe { self.ptr.add(r * self.stride + o) }
    }
}

/// f32 lanes per block in [`QuantizedRows`]'s scale arrays: a 256-bit vector, so the SIMD
/// kernels load one block's scale (or two blocks' in 512 bits) without a broadcast.
const LANES: usize = 8;

/// Activation rows `[rows, width]` quantized per block of 32, reusable across steps.
#[derive(Debug, Clone, Default)]
pub struct QuantizedRows {
    rows: usize,
    blocks_per_row: usize,
    /// `[rows, width]`: the 8-bit values, blocks side by side.
    qs: Vec<i8>,
    /// `[rows, width]`: the values plus 128, as unsigned bytes: `vpdpbusd` multiplies
    /// unsigned by signed bytes, so signed weights (row-major Q8_0) take these, and the
    /// kernel subtracts `128 * sum(w)` once per weight block instead of fixing signs per row.
    qu: Vec<u8>,
    /// `[rows, width / 32]`: each block's `-128 * sum(q)`, where the sums of weights stored
    /// plus 128 (interleaved Q8_0) against these values start.
    offsets: Vec<i32>,
    /// `[rows, width / 32, LANES]`: each block's scale `d` (`x ~= d * q`) in every lane.
    d: Vec<f32>,
    /// `[rows, width / 32]`: each block's `d` once, so that a kernel loads the scales of 8
    /// consecutive blocks as one vector.
    block_d: Vec<f32>,
    /// `[rows, width / 32]`: each block's `d * sum(q)`, for the offset terms.
    s: Vec<f32>,
    /// `[rows, width]`: the rows as given, for [`Product::Dense`] (which multiplies them in
    /// f32); empty for [`Product::Blocks`].
    values: Vec<f32>,
    product: Product,
}

/// How products with a [`QuantizedRows`] run. The caller chooses by phase, never by the
/// number of rows, so that a row's result does not depend on how many rows share its pass
/// (a decode batch of any size gives each sequence what it would get alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Product {
    /// The 8-bit rows times the weight's blocks: reads each weight once per step and
    /// dequantizes nothing, the fastest for the few rows of a decode step.
    #[default]
    Blocks,
    /// The f32 rows times the weight dequantized a tile at a time with an f32 GEMM: the
    /// fastest for the many rows of a prefill, and the exact product of the file's values.
    Dense,
}

/// Some rows of a [`QuantizedRows`], as a kernel reads them.
#[derive(Debug, Clone, Copy)]
struct Acts<'a> {
    qs: &'a [i8],
    // The unsigned copy and its block offsets feed the x86-64 interleaved kernels only.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    qu: &'a [u8],
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    offsets: &'a [i32],
    d: &'a [f32],
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    block_d: &'a [f32],
    s: &'a [f32],
}

impl<'a> Acts<'a> {
    /// Whether the slices hold `rows` rows of `nb` blocks, as the SIMD kernels read them.
    #[cfg(target_arch = "x86_64")]
    fn fits(&self, rows: usize, nb: usize) -> bool {
        self.qs.len() == rows * nb * BLOCK
            && self.qu.len() == self.qs.len()
            && self.offsets.len() == rows * nb
            && self.d.len() == rows * nb * LANES
            && self.block_d.len() == rows * nb
            && self.s.len() == rows * nb
    }

    /// Block `b` of the group's row-major blocks: its values, `d` and `d * sum(q)`.
    fn block(&self, b: usize) -> (&'a [i8], f32, f32) {
        (&self.qs[b * BLOCK..(b + 1) * BLOCK], self.d[b * LANES], self.s[b])
    }
}

impl QuantizedRows {
    /// Quantizes `x`: `[rows, width]`, `width` a multiple of 32, for [`Product::Blocks`].
    pub fn new(x: &[f32], rows: usize) -> Self {
        let mut q = Self::default();
        q.quantize(x, rows);
        q
    }

    /// An empty buffer whose rows will be multiplied as `product` says.
    pub fn for_product(product: Product) -> Self {
        Self { product, ..Self::default() }
    }

    /// Takes `x` `[rows, width]` into this buffer, reusing its allocation: quantized for
    /// [`Product::Blocks`], as given for [`Product::Dense`].
    pub fn quantize(&mut self, x: &[f32], rows: usize) {
        assert!(rows > 0 && x.len().is_multiple_of(rows * BLOCK), "width must be a multiple of 32");
        self.rows = rows;
        self.blocks_per_row = x.len() / rows / BLOCK;
        if self.product == Product::Dense {
            self.values.clear();
            self.values.extend_from_slice(x);
            return;
        }
        let blocks = x.len() / BLOCK;
        self.qs.clear();
        self.qs.resize(x.len(), 0);
        self.d.clear();
        self.d.resize(blocks * LANES, 0.0);
        self.block_d.clear();
        self.block_d.resize(blocks, 0.0);
        self.s.clear();
        self.s.resize(blocks, 0.0);
        self.offsets.clear();
        self.offsets.resize(blocks, 0);
        let quantize_block = block_quantizer();
        let per_block = x.chunks_exact(BLOCK).zip(self.qs.chunks_exact_mut(BLOCK));
        let sums = self.s.iter_mut().zip(&mut self.offsets);
        let scales = self.d.chunks_exact_mut(LANES).zip(&mut self.block_d);
        for (((x, qs), (d, block_d)), (s, offset)) in per_block.zip(scales).zip(sums) {
            let (scale, sum) = quantize_block(x, qs);
            d.fill(scale);
            *block_d = scale;
            *s = scale * sum as f32;
            *offset = -128 * sum;
        }
        self.qu.clear();
        self.qu.extend(self.qs.iter().map(|&q| q as u8 ^ 0x80));
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Rows `first..first + n`.
    fn group(&self, first: usize, n: usize) -> Acts<'_> {
        let nb = self.blocks_per_row;
        let (b0, b1) = (first * nb, (first + n) * nb);
        Acts {
            qs: &self.qs[b0 * BLOCK..b1 * BLOCK],
            qu: &self.qu[b0 * BLOCK..b1 * BLOCK],
            offsets: &self.offsets[b0..b1],
            d: &self.d[b0 * LANES..b1 * LANES],
            block_d: &self.block_d[b0..b1],
            s: &self.s[b0..b1],
        }
    }
}

/// Quantizes 32 values into `qs`; returns `(d, sum(q))`.
type BlockQuantizer = fn(&[f32], &mut [i8]) -> (f32, i32);

/// The fastest [`BlockQuantizer`] this CPU runs; all give the same bits.
fn block_quantizer() -> BlockQuantizer {
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        return avx512::quantize_block;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::cpu::has_avx2_fma_f16c() {
        return avx2::quantize_block;
    }
    quantize_block
}

/// The plain [`BlockQuantizer`]: `d = max|x| / 127`, `q = round(x / d)` (halves away from
/// zero).
fn quantize_block(x: &[f32], qs: &mut [i8]) -> (f32, i32) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in qs.iter_mut().zip(x) {
        *q = (v * inv).round() as i8;
        sum += *q as i32;
    }
    (d, sum)
}

/// Computes `group_rows` activation rows against every weight row of `weights`:
/// `(weights, blocks_per_row, acts [group_rows, blocks_per_row], group_rows, out)` writes
/// `out` at every `(o, r)`.
///
/// # Safety
/// `out` must have room for `group_rows` rows and as many columns as `weights` holds rows.
type Kernel = unsafe fn(&[u8], usize, Acts<'_>, usize, Columns);

fn kernel_for(kind: QuantKind, layout: Layout) -> Kernel {
    #[cfg(target_arch = "x86_64")]
    match layout {
        Layout::Interleaved => return interleaved::kernel(kind),
        Layout::Chunked => return avx2::kernel(kind, avx2::vnni_available()),
        Layout::Rows => {
            if let Some(kernel) = avx512::kernel(kind) {
                return kernel;
            }
            // The AVX2 kernels read the 32-value formats rearranged only.
            if crate::cpu::has_avx2_fma_f16c() && !chunked::reads(kind) {
                return avx2::kernel(kind, avx2::vnni_available());
            }
        }
    }
    scalar_kernel(kind, layout)
}

/// The layout a kernel reads for a kind.
#[cfg(test)]
type LayoutOf = fn(QuantKind) -> Layout;

/// A kernel with the layout it reads.
#[cfg(test)]
type KernelWithLayout = (LayoutOf, fn(QuantKind, Layout) -> Kernel);

/// Every kernel this CPU can run with the layout each reads, the scalar one first (for
/// tests).
#[cfg(test)]
fn all_kernels() -> Vec<KernelWithLayout> {
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut kernels: Vec<KernelWithLayout> = vec![(|_| Layout::Rows, scalar_kernel)];
    #[cfg(target_arch = "x86_64")]
    {
        let avx2_layout: LayoutOf =
            |kind| if chunked::reads(kind) { Layout::Chunked } else { Layout::Rows };
        if crate::cpu::has_avx2_fma_f16c() {
            kernels.push((avx2_layout, |kind, _| avx2::kernel(kind, false)));
        }
        if avx2::vnni_available() {
            kernels.push((avx2_layout, |kind, _| avx2::kernel(kind, true)));
        }
        if avx512::available() {
            kernels.push((
                |kind| match avx512::kernel(kind) {
                    Some(_) => Layout::Rows,
                    None if chunked::reads(kind) => Layout::Chunked,
                    None => Layout::Rows,
                },
                |kind, _| avx512::kernel(kind).unwrap_or_else(|| avx2::kernel(kind, false)),
            ));
        }
    }
    kernels
}

fn scalar_kernel(kind: QuantKind, layout: Layout) -> Kernel {
    debug_assert_eq!(layout, Layout::Rows, "the scalar kernels read row-major blocks");
    match kind {
        QuantKind::Q4_0 => scalar::<{ QuantKind::Q4_0 as u8 }>,
        QuantKind::Q4_1 => scalar::<{ QuantKind::Q4_1 as u8 }>,
        QuantKind::Q5_0 => scalar::<{ QuantKind::Q5_0 as u8 }>,
        QuantKind::Q8_0 => scalar::<{ QuantKind::Q8_0 as u8 }>,
        QuantKind::Q4K => scalar::<{ QuantKind::Q4K as u8 }>,
        QuantKind::Q5K => scalar::<{ QuantKind::Q5K as u8 }>,
        QuantKind::Q6K => scalar::<{ QuantKind::Q6K as u8 }>,
    }
}

fn half_at(block: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([block[at], block[at + 1]]).to_f32()
}

/// The portable kernel for the kind whose discriminant is `K`: every weight row against
/// every activation row, each sub-block's two halves summed in integers and scaled apart
/// ([`blocks`]).
///
/// # Safety
/// As a [`Kernel`]'s.
unsafe fn scalar<const K: u8>(
    weights: &[u8],
    nb: usize,
    acts: Acts<'_>,
    rows: usize,
    out: Columns,
) {
    let kind = QuantKind::from_index(K);
    let (bb, subs) = (kind.block_bytes(), kind.subs());
    let mut scales = blocks::UnitScales::default();
    let mut sums = [0.0f32; ROW_GROUP];
    for (o, row) in weights.chunks_exact(kind.row_bytes(nb)).enumerate() {
        sums.fill(0.0);
        for (u, unit) in row.chunks_exact(bb).enumerate() {
            blocks::unit_scales(kind, unit, &mut scales);
            for sub in 0..subs {
                let w = blocks::sub_values(kind, unit, sub);
                let (d, m) = (&scales.d[2 * sub..2 * sub + 2], scales.m[sub]);
                for (r, sum) in sums[..rows].iter_mut().enumerate() {
                    let (x, dx, sx) = acts.block(r * nb + u * subs + sub);
                    let half = |h: usize| -> f32 {
                        let pairs = w[16 * h..16 * h + 16].iter().zip(&x[16 * h..16 * h + 16]);
                        pairs.map(|(&w, &x)| w as i32 * x as i32).sum::<i32>() as f32
                    };
                    *sum += dx * (d[0] * half(0) + d[1] * half(1)) + m * sx;
                }
            }
        }
        for (r, &sum) in sums[..rows].iter().enumerate() {
            // SAFETY: `o` is one of the weight rows and `r` one of the rows handed over.
            unsafe { out.write(o, r, sum) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, rng: &mut StdRng) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// Dequantized weight `[out, in]` from the blocks, as [`blocks`] reads them.
    fn dequantize(m: &QuantMatrix) -> Vec<f32> {
        let m = m.clone().with_layout(Layout::Rows);
        let mut dense = vec![0.0; m.out_dim * m.in_dim];
        blocks::dequantize(m.kind, &m.blocks, &mut dense);
        dense
    }

    /// Random weights with a spread of magnitudes across rows and blocks, so that the
    /// k-quants' per-32 scales and mins differ from one sub-block to the next.
    fn random_weights(out_dim: usize, in_dim: usize, rng: &mut StdRng) -> Tensor {
        let w: Vec<f32> = (0..out_dim * in_dim)
            .map(|i| {
                let spread = 0.25 + ((i / 16) % 7) as f32 * 0.5;
                let bias = if (i / 32) % 3 == 0 { 0.3 } else { 0.0 };
                rng.random_range(-1.0f32..1.0) * spread + bias
            })
            .collect();
        Tensor::from_vec(w, (out_dim, in_dim), &Device::Cpu).unwrap()
    }

    /// Our reading of every format's blocks gives candle's dequantized values, to the bit.
    #[test]
    fn blocks_dequantize_as_candle_does() {
        let mut rng = StdRng::seed_from_u64(1);
        for kind in QuantKind::ALL {
            let w = random_weights(6, 512, &mut rng);
            let m = QuantMatrix::quantize(&w, kind).unwrap();
            let candle = QTensor::quantize(&w, kind.ggml()).unwrap().dequantize(&Device::Cpu);
            let candle: Vec<f32> = candle.unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let ours = dequantize(&m);
            assert_eq!(ours.len(), candle.len(), "{kind:?}");
            for (i, (a, b)) in ours.iter().zip(&candle).enumerate() {
                // Equal up to the rounding of `d * q + m` against candle's own order.
                let tol = 1e-6 * (1.0 + b.abs());
                assert!((a - b).abs() <= tol, "{kind:?} value {i}: {a} against candle's {b}");
            }
        }
    }

    /// A file's tensor is taken as its own blocks for every kind, and refused with a clear
    /// error where the columns are not whole units.
    #[test]
    fn file_tensors_keep_their_blocks() {
        let mut rng = StdRng::seed_from_u64(2);
        let w = random_weights(4, 256, &mut rng);
        for kind in QuantKind::ALL {
            let q = QTensor::quantize(&w, kind.ggml()).unwrap();
            let m = QuantMatrix::from_qtensor(&q).unwrap().expect("a kind the kernel reads");
            assert_eq!((m.kind(), m.bytes()), (kind, q.storage_size_in_bytes()));
        }
        let f16 = QTensor::quantize(&w, GgmlDType::F16).unwrap();
        assert!(QuantMatrix::from_qtensor(&f16).unwrap().is_none());
        let err = QuantMatrix::from_blocks(QuantKind::Q4K, 1, 96, vec![0; 144]).unwrap_err();
        assert!(err.to_string().contains("multiple of 256 columns"), "{err}");
    }

    /// The scalar kernel against the dequantized weights times the dequantized activations
    /// in f64; every SIMD kernel the CPU has against the scalar one, for 1 to 8 rows (and 11:
    /// two row groups) and odd shapes, on row-major blocks and (where chosen) interleaved
    /// ones; several weights in one region as each alone. Every kind.
    #[test]
    fn kernels_match_a_plain_reference() {
        let mut rng = StdRng::seed_from_u64(7);
        for kind in QuantKind::ALL {
            // 71 blocks: more than one span of Q4_1 offsets (64 blocks), an odd count; the
            // k-quants take whole super-blocks of 256.
            let shapes: &[(usize, usize)] = match kind.block_values() {
                BLOCK => &[
                    (1, 32),
                    (7, 96),
                    (130, 64),
                    (19, 288),
                    (5, 71 * 32),
                    (16, 64),
                    (48, 288),
                    (32, 71 * 32),
                    (1040, 96),
                    (6, 16 * 32),
                    (3, 28 * 32),
                ],
                _ => &[(1, 256), (7, 512), (16, 256), (33, 3 * 256), (130, 256)],
            };
            for &(out_dim, in_dim) in shapes {
                let w = random_weights(out_dim, in_dim, &mut rng);
                let m = QuantMatrix::quantize(&w, kind).unwrap();
                assert_eq!(m.layout, Layout::for_kernel(kind, out_dim), "{out_dim} rows");
                let dense = dequantize(&m);
                for rows in (1..=8).chain([11]) {
                    let x = QuantizedRows::new(&random(rows * in_dim, &mut rng), rows);
                    let mut scalar = vec![0.0; rows * out_dim];
                    m.matmul_scalar(&x, &mut scalar);
                    let mut simd: Vec<Vec<f32>> = all_kernels()
                        .into_iter()
                        .map(|(layout, kernel)| {
                            let mut out = vec![0.0; rows * out_dim];
                            let m = m.clone().with_layout(layout(kind));
                            QuantMatrix::run(&[&m], &x, &mut [&mut out], kernel);
                            out
                        })
                        .collect();
                    // Two weights in one region give what each gives alone.
                    let (mut a, mut b) = (vec![0.0; rows * out_dim], vec![0.0; rows * out_dim]);
                    QuantMatrix::matmul_many(&[&m, &m], &x, &mut [&mut a, &mut b]);
                    let mut alone = vec![0.0; rows * out_dim];
                    m.matmul(&x, &mut alone);
                    assert!(a == alone && b == alone, "{kind:?}: matmul_many differs");
                    // The layout this CPU chose, through its own kernel.
                    simd.push(alone);
                    for r in 0..rows {
                        let nb = in_dim / 32;
                        let xs: Vec<f64> = (r * nb..(r + 1) * nb)
                            .flat_map(|b| {
                                let (qs, d, _) = x.group(0, rows).block(b);
                                qs.iter().map(move |&q| d as f64 * q as f64)
                            })
                            .collect();
                        for o in 0..out_dim {
                            let wrow = &dense[o * in_dim..(o + 1) * in_dim];
                            let exact: f64 = wrow.iter().zip(&xs).map(|(&w, x)| w as f64 * x).sum();
                            let scale: f64 =
                                wrow.iter().zip(&xs).map(|(&w, x)| (w as f64 * x).abs()).sum();
                            let tol = 1e-5 * scale.max(1e-6);
                            let s = scalar[r * out_dim + o];
                            assert!((s as f64 - exact).abs() <= tol, "{kind:?} scalar {s} {exact}");
                            for (k, simd) in simd.iter().enumerate() {
                                let v = simd[r * out_dim + o];
                                assert!(
                                    (v - s).abs() as f64 <= tol,
                                    "{kind:?} kernel {k}: {v} {s}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// Products of many rows multiply the unquantized rows by the dequantized weights in
    /// f32 (the dense path), across tiles (2,100 rows of 256 columns: two tiles), on both
    /// layouts; the dequantization this CPU runs gives the portable one's values.
    #[test]
    fn many_rows_take_the_dequantized_weights_in_f32() {
        let mut rng = StdRng::seed_from_u64(11);
        for kind in QuantKind::ALL {
            for (out_dim, in_dim, rows) in [(2100, 256, 1), (2100, 256, 32), (48, 512, 45)] {
                let m = QuantMatrix::quantize(&random_weights(out_dim, in_dim, &mut rng), kind)
                    .unwrap();
                let reference = dequantize(&m);
                let mut fast = vec![0.0; reference.len()];
                let row_major = m.clone().with_layout(Layout::Rows);
                dense::dequantize(kind, &row_major.blocks, &mut fast);
                for (a, b) in fast.iter().zip(&reference) {
                    assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{kind:?}: {a} {b}");
                }
                let x = random(rows * in_dim, &mut rng);
                let mut q = QuantizedRows::for_product(Product::Dense);
                q.quantize(&x, rows);
                let mut out = vec![0.0; rows * out_dim];
                m.matmul(&q, &mut out);
                for r in 0..rows {
                    let xs = &x[r * in_dim..(r + 1) * in_dim];
                    for o in 0..out_dim {
                        let w = &reference[o * in_dim..(o + 1) * in_dim];
                        let exact: f64 = w.iter().zip(xs).map(|(&w, &x)| w as f64 * x as f64).sum();
                        let scale: f64 =
                            w.iter().zip(xs).map(|(&w, &x)| (w as f64 * x as f64).abs()).sum();
                        let v = out[r * out_dim + o] as f64;
                        assert!((v - exact).abs() <= 1e-5 * scale, "{kind:?} {v} {exact}");
                    }
                }
            }
        }
    }

    /// A row dequantized alone gives the values of the whole matrix dequantized, bit for bit
    /// (the same arithmetic), from every layout that stores the kind.
    #[test]
    fn a_row_dequantizes_as_the_whole_matrix() {
        let mut rng = StdRng::seed_from_u64(13);
        for kind in QuantKind::ALL {
            let (out_dim, in_dim) = (48, if kind.block_values() == BLOCK { 9 * 32 } else { 512 });
            let m = QuantMatrix::quantize(&random_weights(out_dim, in_dim, &mut rng), kind)
                .unwrap()
                .with_layout(Layout::Rows);
            let mut whole = vec![0.0; out_dim * in_dim];
            dense::dequantize(kind, &m.blocks, &mut whole);
            let mut layouts = vec![Layout::Rows];
            if chunked::reads(kind) {
                layouts.push(Layout::Chunked);
            }
            if interleaved::reads(kind) {
                layouts.push(Layout::Interleaved);
            }
            for layout in layouts {
                let stored = m.clone().with_layout(layout);
                for (r, expected) in whole.chunks_exact(in_dim).enumerate() {
                    let mut row = vec![0.0; in_dim];
                    stored.dequantize_row(r, &mut row);
                    let same = row.iter().zip(expected).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{kind:?} {layout:?} row {r}");
                }
            }
        }
    }

    /// Every block quantizer this CPU has gives the plain one's bits, halves included.
    #[test]
    fn block_quantizers_agree_bit_for_bit() {
        let mut rng = StdRng::seed_from_u64(5);
        // amax 127: d = 1, so x.5 values are exact halves.
        let mut halves: Vec<f32> = (0..31).map(|i| i as f32 * 4.0 - 62.5).collect();
        halves.push(-127.0);
        let mut cases = vec![halves, vec![0.0; 32]];
        // Random blocks over many magnitudes: each lane's place in the output is checked.
        for i in 0..200 {
            let scale = 10f32.powi(i % 9 - 4);
            cases.push(random(32, &mut rng).iter().map(|v| v * scale).collect());
        }
        #[allow(unused_mut)]
        let mut quantizers: Vec<BlockQuantizer> = vec![quantize_block];
        #[cfg(target_arch = "x86_64")]
        if avx512::available() {
            quantizers.push(avx512::quantize_block);
        }
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::has_avx2_fma_f16c() {
            quantizers.push(avx2::quantize_block);
        }
        for x in &cases {
            let mut reference = [0i8; 32];
            let (d, s) = quantize_block(x, &mut reference);
            for quantize in &quantizers[1..] {
                let mut qs = [0i8; 32];
                let (d2, s2) = quantize(x, &mut qs);
                assert_eq!((qs, d2.to_bits(), s2), (reference, d.to_bits(), s));
            }
        }
    }

    #[test]
    fn activations_round_to_the_nearest_step() {
        let x: Vec<f32> = (0..32).map(|i| i as f32 - 10.0).collect();
        let q = QuantizedRows::new(&x, 1);
        let (qs, d, s) = q.group(0, 1).block(0);
        assert_eq!(d, 21.0 / 127.0);
        for (q, v) in qs.iter().zip(&x) {
            assert!((*q as f32 * d - v).abs() <= d / 2.0 + 1e-6);
        }
        assert_eq!(s, d * qs.iter().map(|&q| q as i32).sum::<i32>() as f32);
        // The lanes the SIMD kernels load: `d` in all 8.
        assert!(q.d.iter().all(|&v| v == d));
        let zeros = QuantizedRows::new(&[0.0; 64], 2);
        assert!(zeros.qs.iter().all(|&q| q == 0) && zeros.d.iter().all(|&d| d == 0.0));
    }
}
