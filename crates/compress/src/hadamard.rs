//! The normalized Walsh-Hadamard transform a quantized cache may store its rows in.
//!
//! An outlier channel in a key or value row makes its block's scale large and every other
//! element coarse; the transform spreads each row's mass evenly over the channels of a block
//! before quantization. It is orthonormal and its own inverse (`H = H^T`, `H H = I`), so
//! rotating queries and keys alike leaves every `q . k` as it was, and rotating the values
//! and then the attention output gives the output back (as llama.cpp does for its quantized
//! caches). A row whose width is not a power of two is transformed in independent blocks,
//! the largest power of two that divides it (up to [`MAX_BLOCK`]).

/// The widest block transformed as one.
pub const MAX_BLOCK: usize = 256;

/// The block a row of `width` elements is transformed in.
pub fn block_len(width: usize) -> usize {
    if width == 0 {
        return 1;
    }
    (1usize << width.trailing_zeros()).min(MAX_BLOCK)
}

/// Rotates `row` in place (a row of its own width): the transform is its own inverse, so
/// the same call rotates back.
pub fn rotate(row: &mut [f32]) {
    let block = block_len(row.len());
    if block == 1 {
        return;
    }
    let norm = 1.0 / (block as f32).sqrt();
    for chunk in row.chunks_exact_mut(block) {
        let mut span = 1;
        while span < block {
            for start in (0..block).step_by(2 * span) {
                for i in start..start + span {
                    let (a, b) = (chunk[i], chunk[i + span]);
                    chunk[i] = a + b;
                    chunk[i + span] = a - b;
                }
            }
            span *= 2;
        }
        chunk.iter_mut().for_each(|x| *x *= norm);
    }
}

/// Rotates each of the rows of `width` elements in `rows`.
pub fn rotate_rows(rows: &mut [f32], width: usize) {
    rows.chunks_exact_mut(width).for_each(rotate);
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn random(n: usize, rng: &mut StdRng) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-3.0..3.0)).collect()
    }

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    /// Dot products (so norms) are kept to f32 rounding, and rotating twice gives the row
    /// back, for powers of two and widths made of blocks.
    #[test]
    fn the_rotation_is_orthonormal_and_its_own_inverse() {
        let mut rng = StdRng::seed_from_u64(3);
        for width in [8, 32, 64, 96, 128, 160, 512] {
            let (q, k) = (random(width, &mut rng), random(width, &mut rng));
            let (mut rq, mut rk) = (q.clone(), k.clone());
            rotate(&mut rq);
            rotate(&mut rk);
            let (before, after) = (dot(&q, &k), dot(&rq, &rk));
            let scale = dot(&q, &q).sqrt() * dot(&k, &k).sqrt();
            assert!((before - after).abs() <= 1e-6 * scale, "{width}: {before} vs {after}");
            assert!((dot(&rq, &rq) - dot(&q, &q)).abs() <= 1e-6 * dot(&q, &q));
            assert_ne!(rq, q, "{width}: the row moved");
            rotate(&mut rq);
            let back = q.iter().zip(&rq).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(back < 1e-5, "{width}: {back}");
        }
        assert_eq!((block_len(64), block_len(96), block_len(1024), block_len(7)), (64, 32, 256, 1));
    }

    /// A single outlier spreads over its whole block: what makes quantization finer.
    #[test]
    fn an_outlier_spreads_over_its_block() {
        let mut row = vec![0.0f32; 64];
        row[5] = 8.0;
        rotate(&mut row);
        assert!(row.iter().all(|x| (x.abs() - 1.0).abs() < 1e-6), "8 / sqrt(64) each");
    }
}
