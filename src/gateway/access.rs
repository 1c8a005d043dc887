//! The policy box of DESIGN.md at the edge: gather the facts of a request from the `Session`
//! (peer address, forwarding headers, `Authorization`, client certificate), ask
//! [`policy::decide`], and turn a denial into an OCI error before anything touches the upstream
//! or the cache (invariant 6). The decision is kept in the context for the access line, the
//! audit line and the denial metric.

use std::net::IpAddr;

use http::{header, HeaderName, Method};
use pingora::proxy::Session;

use super::{Gateway, RequestCtx};
use crate::config::Registry;
use crate::oci::{Endpoint, ErrorCode, OciError, Repository};
use crate::policy::{self, Action, Decision};

/// The action a method asks for on an endpoint: DELETE of a manifest, tag or blob is a
/// delete; cancelling an upload (DELETE of an upload session) is part of a push.
pub fn action_of(method: &Method, endpoint: &Endpoint) -> Action {
    match (method, endpoint) {
        (&Method::GET | &Method::HEAD, _) => Action::Pull,
        (&Method::DELETE, Endpoint::Manifest(_) | Endpoint::Blob(_)) => Action::Delete,
        _ => Action::Push,
    }
}

/// `/v2/` with no registry to decide for (prefix routing names none): only checks presented
/// credentials, so `docker login` learns whether they are right.
pub fn check_credentials(
    gw: &Gateway,
    session: &Session,
    ctx: &mut RequestCtx,
) -> Result<(), OciError> {
    let authorization = session
        .req_header()
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let subjects: Vec<&str> = ctx.tls_subjects.iter().map(String::as_str).collect();
    match gw.policy.authenticate(authorization, &subjects) {
        policy::Authn::BadCredentials(failure) => {
            ctx.decision = "deny";
            ctx.reason = Some("bad_credentials");
            Err(OciError::new(ErrorCode::Unauthorized, failure.public_message()).with_status(401))
        }
        authn => {
            ctx.identity = authn.identity().map(str::to_owned);
            Ok(())
        }
    }
}

/// The client address policy sees: the peer, or the forwarded address behind a trusted proxy.
pub fn client_address(gw: &Gateway, session: &Session) -> IpAddr {
    static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
    let req = session.req_header();
    let values = |name: &HeaderName| -> Vec<&str> {
        req.headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect()
    };
    let peer = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip())
        .unwrap_or(IpAddr::from([0, 0, 0, 0]));
    gw.policy
        .client_addr(peer, &values(&X_FORWARDED_FOR), &values(&header::FORWARDED))
}

/// The source address and the authentication of a request.
fn caller(gw: &Gateway, session: &Session, ctx: &RequestCtx) -> (IpAddr, policy::Authn) {
    let req = session.req_header();
    let source = client_address(gw, session);
    let authorization = req
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let subjects: Vec<&str> = ctx.tls_subjects.iter().map(String::as_str).collect();
    (source, gw.policy.authenticate(authorization, &subjects))
}

/// Whether the caller may do `action` on another repository (a mount's source), without
/// recording anything.
pub fn allows(
    gw: &Gateway,
    session: &Session,
    ctx: &RequestCtx,
    registry: &Registry,
    repository: &Repository,
    action: Action,
) -> bool {
    let (source, authn) = caller(gw, session, ctx);
    let facts = gw
        .policy
        .facts(registry, source, &authn, Some(repository), action);
    policy::decide(&facts).is_allow()
}

/// Decides whether the request may proceed; a denial comes back as the OCI error to send.
/// Allowed: the name of the scoped credentials the request uses, `None` for the registry's own
/// (see [`policy::scoped_credentials`]).
pub fn check(
    gw: &Gateway,
    session: &Session,
    ctx: &mut RequestCtx,
    registry: &Registry,
    repository: Option<&Repository>,
    action: Action,
) -> Result<Option<String>, OciError> {
    let (source, authn) = caller(gw, session, ctx);
    let facts = gw
        .policy
        .facts(registry, source, &authn, repository, action);
    ctx.client = Some(source);
    ctx.zone = facts.zones.best().map(str::to_owned);
    ctx.identity = authn.identity().map(str::to_owned);
    ctx.action = action.label();
    if ctx.warm.is_some() && matches!(action, Action::Pull) {
        ctx.action = "warm";
    }
    let decision = match &ctx.warm {
        // This process's warm engine acts for the operator's own config: the rules about who
        // connects from where do not concern it; the repository rules do.
        Some(_) if matches!(action, Action::Pull) => match repository {
            Some(repository) => policy::repository_rules(registry, repository),
            None => Decision::Allow,
        },
        _ => policy::decide(&facts),
    };
    if let (Some(warm), Decision::Allow) = (ctx.warm.clone(), &decision) {
        if matches!(action, Action::Pull) {
            return warm_allowed(gw, ctx, registry, warm.account);
        }
    }
    match decision {
        Decision::Allow => {
            ctx.decision = "allow";
            ctx.could_log_in =
                matches!(authn, policy::Authn::Anonymous) && facts.identities.password;
            let scoped =
                policy::scoped_credentials(registry, &facts.zones, authn.identity(), repository);
            ctx.credential = match scoped {
                Some(s) => Some(format!(
                    "registry.{}.scoped_credentials.{}",
                    registry.name, s.name
                )),
                None => registry
                    .credentials
                    .as_ref()
                    .map(|_| format!("registry.{}.credentials", registry.name)),
            };
            Ok(scoped.map(|s| s.name.clone()))
        }
        Decision::Deny(reason) => {
            ctx.decision = "deny";
            ctx.reason = Some(reason.label());
            gw.metrics
                .denials
                .with_label_values(&[registry.name.as_str(), reason.label()])
                .inc();
            Err(OciError::new(reason.error_code(), reason.message()).with_status(reason.status()))
        }
    }
}

/// A warm request of this process's engine, allowed by the repository rules: audited as
/// `warm`, with the account its entry named rather than one chosen by the caller's facts.
fn warm_allowed(
    gw: &Gateway,
    ctx: &mut RequestCtx,
    registry: &Registry,
    account: Option<String>,
) -> Result<Option<String>, OciError> {
    ctx.action = "warm";
    ctx.identity = None;
    ctx.zone = None;
    if let Some(name) = &account {
        if !registry.scoped_credentials.iter().any(|s| &s.name == name) {
            ctx.decision = "deny";
            ctx.reason = Some("unknown_account");
            gw.metrics
                .denials
                .with_label_values(&[registry.name.as_str(), "unknown_account"])
                .inc();
            return Err(OciError::new(
                ErrorCode::Denied,
                format!(
                    "warm: registry {} has no scoped_credentials named {}",
                    registry.name,
                    crate::oci::echo(name)
                ),
            ));
        }
    }
    ctx.decision = "allow";
    ctx.credential = credential_name(registry, account.as_deref());
    Ok(account)
}

/// The config key of the upstream credentials a request uses (for the audit line: the name,
/// never the value): `account`'s scoped credentials, else the registry's own, if it has any.
pub(super) fn credential_name(registry: &Registry, account: Option<&str>) -> Option<String> {
    match account {
        Some(name) => Some(format!(
            "registry.{}.scoped_credentials.{name}",
            registry.name
        )),
        None => registry
            .credentials
            .as_ref()
            .map(|_| format!("registry.{}.credentials", registry.name)),
    }
}
