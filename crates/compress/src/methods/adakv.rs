//! AdaKV (Feng, Lv, Cao, Xie, Zhou, "Ada-KV: Optimizing KV Cache Eviction by Adaptive
//! Budget Allocation for Efficient LLM Inference", 2024): the kv heads of a layer share the
//! layer's budget. Any scorer rates every entry of every head; the layer keeps the best
//! `heads x budget` entries over all its heads together, so a head whose attention is
//! concentrated gives room to one whose attention is spread. kvpress's safeguard
//! (`alpha_safeguard`) first gives each head its own best `alpha x budget` entries.
//!
//! kvpress masks the entries it drops and keeps every head's length; here they are freed,
//! so heads hold different numbers of entries and the budget holds per layer (the sum
//! over its heads). Each head is then compressed to its share by `head_method`, the scorer
//! itself by default (which keeps exactly the entries the layer chose), or another method
//! (`head_method=kvmerger`: KVMerger with AdaKV's head budgets). Like kvpress's press it acts
//! once, after the prompt; the cache grows while decoding.

use serde::{Deserialize, Serialize};

use crate::budget::Budget;
use crate::cache::HeadCache;
use crate::error::{CompressError, Result};
use crate::method::{CompressionMethod, HeadId, HeadReport};
use crate::methods::inner::InnerMethod;
use crate::methods::select::top_k;
use crate::stats::StatsRequest;

/// AdaKV parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdaKvConfig {
    pub budget: Budget,
    /// Rates the entries that the heads of a layer compete with (kvpress: any
    /// `ScorerPress`; AdaKV's paper: SnapKV).
    pub scorer: InnerMethod,
    /// Compresses each head to its share of the layer's budget; the scorer when absent.
    pub head_method: Option<InnerMethod>,
    /// Share of a head's even budget it keeps whatever the other heads score (kvpress: 0.2).
    pub alpha_safeguard: f64,
}

impl Default for AdaKvConfig {
    fn default() -> Self {
        Self {
            budget: Budget::default(),
            scorer: InnerMethod::named("snapkv").expect("snapkv is a method"),
            head_method: None,
            alpha_safeguard: 0.2,
        }
    }
}

impl AdaKvConfig {
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.alpha_safeguard) {
            return Err(CompressError::invalid(
                "alpha_safeguard",
                format!("must be in [0, 1], got {}", self.alpha_safeguard),
            ));
        }
        self.scorer.scorer("scorer")?;
        Ok(())
    }

    /// The method that compresses each head.
    fn head_method(&self) -> &dyn CompressionMethod {
        self.head_method.as_ref().unwrap_or(&self.scorer).method()
    }
}

/// Entries each head keeps when the heads share `budget` entries each: every head's own
/// best `floor(alpha * min(budget, len))` first (at least one, so that no head is left
/// empty, where kvpress's could at tiny budgets), then the best scores over all heads
/// (ties to the lower head, then the earlier entry) until the layer holds the sum of
/// `min(budget, len)` over its heads. `scores[h]` holds head `h`'s scores, `[len_h]`.
pub fn allocate(scores: &[Vec<f32>], budget: usize, alpha_safeguard: f64) -> Vec<usize> {
    let even: Vec<usize> = scores.iter().map(|s| budget.min(s.len())).collect();
    // `(safeguarded, score, head, entry)`: safeguarded entries rank above every score, as
    // kvpress's `finfo.max` ranks above its scorers' own "always keep" maxima.
    let mut ranked: Vec<(bool, f32, usize, usize)> = Vec::new();
    for (h, head) in scores.iter().enumerate() {
        let safe = ((even[h] as f64 * alpha_safeguard) as usize).max(1.min(even[h]));
        let mut is_safe = vec![false; head.len()];
        top_k(0..head.len(), |i| head[i], safe).into_iter().for_each(|i| is_safe[i] = true);
        ranked.extend(head.iter().enumerate().map(|(i, &s)| (is_safe[i], s, h, i)));
    }
    ranked
        .sort_by(|a, b| b.0.cmp(&a.0).then(b.1.total_cmp(&a.1)).then((a.2, a.3).cmp(&(b.2, b.3))));
    let mut shares = vec![0; scores.len()];
    let total: usize = even.iter().sum();
    ranked.iter().take(total).for_each(|&(_, _, h, _)| shares[h] += 1);
    shares
}

impl CompressionMethod for AdaKvConfig {
    fn name(&self) -> &'static str {
        "adakv"
    }

    fn incremental_refusal(&self) -> Option<String> {
        Some(format!(
            "{} shares each layer's budget among its heads, so a head has no bound of its \
             own between compressions: compress once",
            self.name()
        ))
    }

    fn stats(&self) -> StatsRequest {
        self.scorer.method().stats().union(self.head_method().stats())
    }

    fn prompt_stats(&self, prompt_len: usize) -> StatsRequest {
        let scorer = self.scorer.method().prompt_stats(prompt_len);
        scorer.union(self.head_method().prompt_stats(prompt_len))
    }

    fn decode_stats(&self) -> StatsRequest {
        StatsRequest::default()
    }

    fn budget_entries(&self, prompt_len: usize) -> usize {
        self.budget.entries(prompt_len)
    }

    fn log_count_bias(&self) -> bool {
        self.head_method().log_count_bias()
    }

    fn computes_rows(&self) -> bool {
        self.head_method().computes_rows()
    }

    /// A head alone has no other heads to share with: the head method at `budget`.
    fn compress(&self, id: HeadId, head: &mut HeadCache, budget: usize) -> Result<HeadReport> {
        self.head_method().compress(id, head, budget)
    }

    fn compress_layer(
        &self,
        layer: usize,
        heads: &mut [HeadCache],
        budget: usize,
    ) -> Result<Vec<HeadReport>> {
        let scorer = self.scorer.scorer("scorer")?;
        let scores = heads.iter().map(|h| scorer.score(h)).collect::<Result<Vec<_>>>()?;
        let shares = allocate(&scores, budget, self.alpha_safeguard);
        compress_to_shares(self.head_method(), layer, heads, shares)
    }
}

/// Compresses each kv head of `layer` to its share of the layer's budget with `method`.
pub(crate) fn compress_to_shares(
    method: &dyn CompressionMethod,
    layer: usize,
    heads: &mut [HeadCache],
    shares: Vec<usize>,
) -> Result<Vec<HeadReport>> {
    heads
        .iter_mut()
        .zip(shares)
        .enumerate()
        .map(|(head, (cache, share))| method.compress(HeadId { layer, head }, cache, share))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CompressionConfig;
    use crate::methods::test_util::random_head;

    /// kvpress's `AdaKVPress.compress` over KNorm's scores, computed the plain way in f64:
    /// each head's `int(n_kept * alpha)` lowest-norm keys raised to the maximum, then the
    /// `heads * (len - n_kept)` lowest scores over all heads masked. Returns each head's
    /// unmasked positions.
    fn kvpress_kept(heads: &[HeadCache], n_kept: usize, alpha: f64) -> Vec<Vec<usize>> {
        let len = heads[0].len();
        let mut flat: Vec<(f64, usize, usize)> = Vec::new();
        for (h, head) in heads.iter().enumerate() {
            let norm =
                |i: usize| head.key(i).iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            let mut scores: Vec<f64> = (0..len).map(|i| -norm(i)).collect();
            let mut order: Vec<usize> = (0..len).collect();
            order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
            let n_safe = (n_kept as f64 * alpha) as usize;
            order[..n_safe].iter().for_each(|&i| scores[i] = f64::MAX);
            flat.extend(scores.into_iter().enumerate().map(|(i, s)| (s, h, i)));
        }
        flat.sort_by(|a, b| a.0.total_cmp(&b.0));
        let pruned = heads.len() * (len - n_kept);
        let mut kept = vec![Vec::new(); heads.len()];
        flat[pruned..].iter().for_each(|&(_, h, i)| kept[h].push(i));
        kept.iter_mut().for_each(|k| k.sort());
        kept
    }

    fn adakv(params: &[(&str, &str)], budget: usize) -> Box<dyn CompressionMethod> {
        let params: Vec<(String, String)> =
            params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let config =
            CompressionConfig::from_cli("adakv", Some(Budget::Tokens(budget)), &params).unwrap();
        config.build().unwrap()
    }

    #[test]
    fn keeps_what_kvpress_keeps_over_the_heads_of_a_layer() {
        for seed in 0..12 {
            // Heads whose key norms differ in scale, so the shares differ.
            let mut heads: Vec<HeadCache> = (0..4)
                .map(|h| {
                    let head = random_head(50, 8, seed * 10 + h);
                    let keys: Vec<f32> =
                        head.keys().iter().map(|k| k * (1.0 + h as f32 * 0.3)).collect();
                    let (values, meta) = (head.values().into_owned(), head.meta().to_vec());
                    HeadCache::from_parts(8, head.dtype(), keys, values, meta).unwrap()
                })
                .collect();
            let (budget, alpha) = (8 + seed as usize, if seed % 2 == 0 { 0.2 } else { 0.5 });
            let expected = kvpress_kept(&heads, budget, alpha);
            let alpha = alpha.to_string();
            let method = adakv(&[("scorer", "knorm"), ("alpha_safeguard", &alpha)], budget);
            let reports = method.compress_layer(3, &mut heads, budget).unwrap();
            let kept: Vec<Vec<usize>> =
                heads.iter().map(|h| h.meta().iter().map(|m| m.position).collect()).collect();
            assert_eq!(kept, expected, "seed {seed}");
            let total: usize = reports.iter().map(|r| r.after).sum();
            assert_eq!(total, 4 * budget, "the layer's budget is held");
            assert!(kept.iter().map(Vec::len).collect::<Vec<_>>() != vec![budget; 4]);
        }
    }

    #[test]
    fn snapkv_windows_stay_and_the_safeguard_bounds_the_shares() {
        let window = 4;
        let heads: Vec<HeadCache> = (0..3)
            .map(|h| {
                let mut head = random_head(40, 4, 70 + h);
                // Head 0's attention dwarfs the others': it takes all the room left.
                let scale = if h == 0 { 100.0 } else { 1.0 };
                let scores = head.meta().iter().map(|m| m.attention * scale).collect();
                head.set_window_attention(window, scores).unwrap();
                head
            })
            .collect();
        let budget = 10;
        let snapkv = r#"{"method":"snapkv","window":4}"#;
        for (alpha, lens) in [("0.2", [22, 4, 4]), ("1", [10, 10, 10]), ("0.5", [20, 5, 5])] {
            let method = adakv(&[("scorer", snapkv), ("alpha_safeguard", alpha)], budget);
            let mut heads = heads.clone();
            method.compress_layer(0, &mut heads, budget).unwrap();
            assert_eq!(heads.iter().map(HeadCache::len).collect::<Vec<_>>(), lens, "{alpha}");
            for head in &heads {
                let newest: Vec<usize> =
                    head.meta()[head.len() - window..].iter().map(|m| m.position).collect();
                assert_eq!(newest, (36..40).collect::<Vec<_>>(), "the window stays");
            }
        }
    }

    #[test]
    fn kvmerger_compresses_each_head_to_its_share() {
        let mut heads: Vec<HeadCache> = (0..3).map(|h| random_head(60, 8, 90 + h)).collect();
        let budget = 20;
        let method = adakv(&[("scorer", "keydiff"), ("head_method", "kvmerger")], budget);
        assert!(method.computes_rows());
        let scores: Vec<Vec<f32>> = heads
            .iter()
            .map(|h| {
                let cfg = CompressionConfig::from_cli("keydiff", None, &[]).unwrap();
                cfg.build().unwrap().scorer().unwrap().score(h).unwrap()
            })
            .collect();
        let shares = allocate(&scores, budget, 0.2);
        assert_eq!(shares.iter().sum::<usize>(), 3 * budget);
        method.compress_layer(0, &mut heads, budget).unwrap();
        let lens: Vec<usize> = heads.iter().map(HeadCache::len).collect();
        assert_eq!(lens, shares, "KVMerger merges each head to exactly its share");
        let tokens: u32 = heads.iter().flat_map(|h| h.meta()).map(|m| m.count).sum();
        assert_eq!(tokens, 3 * 60, "merged, not evicted");
    }

    #[test]
    fn refuses_a_method_without_scores_and_a_bad_safeguard() {
        let err = |params: &[(&str, &str)]| {
            let params: Vec<(String, String)> =
                params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            CompressionConfig::from_cli("adakv", None, &params).unwrap_err().to_string()
        };
        let e = err(&[("scorer", "kvmerger")]);
        assert!(e.contains("scorer") && e.contains("snapkv") && e.contains("keydiff"), "{e}");
        assert!(err(&[("alpha_safeguard", "1.5")]).contains("alpha_safeguard"));
        assert!(err(&[("scorer", "magic")]).contains("magic"));
        let e = err(&[("scorer", r#"{"method":"knorm","budget":0.3}"#)]);
        assert!(e.contains("budget"), "{e}");
    }
}
