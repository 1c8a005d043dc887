//! File schema -> validated model. Collects every problem, not just the first.
//!
//! Each `check_*` function converts one part of the file and records errors (and warnings)
//! in a [`Ctx`] under the key's readable dotted path; it returns a best-effort value so the
//! later cross-checks still run and report their own problems in the same round.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use super::error::{ConfigError, ConfigErrors};
use super::file::{
    CacheFile, CertFile, CredentialsFile, FileConfig, IdentityFile, RawSize, RegistryFile,
    ScopedCredentialsFile, ServerFile, TlsFile,
};
use super::model::*;
use crate::secret::Secret;

/// Where relative paths start, how environment variables are read, and the cache dir to use
/// when the file leaves it empty. Injected so tests need not touch the process environment.
pub(super) struct Inputs<'a> {
    pub base_dir: &'a Path,
    pub default_cache_dir: PathBuf,
    pub env: &'a dyn Fn(&str) -> Option<String>,
}

pub(super) const DEFAULT_LISTEN: &str = "127.0.0.1:5000";
pub(super) const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
const DEFAULT_THREADS: i64 = 2;
const MAX_THREADS: i64 = 256;
const DEFAULT_MAX_SIZE: u64 = 20 * GIB;
const DEFAULT_TAG_TTL: Duration = Duration::from_secs(5 * 60);
const DEFAULT_STALE_IF_ERROR: Duration = Duration::from_secs(24 * 60 * 60);
const DEFAULT_FILL_STALL_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(15);
const DEFAULT_REDIRECT_TTL: Duration = Duration::from_secs(5 * 60);
const MIN_REDIRECT_TTL: Duration = Duration::from_secs(1);
const MAX_REDIRECT_TTL: Duration = Duration::from_secs(24 * 60 * 60);
const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;
const DEFAULT_MAX_MANIFEST: u64 = 4 * MIB;
const MIN_MAX_MANIFEST: u64 = KIB;
const MAX_MAX_MANIFEST: u64 = 64 * MIB;

/// Upstream hosts that are Docker Hub: their one-component names get `library/`.
const DOCKER_HUB_HOSTS: &[&str] = &[
    "registry-1.docker.io",
    "docker.io",
    "index.docker.io",
    "registry.hub.docker.com",
];

/// Accumulates errors and warnings while the file is converted.
struct Ctx<'a> {
    inputs: &'a Inputs<'a>,
    errors: Vec<ConfigError>,
    warnings: Vec<Warning>,
}

impl Ctx<'_> {
    fn err(&mut self, key: impl Into<String>, problem: impl Into<String>) {
        self.errors.push(ConfigError::new(key, problem));
    }

    fn warn(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(Warning {
            key: key.into(),
            message: message.into(),
        });
    }

    /// Records `Err` under `key` and turns the result into an `Option`.
    fn ok<T>(&mut self, key: &str, result: Result<T, String>) -> Option<T> {
        result.map_err(|problem| self.err(key, problem)).ok()
    }

    /// A path from the file: `~/` is the home directory, relative is against the config's dir.
    fn path(&self, raw: &str) -> PathBuf {
        resolve_path(raw, self.inputs.base_dir)
    }

    /// A path that must name an existing file at load time.
    fn existing_file(&mut self, key: &str, raw: &str) -> Option<PathBuf> {
        if raw.is_empty() {
            self.err(key, "must not be empty");
            return None;
        }
        let path = self.path(raw);
        let checked = check_file_exists(&path);
        self.ok(key, checked).map(|()| path)
    }
}

/// Converts the parsed file into the validated [`Config`], or every problem found.
pub(super) fn validate(file: FileConfig, inputs: &Inputs<'_>) -> Result<Config, ConfigErrors> {
    let mut ctx = Ctx {
        inputs,
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let server = check_server(&mut ctx, &file.server);
    let cache = check_cache(&mut ctx, &file.cache);
    let zones = check_zones(&mut ctx, &file.zones);
    let identities = check_identities(&mut ctx, &file.identity);
    let registries = check_registries(&mut ctx, &file.registry, &zones, &identities);
    if !ctx.errors.is_empty() {
        return Err(ConfigErrors(ctx.errors));
    }
    let mut config = Config {
        server,
        cache,
        zones,
        identities,
        registries: registries.into_iter().map(Arc::new).collect(),
        warnings: ctx.warnings,
    };
    let findings = audit_rules(&config);
    config.warnings.extend(findings);
    let later = not_yet_enforced(&config);
    config.warnings.extend(later);
    Ok(config)
}

// ---------------------------------------------------------------------------------------------
// Audit rules: valid configs that are probably not what the operator wants. Each finding names
// its rule in brackets so it can be looked up (and, later, silenced) by name.

fn audit_rules(config: &Config) -> Vec<Warning> {
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

// ---------------------------------------------------------------------------------------------
// [server]

fn check_server(ctx: &mut Ctx<'_>, file: &ServerFile) -> Server {
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

// ---------------------------------------------------------------------------------------------
// [cache]

fn check_cache(ctx: &mut Ctx<'_>, file: &CacheFile) -> Cache {
    let dir = match file.dir.as_deref() {
        None | Some("") => ctx.inputs.default_cache_dir.clone(),
        Some(raw) => ctx.path(raw),
    };
    let max_size =
        check_size(ctx, "cache.max_size", file.max_size.as_ref()).unwrap_or(DEFAULT_MAX_SIZE);
    let max_manifest_size = check_size(
        ctx,
        "cache.max_manifest_size",
        file.max_manifest_size.as_ref(),
    )
    .unwrap_or(DEFAULT_MAX_MANIFEST);
    if !(MIN_MAX_MANIFEST..=MAX_MAX_MANIFEST).contains(&max_manifest_size) {
        ctx.err(
            "cache.max_manifest_size",
            format!("must be between 1KiB and 64MiB, got {max_manifest_size} bytes"),
        );
    }
    let tag_ttl =
        check_duration(ctx, "cache.tag_ttl", file.tag_ttl.as_deref()).unwrap_or(DEFAULT_TAG_TTL);
    let stale_if_error =
        check_duration(ctx, "cache.stale_if_error", file.stale_if_error.as_deref())
            .unwrap_or(DEFAULT_STALE_IF_ERROR);
    let negative_ttl = check_duration(ctx, "cache.negative_ttl", file.negative_ttl.as_deref())
        .unwrap_or(DEFAULT_NEGATIVE_TTL);
    let fill_stall_timeout = check_duration(
        ctx,
        "cache.fill_stall_timeout",
        file.fill_stall_timeout.as_deref(),
    )
    .unwrap_or(DEFAULT_FILL_STALL_TIMEOUT);
    if fill_stall_timeout < Duration::from_millis(100)
        || fill_stall_timeout > Duration::from_secs(3600)
    {
        ctx.err(
            "cache.fill_stall_timeout",
            format!(
                "must be between 100ms and 1h, got {}",
                humantime::format_duration(fill_stall_timeout)
            ),
        );
    }
    Cache {
        dir,
        max_size,
        tag_ttl,
        stale_if_error,
        negative_ttl,
        max_manifest_size,
        fill_stall_timeout,
    }
}

fn check_size(ctx: &mut Ctx<'_>, key: &str, raw: Option<&RawSize>) -> Option<u64> {
    match raw? {
        RawSize::Int(n) => ctx.ok(
            key,
            u64::try_from(*n).map_err(|_| format!("must not be negative, got {n}")),
        ),
        RawSize::Text(text) => ctx.ok(key, parse_size(text)),
    }
}

fn check_duration(ctx: &mut Ctx<'_>, key: &str, raw: Option<&str>) -> Option<Duration> {
    ctx.ok(key, parse_duration(raw?))
}

// ---------------------------------------------------------------------------------------------
// [zones]

fn check_zones(
    ctx: &mut Ctx<'_>,
    zones: &std::collections::BTreeMap<String, Vec<String>>,
) -> Vec<Zone> {
    let mut out = Vec::new();
    for (name, nets) in zones {
        let key = format!("zones.{name}");
        if !is_zone_name(name) {
            ctx.err(&key, "zone names use only a-z, 0-9, '_' and '-'");
        }
        if nets.is_empty() {
            ctx.err(&key, "a zone needs at least one CIDR");
        }
        let nets = check_nets(ctx, &key, nets);
        out.push(Zone {
            name: name.clone(),
            nets,
        });
    }
    out
}

/// CIDR list; a bare IP address stands for itself (/32 or /128).
fn check_nets(ctx: &mut Ctx<'_>, key: &str, raw: &[String]) -> Vec<IpNet> {
    raw.iter()
        .enumerate()
        .filter_map(|(i, s)| ctx.ok(&format!("{key}[{i}]"), parse_net(s)))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// [[identity]]

fn check_identities(ctx: &mut Ctx<'_>, files: &[IdentityFile]) -> Vec<Identity> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut out = Vec::new();
    for (i, file) in files.iter().enumerate() {
        let key = entry_key(ctx, "identity", i, file.name.as_deref(), |_| true);
        if let Some(name) = file.name.as_deref() {
            if let Some(first) = seen.insert(name, i) {
                ctx.err(
                    format!("identity[{i}].name"),
                    format!("duplicate identity name {name:?} (also identity[{first}])"),
                );
            }
        }
        if let Some(identity) = check_identity(ctx, &key, file) {
            out.push(identity);
        }
    }
    out
}

fn check_identity(ctx: &mut Ctx<'_>, key: &str, file: &IdentityFile) -> Option<Identity> {
    let roles = check_roles(ctx, &format!("{key}.roles"), file.roles.as_deref());
    let auth = match (&file.mtls_subject, &file.username) {
        (Some(subject), None) => check_mtls_identity(ctx, key, subject, file),
        (None, Some(username)) => check_password_identity(ctx, key, username, file),
        (Some(_), Some(_)) => {
            ctx.err(key, "set either mtls_subject or username, not both");
            None
        }
        (None, None) => {
            ctx.err(key, "set mtls_subject or username (with a password)");
            None
        }
    };
    Some(Identity {
        name: file.name.clone()?,
        auth: auth?,
        roles,
    })
}

fn check_mtls_identity(
    ctx: &mut Ctx<'_>,
    key: &str,
    subject: &str,
    file: &IdentityFile,
) -> Option<IdentityAuth> {
    for (name, set) in [
        ("password_sha256", file.password_sha256.is_some()),
        ("password_file", file.password_file.is_some()),
    ] {
        if set {
            ctx.err(
                format!("{key}.{name}"),
                "only for username identities, not mtls_subject",
            );
        }
    }
    if subject.is_empty() {
        ctx.err(format!("{key}.mtls_subject"), "must not be empty");
        return None;
    }
    Some(IdentityAuth::Mtls {
        subject: subject.to_owned(),
    })
}

fn check_password_identity(
    ctx: &mut Ctx<'_>,
    key: &str,
    username: &str,
    file: &IdentityFile,
) -> Option<IdentityAuth> {
    if username.is_empty() {
        ctx.err(format!("{key}.username"), "must not be empty");
    }
    let password = match (&file.password_sha256, &file.password_file) {
        (Some(hash), None) => {
            let parsed = parse_sha256_hex(hash);
            ctx.ok(&format!("{key}.password_sha256"), parsed)
                .map(PasswordCheck::Sha256)
        }
        (None, Some(path)) => ctx
            .existing_file(&format!("{key}.password_file"), path)
            .map(PasswordCheck::File),
        _ => {
            ctx.err(
                key,
                "a username identity needs exactly one of password_sha256 or password_file",
            );
            None
        }
    };
    if username.is_empty() {
        return None;
    }
    Some(IdentityAuth::Password {
        username: username.to_owned(),
        password: password?,
    })
}

fn check_roles(ctx: &mut Ctx<'_>, key: &str, raw: Option<&[String]>) -> Roles {
    let Some(raw) = raw else {
        return Roles {
            pull: true,
            ..Roles::default()
        };
    };
    if raw.is_empty() {
        ctx.err(
            key,
            "must name at least one role: \"pull\", \"push\", \"delete\"",
        );
    }
    let mut roles = Roles::default();
    for (i, role) in raw.iter().enumerate() {
        match role.as_str() {
            "pull" => roles.pull = true,
            "push" => roles.push = true,
            "delete" => roles.delete = true,
            other => ctx.err(
                format!("{key}[{i}]"),
                format!("unknown role {other:?}: expected \"pull\", \"push\" or \"delete\""),
            ),
        }
    }
    roles
}

// ---------------------------------------------------------------------------------------------
// [[registry]]

/// Which registry first claimed a routing key (host, ns or prefix), to report collisions.
#[derive(Default)]
struct Claims {
    hosts: HashMap<String, String>,
    ns: HashMap<String, String>,
    prefixes: HashMap<String, String>,
}

fn check_registries(
    ctx: &mut Ctx<'_>,
    files: &[RegistryFile],
    zones: &[Zone],
    identities: &[Identity],
) -> Vec<Registry> {
    if files.is_empty() {
        ctx.err("registry", "at least one [[registry]] is required");
    }
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut claims = Claims::default();
    let mut default_key: Option<String> = None;
    let mut out = Vec::new();
    for (i, file) in files.iter().enumerate() {
        let key = entry_key(ctx, "registry", i, file.name.as_deref(), is_registry_name);
        if let Some(name) = file.name.as_deref() {
            if let Some(first) = names.insert(name, i) {
                ctx.err(
                    format!("registry[{i}].name"),
                    format!("duplicate registry name {name:?} (also registry[{first}])"),
                );
            }
        }
        if file.default {
            match &default_key {
                Some(first) => ctx.err(
                    format!("{key}.default"),
                    format!("only one registry may be the default; {first} already is"),
                ),
                None => default_key = Some(key.clone()),
            }
        }
        let scoped =
            check_scoped_credentials(ctx, &key, &file.scoped_credentials, zones, identities);
        if let Some(mut registry) = check_registry(ctx, &key, file, zones, &mut claims) {
            registry.scoped_credentials = scoped;
            out.push(registry);
        }
    }
    out
}

/// The readable key of the i-th `[[registry]]`/`[[identity]]`: by name when it has a usable
/// one, by index otherwise. A missing or malformed name is reported here.
fn entry_key(
    ctx: &mut Ctx<'_>,
    table: &str,
    i: usize,
    name: Option<&str>,
    valid: fn(&str) -> bool,
) -> String {
    match name {
        Some(name) if !name.is_empty() && valid(name) => format!("{table}.{name}"),
        Some("") | None => {
            ctx.err(format!("{table}[{i}].name"), "missing: a name is required");
            format!("{table}[{i}]")
        }
        Some(name) => {
            ctx.err(
                format!("{table}[{i}].name"),
                format!("invalid name {name:?}: use a-z, 0-9, '_' and '-', starting with a letter or digit"),
            );
            format!("{table}[{i}]")
        }
    }
}

fn check_registry(
    ctx: &mut Ctx<'_>,
    key: &str,
    file: &RegistryFile,
    zones: &[Zone],
    claims: &mut Claims,
) -> Option<Registry> {
    let upstream = match file.upstream.as_deref() {
        Some(raw) => ctx.ok(&format!("{key}.upstream"), parse_upstream(raw)),
        None => {
            ctx.err(
                format!("{key}.upstream"),
                "missing: an upstream URL is required",
            );
            None
        }
    };
    let hosts = match (&file.hosts, &upstream) {
        (Some(hosts), _) => check_hosts(ctx, &format!("{key}.hosts"), hosts),
        (None, Some(up)) => vec![format!("private.{}", up.host)],
        (None, None) => Vec::new(),
    };
    let data_hosts = check_hosts(ctx, &format!("{key}.data_hosts"), &file.data_hosts);
    let ns = check_ns_list(ctx, &format!("{key}.ns"), &file.ns);
    let prefix = file
        .prefix
        .as_deref()
        .and_then(|p| ctx.ok(&format!("{key}.prefix"), parse_prefix(p)));
    claim_routes(
        ctx,
        key,
        claims,
        &hosts,
        &data_hosts,
        &ns,
        prefix.as_deref(),
    );
    let credentials = file
        .credentials
        .as_ref()
        .and_then(|c| check_credentials(ctx, &format!("{key}.credentials"), c));
    let realm_hosts = check_hosts(ctx, &format!("{key}.realm_hosts"), &file.realm_hosts);
    let ca = file
        .ca
        .as_deref()
        .and_then(|raw| check_ca(ctx, &format!("{key}.ca"), raw));
    let network_access = check_network_access(ctx, key, file);
    check_registry_zones(ctx, key, &file.zones, zones);
    let repositories = check_globs(ctx, &format!("{key}.repositories"), &file.repositories);
    let deny_repositories = check_globs(
        ctx,
        &format!("{key}.deny_repositories"),
        &file.deny_repositories,
    );
    let redirect = check_redirect(ctx, key, file.redirect.as_deref(), &data_hosts);
    let tag_ttl = check_duration(ctx, &format!("{key}.tag_ttl"), file.tag_ttl.as_deref());
    let upstream = upstream?;
    let library_namespace = file
        .library_namespace
        .unwrap_or_else(|| DOCKER_HUB_HOSTS.contains(&upstream.host.as_str()));
    Some(Registry {
        name: file.name.clone()?,
        upstream,
        hosts,
        data_hosts,
        ns,
        prefix,
        default: file.default,
        library_namespace,
        credentials,
        realm_hosts,
        ca,
        network_access,
        zones: file.zones.clone(),
        trusted_identities: file.trusted_identities.unwrap_or(true),
        repositories,
        deny_repositories,
        push: file.push,
        delete: file.delete,
        redirect,
        tag_ttl,
        scoped_credentials: Vec::new(),
    })
}

fn check_scoped_credentials(
    ctx: &mut Ctx<'_>,
    registry_key: &str,
    files: &[ScopedCredentialsFile],
    zones: &[Zone],
    identities: &[Identity],
) -> Vec<ScopedCredentials> {
    let mut out: Vec<ScopedCredentials> = Vec::new();
    for (i, file) in files.iter().enumerate() {
        let table = format!("{registry_key}.scoped_credentials");
        let key = entry_key(ctx, &table, i, file.name.as_deref(), is_zone_name);
        let name = file.name.clone().unwrap_or_default();
        if out.iter().any(|s| s.name == name) {
            ctx.err(format!("{key}.name"), format!("duplicate name {name:?}"));
        }
        if file.zones.is_empty() && file.identities.is_empty() && file.repositories.is_empty() {
            ctx.err(
                key.clone(),
                "selects every caller: give zones, identities or repositories (or use the registry's credentials)",
            );
        }
        check_registry_zones(ctx, &key, &file.zones, zones);
        for (j, identity) in file.identities.iter().enumerate() {
            if !identities.iter().any(|known| &known.name == identity) {
                ctx.err(
                    format!("{key}.identities[{j}]"),
                    format!("unknown identity {identity:?}: define it as an [[identity]]"),
                );
            }
        }
        let repositories = check_globs(ctx, &format!("{key}.repositories"), &file.repositories);
        let credentials = match &file.credentials {
            Some(c) => check_credentials(ctx, &format!("{key}.credentials"), c),
            None => {
                ctx.err(
                    format!("{key}.credentials"),
                    "missing: the credentials to use",
                );
                None
            }
        };
        if let Some(credentials) = credentials {
            out.push(ScopedCredentials {
                name,
                zones: file.zones.clone(),
                identities: file.identities.clone(),
                repositories,
                credentials,
            });
        }
    }
    out
}

fn check_hosts(ctx: &mut Ctx<'_>, key: &str, raw: &[String]) -> Vec<String> {
    raw.iter()
        .enumerate()
        .filter_map(|(i, h)| ctx.ok(&format!("{key}[{i}]"), parse_host(h)))
        .collect()
}

fn check_ns_list(ctx: &mut Ctx<'_>, key: &str, raw: &[String]) -> Vec<String> {
    raw.iter()
        .enumerate()
        .filter_map(|(i, h)| ctx.ok(&format!("{key}[{i}]"), parse_ns(h)))
        .collect()
}

/// Host, `ns` and prefix are lookup keys into the config: each may lead to one registry only.
/// Hosts and data hosts share one namespace, since both arrive in the `Host` header.
fn claim_routes(
    ctx: &mut Ctx<'_>,
    key: &str,
    claims: &mut Claims,
    hosts: &[String],
    data_hosts: &[String],
    ns: &[String],
    prefix: Option<&str>,
) {
    let all_hosts = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| (format!("{key}.hosts[{i}]"), h))
        .chain(
            data_hosts
                .iter()
                .enumerate()
                .map(|(i, h)| (format!("{key}.data_hosts[{i}]"), h)),
        );
    for (k, host) in all_hosts {
        claim(ctx, &mut claims.hosts, k, host, "host");
    }
    for (i, value) in ns.iter().enumerate() {
        claim(ctx, &mut claims.ns, format!("{key}.ns[{i}]"), value, "ns");
    }
    if let Some(prefix) = prefix {
        claim(
            ctx,
            &mut claims.prefixes,
            format!("{key}.prefix"),
            prefix,
            "prefix",
        );
    }
}

fn claim(
    ctx: &mut Ctx<'_>,
    claims: &mut HashMap<String, String>,
    key: String,
    value: &str,
    what: &str,
) {
    if let Some(first) = claims.get(value) {
        ctx.err(
            key,
            format!("{what} {value:?} is already claimed by {first}"),
        );
    } else {
        claims.insert(value.to_owned(), key);
    }
}

/// Exactly one credential kind: basic (`username` + one password source), `docker_config`
/// or `credential_helper`.
fn check_credentials(
    ctx: &mut Ctx<'_>,
    key: &str,
    file: &CredentialsFile,
) -> Option<CredentialSource> {
    let basic = file.username.is_some()
        || file.password.is_some()
        || file.password_env.is_some()
        || file.password_file.is_some();
    let kinds = [
        basic,
        file.docker_config.is_some(),
        file.credential_helper.is_some(),
    ];
    match kinds.iter().filter(|k| **k).count() {
        0 => {
            ctx.err(
                key,
                "empty: set username + a password, docker_config or credential_helper",
            );
            return None;
        }
        1 => {}
        _ => {
            ctx.err(
                key,
                "use one kind: username + password*, docker_config or credential_helper",
            );
            return None;
        }
    }
    if let Some(raw) = file.docker_config.as_deref() {
        if raw.is_empty() {
            ctx.err(format!("{key}.docker_config"), "must not be empty");
            return None;
        }
        return Some(CredentialSource::DockerConfig {
            path: ctx.path(raw),
        });
    }
    if let Some(name) = file.credential_helper.as_deref() {
        let checked = check_helper_name(name);
        return ctx
            .ok(&format!("{key}.credential_helper"), checked)
            .map(|name| CredentialSource::Helper { name });
    }
    check_basic_credentials(ctx, key, file)
}

fn check_basic_credentials(
    ctx: &mut Ctx<'_>,
    key: &str,
    file: &CredentialsFile,
) -> Option<CredentialSource> {
    let username = match file.username.as_deref() {
        Some("") => {
            ctx.err(format!("{key}.username"), "must not be empty");
            None
        }
        Some(user) => Some(user.to_owned()),
        None => {
            ctx.err(
                format!("{key}.username"),
                "missing: a password needs a username",
            );
            None
        }
    };
    let sources = [
        file.password.is_some(),
        file.password_env.is_some(),
        file.password_file.is_some(),
    ];
    if sources.iter().filter(|s| **s).count() != 1 {
        ctx.err(
            key,
            "set exactly one of password, password_env or password_file",
        );
        return None;
    }
    let password = check_password_source(ctx, key, file)?;
    Some(CredentialSource::Basic {
        username: username?,
        password,
    })
}

fn check_password_source(
    ctx: &mut Ctx<'_>,
    key: &str,
    file: &CredentialsFile,
) -> Option<PasswordSource> {
    if let Some(password) = file.password.as_deref() {
        ctx.warn(
            format!("{key}.password"),
            "[inline-password] inline password in the config file; prefer password_env or password_file",
        );
        return Some(PasswordSource::Inline(Secret::new(password)));
    }
    if let Some(var) = file.password_env.as_deref() {
        let read = read_env(ctx.inputs.env, var);
        return ctx
            .ok(&format!("{key}.password_env"), read)
            .map(|value| PasswordSource::Env {
                var: var.to_owned(),
                value,
            });
    }
    let raw = file.password_file.as_deref()?;
    ctx.existing_file(&format!("{key}.password_file"), raw)
        .map(PasswordSource::File)
}

/// `password_env` is read once, at load: a missing variable is caught by `pullgate check`
/// rather than by the first pull.
fn read_env(env: &dyn Fn(&str) -> Option<String>, var: &str) -> Result<Secret, String> {
    if var.is_empty() {
        return Err("must name an environment variable".to_owned());
    }
    match env(var) {
        None => Err(format!("environment variable {var} is not set")),
        Some(value) if value.is_empty() => Err(format!("environment variable {var} is empty")),
        Some(value) => Ok(Secret::new(value)),
    }
}

fn check_helper_name(name: &str) -> Result<String, String> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "invalid helper name {name:?}: use a-z, 0-9, '.', '_' and '-' (docker-credential-<name>)"
        ))
    }
}

/// The extra trust anchors must be there and readable now: a bad `ca` would otherwise show up
/// only as TLS failures at the first pull.
fn check_ca(ctx: &mut Ctx<'_>, key: &str, raw: &str) -> Option<PathBuf> {
    let path = ctx.existing_file(key, raw)?;
    match std::fs::File::open(&path) {
        Ok(_) => Some(path),
        Err(err) => {
            ctx.err(key, format!("cannot read {}: {err}", path.display()));
            None
        }
    }
}

fn check_network_access(ctx: &mut Ctx<'_>, key: &str, file: &RegistryFile) -> NetworkAccess {
    let access = match file.network_access.as_deref().unwrap_or("enabled") {
        "enabled" => NetworkAccess::Enabled,
        "selected" => NetworkAccess::Selected,
        "disabled" => NetworkAccess::Disabled,
        other => {
            ctx.err(
                format!("{key}.network_access"),
                format!("must be \"enabled\", \"selected\" or \"disabled\", got {other:?}"),
            );
            NetworkAccess::Enabled
        }
    };
    if access == NetworkAccess::Selected && file.zones.is_empty() {
        ctx.err(
            format!("{key}.zones"),
            "network_access = \"selected\" needs at least one zone, or no source could pull",
        );
    }
    access
}

fn check_registry_zones(ctx: &mut Ctx<'_>, key: &str, names: &[String], zones: &[Zone]) {
    for (i, name) in names.iter().enumerate() {
        if !zones.iter().any(|z| &z.name == name) {
            ctx.err(
                format!("{key}.zones[{i}]"),
                format!("unknown zone {name:?}: define it under [zones]"),
            );
        }
    }
}

fn check_globs(ctx: &mut Ctx<'_>, key: &str, raw: &[String]) -> Vec<String> {
    raw.iter()
        .enumerate()
        .filter_map(|(i, g)| ctx.ok(&format!("{key}[{i}]"), parse_glob(g)))
        .collect()
}

fn check_redirect(
    ctx: &mut Ctx<'_>,
    key: &str,
    raw: Option<&str>,
    data_hosts: &[String],
) -> RedirectMode {
    let k = format!("{key}.redirect");
    match raw.unwrap_or("follow") {
        "follow" => RedirectMode::Follow,
        "data-endpoint" => {
            if data_hosts.is_empty() {
                ctx.err(k, "\"data-endpoint\" needs at least one data_hosts entry");
            }
            RedirectMode::DataEndpoint
        }
        other => {
            ctx.err(
                k,
                format!("must be \"follow\" or \"data-endpoint\", got {other:?}"),
            );
            RedirectMode::Follow
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Not built yet. Remove each entry when its feature lands.

/// NOT YET ENFORCED: keys the config accepts whose behaviour is not built yet, so that an
/// operator is not misled into thinking a restriction holds. Warns only when a key is set to a
/// non-default value. Add a line here for a key accepted ahead of its feature; delete it when
/// the feature lands. Empty today: every accepted key is acted on.
fn not_yet_enforced(_config: &Config) -> Vec<Warning> {
    Vec::new()
}

// ---------------------------------------------------------------------------------------------
// Value parsers: pure, each returns the problem as a sentence.

/// `~/x` is under the home directory; a relative path is against `base` (the config's dir).
pub(super) fn resolve_path(raw: &str, base: &Path) -> PathBuf {
    if let Some(rest) = raw.strip_prefix("~/") {
        if let Some(home) = dirs::home_dir() {
            return home.join(rest);
        }
    }
    let path = Path::new(raw);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

fn check_file_exists(path: &Path) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Err(format!("{} is a directory, not a file", path.display())),
        Ok(_) => Ok(()),
        Err(err) => Err(format!(
            "file {} does not exist or cannot be read: {err}",
            path.display()
        )),
    }
}

pub(super) fn parse_socket_addr(raw: &str) -> Result<SocketAddr, String> {
    raw.trim().parse().map_err(|_| {
        format!("invalid address {raw:?}: expected \"ip:port\", e.g. \"127.0.0.1:5000\" or \"[::1]:5000\"")
    })
}

/// A CIDR, or a bare address meaning just that address.
pub(super) fn parse_net(raw: &str) -> Result<IpNet, String> {
    let raw = raw.trim();
    if let Ok(net) = raw.parse::<IpNet>() {
        return Ok(net);
    }
    raw.parse::<IpAddr>().map(IpNet::from).map_err(|_| {
        format!("invalid CIDR {raw:?}: expected e.g. \"10.0.0.0/8\", \"fd00::/8\" or an IP")
    })
}

/// A size: bytes, or a number with B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB
/// (powers of 1024), case-insensitive, optional space. Fractions are allowed: `"1.5GiB"`.
pub(super) fn parse_size(raw: &str) -> Result<u64, String> {
    let text = raw.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let unit = unit.trim_start();
    let multiplier = size_unit(unit).ok_or_else(|| {
        format!("invalid size {raw:?}: unit must be one of B, KB, MB, GB, TB, KiB, MiB, GiB, TiB")
    })?;
    scale_decimal(number, multiplier).ok_or_else(|| {
        format!("invalid size {raw:?}: expected a number and a unit, e.g. \"20GiB\" or \"500MB\"")
    })
}

fn size_unit(unit: &str) -> Option<u64> {
    let multiplier = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => KIB,
        "mib" => MIB,
        "gib" => GIB,
        "tib" => 1024 * GIB,
        _ => return None,
    };
    Some(multiplier)
}

/// `number * multiplier` for a decimal like `1.5`, in integers (no float rounding), rounded
/// down to whole bytes; `None` on syntax errors or overflow.
fn scale_decimal(number: &str, multiplier: u64) -> Option<u64> {
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    let digits_ok = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits_ok(whole) || !digits_ok(frac) || frac.len() > 18 {
        return None;
    }
    if number.ends_with('.') {
        return None;
    }
    let whole: u128 = whole.parse().ok()?;
    let mut total = whole.checked_mul(u128::from(multiplier))?;
    if !frac.is_empty() {
        let frac_value: u128 = frac.parse().ok()?;
        let scale = 10u128.checked_pow(u32::try_from(frac.len()).ok()?)?;
        total = total.checked_add(frac_value * u128::from(multiplier) / scale)?;
    }
    u64::try_from(total).ok()
}

/// A humantime duration: `"90s"`, `"10m"`, `"1h 30m"`; `"0"` means zero.
pub(super) fn parse_duration(raw: &str) -> Result<Duration, String> {
    humantime::parse_duration(raw.trim())
        .map_err(|err| format!("invalid duration {raw:?}: {err} (e.g. \"90s\", \"10m\", \"24h\")"))
}

/// An upstream origin: http(s), a host, no userinfo, query, fragment or path.
pub(super) fn parse_upstream(raw: &str) -> Result<Upstream, String> {
    let url = url::Url::parse(raw.trim()).map_err(|err| format!("invalid URL {raw:?}: {err}"))?;
    let https = match url.scheme() {
        "https" => true,
        "http" => false,
        other => return Err(format!("scheme must be http or https, got {other:?}")),
    };
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not contain user info: use credentials instead".to_owned());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err("must not have a query or fragment".to_owned());
    }
    if !matches!(url.path(), "" | "/") {
        return Err(format!(
            "must not have a path (got {:?}): registries live at the root (/v2/)",
            url.path()
        ));
    }
    let host = match url.host() {
        Some(url::Host::Domain(d)) => d.to_ascii_lowercase(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        None => return Err("must have a host".to_owned()),
    };
    let port = url
        .port_or_known_default()
        .ok_or_else(|| "must have a port or a known scheme".to_owned())?;
    Ok(Upstream {
        origin: url.origin().ascii_serialization(),
        https,
        host,
        port,
    })
}

/// A DNS host name, lowercased: letters, digits, '-' and '.', no empty labels, ≤ 253 chars.
pub(super) fn parse_host(raw: &str) -> Result<String, String> {
    let host = raw.trim().to_ascii_lowercase();
    if is_host_name(&host) {
        Ok(host)
    } else {
        Err(format!(
            "invalid host name {raw:?}: letters, digits, '-' and '.', no empty labels, no port"
        ))
    }
}

fn is_host_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

/// A containerd `?ns=` value: a host name or IP literal, optionally with `:port`.
pub(super) fn parse_ns(raw: &str) -> Result<String, String> {
    let value = raw.trim().to_ascii_lowercase();
    let bad =
        || format!("invalid ns {raw:?}: expected a host name or IP, optionally with \":port\"");
    if value.parse::<IpAddr>().is_ok() || value.parse::<SocketAddr>().is_ok() {
        return Ok(value);
    }
    if let Some(inner) = value.strip_prefix('[').and_then(|v| v.strip_suffix(']')) {
        return inner
            .parse::<std::net::Ipv6Addr>()
            .map(|_| value.clone())
            .map_err(|_| bad());
    }
    let (host, port) = match value.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (value.as_str(), None),
    };
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|n| n > 0));
    if is_host_name(host) && port_ok {
        Ok(value)
    } else {
        Err(bad())
    }
}

/// A path prefix: OCI name components joined by '/', no leading or trailing '/'.
pub(super) fn parse_prefix(raw: &str) -> Result<String, String> {
    if !raw.is_empty() && raw.split('/').all(is_name_component) {
        Ok(raw.to_owned())
    } else {
        Err(format!(
            "invalid prefix {raw:?}: '/'-separated components of a-z, 0-9 and single '.', '_', \"__\" or '-' runs between them, no leading or trailing '/'"
        ))
    }
}

/// The OCI name component grammar: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
pub(super) fn is_name_component(s: &str) -> bool {
    let bytes = s.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let mut i = 0;
    loop {
        let start = i;
        while i < bytes.len() && alnum(bytes[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == bytes.len() {
            return true;
        }
        let sep_start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &s[sep_start..i];
        let sep_ok = matches!(sep, "." | "_" | "__") || sep.bytes().all(|b| b == b'-');
        if !sep_ok {
            return false;
        }
    }
}

/// A repository glob: OCI name characters plus `*`; syntax only.
pub(super) fn parse_glob(raw: &str) -> Result<String, String> {
    let chars_ok = raw
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/*".contains(&b));
    let parts_ok = raw.split('/').all(|part| !part.is_empty());
    if raw.is_empty() {
        Err("a repository glob must not be empty".to_owned())
    } else if !chars_ok {
        Err(format!(
            "invalid glob {raw:?}: use a-z, 0-9, '.', '_', '-', '/', '*' and \"**\""
        ))
    } else if !parts_ok || raw.contains("***") {
        Err(format!(
            "invalid glob {raw:?}: no empty path components, no leading or trailing '/', at most \"**\""
        ))
    } else {
        Ok(raw.to_owned())
    }
}

fn parse_sha256_hex(raw: &str) -> Result<[u8; 32], String> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(raw.trim(), &mut out)
        .map_err(|_| "must be 64 hex digits (the SHA-256 of the password)".to_owned())?;
    Ok(out)
}

fn is_registry_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    first_ok && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-".contains(&b))
}

fn is_zone_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-".contains(&b))
}
