//! `[[registry]]`: each upstream, the hosts, `ns` values and prefix that route to it, its
//! access policy (network access, zones, repositories), redirects and scoped credentials.
//! Owns that every routing key leads to one registry only and that zone and identity names
//! refer to ones that exist. The credentials themselves are checked in `credentials.rs`.

use std::collections::HashMap;
use std::path::PathBuf;

use super::credentials::check_credentials;
use super::values::{
    is_registry_name, is_zone_name, parse_glob, parse_host, parse_ns, parse_prefix, parse_upstream,
};
use super::{check_duration, entry_key, Ctx};
use crate::config::file::{RegistryFile, ScopedCredentialsFile, SignaturesFile};
use crate::config::model::*;

/// Upstream hosts that are Docker Hub: their one-component names get `library/`.
const DOCKER_HUB_HOSTS: &[&str] = &[
    "registry-1.docker.io",
    "docker.io",
    "index.docker.io",
    "registry.hub.docker.com",
];

/// Which registry first claimed a routing key (host, ns or prefix), to report collisions.
#[derive(Default)]
struct Claims {
    hosts: HashMap<String, String>,
    ns: HashMap<String, String>,
    prefixes: HashMap<String, String>,
}

pub(super) fn check_registries(
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
        let signatures = check_signatures(ctx, &key, &file.signatures);
        if let Some(mut registry) = check_registry(ctx, &key, file, zones, &mut claims) {
            registry.scoped_credentials = scoped;
            registry.signatures = signatures;
            out.push(registry);
        }
    }
    out
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
        signatures: Vec::new(),
    })
}

/// `[[registry.signatures]]`: globs, keys that are readable PEM public keys of a supported
/// type (each error names its `keys[i]`), and the mode.
fn check_signatures(
    ctx: &mut Ctx<'_>,
    registry_key: &str,
    files: &[SignaturesFile],
) -> Vec<SignaturePolicy> {
    use sha2::{Digest as _, Sha256};
    let mut out = Vec::new();
    for (i, file) in files.iter().enumerate() {
        let key = format!("{registry_key}.signatures[{i}]");
        let repositories = check_globs(ctx, &format!("{key}.repositories"), &file.repositories);
        if file.keys.is_empty() {
            ctx.err(
                format!("{key}.keys"),
                "missing: at least one PEM public key file",
            );
        }
        let mut keys = Vec::new();
        for (j, raw) in file.keys.iter().enumerate() {
            let k = format!("{key}.keys[{j}]");
            let Some(path) = ctx.existing_file(&k, raw) else {
                continue;
            };
            let parsed = std::fs::read(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))
                .and_then(|text| {
                    crate::verify::PublicKey::from_pem(&text)
                        .map_err(|e| format!("{}: {e}", path.display()))
                });
            if let Some(public) = ctx.ok(&k, parsed) {
                keys.push(public);
            }
        }
        let mode = match file.mode.as_deref().unwrap_or("enforce") {
            "enforce" => SignatureMode::Enforce,
            "audit" => SignatureMode::Audit,
            other => {
                ctx.err(
                    format!("{key}.mode"),
                    format!("must be \"enforce\" or \"audit\", got {other:?}"),
                );
                SignatureMode::Enforce
            }
        };
        let mut h = Sha256::new();
        h.update(key.as_bytes());
        h.update([mode as u8]);
        for g in &repositories {
            h.update((g.len() as u64).to_le_bytes());
            h.update(g.as_bytes());
        }
        for k in &keys {
            h.update((k.spki().len() as u64).to_le_bytes());
            h.update(k.spki());
        }
        out.push(SignaturePolicy {
            key,
            repositories,
            keys,
            mode,
            fingerprint: hex::encode(h.finalize()),
        });
    }
    out
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
