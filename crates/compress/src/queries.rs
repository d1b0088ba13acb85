//! Statistics of a prompt's queries, for methods that predict the attention future queries
//! will pay (Expected Attention): per query head, the mean and second moments of the
//! queries before RoPE, and the rotation RoPE applies, averaged over the positions that
//! follow the prompt. The engine accumulates them while it runs the prompt; methods read
//! the future queries' mean and covariance.

/// Which query statistics a method asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct QueryStatistics {
    /// Queries at positions below this are left out (the sinks' outlier queries).
    pub skip: usize,
    /// Future positions, right after the last query seen, the rotation is averaged over.
    pub future: usize,
    /// Whether second moments (the covariance) are accumulated too.
    pub covariance: bool,
}

/// The accumulated queries of the query heads that share one kv head.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryMoments {
    group: usize,
    head_dim: usize,
    /// Queries added, per query head.
    count: usize,
    /// `[group, head_dim]`
    sum: Vec<f64>,
    /// `[group, head_dim, head_dim]`; empty without covariance.
    outer: Vec<f64>,
    /// `[head_dim, head_dim]`, row-major: RoPE's rotation averaged over the future
    /// positions (`x -> R x`); the identity until the engine sets it.
    rotation: Vec<f32>,
}

impl QueryMoments {
    pub fn new(group: usize, head_dim: usize, covariance: bool) -> Self {
        let mut rotation = vec![0.0; head_dim * head_dim];
        (0..head_dim).for_each(|i| rotation[i * head_dim + i] = 1.0);
        Self {
            group,
            head_dim,
            count: 0,
            sum: vec![0.0; group * head_dim],
            outer: if covariance { vec![0.0; group * head_dim * head_dim] } else { Vec::new() },
            rotation,
        }
    }

    /// Query heads per kv head.
    pub fn group(&self) -> usize {
        self.group
    }

    /// Queries added per query head.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Adds one token's queries before RoPE, `[group, head_dim]`.
    pub fn add(&mut self, queries: &[f32]) {
        let d = self.head_dim;
        debug_assert_eq!(queries.len(), self.group * d);
        for (g, q) in queries.chunks_exact(d).enumerate() {
            self.sum[g * d..(g + 1) * d].iter_mut().zip(q).for_each(|(s, &x)| *s += x as f64);
            if !self.outer.is_empty() {
                let outer = &mut self.outer[g * d * d..(g + 1) * d * d];
                for (row, &qi) in outer.chunks_exact_mut(d).zip(q) {
                    row.iter_mut().zip(q).for_each(|(o, &qj)| *o += (qi * qj) as f64);
                }
            }
        }
        self.count += 1;
    }

    /// Sets RoPE's averaged rotation, `[head_dim, head_dim]` row-major.
    pub fn set_rotation(&mut self, rotation: Vec<f32>) {
        debug_assert_eq!(rotation.len(), self.head_dim * self.head_dim);
        self.rotation = rotation;
    }

    /// The mean of query head `g`'s queries, rotated: `R mu`, `[head_dim]`.
    pub fn future_mean(&self, g: usize) -> Vec<f64> {
        let d = self.head_dim;
        let n = self.count.max(1) as f64;
        let mean: Vec<f64> = self.sum[g * d..(g + 1) * d].iter().map(|s| s / n).collect();
        self.rotate(&mean, 1)
    }

    /// The (population) covariance of query head `g`'s queries, rotated: `R C R^T`,
    /// `[head_dim, head_dim]`; `None` without second moments.
    pub fn future_covariance(&self, g: usize) -> Option<Vec<f64>> {
        if self.outer.is_empty() {
            return None;
        }
        let d = self.head_dim;
        let n = self.count.max(1) as f64;
        let sum = &self.sum[g * d..(g + 1) * d];
        let outer = &self.outer[g * d * d..(g + 1) * d * d];
        let cov: Vec<f64> =
            (0..d * d).map(|ij| outer[ij] / n - (sum[ij / d] / n) * (sum[ij % d] / n)).collect();
        // R C R^T = R (R C^T)^T, and C is symmetric.
        let rc = self.rotate(&cov, d);
        let rc_t: Vec<f64> = (0..d * d).map(|ij| rc[(ij % d) * d + ij / d]).collect();
        Some(self.rotate(&rc_t, d))
    }

    /// `R x` for `x` of `[head_dim, cols]`, row-major.
    fn rotate(&self, x: &[f64], cols: usize) -> Vec<f64> {
        let d = self.head_dim;
        let mut out = vec![0.0; d * cols];
        for (i, row) in self.rotation.chunks_exact(d).enumerate() {
            for (k, &r) in row.iter().enumerate().filter(|(_, &r)| r != 0.0) {
                let (from, to) = (&x[k * cols..(k + 1) * cols], &mut out[i * cols..(i + 1) * cols]);
                to.iter_mut().zip(from).for_each(|(o, &v)| *o += r as f64 * v);
            }
        }
        out
    }

    /// Bytes held.
    pub fn resident_bytes(&self) -> usize {
        (self.sum.capacity() + self.outer.capacity()) * std::mem::size_of::<f64>()
            + self.rotation.capacity() * std::mem::size_of::<f32>()
    }

    /// Bytes the statistics of `group` query heads of `head_dim` take, as
    /// [`Self::resident_bytes`] counts them (for reserving memory in advance).
    pub fn bytes(group: usize, head_dim: usize, covariance: bool) -> usize {
        let outer = if covariance { group * head_dim * head_dim } else { 0 };
        (group * head_dim + outer) * std::mem::size_of::<f64>()
            + head_dim * head_dim * std::mem::size_of::<f32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments_are_the_mean_and_population_covariance_rotated() {
        let mut m = QueryMoments::new(1, 2, true);
        for q in [[1.0, 2.0], [3.0, 2.0], [2.0, 5.0]] {
            m.add(&q);
        }
        assert_eq!(m.future_mean(0), vec![2.0, 3.0]);
        // Centred: [-1,-1], [1,-1], [0,2]; over 3.
        let cov = m.future_covariance(0).unwrap();
        let expected = [2.0 / 3.0, 0.0, 0.0, 2.0];
        cov.iter().zip(expected).for_each(|(a, b)| assert!((a - b).abs() < 1e-12, "{cov:?}"));
        // A quarter turn: (x, y) -> (-y, x).
        m.set_rotation(vec![0.0, -1.0, 1.0, 0.0]);
        assert_eq!(m.future_mean(0), vec![-3.0, 2.0]);
        let cov = m.future_covariance(0).unwrap();
        let expected = [2.0, 0.0, 0.0, 2.0 / 3.0];
        cov.iter().zip(expected).for_each(|(a, b)| assert!((a - b).abs() < 1e-12, "{cov:?}"));
        assert!(QueryMoments::new(1, 2, false).future_covariance(0).is_none());
        for covariance in [true, false] {
            let m = QueryMoments::new(3, 8, covariance);
            assert_eq!(m.resident_bytes(), QueryMoments::bytes(3, 8, covariance));
        }
    }
}
