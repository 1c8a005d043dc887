//! `[server]`: listeners (plain, TLS, admin), threads, logging and the redirect signing key.
//! Owns that no address is bound twice and that TLS and PROXY-protocol options come with what
//! they need (a client CA, trusted proxies). `trusted_proxies` is a CIDR list like a zone's,
//! checked by `policy.rs`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::policy::check_nets;
use super::values::parse_socket_addr;
use super::{check_duration, Ctx};
use crate::config::file::{CertFile, ServerFile, TlsFile};
use crate::config::model::*;

pub(super) const DEFAULT_LISTEN: &str = "127.0.0.1:5000";
pub(super) const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
const DEFAULT_THREADS: i64 = 2;
const MAX_THREADS: i64 = 256;
const DEFAULT_REDIRECT_TTL: Duration = Duration::from_secs(5 * 60);
const MIN_REDIRECT_TTL: Duration = Duration::from_secs(1);
const MAX_REDIRECT_TTL: Duration = Duration::from_secs(24 * 60 * 60);

pub(super) fn check_server(ctx: &mut Ctx<'_>, file: &ServerFile) -> Server {
    let default_listen = vec![DEFAULT_LISTEN.to_owned()];
    let listen_raw = file.listen.as_ref().unwrap_or(&default_listen);
    let listen: Vec<SocketAddr> = listen_raw
        .iter()
        .enumerate()
        .filter_map(|(i, raw)| ctx.ok(&format!("server.listen[{i}]"), parse_socket_addr(raw)))
        .collect();
    let admin_listen = match file.admin_listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN) {
        "" => None,
        raw => ctx.ok("server.admin_listen", parse_socket_addr(raw)),
    };
    let threads = check_threads(ctx, file.threads);
    let trusted_proxies = check_nets(ctx, "server.trusted_proxies", &file.trusted_proxies);
    let log_format = check_log_format(ctx, file.log_format.as_deref());
    let audit_log = check_audit_log(ctx, file.audit_log.as_deref());
    let tls: Vec<TlsListener> = file
        .tls
        .iter()
        .enumerate()
        .filter_map(|(i, tls)| check_tls(ctx, &format!("server.tls[{i}]"), tls))
        .collect();
    if listen_raw.is_empty() && file.tls.is_empty() {
        ctx.err(
            "server.listen",
            "no listener: set server.listen or add a [[server.tls]] listener",
        );
    }
    check_unique_listeners(ctx, &listen, admin_listen, &tls);
    if trusted_proxies.is_empty() && file.trusted_proxies.is_empty() {
        for (i, _) in file
            .tls
            .iter()
            .enumerate()
            .filter(|(_, t)| t.proxy_protocol)
        {
            ctx.err(
                format!("server.tls[{i}].proxy_protocol"),
                "needs server.trusted_proxies: a PROXY header is believed only from those \
                 peers, so without them every connection would be closed",
            );
        }
    }
    let redirect_key_file = file
        .redirect_key_file
        .as_deref()
        .and_then(|raw| check_redirect_key(ctx, raw));
    let redirect_ttl = check_redirect_ttl(ctx, file.redirect_ttl.as_deref());
    Server {
        listen,
        admin_listen,
        threads,
        trusted_proxies,
        log_format,
        audit_log,
        tls,
        redirect_key_file,
        redirect_ttl,
    }
}

/// The key file must exist and hold a usable key now, so `check` finds a bad one. Its
/// contents never reach an error message.
fn check_redirect_key(ctx: &mut Ctx<'_>, raw: &str) -> Option<PathBuf> {
    let key = "server.redirect_key_file";
    let path = ctx.existing_file(key, raw)?;
    let loaded = crate::sign::RedirectKey::load(&path).map(|_| path);
    ctx.ok(key, loaded)
}

fn check_redirect_ttl(ctx: &mut Ctx<'_>, raw: Option<&str>) -> Duration {
    let key = "server.redirect_ttl";
    let Some(ttl) = check_duration(ctx, key, raw) else {
        return DEFAULT_REDIRECT_TTL;
    };
    if !(MIN_REDIRECT_TTL..=MAX_REDIRECT_TTL).contains(&ttl) {
        ctx.err(
            key,
            format!(
                "must be between 1s and 24h, got {}",
                humantime::format_duration(ttl)
            ),
        );
        return DEFAULT_REDIRECT_TTL;
    }
    ttl
}

fn check_threads(ctx: &mut Ctx<'_>, threads: Option<i64>) -> usize {
    let threads = threads.unwrap_or(DEFAULT_THREADS);
    if !(1..=MAX_THREADS).contains(&threads) {
        ctx.err(
            "server.threads",
            format!("must be between 1 and {MAX_THREADS}, got {threads}"),
        );
        return 1;
    }
    usize::try_from(threads).unwrap_or(1)
}

fn check_log_format(ctx: &mut Ctx<'_>, raw: Option<&str>) -> LogFormat {
    match raw.unwrap_or("text") {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            ctx.err(
                "server.log_format",
                format!("must be \"text\" or \"json\", got {other:?}"),
            );
            LogFormat::Text
        }
    }
}

fn check_audit_log(ctx: &mut Ctx<'_>, raw: Option<&str>) -> AuditSink {
    match raw.unwrap_or("stdout") {
        "stdout" => AuditSink::Stdout,
        "" => {
            ctx.err("server.audit_log", "must be \"stdout\" or a file path");
            AuditSink::Stdout
        }
        path => AuditSink::File(ctx.path(path)),
    }
}

fn check_tls(ctx: &mut Ctx<'_>, key: &str, file: &TlsFile) -> Option<TlsListener> {
    let listen = match file.listen.as_deref() {
        Some(raw) => ctx.ok(&format!("{key}.listen"), parse_socket_addr(raw)),
        None => {
            ctx.err(
                format!("{key}.listen"),
                "missing: an \"ip:port\" is required",
            );
            None
        }
    };
    if file.certs.is_empty() {
        ctx.err(
            format!("{key}.certs"),
            "at least one { cert, key } pair is required",
        );
    }
    let certs: Vec<Option<CertPair>> = file
        .certs
        .iter()
        .enumerate()
        .map(|(i, pair)| check_cert_pair(ctx, &format!("{key}.certs[{i}]"), pair))
        .collect();
    let client_ca = file
        .client_ca
        .as_deref()
        .and_then(|raw| ctx.existing_file(&format!("{key}.client_ca"), raw));
    if file.require_client_cert && file.client_ca.is_none() {
        ctx.err(
            format!("{key}.require_client_cert"),
            "requires client_ca: without it no client certificate can be verified",
        );
    }
    Some(TlsListener {
        listen: listen?,
        certs: certs.into_iter().collect::<Option<Vec<_>>>()?,
        client_ca,
        require_client_cert: file.require_client_cert,
        proxy_protocol: file.proxy_protocol,
    })
}

fn check_cert_pair(ctx: &mut Ctx<'_>, key: &str, pair: &CertFile) -> Option<CertPair> {
    let mut file = |name: &str, raw: Option<&str>| match raw {
        Some(raw) => ctx.existing_file(&format!("{key}.{name}"), raw),
        None => {
            ctx.err(format!("{key}.{name}"), "missing: a file path is required");
            None
        }
    };
    let cert = file("cert", pair.cert.as_deref());
    let key = file("key", pair.key.as_deref());
    Some(CertPair {
        cert: cert?,
        key: key?,
    })
}

/// One address may be bound once: plain, TLS and admin listeners share the port space.
fn check_unique_listeners(
    ctx: &mut Ctx<'_>,
    listen: &[SocketAddr],
    admin: Option<SocketAddr>,
    tls: &[TlsListener],
) {
    let mut seen: HashMap<SocketAddr, String> = HashMap::new();
    let plain = listen
        .iter()
        .enumerate()
        .map(|(i, addr)| (format!("server.listen[{i}]"), *addr));
    let secure = tls
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("server.tls[{i}].listen"), t.listen));
    let admin = admin.map(|addr| ("server.admin_listen".to_owned(), addr));
    for (key, addr) in plain.chain(secure).chain(admin) {
        if let Some(first) = seen.get(&addr) {
            ctx.err(key, format!("address {addr} is already used by {first}"));
        } else {
            seen.insert(addr, key);
        }
    }
}
