//! `pullgate client-config`: the client side of a gateway, written from its config.
//!
//! Owns the translation from the validated config (registries with `ns`, `prefix`, `default`;
//! the listeners) into the files container runtimes read: containerd `hosts.toml` trees, docker's
//! `daemon.json` keys and podman/CRI-O `registries.conf`. Each runtime reaches pullgate by a
//! different routing rule (DESIGN.md "Routing"), and this module is where that knowledge lives:
//!
//! - containerd adds `?ns=<registry host>` to every request it sends to a mirror, and `ns` wins
//!   over every other rule (an unknown value is `NAME_UNKNOWN`, and the name is not
//!   prefix-stripped). So a registry is mirrored for containerd only by its `ns` values: one
//!   `<ns>/hosts.toml` each, plus `_default`. A registry without `ns` is reached by its own
//!   `hosts` names instead (the private endpoint: the image's host *is* the gateway, no `ns`).
//! - docker uses `registry-mirrors` for docker.io only, with no path: requests arrive as bare
//!   `/v2/<name>/...` and are served by the `default` registry, which must therefore be Docker Hub.
//! - podman/CRI-O send no `ns`; a mirror `location` may carry a path, so each registry is reached
//!   by its `prefix` (or, for the default registry, by no path at all).
//!
//! Plain Rust: no Pingora, no I/O. The caller (main.rs) writes or prints [`Output::files`] and
//! prints [`Output::notes`] on stderr. Must never emit `skip_verify` or `insecure` for a TLS
//! endpoint: a client that does not verify the gateway can be handed any image.

mod containerd;
mod docker;
mod podman;

#[cfg(test)]
mod tests;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use crate::config::model::{Config, Registry, Server};

pub use containerd::DIAL_TIMEOUT;

/// The container runtimes `client-config` writes for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    Containerd,
    Docker,
    Podman,
}

/// What the user asked for besides the config.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The URL clients reach the gateway at; `None`: from the first listener.
    pub endpoint: Option<String>,
    /// CA file that signed the gateway's certificate (TLS endpoints), as clients will read it.
    pub ca: Option<PathBuf>,
}

/// One file to write, relative to the output directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    pub path: PathBuf,
    pub contents: String,
}

/// The files for one client, and what the user should know about them (for stderr).
#[derive(Debug, Clone, Default)]
pub struct Output {
    pub files: Vec<File>,
    pub notes: Vec<String>,
}

/// Why nothing useful can be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// `--endpoint` is not a URL a registry client can use.
    Endpoint(String),
    /// The config or endpoint cannot serve this client at all.
    Unsupported(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Endpoint(m) => write!(f, "--endpoint: {m}"),
            Error::Unsupported(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

/// The gateway as clients reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub https: bool,
    /// `host[:port]` as clients name it (IPv6 in brackets; the port left out when it is the
    /// scheme's default and the user left it out).
    pub authority: String,
    /// A path in front of `/v2` (a gateway published under a path by a reverse proxy); empty or
    /// `/a/b` without a trailing `/`.
    pub path: String,
}

impl Endpoint {
    /// Parses a user-given URL: `http(s)://host[:port][/path]`, nothing else.
    pub fn parse(url: &str) -> Result<Endpoint, Error> {
        let bad = |m: &str| Error::Endpoint(format!("{url:?}: {m}"));
        let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
        let https = match parsed.scheme() {
            "https" => true,
            "http" => false,
            other => return Err(bad(&format!("scheme {other} (use http or https)"))),
        };
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(bad("user info is not allowed"));
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(bad("a query or fragment is not allowed"));
        }
        let host = parsed.host_str().ok_or_else(|| bad("no host"))?;
        let authority = match parsed.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        let path = parsed.path().trim_end_matches('/');
        if path.ends_with("/v2") || path == "/v2" {
            return Err(bad("give the URL without /v2 (the clients add it)"));
        }
        Ok(Endpoint {
            https,
            authority,
            path: path.to_owned(),
        })
    }

    /// From the first plain listener, else the first TLS listener (https). An unspecified
    /// address (`0.0.0.0`, `::`) becomes loopback, with a note saying so.
    pub fn from_listeners(server: &Server, notes: &mut Vec<String>) -> Result<Endpoint, Error> {
        let (addr, https) = match (server.listen.first(), server.tls.first()) {
            (Some(addr), _) => (*addr, false),
            (None, Some(tls)) => (tls.listen, true),
            (None, None) => {
                return Err(Error::Unsupported(
                    "the config has no listener; pass --endpoint".into(),
                ))
            }
        };
        let mut addr = addr;
        if addr.ip().is_unspecified() {
            let loopback = match addr.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            };
            notes.push(format!(
                "the first listener binds {addr}, so the endpoint is {}; pass --endpoint with \
                 the name clients on other machines use",
                SocketAddr::new(loopback, addr.port())
            ));
            addr.set_ip(loopback);
        }
        let scheme = if https { "https" } else { "http" };
        Endpoint::parse(&format!("{scheme}://{addr}"))
    }

    /// `http(s)://authority/path`, without a trailing `/`.
    pub fn url(&self) -> String {
        format!("{}://{}{}", self.scheme(), self.authority, self.path)
    }

    /// `:port` when the authority carries one, else empty.
    fn port_suffix(&self) -> String {
        match self.authority.rsplit_once(':') {
            Some((host, port)) if !port.contains(']') && !host.is_empty() => format!(":{port}"),
            _ => String::new(),
        }
    }

    fn scheme(&self) -> &'static str {
        if self.https {
            "https"
        } else {
            "http"
        }
    }
}

/// Writes the files `client` needs to pull through the gateway `config` describes.
pub fn generate(client: Client, config: &Config, options: &Options) -> Result<Output, Error> {
    let mut notes = Vec::new();
    let endpoint = match &options.endpoint {
        Some(url) => Endpoint::parse(url)?,
        None => Endpoint::from_listeners(&config.server, &mut notes)?,
    };
    if endpoint.https && options.ca.is_none() {
        notes.push(format!(
            "{} is TLS and no --ca was given: clients must already trust the gateway's \
             certificate (system trust store)",
            endpoint.url()
        ));
    }
    if endpoint.authority.starts_with('[') && client != Client::Containerd {
        notes.push(format!(
            "{} is an IPv6 literal, which docker and podman refuse as a registry name; pass \
             --endpoint with a host name or an IPv4 address",
            endpoint.url()
        ));
    }
    let ca = options.ca.as_ref().map(|p| p.display().to_string());
    let ctx = Context {
        endpoint: &endpoint,
        ca: ca.as_deref(),
        registries: config.registries.iter().map(|r| r.as_ref()).collect(),
    };
    let mut output = match client {
        Client::Containerd => containerd::generate(&ctx)?,
        Client::Docker => docker::generate(&ctx)?,
        Client::Podman => podman::generate(&ctx)?,
    };
    notes.append(&mut output.notes);
    output.notes = notes;
    Ok(output)
}

/// What every generator reads.
struct Context<'a> {
    endpoint: &'a Endpoint,
    ca: Option<&'a str>,
    registries: Vec<&'a Registry>,
}

/// Docker Hub's registry API host names; clients call the registry `docker.io`.
const DOCKER_HUB_HOSTS: [&str; 3] = ["registry-1.docker.io", "index.docker.io", "docker.io"];

/// Whether the registry is a Docker Hub mirror: its upstream is Docker Hub, or it answers
/// containerd's `ns=docker.io`.
fn is_docker_hub(registry: &Registry) -> bool {
    DOCKER_HUB_HOSTS.contains(&registry.upstream.host.as_str())
        || registry.ns.iter().any(|ns| ns == "docker.io")
}

/// The registry host names clients write in image references for this registry: its `ns`
/// values, else its upstream (Docker Hub's API host is `docker.io` to clients; a default port
/// is left out).
fn client_names(registry: &Registry) -> Vec<String> {
    if !registry.ns.is_empty() {
        return registry.ns.clone();
    }
    let up = &registry.upstream;
    if DOCKER_HUB_HOSTS.contains(&up.host.as_str()) {
        return vec!["docker.io".into()];
    }
    let host = if up.host.contains(':') {
        format!("[{}]", up.host)
    } else {
        up.host.clone()
    };
    let default_port = if up.https { 443 } else { 80 };
    if up.port == default_port {
        vec![host]
    } else {
        vec![format!("{host}:{}", up.port)]
    }
}

/// A TOML basic string with every needed escape (quotes, backslashes, control characters).
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}
