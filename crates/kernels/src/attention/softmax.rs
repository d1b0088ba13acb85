//! The exponentials of a softmax row, vectorised: a polynomial `e^x` that a loop of it
//! turns into vector instructions (the libm call does not), and folds over eight lanes.
//! Shared by a decode step's partial softmaxes and a prompt block's explicit one.

/// `e^x` for `x <= 0` to about 2 ulp, branch-free so a loop of it vectorises (the libm call
/// does not, and would cost more than the dot products). Below -87 it returns about
/// `e^-87` (1.6e-38) instead of smaller: nothing next to the softmax's largest term, 1.
#[inline(always)]
pub(super) fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // Adding 1.5 * 2^23 rounds to an integer, which the low mantissa bits then hold.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.max(-87.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    // x = n ln2 + r, |r| <= ln2 / 2, with ln2 split so n ln2 is exact.
    let r = x - n * LN2_HI - n * LN2_LO;
    // Cephes' expf polynomial for e^r.
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    // 2^n: the exponent field n + 127 (n in -126..=0), from t's low mantissa bits.
    let two_n = f32::from_bits(t.to_bits().wrapping_add(127) << 23);
    er * two_n
}

/// `values` folded with `f` into 8 running lanes, then the lanes into one: 8 independent
/// chains that vectorise, where one running value waits on each step before the next.
#[inline(always)]
pub(super) fn lanewise(values: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [init; 8];
    let chunks = values.chunks_exact(8);
    let tail = chunks.remainder();
    for chunk in chunks {
        lanes.iter_mut().zip(chunk).for_each(|(l, &v)| *l = f(*l, v));
    }
    let lanes = tail.iter().fold(lanes, |mut lanes, &v| {
        lanes[0] = f(lanes[0], v);
        lanes
    });
    lanes.into_iter().fold(init, f)
}

/// Turns `row`'s logits into `exp(logit - max)` in place and returns `(max, sum)` of the
/// row. A logit of `-inf` becomes about 1.6e-38, not 0 (see [`exp_nonpositive`]).
#[inline(always)]
pub(super) fn exponentiate_row(row: &mut [f32]) -> (f32, f32) {
    let max = lanewise(row, f32::NEG_INFINITY, |m, s| if s > m { s } else { m });
    // Separate passes: each vectorises (a running sum in the exponentials' loop kept it
    // scalar).
    row.iter_mut().for_each(|s| *s = exp_nonpositive(*s - max));
    (max, lanewise(row, 0.0, |sum, s| sum + s))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cross-path (a polynomial against the C library): bounded by 4 ulp.
    #[test]
    fn the_fast_exponential_matches_the_standard_one() {
        for i in 0..87_000 {
            let x = -(i as f32) * 1e-3;
            let (fast, exact) = (exp_nonpositive(x), x.exp());
            assert!((fast - exact).abs() <= 4.0 * f32::EPSILON * exact, "{x}: {fast} vs {exact}");
        }
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(-1e4) < 2e-38 && exp_nonpositive(f32::NEG_INFINITY) < 2e-38);
    }

    /// Row maximum and sum over lengths that leave every tail of the eight lanes.
    #[test]
    fn a_row_is_exponentiated_against_its_maximum() {
        for n in 1..20 {
            let logits: Vec<f32> = (0..n).map(|i| ((i * 7) % 5) as f32 - 0.5 * i as f32).collect();
            let mut row = logits.clone();
            let (max, sum) = exponentiate_row(&mut row);
            assert_eq!(max, logits.iter().copied().fold(f32::NEG_INFINITY, f32::max));
            let expected: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
            for (got, e) in row.iter().zip(&expected) {
                assert!((got - e).abs() <= 4.0 * f32::EPSILON * e, "{n}: {got} vs {e}");
            }
            assert!((sum - expected.iter().sum::<f32>()).abs() <= 1e-5 * sum, "{n}");
        }
    }
}
