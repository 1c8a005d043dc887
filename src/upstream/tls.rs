//! TLS trust for upstream connections: the platform's roots plus the registry's own `ca`.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::RootCertStore;

/// The platform trust store, loaded once per process.
fn platform_roots() -> &'static RootCertStore {
    static ROOTS: OnceLock<RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let mut roots = RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        for cert in found.certs {
            // A platform certificate rustls cannot use is skipped, as browsers do.
            let _ = roots.add(cert);
        }
        if roots.is_empty() {
            tracing::warn!("no platform CA certificates found; only registries with `ca` can be reached over TLS");
        }
        roots
    })
}

/// A rustls client config (ring provider, TLS 1.2/1.3, ALPN http/1.1) trusting the platform
/// roots and, if given, every certificate in the PEM file `ca`.
pub fn client_config(ca: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let mut roots = platform_roots().clone();
    if let Some(path) = ca {
        let pem =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut added = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert =
                cert.map_err(|e| format!("{}: not a PEM certificate: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("{}: unusable CA certificate: {e}", path.display()))?;
            added += 1;
        }
        if added == 0 {
            return Err(format!("{} holds no PEM certificate", path.display()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // HTTP/1.1 only: every blob fill gets a connection of its own instead of sharing one h2
    // connection's flow-control window (a cold 500 MiB pull from distribution over h2 took
    // 1.2 s, over HTTP/1.1 0.75 s; bench/ W4).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
