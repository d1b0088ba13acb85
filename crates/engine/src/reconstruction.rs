//! KVzip's reconstruction (see `kvmerger_compress::methods::KvzipConfig`): after the prompt
//! is prefilled, the model is asked to repeat its context and fed the context again, chunk
//! by chunk, on top of the prompt's cache ([`crate::reconstruction_pass`]); every prompt
//! entry records the most attention a query of the reconstruction paid it. The
//! reconstruction's own entries are dropped after each chunk, so the cache ends as it
//! began, with one statistic row more. Here: the instructions, and the recording each
//! forward pass of the reconstruction does.

use kvmerger_compress::{HeadCache, ReconstructionPass};
use kvmerger_kernels::{causal_softmax, AttentionShape, CausalBlock};
use rayon::prelude::*;

use crate::error::Result;
use crate::tokenizer::TextTokenizer;

/// The instruction before the first chunk (kvpress's and the paper's wording).
const FIRST: &str = "\n\nRepeat the previous context exactly.";
/// The instruction before every later chunk, followed by the last tokens of the one before.
const LATER: &str = "\n\nRepeat the part of the previous context exactly, starting with";
/// Tokens of the previous chunk quoted after [`LATER`] (kvpress: 8).
const OVERLAP: usize = 8;

/// The token ids of the reconstruction's instructions, in the model's vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconstructionPrompt {
    /// Before the first chunk.
    pub first: Vec<u32>,
    /// Before every later chunk, ahead of the previous chunk's last tokens.
    pub later: Vec<u32>,
    /// Ends the user's turn and opens the assistant's, as the chat template writes it
    /// (`\n` for a model without one), before the chunk itself.
    pub suffix: Vec<u32>,
}

impl ReconstructionPrompt {
    /// The instructions encoded by `tokenizer`; `assistant_opening` is what the model's chat
    /// template writes after a user message (`\n` for a model without one), which the
    /// model-loading side cuts from the template as kvpress cuts it.
    pub fn new(tokenizer: &TextTokenizer, assistant_opening: &str) -> Result<Self> {
        Ok(Self {
            first: tokenizer.encode(FIRST, false)?,
            later: tokenizer.encode(LATER, false)?,
            suffix: tokenizer.encode(assistant_opening, false)?,
        })
    }

    /// The tokens fed to repeat `tokens[chunk]`: the instruction, then the chunk.
    pub(crate) fn tokens_for(&self, tokens: &[u32], chunk: std::ops::Range<usize>) -> Vec<u32> {
        let mut ids = if chunk.start == 0 {
            self.first.clone()
        } else {
            let quoted = &tokens[chunk.start.saturating_sub(OVERLAP)..chunk.start];
            [self.later.as_slice(), quoted].concat()
        };
        ids.extend_from_slice(&self.suffix);
        ids.extend_from_slice(&tokens[chunk]);
        ids
    }
}

/// Reconstruction queries per block of [`record_reconstruction`]'s softmax: with
/// Qwen2.5-0.5B's groups of 7 and 4,000 visible keys, 3.6 MiB of probabilities a block.
const QUERY_BLOCK: usize = 32;

/// Folds the attention of `seq` reconstruction queries (`q`: `[seq, n_heads * head_dim]`,
/// rotated; their keys the last `seq` entries of each head) into each head's
/// reconstruction scores: per context entry of `pass`, the maximum over the queries and
/// the query heads of its group of the probability under a softmax over the sinks, the
/// context chunk and the reconstruction's entries up to the query's own. Those entries are
/// gathered side by side once per head, so that blocks of queries go through the kernels'
/// explicit softmax (a matrix product), in parallel over heads and blocks.
pub fn record_reconstruction(
    q: &[f32],
    seq: usize,
    heads: &mut [HeadCache],
    shape: AttentionShape,
    pass: ReconstructionPass,
) {
    let (d, group) = (shape.head_dim, shape.group());
    let context = pass.context_start..pass.context_end;
    // Where the context sits among the gathered entries.
    let in_context = pass.sinks..pass.sinks + context.len();
    heads.par_iter_mut().enumerate().for_each(|(kv, head)| {
        let len = head.len();
        let first_query = len - seq;
        let keys = head.keys();
        let mut seen = Vec::with_capacity((in_context.end + len - pass.appended) * d);
        for entries in [0..pass.sinks, context.clone(), pass.appended..len] {
            seen.extend_from_slice(&keys[entries.start * d..entries.end * d]);
        }
        drop(keys);
        // Entries the first query sees: the sinks, the context and the reconstruction's
        // entries up to its own.
        let first_seen = in_context.end + first_query - pass.appended + 1;
        let blocks: Vec<usize> = (0..seq).step_by(QUERY_BLOCK).collect();
        let best = blocks
            .into_par_iter()
            .map_init(Vec::new, |probabilities, start| {
                let queries = start..(start + QUERY_BLOCK).min(seq);
                let qs = shape.group_queries(q, queries.clone(), kv);
                let visible = first_seen + queries.end - 1;
                let block = CausalBlock {
                    queries: &qs,
                    keys: &seen[..visible * d],
                    head_dim: d,
                    group,
                    first_seen: first_seen + queries.start,
                    bias: None,
                    window: None,
                };
                probabilities.resize(queries.len() * group * visible, 0.0);
                causal_softmax(block, probabilities);
                let mut best = vec![0.0f32; context.len()];
                for row in probabilities.chunks_exact(visible) {
                    for (b, &p) in best.iter_mut().zip(&row[in_context.clone()]) {
                        *b = b.max(p);
                    }
                }
                best
            })
            .reduce(
                || vec![0.0f32; context.len()],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(x, &y)| *x = x.max(y));
                    a
                },
            );
        let scores = &mut head.reconstruction_attention_mut()[context.clone()];
        scores.iter_mut().zip(&best).for_each(|(s, &b)| *s = s.max(b));
    });
}

#[cfg(test)]
mod tests {
    use kvmerger_compress::{Budget, CompressionConfig, KvDtype, Reconstruction, StatsRequest};

    use crate::model::Llama;
    use crate::prefill::{PrefillCompression, PrefillOptions};
    use crate::sequence::Prefilled;
    use crate::session::Session;
    use crate::testing::{
        random_llama, random_reconstruction_prompt, reference_forward, tiny_config,
    };

    const SINKS: usize = 4;

    /// KVzip's scores computed naively: for each chunk, the whole sequence (prompt, then
    /// the chunk's reconstruction) through the reference forward pass, then in f64 each
    /// reconstruction query's softmax over the sinks, the chunk and its own keys so far;
    /// the maximum over queries and the query heads of a group. `[layer][kv_head][entry]`.
    fn naive_scores(model: &Llama, tokens: &[u32], chunk: usize) -> Vec<Vec<Vec<f64>>> {
        let c = &model.config;
        let (n, d, group) = (tokens.len(), c.head_dim, c.n_heads / c.n_kv_heads);
        let rope = crate::rope::Rope::new(c);
        let prompt = random_reconstruction_prompt();
        let mut best = vec![vec![vec![0.0f64; n]; c.n_kv_heads]; c.n_layers];
        for start in (0..n).step_by(chunk) {
            let context = start..(start + chunk).min(n);
            let sequence = [tokens, &prompt.tokens_for(tokens, context.clone())].concat();
            let reference = reference_forward(model, &sequence, |_, _, _, _| true).unwrap();
            for (l, layer_best) in best.iter_mut().enumerate() {
                for i in n..sequence.len() {
                    let mut q = reference.queries[l][i].clone();
                    rope.apply(&mut q, i);
                    let keys: Vec<usize> =
                        (0..SINKS.min(start)).chain(context.clone()).chain(n..=i).collect();
                    for qh in 0..c.n_heads {
                        let kv = qh / group;
                        let logits: Vec<f64> = keys
                            .iter()
                            .map(|&j| {
                                let k = &reference.keys[l][j][kv * d..(kv + 1) * d];
                                let q = &q[qh * d..(qh + 1) * d];
                                q.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>()
                                    / (d as f64).sqrt()
                            })
                            .collect();
                        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        let sum: f64 = logits.iter().map(|x| (x - max).exp()).sum();
                        for (&j, x) in keys.iter().zip(&logits) {
                            if context.contains(&j) {
                                let p = (x - max).exp() / sum;
                                layer_best[kv][j] = layer_best[kv][j].max(p);
                            }
                        }
                    }
                }
            }
        }
        best
    }

    /// The engine's scores are the naive ones, and KVzip keeps the entries the naive
    /// scores rank highest over each layer's heads (entries within rounding of the cut
    /// aside), the sinks always. Each reconstruction chunk runs in several passes (prefill
    /// chunks shorter than it); the second case's passes span several blocks of queries.
    #[test]
    fn scores_and_kept_entries_match_a_naive_reference() {
        let model = random_llama(tiny_config(), 11).unwrap();
        for (n, chunk, prefill_chunk) in [(100u32, 64, 48), (40, 16, 8)] {
            let tokens: Vec<u32> = (0..n).map(|i| (i * 13 + 7) % 64).collect();
            check_against_naive_scores(&model, &tokens, chunk, prefill_chunk);
        }
    }

    fn check_against_naive_scores(model: &Llama, tokens: &[u32], chunk: usize, prefill: usize) {
        let how = Reconstruction { chunk, sinks: SINKS };
        let stats = StatsRequest { reconstruction: Some(how), ..StatsRequest::default() };
        let options = PrefillOptions { chunk: prefill, attention_chunk: 5, ..Default::default() };
        let prefilled = Prefilled::run(model, tokens, stats, options).unwrap();
        let naive = naive_scores(model, tokens, chunk);
        for (l, heads) in prefilled.cache.layers.iter().enumerate() {
            for (h, head) in heads.iter().enumerate() {
                assert_eq!(head.len(), tokens.len(), "the reconstruction's entries are gone");
                let got = head.reconstruction_attention().unwrap();
                for (j, (&a, &b)) in got.iter().zip(&naive[l][h]).enumerate() {
                    assert!(
                        (a as f64 - b).abs() <= 1e-5 + 1e-4 * b,
                        "{chunk}: layer {l} head {h} {j}: {a} vs {b}"
                    );
                }
            }
        }
        assert!(prefilled.scoring > std::time::Duration::ZERO);
        assert!(prefilled.scoring < prefilled.elapsed);

        let config = CompressionConfig::from_cli(
            "kvzip",
            Some(Budget::Ratio(0.3)),
            &[("chunk".into(), chunk.to_string())],
        )
        .unwrap();
        let mut session = Session::new(model, &config).unwrap();
        session.resume(prefilled).unwrap();
        assert!(session.timings.scoring > std::time::Duration::ZERO);
        let budget = Budget::Ratio(0.3).entries(tokens.len());
        for (l, heads) in session.cache().layers.iter().enumerate() {
            // Rank (score, head, entry) over the layer, the sinks first.
            let mut ranked: Vec<(f64, usize, usize)> = (0..heads.len())
                .flat_map(|h| {
                    let scores = &naive[l][h];
                    (0..tokens.len())
                        .map(move |j| (if j < SINKS { f64::INFINITY } else { scores[j] }, h, j))
                })
                .collect();
            ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
            let total = budget * heads.len();
            let cut = ranked[total - 1].0;
            for (rank, &(score, h, j)) in ranked.iter().enumerate() {
                if (score - cut).abs() <= 1e-4 * cut {
                    continue;
                }
                let kept = heads[h].meta().iter().any(|m| m.position == j);
                assert_eq!(kept, rank < total, "layer {l} head {h} entry {j} ({score})");
            }
            assert_eq!(heads.iter().map(|h| h.len()).sum::<usize>(), total, "layer {l}");
        }
    }

    /// In every cache dtype, each layer holds its budget over its heads, the prefill's time
    /// names the reconstruction's share, and an incremental prefill is refused with why.
    #[test]
    fn holds_the_layer_budget_in_every_dtype_and_refuses_incremental_prefill() {
        for dtype in KvDtype::ALL {
            let mut config = tiny_config();
            config.head_dim = if dtype.is_quantized() { 32 } else { config.head_dim };
            let mut model = random_llama(config, 3).unwrap();
            model.kv_dtype = dtype;
            let tokens: Vec<u32> = (0..50u32).map(|i| (i * 5 + 1) % 64).collect();
            for heads in ["shared", "uniform"] {
                let params = [("heads".into(), heads.into()), ("chunk".into(), "20".into())];
                let config =
                    CompressionConfig::from_cli("kvzip", Some(Budget::Ratio(0.4)), &params)
                        .unwrap();
                let mut session = Session::new(&model, &config)
                    .unwrap()
                    .with_options(PrefillOptions { chunk: 16, ..Default::default() });
                session.prefill(&tokens).unwrap();
                let scoring = session.timings.scoring;
                assert!(scoring > std::time::Duration::ZERO && scoring < session.timings.prefill);
                for (l, layer) in session.cache().layers.iter().enumerate() {
                    let held: usize = layer.iter().map(|h| h.len()).sum();
                    assert_eq!(held, 20 * layer.len(), "{heads} in {dtype}: layer {l}");
                    if heads == "uniform" {
                        assert!(layer.iter().all(|h| h.len() == 20), "{dtype}");
                    }
                }
            }
            let config = CompressionConfig::from_cli("kvzip", Some(Budget::Ratio(0.4)), &[]);
            let incremental = PrefillOptions {
                compression: PrefillCompression::Incremental,
                ..Default::default()
            };
            let mut session =
                Session::new(&model, &config.unwrap()).unwrap().with_options(incremental);
            let err = session.prefill(&tokens).unwrap_err().to_string();
            assert!(err.contains("whole prompt") && err.contains("once"), "{err}");
        }
    }

    /// A model loaded without its tokenizer has no instructions: a clear error.
    #[test]
    fn a_model_without_instructions_is_refused() {
        let mut model = random_llama(tiny_config(), 3).unwrap();
        model.reconstruction = None;
        let config = CompressionConfig::from_cli("kvzip", Some(Budget::Ratio(0.4)), &[]).unwrap();
        let mut session = Session::new(&model, &config).unwrap();
        let err = session.prefill(&[1, 2, 3, 4, 5, 6]).unwrap_err().to_string();
        assert!(err.contains("tokenizer"), "{err}");
    }
}
