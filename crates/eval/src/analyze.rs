//! The paper's two observations, measured on any model: neighbouring keys are similar
//! (values less so), and the share of the cache that similarity merging removes per layer
//! is a property of the model rather than of the text.

use kvmerger_compress::methods::CompareTo;
use kvmerger_compress::{adjacent_cosine, cosine, merging_sets, HeadCache, KvCache};
use serde::Serialize;

/// Adjacent-key similarity and mergeability of one (layer, kv head).
#[derive(Debug, Clone, Serialize)]
pub struct HeadAnalysis {
    pub layer: usize,
    pub head: usize,
    /// Percentiles 5, 25, 50, 75, 95 of `cos(k_i, k_{i+1})`.
    pub key_cosine_percentiles: [f32; 5],
    /// The same for values, for contrast.
    pub value_cosine_percentiles: [f32; 5],
    /// Entries left after merging-set identification over the whole head, as a share of
    /// its tokens (no protected tokens, no eviction).
    pub merge_ratio: f64,
}

/// One text's analysis.
#[derive(Debug, Clone, Serialize)]
pub struct TextAnalysis {
    pub name: String,
    pub tokens: usize,
    pub heads: Vec<HeadAnalysis>,
    /// Mean merge ratio of each layer's heads.
    pub layer_merge_ratio: Vec<f64>,
}

/// How much the per-layer merge ratio curve varies across texts.
#[derive(Debug, Clone, Serialize)]
pub struct Persistence {
    /// `[layer]`: largest difference between two texts' ratios.
    pub layer_max_abs_diff: Vec<f64>,
    pub max_abs_diff: f64,
    pub mean_abs_diff: f64,
    /// Mean Pearson correlation of the layer curves over all pairs of texts; none for a
    /// single text, which has no pair.
    pub mean_pairwise_correlation: Option<f64>,
}

/// `[len][len]` cosine similarities of rows `start..start + len` of a `[n, dim]` matrix.
pub fn cosine_matrix(rows: &[f32], dim: usize, start: usize, len: usize) -> Vec<Vec<f32>> {
    let row = |i: usize| &rows[(start + i) * dim..(start + i + 1) * dim];
    (0..len).map(|i| (0..len).map(|j| cosine(row(i), row(j))).collect()).collect()
}

/// Percentiles 5, 25, 50, 75, 95 (nearest rank); zeros for no data.
pub fn percentiles(values: &[f32]) -> [f32; 5] {
    if values.is_empty() {
        return [0.0; 5];
    }
    let mut v = values.to_vec();
    v.sort_by(f32::total_cmp);
    [0.05, 0.25, 0.5, 0.75, 0.95]
        .map(|p| v[((p * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)])
}

/// Share of a head's entries left after merging-set identification at `threshold`.
pub fn merge_ratio(head: &HeadCache, threshold: f32, compare_to: CompareTo) -> f64 {
    if head.is_empty() {
        return 1.0;
    }
    let protected = vec![false; head.len()];
    let sets = merging_sets(&head.keys(), head.head_dim(), &protected, threshold, compare_to);
    sets.len() as f64 / head.len() as f64
}

/// Analyses every head of a prefilled (uncompressed) cache.
pub fn analyze_cache(
    name: &str,
    cache: &KvCache,
    threshold: f32,
    compare_to: CompareTo,
) -> TextAnalysis {
    let mut heads = Vec::new();
    let mut layer_merge_ratio = Vec::new();
    for (layer, layer_heads) in cache.layers.iter().enumerate() {
        let mut sum = 0.0;
        for (head, h) in layer_heads.iter().enumerate() {
            let ratio = merge_ratio(h, threshold, compare_to);
            sum += ratio;
            heads.push(HeadAnalysis {
                layer,
                head,
                key_cosine_percentiles: percentiles(&adjacent_cosine(&h.keys(), h.head_dim())),
                value_cosine_percentiles: percentiles(&adjacent_cosine(&h.values(), h.head_dim())),
                merge_ratio: ratio,
            });
        }
        layer_merge_ratio.push(sum / layer_heads.len().max(1) as f64);
    }
    let tokens = cache.layers.first().and_then(|l| l.first()).map_or(0, HeadCache::len);
    TextAnalysis { name: name.to_string(), tokens, heads, layer_merge_ratio }
}

/// Spread of per-layer curves (`[text][layer]`) across texts.
pub fn persistence(curves: &[Vec<f64>]) -> Persistence {
    let n_layers = curves.first().map_or(0, Vec::len);
    let layer_max_abs_diff: Vec<f64> = (0..n_layers)
        .map(|l| {
            let (lo, hi) = curves.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), c| {
                (lo.min(c[l]), hi.max(c[l]))
            });
            hi - lo
        })
        .collect();
    let mut correlations = Vec::new();
    for i in 0..curves.len() {
        for j in i + 1..curves.len() {
            correlations.push(pearson(&curves[i], &curves[j]));
        }
    }
    Persistence {
        max_abs_diff: layer_max_abs_diff.iter().copied().fold(0.0, f64::max),
        mean_abs_diff: layer_max_abs_diff.iter().sum::<f64>() / n_layers.max(1) as f64,
        mean_pairwise_correlation: (!correlations.is_empty())
            .then(|| correlations.iter().sum::<f64>() / correlations.len() as f64),
        layer_max_abs_diff,
    }
}

/// Pearson correlation; 1 when either series is constant and they are equal, else 0.
pub fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len()) as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let (mut cov, mut va, mut vb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        cov += (x - ma) * (y - mb);
        va += (x - ma) * (x - ma);
        vb += (y - mb) * (y - mb);
    }
    if va == 0.0 || vb == 0.0 {
        if a == b {
            1.0
        } else {
            0.0
        }
    } else {
        cov / (va.sqrt() * vb.sqrt())
    }
}

/// Per-layer budget ratios whose mean is `overall`: each layer's budget is proportional to
/// the share of its cache that merging leaves (layers whose keys merge well get less),
/// capped at 1.
pub fn suggest_layer_budgets(layer_merge_ratio: &[f64], overall: f64) -> Vec<f64> {
    kvmerger_compress::scale_layer_budgets(layer_merge_ratio, overall)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvmerger_compress::EntryMeta;

    fn naive_cos(a: &[f32], b: &[f32]) -> f32 {
        let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
        let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        (dot / (na * nb)) as f32
    }

    fn head(rows: &[Vec<f32>]) -> HeadCache {
        let mut h = HeadCache::new(rows[0].len(), kvmerger_compress::KvDtype::F32);
        for (i, r) in rows.iter().enumerate() {
            h.push(r, r, EntryMeta::new(i));
        }
        h
    }

    fn pseudo_random_rows(n: usize, d: usize) -> Vec<Vec<f32>> {
        (0..n)
            .map(|i| {
                (0..d)
                    .map(|j| {
                        (((i * 31 + j * 17) % 23) as f32 - 11.0) / 7.0 + (i as f32 * 0.1).sin()
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn similarity_matches_a_naive_reference() {
        let rows = pseudo_random_rows(12, 6);
        let flat: Vec<f32> = rows.concat();
        let m = cosine_matrix(&flat, 6, 2, 8);
        for i in 0..8 {
            for j in 0..8 {
                assert!((m[i][j] - naive_cos(&rows[2 + i], &rows[2 + j])).abs() < 1e-5);
            }
            assert!((m[i][i] - 1.0).abs() < 1e-5);
        }
        let adj = adjacent_cosine(&flat, 6);
        assert_eq!(adj.len(), 11);
        for (i, c) in adj.iter().enumerate() {
            assert!((c - naive_cos(&rows[i], &rows[i + 1])).abs() < 1e-5);
        }
    }

    #[test]
    fn reported_ratio_equals_kvmerger_identification() {
        let rows = pseudo_random_rows(40, 4);
        let h = head(&rows);
        for threshold in [-2.0, 0.0, 0.5, 0.9, 2.0] {
            let sets = merging_sets(&h.keys(), 4, &[false; 40], threshold, CompareTo::Neighbour);
            assert_eq!(merge_ratio(&h, threshold, CompareTo::Neighbour), sets.len() as f64 / 40.0);
        }
        assert_eq!(merge_ratio(&h, 2.0, CompareTo::Neighbour), 1.0);
        assert_eq!(merge_ratio(&h, -2.0, CompareTo::Neighbour), 1.0 / 40.0);
    }

    #[test]
    fn persistence_of_identical_curves_is_perfect() {
        let c = vec![0.5, 0.7, 0.9];
        let p = persistence(&[c.clone(), c.clone()]);
        assert_eq!(p.max_abs_diff, 0.0);
        assert!((p.mean_pairwise_correlation.unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(
            persistence(std::slice::from_ref(&c)).mean_pairwise_correlation,
            None,
            "no pair"
        );
        let q = persistence(&[c, vec![0.6, 0.7, 0.8]]);
        assert!((q.max_abs_diff - 0.1).abs() < 1e-12);
    }

    #[test]
    fn suggested_budgets_average_to_the_request() {
        let ratios = [0.3, 0.5, 0.9, 1.0, 0.2];
        for overall in [0.2, 0.35, 0.5, 0.8] {
            let b = suggest_layer_budgets(&ratios, overall);
            let mean = b.iter().sum::<f64>() / b.len() as f64;
            assert!((mean - overall).abs() < 1e-6, "{overall}: {mean}");
            assert!(b.iter().all(|x| *x > 0.0 && *x <= 1.0));
            assert!(b[4] < b[2], "better-merging layers get less");
        }
    }
}
