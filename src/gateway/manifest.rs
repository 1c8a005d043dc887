//! Manifest GET/HEAD through the manifest cache.
//!
//! By digest: immutable, served from the store once the repository is confirmed (invariant 5).
//! By tag: the tag -> digest answer is reused for the registry's `tag_ttl`, then asked again with
//! a HEAD (cheap, and not counted as a pull by Docker Hub). While the upstream fails (transport
//! errors, 5xx, 429) a cached answer keeps serving for `cache.stale_if_error` with a `Warning`
//! header. Upstream 404s are remembered for `cache.negative_ttl`. Bodies are read whole under
//! `cache.max_manifest_size` (invariant 7), verified, and passed on byte for byte. Requests that
//! need the upstream for the same tag or manifest at the same time ask it once (`flight.rs`).

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method};
use pingora::proxy::Session;
use sha2::{Digest as _, Sha256};

use super::confirm::{is_unavailable_error, is_unavailable_status, Confirm, Kind};
use super::flight::Turn;
use super::job::{error_from_upstream, manifest_read_error, upstream_error, Failure, Job};
use super::respond;
use super::signature;
use super::{Gateway, RequestCtx};
use crate::oci::{self, Digest, ErrorCode, OciError, Reference, Tag};
use crate::store::{CachedManifest, ManifestStore, TagEntry, TagKey};
use crate::upstream;

/// One manifest request, with what it needs from the gateway.
struct ManifestJob<'a> {
    gw: &'a Gateway,
    job: &'a Job<'a>,
    /// The client's `Accept` values joined by commas; empty when it sent none.
    accept: Cow<'a, str>,
    /// The manifest types that `Accept` admits (`oci::accept_set`), parsed once per request.
    accepted: u8,
    /// The client takes every modern manifest type (no `Accept`, a wildcard, or all four
    /// listed): the upstream's answer to it is the tag's real target.
    full: bool,
    /// Headers asking for the tag's real target (every manifest type), and headers for
    /// upstream manifest requests in the client's terms: its `Accept` lines, plus every
    /// manifest type when it sent none or a wildcard (distribution honours only the types
    /// listed). See [`upstream_headers`](Self::upstream_headers).
    headers: OnceLock<(HeaderMap, HeaderMap)>,
    /// The tag or digest asked for: remembered 404s are keyed by it ([`missing`](Self::missing)).
    reference: &'a Reference,
    /// The request names a signature artifact's tag: no signature policy applies.
    exempt: bool,
    /// Asked by another member (this replica owns the tag): never forwarded again.
    for_peer: bool,
}

/// Which cached answer of a tag a request is served from: the tag's real target (the answer
/// to clients taking every type), or the variant for clients refusing some types, at most one
/// per media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Primary,
    Variant,
}

pub async fn serve(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut RequestCtx,
    job: &Job<'_>,
    reference: &Reference,
) -> Result<(), Failure> {
    let m = ManifestJob::new(gw, job, reference, false);
    match reference {
        Reference::Digest(digest) => m.by_digest(session, ctx, digest).await,
        Reference::Tag(tag) => m.by_tag(session, ctx, tag).await,
    }
}

/// The owner's side of a peer tag request (`peer.rs`, after its signature was checked): what
/// the tag points at, from this replica's fresh answer or asked of the upstream now (at most
/// once per `tag_ttl` for the cluster), and for `get` the manifest's bytes. Never forwarded.
#[allow(clippy::too_many_arguments)]
pub async fn serve_for_peer(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut RequestCtx,
    client: &crate::upstream::UpstreamClient,
    routed: &crate::route::Routed,
    partition: &str,
    tag: &Tag,
    get: bool,
) -> Result<(), Failure> {
    let job = Job {
        client,
        routed,
        partition: partition.to_owned(),
        method: if get { Method::GET } else { Method::HEAD },
        headers: HeaderMap::new(),
        query: String::new(),
        max_manifest: gw.config.cache.max_manifest_size,
        revalidate_tags: false,
    };
    let reference = Reference::Tag(tag.clone());
    let m = ManifestJob::new(gw, &job, &reference, true);
    let key = TagKey::new(partition, &routed.repository, tag);
    let cached = gw.manifests.tag(&key).filter(|e| m.live(e));
    let (entry, manifest) = match m.resolve(ctx, tag, &key, Slot::Primary, cached).await? {
        TagAnswer::Entry(entry) => {
            let manifest = match get {
                true => m.manifest_of(ctx, &entry, None).await?,
                false => None,
            };
            (entry, manifest)
        }
        TagAnswer::Fetched(manifest) => {
            let entry = gw
                .manifests
                .tag(&key)
                .filter(|e| e.digest == manifest.digest)
                .unwrap_or_else(|| entry_of(&manifest, SystemTime::now()));
            (entry, Some(manifest))
        }
        // Not cached here either (schema 1): the asking replica asks the upstream itself.
        TagAnswer::Uncached(_) | TagAnswer::Refused => {
            return Err(OciError::new(
                ErrorCode::Unsupported,
                "this tag's answer is not cacheable; ask the upstream",
            )
            .with_status(409)
            .into())
        }
    };
    gw.links.confirm(
        partition,
        &routed.repository,
        &entry.digest,
        entry.validated_at,
    );
    let mut resp = respond::head(200, ctx)?;
    resp.insert_header(header::CONTENT_TYPE, entry.media_type.as_str())?;
    resp.insert_header("Docker-Content-Digest", entry.digest.as_str())?;
    resp.insert_header(super::peer::HEADER_SIZE, entry.size)?;
    resp.insert_header(
        super::peer::HEADER_VALIDATED_AT,
        crate::store::unix_secs(entry.validated_at),
    )?;
    if ctx.stale {
        resp.insert_header(super::peer::HEADER_STALE, "1")?;
    }
    let body = manifest.map(|m| m.body.clone()).unwrap_or_default();
    respond::write_body(session, ctx, resp, body).await?;
    Ok(())
}

/// What the tag logic decided, before anything is written.
enum TagAnswer {
    /// Serve from this entry (fresh, revalidated, from the tag's owner, or stale: see `ctx`).
    Entry(TagEntry),
    /// A GET fetched the manifest itself.
    Fetched(Arc<CachedManifest>),
    /// A HEAD of a schema 1 answer: served from the entry, never cached.
    Uncached(TagEntry),
    /// The primary answer is of a type this client refuses: try its variant.
    Refused,
}

impl<'a> ManifestJob<'a> {
    fn new(gw: &'a Gateway, job: &'a Job<'a>, reference: &'a Reference, for_peer: bool) -> Self {
        let accept = accept_of(&job.headers);
        let accepted = oci::accept_set(&accept);
        let full = oci::media::set_takes_every_modern_type(accepted);
        ManifestJob {
            gw,
            job,
            reference,
            exempt: matches!(reference, Reference::Tag(t) if signature::is_signature_tag(t.as_str())),
            accept,
            accepted,
            full,
            headers: OnceLock::new(),
            for_peer,
        }
    }

    /// The headers of upstream manifest requests for each slot: built on the first request
    /// that needs them, so an answer from the cache never builds them.
    fn upstream_headers(&self) -> &(HeaderMap, HeaderMap) {
        self.headers.get_or_init(|| {
            let client = &self.job.headers;
            let mut upstream_headers = upstream::forwarded_headers(client, false);
            let every_type = HeaderValue::from_static(oci::MANIFEST_ACCEPT);
            if client.get(header::ACCEPT).is_none() {
                upstream_headers.insert(header::ACCEPT, every_type.clone());
            } else if self.full && oci::has_wildcard(&self.accept) {
                upstream_headers.append(header::ACCEPT, every_type.clone());
            }
            let full_headers = if self.full {
                upstream_headers.clone()
            } else {
                HeaderMap::from_iter([(header::ACCEPT, every_type)])
            };
            (full_headers, upstream_headers)
        })
    }
}

impl ManifestJob<'_> {
    /// Writes a manifest answer once the signature policy lets it out.
    async fn send(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        manifest: &CachedManifest,
    ) -> Result<(), Failure> {
        let body = Some(manifest.body.clone());
        signature::gate(self.gw, ctx, self.job, &manifest.digest, body, self.exempt).await?;
        write(session, ctx, manifest).await
    }

    /// Writes a HEAD answer from a tag entry once the signature policy lets it out.
    async fn send_head(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        entry: &TagEntry,
    ) -> Result<(), Failure> {
        signature::gate(self.gw, ctx, self.job, &entry.digest, None, self.exempt).await?;
        write_head(session, ctx, entry).await
    }

    fn confirm(&self) -> Confirm<'_> {
        Confirm {
            links: &self.gw.links,
            client: self.job.client,
            registry: &self.job.routed.registry.name,
            partition: &self.job.partition,
            repository: &self.job.routed.repository,
            stale_if_error: self.gw.config.cache.stale_if_error,
        }
    }

    fn headers(&self, slot: Slot) -> &HeaderMap {
        match slot {
            Slot::Primary => &self.upstream_headers().0,
            Slot::Variant => &self.upstream_headers().1,
        }
    }

    /// The key of remembered 404s for this reference in one slot: for clients that take every
    /// type, or in this client's terms (per set of accepted manifest types). Built when asked:
    /// an answer from the cache never needs it.
    fn missing(&self, slot: Slot) -> String {
        let base = self.key_of(self.reference);
        match slot {
            Slot::Primary => base,
            Slot::Variant => {
                ManifestStore::missing_key_for(&base, (!self.full).then_some(self.accepted))
            }
        }
    }

    /// `reference` in this job's account and repository: the base of remembered-404 and
    /// flight keys.
    fn key_of(&self, reference: &dyn std::fmt::Display) -> String {
        format!(
            "{}\0{}\0{}",
            self.job.partition,
            self.job.routed.repository.as_str(),
            reference
        )
    }

    /// Records a tag answer in its slot; schema 1 answers are never cached (see `fetch`).
    fn store(&self, slot: Slot, key: &TagKey, entry: TagEntry) {
        if oci::media::is_schema1(&entry.media_type) {
            return;
        }
        match slot {
            Slot::Primary => self.gw.manifests.set_tag(key, entry),
            Slot::Variant => self.gw.manifests.set_tag_variant(key, entry),
        }
    }

    /// A primary answer this client does not take: it is served from a variant instead.
    fn refuses(&self, slot: Slot, media_type: &str) -> bool {
        slot == Slot::Primary && !self.full && !self.takes(media_type)
    }

    /// Whether this client's `Accept` admits `media_type`.
    fn takes(&self, media_type: &str) -> bool {
        oci::media::set_admits(self.accepted, media_type)
            .unwrap_or_else(|| oci::accepts(&self.accept, media_type))
    }

    async fn by_digest(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        digest: &Digest,
    ) -> Result<(), Failure> {
        if let Some(cached) = self.cached_by_digest(ctx, digest).await? {
            return self.send(session, ctx, &cached).await;
        }
        let _leader = match self.gw.flights.join(self.missing(Slot::Variant)).await {
            Turn::Lead(leader) => Some(leader),
            Turn::Followed => {
                if let Some(cached) = self.cached_by_digest(ctx, digest).await? {
                    return self.send(session, ctx, &cached).await;
                }
                None
            }
        };
        self.refuse_if_known_missing(ctx, Slot::Variant)?;
        let reference = Reference::Digest(digest.clone());
        let fetched = self.fetch(ctx, &reference, Slot::Variant).await?;
        self.send(session, ctx, &fetched).await
    }

    /// The cached manifest `digest` when this client takes its type, once this repository is
    /// confirmed to have it (invariant 5), from the disk or the object store alike.
    async fn cached_by_digest(
        &self,
        ctx: &mut RequestCtx,
        digest: &Digest,
    ) -> Result<Option<Arc<CachedManifest>>, Failure> {
        let mut cached = self.gw.manifests.get(digest);
        let in_cache = cached.is_some();
        if !in_cache {
            cached = self.read_l2(ctx, digest).await;
        }
        let Some(cached) = cached else {
            ctx.cache = "miss";
            return Ok(None);
        };
        if !self.takes(&cached.media_type) {
            // Not a type this client takes: the upstream says what it gets (distribution:
            // a 404 for a type it did not ask for).
            ctx.cache = "bypass";
            return Ok(None);
        }
        let confirmed = self.confirm().check(Kind::Manifest, digest).await?;
        self.confirm()
            .references(digest, &cached.body, confirmed.at);
        ctx.cache = if in_cache { "hit" } else { "miss" };
        ctx.mark_stale(confirmed.stale);
        Ok(Some(cached))
    }

    /// The manifest from the object store (`cache.l2`), verified there and kept on this
    /// replica's disk. The caller confirms the repository.
    async fn read_l2(&self, ctx: &mut RequestCtx, digest: &Digest) -> Option<Arc<CachedManifest>> {
        let store = &self.gw.store;
        let (media_type, body) = store.l2()?.manifest(digest, store.keys()).await?;
        ctx.filled_by = Some("l2".to_owned());
        Some(self.gw.manifests.put(CachedManifest {
            digest: digest.clone(),
            media_type,
            body,
        }))
    }

    /// A tag answer not undone by a delete made through pullgate since.
    fn live(&self, entry: &TagEntry) -> bool {
        if !self.gw.manifests.any_deleted() {
            return true;
        }
        let routed = self.job.routed;
        let deleted =
            super::delete::deleted_scope(&routed.registry.name, routed.repository.as_str());
        !self
            .gw
            .manifests
            .deleted_since(&deleted, &entry.digest, entry.validated_at)
    }

    async fn by_tag(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        tag: &Tag,
    ) -> Result<(), Failure> {
        let routed = self.job.routed;
        let key = TagKey::new(&self.job.partition, &routed.repository, tag);
        let primary = self.cached_entry(Slot::Primary, &key);
        let use_primary = self.full
            || primary
                .as_ref()
                .is_some_and(|p| !self.refuses(Slot::Primary, &p.media_type));
        if use_primary
            && self
                .tag_in(session, ctx, tag, &key, Slot::Primary, primary)
                .await?
        {
            return Ok(());
        }
        // A client that refuses the tag's real type: its own variant.
        let variant = self.cached_entry(Slot::Variant, &key);
        self.tag_in(session, ctx, tag, &key, Slot::Variant, variant)
            .await?;
        Ok(())
    }

    /// Serves a tag from one slot (see [`resolve`](Self::resolve)). `Ok(false)`: the primary
    /// answer turned out to be of a type this client refuses (nothing was sent; try the
    /// variant).
    async fn tag_in(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        tag: &Tag,
        key: &TagKey,
        slot: Slot,
        cached: Option<TagEntry>,
    ) -> Result<bool, Failure> {
        match self.resolve(ctx, tag, key, slot, cached).await? {
            TagAnswer::Refused => return Ok(false),
            TagAnswer::Entry(entry) => self.send_tag(session, ctx, tag, entry).await?,
            TagAnswer::Fetched(manifest) => self.send(session, ctx, &manifest).await?,
            TagAnswer::Uncached(entry) => self.send_head(session, ctx, &entry).await?,
        }
        Ok(true)
    }

    /// What a tag points at in one slot: a fresh answer from the cache; in a cluster, the
    /// tag owner's answer; else asked again (a HEAD, which Docker Hub does not count as a
    /// pull, and a GET only when the answer changed or cannot tell); a stale answer while the
    /// upstream fails.
    async fn resolve(
        &self,
        ctx: &mut RequestCtx,
        tag: &Tag,
        key: &TagKey,
        slot: Slot,
        cached: Option<TagEntry>,
    ) -> Result<TagAnswer, Failure> {
        let routed = self.job.routed;
        let now = SystemTime::now();
        let ttl = routed.registry.tag_ttl(&self.gw.config.cache);
        let cached = match cached {
            Some(entry) if !self.job.revalidate_tags && entry.age(now) < ttl => {
                ctx.cache = "hit";
                return Ok(TagAnswer::Entry(entry));
            }
            other => other,
        };
        let _leader = match self.gw.flights.join(self.missing(slot)).await {
            Turn::Lead(leader) => Some(leader),
            Turn::Followed => match self.fresh_entry(slot, key, ttl) {
                Some(entry) if self.refuses(slot, &entry.media_type) => {
                    return Ok(TagAnswer::Refused)
                }
                Some(entry) => {
                    ctx.cache = "hit";
                    return Ok(TagAnswer::Entry(entry));
                }
                None => None,
            },
        };
        if cached.is_none() {
            self.refuse_if_known_missing(ctx, slot)?;
        }
        if slot == Slot::Primary {
            if let Some(answer) = self.ask_owner(ctx, tag, key).await? {
                return Ok(answer);
            }
        }
        let reference = Reference::Tag(tag.clone());
        if cached.is_none() && self.job.method == Method::GET {
            let fetched = self.fetch(ctx, &reference, slot).await?;
            self.store(slot, key, entry_of(&fetched, now));
            if self.refuses(slot, &fetched.media_type) {
                return Ok(TagAnswer::Refused);
            }
            ctx.cache = "miss";
            return Ok(TagAnswer::Fetched(fetched));
        }
        let asked = self
            .job
            .client
            .send(&self.request(Method::HEAD, &reference, slot))
            .await
            .map(|a| a.response);
        let stale = cached
            .clone()
            .filter(|e| e.age(now) < self.gw.config.cache.stale_if_error);
        match (asked, stale) {
            (Ok(answer), stale) if answer.status().is_success() => {
                ctx.upstream_status = Some(answer.status().as_u16());
                ctx.cache = if stale.is_some() {
                    "revalidated"
                } else {
                    "miss"
                };
                match entry_from_head(answer.headers(), now) {
                    Some(entry) if !oci::media::is_schema1(&entry.media_type) => {
                        self.store(slot, key, entry.clone());
                        if self.refuses(slot, &entry.media_type) {
                            return Ok(TagAnswer::Refused);
                        }
                        Ok(TagAnswer::Entry(entry))
                    }
                    Some(entry) if self.job.method == Method::HEAD => {
                        ctx.cache = "bypass";
                        Ok(TagAnswer::Uncached(entry))
                    }
                    _ => {
                        let fetched = self.fetch(ctx, &reference, slot).await?;
                        self.store(slot, key, entry_of(&fetched, now));
                        if self.refuses(slot, &fetched.media_type) {
                            return Ok(TagAnswer::Refused);
                        }
                        Ok(TagAnswer::Fetched(fetched))
                    }
                }
            }
            (Ok(answer), Some(stale)) if is_unavailable_status(answer.status()) => {
                ctx.upstream_status = Some(answer.status().as_u16());
                Ok(self.stale(ctx, stale))
            }
            (Err(e), Some(stale)) if is_unavailable_error(&e) => {
                ctx.note_error(&e.to_string());
                Ok(self.stale(ctx, stale))
            }
            (Ok(answer), _) => {
                ctx.upstream_status = Some(answer.status().as_u16());
                if answer.status().as_u16() == 404 {
                    match (slot, &cached) {
                        (Slot::Primary, _) => self.gw.manifests.forget_tag(key),
                        (Slot::Variant, Some(v)) => {
                            self.gw.manifests.forget_tag_variant(key, &v.media_type)
                        }
                        (Slot::Variant, None) => {}
                    }
                    self.gw.manifests.remember_missing(self.missing(slot));
                }
                Err(
                    error_from_upstream(&routed.registry.name, "manifest", answer)
                        .await
                        .into(),
                )
            }
            (Err(e), _) => Err(Failure::Respond(upstream_error(&e))),
        }
    }

    /// This slot's cached answer for `key`, not undone by a delete; a variant only of a type
    /// this client takes.
    fn cached_entry(&self, slot: Slot, key: &TagKey) -> Option<TagEntry> {
        match slot {
            Slot::Primary => self.gw.manifests.tag(key).filter(|e| self.live(e)),
            Slot::Variant => self
                .gw
                .manifests
                .tag_variants(key)
                .into_iter()
                .filter(|e| self.live(e))
                .find(|v| self.takes(&v.media_type)),
        }
    }

    /// [`cached_entry`](Self::cached_entry) while fresh: after a flight, what its leader
    /// cached.
    fn fresh_entry(&self, slot: Slot, key: &TagKey, ttl: Duration) -> Option<TagEntry> {
        let now = SystemTime::now();
        self.cached_entry(slot, key).filter(|e| e.age(now) < ttl)
    }

    /// In a cluster only the tag's owner asks the upstream about it, so the cluster asks at
    /// most once per `tag_ttl` (Docker Hub counts per source address or account, not per
    /// replica). `None`: this replica is the owner, the request came from a peer, or the
    /// owner failed (then this replica asks the upstream itself: a duplicate, never an error).
    async fn ask_owner(
        &self,
        ctx: &mut RequestCtx,
        tag: &Tag,
        key: &TagKey,
    ) -> Result<Option<TagAnswer>, Failure> {
        let Some(cluster) = self.gw.cluster.as_ref() else {
            return Ok(None);
        };
        if self.for_peer || self.job.revalidate_tags {
            return Ok(None);
        }
        let Some(owner) = cluster.owner_of_tag(key) else {
            return Ok(None);
        };
        let routed = self.job.routed;
        let registry = &routed.registry.name;
        let grant = super::peer::tag_grant(registry, &self.job.partition, &routed.repository, tag);
        let get = self.job.method == Method::GET;
        self.gw.metrics.forwards_sent.inc();
        let asked = cluster
            .ask_tag(owner, &grant, get, self.job.max_manifest)
            .await;
        let (entry, stale, manifest) = match asked {
            Ok(super::peer::PeerTag::Found {
                entry,
                stale,
                manifest,
            }) if self.live(&entry) => (entry, stale, manifest),
            // A delete made through this replica since the owner's answer: the upstream
            // tells what the tag is now.
            Ok(super::peer::PeerTag::Found { .. }) => return Ok(None),
            Ok(super::peer::PeerTag::Missing) => {
                self.gw.manifests.forget_tag(key);
                self.gw
                    .manifests
                    .remember_missing(self.missing(Slot::Primary));
                ctx.upstream_status = Some(404);
                return Err(OciError::new(
                    ErrorCode::ManifestUnknown,
                    format!(
                        "upstream registry {registry:?} has no tag {tag} in {}",
                        routed.client_name
                    ),
                )
                .with_status(404)
                .into());
            }
            Err((unwell, why)) => {
                tracing::warn!(%owner, %tag, reason = %why,
                    "cluster owner of the tag failed; asking the upstream");
                if unwell {
                    cluster.membership.failed(owner, std::time::Instant::now());
                }
                self.gw.metrics.forwards_failed_over.inc();
                return Ok(None);
            }
        };
        ctx.cache = "peer";
        ctx.filled_by = Some(owner.to_string());
        ctx.mark_stale(stale);
        if let Some(body) = manifest {
            // Verified against the digest by `ask_tag`.
            let stored = self.gw.manifests.put(CachedManifest {
                digest: entry.digest.clone(),
                media_type: entry.media_type.clone(),
                body,
            });
            self.confirm()
                .references(&stored.digest, &stored.body, entry.validated_at);
        }
        if !stale {
            self.store(Slot::Primary, key, entry.clone());
        }
        if self.refuses(Slot::Primary, &entry.media_type) {
            return Ok(Some(TagAnswer::Refused));
        }
        Ok(Some(TagAnswer::Entry(entry)))
    }

    fn stale(&self, ctx: &mut RequestCtx, entry: TagEntry) -> TagAnswer {
        tracing::warn!(
            registry = %self.job.routed.registry.name,
            request_id = %ctx.request_id,
            "upstream unavailable: serving a cached tag answer (stale_if_error)"
        );
        ctx.cache = "hit";
        ctx.mark_stale(true);
        TagAnswer::Entry(entry)
    }

    /// Answers a tag from its cached digest: HEAD from the entry alone, GET from the cached
    /// manifest (fetched by digest if only a HEAD was seen so far).
    async fn send_tag(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        tag: &Tag,
        entry: TagEntry,
    ) -> Result<(), Failure> {
        let routed = self.job.routed;
        self.gw.links.confirm(
            &self.job.partition,
            &routed.repository,
            &entry.digest,
            entry.validated_at,
        );
        // A HEAD needs no body: the entry has its headers, so only memory is looked at (a tag
        // poller's HEAD opens no file).
        if self.job.method == Method::HEAD {
            return match self.gw.manifests.get_in_memory(&entry.digest) {
                Some(cached) => self.send(session, ctx, &cached).await,
                None => self.send_head(session, ctx, &entry).await,
            };
        }
        match self.manifest_of(ctx, &entry, Some(tag)).await? {
            Some(manifest) => self.send(session, ctx, &manifest).await,
            None => Err(OciError::new(
                ErrorCode::Unavailable,
                format!(
                    "upstream registry {:?} is unavailable and tag {tag} of {} is not cached",
                    routed.registry.name, routed.client_name
                ),
            )
            .with_status(503)
            .into()),
        }
    }

    /// The manifest a tag entry names: from the disk, the object store, the tag's owner (in a
    /// cluster: it fetched it, so the cluster GETs each manifest once), or fetched by digest
    /// (in terms that take the entry's type whatever this client sent); `None` when only the
    /// upstream has it and it cannot be asked now (a stale answer).
    async fn manifest_of(
        &self,
        ctx: &mut RequestCtx,
        entry: &TagEntry,
        tag: Option<&Tag>,
    ) -> Result<Option<Arc<CachedManifest>>, Failure> {
        let cached = match self.gw.manifests.get(&entry.digest) {
            Some(cached) => Some(cached),
            // Confirmed for this repository by the tag answer itself.
            None => self.read_l2(ctx, &entry.digest).await,
        };
        if let Some(cached) = cached {
            self.confirm()
                .references(&entry.digest, &cached.body, entry.validated_at);
            return Ok(Some(cached));
        }
        let _leader = match self.gw.flights.join(self.key_of(&entry.digest)).await {
            Turn::Lead(leader) => Some(leader),
            Turn::Followed => match self.gw.manifests.get(&entry.digest) {
                Some(cached) => return Ok(Some(cached)),
                None => None,
            },
        };
        if let Some(from_owner) = self.owner_manifest(entry, tag).await {
            return Ok(Some(from_owner));
        }
        if ctx.stale {
            return Ok(None);
        }
        let reference = Reference::Digest(entry.digest.clone());
        Ok(Some(self.fetch(ctx, &reference, Slot::Primary).await?))
    }

    /// The manifest of `entry` from the owner of `tag`, when that is another member and its
    /// answer names the same digest. Failures are the caller's to fall back from.
    async fn owner_manifest(
        &self,
        entry: &TagEntry,
        tag: Option<&Tag>,
    ) -> Option<Arc<CachedManifest>> {
        let (cluster, tag) = (self.gw.cluster.as_ref()?, tag?);
        if self.for_peer {
            return None;
        }
        let routed = self.job.routed;
        let key = TagKey::new(&self.job.partition, &routed.repository, tag);
        let owner = cluster.owner_of_tag(&key)?;
        let grant = super::peer::tag_grant(
            &routed.registry.name,
            &self.job.partition,
            &routed.repository,
            tag,
        );
        self.gw.metrics.forwards_sent.inc();
        match cluster
            .ask_tag(owner, &grant, true, self.job.max_manifest)
            .await
        {
            Ok(super::peer::PeerTag::Found {
                entry: found,
                manifest: Some(body),
                ..
            }) if found.digest == entry.digest => Some(self.gw.manifests.put(CachedManifest {
                digest: found.digest,
                media_type: found.media_type,
                body,
            })),
            _ => None,
        }
    }

    /// GETs a manifest from the upstream, verifies it, caches it and records the repository's
    /// confirmation of it and of what it references.
    async fn fetch(
        &self,
        ctx: &mut RequestCtx,
        reference: &Reference,
        slot: Slot,
    ) -> Result<Arc<CachedManifest>, Failure> {
        let routed = self.job.routed;
        let answer = self
            .job
            .client
            .send(&self.request(Method::GET, reference, slot))
            .await?
            .response;
        ctx.upstream_status = Some(answer.status().as_u16());
        if !answer.status().is_success() {
            if answer.status().as_u16() == 404 {
                self.gw.manifests.remember_missing(self.missing(slot));
            }
            return Err(
                error_from_upstream(&routed.registry.name, "manifest", answer)
                    .await
                    .into(),
            );
        }
        let headers = answer.headers().clone();
        let body = upstream::read_capped(answer, self.job.max_manifest)
            .await
            .map_err(|detail| manifest_read_error(self.job, &detail))?;
        let digest = manifest_digest(reference, &headers, &body).map_err(|detail| {
            OciError::new(
                ErrorCode::Unavailable,
                format!(
                    "upstream registry {:?} sent a manifest that fails verification: {detail}",
                    routed.registry.name
                ),
            )
            .with_status(502)
        })?;
        let media_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or(oci::media::OCI_MANIFEST_V1)
            .to_owned();
        if oci::media::is_schema1(&media_type) {
            // Made on the fly by the upstream for this client (distribution converts for
            // clients that take nothing newer): served, never cached.
            return Ok(Arc::new(CachedManifest {
                digest,
                media_type,
                body: Bytes::from(body),
            }));
        }
        let now = SystemTime::now();
        let stored = self.gw.manifests.put(CachedManifest {
            digest,
            media_type,
            body: Bytes::from(body),
        });
        if let Some(l2) = self.gw.store.l2() {
            let keys = self.gw.store.keys();
            l2.upload_manifest(
                &stored.digest,
                &stored.media_type,
                stored.body.clone(),
                keys,
            );
        }
        self.gw
            .links
            .confirm(&self.job.partition, &routed.repository, &stored.digest, now);
        self.confirm().references(&stored.digest, &stored.body, now);
        Ok(stored)
    }

    fn request(
        &self,
        method: Method,
        reference: &Reference,
        slot: Slot,
    ) -> upstream::UpstreamRequest {
        self.job.request(
            method,
            &format!("manifests/{reference}"),
            self.headers(slot).clone(),
            false,
        )
    }

    fn refuse_if_known_missing(&self, ctx: &mut RequestCtx, slot: Slot) -> Result<(), OciError> {
        if !self.gw.manifests.known_missing(&self.missing(slot)) {
            return Ok(());
        }
        ctx.cache = "negative";
        Err(OciError::new(
            ErrorCode::ManifestUnknown,
            format!(
                "upstream registry {:?} has no such manifest in {} (remembered for cache.negative_ttl)",
                self.job.routed.registry.name, self.job.routed.client_name
            ),
        )
        .with_status(404))
    }
}

/// A cached manifest as a response (the head only for HEAD).
async fn write(
    session: &mut Session,
    ctx: &mut RequestCtx,
    manifest: &CachedManifest,
) -> Result<(), Failure> {
    let digest = manifest.digest.as_str();
    let mut etag = Vec::with_capacity(digest.len() + 2);
    etag.extend_from_slice(b"\"");
    etag.extend_from_slice(digest.as_bytes());
    etag.extend_from_slice(b"\"");
    let etag = HeaderValue::try_from(etag)
        .map_err(|_| pingora::Error::explain(pingora::ErrorType::InternalError, "bad etag"))?;
    let resp = respond::head_with(
        200,
        ctx,
        [
            (
                header::CONTENT_TYPE,
                respond::content_type(&manifest.media_type)?,
            ),
            (respond::DOCKER_CONTENT_DIGEST, respond::value(digest)?),
            (header::ETAG, etag),
        ],
    )?;
    respond::write_body(session, ctx, resp, manifest.body.clone()).await?;
    Ok(())
}

/// A HEAD answer from a tag entry alone.
async fn write_head(
    session: &mut Session,
    ctx: &mut RequestCtx,
    entry: &TagEntry,
) -> Result<(), Failure> {
    let resp = respond::head_with(
        200,
        ctx,
        [
            (
                header::CONTENT_TYPE,
                respond::content_type(&entry.media_type)?,
            ),
            (header::CONTENT_LENGTH, HeaderValue::from(entry.size)),
            (
                respond::DOCKER_CONTENT_DIGEST,
                respond::value(entry.digest.as_str())?,
            ),
        ],
    )?;
    session.write_response_header(Box::new(resp), true).await?;
    session.write_response_body(None, true).await?;
    Ok(())
}

/// All `Accept` values as one string.
fn accept_of(headers: &HeaderMap) -> Cow<'_, str> {
    let mut lines = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok());
    match (lines.next(), lines.next()) {
        (None, _) => Cow::Borrowed(""),
        // What nearly every client sends: one line, borrowed as it is.
        (Some(one), None) => Cow::Borrowed(one),
        (Some(first), Some(second)) => {
            let mut joined = format!("{first},{second}");
            for line in lines {
                joined.push(',');
                joined.push_str(line);
            }
            Cow::Owned(joined)
        }
    }
}

/// A tag answer from a HEAD, when it carries a digest, a length and a media type.
fn entry_from_head(headers: &HeaderMap, now: SystemTime) -> Option<TagEntry> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    Some(TagEntry {
        digest: Digest::parse(text("docker-content-digest")?).ok()?,
        media_type: text("content-type")
            .filter(|t| oci::is_manifest_media_type(t))?
            .to_owned(),
        size: text("content-length")?.parse().ok()?,
        validated_at: now,
    })
}

fn entry_of(manifest: &CachedManifest, now: SystemTime) -> TagEntry {
    TagEntry {
        digest: manifest.digest.clone(),
        media_type: manifest.media_type.clone(),
        size: manifest.body.len() as u64,
        validated_at: now,
    }
}

/// The digest of a manifest body. By-digest requests must match what was asked for; by-tag
/// answers get the SHA-256 of the bytes (or the upstream's own digest if it used another
/// algorithm and the bytes match it).
fn manifest_digest(
    reference: &Reference,
    upstream: &HeaderMap,
    body: &[u8],
) -> Result<Digest, String> {
    // A signed schema 1 manifest's digest covers its payload, not the signatures.
    let schema1 = oci::media::schema1_signed_payload(body);
    let matches = |d: &Digest| d.verify(body) || schema1.as_ref().is_some_and(|p| d.verify(p));
    if let Reference::Digest(d) = reference {
        return if matches(d) {
            Ok(d.clone())
        } else {
            Err(format!("its bytes do not hash to {d}"))
        };
    }
    let computed = Digest::parse(&format!("sha256:{}", hex::encode(Sha256::digest(body))))
        .map_err(|e| e.to_string())?;
    let announced = upstream
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Digest::parse(v).ok());
    match announced {
        Some(d) if matches(&d) => Ok(d),
        Some(d) if d.as_str().starts_with("sha256:") => Err(format!(
            "the upstream announced {d} but the bytes hash to {computed}"
        )),
        _ => Ok(computed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_digests_are_verified() {
        let body = b"{\"schemaVersion\":2}";
        let good = format!("sha256:{}", hex::encode(Sha256::digest(body)));
        let by_digest = Reference::parse(&good).unwrap();
        assert_eq!(
            manifest_digest(&by_digest, &HeaderMap::new(), body)
                .unwrap()
                .as_str(),
            good
        );
        let other = Reference::parse(&format!("sha256:{}", "0".repeat(64))).unwrap();
        assert!(manifest_digest(&other, &HeaderMap::new(), body).is_err());
        let tag = Reference::parse("latest").unwrap();
        assert_eq!(
            manifest_digest(&tag, &HeaderMap::new(), body)
                .unwrap()
                .as_str(),
            good
        );
        let mut lying = HeaderMap::new();
        lying.insert(
            "docker-content-digest",
            HeaderValue::from_str(&format!("sha256:{}", "1".repeat(64))).unwrap(),
        );
        assert!(manifest_digest(&tag, &lying, body).is_err());
    }

    #[test]
    fn head_answers_make_tag_entries_only_when_complete() {
        let now = SystemTime::now();
        let digest = format!("sha256:{}", "a".repeat(64));
        let mut h = HeaderMap::new();
        h.insert(
            "docker-content-digest",
            HeaderValue::from_str(&digest).unwrap(),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("528"));
        assert!(entry_from_head(&h, now).is_none(), "no media type");
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(oci::media::OCI_INDEX_V1),
        );
        let entry = entry_from_head(&h, now).unwrap();
        assert_eq!((entry.digest.as_str(), entry.size), (digest.as_str(), 528));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
        assert!(entry_from_head(&h, now).is_none(), "not a manifest type");
    }
}
