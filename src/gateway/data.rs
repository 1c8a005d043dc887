//! Data endpoints (issue 4, Azure's dedicated data endpoints): a registry's `data_hosts` answer
//! blob GET and HEAD only, and only for URLs a registry host signed; with
//! `redirect = "data-endpoint"` a registry host answers a blob GET it allowed with a 307 to a
//! data host carrying that signature (`sign.rs`).
//!
//! On a data host the signature stands in for policy: the client that follows a redirect sends
//! no credentials. Invariant 6 holds here as for policy: a request without a valid signature is
//! refused with `DENIED`, an audit line and a denial metric, before anything touches the
//! upstream or the cache. A valid one leads into the same blob path as a registry host (store
//! hits, single-flight fills, Range, the cross-repository rule), with the upstream account the
//! registry host chose.

use std::time::SystemTime;

use bytes::Bytes;
use http::{header, Method};
use pingora::proxy::Session;

use super::job::{partition, Failure};
use super::{access, respond, Gateway, RequestCtx};
use crate::oci::{Digest, Endpoint, ErrorCode, OciError};
use crate::route::{self, Routed};
use crate::sign::{self, Grant, Presented, SignatureError};

/// Admits a request routed to a data host. `Ok`: the cache partition (upstream account) the
/// signature grants. Refuses, before any upstream or cache work, everything but a blob
/// GET/HEAD with a valid signature.
pub fn admit(
    gw: &Gateway,
    session: &Session,
    ctx: &mut RequestCtx,
    routed: &Routed,
    endpoint: &Endpoint,
) -> Result<String, OciError> {
    let req = session.req_header();
    let method = &req.method;
    let query = req.uri.query();
    let registry = &routed.registry;
    let data_host = super::request_host(req)
        .and_then(route::normalize_host)
        .unwrap_or_else(|| "this host".to_owned());
    let registry_host = registry
        .hosts
        .first()
        .cloned()
        .unwrap_or_else(|| format!("a host of registry {:?}", registry.name));
    ctx.client = Some(access::client_address(gw, session));
    let digest = match endpoint {
        Endpoint::Blob(digest) if matches!(*method, Method::GET | Method::HEAD) => digest,
        _ => {
            return Err(OciError::new(
                ErrorCode::Unsupported,
                format!(
                    "{data_host} is a data endpoint of registry {:?}: it serves blobs only \
                     (GET and HEAD of /v2/<name>/blobs/<digest>); use {registry_host} for \
                     manifests, tags, referrers and pushes",
                    registry.name
                ),
            ))
        }
    };
    let deny = |ctx: &mut RequestCtx, why: SignatureError| {
        ctx.decision = "deny";
        ctx.reason = Some(why.label());
        gw.metrics
            .denials
            .with_label_values(&[registry.name.as_str(), why.label()])
            .inc();
        OciError::new(ErrorCode::Denied, why.message(&data_host, &registry_host))
    };
    let Some(key) = &gw.redirect_key else {
        return Err(deny(ctx, SignatureError::Invalid));
    };
    let grant = Presented::from_query(query.unwrap_or("")).and_then(|presented| {
        key.verify(
            &presented,
            &registry.name,
            routed.repository.as_str(),
            &digest.to_string(),
            SystemTime::now(),
        )
    });
    let grant = match grant {
        Ok(grant) => grant,
        Err(why) => return Err(deny(ctx, why)),
    };
    let partition = partition(&registry.name, grant.account.as_deref());
    if gw.upstream(&partition).is_none() {
        // Signed with this key, but for scoped credentials this config no longer has.
        return Err(deny(ctx, SignatureError::Invalid));
    }
    ctx.decision = "allow";
    ctx.credential = super::access::credential_name(registry, grant.account.as_deref());
    Ok(partition)
}

/// Answers an allowed blob GET on a registry host with a 307 to the registry's first data host:
/// the scheme and port the client used, the name relative to the registry, and a signature bound
/// to the registry, the upstream account (`scoped`), the repository, the digest and an expiry
/// `server.redirect_ttl` from now.
pub async fn redirect(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut RequestCtx,
    routed: &Routed,
    scoped: Option<&str>,
    digest: &Digest,
    host: Option<&str>,
) -> Result<(), Failure> {
    let registry = &routed.registry;
    let (Some(key), Some(data_host)) = (&gw.redirect_key, registry.data_hosts.first()) else {
        // Config validation requires data_hosts for "data-endpoint", and the key is loaded
        // whenever a registry has data hosts.
        return Err(OciError::new(
            ErrorCode::Unavailable,
            format!(
                "registry {:?} redirects to a data endpoint but has none configured",
                registry.name
            ),
        )
        .with_status(500)
        .into());
    };
    let grant = Grant {
        registry: registry.name.clone(),
        account: scoped.map(str::to_owned),
        repository: routed.repository.as_str().to_owned(),
        digest: digest.to_string(),
        expires: sign::expiry(SystemTime::now(), gw.config.server.redirect_ttl),
    };
    let location = location(
        super::is_tls(session),
        data_host,
        host.and_then(route::host_port),
        routed.name_at_registry(),
        digest,
        &key.signed_query(&grant),
    );
    ctx.cache = "redirect";
    let mut resp = respond::head(307, ctx)?;
    resp.insert_header(header::LOCATION, location)?;
    // A signed URL is for this client, now: no shared cache keeps it.
    resp.insert_header(header::CACHE_CONTROL, "no-store")?;
    resp.insert_header("Docker-Content-Digest", digest.to_string())?;
    respond::write_body(session, ctx, resp, Bytes::new()).await?;
    Ok(())
}

/// `<scheme>://<data host>[:port]/v2/<name>/blobs/<digest>?<signed query>`.
fn location(
    tls: bool,
    data_host: &str,
    port: Option<u16>,
    name: &str,
    digest: &Digest,
    signed_query: &str,
) -> String {
    let scheme = if tls { "https" } else { "http" };
    let host = if data_host.contains(':') {
        format!("[{data_host}]")
    } else {
        data_host.to_owned()
    };
    let port = port.map(|p| format!(":{p}")).unwrap_or_default();
    format!("{scheme}://{host}{port}/v2/{name}/blobs/{digest}?{signed_query}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_keep_scheme_and_port_and_bracket_v6() {
        let digest = Digest::parse(
            "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae",
        )
        .expect("digest");
        assert_eq!(
            location(true, "data.test", Some(8443), "team/app", &digest, "q=1"),
            format!("https://data.test:8443/v2/team/app/blobs/{digest}?q=1")
        );
        assert_eq!(
            location(false, "fd00::5", None, "a", &digest, "q"),
            format!("http://[fd00::5]/v2/a/blobs/{digest}?q")
        );
    }
}
