//! Key or value rows as a KV cache stores them, in one of five types: f32, f16, bf16, or
//! q8_0 and q4_0 blocks (see [`crate::kv_blocks`]). A stored unit is one element or one
//! block of 32; [`KvElement`] converts units from and to f32, and [`RowsRef`] is a borrowed
//! run of rows in whichever type they are stored, which attention widens small blocks at a
//! time.

use std::borrow::Cow;
use std::ops::Range;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::kv_blocks::{BlockQ4_0, BlockQ8_0, BLOCK_ELEMENTS};

/// A type rows are stored in, with its conversions from and to f32 (`half`'s slice
/// conversions, F16C instructions where the CPU has them, or a block's (de)quantization).
/// A unit holds [`Self::ELEMENTS`] elements: 1, or a block of 32.
pub trait KvElement: Copy + Default + Send + Sync + 'static {
    const ELEMENTS: usize;
    /// `dst = src` widened; `dst` holds `ELEMENTS` elements per unit of `src`.
    fn widen(src: &[Self], dst: &mut [f32]);
    /// `dst = src` rounded to nearest (quantized); `src` holds `ELEMENTS` per unit of `dst`.
    fn narrow(src: &[f32], dst: &mut [Self]);
    /// The slice as a type-tagged view.
    fn view(data: &[Self]) -> RowsRef<'_>;

    /// The units holding elements `range` (whole units: rows are whole blocks).
    fn units(range: Range<usize>) -> Range<usize> {
        debug_assert!(
            range.start.is_multiple_of(Self::ELEMENTS) && range.end.is_multiple_of(Self::ELEMENTS),
            "element range {range:?} splits a block"
        );
        range.start / Self::ELEMENTS..range.end / Self::ELEMENTS
    }
}

impl KvElement for f32 {
    const ELEMENTS: usize = 1;
    fn view(data: &[f32]) -> RowsRef<'_> {
        RowsRef::F32(data)
    }
    fn widen(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn narrow(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

impl KvElement for f16 {
    const ELEMENTS: usize = 1;
    fn view(data: &[f16]) -> RowsRef<'_> {
        RowsRef::F16(data)
    }
    fn widen(src: &[f16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    fn narrow(src: &[f32], dst: &mut [f16]) {
        dst.convert_from_f32_slice(src);
    }
}

impl KvElement for bf16 {
    const ELEMENTS: usize = 1;
    fn view(data: &[bf16]) -> RowsRef<'_> {
        RowsRef::Bf16(data)
    }
    fn widen(src: &[bf16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    fn narrow(src: &[f32], dst: &mut [bf16]) {
        dst.convert_from_f32_slice(src);
    }
}

impl KvElement for BlockQ8_0 {
    const ELEMENTS: usize = BLOCK_ELEMENTS;
    fn view(data: &[BlockQ8_0]) -> RowsRef<'_> {
        RowsRef::Q8_0(data)
    }
    fn widen(src: &[BlockQ8_0], dst: &mut [f32]) {
        src.iter().zip(dst.chunks_exact_mut(BLOCK_ELEMENTS)).for_each(|(b, d)| b.dequantize(d));
    }
    fn narrow(src: &[f32], dst: &mut [BlockQ8_0]) {
        let blocks = src.chunks_exact(BLOCK_ELEMENTS);
        dst.iter_mut().zip(blocks).for_each(|(d, s)| *d = BlockQ8_0::quantize(s));
    }
}

impl KvElement for BlockQ4_0 {
    const ELEMENTS: usize = BLOCK_ELEMENTS;
    fn view(data: &[BlockQ4_0]) -> RowsRef<'_> {
        RowsRef::Q4_0(data)
    }
    fn widen(src: &[BlockQ4_0], dst: &mut [f32]) {
        src.iter().zip(dst.chunks_exact_mut(BLOCK_ELEMENTS)).for_each(|(b, d)| b.dequantize(d));
    }
    fn narrow(src: &[f32], dst: &mut [BlockQ4_0]) {
        let blocks = src.chunks_exact(BLOCK_ELEMENTS);
        dst.iter_mut().zip(blocks).for_each(|(d, s)| *d = BlockQ4_0::quantize(s));
    }
}

/// Stored rows borrowed in their own type, flattened `[len, head_dim]`: what attention
/// reads, widening small blocks at a time.
#[derive(Debug, Clone, Copy)]
pub enum RowsRef<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
    Q8_0(&'a [BlockQ8_0]),
    Q4_0(&'a [BlockQ4_0]),
}

/// Runs `$body` with `$v` bound to the slice of whichever type `$rows` holds.
macro_rules! each_type {
    ($rows:expr, $v:ident => $body:expr) => {
        match $rows {
            RowsRef::F32($v) => $body,
            RowsRef::F16($v) => $body,
            RowsRef::Bf16($v) => $body,
            RowsRef::Q8_0($v) => $body,
            RowsRef::Q4_0($v) => $body,
        }
    };
}

/// Elements a slice of units holds.
fn elements<T: KvElement>(v: &[T]) -> usize {
    v.len() * T::ELEMENTS
}

/// `dst = v`'s elements `range`, widened.
fn widen_range<T: KvElement>(v: &[T], range: Range<usize>, dst: &mut [f32]) {
    T::widen(&v[T::units(range)], dst)
}

impl<'a> RowsRef<'a> {
    /// Elements held.
    pub fn len(&self) -> usize {
        each_type!(self, v => elements(v))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements `range` in f32: borrowed when stored in f32, else widened into a new buffer.
    pub fn widen(self, range: Range<usize>) -> Cow<'a, [f32]> {
        match self {
            RowsRef::F32(v) => Cow::Borrowed(&v[range]),
            _ => {
                let mut out = vec![0.0; range.len()];
                self.widen_into(range, &mut out);
                Cow::Owned(out)
            }
        }
    }

    /// Widens elements `range` (whole blocks for a quantized type) into `dst` (of the same
    /// length).
    pub fn widen_into(self, range: Range<usize>, dst: &mut [f32]) {
        each_type!(self, v => widen_range(v, range, dst))
    }

    /// Elements `range` as f32 without copying when stored in f32; otherwise widened into
    /// `scratch` (resized to fit). For kernels that read blocks in a loop.
    pub fn widen_block<'s>(self, range: Range<usize>, scratch: &'s mut Vec<f32>) -> &'s [f32]
    where
        'a: 's,
    {
        match self {
            RowsRef::F32(v) => &v[range],
            _ => {
                scratch.resize(range.len(), 0.0);
                self.widen_into(range, scratch);
                scratch
            }
        }
    }
}
