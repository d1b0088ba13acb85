//! A linear layer that can hold its weight in two formats, one per path.
//!
//! Prefill multiplies many rows at once and is compute-bound: dequantized f32 weights feed
//! the fast f32 GEMM. Decode multiplies one row and is memory-bound: every weight is read
//! once per token, so the compact quantized weight is read faster. `kvmerger bench`
//! measures both paths in each format.

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Module, Tensor};
use kvmerger_kernels::{Product, QuantKind, QuantMatrix, QuantizedRows};
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// How a weight is stored for one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WeightFormat {
    /// Dequantized to f32 at load.
    #[default]
    F32,
    /// Kept in the file's quantized format (GGUF only; f32 where the file has no quantized tensor).
    Quantized,
    /// Requantized to Q8_0 at load (GGUF only): candle has SIMD kernels for Q8_0 but a
    /// scalar one for Q4_1, so on SmolLM2's Q4_1 file this decodes faster than either.
    Q8,
    /// The file's own blocks through our kernel ([`QuantMatrix`]: Q4_0, Q4_1, Q5_0, Q8_0,
    /// Q4_K, Q5_K, Q6_K), which reads each weight once per step for all rows; other quantized
    /// types are requantized to Q8_0 at load (GGUF only).
    File,
}

impl std::str::FromStr for WeightFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "quantized" | "q" => Ok(Self::Quantized),
            "q8" | "q8_0" => Ok(Self::Q8),
            "file" => Ok(Self::File),
            other => Err(format!(
                "unknown weight format `{other}` (expected f32, quantized, q8 or file)"
            )),
        }
    }
}

/// Weight format chosen for each path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightFormats {
    /// Tokens given rather than generated: prompt chunks, a question appended after the
    /// compressed prompt, teacher-forced scoring, the output projection of each included.
    pub prefill: WeightFormat,
    /// Decode steps: one generated token per sequence.
    pub decode: WeightFormat,
}

impl Default for WeightFormats {
    /// The file's blocks for both paths: resident weights are the file's bytes, prefill is as
    /// fast as with an f32 copy (its products dequantize a tile at a time) and decode reads
    /// the fewest bytes (docs/bench/kernels.md).
    fn default() -> Self {
        Self { prefill: WeightFormat::File, decode: WeightFormat::File }
    }
}

impl WeightFormats {
    /// What results computed with these formats depend on: the formats and, where one is
    /// [`WeightFormat::File`], what `file` computes ((the kernel module's `FILE_PATH`)), so that a
    /// stored evaluation row is recomputed when that changes.
    pub fn fingerprint(&self) -> String {
        let names = format!("prefill {:?}, decode {:?}", self.prefill, self.decode).to_lowercase();
        if self.prefill == WeightFormat::File || self.decode == WeightFormat::File {
            format!("{names} (file: {})", kvmerger_kernels::FILE_PATH)
        } else {
            names
        }
    }
}

/// `y = x W^T (+ b)` with the weight in one or both formats.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`
    dense: Option<Tensor>,
    quantized: Option<QMatMul>,
    /// For [`WeightFormat::File`]; shared with the token embedding where the two are tied.
    kernel: Option<Arc<QuantMatrix>>,
    /// `[out]`
    bias: Option<Tensor>,
    /// `bias` as plain values, for the kernel path.
    bias_values: Option<Vec<f32>>,
}

impl Linear {
    /// Builds from an f32 (or f16/bf16) tensor `[out, in]`.
    pub fn from_dense(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let bias = bias.map(|b| b.to_dtype(DType::F32)).transpose()?;
        let bias_values = bias.as_ref().map(Tensor::to_vec1).transpose()?;
        Ok(Self {
            dense: Some(weight.to_dtype(DType::F32)?),
            quantized: None,
            kernel: None,
            bias,
            bias_values,
        })
    }

    /// Builds from a GGUF tensor, keeping the formats `formats` needs.
    pub fn from_qtensor(
        weight: QTensor,
        bias: Option<Tensor>,
        formats: WeightFormats,
    ) -> Result<Self> {
        let is_float = matches!(
            weight.dtype(),
            candle_core::quantized::GgmlDType::F32
                | candle_core::quantized::GgmlDType::F16
                | candle_core::quantized::GgmlDType::BF16
        );
        let uses = |f: WeightFormat| formats.prefill == f || formats.decode == f;
        let in_dim = weight.shape().dims2()?.1;
        // The file's own blocks where the kernel reads their type.
        let own_blocks = match is_float || !uses(WeightFormat::File) {
            true => None,
            false => QuantMatrix::from_qtensor(&weight)?,
        };
        // f32 values only where a format needs them: no f32 copy of every weight at load.
        let needs_dense = is_float
            || uses(WeightFormat::F32)
            || uses(WeightFormat::Q8)
            || (uses(WeightFormat::File) && own_blocks.is_none());
        let dense = needs_dense.then(|| weight.dequantize(&weight.device())).transpose()?;
        let kernel = match (own_blocks, &dense) {
            // A type the kernel does not read: its values requantized to Q8_0.
            (None, Some(dense)) if uses(WeightFormat::File) && !is_float && in_dim % 32 == 0 => {
                Some(QuantMatrix::quantize(dense, QuantKind::Q8_0)?)
            }
            (kernel, _) => kernel,
        };
        // One candle quantized copy at most: the file's own format, or a Q8_0 requantization.
        let quantized = match &dense {
            _ if is_float => None,
            Some(dense) if uses(WeightFormat::Q8) && in_dim % 32 == 0 => {
                let q8 = QTensor::quantize(dense, candle_core::quantized::GgmlDType::Q8_0)?;
                Some(QMatMul::QTensor(std::sync::Arc::new(q8)))
            }
            _ if uses(WeightFormat::Quantized) || uses(WeightFormat::Q8) => {
                Some(QMatMul::QTensor(std::sync::Arc::new(weight)))
            }
            _ => None,
        };
        let keep_dense =
            is_float || uses(WeightFormat::F32) || (quantized.is_none() && kernel.is_none());
        let dense = dense.filter(|_| keep_dense);
        let bias = bias.map(|b| b.to_dtype(DType::F32)).transpose()?;
        let bias_values = bias.as_ref().map(Tensor::to_vec1).transpose()?;
        let kernel = kernel.map(Arc::new);
        Ok(Self { dense, quantized, kernel, bias, bias_values })
    }

    /// `x`: `[rows, in]` -> `[rows, out]` with the weight in `format` (or the format held);
    /// on the file's blocks, multiplied as `product` says (the caller's phase decides).
    pub fn forward_as(&self, x: &Tensor, format: WeightFormat, product: Product) -> Result<Tensor> {
        let y = match (format, &self.kernel, &self.quantized, &self.dense) {
            (WeightFormat::File, Some(k), _, _) => {
                let rows = x.dim(0)?;
                let mut q = QuantizedRows::for_product(product);
                q.quantize(&x.flatten_all()?.to_vec1::<f32>()?, rows);
                let mut out = vec![0.0f32; rows * k.out_dim()];
                Self::forward_quantized([self], &q, [&mut out]);
                return Ok(Tensor::from_vec(out, (rows, k.out_dim()), x.device())?);
            }
            (WeightFormat::Quantized | WeightFormat::Q8, _, Some(q), _) => q.forward(x)?,
            (_, _, _, Some(w)) => x.matmul(&w.t()?)?,
            (_, _, Some(q), None) => q.forward(x)?,
            (_, Some(_), None, None) => return self.forward_as(x, WeightFormat::File, product),
            (_, None, None, None) => unreachable!("a linear layer always holds one format"),
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// Whether [`WeightFormat::File`] runs on our kernel (a quantized weight with a multiple
    /// of 32 columns), so [`Self::forward_quantized`] applies.
    pub fn has_kernel(&self) -> bool {
        self.kernel.is_some()
    }

    /// The blocks [`WeightFormat::File`] multiplies, where the layer has them.
    pub fn kernel_matrix(&self) -> Option<&Arc<QuantMatrix>> {
        self.kernel.as_ref()
    }

    /// `out = x W^T (+ b)` on the kernel: `x` `[rows, in]` quantized, `out` `[rows, out]`.
    /// Several layers reading the same input run in one parallel region.
    /// Panics unless every layer [`Self::has_kernel`].
    pub fn forward_quantized<const N: usize>(
        layers: [&Linear; N],
        x: &QuantizedRows,
        mut outs: [&mut [f32]; N],
    ) {
        let kernels = layers
            .map(|l| &**l.kernel.as_ref().expect("forward_quantized on a layer without a kernel"));
        QuantMatrix::matmul_many(&kernels, x, &mut outs);
        for (layer, out) in layers.iter().zip(outs.iter_mut()) {
            if let Some(bias) = &layer.bias_values {
                for row in out.chunks_exact_mut(bias.len()) {
                    row.iter_mut().zip(bias).for_each(|(y, b)| *y += b);
                }
            }
        }
    }

    /// Bytes of weight data held.
    pub fn weight_bytes(&self) -> usize {
        let dense = self.dense.as_ref().map_or(0, |w| w.elem_count() * 4);
        let q = match &self.quantized {
            Some(QMatMul::QTensor(t)) => t.storage_size_in_bytes(),
            _ => 0,
        };
        dense + q + self.kernel.as_ref().map_or(0, |k| k.bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Results computed with `file` weights record what `file` computes, so that a change of
    /// its kernels makes stored rows stale; other formats record their names only.
    #[test]
    fn fingerprints_say_what_file_computes() {
        let file = WeightFormats::default();
        assert!(file.fingerprint().contains(kvmerger_kernels::FILE_PATH), "{}", file.fingerprint());
        let exact = WeightFormats { prefill: WeightFormat::F32, decode: WeightFormat::F32 };
        assert_eq!(exact.fingerprint(), "prefill f32, decode f32");
        let decode_only = WeightFormats { prefill: WeightFormat::F32, ..file };
        assert!(decode_only.fingerprint().contains(kvmerger_kernels::FILE_PATH));
    }
}
