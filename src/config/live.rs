//! Which keys a running gateway can take from a reloaded config, and which need a restart.
//!
//! A reload swaps everything derived from the config at once (routes, upstream clients,
//! policy, identities, zones, TTLs, data hosts, the audit sink). A few keys are bound to things
//! that exist once per process: listening sockets, the worker runtimes, the cache directory the
//! store indexed, the log subscriber. A reload that changes one of those is refused as a whole
//! (never half-applied), naming each key, so the operator knows a restart or an upgrade is due.

use super::model::{Config, TlsListener};

/// The dotted keys whose values differ between `old` and `new` and cannot change while serving.
/// Empty means `new` can be applied live.
pub fn fixed_keys_changed(old: &Config, new: &Config) -> Vec<String> {
    let mut changed = Vec::new();
    let mut differs = |key: &str, same: bool| {
        if !same {
            changed.push(key.to_owned());
        }
    };
    let (a, b) = (&old.server, &new.server);
    differs("server.listen", a.listen == b.listen);
    differs("server.admin_listen", a.admin_listen == b.admin_listen);
    differs("server.threads", a.threads == b.threads);
    differs("server.log_format", a.log_format == b.log_format);
    differs("cache.dir", old.cache.dir == new.cache.dir);
    differs("cache.l2", old.cache.l2 == new.cache.l2);
    if a.tls.len() != b.tls.len() {
        changed.push("server.tls".to_owned());
    } else {
        for (i, (x, y)) in a.tls.iter().zip(&b.tls).enumerate() {
            if !same_listener(x, y) {
                changed.push(format!("server.tls[{i}]"));
            }
        }
    }
    changed
}

/// Certificate *contents* reload by themselves (SIGHUP and polling); their paths, the
/// address, client-certificate rules and the PROXY protocol are fixed per listener.
fn same_listener(a: &TlsListener, b: &TlsListener) -> bool {
    a.listen == b.listen
        && a.certs == b.certs
        && a.client_ca == b.client_ca
        && a.require_client_cert == b.require_client_cert
        && a.proxy_protocol == b.proxy_protocol
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn load(text: &str) -> Config {
        crate::config::load_str(text, Path::new("/")).expect("valid config")
    }

    const BASE: &str = r#"
[server]
listen = ["127.0.0.1:5000"]
admin_listen = "127.0.0.1:9090"
threads = 2

[cache]
dir = "/var/tmp/pullgate-live-test"
max_size = "1GiB"

[[registry]]
name = "hub"
upstream = "https://registry-1.docker.io"
default = true
"#;

    #[test]
    fn registries_zones_and_cache_limits_change_live() {
        let old = load(BASE);
        let new = load(&format!(
            "{}\n[zones]\nvpc = [\"10.0.0.0/8\"]\n\n[[registry]]\nname = \"ghcr\"\nupstream = \"https://ghcr.io\"\n",
            BASE.replace("1GiB", "2GiB")
        ));
        assert_eq!(fixed_keys_changed(&old, &new), Vec::<String>::new());
    }

    #[test]
    fn listeners_threads_and_the_cache_dir_are_named() {
        let old = load(BASE);
        let new = load(
            &BASE
                .replace("127.0.0.1:5000", "127.0.0.1:5001")
                .replace("threads = 2", "threads = 3")
                .replace("pullgate-live-test", "elsewhere")
                .replace("127.0.0.1:9090", "127.0.0.1:9091"),
        );
        assert_eq!(
            fixed_keys_changed(&old, &new),
            [
                "server.listen",
                "server.admin_listen",
                "server.threads",
                "cache.dir"
            ]
        );
    }
}
