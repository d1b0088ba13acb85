//! Causal attention of a block of queries over one kv head's rows, in f32, with the
//! softmax computed explicitly so that its probabilities are there to be summed: a prompt is
//! attended one block of queries at a time, so memory stays `O(block x len)`, not `O(n^2)`.

use super::softmax::exponentiate_row;

/// A block of queries over one head. Row `r` of the block is query `r / group` (the
/// `group` query heads of a kv head, side by side); query `i` sees the first
/// `first_seen + i` entries, the last of them its own.
#[derive(Debug, Clone, Copy)]
pub struct CausalBlock<'a> {
    /// `[rows, head_dim]`, already rotated.
    pub queries: &'a [f32],
    /// `[visible, head_dim]`: the entries the block's last query sees.
    pub keys: &'a [f32],
    pub head_dim: usize,
    pub group: usize,
    pub first_seen: usize,
    /// `[visible]`: added to each entry's logit (`ln(count)`), if given.
    pub bias: Option<&'a [f32]>,
    pub window: Option<SlidingWindow<'a>>,
}

/// A sliding window: a query at position `p` sees only entries at positions `> p - window`
/// (by the entries' logical positions; a query's own is its entry's).
#[derive(Debug, Clone, Copy)]
pub struct SlidingWindow<'a> {
    pub window: usize,
    /// `[visible]`: each entry's logical position.
    pub positions: &'a [usize],
}

impl SlidingWindow<'_> {
    /// Sets `row[j]` to `value` for every entry the row's query (its last entry) does not
    /// see.
    fn fill_outside(&self, row: &mut [f32], value: f32) {
        let query = self.positions[row.len() - 1];
        for (s, &p) in row.iter_mut().zip(self.positions) {
            if query.saturating_sub(p) >= self.window {
                *s = value;
            }
        }
    }
}

/// Writes the block's softmax into `probabilities`, `[rows, visible]` (zero past what a
/// query sees), and its output, the probabilities times `values` (`[visible, head_dim]`),
/// into `out`, `[rows, head_dim]`.
pub fn attend_block(
    block: CausalBlock<'_>,
    values: &[f32],
    probabilities: &mut [f32],
    out: &mut [f32],
) {
    let d = block.head_dim;
    let (rows, visible) = (block.queries.len() / d, block.keys.len() / d);
    assert!(values.len() == block.keys.len() && out.len() == rows * d, "output sizes");
    causal_softmax(block, probabilities);

    // [rows, d] = P V
    // SAFETY: probabilities is rows x visible (checked by causal_softmax), values hold
    // visible rows of d, out is rows x d (asserted above).
    unsafe {
        gemm::gemm(
            rows,
            d,
            visible,
            out.as_mut_ptr(),
            1,
            d as isize,
            false,
            probabilities.as_ptr(),
            1,
            visible as isize,
            values.as_ptr(),
            1,
            d as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Writes the block's softmax alone into `probabilities`, `[rows, visible]` (zero past what
/// a query sees): for a caller that reads the attention paid, not its output.
pub fn causal_softmax(block: CausalBlock<'_>, probabilities: &mut [f32]) {
    let CausalBlock { queries, keys, head_dim: d, group, first_seen, bias, window } = block;
    let rows = queries.len() / d;
    let visible = keys.len() / d;
    assert!(queries.len() == rows * d && keys.len() == visible * d, "whole rows of head_dim");
    assert!(probabilities.len() == rows * visible, "output sizes");
    assert!(rows > 0 && first_seen + (rows - 1) / group == visible, "the last query sees all");
    assert!(bias.is_none_or(|b| b.len() == visible));
    assert!(window.is_none_or(|w| w.positions.len() == visible));

    // [rows, visible] = Q K^T / sqrt(d)
    let scale = 1.0 / (d as f32).sqrt();
    // SAFETY: every pointer covers the extent described by its dimensions and strides
    // (asserted above): probabilities is rows x visible (row stride visible), queries is
    // rows x d, keys hold visible rows of d.
    unsafe {
        gemm::gemm(
            rows,
            visible,
            d,
            probabilities.as_mut_ptr(),
            1,
            visible as isize,
            false,
            queries.as_ptr(),
            1,
            d as isize,
            keys.as_ptr(),
            d as isize,
            1,
            0.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }

    for (r, row) in probabilities.chunks_exact_mut(visible).enumerate() {
        let seen = first_seen + r / group;
        if let Some(b) = bias {
            for (s, b) in row[..seen].iter_mut().zip(b) {
                *s += b;
            }
        }
        if let Some(window) = window {
            window.fill_outside(&mut row[..seen], f32::NEG_INFINITY);
        }
        let (_, sum) = exponentiate_row(&mut row[..seen]);
        let inv = 1.0 / sum;
        row[..seen].iter_mut().for_each(|s| *s *= inv);
        row[seen..].fill(0.0);
        if let Some(window) = window {
            // Exactly 0 outside the window, where the fast exponential leaves ~1e-38.
            window.fill_outside(&mut row[..seen], 0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::dot;

    /// Query `i`'s softmax row, one logit at a time: the definition.
    fn reference_row(
        query: &[f32],
        keys: &[f32],
        seen: usize,
        bias: &[f32],
        window: Option<(usize, &[usize])>,
    ) -> Vec<f32> {
        let d = query.len();
        let scale = 1.0 / (d as f32).sqrt();
        let logit = |j: usize| {
            let hidden = window.is_some_and(|(w, p)| p[seen - 1] - p[j] >= w);
            let logit = dot(query, &keys[j * d..(j + 1) * d]) * scale + bias[j];
            if hidden {
                f32::NEG_INFINITY
            } else {
                logit
            }
        };
        let logits: Vec<f32> = (0..seen).map(logit).collect();
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
        logits.iter().map(|l| (l - max).exp() / sum).collect()
    }

    /// A block of 3 queries of a group of 2 over 40 entries, with a count bias and a sliding
    /// window over gapped positions: each row is its query's softmax (zero past what it
    /// sees) and the output is those probabilities times the values. Cross-path: bounded.
    #[test]
    fn a_block_is_each_querys_masked_softmax() {
        let (d, group, queries, visible) = (16, 2, 3, 40);
        let mut rng = StdRng::seed_from_u64(5);
        let mut random =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-2.0..2.0)).collect() };
        let (q, keys, values) =
            (random(queries * group * d), random(visible * d), random(visible * d));
        let bias: Vec<f32> = (0..visible).map(|j| ((1 + j % 4) as f32).ln()).collect();
        let positions: Vec<usize> = (0..visible).map(|j| 3 * j).collect();
        for window in [None, Some(SlidingWindow { window: 30, positions: &positions })] {
            let first_seen = visible - (queries - 1);
            let block = CausalBlock {
                queries: &q,
                keys: &keys,
                head_dim: d,
                group,
                first_seen,
                bias: Some(&bias),
                window,
            };
            let (mut probabilities, mut out) =
                (vec![f32::NAN; queries * group * visible], vec![f32::NAN; queries * group * d]);
            attend_block(block, &values, &mut probabilities, &mut out);
            for (r, row) in probabilities.chunks_exact(visible).enumerate() {
                let seen = first_seen + r / group;
                let query = &q[r * d..(r + 1) * d];
                let mask = window.map(|w| (w.window, w.positions));
                let expected = reference_row(query, &keys, seen, &bias, mask);
                for (p, e) in row.iter().zip(&expected) {
                    assert!((p - e).abs() < 1e-6, "row {r}: {p} vs {e}");
                }
                assert!(row[seen..].iter().all(|&p| p == 0.0), "row {r} sees {seen}");
                if window.is_some() {
                    assert_eq!(row[0], 0.0, "the first entry lies outside the window");
                }
                for c in 0..d {
                    let v: f32 = (0..seen).map(|j| expected[j] * values[j * d + c]).sum();
                    assert!((out[r * d + c] - v).abs() < 1e-5, "row {r} column {c}");
                }
            }
        }
    }
}
