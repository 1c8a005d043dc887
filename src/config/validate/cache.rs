//! `[cache]`: where the cache lives, its size limits and its timings (tag TTL, stale-if-error,
//! negative TTL, fill stall timeout). Every key has a default, so an empty `[cache]` is valid.

use std::time::Duration;

use super::values::{parse_size, GIB, KIB, MIB};
use super::{check_duration, Ctx};
use crate::config::file::{CacheFile, EncryptionFile, L2File, RawSize};
use crate::config::model::*;

const DEFAULT_MAX_SIZE: u64 = 20 * GIB;
const DEFAULT_TAG_TTL: Duration = Duration::from_secs(5 * 60);
const DEFAULT_STALE_IF_ERROR: Duration = Duration::from_secs(24 * 60 * 60);
const DEFAULT_FILL_STALL_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(15);
const DEFAULT_MAX_MANIFEST: u64 = 4 * MIB;
const DEFAULT_WARM_CONCURRENCY: usize = 2;
const MIN_MAX_MANIFEST: u64 = KIB;
const MAX_MAX_MANIFEST: u64 = 64 * MIB;

pub(super) fn check_cache(ctx: &mut Ctx<'_>, file: &CacheFile) -> Cache {
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
    let pinned_max_size =
        check_size(ctx, "cache.pinned_max_size", file.pinned_max_size.as_ref()).unwrap_or(0);
    let warm_concurrency = match file.warm_concurrency {
        None => DEFAULT_WARM_CONCURRENCY,
        Some(n @ 1..=64) => n as usize,
        Some(n) => {
            ctx.err(
                "cache.warm_concurrency",
                format!("must be between 1 and 64, got {n}"),
            );
            DEFAULT_WARM_CONCURRENCY
        }
    };
    let warm_bandwidth = file
        .warm_bandwidth
        .as_deref()
        .and_then(|raw| ctx.ok("cache.warm_bandwidth", parse_bandwidth(raw)));
    let encryption = file
        .encryption
        .as_ref()
        .and_then(|e| check_encryption(ctx, e));
    let l2 = file.l2.as_ref().and_then(|l2| check_l2(ctx, l2));
    Cache {
        dir,
        max_size,
        tag_ttl,
        stale_if_error,
        negative_ttl,
        max_manifest_size,
        fill_stall_timeout,
        pinned_max_size,
        warm_concurrency,
        warm_bandwidth,
        encryption,
        l2,
    }
}

/// `[cache.l2]`: `s3://bucket/prefix`, an optional endpoint (S3-compatible stores), and
/// either both credential keys or neither (then the usual AWS chain: environment, profile,
/// instance role).
fn check_l2(ctx: &mut Ctx<'_>, file: &L2File) -> Option<L2> {
    const P: &str = "cache.l2";
    let key = |k: &str| format!("{P}.{k}");
    let Some(raw) = file.url.as_deref().filter(|u| !u.is_empty()) else {
        ctx.err(key("url"), "is required: \"s3://bucket/prefix\"");
        return None;
    };
    let (bucket, prefix) = match url::Url::parse(raw) {
        Ok(u) if u.scheme() == "s3" => match u.host_str().filter(|h| !h.is_empty()) {
            Some(bucket) => (bucket.to_owned(), u.path().trim_matches('/').to_owned()),
            None => {
                ctx.err(key("url"), format!("names no bucket: {raw:?}"));
                return None;
            }
        },
        Ok(u) => {
            ctx.err(
                key("url"),
                format!(
                    "only s3:// (S3 and S3-compatible stores) is built, got {}://",
                    u.scheme()
                ),
            );
            return None;
        }
        Err(e) => {
            ctx.err(key("url"), format!("{e}: {raw:?}"));
            return None;
        }
    };
    let endpoint = file
        .endpoint
        .as_deref()
        .and_then(|e| match url::Url::parse(e) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Some(u),
            _ => {
                ctx.err(
                    key("endpoint"),
                    format!("must be an http(s) URL, got {e:?}"),
                );
                None
            }
        });
    let region = file
        .region
        .clone()
        .unwrap_or_else(|| "us-east-1".to_owned());
    let access_key_id_env = file.access_key_id_env.clone();
    let secret_access_key_file = file
        .secret_access_key_file
        .as_deref()
        .and_then(|f| ctx.existing_file(&key("secret_access_key_file"), f));
    if access_key_id_env.is_some() != file.secret_access_key_file.is_some() {
        ctx.err(
            key("access_key_id_env"),
            "set both access_key_id_env and secret_access_key_file, or neither",
        );
    }
    if let Some(var) = &access_key_id_env {
        if std::env::var_os(var).is_none_or(|v| v.is_empty()) {
            ctx.err(
                key("access_key_id_env"),
                format!("the environment variable {var} is not set"),
            );
        }
    }
    let ca = file
        .ca
        .as_deref()
        .and_then(|c| ctx.existing_file(&key("ca"), c));
    Some(L2 {
        bucket,
        prefix,
        endpoint,
        region,
        access_key_id_env,
        secret_access_key_file,
        ca,
    })
}

/// `"50MiB/s"` (or `"50MiB"`, per second implied) as bytes per second; at least 64 KiB/s, so a
/// typo cannot make warm jobs crawl for days.
fn parse_bandwidth(raw: &str) -> Result<u64, String> {
    let size = raw.trim().strip_suffix("/s").unwrap_or(raw.trim());
    let bytes = parse_size(size).map_err(|e| format!("{e} (a rate like \"50MiB/s\")"))?;
    if bytes < 64 * KIB {
        return Err(format!("must be at least 64KiB/s, got {bytes} bytes/s"));
    }
    Ok(bytes)
}

const DEFAULT_ROTATE: Duration = Duration::from_secs(24 * 60 * 60);
const DEFAULT_GRACE: Duration = Duration::from_secs(60 * 60);
const DEFAULT_CHECK: Duration = Duration::from_secs(30);
/// Revocation must be noticed within a minute.
const MAX_CHECK: Duration = Duration::from_secs(60);

/// `[cache.encryption]`: one provider and only its keys, durations in range.
fn check_encryption(ctx: &mut Ctx<'_>, file: &EncryptionFile) -> Option<Encryption> {
    const P: &str = "cache.encryption";
    let key = |k: &str| format!("{P}.{k}");
    let provider_name = match file.provider.as_deref() {
        Some(p) => p,
        None => {
            ctx.err(
                key("provider"),
                "is required: \"file\", \"transit\" or \"exec\"",
            );
            return None;
        }
    };
    let given = [
        ("key_file", file.key_file.is_some()),
        ("address", file.address.is_some()),
        ("key", file.key.is_some()),
        ("token_file", file.token_file.is_some()),
        ("ca", file.ca.is_some()),
        ("command", file.command.is_some()),
    ];
    let allowed: &[&str] = match provider_name {
        "file" => &["key_file"],
        "transit" => &["address", "key", "token_file", "ca"],
        "exec" => &["command"],
        other => {
            ctx.err(
                key("provider"),
                format!("must be \"file\", \"transit\" or \"exec\", got {other:?}"),
            );
            return None;
        }
    };
    for (name, set) in given {
        if set && !allowed.contains(&name) {
            ctx.err(
                key(name),
                format!("does not apply to provider = {provider_name:?}"),
            );
        }
    }
    let required = |ctx: &mut Ctx<'_>, name: &str, value: &Option<String>| -> Option<String> {
        match value.as_deref() {
            None | Some("") => {
                ctx.err(
                    key(name),
                    format!("is required with provider = {provider_name:?}"),
                );
                None
            }
            Some(v) => Some(v.to_owned()),
        }
    };
    let provider = match provider_name {
        "file" => {
            let raw = required(ctx, "key_file", &file.key_file)?;
            let path = ctx.existing_file(&key("key_file"), &raw)?;
            KeyProvider::File { key_file: path }
        }
        "transit" => {
            let address = required(ctx, "address", &file.address);
            let name = required(ctx, "key", &file.key);
            let token = required(ctx, "token_file", &file.token_file);
            let address = address.and_then(|a| match url::Url::parse(&a) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Some(u),
                _ => {
                    ctx.err(key("address"), format!("must be an http(s) URL, got {a:?}"));
                    None
                }
            });
            let name = name.and_then(|n| {
                let ok = n
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
                if ok {
                    Some(n)
                } else {
                    ctx.err(key("key"), format!("must be a Transit key name, got {n:?}"));
                    None
                }
            });
            let token_file = token.and_then(|t| ctx.existing_file(&key("token_file"), &t));
            let ca = match file.ca.as_deref() {
                Some(raw) => Some(ctx.existing_file(&key("ca"), raw)?),
                None => None,
            };
            KeyProvider::Transit {
                address: address?,
                key: name?,
                token_file: token_file?,
                ca,
            }
        }
        _ => {
            let command = file.command.clone().unwrap_or_default();
            if command.first().is_none_or(|c| c.is_empty()) {
                ctx.err(
                    key("command"),
                    "is required with provider = \"exec\": the helper and its arguments",
                );
                return None;
            }
            KeyProvider::Exec { command }
        }
    };
    let rotate =
        check_duration(ctx, &key("rotate"), file.rotate.as_deref()).unwrap_or(DEFAULT_ROTATE);
    if rotate < Duration::from_secs(1) {
        ctx.err(key("rotate"), "must be at least 1s");
    }
    let on_revoked = match file.on_revoked.as_deref() {
        None | Some("passthrough") => OnRevoked::Passthrough,
        Some("deny") => OnRevoked::Deny,
        Some(other) => {
            ctx.err(
                key("on_revoked"),
                format!("must be \"passthrough\" or \"deny\", got {other:?}"),
            );
            OnRevoked::Passthrough
        }
    };
    let unavailable_grace = check_duration(
        ctx,
        &key("unavailable_grace"),
        file.unavailable_grace.as_deref(),
    )
    .unwrap_or(DEFAULT_GRACE);
    let check_interval =
        check_duration(ctx, &key("check_interval"), file.check_interval.as_deref())
            .unwrap_or(DEFAULT_CHECK);
    if check_interval < Duration::from_millis(100) || check_interval > MAX_CHECK {
        ctx.err(
            key("check_interval"),
            format!(
                "must be between 100ms and 60s, got {}",
                humantime::format_duration(check_interval)
            ),
        );
    }
    Some(Encryption {
        provider,
        rotate,
        on_revoked,
        unavailable_grace,
        check_interval,
    })
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
