//! `[[warm]]`: each entry's own values (an image is given, `refresh` is a sane duration,
//! `pin` has a budget to live in). Which registry an image routes to, whether its reference
//! parses, whether a platform can match and whether `account` names one of that registry's
//! scoped credentials are checked by `warm::plan::resolve`, with the routing code clients go
//! through (`config/` does not depend on `route/`); `pullgate check` and every reload run both.

use std::time::Duration;

use super::{check_duration, Ctx};
use crate::config::file::WarmFile;
use crate::config::model::{Cache, WarmEntry};

/// A refresh is a HEAD per tag and hits for the rest; below a second it is a typo.
const MIN_REFRESH: Duration = Duration::from_secs(1);

pub(super) fn check_warm(ctx: &mut Ctx<'_>, entries: &[WarmFile], cache: &Cache) -> Vec<WarmEntry> {
    let mut out = Vec::new();
    for (i, file) in entries.iter().enumerate() {
        let key = format!("warm[{i}]");
        let image = match file.image.as_deref().map(str::trim) {
            Some(image) if !image.is_empty() => image.to_owned(),
            _ => {
                ctx.err(
                    format!("{key}.image"),
                    "missing: the image as a client names it through pullgate, e.g. \"private.icr.io/team/app:1.4\"",
                );
                continue;
            }
        };
        let refresh = check_duration(ctx, &format!("{key}.refresh"), file.refresh.as_deref());
        if let Some(r) = refresh.filter(|r| *r < MIN_REFRESH) {
            ctx.err(
                format!("{key}.refresh"),
                format!("must be at least 1s, got {}", humantime::format_duration(r)),
            );
        }
        if file.pin && cache.pinned_max_size == 0 {
            ctx.err(
                "cache.pinned_max_size",
                format!("{key} has pin = true: set a budget for pinned content, e.g. \"10GiB\""),
            );
        }
        out.push(WarmEntry {
            key,
            image,
            platforms: file.platforms.iter().map(|p| p.trim().to_owned()).collect(),
            referrers: file.referrers,
            refresh,
            pin: file.pin,
            account: file.account.clone(),
        });
    }
    out
}
