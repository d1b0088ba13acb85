//! Decode over a compressed cache against the full cache, same model, same prompt, same
//! run: what a budget buys at decode time, and what compressing the prompt costs.

use anyhow::Result;
use kvmerger_compress::CompressionConfig;
use kvmerger_engine::{Llama, PrefillOptions, Session};
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct CompressedRow {
    pub method: String,
    pub tokens: usize,
    /// Prefill, compression included.
    pub prefill_s: f64,
    pub compress_ms: f64,
    /// Entries kept over entries the prompt made, all heads.
    pub kept_ratio: f64,
    /// Keys and values resident after compression.
    pub kv_mb: f64,
    pub decode_ms_per_token: f64,
}

/// Prefills `tokens` under each configuration, then times `steps` greedy decode steps,
/// every compressed configuration holding at most `max_kv` entries per head while decoding.
pub fn measure(
    model: &Llama,
    tokens: &[u32],
    configs: &[CompressionConfig],
    steps: usize,
    prefill: PrefillOptions,
    max_kv: Option<usize>,
) -> Result<Vec<CompressedRow>> {
    super::warm_up(model, tokens, prefill)?;
    configs
        .iter()
        .map(|config| {
            let bound = max_kv.filter(|_| *config != CompressionConfig::Full);
            let mut session = Session::new(model, config)?.with_options(prefill).with_max_kv(bound);
            let (logits, prefill_s) = super::timed_prefill(&mut session, tokens)?;
            let (compress_ms, kept_ratio) = match session.report() {
                Some(r) => (r.compress_ms, r.achieved_ratio()),
                None => (0.0, 1.0),
            };
            let kv_mb = session.cache().resident_bytes() as f64 / 1e6;
            let decode_s = super::timed_decode(&mut session, logits, steps)?;
            Ok(CompressedRow {
                method: config.label(),
                tokens: tokens.len(),
                prefill_s,
                compress_ms,
                kept_ratio,
                kv_mb,
                decode_ms_per_token: decode_s * 1e3,
            })
        })
        .collect()
}

/// Markdown table; decode speed-up and compression share are against the full-cache row of
/// the same length.
pub fn table(rows: &[CompressedRow]) -> String {
    let mut out = String::from(
        "| method | tokens | kept | KV MB | prefill s | compress ms | compress / prefill | \
         compress µs/token | decode ms/token | decode speed vs full |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let full = rows.iter().find(|x| x.tokens == r.tokens && x.method == "full");
        let speed = full.map_or("-".into(), |f| {
            format!("{:.2}x", f.decode_ms_per_token / r.decode_ms_per_token)
        });
        out += &format!(
            "| {} | {} | {:.1}% | {:.1} | {:.2} | {:.1} | {:.2}% | {:.2} | {:.1} | {speed} |\n",
            r.method,
            r.tokens,
            r.kept_ratio * 100.0,
            r.kv_mb,
            r.prefill_s,
            r.compress_ms,
            r.compress_ms / (r.prefill_s * 1e3) * 100.0,
            r.compress_ms * 1e3 / r.tokens as f64,
            r.decode_ms_per_token,
        );
    }
    out
}
