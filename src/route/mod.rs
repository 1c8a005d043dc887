//! Routing: which configured registry a request goes to, and the name the upstream knows.
//!
//! Owns: the precedence `?ns=`, then Host, then path prefix, then the default registry
//! (DESIGN.md "Routing"), Host normalisation, prefix stripping and `library/` normalisation.
//! One exception to the order: a Host that is one of a registry's `data_hosts` beats `?ns=`,
//! so a data endpoint is always a data endpoint (blob reads with a signature, nothing else)
//! whatever the query says.
//! Invariant 8: `ns`, Host and prefix are lookup keys into tables built from the config, never
//! dial targets; anything not in a table is simply unknown (closed world). Must never: build an
//! upstream from request input, or hand out a repository name that did not pass
//! `Repository::parse` (invariant 2).

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::model::Registry;
use crate::oci::{echo, ErrorCode, OciError, Repository};

/// How a request was routed. `Ns` means the response echoes `OCI-Namespace`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RoutedBy {
    /// `?ns=<value>` (containerd hosts.toml mirrors).
    Ns,
    /// The Host header matched one of the registry's `hosts`.
    Host,
    /// The Host header matched one of the registry's blob-only `data_hosts`.
    DataHost,
    /// The name began with the registry's `prefix` (podman, path-style mirrors).
    Prefix,
    /// No other rule matched; the registry with `default = true`.
    Default,
}

impl RoutedBy {
    /// A bounded label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RoutedBy::Ns => "ns",
            RoutedBy::Host => "host",
            RoutedBy::DataHost => "data_host",
            RoutedBy::Prefix => "prefix",
            RoutedBy::Default => "default",
        }
    }
}

/// The outcome of routing a `/v2/<name>/...` request.
#[derive(Debug, Clone)]
pub struct Routed {
    pub registry: Arc<Registry>,
    pub by: RoutedBy,
    /// The name as the UPSTREAM knows it: prefix stripped, `library/` added when the registry
    /// has `library_namespace` and the name has one component. Validated.
    pub repository: Repository,
    /// The name exactly as the client sent it (for rewriting `Location`/`Link` headers back).
    /// It is a validated name, or the registry's configured prefix followed by one.
    pub client_name: String,
}

impl Routed {
    /// The name relative to the registry: what the client sent, without the registry's path
    /// prefix when it was routed by one. A data host (routed by Host) resolves this name to the
    /// same upstream repository, so data-endpoint redirects use it.
    pub fn name_at_registry(&self) -> &str {
        match (self.by, &self.registry.prefix) {
            (RoutedBy::Prefix, Some(prefix)) => {
                strip_prefix(&self.client_name, prefix).unwrap_or(&self.client_name)
            }
            _ => &self.client_name,
        }
    }
}

/// Lookup tables built once from the registries. Cheap to share behind an `Arc`; rebuild it on
/// config reload.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    by_ns: HashMap<String, Arc<Registry>>,
    by_host: HashMap<String, (Arc<Registry>, RoutedBy)>,
    /// `(prefix, registry)`, longest prefix first.
    prefixes: Vec<(String, Arc<Registry>)>,
    default: Option<Arc<Registry>>,
}

impl RouteTable {
    /// Builds the tables. Config validation rejects duplicate keys; should one slip through,
    /// the first registry in config order keeps it (and `hosts` beat `data_hosts`).
    pub fn new(registries: &[Arc<Registry>]) -> RouteTable {
        let mut table = RouteTable::default();
        for reg in registries {
            for ns in &reg.ns {
                table
                    .by_ns
                    .entry(ns.to_ascii_lowercase())
                    .or_insert_with(|| Arc::clone(reg));
            }
            table.add_hosts(reg, &reg.hosts, RoutedBy::Host);
            if let Some(prefix) = &reg.prefix {
                table.prefixes.push((prefix.clone(), Arc::clone(reg)));
            }
            if reg.default && table.default.is_none() {
                table.default = Some(Arc::clone(reg));
            }
        }
        // A second pass so that a name in one registry's `hosts` is never shadowed by another
        // registry's `data_hosts`.
        for reg in registries {
            table.add_hosts(reg, &reg.data_hosts, RoutedBy::DataHost);
        }
        // Longest prefix wins; the sort is stable, so equal lengths keep config order.
        table
            .prefixes
            .sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        table
    }

    fn add_hosts(&mut self, reg: &Arc<Registry>, hosts: &[String], by: RoutedBy) {
        for host in hosts {
            if let Some(key) = normalize_host(host) {
                self.by_host
                    .entry(key)
                    .or_insert_with(|| (Arc::clone(reg), by));
            }
        }
    }

    /// Routes a request for `name`.
    ///
    /// `host`: the Host header or `:authority` (any case, maybe a port, an IPv6 literal in
    /// brackets, a trailing dot). `ns`: the decoded `ns` query value, if present. `name`: the raw
    /// name from `oci::parse_path`.
    ///
    /// Errors: `NAME_UNKNOWN` (404) for an unknown `ns`, or when nothing routes the request;
    /// `NAME_INVALID` (400) when the resulting upstream name fails the grammar.
    pub fn resolve(
        &self,
        host: Option<&str>,
        ns: Option<&str>,
        name: &str,
    ) -> Result<Routed, OciError> {
        let (registry, by, upstream_name) = match self.by_ns_or_host(host, ns)? {
            Some((registry, by)) => (registry, by, name),
            None => self.by_prefix_or_default(host, name)?,
        };
        let repository = upstream_repository(&registry, upstream_name)?;
        Ok(Routed {
            registry,
            by,
            repository,
            client_name: name.to_owned(),
        })
    }

    /// For `/v2/` and `/v2/_catalog`, which carry no name: the registry by `ns`, then Host,
    /// then the default. `Ok(None)` when none matches (the caller answers `/v2/` anyway);
    /// an unknown `ns` is still `NAME_UNKNOWN`.
    pub fn registry_for(
        &self,
        host: Option<&str>,
        ns: Option<&str>,
    ) -> Result<Option<Arc<Registry>>, OciError> {
        let routed = self.by_ns_or_host(host, ns)?.map(|(registry, _)| registry);
        Ok(routed.or_else(|| self.default.clone()))
    }

    /// The first two rules: `ns` when present (and then nothing else), else the Host. A data
    /// host comes first: `?ns=` must not turn it into a registry host.
    fn by_ns_or_host(
        &self,
        host: Option<&str>,
        ns: Option<&str>,
    ) -> Result<Option<(Arc<Registry>, RoutedBy)>, OciError> {
        let by_host = host
            .and_then(normalize_host)
            .and_then(|key| self.by_host.get(&key))
            .map(|(registry, by)| (Arc::clone(registry), *by));
        if let Some((registry, RoutedBy::DataHost)) = by_host {
            return Ok(Some((registry, RoutedBy::DataHost)));
        }
        if let Some(ns) = ns {
            // Invariant 8: ns is a lookup key, never a dial target. An unknown value is an
            // error, not a new upstream, and it does not fall through to the other rules.
            return match self.by_ns.get(&ns.to_ascii_lowercase()) {
                Some(registry) => Ok(Some((Arc::clone(registry), RoutedBy::Ns))),
                None => Err(OciError::new(
                    ErrorCode::NameUnknown,
                    format!("namespace {} is not served here", echo(ns)),
                )),
            };
        }
        // Invariant 8: the Host is a lookup key too; an unknown Host falls through to the
        // prefix and default rules, it never names an upstream.
        Ok(by_host)
    }

    /// The last two rules: the longest configured prefix the name starts with (at a component
    /// boundary, with a non-empty remainder), else the default registry.
    fn by_prefix_or_default<'n>(
        &self,
        host: Option<&str>,
        name: &'n str,
    ) -> Result<(Arc<Registry>, RoutedBy, &'n str), OciError> {
        for (prefix, registry) in &self.prefixes {
            if let Some(rest) = strip_prefix(name, prefix) {
                return Ok((Arc::clone(registry), RoutedBy::Prefix, rest));
            }
        }
        match &self.default {
            Some(registry) => Ok((Arc::clone(registry), RoutedBy::Default, name)),
            None => Err(OciError::new(
                ErrorCode::NameUnknown,
                format!(
                    "no registry is served for host {} and name {}",
                    echo(host.unwrap_or("")),
                    echo(name)
                ),
            )),
        }
    }
}

/// `name` without `prefix/`, when it starts with the whole prefix followed by `/` and
/// something more.
fn strip_prefix<'n>(name: &'n str, prefix: &str) -> Option<&'n str> {
    let rest = name.strip_prefix(prefix)?.strip_prefix('/')?;
    (!rest.is_empty()).then_some(rest)
}

/// Invariant 2: the upstream name is validated before it is used; Docker Hub's `library/`
/// convention is applied only when the registry asks for it.
fn upstream_repository(registry: &Registry, name: &str) -> Result<Repository, OciError> {
    let repository = Repository::parse(name)?;
    if registry.library_namespace {
        repository.with_library_prefix()
    } else {
        Ok(repository)
    }
}

/// A Host header value as a table key: port stripped, brackets removed from an IPv6 literal,
/// lowercased, one trailing dot removed. `None` for an empty host. Nothing else is checked: a
/// value that is not a configured host simply finds nothing (closed world).
pub fn normalize_host(host: &str) -> Option<String> {
    let host = host.trim();
    let bare = if let Some(bracketed) = host.strip_prefix('[') {
        // `[v6]` or `[v6]:port`.
        let (inner, after) = bracketed.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        inner
    } else {
        match host.rsplit_once(':') {
            // Exactly one colon: `name:port`. More than one is a bare IPv6 literal.
            Some((name, port)) if !name.contains(':') && is_port(port) => name,
            _ => host,
        }
    };
    let bare = bare.strip_suffix('.').unwrap_or(bare);
    (!bare.is_empty()).then(|| bare.to_ascii_lowercase())
}

/// The port of a Host header value (`name:port`, `[v6]:port`), when it has one.
pub fn host_port(host: &str) -> Option<u16> {
    let host = host.trim();
    let port = if let Some(bracketed) = host.strip_prefix('[') {
        bracketed.split_once(']')?.1.strip_prefix(':')?
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if !name.contains(':') => port,
            _ => return None,
        }
    };
    if is_port(port) {
        port.parse().ok()
    } else {
        None
    }
}

/// 1 to 5 ASCII digits.
fn is_port(p: &str) -> bool {
    (1..=5).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests;
