//! Who may pull what from where (DESIGN.md "policy" box, issue 5): source address -> zones,
//! credentials -> identity, registry rules -> [`Decision::Allow`] or [`Decision::Deny`].
//!
//! Owns: the access rules. Depends only on `oci` and the validated config model (dependency
//! rule in `lib.rs`); no Pingora, no HTTP types, no I/O except reading an identity's
//! `password_file`. The gateway gathers [`Facts`] (through [`Policy`]), calls [`decide`], and
//! turns a denial into an OCI error (invariant 6: a denied request touches neither the upstream
//! nor the cache), a metric labelled with [`Reason::label`], and an audit line.
//!
//! - [`zone`]: `ZoneTable`, source IP -> zones by longest-prefix match.
//! - [`source`]: `TrustedProxies`, the client address behind trusted proxies.
//! - [`proxy_header`]: the PROXY protocol v1/v2 header an L4 proxy writes before TLS.
//! - [`identity`]: `Authenticator`, Basic and mTLS credentials -> [`Authn`].
//! - [`glob`]: repository globs.
//! - `rules`: [`decide`], the rules themselves, and [`Reason`].
//!
//! [`Policy`] holds the three tables built from one [`Config`]; build a new one on reload.

pub mod glob;
pub mod identity;
pub mod proxy_header;
pub mod source;
pub mod zone;

mod rules;

use std::net::IpAddr;

use ipnet::IpNet;

use crate::config::{Config, Identity, Registry, ScopedCredentials, Zone};
use crate::oci::Repository;

pub use identity::{AuthFailure, AuthMethod, Authenticator, Authn, Credentials, IdentityKinds};
pub use rules::{decide, repository_rules, Reason, ReasonCode};
pub use source::TrustedProxies;
pub use zone::{ZoneMatch, ZoneTable};

/// What the caller wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Reads: GET and HEAD of manifests, blobs, tags, referrers.
    Pull,
    /// Writes: blob uploads (and cancelling them), manifest PUT.
    Push,
    /// DELETE of a manifest (by digest), a tag or a blob.
    Delete,
}

impl Action {
    pub fn label(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "push",
            Action::Delete => "delete",
        }
    }
}

/// Everything a decision depends on.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    pub registry: &'a Registry,
    /// The client address ([`TrustedProxies::client_addr`]).
    pub source: IpAddr,
    /// The zones of `source` ([`ZoneTable::lookup`]).
    pub zones: ZoneMatch<'a>,
    pub authn: &'a Authn,
    /// `None` for requests that name no repository (`/v2/`): only credential and network
    /// rules apply.
    pub repository: Option<&'a Repository>,
    pub action: Action,
    /// Which identities the config has ([`Authenticator::kinds`]).
    pub identities: IdentityKinds,
}

/// The answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny(Reason),
}

impl Decision {
    pub fn is_allow(&self) -> bool {
        matches!(self, Decision::Allow)
    }

    /// `allow`, or the denial's [`Reason::label`]: for metrics and the audit log.
    pub fn label(&self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny(reason) => reason.label(),
        }
    }
}

/// Which upstream credentials a request uses (secret-free pull, scoped): the first of the
/// registry's `scoped_credentials` whose every non-empty list matches (any zone of the source,
/// the identity, any repository glob); `None` means the registry's own `credentials`.
pub fn scoped_credentials<'a>(
    registry: &'a Registry,
    zones: &ZoneMatch<'_>,
    identity: Option<&str>,
    repository: Option<&Repository>,
) -> Option<&'a ScopedCredentials> {
    registry.scoped_credentials.iter().find(|rule| {
        let zone_ok = rule.zones.is_empty() || zones.any_of(&rule.zones).is_some();
        let identity_ok = rule.identities.is_empty()
            || identity.is_some_and(|id| rule.identities.iter().any(|r| r == id));
        let repository_ok = rule.repositories.is_empty()
            || repository.is_some_and(|repo| {
                rule.repositories
                    .iter()
                    .any(|g| glob::matches(g, repo.as_str()))
            });
        zone_ok && identity_ok && repository_ok
    })
}

/// The policy tables of one config.
#[derive(Debug)]
pub struct Policy {
    zones: ZoneTable,
    authenticator: Authenticator,
    proxies: TrustedProxies,
}

impl Policy {
    pub fn new(config: &Config) -> Policy {
        Policy::from_parts(
            &config.zones,
            &config.identities,
            &config.server.trusted_proxies,
        )
    }

    pub fn from_parts(
        zones: &[Zone],
        identities: &[Identity],
        trusted_proxies: &[IpNet],
    ) -> Policy {
        Policy {
            zones: ZoneTable::new(zones),
            authenticator: Authenticator::new(identities),
            proxies: TrustedProxies::new(trusted_proxies),
        }
    }

    pub fn zones(&self) -> &ZoneTable {
        &self.zones
    }

    pub fn authenticator(&self) -> &Authenticator {
        &self.authenticator
    }

    pub fn trusted_proxies(&self) -> &TrustedProxies {
        &self.proxies
    }

    /// See [`TrustedProxies::client_addr`].
    pub fn client_addr(
        &self,
        peer: IpAddr,
        x_forwarded_for: &[&str],
        forwarded: &[&str],
    ) -> IpAddr {
        self.proxies.client_addr(peer, x_forwarded_for, forwarded)
    }

    /// See [`Authenticator::authenticate`].
    pub fn authenticate(&self, authorization: Option<&str>, mtls_subjects: &[&str]) -> Authn {
        self.authenticator
            .authenticate(authorization, mtls_subjects)
    }

    /// The facts of one request, zones looked up.
    pub fn facts<'a>(
        &'a self,
        registry: &'a Registry,
        source: IpAddr,
        authn: &'a Authn,
        repository: Option<&'a Repository>,
        action: Action,
    ) -> Facts<'a> {
        Facts {
            registry,
            source,
            zones: self.zones.lookup(source),
            authn,
            repository,
            action,
            identities: self.authenticator.kinds(),
        }
    }
}

#[cfg(test)]
mod tests;
