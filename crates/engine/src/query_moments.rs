//! Recording the prompt's query statistics in the forward pass (Expected Attention's
//! model of future queries): each kv head accumulates its query heads' queries before
//! RoPE, and holds RoPE's rotation averaged over the positions after the last query seen.

use kvmerger_compress::{HeadCache, Queries};
use kvmerger_kernels::AttentionShape;
use rayon::prelude::*;

use crate::rope::Rope;

/// Adds the queries of `q` (`[seq, n_heads * head_dim]`, before RoPE, of the tokens at
/// positions `first..first + seq`) to every statistic of `which` in `heads`, leaving out
/// positions below its `skip`; then sets each statistic's rotation to the one averaged
/// over the `future` positions after the last of them.
pub fn record_queries(
    rope: &Rope,
    q: &[f32],
    first: usize,
    heads: &mut [HeadCache],
    shape: AttentionShape,
    which: Queries,
) {
    let AttentionShape { n_heads, n_kv_heads, head_dim } = shape;
    let group = n_heads / n_kv_heads;
    let row = n_heads * head_dim;
    let seq = q.len() / row;
    let end = first + seq;
    for stats in which.iter() {
        let rotation = rope.mean_rotation(end..end + stats.future);
        heads.par_iter_mut().enumerate().for_each(|(kv, head)| {
            let moments = head.query_moments_mut(stats, group);
            for (i, token) in q.chunks_exact(row).enumerate() {
                if first + i >= stats.skip {
                    // Query heads `kv * group ..` read this kv head: contiguous in the row.
                    moments.add(&token[kv * group * head_dim..(kv + 1) * group * head_dim]);
                }
            }
            moments.set_rotation(rotation.clone());
        });
    }
}

#[cfg(test)]
mod tests {
    use kvmerger_compress::{QueryStatistics, StatsRequest};

    use crate::prefill::PrefillOptions;
    use crate::sequence::Prefilled;
    use crate::testing::{random_llama, reference_forward, tiny_config};

    /// The moments a prefill records are those of the reference forward pass's queries
    /// before RoPE (from position `skip` on), rotated by the mean of what RoPE does at the
    /// `future` positions after the prompt, computed here from the reference's own RoPE.
    #[test]
    fn prefill_records_the_reference_queries_moments() {
        let model = random_llama(tiny_config(), 3).unwrap();
        let c = model.config.clone();
        let (d, group) = (c.head_dim, c.n_heads / c.n_kv_heads);
        let tokens: Vec<u32> = (0..30u32).map(|i| (i * 11 + 5) % 64).collect();
        let which = QueryStatistics { skip: 3, future: 9, covariance: true };
        let stats =
            StatsRequest { queries: kvmerger_compress::Queries::one(which), ..Default::default() };
        // Attention chunks smaller than the prompt: the statistic is per token, not per chunk.
        let options = PrefillOptions { attention_chunk: 8, ..Default::default() };
        let prefilled = Prefilled::run(&model, &tokens, stats, options).unwrap();
        let reference = reference_forward(&model, &tokens, |_, _, _, _| true).unwrap();
        let rope = crate::rope::Rope::new(&c);
        // R[i][k] = mean over the future positions of RoPE applied to the basis vector k.
        let mut r = vec![vec![0.0f64; d]; d];
        for k in 0..d {
            for p in 30..39 {
                let mut e = vec![0.0f32; c.n_heads * d];
                e[k] = 1.0;
                rope.apply(&mut e, p);
                (0..d).for_each(|i| r[i][k] += e[i] as f64 / 9.0);
            }
        }
        for (l, heads) in prefilled.cache.layers.iter().enumerate() {
            for (kv, head) in heads.iter().enumerate() {
                let moments = head.query_moments(which).unwrap();
                assert_eq!(moments.count(), 27);
                for g in 0..group {
                    let qh = kv * group + g;
                    let q: Vec<Vec<f64>> = reference.queries[l][3..]
                        .iter()
                        .map(|row| row[qh * d..(qh + 1) * d].iter().map(|&x| x as f64).collect())
                        .collect();
                    let mu: Vec<f64> =
                        (0..d).map(|j| q.iter().map(|x| x[j]).sum::<f64>() / 27.0).collect();
                    let expected: Vec<f64> =
                        (0..d).map(|i| (0..d).map(|j| r[i][j] * mu[j]).sum()).collect();
                    let got = moments.future_mean(g);
                    let scale = expected.iter().map(|x| x.abs()).fold(0.0, f64::max);
                    for (a, b) in got.iter().zip(&expected) {
                        assert!((a - b).abs() <= 1e-4 * scale, "layer {l} head {qh}: {a} vs {b}");
                    }
                    // The rotated covariance's first diagonal entry, (R C R^T)[0][0].
                    let cov: Vec<Vec<f64>> = (0..d)
                        .map(|a| {
                            (0..d)
                                .map(|b| {
                                    q.iter().map(|x| (x[a] - mu[a]) * (x[b] - mu[b])).sum::<f64>()
                                        / 27.0
                                })
                                .collect()
                        })
                        .collect();
                    let c00: f64 = (0..d)
                        .map(|a| (0..d).map(|b| r[0][a] * cov[a][b] * r[0][b]).sum::<f64>())
                        .sum();
                    let got = moments.future_covariance(g).unwrap()[0];
                    assert!(
                        (got - c00).abs() <= 1e-3 * c00.abs().max(1e-3),
                        "layer {l}: {got} vs {c00}"
                    );
                }
            }
        }
    }
}
