//! How the KV cache stores keys and values: f16 (the default), bf16 or f32.
//!
//! Everything computes in f32: rows are widened when read and narrowed when written, with
//! `half`'s slice conversions (F16C instructions where the CPU has them, detected at run
//! time). The element types share one small trait, so each operation is written once.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use serde::{Deserialize, Serialize};

use crate::error::CompressError;

/// The element type of a cache's keys and values.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum KvDtype {
    /// IEEE half precision: 10-bit mantissa, range up to 65504.
    #[default]
    F16,
    /// bfloat16: f32's range with a 7-bit mantissa.
    Bf16,
    /// Single precision, as the forward pass computes.
    F32,
}

impl KvDtype {
    pub const ALL: [KvDtype; 3] = [KvDtype::F16, KvDtype::Bf16, KvDtype::F32];

    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F16 => "f16",
            KvDtype::Bf16 => "bf16",
            KvDtype::F32 => "f32",
        }
    }

    /// Bytes of one stored element.
    pub fn size_bytes(self) -> usize {
        match self {
            KvDtype::F16 | KvDtype::Bf16 => 2,
            KvDtype::F32 => 4,
        }
    }
}

impl fmt::Display for KvDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KvDtype {
    type Err = CompressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        KvDtype::ALL.into_iter().find(|d| d.name() == s.trim().to_ascii_lowercase()).ok_or_else(
            || CompressError::invalid("kv-dtype", format!("expected f16, bf16 or f32, got `{s}`")),
        )
    }
}

/// An element type the cache can store, with its conversions from and to f32.
pub trait KvElement: Copy + Default + Send + Sync + 'static {
    const DTYPE: KvDtype;
    /// `dst = src` widened; the slices have the same length.
    fn widen(src: &[Self], dst: &mut [f32]);
    /// `dst = src` rounded to nearest; the slices have the same length.
    fn narrow(src: &[f32], dst: &mut [Self]);
    /// The slice as a dtype-tagged view.
    fn view(data: &[Self]) -> RowsRef<'_>;
}

impl KvElement for f32 {
    const DTYPE: KvDtype = KvDtype::F32;
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
    const DTYPE: KvDtype = KvDtype::F16;
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
    const DTYPE: KvDtype = KvDtype::Bf16;
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

/// Runs `$body` with `$v` bound to the vector (or slice) of whichever dtype `$rows` holds.
macro_rules! each_dtype {
    ($kind:ident, $rows:expr, $v:ident => $body:expr) => {
        match $rows {
            $kind::F32($v) => $body,
            $kind::F16($v) => $body,
            $kind::Bf16($v) => $body,
        }
    };
}

/// [`Rows::spread_row`] for one element type, a few columns at a time through stack buffers.
fn spread_row<T: KvElement>(
    rows: &mut [T],
    width: usize,
    from: usize,
    to: Range<usize>,
    divisor: f32,
) {
    const COLUMNS: usize = 16;
    let (mut share, mut target) = ([0.0f32; COLUMNS], [0.0f32; COLUMNS]);
    for start in (0..width).step_by(COLUMNS) {
        let n = COLUMNS.min(width - start);
        T::widen(&rows[from * width + start..][..n], &mut share[..n]);
        share[..n].iter_mut().for_each(|s| *s /= divisor);
        for t in to.clone() {
            let row = &mut rows[t * width + start..][..n];
            T::widen(row, &mut target[..n]);
            target[..n].iter_mut().zip(&share[..n]).for_each(|(x, s)| *x += s);
            T::narrow(&target[..n], row);
        }
    }
}

/// Stored rows, flattened `[len, head_dim]`, in one dtype.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Rows {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
}

impl Rows {
    /// Empty rows with room for `capacity` elements.
    pub fn with_capacity(dtype: KvDtype, capacity: usize) -> Self {
        match dtype {
            KvDtype::F32 => Rows::F32(Vec::with_capacity(capacity)),
            KvDtype::F16 => Rows::F16(Vec::with_capacity(capacity)),
            KvDtype::Bf16 => Rows::Bf16(Vec::with_capacity(capacity)),
        }
    }

    /// `data` stored in `dtype` (moved as is for f32).
    pub fn from_f32(dtype: KvDtype, data: Vec<f32>) -> Self {
        if dtype == KvDtype::F32 {
            return Rows::F32(data);
        }
        let mut rows = Self::with_capacity(dtype, data.len());
        rows.extend_from_f32(&data);
        rows
    }

    pub fn dtype(&self) -> KvDtype {
        self.view().dtype()
    }

    pub fn view(&self) -> RowsRef<'_> {
        each_dtype!(Rows, self, v => KvElement::view(v.as_slice()))
    }

    /// Elements held.
    pub fn len(&self) -> usize {
        each_dtype!(Rows, self, v => v.len())
    }

    /// Appends `src`, narrowed.
    pub fn extend_from_f32(&mut self, src: &[f32]) {
        each_dtype!(Rows, self, v => extend(v, src))
    }

    /// Adds row `from` divided by `divisor` to each row of `to`, rows of `width` elements,
    /// in f32 (see [`crate::HeadCache::spread_value`]).
    pub fn spread_row(&mut self, width: usize, from: usize, to: Range<usize>, divisor: f32) {
        each_dtype!(Rows, self, v => spread_row(v, width, from, to, divisor))
    }

    pub fn copy_within(&mut self, src: Range<usize>, dst: usize) {
        each_dtype!(Rows, self, v => v.copy_within(src, dst))
    }

    pub fn truncate(&mut self, len: usize) {
        each_dtype!(Rows, self, v => v.truncate(len))
    }

    pub fn remove_range(&mut self, range: Range<usize>) {
        each_dtype!(Rows, self, v => { v.drain(range); })
    }

    pub fn shrink_to_fit(&mut self) {
        each_dtype!(Rows, self, v => v.shrink_to_fit())
    }

    pub fn reserve_exact(&mut self, additional: usize) {
        each_dtype!(Rows, self, v => v.reserve_exact(additional))
    }

    /// Bytes allocated (capacity, not length).
    pub fn resident_bytes(&self) -> usize {
        each_dtype!(Rows, self, v => allocated_bytes(v))
    }

    /// The same rows in `dtype` (rounded to nearest when narrower), keeping the capacity.
    pub fn convert(&mut self, dtype: KvDtype) {
        if self.dtype() == dtype {
            return;
        }
        let capacity = each_dtype!(Rows, &*self, v => v.capacity());
        let wide = self.view().widen(0..self.len());
        let mut rows = Self::with_capacity(dtype, capacity);
        rows.extend_from_f32(&wide);
        *self = rows;
    }
}

fn extend<T: KvElement>(v: &mut Vec<T>, src: &[f32]) {
    let at = v.len();
    v.resize(at + src.len(), T::default());
    T::narrow(src, &mut v[at..]);
}

fn allocated_bytes<T>(v: &Vec<T>) -> usize {
    v.capacity() * std::mem::size_of::<T>()
}

/// Stored rows borrowed in their own dtype, flattened `[len, head_dim]`: what attention
/// reads, widening small blocks at a time.
#[derive(Debug, Clone, Copy)]
pub enum RowsRef<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
}

impl<'a> RowsRef<'a> {
    pub fn dtype(&self) -> KvDtype {
        match self {
            RowsRef::F32(_) => KvDtype::F32,
            RowsRef::F16(_) => KvDtype::F16,
            RowsRef::Bf16(_) => KvDtype::Bf16,
        }
    }

    /// Elements held.
    pub fn len(&self) -> usize {
        each_dtype!(RowsRef, self, v => v.len())
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

    /// Widens elements `range` into `dst` (of the same length).
    pub fn widen_into(self, range: Range<usize>, dst: &mut [f32]) {
        each_dtype!(RowsRef, self, v => KvElement::widen(&v[range], dst))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_bad_names_say_what_is_expected() {
        for d in KvDtype::ALL {
            assert_eq!(d.name().parse::<KvDtype>().unwrap(), d);
        }
        let err = "f8".parse::<KvDtype>().unwrap_err().to_string();
        assert!(err.contains("kv-dtype") && err.contains("f16, bf16 or f32"), "{err}");
        assert_eq!(KvDtype::default(), KvDtype::F16);
    }

    #[test]
    fn narrowing_rounds_to_the_nearest_value_of_each_dtype() {
        let x = [1.0f32, -0.333_333_34, 1000.1, 3.0e-5];
        for dtype in KvDtype::ALL {
            let rows = Rows::from_f32(dtype, x.to_vec());
            let back = rows.view().widen(0..x.len());
            for (a, b) in x.iter().zip(back.iter()) {
                let expected = match dtype {
                    KvDtype::F32 => *a,
                    KvDtype::F16 => f16::from_f32(*a).to_f32(),
                    KvDtype::Bf16 => bf16::from_f32(*a).to_f32(),
                };
                assert_eq!(*b, expected, "{dtype}");
            }
            assert_eq!(rows.resident_bytes(), x.len() * dtype.size_bytes());
        }
    }

    #[test]
    fn converting_keeps_values_a_dtype_can_hold() {
        let x: Vec<f32> = (0..32).map(|i| i as f32 * 0.25 - 3.0).collect();
        for dtype in KvDtype::ALL {
            let mut rows = Rows::from_f32(KvDtype::F32, x.clone());
            rows.convert(dtype);
            assert_eq!(rows.dtype(), dtype);
            rows.convert(KvDtype::F32);
            assert_eq!(&*rows.view().widen(0..x.len()), x.as_slice(), "{dtype}");
        }
    }
}
