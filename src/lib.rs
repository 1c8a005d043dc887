//! pullgate: a registry pull-through gateway built on Pingora.
//!
//! A request travels top to bottom through the modules below (DESIGN.md, "The way a request
//! travels"): `listen` accepts it, `gateway` (the Pingora edge) parses it with `oci`, routes it
//! with `route`, and answers it from `store` (blobs) or through `upstream`; `config` is loaded
//! at start and again on every reload (`listen::reload`), each time into a new immutable
//! `gateway::Gateway` snapshot. ARCHITECTURE.md walks through all of it.
//!
//! Dependency rule: `oci`, `secret`, `sign` (signed data-endpoint URLs), `crypt` (the sealed
//! file format of the encrypted cache) and `lines` (batched log writing) depend on nothing else
//! in the crate; nor does `cluster` (the owner of each digest); `access_log` (the access line)
//! only on `lines`; `verify` (image signatures) only on `oci`; `config` only on `secret`,
//! `sign` and `verify` (to check key files at load); `route` only on `oci` and the config
//! model; `policy` only on `oci`, the config model and `secret`; `store` only on `oci` and
//! `crypt`; `keys` (the encrypted cache's key hierarchy) on `crypt`, the config model, `store`
//! (its `Keys` seam), `metrics` and `upstream::tls`; `metrics` only reads the store's counters,
//! and any module may record into the `Metrics` handle it is given; `audit` only on the config
//! model; `upstream` on `oci`, `config`, `secret` and `metrics`; `client_config` only on the
//! config model; `warm` (warm jobs, which pull through pullgate's own listener) on `oci`,
//! `route`, the config model, `store`, `metrics` and `policy`'s constant-time compare; only
//! `gateway` and `listen` (and this file) touch Pingora.

pub mod access_log;
pub mod audit;
pub mod client_config;
pub mod cluster;
pub mod config;
pub mod crypt;
pub mod gateway;
pub mod keys;
pub mod lines;
pub mod listen;
pub mod metrics;
pub mod oci;
pub mod policy;
pub mod route;
pub mod secret;
pub mod sign;
pub mod store;
pub mod upstream;
pub mod verify;
pub mod warm;

use std::sync::Arc;

pub use listen::{build_server, RunningGateway};

/// Install the process-wide rustls crypto provider (ring). Call first thing: Pingora, reqwest and
/// the certificate verifiers all use the process default.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Keeps the log writer thread alive; dropping it writes the lines still waiting.
pub struct LogGuard(#[allow(dead_code)] Option<lines::FlushOnDrop>);

/// Set up tracing for the configured format. `RUST_LOG` overrides the default level (`info`).
/// Safe to call more than once (later calls do nothing). Lines go to stderr from a thread of
/// their own in batches (`lines.rs`: at most 20 ms late, never dropped; past the bound
/// requests wait for the disk or the journal, as they did when they wrote themselves). Keep
/// the guard until the process ends: dropping it writes what is waiting. A crash or SIGKILL
/// loses the lines of the last 20 ms.
pub fn init_logging(format: config::LogFormat) -> LogGuard {
    use tracing_subscriber::fmt::writer::BoxMakeWriter;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal; a log file or journald gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (lines, guard) = match lines::spawn("pullgate-log", std::io::stderr()) {
        Ok((writer, guard)) => (Some(writer), Some(guard)),
        // No thread to spare: every line is written by the request that logs it.
        Err(_) => (None, None),
    };
    let writer = match lines.clone() {
        Some(writer) => BoxMakeWriter::new(move || writer.clone()),
        None => BoxMakeWriter::new(std::io::stderr),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    let json = format == config::LogFormat::Json;
    let installed = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
    if let (Ok(()), Some(lines)) = (installed, lines) {
        // Access lines skip tracing's formatter but land in the same buffer (`access_log`).
        access_log::install(lines, json);
    }
    LogGuard(guard)
}

/// Log the config's warnings once, each naming its key.
pub fn log_warnings(config: &Arc<config::Config>) {
    for w in &config.warnings {
        tracing::warn!(key = %w.key, "{}", w.message);
    }
}
