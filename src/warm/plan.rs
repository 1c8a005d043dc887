//! Pure planning of warm jobs: what an image name means (routed with the clients' own
//! [`RouteTable`]), which platforms of an index to take, and which blobs a manifest needs.
//! No I/O: the engine feeds it the bytes it fetched.

use std::time::Duration;

use serde_json::Value;

use crate::config::model::{Config, WarmEntry};
use crate::oci::{Digest, Reference, Repository, Tag};
use crate::route::{RouteTable, RoutedBy};

/// Operating systems and architectures an image index can name (the Go `GOOS`/`GOARCH`
/// values the OCI image spec refers to). A platform outside them can never match.
const OSES: &[&str] = &[
    "aix",
    "android",
    "darwin",
    "dragonfly",
    "freebsd",
    "illumos",
    "ios",
    "js",
    "linux",
    "netbsd",
    "openbsd",
    "plan9",
    "solaris",
    "wasip1",
    "windows",
];
const ARCHES: &[&str] = &[
    "386", "amd64", "arm", "arm64", "loong64", "mips", "mips64", "mips64le", "mipsle", "ppc64",
    "ppc64le", "riscv64", "s390x", "wasm",
];

/// `os/arch[/variant]`, as `--platform` takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub arch: String,
    pub variant: Option<String>,
}

impl Platform {
    /// Parses and checks that the platform could match an index entry.
    pub fn parse(raw: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = raw.split('/').collect();
        let (os, arch, variant) = match parts.as_slice() {
            [os, arch] => (*os, *arch, None),
            [os, arch, variant] => (*os, *arch, Some(*variant)),
            _ => {
                return Err(format!(
                    "{raw:?} is not os/arch or os/arch/variant (e.g. \"linux/amd64\")"
                ))
            }
        };
        if !OSES.contains(&os) {
            return Err(format!(
                "{raw:?} cannot match: unknown os {os:?} (lowercase, e.g. linux, windows)"
            ));
        }
        if !ARCHES.contains(&arch) {
            return Err(format!(
                "{raw:?} cannot match: unknown architecture {arch:?} (lowercase, e.g. amd64, arm64)"
            ));
        }
        if let Some(v) = variant {
            if v.is_empty()
                || !v
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            {
                return Err(format!(
                    "{raw:?} cannot match: bad variant {v:?} (e.g. v7, v8)"
                ));
            }
        }
        Ok(Platform {
            os: os.into(),
            arch: arch.into(),
            variant: variant.map(str::to_owned),
        })
    }

    /// Whether an index entry's `platform` object is this platform. Without a variant any
    /// variant matches; `arm64` without a variant is `arm64/v8`.
    pub fn matches(&self, platform: &Value) -> bool {
        let field = |name: &str| platform.get(name).and_then(Value::as_str);
        if field("os") != Some(self.os.as_str())
            || field("architecture") != Some(self.arch.as_str())
        {
            return false;
        }
        let Some(want) = &self.variant else {
            return true;
        };
        let have = field("variant").unwrap_or(if self.arch == "arm64" { "v8" } else { "" });
        have == want
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// How a warm job asks pullgate for an image: exactly what a client naming it would send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `warm[i]` or `images[i]`, for messages.
    pub key: String,
    pub image: String,
    pub registry: String,
    /// The `Host` header (Host and prefix forms); `None` for the ns form.
    pub host: Option<String>,
    /// `?ns=` (the ns form).
    pub ns: Option<String>,
    /// The name in `/v2/<name>/...`, as the client sends it (with a prefix, if routed by one).
    pub name: String,
    /// The upstream's name for it (for logs).
    pub repository: Repository,
    pub reference: Reference,
    pub platforms: Vec<Platform>,
    pub referrers: bool,
    pub refresh: Option<Duration>,
    pub pin: bool,
    pub account: Option<String>,
}

impl Target {
    /// What identifies a configured entry across reloads: an entry whose target did not
    /// change keeps its running refresh loop and its pins.
    pub fn identity(&self) -> String {
        let platforms: Vec<String> = self.platforms.iter().map(|p| p.to_string()).collect();
        format!(
            "{}\0{}\0{}\0{:?}\0{:?}\0{}\0{}",
            self.image,
            platforms.join(","),
            self.referrers,
            self.refresh,
            self.account,
            self.pin,
            self.registry
        )
    }
}

/// A `[key] message` problem of a warm entry or request.
pub type Problem = (String, String);

/// Resolves every `[[warm]]` entry of `config`; every problem names its key.
pub fn resolve_config(config: &Config) -> Result<Vec<Target>, Vec<Problem>> {
    let routes = RouteTable::new(&config.registries);
    let mut targets = Vec::new();
    let mut problems = Vec::new();
    for entry in &config.warm {
        match resolve_entry(&routes, entry) {
            Ok(t) => targets.push(t),
            Err(mut p) => problems.append(&mut p),
        }
    }
    if problems.is_empty() {
        Ok(targets)
    } else {
        Err(problems)
    }
}

/// One entry (or an admin request, which builds a `WarmEntry` keyed `images[i]`).
pub fn resolve_entry(routes: &RouteTable, entry: &WarmEntry) -> Result<Target, Vec<Problem>> {
    let mut problems = Vec::new();
    let key = &entry.key;
    let mut platforms = Vec::new();
    for (j, raw) in entry.platforms.iter().enumerate() {
        match Platform::parse(raw) {
            Ok(p) => platforms.push(p),
            Err(e) => problems.push((format!("{key}.platforms[{j}]"), e)),
        }
    }
    let image = match resolve_image(routes, &entry.image) {
        Ok(i) => Some(i),
        Err(e) => {
            problems.push((format!("{key}.image"), e));
            None
        }
    };
    if let (Some(image), Some(account)) = (&image, &entry.account) {
        if !image.scoped.iter().any(|s| s == account) {
            problems.push((
                format!("{key}.account"),
                format!(
                    "registry {} has no scoped_credentials named {account:?} (it has: {})",
                    image.registry,
                    if image.scoped.is_empty() {
                        "none".to_owned()
                    } else {
                        image.scoped.join(", ")
                    }
                ),
            ));
        }
    }
    match image {
        Some(image) if problems.is_empty() => Ok(Target {
            key: key.clone(),
            image: entry.image.clone(),
            registry: image.registry,
            host: image.host,
            ns: image.ns,
            name: image.name,
            repository: image.repository,
            reference: image.reference,
            platforms,
            referrers: entry.referrers,
            refresh: entry.refresh,
            pin: entry.pin,
            account: entry.account.clone(),
        }),
        _ => Err(problems),
    }
}

/// An image name, routed.
struct Image {
    registry: String,
    scoped: Vec<String>,
    host: Option<String>,
    ns: Option<String>,
    name: String,
    repository: Repository,
    reference: Reference,
}

/// `first/rest[:tag|@digest]`: `first` is a registry's Host (Host form), else an `ns` value
/// (containerd mirrors), else pullgate's own address followed by a prefix or a name for the
/// default registry: the three ways clients reach a registry through pullgate.
fn resolve_image(routes: &RouteTable, image: &str) -> Result<Image, String> {
    let (name_part, reference) = match image.rsplit_once('@') {
        Some((name, digest)) => (
            name,
            Reference::Digest(
                Digest::parse(digest)
                    .map_err(|e| format!("bad digest in {image:?}: {}", e.message))?,
            ),
        ),
        None => match image.rsplit_once(':') {
            Some((name, tag)) if !tag.contains('/') => (
                name,
                Reference::Tag(
                    Tag::parse(tag).map_err(|e| format!("bad tag in {image:?}: {}", e.message))?,
                ),
            ),
            _ => (
                image,
                Reference::Tag(Tag::parse("latest").expect("a valid tag")),
            ),
        },
    };
    let Some((first, rest)) = name_part.split_once('/') else {
        return Err(format!(
            "{image:?} names no host: write it as a client pulls it through pullgate, e.g. \"private.icr.io/team/app:1.4\""
        ));
    };
    let by_host = routes.resolve(Some(first), None, rest);
    let (routed, host, ns) = match &by_host {
        Ok(r) if r.by == RoutedBy::Host => (r.clone(), Some(first.to_owned()), None),
        Ok(r) if r.by == RoutedBy::DataHost => {
            return Err(format!(
            "{first:?} is a data host of registry {}: it serves blobs only; use one of its hosts",
            r.registry.name
        ))
        }
        _ => match routes.resolve(None, Some(first), rest) {
            Ok(r) => (r, None, Some(first.to_owned())),
            Err(_) => match by_host {
                Ok(r) => (r, Some(first.to_owned()), None),
                Err(e) => return Err(format!("{image:?} routes to no registry: {}", e.message)),
            },
        },
    };
    Ok(Image {
        registry: routed.registry.name.clone(),
        scoped: routed
            .registry
            .scoped_credentials
            .iter()
            .map(|s| s.name.clone())
            .collect(),
        host,
        ns,
        name: routed.client_name.clone(),
        repository: routed.repository.clone(),
        reference,
    })
}

/// A descriptor from a manifest or index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
}

fn descriptor(v: &Value) -> Option<Descriptor> {
    Some(Descriptor {
        media_type: v
            .get("mediaType")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned(),
        digest: Digest::parse(v.get("digest")?.as_str()?).ok()?,
        size: v.get("size").and_then(Value::as_u64).unwrap_or(0),
    })
}

/// Whether a manifest body is an index (OCI image index or Docker manifest list).
pub fn is_index(media_type: &str, body: &[u8]) -> bool {
    if crate::oci::media::is_index(media_type) {
        return true;
    }
    serde_json::from_slice::<Value>(body)
        .is_ok_and(|v| v.get("manifests").is_some_and(Value::is_array))
}

/// The child manifests of an index to fetch: every one when `platforms` is empty, else the
/// first entry matching each platform. A platform the index lacks is an error (nothing of it
/// could be warmed, which the operator needs to know).
pub fn select_manifests(index: &[u8], platforms: &[Platform]) -> Result<Vec<Descriptor>, String> {
    let doc: Value =
        serde_json::from_slice(index).map_err(|e| format!("index is not JSON: {e}"))?;
    let entries = doc
        .get("manifests")
        .and_then(Value::as_array)
        .ok_or("index has no manifests list")?;
    if platforms.is_empty() {
        return Ok(entries.iter().filter_map(descriptor).collect());
    }
    let mut out: Vec<Descriptor> = Vec::new();
    let mut missing = Vec::new();
    for p in platforms {
        let found = entries
            .iter()
            .find(|e| e.get("platform").is_some_and(|pl| p.matches(pl)));
        match found.and_then(descriptor) {
            Some(d) if !out.contains(&d) => out.push(d),
            Some(_) => {}
            None => missing.push(p.to_string()),
        }
    }
    if !missing.is_empty() {
        return Err(format!(
            "the index has no {} manifest",
            missing.join(" or ")
        ));
    }
    Ok(out)
}

/// The blobs an image manifest needs: its config, then its layers (foreign layers with
/// `urls` are skipped: registries do not serve them). A schema 1 manifest's `fsLayers` too.
pub fn blobs_of(manifest: &[u8]) -> Vec<Descriptor> {
    let Ok(doc) = serde_json::from_slice::<Value>(manifest) else {
        return Vec::new();
    };
    let mut out: Vec<Descriptor> = doc.get("config").and_then(descriptor).into_iter().collect();
    for item in doc
        .get("layers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if item
            .get("urls")
            .is_some_and(|u| u.as_array().is_some_and(|a| !a.is_empty()))
        {
            continue;
        }
        out.extend(descriptor(item));
    }
    for item in doc
        .get("fsLayers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(digest) = item
            .get("blobSum")
            .and_then(Value::as_str)
            .and_then(|d| Digest::parse(d).ok())
        {
            out.push(Descriptor {
                media_type: String::new(),
                digest,
                size: 0,
            });
        }
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|d| seen.insert(d.digest.clone()));
    out
}

/// The manifests listed by a referrers answer (an OCI index).
pub fn referrers_of(answer: &[u8]) -> Vec<Descriptor> {
    serde_json::from_slice::<Value>(answer)
        .ok()
        .and_then(|v| v.get("manifests").and_then(Value::as_array).cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(descriptor)
        .collect()
}

#[cfg(test)]
mod tests;
