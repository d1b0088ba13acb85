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

/// The engine name of llama.cpp's rows.
const LLAMA_CPP: &str = "llama.cpp";

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
                engine: LLAMA_CPP.into(),
                kv_dtype: dtype.storage(),
                tokens: m.tokens,
                kv_mb: None,
                decode_ms_per_token: m.decode_s * 1e3,
            });
        }
    }
    Ok(rows)
}

/// Decode speed per engine and dtype, as speed ratios (above 1: faster): against the same
/// engine's f16 cache, and ours against llama.cpp's cache of the same block type (its
/// q4_0 stands for our rotated and centered forms too) at the same length.
pub fn table(rows: &[DtypeRow]) -> String {
    let mut out = String::from(
        "| engine | KV dtype | tokens | KV MB | decode ms/token | decode tok/s | vs its f16 | vs \
         llama.cpp |\n|---|---|---:|---:|---:|---:|---:|---:|\n",
    );
    let speedup = |of: &DtypeRow, over: Option<&DtypeRow>| {
        over.map_or("-".into(), |x| {
            format!("{:.2}x", x.decode_ms_per_token / of.decode_ms_per_token)
        })
    };
    for r in rows {
        let f16 = rows
            .iter()
            .find(|x| x.engine == r.engine && x.tokens == r.tokens && x.kv_dtype == KvDtype::F16);
        let llama_cpp = rows.iter().find(|x| {
            r.engine != LLAMA_CPP
                && x.engine == LLAMA_CPP
                && x.tokens == r.tokens
                && x.kv_dtype == r.kv_dtype.storage()
        });
        let kv_mb = r.kv_mb.map_or("-".into(), |m| format!("{m:.1}"));
        out += &format!(
            "| {} | {} | {} | {kv_mb} | {:.1} | {:.1} | {} | {} |\n",
            r.engine,
            r.kv_dtype,
            r.tokens,
            r.decode_ms_per_token,
            1e3 / r.decode_ms_per_token,
            speedup(r, f16),
            speedup(r, llama_cpp),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(engine: &str, kv_dtype: KvDtype, tokens: usize, ms: f64) -> DtypeRow {
        DtypeRow { engine: engine.into(), kv_dtype, tokens, kv_mb: None, decode_ms_per_token: ms }
    }

    #[test]
    fn ratios_are_against_our_f16_and_llama_cpp_s_block_type_at_the_same_length() {
        let rows = [
            row("kvmerger", KvDtype::F16, 4096, 20.0),
            row("kvmerger", KvDtype::Q4_0Rotated, 4096, 25.0),
            row("kvmerger", KvDtype::Q8_0, 8000, 30.0),
            row(LLAMA_CPP, KvDtype::F16, 4096, 40.0),
            row(LLAMA_CPP, KvDtype::Q4_0, 4096, 50.0),
            row(LLAMA_CPP, KvDtype::Q8_0, 4096, 90.0),
        ];
        let table = table(&rows);
        let cells = |line: usize| -> Vec<String> {
            let line = table.lines().nth(line + 2).unwrap();
            line.split('|').map(|c| c.trim().to_string()).filter(|c| !c.is_empty()).collect()
        };
        assert_eq!(cells(0)[6..], ["1.00x", "2.00x"]);
        // q4_0r against our f16 and llama.cpp's q4_0.
        assert_eq!(cells(1)[6..], ["0.80x", "2.00x"]);
        // No f16 and no llama.cpp row at 8,000 tokens.
        assert_eq!(cells(2)[6..], ["-", "-"]);
        assert_eq!(cells(4)[6..], ["0.80x", "-"]);
    }
}
