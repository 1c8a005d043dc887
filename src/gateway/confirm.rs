//! Invariant 5: content the store holds is served for a repository only once the upstream
//! confirmed that repository has it for pullgate's credentials.
//!
//! A confirmation comes from the upstream serving the digest in that repository (a fill, a
//! manifest fetch), from a manifest of that repository that references it, or from a HEAD asked
//! here. It is trusted for [`CONFIRMATION_TTL`]; after that it is asked again, and while the
//! upstream is unavailable an older confirmation still counts for `cache.stale_if_error`.

use std::time::{Duration, SystemTime};

use http::{header, HeaderMap, HeaderValue, Method, StatusCode};

use super::job::{error_from_upstream, upstream_error, Failure};
use crate::oci::{self, Digest, Repository};
use crate::store::Links;
use crate::upstream::{UpstreamClient, UpstreamError, UpstreamRequest};

/// How long an upstream confirmation is trusted without asking again.
pub const CONFIRMATION_TTL: Duration = Duration::from_secs(15 * 60);

/// What is being confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Blob,
    Manifest,
}

/// Everything a confirmation needs.
pub struct Confirm<'a> {
    pub links: &'a Links,
    pub client: &'a UpstreamClient,
    /// For messages: the registry's name.
    pub registry: &'a str,
    /// For the confirmations: the registry and the credentials in use (see `Job::partition`).
    pub partition: &'a str,
    pub repository: &'a Repository,
    pub stale_if_error: Duration,
}

/// A confirmation that holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Confirmed {
    /// When the upstream last said so.
    pub at: SystemTime,
    /// True when the upstream could not be asked and an older confirmation was used.
    pub stale: bool,
}

impl Confirm<'_> {
    pub async fn check(&self, kind: Kind, digest: &Digest) -> Result<Confirmed, Failure> {
        let now = SystemTime::now();
        let known = self
            .links
            .confirmed_at(self.partition, self.repository, digest);
        let age = |at: SystemTime| now.duration_since(at).unwrap_or_default();
        if let Some(at) = known.filter(|at| age(*at) < CONFIRMATION_TTL) {
            return Ok(Confirmed { at, stale: false });
        }
        let (tail, what) = match kind {
            Kind::Blob => ("blobs", "blob"),
            Kind::Manifest => ("manifests", "manifest"),
        };
        let mut headers = HeaderMap::new();
        if kind == Kind::Manifest {
            headers.insert(
                header::ACCEPT,
                HeaderValue::from_static(oci::MANIFEST_ACCEPT),
            );
        }
        let request = UpstreamRequest {
            method: Method::HEAD,
            path_and_query: format!("/v2/{}/{tail}/{digest}", self.repository.as_str()),
            repository: Some(self.repository.clone()),
            headers,
        };
        let stale = known.filter(|at| age(*at) < self.stale_if_error);
        match self.client.send(&request).await {
            Ok(answer) if answer.response.status().is_success() => {
                self.links
                    .confirm(self.partition, self.repository, digest, now);
                Ok(Confirmed {
                    at: now,
                    stale: false,
                })
            }
            Ok(answer) if is_unavailable_status(answer.response.status()) && stale.is_some() => {
                Ok(Confirmed {
                    at: stale.unwrap_or(now),
                    stale: true,
                })
            }
            Ok(answer) => {
                let status = answer.response.status();
                if matches!(status.as_u16(), 401 | 403 | 404) {
                    self.links.forget(self.partition, self.repository, digest);
                }
                Err(error_from_upstream(self.registry, what, answer.response)
                    .await
                    .into())
            }
            Err(e) if is_unavailable_error(&e) && stale.is_some() => Ok(Confirmed {
                at: stale.unwrap_or(now),
                stale: true,
            }),
            Err(e) => Err(Failure::Respond(upstream_error(&e))),
        }
    }

    /// Records what manifest `manifest` of this repository references as confirmed at `at`
    /// (parsing the manifest only when `at` is newer than last time).
    pub fn references(&self, manifest: &Digest, manifest_body: &[u8], at: SystemTime) {
        if !self
            .links
            .references_due(self.partition, self.repository, manifest, at)
        {
            return;
        }
        for digest in oci::manifest_references(manifest_body) {
            self.links
                .confirm(self.partition, self.repository, &digest, at);
        }
    }
}

/// Upstream answers that mean "cannot say right now" rather than "no".
pub fn is_unavailable_status(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS
}

/// Transport failures that mean the upstream is unavailable.
pub fn is_unavailable_error(e: &UpstreamError) -> bool {
    matches!(
        e,
        UpstreamError::Unreachable { .. }
            | UpstreamError::Timeout { .. }
            | UpstreamError::Protocol { .. }
    )
}
