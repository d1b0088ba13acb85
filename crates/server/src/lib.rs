//! `kvmerger serve`: an OpenAI-compatible HTTP server over the kvmerger engine.
//!
//! HTTP stays here (request and response types, routes, SSE, metrics); the cache, the
//! memory pool and batching stay in the engine, reached through one
//! [`kvmerger_engine::EngineHandle`]. A request may choose its own compression with the
//! `kv_compression` extension field; the response reports what compression achieved in
//! `usage.kv_compression`.

mod error;
mod generation;
mod kv_compression;
mod metrics;
mod routes;
pub mod types;

use std::future::Future;
use std::net::SocketAddr;

pub use error::ApiError;
pub use generation::StopCutter;
pub use metrics::render as render_metrics;
pub use routes::{router, ServerState};
pub use types::{KvCompressionUsage, UsageBody};

/// Serves `state` on `addr` until `shutdown` resolves.
pub async fn serve(
    state: ServerState,
    addr: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    eprintln!("kvmerger serve: listening on http://{}", listener.local_addr()?);
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await
}
