//! How an upstream's refusal reaches the client: as pullgate's own OCI error, never as the
//! upstream's.
//!
//! An upstream 401 or 403 carries the upstream's `WWW-Authenticate` (naming its token realm)
//! and an error body of its own. Handed on, it sends the client to a realm it cannot reach and
//! must never need (the credentials are pullgate's). So on every path (pulls through the
//! upstream client, the push proxy path, deletes, tags, referrers) the refusal becomes
//! `DENIED` naming the registry, or `UNAUTHORIZED` with pullgate's own Basic challenge when the
//! caller is anonymous and could log in to pullgate (which may pick other upstream
//! credentials). The upstream's message is not repeated: only its error code, from the OCI
//! table, goes into ours.

use super::RequestCtx;
use crate::oci::{ErrorCode, OciError};

/// The error for an upstream 401/403. `upstream_code` is the first code of its error body,
/// kept only when it is one of the OCI table's.
pub fn upstream_denied(registry: &str, status: u16, upstream_code: Option<&str>) -> OciError {
    let code = upstream_code
        .and_then(ErrorCode::parse)
        .map(|c| format!(" {}", c.as_str()))
        .unwrap_or_default();
    OciError::new(
        ErrorCode::Denied,
        format!(
            "upstream registry {registry:?} denied access ({status}{code}) to the credentials \
             pullgate uses for it"
        ),
    )
}

/// The error as this caller should see it: an upstream refusal (a `DENIED` after policy
/// allowed the request) becomes `UNAUTHORIZED` with pullgate's Basic challenge when the
/// caller is anonymous and password identities exist. `None`: send `error` as it is.
pub fn for_caller(error: &OciError, ctx: &RequestCtx) -> Option<OciError> {
    if error.code != ErrorCode::Denied || ctx.decision != "allow" || !ctx.could_log_in {
        return None;
    }
    Some(
        OciError::new(
            ErrorCode::Unauthorized,
            format!(
                "{}; log in to pullgate (docker login) to be served with your identity's access",
                error.message
            ),
        )
        .with_status(401),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_refusals_name_the_registry_and_nothing_of_the_upstream() {
        let e = upstream_denied("hub", 401, Some("UNAUTHORIZED"));
        assert_eq!((e.code, e.status), (ErrorCode::Denied, 403));
        assert_eq!(
            e.message,
            "upstream registry \"hub\" denied access (401 UNAUTHORIZED) to the credentials pullgate uses for it"
        );
        let odd = upstream_denied("hub", 403, Some("realm=https://auth.example/token"));
        assert!(!odd.message.contains("auth.example"), "{}", odd.message);
    }

    #[test]
    fn anonymous_callers_who_could_log_in_are_challenged() {
        let (_dir, gw) = crate::gateway::tests::snapshot();
        let mut ctx = RequestCtx::new(crate::gateway::ctx::RequestId::new(1), gw);
        let denied = upstream_denied("hub", 403, None);
        assert!(for_caller(&denied, &ctx).is_none(), "policy never allowed");
        ctx.decision = "allow";
        assert!(for_caller(&denied, &ctx).is_none(), "cannot log in");
        ctx.could_log_in = true;
        let challenged = for_caller(&denied, &ctx).unwrap();
        assert_eq!(
            (challenged.code, challenged.status),
            (ErrorCode::Unauthorized, 401)
        );
        let other = OciError::from_code(ErrorCode::ManifestUnknown);
        assert!(for_caller(&other, &ctx).is_none());
    }
}
