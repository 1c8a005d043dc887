//! Blob GET/HEAD through the store: hits from disk with no upstream contact, misses joined to
//! one fill per digest, Range on both.
//!
//! Invariant 5 is checked here through `confirm.rs`: a blob the store holds is served for a
//! repository only once the upstream confirmed that repository has it (the fill's own repository
//! is confirmed by the fill; others by their manifests or a HEAD).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures_util::StreamExt;
use http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

use super::confirm::{Confirm, Confirmed, Kind};
use super::job::{error_from_upstream, upstream_error, Failure};
use super::peer::PeerBlob;
use super::range::{self, RangeAnswer};
use super::respond::{self, Body};
use super::RequestCtx;
use crate::oci::{Digest, Repository};
use crate::store::{BlobSource, BlobStore, FillFailure, Links, Origin, SourceBody, SourceError};
use crate::upstream::{UpstreamClient, UpstreamError, UpstreamRequest};
use crate::warm::pace::{paced, Bucket};

/// Everything a cached blob request needs.
pub struct BlobJob<'a> {
    pub store: &'a BlobStore,
    pub links: &'a Arc<Links>,
    pub client: &'a Arc<UpstreamClient>,
    pub registry: &'a str,
    /// Cache partition of the credentials in use (`Job::partition`).
    pub partition: &'a str,
    pub repository: &'a Repository,
    pub stale_if_error: Duration,
    pub digest: &'a Digest,
    pub method: Method,
    pub range: Option<String>,
    /// Set for a warm request under `cache.warm_bandwidth`: a fill it starts reads the upstream
    /// at that cap (a client joining that fill gets the same pace).
    pub pace: Option<Arc<Bucket>>,
    /// Set on a cluster member that does not own the digest: a fill asks the owner
    /// (`peer.rs`). `None` on the owner, outside a cluster, and for a peer's request.
    pub forward: Option<Forward<'a>>,
}

/// Where a non-owner's fill goes first.
pub struct Forward<'a> {
    pub cluster: &'a Arc<super::peer::Cluster>,
    pub metrics: &'a Arc<crate::metrics::Metrics>,
    pub owner: std::net::SocketAddr,
}

/// Serve from the store. `Ok(false)`: not handled here (a HEAD for a blob not on disk, or a
/// cache disk that cannot take the blob), the caller asks the upstream instead.
pub async fn serve(
    session: &mut Session,
    ctx: &mut RequestCtx,
    job: &BlobJob<'_>,
) -> Result<bool, Failure> {
    if let Some(bytes) = job.store.small(job.digest) {
        let confirmed = confirm(job).await?;
        ctx.cache = "hit";
        ctx.mark_stale(confirmed.stale);
        let len = bytes.len() as u64;
        let Some((resp, start, end)) = head_for(ctx, job, len)? else {
            return unsatisfiable(session, ctx, len).await;
        };
        // `head_for` keeps the range inside `len`.
        let body = Body::Memory(Some(bytes.slice(start as usize..end as usize)));
        return stream(session, ctx, resp, body).await;
    }
    if let Some(blob) = job.store.lookup(job.digest) {
        let confirmed = confirm(job).await?;
        ctx.cache = "hit";
        ctx.mark_stale(confirmed.stale);
        let Some((resp, start, end)) = head_for(ctx, job, blob.len)? else {
            return unsatisfiable(session, ctx, blob.len).await;
        };
        let body = Body::Disk(blob.reader(start, end));
        return stream(session, ctx, resp, body).await;
    }
    if job.method == Method::HEAD {
        return Ok(false);
    }
    let upstream = UpstreamBlob {
        client: job.client.clone(),
        links: job.links.clone(),
        partition: job.partition.to_owned(),
        repository: job.repository.clone(),
        digest: job.digest.clone(),
        pace: job.pace.clone(),
    };
    let me = ctx
        .gateway
        .cluster
        .as_ref()
        .map_or_else(|| "self".to_owned(), |c| c.advertise().to_owned());
    let (fill, peer) = match &job.forward {
        Some(forward) => {
            let peer = Arc::new(PeerBlob {
                cluster: forward.cluster.clone(),
                metrics: forward.metrics.clone(),
                owner: std::sync::Mutex::new(forward.owner),
                grant: super::peer::grant(job.registry, job.partition, job.repository, job.digest),
                upstream,
                fell_back: AtomicBool::new(false),
            });
            let fill = job.store.fill_or_join(job.digest, peer.clone());
            ctx.filled_by = Some(forward.owner.to_string());
            (fill, Some(peer))
        }
        None => {
            ctx.filled_by = Some(me.clone());
            (job.store.fill_or_join(job.digest, Arc::new(upstream)), None)
        }
    };

    let total = match fill.wait_started().await {
        Ok(total) => total,
        Err(FillFailure::Storage(why)) => {
            // The disk cannot take it (full, read-only, ...): serve without caching.
            tracing::warn!(digest = %job.digest, reason = %why, "cache unavailable; serving the blob without caching it");
            return Ok(false);
        }
        Err(f) => return Err(Failure::Respond(f.to_oci_error())),
    };
    // A fill started for another repository proves nothing about this one.
    let confirmed = confirm(job).await?;
    ctx.cache = "fill";
    ctx.mark_stale(confirmed.stale);
    let Some((resp, start, end)) = head_for(ctx, job, total)? else {
        return unsatisfiable(session, ctx, total).await;
    };
    let body = Body::Fill(fill.reader(start, end));
    let streamed = stream(session, ctx, resp, body).await;
    let fill_origin = fill.progress().origin;
    if fill_origin == Some(Origin::L2) {
        ctx.filled_by = Some("l2".to_owned());
    } else if peer.is_some_and(|p| p.fell_back.load(Ordering::Relaxed)) {
        ctx.filled_by = Some(me);
    }
    streamed
}

/// Invariant 5 for this blob and repository.
async fn confirm(job: &BlobJob<'_>) -> Result<Confirmed, Failure> {
    Confirm {
        links: job.links,
        client: job.client,
        registry: job.registry,
        partition: job.partition,
        repository: job.repository,
        stale_if_error: job.stale_if_error,
    }
    .check(Kind::Blob, job.digest)
    .await
}

/// The response head for a blob of `len` bytes and the byte range to send; `None` for 416.
fn head_for(
    ctx: &RequestCtx,
    job: &BlobJob<'_>,
    len: u64,
) -> Result<Option<(ResponseHeader, u64, u64)>, Failure> {
    let (status, start, end) = match range::answer(job.range.as_deref(), len) {
        RangeAnswer::Full => (200, 0, len),
        RangeAnswer::Partial { start, end } => (206, start, end),
        RangeAnswer::Unsatisfiable => return Ok(None),
    };
    let mut resp = respond::head_with(
        status,
        ctx,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (header::CONTENT_LENGTH, HeaderValue::from(end - start)),
            (header::ACCEPT_RANGES, HeaderValue::from_static("bytes")),
            (
                respond::DOCKER_CONTENT_DIGEST,
                respond::value(job.digest.as_str())?,
            ),
        ],
    )?;
    if status == 206 {
        resp.insert_header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{len}", end - 1),
        )?;
    }
    Ok(Some((resp, start, end)))
}

async fn stream(
    session: &mut Session,
    ctx: &mut RequestCtx,
    resp: ResponseHeader,
    body: Body,
) -> Result<bool, Failure> {
    respond::stream_body(session, ctx, resp, body)
        .await
        .map_err(Failure::Abort)?;
    Ok(true)
}

async fn unsatisfiable(
    session: &mut Session,
    ctx: &mut RequestCtx,
    len: u64,
) -> Result<bool, Failure> {
    let mut resp = respond::head(416, ctx)?;
    resp.insert_header(header::CONTENT_RANGE, format!("bytes */{len}"))?;
    respond::write_body(session, ctx, resp, bytes::Bytes::new()).await?;
    Ok(true)
}

/// The upstream as a fill's byte source: GET, resumed with `Range: bytes=<offset>-`; read at
/// `pace` when a warm request started the fill.
pub(super) struct UpstreamBlob {
    client: Arc<UpstreamClient>,
    links: Arc<Links>,
    partition: String,
    repository: Repository,
    digest: Digest,
    pace: Option<Arc<Bucket>>,
}

#[async_trait]
impl BlobSource for UpstreamBlob {
    async fn open(&self, offset: u64) -> Result<SourceBody, SourceError> {
        let mut headers = HeaderMap::new();
        if offset > 0 {
            let range = HeaderValue::from_str(&format!("bytes={offset}-"))
                .map_err(|e| SourceError::Broken(e.to_string()))?;
            headers.insert(header::RANGE, range);
        }
        let request = UpstreamRequest {
            method: Method::GET,
            path_and_query: format!("/v2/{}/blobs/{}", self.repository.as_str(), self.digest),
            repository: Some(self.repository.clone()),
            headers,
        };
        let registry = self.client.registry().name.clone();
        let answer = match self.client.send(&request).await {
            Ok(a) => a.response,
            Err(e) => return Err(source_error(&e)),
        };
        let status = answer.status();
        if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            let retry_after = retry_after_secs(answer.headers());
            return Err(SourceError::Busy {
                error: error_from_upstream(&registry, "blob", answer).await,
                retry_after,
            });
        }
        if !status.is_success() {
            return Err(SourceError::Refused(
                error_from_upstream(&registry, "blob", answer).await,
            ));
        }
        if offset == 0 {
            self.links.confirm(
                &self.partition,
                &self.repository,
                &self.digest,
                SystemTime::now(),
            );
        }
        let (total_len, skip) = match (status, offset) {
            (StatusCode::PARTIAL_CONTENT, _) => (content_range_total(answer.headers()), 0),
            // The upstream ignored Range: skip what the fill already has.
            (_, offset) => (answer.content_length(), offset),
        };
        let chunks = skip_bytes(answer, skip);
        Ok(SourceBody {
            total_len,
            chunks: match &self.pace {
                Some(bucket) => paced(chunks, Arc::clone(bucket)),
                None => chunks,
            },
        })
    }
}

fn source_error(e: &UpstreamError) -> SourceError {
    match e {
        UpstreamError::Unreachable { .. }
        | UpstreamError::Timeout { .. }
        | UpstreamError::Protocol { .. } => SourceError::Broken(e.to_string()),
        _ => SourceError::Refused(upstream_error(e)),
    }
}

/// `Retry-After` in its delay-seconds form (the HTTP-date form is left to the backoff).
fn retry_after_secs(headers: &HeaderMap) -> Option<Duration> {
    let secs = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    secs.parse().ok().map(Duration::from_secs)
}

/// The total length from `Content-Range: bytes a-b/total`.
pub(super) fn content_range_total(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_RANGE)?
        .to_str()
        .ok()?
        .rsplit_once('/')?
        .1
        .trim()
        .parse()
        .ok()
}

/// The body as a stream of chunks, without its first `skip` bytes.
fn skip_bytes(
    answer: reqwest::Response,
    skip: u64,
) -> futures_util::stream::BoxStream<'static, Result<bytes::Bytes, String>> {
    let mut remaining = skip;
    answer
        .bytes_stream()
        .map(|r| r.map_err(|e| e.without_url().to_string()))
        .filter_map(move |r| {
            let out = match r {
                Ok(mut chunk) if remaining > 0 => {
                    let cut = remaining.min(chunk.len() as u64);
                    remaining -= cut;
                    let rest = chunk.split_off(cut as usize);
                    (!rest.is_empty()).then_some(Ok(rest))
                }
                other => Some(other),
            };
            std::future::ready(out)
        })
        .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_totals() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_static("bytes 100-199/1000"),
        );
        assert_eq!(content_range_total(&h), Some(1000));
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_static("bytes 100-199/*"),
        );
        assert_eq!(content_range_total(&h), None);
        assert_eq!(content_range_total(&HeaderMap::new()), None);
    }

    #[test]
    fn retry_after_seconds_only() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after_secs(&h), None);
        h.insert(header::RETRY_AFTER, HeaderValue::from_static(" 7 "));
        assert_eq!(retry_after_secs(&h), Some(Duration::from_secs(7)));
        h.insert(
            header::RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after_secs(&h), None);
    }
}
