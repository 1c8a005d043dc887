//! `[cache]`: where the cache lives, its size limits and its timings (tag TTL, stale-if-error,
//! negative TTL, fill stall timeout). Every key has a default, so an empty `[cache]` is valid.

use std::time::Duration;

use super::values::{parse_size, GIB, KIB, MIB};
use super::{check_duration, Ctx};
use crate::config::file::{CacheFile, RawSize};
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
    }
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

fn check_size(ctx: &mut Ctx<'_>, key: &str, raw: Option<&RawSize>) -> Option<u64> {
    match raw? {
        RawSize::Int(n) => ctx.ok(
            key,
            u64::try_from(*n).map_err(|_| format!("must not be negative, got {n}")),
        ),
        RawSize::Text(text) => ctx.ok(key, parse_size(text)),
    }
}
