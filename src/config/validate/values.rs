//! Value parsers: pure, each returns the problem as a sentence. No key, no context: the
//! section modules put the key on it, and the tests call them directly.
//!
//! Paths, socket addresses, CIDRs, sizes, durations, upstream URLs, host names, `ns` values,
//! prefixes, repository globs and the name rules of registries and zones.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use crate::config::model::Upstream;

pub(super) const KIB: u64 = 1024;
pub(super) const MIB: u64 = 1024 * KIB;
pub(super) const GIB: u64 = 1024 * MIB;

/// `~/x` is under the home directory; a relative path is against `base` (the config's dir).
pub(in crate::config) fn resolve_path(raw: &str, base: &Path) -> PathBuf {
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

pub(super) fn check_file_exists(path: &Path) -> Result<(), String> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Err(format!("{} is a directory, not a file", path.display())),
        Ok(_) => Ok(()),
        Err(err) => Err(format!(
            "file {} does not exist or cannot be read: {err}",
            path.display()
        )),
    }
}

pub(in crate::config) fn parse_socket_addr(raw: &str) -> Result<SocketAddr, String> {
    raw.trim().parse().map_err(|_| {
        format!("invalid address {raw:?}: expected \"ip:port\", e.g. \"127.0.0.1:5000\" or \"[::1]:5000\"")
    })
}

/// A CIDR, or a bare address meaning just that address.
pub(in crate::config) fn parse_net(raw: &str) -> Result<IpNet, String> {
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
pub(in crate::config) fn parse_size(raw: &str) -> Result<u64, String> {
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
pub(in crate::config) fn parse_duration(raw: &str) -> Result<Duration, String> {
    humantime::parse_duration(raw.trim())
        .map_err(|err| format!("invalid duration {raw:?}: {err} (e.g. \"90s\", \"10m\", \"24h\")"))
}

/// An upstream origin: http(s), a host, no userinfo, query, fragment or path.
pub(in crate::config) fn parse_upstream(raw: &str) -> Result<Upstream, String> {
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
pub(in crate::config) fn parse_host(raw: &str) -> Result<String, String> {
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
pub(in crate::config) fn parse_ns(raw: &str) -> Result<String, String> {
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
pub(in crate::config) fn parse_prefix(raw: &str) -> Result<String, String> {
    if !raw.is_empty() && raw.split('/').all(is_name_component) {
        Ok(raw.to_owned())
    } else {
        Err(format!(
            "invalid prefix {raw:?}: '/'-separated components of a-z, 0-9 and single '.', '_', \"__\" or '-' runs between them, no leading or trailing '/'"
        ))
    }
}

/// The OCI name component grammar: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
pub(in crate::config) fn is_name_component(s: &str) -> bool {
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
pub(in crate::config) fn parse_glob(raw: &str) -> Result<String, String> {
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

pub(super) fn parse_sha256_hex(raw: &str) -> Result<[u8; 32], String> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(raw.trim(), &mut out)
        .map_err(|_| "must be 64 hex digits (the SHA-256 of the password)".to_owned())?;
    Ok(out)
}

pub(super) fn is_registry_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    first_ok && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-".contains(&b))
}

pub(super) fn is_zone_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-".contains(&b))
}
