//! Warnings about a config that is valid: run on the finished model, after every error check
//! passed, so a rule sees the whole config at once.
//!
//! Audit rules flag what is probably not what the operator wants. Each finding names its rule
//! in brackets so it can be looked up (and, later, silenced) by name. `not_yet_enforced` lists
//! keys accepted ahead of their feature, so an operator is not misled.

use std::net::SocketAddr;

use crate::config::model::*;

pub(super) fn audit_rules(config: &Config) -> Vec<Warning> {
    let mut out = Vec::new();
    let mut warn = |key: String, rule: &str, message: String| {
        out.push(Warning {
            key,
            message: format!("[{rule}] {message}"),
        })
    };
    let server = &config.server;
    let exposed: Vec<SocketAddr> = server
        .listen
        .iter()
        .copied()
        .filter(|a| !a.ip().is_loopback())
        .collect();
    let tls_exposed = server.tls.iter().any(|t| !t.listen.ip().is_loopback());
    for reg in &config.registries {
        if reg.credentials.is_some()
            && reg.network_access == NetworkAccess::Enabled
            && (!exposed.is_empty() || tls_exposed)
        {
            warn(
                format!("registry.{}.network_access", reg.name),
                "open-credentials",
                "the injected credentials are usable by any source that reaches a non-loopback \
                 listener; restrict with \"selected\" and zones, or \"disabled\" and identities"
                    .into(),
            );
        }
    }
    let passwords = config
        .identities
        .iter()
        .any(|i| matches!(i.auth, IdentityAuth::Password { .. }));
    if passwords {
        for addr in &exposed {
            warn(
                "server.listen".into(),
                "plaintext-passwords",
                format!(
                    "identities use passwords and {addr} is plain HTTP on a non-loopback address: \
                     passwords cross the network in clear; use a [[server.tls]] listener"
                ),
            );
        }
    }
    if let Some(admin) = server.admin_listen.filter(|a| !a.ip().is_loopback()) {
        warn(
            "server.admin_listen".into(),
            "admin-exposed",
            format!(
                "the admin listener {admin} is not on loopback: metrics reveal traffic patterns"
            ),
        );
    }
    for reg in &config.registries {
        for policy in &reg.signatures {
            if let Some(why) = signature_policy_unreachable(reg, policy) {
                warn(policy.key.clone(), "signatures-never-match", why);
            }
        }
    }
    if let Some(enc) = &config.cache.encryption {
        encryption_rules(enc, server.admin_listen, &mut warn);
    }
    if let Some(endpoint) = config.cache.l2.as_ref().and_then(|l2| l2.endpoint.as_ref()) {
        let loopback = match endpoint.host() {
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            Some(url::Host::Domain(name)) => name == "localhost",
            None => false,
        };
        if endpoint.scheme() == "http" && !loopback {
            warn(
                "cache.l2.endpoint".into(),
                "l2-plain-http",
                format!(
                    "{endpoint} is plain HTTP: every cached blob crosses the network \
                     unencrypted and unauthenticated (the requests are signed, the answers \
                     are not); use https"
                ),
            );
        }
    }
    for zone in &config.zones {
        if zone.nets.iter().any(|n| n.prefix_len() == 0) {
            warn(
                format!("zones.{}", zone.name),
                "zone-everything",
                "the zone contains 0.0.0.0/0 or ::/0: every source is in it".into(),
            );
        }
    }
    out
}

/// Why a signature policy can cover no repository of its registry, as far as the globs tell
/// statically: every glob is outside the registry's `repositories`, denied by a
/// `deny_repositories` glob covering it whole, or shadowed by an earlier policy that covers
/// everything. Two globs can only overlap when one's literal start (before any `*`) begins
/// the other's.
fn signature_policy_unreachable(reg: &Registry, policy: &SignaturePolicy) -> Option<String> {
    let all = ["**".to_owned()];
    let globs: &[String] = if policy.repositories.is_empty() {
        &all
    } else {
        &policy.repositories
    };
    let name = &reg.name;
    if let Some(earlier) = reg
        .signatures
        .iter()
        .take_while(|p| p.key != policy.key)
        .find(|p| p.repositories.is_empty() || p.repositories.iter().any(|g| g == "**"))
    {
        return Some(format!(
            "never used: {} before it covers every repository",
            earlier.key
        ));
    }
    let literal = |g: &str| g.split('*').next().unwrap_or("").to_owned();
    let overlap = |a: &str, b: &str| {
        let (a, b) = (literal(a), literal(b));
        a.starts_with(&b) || b.starts_with(&a)
    };
    let allowed =
        |g: &str| reg.repositories.is_empty() || reg.repositories.iter().any(|r| overlap(g, r));
    let denied = |g: &str| {
        reg.deny_repositories.iter().any(|d| {
            d == "**"
                || d.strip_suffix("/**")
                    .is_some_and(|root| g == root || g.starts_with(&format!("{root}/")))
        })
    };
    if globs.iter().all(|g| !allowed(g)) {
        return Some(format!(
            "its repositories never match: every glob is outside registry.{name}.repositories"
        ));
    }
    if globs.iter().all(|g| denied(g)) {
        return Some(format!(
            "its repositories never match: registry.{name}.deny_repositories denies them all"
        ));
    }
    None
}

/// `[cache.encryption]`: secrets other users can read, key control reachable from the network,
/// a grace longer than the revocation it delays.
fn encryption_rules(
    enc: &Encryption,
    admin: Option<SocketAddr>,
    warn: &mut impl FnMut(String, &str, String),
) {
    use std::os::unix::fs::PermissionsExt;
    let secrets: Vec<(&str, &std::path::Path)> = match &enc.provider {
        KeyProvider::File { key_file } => vec![("key_file", key_file.as_path())],
        KeyProvider::Transit { token_file, .. } => vec![("token_file", token_file.as_path())],
        KeyProvider::Exec { .. } => Vec::new(),
    };
    for (key, path) in secrets {
        // Follows symlinks (a Secret volume's file is one): the mode of what is read counts.
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.permissions().mode();
            if mode & 0o004 != 0 {
                warn(
                    format!("cache.encryption.{key}"),
                    "key-world-readable",
                    format!(
                        "{} is readable by every user (mode {:o}): anyone on the host can \
                         decrypt the cache; chmod 600 (or defaultMode 0400 on a Secret volume)",
                        path.display(),
                        mode & 0o777
                    ),
                );
            }
        }
    }
    if let KeyProvider::Exec { command } = &enc.provider {
        let program = std::path::Path::new(&command[0]);
        let runnable = std::fs::metadata(program)
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
        if program.is_absolute() && !runnable {
            warn(
                "cache.encryption.command".into(),
                "kms-helper-missing",
                format!(
                    "{} is not an executable file: nothing will be cached until it is",
                    program.display()
                ),
            );
        }
    }
    if let Some(admin) = admin.filter(|a| !a.ip().is_loopback()) {
        warn(
            "server.admin_listen".into(),
            "keys-admin-exposed",
            format!(
                "the cache is encrypted and the admin listener {admin} is not on loopback: \
                 anyone reaching it can rotate keys (POST /-/keys/rotate) and read key status"
            ),
        );
    }
    if enc.unavailable_grace > std::time::Duration::from_secs(24 * 3600) {
        warn(
            "cache.encryption.unavailable_grace".into(),
            "long-grace",
            "keys keep working for more than a day after the key service stops answering, \
             which also delays a revocation the service could not report"
                .into(),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Not built yet. Remove each entry when its feature lands.

/// NOT YET ENFORCED: keys the config accepts whose behaviour is not built yet, so that an
/// operator is not misled into thinking a restriction holds. Warns only when a key is set to a
/// non-default value. Add a line here for a key accepted ahead of its feature; delete it when
/// the feature lands. Empty today: every accepted key is acted on.
pub(super) fn not_yet_enforced(_config: &Config) -> Vec<Warning> {
    Vec::new()
}
