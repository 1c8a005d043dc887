//! Writing answers through Pingora's `Session`: OCI errors, buffered bodies (manifests) and
//! streamed upstream bodies (blobs).
//!
//! Every response carries `Content-Length` (or is a HEAD), so keep-alive connections survive
//! expected errors such as 404 probes. A streamed body that breaks returns `Err`, which makes the
//! gateway drop the connection mid-body (invariant 3).

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;

use super::ctx::RequestCtx;
use crate::oci::OciError;
use crate::store::{BlobReader, FillReader};

/// Upstream response headers a client may see; everything else stays behind.
const PASSED_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "content-range",
    "accept-ranges",
    "docker-content-digest",
    "etag",
    "last-modified",
    "oci-filters-applied",
    "oci-subject",
];

/// RFC 9111 warn-code 110 ("response is stale"), the marker of a `stale_if_error` answer.
pub const STALE_WARNING: &str =
    "110 pullgate \"Response is Stale: the upstream registry is unavailable\"";

/// The registry header names pullgate sets on every hit, parsed once: Pingora's
/// `insert_header` parses and copies a name on every call.
pub const DOCKER_CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");
const API_VERSION: HeaderName = HeaderName::from_static("docker-distribution-api-version");
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const OCI_NAMESPACE: HeaderName = HeaderName::from_static("oci-namespace");

/// A response head with the headers every pullgate answer carries.
pub fn head(status: u16, ctx: &RequestCtx) -> Result<ResponseHeader> {
    head_with(status, ctx, [])
}

/// [`head`] with `extra` headers, built in the header map before Pingora sees it.
///
/// Without Pingora's case map: standard names go out in their usual case, pullgate's own
/// (`docker-content-digest`, `x-request-id`, ...) in lower case, as over HTTP/2 (names are
/// case-insensitive, RFC 9110). Keeping the case costs a second header map per response and
/// a copy of each name: about 2,500 of the 58,000 instructions of a warm HEAD (callgrind).
pub fn head_with<const N: usize>(
    status: u16,
    ctx: &RequestCtx,
    extra: [(HeaderName, HeaderValue); N],
) -> Result<ResponseHeader> {
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = StatusCode::from_u16(status)
        .map_err(|_| pingora::Error::explain(pingora::ErrorType::InternalError, "bad status"))?;
    let headers = &mut parts.headers;
    headers.reserve(N + 4);
    headers.insert(API_VERSION, HeaderValue::from_static("registry/2.0"));
    headers.insert(REQUEST_ID, value(ctx.request_id.as_str())?);
    if ctx.stale {
        headers.insert(header::WARNING, HeaderValue::from_static(STALE_WARNING));
    }
    if let Some(ns) = &ctx.namespace {
        // distribution-spec "Registry Proxying": echo OCI-Namespace when routed by ns.
        headers.insert(OCI_NAMESPACE, value(ns)?);
    }
    for (name, v) in extra {
        headers.insert(name, v);
    }
    Ok(ResponseHeader::from(parts))
}

/// `text` as a header value (an error for bytes a header cannot carry).
pub fn value(text: &str) -> Result<HeaderValue> {
    HeaderValue::from_str(text).map_err(|_| {
        pingora::Error::explain(pingora::ErrorType::InternalError, "invalid header value")
    })
}

/// Copy the upstream headers a client may see.
pub fn pass_headers(resp: &mut ResponseHeader, upstream: &HeaderMap) -> Result<()> {
    for name in PASSED_HEADERS {
        if let Some(v) = upstream.get(*name) {
            resp.insert_header(*name, v.clone())?;
        }
    }
    Ok(())
}

fn is_head(session: &Session) -> bool {
    session.req_header().method == Method::HEAD
}

/// An OCI error, JSON body, connection kept alive.
pub async fn oci_error(
    session: &mut Session,
    ctx: &mut RequestCtx,
    error: &OciError,
) -> Result<()> {
    let challenged = super::refusal::for_caller(error, ctx);
    let error = challenged.as_ref().unwrap_or(error);
    if ctx.error.is_none() {
        ctx.note_error(&error.to_string());
    }
    let body = Bytes::from(error.to_json());
    let mut resp = head(error.status, ctx)?;
    resp.insert_header(header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(header::CONTENT_LENGTH, body.len())?;
    if let Some(retry) = &error.retry_after {
        resp.insert_header(header::RETRY_AFTER, retry.as_str())?;
    }
    if error.status == 401 {
        resp.insert_header(header::WWW_AUTHENTICATE, "Basic realm=\"pullgate\"")?;
    }
    write_body(session, ctx, resp, body).await
}

/// A `Content-Type` value: the manifest types every answer names are static (no copy).
pub fn content_type(media_type: &str) -> Result<HeaderValue> {
    match crate::oci::media::MANIFEST_MEDIA_TYPES
        .iter()
        .find(|known| **known == media_type)
    {
        Some(known) => Ok(HeaderValue::from_static(known)),
        None => value(media_type),
    }
}

/// A complete response with a body already in memory (HEAD gets the head only).
pub async fn write_body(
    session: &mut Session,
    ctx: &mut RequestCtx,
    mut resp: ResponseHeader,
    body: Bytes,
) -> Result<()> {
    resp.insert_header(header::CONTENT_LENGTH, body.len())?;
    if is_head(session) || body.is_empty() {
        session.write_response_header(Box::new(resp), true).await?;
        return session.write_response_body(None, true).await;
    }
    session.write_response_header(Box::new(resp), false).await?;
    ctx.bytes_sent += body.len() as u64;
    session.write_response_body(Some(body), true).await
}

/// Where a streamed response body comes from.
pub enum Body {
    /// A committed blob on disk.
    Disk(BlobReader),
    /// A fill in progress (or just finished).
    Fill(FillReader),
    /// The upstream's own answer, passed through.
    Upstream(reqwest::Response),
    /// A small blob the store keeps in memory (taken on the first read).
    Memory(Option<Bytes>),
}

impl Body {
    async fn next_chunk(&mut self) -> std::result::Result<Option<Bytes>, String> {
        match self {
            Body::Disk(r) => r.next_chunk().await.map_err(|e| e.to_string()),
            Body::Fill(r) => r.next_chunk().await.map_err(|e| e.to_string()),
            Body::Upstream(r) => r.chunk().await.map_err(|e| e.without_url().to_string()),
            Body::Memory(bytes) => Ok(bytes.take().filter(|b| !b.is_empty())),
        }
    }
}

/// Write the head, then every chunk of `body` (the head only for HEAD). `Err` means the body
/// broke after the head was sent: the caller must abort, not finish, the response
/// (invariant 3).
pub async fn stream_body(
    session: &mut Session,
    ctx: &mut RequestCtx,
    resp: ResponseHeader,
    mut body: Body,
) -> std::result::Result<(), String> {
    let head_only = is_head(session);
    session
        .write_response_header(Box::new(resp), head_only)
        .await
        .map_err(|e| format!("writing the response head: {e}"))?;
    if !head_only {
        while let Some(chunk) = body
            .next_chunk()
            .await
            .map_err(|e| format!("body broke after {} bytes: {e}", ctx.bytes_sent))?
        {
            ctx.bytes_sent += chunk.len() as u64;
            session
                .write_response_body(Some(chunk), false)
                .await
                .map_err(|e| format!("client went away: {e}"))?;
        }
    }
    session
        .write_response_body(None, true)
        .await
        .map_err(|e| format!("finishing the body: {e}"))
}
