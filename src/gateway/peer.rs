//! Cluster forwarding: a blob fill on a replica that does not own the digest gets its bytes
//! from the owner, which fills once from the upstream for the cluster; a tag that needs asking
//! again is asked of its owner (`manifest.rs`), which asks the upstream once per `tag_ttl`.
//!
//! Policy is decided on the replica the client reached, before anything here runs. The peer
//! request then carries that decision (registry, repository, digest, the upstream account,
//! an expiry) under an HMAC with the cluster key (`sign.rs`, peer context), so the peer path is
//! no way around policy: the owner refuses any request whose MAC does not match exactly what it
//! asks for, and serves a valid one through its own blob path, where it is one more follower of
//! the owner's single-flight fill.
//!
//! Owns: the peer paths [`PATH`] and [`TAG_PATH`] (both sides), the [`PeerBlob`] source and
//! its fallback to the upstream. Must never: forward to this replica itself (`cluster::Membership` answers `Me`),
//! forward a request that came from a peer (the owner always fills from the upstream, so there
//! are no loops), or fail a pull because a peer failed (it falls back to the upstream, counted).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use futures_util::StreamExt;
use http::{header, Method, StatusCode};
use pingora::proxy::Session;

use super::blob::{self, content_range_total, BlobJob, UpstreamBlob};
use super::job::{partition, Failure};
use super::{Gateway, RequestCtx};
use crate::cluster::dns::DnsMembers;
use crate::cluster::{Membership, Owner, DEFAULT_BACKOFF};
use crate::metrics::Metrics;
use crate::oci::{Digest, ErrorCode, OciError, Repository, Tag};
use crate::route::{Routed, RoutedBy};
use crate::sign::{self, Grant, Presented, RedirectKey};
use crate::store::{BlobSource, Origin, SourceBody, SourceError, TagEntry, TagKey};

/// The path of peer blob requests on a member's plain listener. Outside `/v2/`, so no client
/// request is ever taken for one.
pub const PATH: &str = "/_pullgate/peer/blob";
/// The path of peer tag requests: the tag's owner answers what the tag points at, asking the
/// upstream at most once per `tag_ttl` for the whole cluster.
pub const TAG_PATH: &str = "/_pullgate/peer/tag";
/// The path members probe each other on ([`Cluster::probe`]): `200 ok`, unauthenticated (it
/// tells only that a pullgate peer listener is there).
pub const HEALTH_PATH: &str = "/_pullgate/peer/health";

/// The request kind of a health probe: neither logged nor counted.
pub const HEALTH_KIND: &str = "peer_health";

/// How often each member probes the others, and how long a probe may take. A member that
/// fails one is skipped for the back-off, so a replica that died is out of every member's
/// hashing within seconds, before a client's fill would have to find out.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

const PARAM_REGISTRY: &str = "registry";
const PARAM_REPOSITORY: &str = "repository";
const PARAM_DIGEST: &str = "digest";
const PARAM_TAG: &str = "tag";
/// `HEAD` when the asking client wants no manifest body (unsigned: it changes no permission).
const PARAM_METHOD: &str = "method";

/// Headers of a peer tag answer besides `Content-Type` and `Docker-Content-Digest`.
pub const HEADER_SIZE: &str = "x-pullgate-manifest-size";
pub const HEADER_VALIDATED_AT: &str = "x-pullgate-validated-at";
pub const HEADER_STALE: &str = "x-pullgate-stale";

/// How long a peer request stays valid: long enough for clock skew between replicas and a
/// retry, short enough that a captured one is soon useless.
const PEER_TTL: Duration = Duration::from_secs(60);

/// `[cluster]` at run time: membership, the key, the HTTP client to the peers.
pub struct Cluster {
    pub membership: Arc<Membership>,
    /// Set with `cluster.peers_dns`: the member list is refreshed from DNS.
    dns: Option<Arc<DnsMembers>>,
    key: RedirectKey,
    http: reqwest::Client,
    /// `cluster.advertise` as text, for every audit line (made once, not per request).
    advertise: String,
}

impl Cluster {
    /// This replica's address as the others know it.
    pub fn advertise(&self) -> &str {
        &self.advertise
    }

    pub fn from_config(config: &crate::config::Cluster) -> Result<Cluster, String> {
        let key =
            RedirectKey::load(&config.key_file).map_err(|e| format!("cluster.key_file: {e}"))?;
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(2))
            .read_timeout(Duration::from_secs(60))
            .http1_only()
            .build()
            .map_err(|e| format!("cluster: cannot build the peer HTTP client: {e}"))?;
        let membership = Arc::new(Membership::new(
            config.advertise,
            &config.peers,
            DEFAULT_BACKOFF,
        ));
        let dns = config.peers_dns.as_ref().map(|d| {
            let dns = Arc::new(DnsMembers::new(&d.name, d.port, d.refresh));
            if tokio::runtime::Handle::try_current().is_err() && dns.start_refresh(Instant::now()) {
                // At start, before serving: the first requests already see every member.
                dns.apply(dns.resolve_blocking(), &membership);
                dns.finished();
            }
            dns
        });
        let cluster = Cluster {
            membership,
            dns,
            key,
            http,
            advertise: config.advertise.to_string(),
        };
        // On a reload (inside the runtime) the first list is asked for at once.
        cluster.refresh_members();
        Ok(cluster)
    }

    /// Starts a DNS refresh of the member list in the background when one is due.
    pub fn refresh_members(&self) {
        let Some(dns) = &self.dns else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if !dns.start_refresh(Instant::now()) {
            return;
        }
        let (dns, membership) = (Arc::clone(dns), Arc::clone(&self.membership));
        runtime.spawn(async move {
            let answer = dns.resolve().await;
            dns.apply(answer, &membership);
            dns.finished();
        });
    }

    /// The member to fill `digest` from, when it is not this replica.
    pub fn owner_of(&self, digest: &Digest) -> Option<SocketAddr> {
        self.refresh_members();
        match self.membership.owner(&digest.to_string(), Instant::now()) {
            Owner::Me => None,
            Owner::Peer(peer) => Some(peer),
        }
    }

    /// Asks every other member for [`HEALTH_PATH`] at once; one that does not answer 2xx
    /// within [`PROBE_TIMEOUT`] goes into back-off.
    pub async fn probe(&self) {
        self.refresh_members();
        let probes = self.membership.peers().into_iter().map(|peer| async move {
            let asked = self
                .http
                .get(format!("http://{peer}{HEALTH_PATH}"))
                .timeout(PROBE_TIMEOUT)
                .send()
                .await;
            let healthy = asked.as_ref().is_ok_and(|a| a.status().is_success());
            if !healthy {
                let why = match asked {
                    Ok(a) => a.status().to_string(),
                    Err(e) => e.without_url().to_string(),
                };
                tracing::warn!(%peer, reason = %why, "cluster member failed its health probe; skipping it");
                self.membership.failed(peer, Instant::now());
            }
        });
        futures_util::future::join_all(probes).await;
    }

    /// The member that asks the upstream about the tag of `key`, when it is not this replica.
    pub fn owner_of_tag(&self, key: &TagKey) -> Option<SocketAddr> {
        self.refresh_members();
        match self
            .membership
            .owner(&format!("tag:{}", key.hex()), Instant::now())
        {
            Owner::Me => None,
            Owner::Peer(peer) => Some(peer),
        }
    }

    /// Asks `owner` what the tag of `grant` points at (and, for `get`, the manifest itself).
    /// `Err((unwell, why))`: the owner failed; `unwell` when it should be skipped a while.
    pub async fn ask_tag(
        &self,
        owner: SocketAddr,
        grant: &Grant,
        get: bool,
        max_manifest: u64,
    ) -> Result<PeerTag, (bool, String)> {
        let query = url::form_urlencoded::Serializer::new(String::new())
            .append_pair(PARAM_REGISTRY, &grant.registry)
            .append_pair(PARAM_REPOSITORY, &grant.repository)
            .append_pair(PARAM_TAG, &grant.digest)
            .append_pair(PARAM_METHOD, if get { "GET" } else { "HEAD" })
            .finish();
        let url = format!(
            "http://{owner}{TAG_PATH}?{query}&{}",
            self.key.peer_tag_query(grant)
        );
        let answer = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| (true, e.without_url().to_string()))?;
        let status = answer.status();
        if status == StatusCode::NOT_FOUND {
            return Ok(PeerTag::Missing);
        }
        if !status.is_success() {
            return Err((status.is_server_error(), format!("owner answered {status}")));
        }
        let text = |name: &str| {
            answer
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let entry = (|| {
            Some(TagEntry {
                digest: Digest::parse(&text("docker-content-digest")?).ok()?,
                media_type: text("content-type")
                    .filter(|t| crate::oci::is_manifest_media_type(t))?,
                size: text(HEADER_SIZE)?.parse().ok()?,
                validated_at: SystemTime::UNIX_EPOCH
                    + Duration::from_secs(text(HEADER_VALIDATED_AT)?.parse().ok()?),
            })
        })()
        .ok_or((false, "owner's tag answer lacks a header".to_owned()))?;
        let stale = text(HEADER_STALE).is_some();
        // Read under the cap as it arrives: a length header is a claim, not a bound.
        let mut body = Vec::new();
        let mut chunks = answer.bytes_stream();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|e| (true, e.without_url().to_string()))?;
            if (body.len() + chunk.len()) as u64 > max_manifest {
                return Err((
                    false,
                    "owner's manifest is over cache.max_manifest_size".into(),
                ));
            }
            body.extend_from_slice(&chunk);
        }
        let body = bytes::Bytes::from(body);
        let manifest = match body.is_empty() {
            true => None,
            false if body.len() as u64 == entry.size && entry.digest.verify(&body) => Some(body),
            false => return Err((false, "owner's manifest does not match its digest".into())),
        };
        Ok(PeerTag::Found {
            entry,
            stale,
            manifest,
        })
    }

    fn url(&self, owner: SocketAddr, grant: &Grant) -> String {
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        query
            .append_pair(PARAM_REGISTRY, &grant.registry)
            .append_pair(PARAM_REPOSITORY, &grant.repository)
            .append_pair(PARAM_DIGEST, &grant.digest);
        format!(
            "http://{owner}{PATH}?{}&{}",
            query.finish(),
            self.key.peer_query(grant)
        )
    }
}

/// A fill's source on a non-owner: the owner over the peer path, resumed with `Range`. When
/// the owner dies (a transport error or 5xx) the fill resumes from the digest's next owner
/// among the members still up, so followers on every replica converge on one new fill (one
/// extra upstream fetch for the cluster); when that is this replica, or the owner refused
/// the request, from the upstream for the rest of this fill.
pub struct PeerBlob {
    pub cluster: Arc<Cluster>,
    pub metrics: Arc<Metrics>,
    pub owner: std::sync::Mutex<SocketAddr>,
    pub grant: Grant,
    pub upstream: UpstreamBlob,
    pub fell_back: AtomicBool,
}

impl PeerBlob {
    fn owner(&self) -> SocketAddr {
        *self.owner.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn ask_owner(
        &self,
        owner: SocketAddr,
        offset: u64,
    ) -> Result<SourceBody, (bool, String)> {
        let mut request = self.cluster.http.get(self.cluster.url(owner, &self.grant));
        if offset > 0 {
            request = request.header(header::RANGE, format!("bytes={offset}-"));
        }
        let answer = request
            .send()
            .await
            .map_err(|e| (true, e.without_url().to_string()))?;
        let status = answer.status();
        if !status.is_success() {
            // 5xx: the owner is unwell, skip it a while. 4xx: it refused this request (another
            // key, a config without this registry); the upstream gives the real answer.
            return Err((status.is_server_error(), format!("owner answered {status}")));
        }
        let (total_len, partial) = match status {
            StatusCode::PARTIAL_CONTENT => (content_range_total(answer.headers()), true),
            _ => (answer.content_length(), false),
        };
        if offset > 0 && !partial {
            return Err((false, "owner ignored Range".into()));
        }
        Ok(SourceBody {
            total_len,
            chunks: answer
                .bytes_stream()
                .map(|r| r.map_err(|e| e.without_url().to_string()))
                .boxed(),
        })
    }
}

#[async_trait]
impl BlobSource for PeerBlob {
    async fn open(&self, offset: u64) -> Result<SourceBody, SourceError> {
        // Each failure puts a member in back-off, so the next owner is another one: at most
        // one try per member.
        for _ in 0..self.cluster.membership.members().len() {
            if self.fell_back.load(Ordering::Relaxed) {
                break;
            }
            let owner = self.owner();
            self.metrics.forwards_sent.inc();
            let (unwell, why) = match self.ask_owner(owner, offset).await {
                Ok(body) => return Ok(body),
                Err(failed) => failed,
            };
            self.metrics.forwards_failed_over.inc();
            let membership = &self.cluster.membership;
            let next = match unwell {
                true => {
                    membership.failed(owner, Instant::now());
                    membership.owner(&self.grant.digest, Instant::now())
                }
                false => Owner::Me,
            };
            match next {
                Owner::Peer(next) if next != owner => {
                    tracing::warn!(%owner, %next, digest = %self.grant.digest, reason = %why,
                        "cluster owner failed; resuming from the next owner");
                    *self.owner.lock().unwrap_or_else(|e| e.into_inner()) = next;
                }
                _ => {
                    tracing::warn!(%owner, digest = %self.grant.digest, reason = %why,
                        "cluster owner failed; filling from the upstream");
                    break;
                }
            }
        }
        self.fell_back.store(true, Ordering::Relaxed);
        self.upstream.open(offset).await
    }

    fn origin(&self) -> Origin {
        if self.fell_back.load(Ordering::Relaxed) {
            Origin::Upstream
        } else {
            Origin::Peer
        }
    }
}

/// The owner's answer to a peer tag request.
pub enum PeerTag {
    /// What the tag points at, as the owner last had it from the upstream (`stale`: served
    /// while the upstream fails), with the manifest's verified bytes when they were asked for
    /// and the owner had them.
    Found {
        entry: TagEntry,
        stale: bool,
        manifest: Option<bytes::Bytes>,
    },
    /// The upstream has no such tag.
    Missing,
}

/// The grant a non-owner sends for a fill of `digest` in `repository` with `partition`'s
/// account.
pub fn grant(registry: &str, partition: &str, repository: &Repository, digest: &Digest) -> Grant {
    grant_for(registry, partition, repository, digest.to_string())
}

/// The grant a non-owner sends to ask for `tag` of `repository` with `partition`'s account.
pub fn tag_grant(registry: &str, partition: &str, repository: &Repository, tag: &Tag) -> Grant {
    grant_for(registry, partition, repository, tag.as_str().to_owned())
}

fn grant_for(registry: &str, partition: &str, repository: &Repository, reference: String) -> Grant {
    let account = partition
        .strip_prefix(registry)
        .and_then(|rest| rest.strip_prefix('/'))
        .map(str::to_owned);
    Grant {
        registry: registry.to_owned(),
        account,
        repository: repository.as_str().to_owned(),
        digest: reference,
        expires: sign::expiry(SystemTime::now(), PEER_TTL),
    }
}

/// The owner's side: a peer request, checked, then served like a client's blob GET or tag
/// lookup, always from this replica's cache or the upstream (never forwarded again).
pub async fn serve(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<(), Failure> {
    ctx.kind = "peer";
    ctx.client = Some(super::access::client_address(gw, session));
    let req = session.req_header();
    if req.uri.path() == HEALTH_PATH {
        ctx.kind = HEALTH_KIND;
        let mut resp = super::respond::head(200, ctx)?;
        resp.insert_header(header::CONTENT_TYPE, "text/plain")?;
        super::respond::write_body(session, ctx, resp, bytes::Bytes::from_static(b"ok\n")).await?;
        return Ok(());
    }
    let for_tag = req.uri.path() == TAG_PATH;
    if req.method != Method::GET {
        return Err(OciError::new(
            ErrorCode::Unsupported,
            "the peer path answers GET of one blob or tag only",
        )
        .with_status(405)
        .into());
    }
    let query = req.uri.query().unwrap_or("").to_owned();
    let range = req
        .headers
        .get(header::RANGE)
        .and_then(|r| r.to_str().ok())
        .map(str::to_string);
    let deny = |ctx: &mut RequestCtx, label: &'static str, message: &str| {
        ctx.decision = "deny";
        ctx.reason = Some(label);
        gw.metrics
            .denials
            .with_label_values(&[ctx.registry.as_deref().unwrap_or("-"), label])
            .inc();
        Failure::from(OciError::new(ErrorCode::Denied, message.to_owned()))
    };
    let Some(cluster) = &gw.cluster else {
        return Err(deny(
            ctx,
            "peer_not_cluster",
            "this replica is not in a cluster",
        ));
    };
    let value = |key: &str| {
        url::form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.into_owned())
    };
    let (Some(registry), Some(repository), Some(reference)) = (
        value(PARAM_REGISTRY),
        value(PARAM_REPOSITORY),
        value(if for_tag { PARAM_TAG } else { PARAM_DIGEST }),
    ) else {
        return Err(deny(
            ctx,
            "peer_invalid",
            "a peer request names a registry, a repository and a digest or tag",
        ));
    };
    ctx.registry = Some(registry.clone());
    ctx.repository = Some(repository.clone());
    ctx.reference = Some(reference.clone());
    let grant = Presented::from_query(&query).and_then(|presented| {
        let now = SystemTime::now();
        if for_tag {
            let key = &cluster.key;
            key.verify_peer_tag(&presented, &registry, &repository, &reference, now)
        } else {
            let key = &cluster.key;
            key.verify_peer(&presented, &registry, &repository, &reference, now)
        }
    });
    let grant = match grant {
        Ok(grant) => grant,
        Err(why) => {
            let message = match why {
                sign::SignatureError::Missing => "a peer request must be signed with the cluster key",
                sign::SignatureError::Invalid => {
                    "this peer request's signature does not match it (altered, or another cluster key)"
                }
                sign::SignatureError::Expired { .. } => "this peer request expired",
            };
            return Err(deny(ctx, why.label(), message));
        }
    };
    let Ok(repository) = Repository::parse(&repository) else {
        return Err(deny(
            ctx,
            "peer_invalid",
            "a peer request's name is malformed",
        ));
    };
    let partition = partition(&registry, grant.account.as_deref());
    let Some(client) = gw.upstream(&partition).cloned() else {
        return Err(deny(
            ctx,
            "peer_unknown_account",
            "this replica has no such registry or account: the members' configs differ",
        ));
    };
    if gw.keys_deny() {
        return Err(OciError::new(
            ErrorCode::Unavailable,
            "the cache encryption key was revoked",
        )
        .with_status(503)
        .into());
    }
    ctx.decision = "allow";
    ctx.credential = super::access::credential_name(client.registry(), grant.account.as_deref());
    if for_tag {
        let (Ok(tag), Some(config)) = (
            Tag::parse(&reference),
            gw.config.registries.iter().find(|r| r.name == registry),
        ) else {
            return Err(deny(
                ctx,
                "peer_invalid",
                "a peer request's tag is malformed",
            ));
        };
        gw.metrics.forwards_served.inc();
        let routed = Routed {
            registry: Arc::clone(config),
            by: RoutedBy::Host,
            client_name: repository.as_str().to_owned(),
            repository,
        };
        let get = value(PARAM_METHOD).as_deref() != Some("HEAD");
        return super::manifest::serve_for_peer(
            gw, session, ctx, &client, &routed, &partition, &tag, get,
        )
        .await;
    }
    let Ok(digest) = Digest::parse(&reference) else {
        return Err(deny(
            ctx,
            "peer_invalid",
            "a peer request's digest is malformed",
        ));
    };
    gw.metrics.forwards_served.inc();
    let job = BlobJob {
        store: &gw.store,
        links: &gw.links,
        client: &client,
        registry: &registry,
        partition: &partition,
        repository: &repository,
        stale_if_error: gw.config.cache.stale_if_error,
        digest: &digest,
        method: Method::GET,
        range,
        forward: None,
        // A peer's request is never paced here, even for a warm job on the asking replica.
        pace: None,
    };
    if blob::serve(session, ctx, &job).await? {
        return Ok(());
    }
    // The owner's disk cannot take it: the asking replica fills from the upstream itself.
    Err(OciError::new(
        ErrorCode::Unavailable,
        "the owner cannot cache this blob now",
    )
    .with_status(503)
    .into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_carries_the_account_of_the_partition() {
        let repo = Repository::parse("team/app").expect("name");
        let digest = Digest::parse(
            "sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae",
        )
        .expect("digest");
        let own = grant("hub", "hub", &repo, &digest);
        assert_eq!(own.account, None);
        let scoped = grant("hub", &partition("hub", Some("build")), &repo, &digest);
        assert_eq!(scoped.account.as_deref(), Some("build"));
        assert_eq!(
            (scoped.registry.as_str(), scoped.repository.as_str()),
            ("hub", "team/app")
        );
        assert_eq!(scoped.digest, digest.to_string());
        // A registry whose name starts like another's is not mistaken for a scoped partition.
        assert_eq!(grant("hub", "hubx", &repo, &digest).account, None);
    }
}
