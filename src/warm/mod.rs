//! Warm jobs: fetch images into the cache before anyone pulls them, and pin what must never be
//! evicted (`[[warm]]`, `POST /warm`, `pullgate warm`).
//!
//! Owns: the planning of a job (`plan`: image names routed as clients route them, platform
//! selection, the blobs a manifest needs), the engine that runs jobs and refresh loops
//! (`engine`), the per-process secret that marks a warm request ([`WarmKey`]), the bandwidth
//! cap shared with the fills warm requests start (`pace`), and the pins
//! warm entries hold. A warm job pulls THROUGH pullgate's own plain listener over loopback, with
//! the clients' Accept lists, so its cache keys, single-flight fills, negotiation variants and
//! per-account views are exactly those of the clients that pull afterwards.
//! Must never: fetch from an upstream itself (only through the listener), send the secret
//! anywhere but to its own listener, or unpin a digest another entry still holds.

pub mod engine;
pub mod pace;
pub mod plan;

pub use engine::{JobView, Warmer};
pub use pace::Pace;

/// The header that carries the secret of a warm request; the edge checks and drops it.
pub const KEY_HEADER: &str = "x-pullgate-warm";
/// The header naming the scoped credentials (`account`) a warm request fills for.
pub const ACCOUNT_HEADER: &str = "x-pullgate-warm-account";

/// A random secret made once per process: a request carrying it came from this process's own
/// warm engine. Never logged, never sent upstream.
#[derive(Clone)]
pub struct WarmKey([u8; 32]);

impl WarmKey {
    pub fn generate() -> WarmKey {
        let mut bytes = [0u8; 32];
        getrandom::getrandom(&mut bytes).expect("the OS random source works");
        WarmKey(bytes)
    }

    /// The header value the engine sends.
    pub fn header_value(&self) -> String {
        hex::encode(self.0)
    }

    /// Whether `value` is this key, compared in constant time.
    pub fn verify(&self, value: &[u8]) -> bool {
        let mut decoded = [0u8; 32];
        if value.len() != 64 || hex::decode_to_slice(value, &mut decoded).is_err() {
            return false;
        }
        crate::policy::identity::ct_eq(&self.0, &decoded)
    }
}

impl std::fmt::Debug for WarmKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WarmKey(<redacted>)")
    }
}

/// The problems `pullgate check` (and every reload) reports for `[[warm]]`, one line each,
/// naming the key.
pub fn check_config(config: &crate::config::Config) -> Vec<String> {
    let mut lines = Vec::new();
    if let Err(problems) = plan::resolve_config(config) {
        lines.extend(problems.into_iter().map(|(k, m)| format!("{k}: {m}")));
    }
    if !config.warm.is_empty() && config.server.listen.is_empty() {
        lines.push(
            "warm: warm jobs pull through a plain HTTP listener over loopback: add one to server.listen"
                .to_owned(),
        );
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_verifies_only_itself_and_never_prints() {
        let key = WarmKey::generate();
        assert!(key.verify(key.header_value().as_bytes()));
        assert!(!WarmKey::generate().verify(key.header_value().as_bytes()));
        assert!(!key.verify(b""));
        assert!(!key.verify(&key.header_value().as_bytes()[1..]));
        assert_eq!(format!("{key:?}"), "WarmKey(<redacted>)");
    }
}
