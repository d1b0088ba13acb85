//! Confidence intervals for report cells: a seeded percentile bootstrap over samples (KL,
//! perplexity, top-1 agreement, graded scores, paired differences) and the Wilson score
//! interval for accuracies (scores that are all 0 or 1).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Resamples of the bootstrap.
pub const BOOTSTRAP_RESAMPLES: usize = 2000;
/// Seed of every bootstrap, so a report is the same each time it is written.
pub const BOOTSTRAP_SEED: u64 = 0x6b76_6d65_7267_6572;
/// Two-sided 95% normal quantile.
const Z95: f64 = 1.959_963_984_540_054;

/// A mean with its 95% confidence interval over `n` samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    pub mean: f64,
    pub low: f64,
    pub high: f64,
    pub n: usize,
}

impl Estimate {
    pub const EMPTY: Estimate = Estimate { mean: f64::NAN, low: f64::NAN, high: f64::NAN, n: 0 };

    /// Whether the interval lies wholly above or below `x`.
    pub fn excludes(&self, x: f64) -> bool {
        self.n > 0 && (self.low > x || self.high < x)
    }
}

/// The mean of `values` (non-finite ones dropped) with a percentile-bootstrap 95% interval.
/// The interval depends on the order of `values`: callers pass them in a fixed order.
pub fn bootstrap_mean(values: &[f64]) -> Estimate {
    let v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    let n = v.len();
    if n == 0 {
        return Estimate::EMPTY;
    }
    let mean = v.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return Estimate { mean, low: mean, high: mean, n };
    }
    let mut rng = StdRng::seed_from_u64(BOOTSTRAP_SEED);
    let mut means: Vec<f64> = (0..BOOTSTRAP_RESAMPLES)
        .map(|_| (0..n).map(|_| v[rng.random_range(0..n)]).sum::<f64>() / n as f64)
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| means[(q * (BOOTSTRAP_RESAMPLES - 1) as f64).round() as usize];
    Estimate { mean, low: at(0.025), high: at(0.975), n }
}

/// The mean of the groups' means with a percentile-bootstrap 95% interval that resamples
/// within each group: an average over tasks whose sample counts may differ (RULER's score
/// over its subtasks). Non-finite values and then empty groups are dropped; `n` counts the
/// values. One group gives [`bootstrap_mean`]'s estimate.
pub fn stratified_bootstrap_mean(groups: &[Vec<f64>]) -> Estimate {
    let groups: Vec<Vec<f64>> = groups
        .iter()
        .map(|g| g.iter().copied().filter(|x| x.is_finite()).collect::<Vec<f64>>())
        .filter(|g| !g.is_empty())
        .collect();
    let n: usize = groups.iter().map(Vec::len).sum();
    if n == 0 {
        return Estimate::EMPTY;
    }
    let mean_of_means = |pick: &mut dyn FnMut(&[f64]) -> f64| {
        groups.iter().map(|g| pick(g)).sum::<f64>() / groups.len() as f64
    };
    let mean = mean_of_means(&mut |g| g.iter().sum::<f64>() / g.len() as f64);
    if n == 1 {
        return Estimate { mean, low: mean, high: mean, n };
    }
    let mut rng = StdRng::seed_from_u64(BOOTSTRAP_SEED);
    let mut means: Vec<f64> = (0..BOOTSTRAP_RESAMPLES)
        .map(|_| {
            mean_of_means(&mut |g| {
                (0..g.len()).map(|_| g[rng.random_range(0..g.len())]).sum::<f64>() / g.len() as f64
            })
        })
        .collect();
    means.sort_by(f64::total_cmp);
    let at = |q: f64| means[(q * (BOOTSTRAP_RESAMPLES - 1) as f64).round() as usize];
    Estimate { mean, low: at(0.025), high: at(0.975), n }
}

/// The share of successes with its Wilson score 95% interval.
pub fn wilson(successes: usize, n: usize) -> Estimate {
    if n == 0 {
        return Estimate::EMPTY;
    }
    let (k, n_f) = (successes as f64, n as f64);
    let p = k / n_f;
    let z2 = Z95 * Z95;
    let centre = (p + z2 / (2.0 * n_f)) / (1.0 + z2 / n_f);
    let half = Z95 / (1.0 + z2 / n_f) * (p * (1.0 - p) / n_f + z2 / (4.0 * n_f * n_f)).sqrt();
    // At 0 or n successes the bound is exactly 0 or 1 (rounding would leave 1e-17).
    let low = if successes == 0 { 0.0 } else { (centre - half).max(0.0) };
    let high = if successes == n { 1.0 } else { (centre + half).min(1.0) };
    Estimate { mean: p, low, high, n }
}

/// The share of 1s among 0/1 `values` (non-finite ones dropped), with its Wilson interval.
pub fn accuracy(values: &[f64]) -> Estimate {
    let v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    wilson(v.iter().filter(|&&x| x == 1.0).count(), v.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_matches_published_values() {
        // Wilson 95% for 8 of 10: (0.4902, 0.9433) (Newcombe 1998, table I style values).
        let e = wilson(8, 10);
        assert!((e.low - 0.4902).abs() < 1e-3 && (e.high - 0.9433).abs() < 1e-3, "{e:?}");
        // 0 of 12: (0, 0.2425); the interval never leaves [0, 1].
        let e = wilson(0, 12);
        assert_eq!(e.low, 0.0);
        assert!((e.high - 0.2425).abs() < 1e-3, "{e:?}");
        assert_eq!(wilson(0, 0).n, 0);
    }

    #[test]
    fn bootstrap_is_seeded_and_brackets_the_mean_like_a_t_interval() {
        let v: Vec<f64> = (0..40).map(|i| ((i * 37) % 11) as f64 / 10.0).collect();
        let a = bootstrap_mean(&v);
        assert_eq!(a, bootstrap_mean(&v), "the same values give the same interval");
        assert!(a.low < a.mean && a.mean < a.high);
        // The normal-theory half-width s / sqrt(n) * 1.96; the bootstrap's is within 15%.
        let mean = v.iter().sum::<f64>() / 40.0;
        let sd = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 39.0).sqrt();
        let half = Z95 * sd / 40f64.sqrt();
        let boot_half = (a.high - a.low) / 2.0;
        assert!((boot_half / half - 1.0).abs() < 0.15, "{boot_half} vs {half}");
        let one = bootstrap_mean(&[2.0, f64::NAN]);
        assert_eq!((one.mean, one.low, one.high, one.n), (2.0, 2.0, 2.0, 1));
    }

    #[test]
    fn stratified_bootstrap_averages_group_means() {
        let v: Vec<f64> = (0..40).map(|i| ((i * 37) % 11) as f64 / 10.0).collect();
        assert_eq!(stratified_bootstrap_mean(std::slice::from_ref(&v)), bootstrap_mean(&v));
        // Means 1.0 (n = 2) and 0.0 (n = 6): their average is 0.5, not the pooled 0.25; the
        // second group never varies and the first only between its equal values.
        let e = stratified_bootstrap_mean(&[vec![1.0, 1.0], vec![0.0; 6], vec![f64::NAN]]);
        assert_eq!((e.mean, e.low, e.high, e.n), (0.5, 0.5, 0.5, 8));
        let e = stratified_bootstrap_mean(&[vec![0.0, 1.0, 0.0, 1.0], vec![0.5, 0.25]]);
        assert!(e.low < e.mean && e.mean < e.high && (e.mean - 0.4375).abs() < 1e-12, "{e:?}");
        assert_eq!(stratified_bootstrap_mean(&[vec![], vec![f64::NAN]]).n, 0);
    }

    #[test]
    fn accuracy_is_the_wilson_interval_of_the_ones() {
        assert_eq!(accuracy(&[1.0, 0.0, 1.0, f64::NAN, 1.0]), wilson(3, 4));
    }
}
