//! The token embedding: rows looked up by token id, held either as f32 values or as the
//! file's quantized blocks, a row dequantized when it is looked up. A vocabulary of 151,936
//! tokens by 896 takes 519 MiB as f32 against 94 MiB in Q5_0 blocks; a prompt looks up a
//! few thousand rows at most, so dequantizing them on demand costs nothing that shows.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use kvmerger_kernels::QuantMatrix;

use crate::error::{EngineError, Result};

#[derive(Debug, Clone)]
pub enum Embedding {
    /// `[vocab, hidden]` f32 values.
    Dense(Tensor),
    /// The file's blocks `[vocab, hidden]`, shared with a tied output projection.
    Blocks { matrix: Arc<QuantMatrix>, device: Device },
}

impl Embedding {
    /// The rows of `ids`, `[ids.len(), hidden]` f32.
    pub fn rows(&self, ids: &[u32]) -> Result<Tensor> {
        match self {
            Self::Dense(table) => Ok(table.index_select(&Tensor::new(ids, table.device())?, 0)?),
            Self::Blocks { matrix, device } => {
                let (vocab, hidden) = (matrix.out_dim(), matrix.in_dim());
                let mut values = vec![0.0f32; ids.len() * hidden];
                for (&id, row) in ids.iter().zip(values.chunks_exact_mut(hidden)) {
                    if id as usize >= vocab {
                        return Err(EngineError::Config(format!(
                            "token id {id} is outside the embedding's {vocab} rows"
                        )));
                    }
                    matrix.dequantize_row(id as usize, row);
                }
                Ok(Tensor::from_vec(values, (ids.len(), hidden), device)?)
            }
        }
    }

    pub fn device(&self) -> &Device {
        match self {
            Self::Dense(table) => table.device(),
            Self::Blocks { device, .. } => device,
        }
    }

    /// Bytes held for the table; blocks shared with `lm_head` count there, not here.
    pub fn weight_bytes(&self, lm_head: Option<&Arc<QuantMatrix>>) -> usize {
        match self {
            Self::Dense(table) => table.elem_count() * 4,
            Self::Blocks { matrix, .. } if lm_head.is_some_and(|h| Arc::ptr_eq(h, matrix)) => 0,
            Self::Blocks { matrix, .. } => matrix.bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvmerger_kernels::QuantKind;

    /// Looked-up rows from blocks are the blocks' rows dequantized, in the order asked
    /// (repeats included); an id past the vocabulary is an error, not a panic.
    #[test]
    fn rows_from_blocks_are_the_dequantized_rows() {
        let (vocab, hidden) = (40, 256);
        let values: Vec<f32> =
            (0..vocab * hidden).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        let table = Tensor::from_vec(values, (vocab, hidden), &Device::Cpu).unwrap();
        for kind in [QuantKind::Q8_0, QuantKind::Q5_0, QuantKind::Q4K, QuantKind::Q6K] {
            let matrix = Arc::new(QuantMatrix::quantize(&table, kind).unwrap());
            let embedding = Embedding::Blocks { matrix: matrix.clone(), device: Device::Cpu };
            let ids = [3u32, 0, 39, 3];
            let rows: Vec<Vec<f32>> = embedding.rows(&ids).unwrap().to_vec2().unwrap();
            for (&id, row) in ids.iter().zip(&rows) {
                let mut expected = vec![0.0; hidden];
                matrix.dequantize_row(id as usize, &mut expected);
                assert_eq!(row, &expected, "{kind:?} row {id}");
            }
            let err = embedding.rows(&[1, 40]).unwrap_err();
            assert!(err.to_string().contains("token id 40"), "{err}");
            // Shared with the output projection, the blocks count once.
            assert_eq!(embedding.weight_bytes(Some(&matrix)), 0);
            assert_eq!(embedding.weight_bytes(None), matrix.bytes());
        }
    }
}
