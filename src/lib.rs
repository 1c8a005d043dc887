//! pullgate: a registry pull-through gateway built on Pingora.
//!
//! A request travels top to bottom through the modules below (DESIGN.md, "The way a request
//! travels"): `listen` accepts it, `gateway` (the Pingora edge) parses it with `oci`, routes it
//! with `route`, and answers it from `store` (blobs) or through `upstream`; `config` is loaded
//! at start and again on every reload (`listen::reload`), each time into a new immutable
//! `gateway::Gateway` snapshot. ARCHITECTURE.md walks through all of it.
//!
//! Dependency rule: `oci`, `secret`, `sign` (signed data-endpoint URLs) and `crypt` (the
//! sealed file format of the encrypted cache) depend on nothing else in the crate; `config`
//! only on `secret` and `sign` (to check a key file at load); `route` only on `oci` and the
//! config model; `policy` only on `oci`, the config model and `secret`; `store` only on `oci`
//! and `crypt`; `keys` (the encrypted cache's key hierarchy) on `crypt`, the config model,
//! `store` (its `Keys` seam), `metrics` and `upstream::tls`; `metrics` only reads the store's counters, and any module may record into the `Metrics`
//! handle it is given; `audit` only on the config model; `upstream` on `oci`, `config`,
//! `secret` and `metrics`; `client_config` only on the config model; only `gateway` and
//! `listen` (and this file) touch Pingora.

pub mod audit;
pub mod client_config;
pub mod config;
pub mod crypt;
pub mod gateway;
pub mod keys;
pub mod listen;
pub mod metrics;
pub mod oci;
pub mod policy;
pub mod route;
pub mod secret;
pub mod sign;
pub mod store;
pub mod upstream;

use std::sync::Arc;

pub use listen::{build_server, RunningGateway};

/// Install the process-wide rustls crypto provider (ring). Call first thing: Pingora, reqwest and
/// the certificate verifiers all use the process default.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Keeps the log writer thread alive; dropping it writes the lines still queued.
pub struct LogGuard(#[allow(dead_code)] tracing_appender::non_blocking::WorkerGuard);

/// Set up tracing for the configured format. `RUST_LOG` overrides the default level (`info`).
/// Safe to call more than once (later calls do nothing). Lines go to stderr from a thread of
/// their own, so a request never waits on the terminal or the journal. The queue is bounded
/// and never drops a line: when it is full (the journal cannot keep up) requests wait, as they
/// did when they wrote themselves. Keep the guard until the process ends: dropping it writes
/// what is queued. A crash or SIGKILL loses the lines of the last moments still queued.
pub fn init_logging(format: config::LogFormat) -> LogGuard {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal; a log file or journald gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("pullgate-log")
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    let _ = match format {
        config::LogFormat::Json => builder.json().flatten_event(true).try_init(),
        config::LogFormat::Text => builder.try_init(),
    };
    LogGuard(guard)
}

/// Log the config's warnings once, each naming its key.
pub fn log_warnings(config: &Arc<config::Config>) {
    for w in &config.warnings {
        tracing::warn!(key = %w.key, "{}", w.message);
    }
}
