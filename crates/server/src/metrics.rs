//! `GET /metrics`: the runtime's counters and gauges in Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use kvmerger_engine::RuntimeMetrics;

/// Renders every metric with its HELP and TYPE lines.
pub fn render(m: &RuntimeMetrics) -> String {
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let gauge = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::Relaxed);
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    metric(
        "kvmerger_requests_total",
        "counter",
        "Requests by outcome.",
        &[
            ("{outcome=\"completed\"}", load(&m.requests_completed) as f64),
            ("{outcome=\"cancelled\"}", load(&m.requests_cancelled) as f64),
            ("{outcome=\"failed\"}", load(&m.requests_failed) as f64),
            ("{outcome=\"invalid\"}", load(&m.requests_invalid) as f64),
            ("{outcome=\"refused_queue_full\"}", load(&m.requests_refused_queue_full) as f64),
            ("{outcome=\"refused_too_large\"}", load(&m.requests_refused_too_large) as f64),
        ],
    );
    metric(
        "kvmerger_prompt_tokens_total",
        "counter",
        "Prompt tokens of finished requests.",
        &[("", load(&m.prompt_tokens) as f64)],
    );
    metric(
        "kvmerger_generated_tokens_total",
        "counter",
        "Tokens generated.",
        &[("", load(&m.generated_tokens) as f64)],
    );
    metric(
        "kvmerger_active_sessions",
        "gauge",
        "Sessions admitted (prefilling or decoding).",
        &[("", gauge(&m.active_sessions) as f64)],
    );
    metric(
        "kvmerger_active_sessions_peak",
        "gauge",
        "Most sessions admitted at once since start.",
        &[("", gauge(&m.active_sessions_peak) as f64)],
    );
    metric(
        "kvmerger_queued_sessions",
        "gauge",
        "Requests waiting for KV pool memory.",
        &[("", gauge(&m.queued_sessions) as f64)],
    );
    metric(
        "kvmerger_kv_pool_used_bytes",
        "gauge",
        "KV pool bytes reserved by admitted sessions.",
        &[("", gauge(&m.kv_pool_bytes_used) as f64)],
    );
    metric(
        "kvmerger_kv_pool_peak_bytes",
        "gauge",
        "Most KV pool bytes reserved at once since start.",
        &[("", gauge(&m.kv_pool_bytes_peak) as f64)],
    );
    metric(
        "kvmerger_kv_pool_limit_bytes",
        "gauge",
        "KV pool size (--kv-pool-mb).",
        &[("", gauge(&m.kv_pool_bytes_limit) as f64)],
    );
    metric(
        "kvmerger_kv_resident_bytes",
        "gauge",
        "Bytes the sessions' caches hold now (at most the reservations).",
        &[("", gauge(&m.kv_resident_bytes) as f64)],
    );
    metric(
        "kvmerger_kv_compression_ratio",
        "gauge",
        "Cache entries kept over full-cache entries, over every prompt compressed so far.",
        &[("", m.achieved_ratio())],
    );
    out
}
