//! `kvmerger bench --kv-dtypes`: decode over a full cache stored in each KV dtype, ours and
//! llama.cpp's (its `type_k`/`type_v`, flash attention on, which a quantized V cache needs)
//! in the same run, on the same file and token ids.

use std::path::Path;

use anyhow::Result;
use kvmerger_compress::{CompressionConfig, KvDtype};
use kvmerger_engine::{PrefillOptions, Session, WeightFormats};
use serde::Serialize;

use super::{llama_cpp, timed_decode, timed_prefill};
use crate::args::ModelSource;

#[derive(Debug, Serialize)]
pub struct DtypeRow {
    engine: String,
    kv_dtype: KvDtype,
    tokens: usize,
    /// Resident keys, values and per-entry records after the prefill (ours only).
    kv_mb: Option<f64>,
    decode_ms_per_token: f64,
}

/// ggml's type id for a cache stored as `dtype` (llama.cpp picks its own rotation).
fn ggml_type(dtype: KvDtype) -> Option<u32> {
    match dtype.storage() {
        KvDtype::F16 => Some(1),
        KvDtype::Q8_0 => Some(8),
        KvDtype::Q4_0 => Some(2),
        _ => None,
    }
}

/// Every dtype at every length, ours, then llama.cpp's for the dtypes it stores.
#[allow(clippy::too_many_arguments)]
pub fn measure(
    source: &ModelSource,
    path: &Path,
    formats: WeightFormats,
    dtypes: &[KvDtype],
    lengths: &[usize],
    steps: usize,
    tokens: &[u32],
    python: Option<&str>,
) -> Result<Vec<DtypeRow>> {
    let mut rows = Vec::new();
    let mut loaded = source.load(path, formats)?;
    super::warm_up(&loaded.model, tokens, PrefillOptions::default())?;
    for &dtype in dtypes {
        dtype.check_head_dim(loaded.model.config.head_dim)?;
        loaded.model.kv_dtype = dtype;
        for &n in lengths {
            let mut session = Session::new(&loaded.model, &CompressionConfig::Full)?;
            let (logits, _) = timed_prefill(&mut session, &tokens[..n])?;
            let kv_mb = session.cache().resident_bytes() as f64 / 1e6;
            let decode = timed_decode(&mut session, logits, steps)?;
            rows.push(DtypeRow {
                engine: "kvmerger".into(),
                kv_dtype: dtype,
                tokens: n,
                kv_mb: Some(kv_mb),
                decode_ms_per_token: decode * 1e3,
            });
            println!("{}", table(&rows));
        }
    }
    let Some(python) = python else { return Ok(rows) };
    let mut seen = Vec::new();
    for &dtype in dtypes {
        let Some(ggml) = ggml_type(dtype).filter(|t| !seen.contains(t)) else { continue };
        seen.push(ggml);
        let threads = rayon::current_num_threads();
        let cache = llama_cpp::CacheType { ggml_type: ggml };
        let measured =
            llama_cpp::measure(python, path, threads, lengths, steps, tokens, Some(cache))?;
        for m in measured.into_iter().flatten() {
            rows.push(DtypeRow {
                engine: "llama.cpp".into(),
                kv_dtype: dtype.storage(),
                tokens: m.tokens,
                kv_mb: None,
                decode_ms_per_token: m.decode_s * 1e3,
            });
        }
    }
    Ok(rows)
}

/// Decode speed per engine and dtype; the ratio is against the same engine's f16 cache.
pub fn table(rows: &[DtypeRow]) -> String {
    let mut out = String::from(
        "| engine | KV dtype | tokens | KV MB | decode ms/token | decode tok/s | vs its f16 |\n\
         |---|---|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let f16 = rows
            .iter()
            .find(|x| x.engine == r.engine && x.tokens == r.tokens && x.kv_dtype == KvDtype::F16);
        let ratio = f16.map_or("-".into(), |x| {
            format!("{:.2}x", x.decode_ms_per_token / r.decode_ms_per_token)
        });
        let kv_mb = r.kv_mb.map_or("-".into(), |m| format!("{m:.1}"));
        out += &format!(
            "| {} | {} | {} | {kv_mb} | {:.1} | {:.1} | {ratio} |\n",
            r.engine,
            r.kv_dtype,
            r.tokens,
            r.decode_ms_per_token,
            1e3 / r.decode_ms_per_token,
        );
    }
    out
}
