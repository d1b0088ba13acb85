//! `kvmerger serve`: the OpenAI-compatible server.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use kvmerger_engine::{EngineConfig, EngineHandle, PrefillCompression, RequestLimits};
use kvmerger_models::ChatTemplate;
use kvmerger_server::ServerState;

use crate::args::{ContextArgs, MethodArgs, ModelArgs};

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Compression of requests without a `kv_compression` field.
    #[command(flatten)]
    pub method: MethodArgs,
    /// Longest sequence a request may ask for (prompt plus `max_tokens`).
    #[command(flatten)]
    pub context: ContextArgs,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// KV-cache memory shared by all sessions, in MiB.
    #[arg(long, default_value_t = 1024)]
    pub kv_pool_mb: usize,
    /// Requests waiting for memory at most; more get 429 with Retry-After.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Sessions admitted at once at most.
    #[arg(long, default_value_t = 32)]
    pub max_running: usize,
    /// Prompt tokens per prefill chunk (one chunk runs between two decode steps).
    #[arg(long, default_value_t = 256)]
    pub prefill_chunk: usize,
    /// When compressing requests compress their prompt: `incremental` (during the chunked
    /// prefill, so a request holds at most its budget plus one chunk) or `once` (after the
    /// whole prompt, as evaluations do; the request holds its full prompt cache meanwhile).
    #[arg(long, default_value = "incremental", value_parser = str::parse::<PrefillCompression>)]
    pub prefill_compression: PrefillCompression,
    /// `max_tokens` of chat requests that give none.
    #[arg(long, default_value_t = 256)]
    pub default_max_tokens: usize,
    /// Write the final metrics (Prometheus text, as `/metrics` serves them) to this file
    /// when the server stops (Ctrl-C or SIGTERM: running requests finish first).
    #[arg(long, value_name = "FILE")]
    pub out: Option<std::path::PathBuf>,
}

pub fn run(args: ServeArgs) -> Result<()> {
    if args.kv_pool_mb == 0 || args.max_running == 0 || args.prefill_chunk == 0 {
        bail!("--kv-pool-mb, --max-running and --prefill-chunk must be at least 1");
    }
    let default_compression = args.method.config()?;
    let loaded = args.model.load()?;
    let model_name = loaded
        .path
        .file_stem()
        .map_or_else(|| "model".to_string(), |s| s.to_string_lossy().to_string());
    let chat = ChatTemplate::for_tokenizer(&loaded.tokenizer).map_err(|e| e.to_string());
    if let Err(why) = &chat {
        eprintln!("warning: chat completions are unavailable: {why}");
    }
    let context_length = args.context.limit(loaded.model.config.context_length)?;
    let limits = RequestLimits::of(&loaded.model.config, Some(context_length));
    let config = EngineConfig {
        kv_pool_bytes: args.kv_pool_mb << 20,
        max_queue: args.max_queue,
        max_running: args.max_running,
        prefill_chunk: args.prefill_chunk,
        prefill_compression: args.prefill_compression,
        ..EngineConfig::default()
    };
    eprintln!(
        "kvmerger serve: model {model_name}, default compression {}, KV pool {} MiB, at most {} \
         sessions at once",
        default_compression.label(),
        args.kv_pool_mb,
        args.max_running
    );
    let engine = EngineHandle::spawn(Arc::new(loaded.model), config)?;
    let metrics = engine.metrics();
    let state = ServerState {
        engine,
        tokenizer: Arc::new(loaded.tokenizer),
        chat,
        model_name,
        default_compression,
        default_max_tokens: args.default_max_tokens,
        limits,
    };
    let addr = SocketAddr::new(args.host, args.port);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        kvmerger_server::serve(state, addr, stop_signal())
            .await
            .with_context(|| format!("serving on {addr}"))
    })?;
    if let Some(path) = &args.out {
        std::fs::write(path, kvmerger_server::render_metrics(&metrics))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM (what systemd, Docker and Kubernetes send): the server then
/// stops accepting connections, lets running requests finish, and `--out` is written.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    eprintln!("kvmerger serve: stopping; running requests finish first");
}
