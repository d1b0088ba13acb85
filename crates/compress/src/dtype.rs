//! How the KV cache stores keys and values: f16 (the default), bf16, f32, or llama.cpp's
//! block-quantized q8_0 and q4_0 (see [`crate::quant`]), optionally in a Hadamard-rotated
//! basis (see [`crate::hadamard`]).
//!
//! Everything computes in f32: rows are widened when read and narrowed when written, with
//! `half`'s slice conversions (F16C instructions where the CPU has them, detected at run
//! time) or a block's (de)quantization. The stored types and their borrowed view are the
//! kernels' (`kvmerger_kernels::{KvElement, RowsRef}`, the layout decode attention reads);
//! each operation on owned rows here is written once over that trait; a stored unit is one
//! element, or one block of 32.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use half::{bf16, f16};
use kvmerger_kernels::{BlockQ4_0, BlockQ8_0, KvElement, RowsRef, BLOCK_ELEMENTS};
use serde::{Deserialize, Serialize};

use crate::error::CompressError;

/// How a cache stores its keys and values.
///
/// A quantized cache stores each head's keys minus a fixed vector, the head's key center
/// (see [`crate::HeadCache`]), unless its name ends in `u` (uncentered: llama.cpp's blocks
/// over the keys as the model computes them).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum KvDtype {
    /// IEEE half precision: 10-bit mantissa, range up to 65504.
    #[default]
    #[serde(rename = "f16")]
    F16,
    /// bfloat16: f32's range with a 7-bit mantissa.
    #[serde(rename = "bf16")]
    Bf16,
    /// Single precision, as the forward pass computes.
    #[serde(rename = "f32")]
    F32,
    /// Blocks of 32 signed bytes and an f16 scale: 8.5 bits an element; keys centered.
    #[serde(rename = "q8_0")]
    Q8_0,
    /// Blocks of 32 nibbles and an f16 scale: 4.5 bits an element; keys centered.
    #[serde(rename = "q4_0")]
    Q4_0,
    /// q8_0 of the Hadamard-rotated rows, keys centered.
    #[serde(rename = "q8_0r")]
    Q8_0Rotated,
    /// q4_0 of the Hadamard-rotated rows, keys centered.
    #[serde(rename = "q4_0r")]
    Q4_0Rotated,
    /// q8_0 of the keys as they are.
    #[serde(rename = "q8_0u")]
    Q8_0Uncentered,
    /// q4_0 of the keys as they are.
    #[serde(rename = "q4_0u")]
    Q4_0Uncentered,
    /// q8_0 of the Hadamard-rotated rows, keys as they are.
    #[serde(rename = "q8_0ru")]
    Q8_0RotatedUncentered,
    /// q4_0 of the Hadamard-rotated rows, keys as they are.
    #[serde(rename = "q4_0ru")]
    Q4_0RotatedUncentered,
}

impl KvDtype {
    pub const ALL: [KvDtype; 11] = [
        KvDtype::F16,
        KvDtype::Bf16,
        KvDtype::F32,
        KvDtype::Q8_0,
        KvDtype::Q4_0,
        KvDtype::Q8_0Rotated,
        KvDtype::Q4_0Rotated,
        KvDtype::Q8_0Uncentered,
        KvDtype::Q4_0Uncentered,
        KvDtype::Q8_0RotatedUncentered,
        KvDtype::Q4_0RotatedUncentered,
    ];
    /// The element types, which hold rows of any width.
    pub const FLOATS: [KvDtype; 3] = [KvDtype::F16, KvDtype::Bf16, KvDtype::F32];

    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F16 => "f16",
            KvDtype::Bf16 => "bf16",
            KvDtype::F32 => "f32",
            KvDtype::Q8_0 => "q8_0",
            KvDtype::Q4_0 => "q4_0",
            KvDtype::Q8_0Rotated => "q8_0r",
            KvDtype::Q4_0Rotated => "q4_0r",
            KvDtype::Q8_0Uncentered => "q8_0u",
            KvDtype::Q4_0Uncentered => "q4_0u",
            KvDtype::Q8_0RotatedUncentered => "q8_0ru",
            KvDtype::Q4_0RotatedUncentered => "q4_0ru",
        }
    }

    /// The element or block type the rows are stored in, whatever their basis and
    /// centering: f16, bf16, f32, q8_0 or q4_0.
    pub fn storage(self) -> KvDtype {
        match self {
            KvDtype::Q8_0Rotated | KvDtype::Q8_0Uncentered | KvDtype::Q8_0RotatedUncentered => {
                KvDtype::Q8_0
            }
            KvDtype::Q4_0Rotated | KvDtype::Q4_0Uncentered | KvDtype::Q4_0RotatedUncentered => {
                KvDtype::Q4_0
            }
            other => other,
        }
    }

    /// Whether rows are stored Hadamard-rotated (queries rotated to match, outputs back).
    pub fn rotated(self) -> bool {
        matches!(
            self,
            KvDtype::Q8_0Rotated
                | KvDtype::Q4_0Rotated
                | KvDtype::Q8_0RotatedUncentered
                | KvDtype::Q4_0RotatedUncentered
        )
    }

    /// Whether each head stores its keys minus a fixed key center (every quantized dtype
    /// but the uncentered ones).
    pub fn centered(self) -> bool {
        matches!(self, KvDtype::Q8_0 | KvDtype::Q4_0 | KvDtype::Q8_0Rotated | KvDtype::Q4_0Rotated)
    }

    /// Whether rows are stored in blocks of 32.
    pub fn is_quantized(self) -> bool {
        matches!(self.storage(), KvDtype::Q8_0 | KvDtype::Q4_0)
    }

    /// The quantized dtype storing blocks like this one, rotated or not and keys centered or
    /// not; a float dtype stays as it is (rotation and centering are for quantized rows).
    pub fn quantized_as(self, rotate: bool, center: bool) -> KvDtype {
        use KvDtype::*;
        match (self.storage(), rotate, center) {
            (Q8_0, false, true) => Q8_0,
            (Q8_0, true, true) => Q8_0Rotated,
            (Q8_0, false, false) => Q8_0Uncentered,
            (Q8_0, true, false) => Q8_0RotatedUncentered,
            (Q4_0, false, true) => Q4_0,
            (Q4_0, true, true) => Q4_0Rotated,
            (Q4_0, false, false) => Q4_0Uncentered,
            (Q4_0, true, false) => Q4_0RotatedUncentered,
            (float, _, _) => float,
        }
    }

    /// This dtype with the rows rotated or not, centering as it is.
    pub fn with_rotation(self, rotate: bool) -> KvDtype {
        self.quantized_as(rotate, self.centered())
    }

    /// This dtype with the keys centered or not, rotation as it is.
    pub fn with_centering(self, center: bool) -> KvDtype {
        self.quantized_as(self.rotated(), center)
    }

    /// What a result's fingerprint records of this dtype: its name, and whether keys are
    /// centered (the plain quantized names stored them uncentered before centering
    /// existed, so their old results are recomputed rather than reused).
    pub fn fingerprint(self) -> String {
        if self.centered() {
            format!("{self} keys centered")
        } else {
            self.name().to_string()
        }
    }

    /// Bytes one row of `width` elements takes, scales included.
    pub fn row_bytes(self, width: usize) -> usize {
        match self.storage() {
            KvDtype::F16 | KvDtype::Bf16 => 2 * width,
            KvDtype::F32 => 4 * width,
            KvDtype::Q8_0 => width / BLOCK_ELEMENTS * std::mem::size_of::<BlockQ8_0>(),
            _ => width / BLOCK_ELEMENTS * std::mem::size_of::<BlockQ4_0>(),
        }
    }

    /// Refuses a head width this dtype cannot store: quantized rows are whole blocks.
    pub fn check_head_dim(self, head_dim: usize) -> Result<(), CompressError> {
        if self.is_quantized() && !head_dim.is_multiple_of(BLOCK_ELEMENTS) {
            return Err(CompressError::invalid(
                "kv-dtype",
                format!(
                    "{self} stores blocks of {BLOCK_ELEMENTS} elements; this model's heads are \
                     {head_dim} wide"
                ),
            ));
        }
        Ok(())
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
            || {
                CompressError::invalid(
                    "kv-dtype",
                    format!(
                        "expected f16, bf16, f32, q8_0, q4_0, q8_0r, q4_0r, q8_0u, q4_0u, q8_0ru \
                         or q4_0ru, got `{s}`"
                    ),
                )
            },
        )
    }
}

/// Runs `$body` with `$v` bound to the vector (or slice) of whichever dtype `$rows` holds.
macro_rules! each_dtype {
    ($kind:ident, $rows:expr, $v:ident => $body:expr) => {
        match $rows {
            $kind::F32($v) => $body,
            $kind::F16($v) => $body,
            $kind::Bf16($v) => $body,
            $kind::Q8_0($v) => $body,
            $kind::Q4_0($v) => $body,
        }
    };
}

/// [`Rows::spread_row`] for one stored type, a block of columns at a time through stack
/// buffers.
fn spread_row<T: KvElement>(
    rows: &mut [T],
    width: usize,
    from: usize,
    to: Range<usize>,
    divisor: f32,
) {
    const COLUMNS: usize = BLOCK_ELEMENTS;
    let (mut share, mut target) = ([0.0f32; COLUMNS], [0.0f32; COLUMNS]);
    for start in (0..width).step_by(COLUMNS) {
        let n = COLUMNS.min(width - start);
        let at = |row: usize| T::units(row * width + start..row * width + start + n);
        T::widen(&rows[at(from)], &mut share[..n]);
        share[..n].iter_mut().for_each(|s| *s /= divisor);
        for t in to.clone() {
            let row = &mut rows[at(t)];
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
    Q8_0(Vec<BlockQ8_0>),
    Q4_0(Vec<BlockQ4_0>),
}

impl Rows {
    /// Empty rows with room for `capacity` elements, stored as `dtype` stores them.
    pub fn with_capacity(dtype: KvDtype, capacity: usize) -> Self {
        let blocks = capacity.div_ceil(BLOCK_ELEMENTS);
        match dtype.storage() {
            KvDtype::F32 => Rows::F32(Vec::with_capacity(capacity)),
            KvDtype::F16 => Rows::F16(Vec::with_capacity(capacity)),
            KvDtype::Bf16 => Rows::Bf16(Vec::with_capacity(capacity)),
            KvDtype::Q8_0 => Rows::Q8_0(Vec::with_capacity(blocks)),
            _ => Rows::Q4_0(Vec::with_capacity(blocks)),
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

    /// How the rows are stored (a plain dtype: the basis is the cache's business).
    pub fn dtype(&self) -> KvDtype {
        match self {
            Rows::F32(_) => KvDtype::F32,
            Rows::F16(_) => KvDtype::F16,
            Rows::Bf16(_) => KvDtype::Bf16,
            Rows::Q8_0(_) => KvDtype::Q8_0,
            Rows::Q4_0(_) => KvDtype::Q4_0,
        }
    }

    pub fn view(&self) -> RowsRef<'_> {
        each_dtype!(Rows, self, v => KvElement::view(v.as_slice()))
    }

    /// Elements held.
    pub fn len(&self) -> usize {
        self.view().len()
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

    /// Copies elements `src` to `dst` onwards.
    pub fn copy_within(&mut self, src: Range<usize>, dst: usize) {
        each_dtype!(Rows, self, v => copy_within(v, src, dst))
    }

    /// Keeps the first `len` elements.
    pub fn truncate(&mut self, len: usize) {
        each_dtype!(Rows, self, v => v.truncate(units_of(v, len)))
    }

    /// Removes elements `range`.
    pub fn remove_range(&mut self, range: Range<usize>) {
        each_dtype!(Rows, self, v => { v.drain(units_in(v, range)); })
    }

    pub fn shrink_to_fit(&mut self) {
        each_dtype!(Rows, self, v => v.shrink_to_fit())
    }

    /// Makes room for `additional` more elements.
    pub fn reserve_exact(&mut self, additional: usize) {
        each_dtype!(Rows, self, v => v.reserve_exact(units_of(v, additional)))
    }

    /// Bytes allocated (capacity, not length; a block's scale included).
    pub fn resident_bytes(&self) -> usize {
        each_dtype!(Rows, self, v => allocated_bytes(v))
    }

    /// The same rows in `dtype`'s storage (rounded to nearest, or quantized, when
    /// narrower), keeping the capacity.
    pub fn convert(&mut self, dtype: KvDtype) {
        if self.dtype() == dtype.storage() {
            return;
        }
        let capacity = each_dtype!(Rows, &*self, v => v.capacity() * elements_per_unit(v));
        let wide = self.view().widen(0..self.len());
        let mut rows = Self::with_capacity(dtype, capacity);
        rows.extend_from_f32(&wide);
        *self = rows;
    }
}

fn elements_per_unit<T: KvElement>(_: &[T]) -> usize {
    T::ELEMENTS
}

/// Units of `v`'s type that hold `elements` elements (a whole number of them).
fn units_of<T: KvElement>(_: &[T], elements: usize) -> usize {
    T::units(0..elements).end
}

fn units_in<T: KvElement>(_: &[T], range: Range<usize>) -> Range<usize> {
    T::units(range)
}

fn copy_within<T: KvElement>(v: &mut [T], src: Range<usize>, dst: usize) {
    let dst = T::units(dst..dst).start;
    v.copy_within(T::units(src), dst)
}

fn extend<T: KvElement>(v: &mut Vec<T>, src: &[f32]) {
    let at = v.len();
    v.resize(at + T::units(0..src.len()).end, T::default());
    T::narrow(src, &mut v[at..]);
}

fn allocated_bytes<T>(v: &Vec<T>) -> usize {
    v.capacity() * std::mem::size_of::<T>()
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
        assert!(err.contains("kv-dtype") && err.contains("f16, bf16, f32, q8_0"), "{err}");
        assert_eq!(KvDtype::default(), KvDtype::F16);
        for d in KvDtype::ALL {
            assert_eq!(serde_json::to_string(&d).unwrap(), format!("\"{d}\""));
            assert_eq!(d.with_rotation(true).rotated(), d.is_quantized(), "{d}");
            assert_eq!(d.with_centering(true).centered(), d.is_quantized(), "{d}");
            for (rotate, center) in [(false, false), (false, true), (true, false), (true, true)] {
                let q = d.quantized_as(rotate, center);
                assert_eq!(q.storage(), d.storage(), "{d}: the same blocks");
                let asked = if d.is_quantized() { (rotate, center) } else { (false, false) };
                assert_eq!((q.rotated(), q.centered()), asked, "{d} as ({rotate}, {center})");
            }
        }
        // The plain names are the centered storage; `u` names llama.cpp's rows as they are.
        assert!(KvDtype::Q8_0.centered() && !KvDtype::Q8_0.rotated());
        assert_eq!(KvDtype::Q4_0Rotated.with_centering(false).name(), "q4_0ru");
    }

    #[test]
    fn narrowing_rounds_to_the_nearest_value_of_each_dtype() {
        let x = [1.0f32, -0.333_333_34, 1000.1, 3.0e-5];
        for dtype in KvDtype::FLOATS {
            let rows = Rows::from_f32(dtype, x.to_vec());
            let back = rows.view().widen(0..x.len());
            for (a, b) in x.iter().zip(back.iter()) {
                let expected = match dtype {
                    KvDtype::F32 => *a,
                    KvDtype::F16 => f16::from_f32(*a).to_f32(),
                    KvDtype::Bf16 => bf16::from_f32(*a).to_f32(),
                    _ => unreachable!("float dtypes"),
                };
                assert_eq!(*b, expected, "{dtype}");
            }
            assert_eq!(rows.resident_bytes(), dtype.row_bytes(x.len()));
        }
    }

    #[test]
    fn converting_keeps_values_a_dtype_can_hold() {
        let x: Vec<f32> = (0..32).map(|i| i as f32 * 0.25 - 3.0).collect();
        for dtype in KvDtype::FLOATS {
            let mut rows = Rows::from_f32(KvDtype::F32, x.clone());
            rows.convert(dtype);
            assert_eq!(rows.dtype(), dtype);
            rows.convert(KvDtype::F32);
            assert_eq!(&*rows.view().widen(0..x.len()), x.as_slice(), "{dtype}");
        }
    }

    /// Quantized rows are whole blocks: each block's bytes, scale included, are counted;
    /// row operations move blocks; the values come back within a quantization step.
    #[test]
    fn quantized_rows_count_their_blocks_and_keep_rows_whole() {
        let width = 64;
        let x: Vec<f32> = (0..4 * width).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        for (dtype, block_bytes, step) in
            [(KvDtype::Q8_0, 34, 2.0 / 127.0), (KvDtype::Q4_0, 18, 0.25)]
        {
            let mut rows = Rows::from_f32(dtype, x.clone());
            assert_eq!(rows.dtype(), dtype);
            assert_eq!(rows.len(), x.len());
            assert_eq!(rows.resident_bytes(), x.len() / 32 * block_bytes);
            assert_eq!(dtype.row_bytes(width), width / 32 * block_bytes);
            let back = rows.view().widen(0..x.len()).into_owned();
            let error = x.iter().zip(&back).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(error <= step * 1.01, "{dtype}: {error}");
            // Row 3 over row 1, then row 2 dropped: whole rows of blocks move.
            rows.copy_within(3 * width..4 * width, width);
            rows.remove_range(2 * width..3 * width);
            rows.truncate(2 * width);
            let moved = rows.view().widen(0..2 * width).into_owned();
            assert_eq!(&moved[width..], &back[3 * width..4 * width], "{dtype}");
            assert_eq!(&moved[..width], &back[..width], "{dtype}");
            rows.convert(KvDtype::F32);
            assert_eq!(*rows.view().widen(0..2 * width), *moved, "{dtype}: widening is exact");
        }
        assert!(KvDtype::Q4_0.check_head_dim(64).is_ok() && KvDtype::F16.check_head_dim(8).is_ok());
        let err = KvDtype::Q8_0Rotated.check_head_dim(48).unwrap_err().to_string();
        assert!(err.contains("q8_0r") && err.contains("48"), "{err}");
    }
}
