//! Talking to one upstream registry: credentials injected, tokens fetched and cached, redirects
//! followed safely.
//!
//! `UpstreamClient::send` is the only way a request reaches an upstream. It owns invariant 1
//! (credentials go only to the upstream host and trusted realms; `Authorization` is dropped on
//! any hop to another origin) and invariant 8 (redirect targets pass the address guard). It
//! knows nothing of Pingora: the gateway turns what it returns into a response.

mod credentials;
mod guard;
pub mod tls;
mod token;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use http::{header, HeaderMap, HeaderValue, Method, StatusCode};

pub use credentials::{Credential, CredentialProvider};
pub use guard::{classify, AddrClass, AddressGuard};
pub use token::{parse_challenges, Challenge};

use crate::config::Registry;
use crate::metrics::Metrics;
use crate::oci::Repository;
use crate::secret::Secret;
use token::TokenCache;

/// At most this many redirect hops are followed.
pub const MAX_REDIRECTS: usize = 5;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// No byte for this long from the upstream ends the request.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
const TOKEN_TIMEOUT: Duration = Duration::from_secs(30);
/// The credential part of token cache keys: each client holds one credential (scoped
/// credentials get a client of their own, see `gateway::Gateway`).
const DEFAULT_CREDENTIAL: &str = "default";

/// A request for the upstream, in the upstream's own names.
#[derive(Debug, Clone)]
pub struct UpstreamRequest {
    pub method: Method,
    /// `/v2/...` with the query, if any.
    pub path_and_query: String,
    /// The repository whose pull scope the request needs (`None` for `/v2/`).
    pub repository: Option<Repository>,
    /// Headers to pass on: every `Accept` line, `Range`.
    pub headers: HeaderMap,
}

/// The upstream's final answer (after auth retries and redirects), body not yet read.
#[derive(Debug)]
pub struct UpstreamResponse {
    pub response: reqwest::Response,
    /// Redirect hops followed to get it.
    pub hops: usize,
}

/// Why a request got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream registry {registry:?} is unreachable: {detail}")]
    Unreachable { registry: String, detail: String },
    #[error("upstream registry {registry:?} did not answer in time")]
    Timeout { registry: String },
    #[error("upstream registry {registry:?} rejected the configured credentials: {detail}")]
    CredentialsRejected { registry: String, detail: String },
    #[error("upstream registry {registry:?} denied access to {repository:?}: {detail}")]
    AccessDenied {
        registry: String,
        repository: String,
        detail: String,
    },
    #[error("credentials for upstream registry {registry:?} are unavailable: {detail}")]
    CredentialSource { registry: String, detail: String },
    #[error("upstream registry {registry:?} redirected to a refused target: {detail}")]
    RedirectRefused { registry: String, detail: String },
    #[error("upstream registry {registry:?} redirected more than {MAX_REDIRECTS} times")]
    TooManyRedirects { registry: String },
    #[error("upstream registry {registry:?} answered something unusable: {detail}")]
    Protocol { registry: String, detail: String },
}

/// Idle upstream connections kept per host for reuse.
const IDLE_CONNECTIONS: usize = 16;

/// The client for one registry's upstream. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct UpstreamClient {
    registry: Arc<Registry>,
    http: reqwest::Client,
    credentials: CredentialProvider,
    tokens: TokenCache,
    /// The scheme the upstream asked for last time, so later requests authenticate up front.
    challenge: RwLock<Option<Challenge>>,
    /// Token actions the upstream's challenges asked for, by the actions pullgate asked
    /// (`send_scoped`): e.g. `delete` -> `*`.
    learned: RwLock<std::collections::HashMap<String, String>>,
    guard: Arc<AddressGuard>,
    metrics: Arc<Metrics>,
}

impl UpstreamClient {
    pub fn new(registry: Arc<Registry>, metrics: Arc<Metrics>) -> Result<Self, String> {
        let guard = Arc::new(AddressGuard::new(&registry.upstream.host));
        let tls = tls::client_config(registry.ca.as_deref())?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .dns_resolver(Arc::new(guard::GuardedResolver(guard.clone())))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .pool_idle_timeout(Duration::from_secs(90))
            // HTTP/1.1 (see tls.rs) means a connection per concurrent fill; keep a few idle
            // for reuse, not every one a burst opened (each holds TLS buffers and a descriptor).
            .pool_max_idle_per_host(IDLE_CONNECTIONS)
            .http1_only()
            .user_agent(concat!("pullgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        let server = match (registry.upstream.https, registry.upstream.port) {
            (true, 443) | (false, 80) => registry.upstream.host.clone(),
            (_, port) => format!("{}:{port}", registry.upstream.host),
        };
        let credentials = CredentialProvider::new(registry.credentials.clone(), server);
        Ok(UpstreamClient {
            registry,
            http,
            credentials,
            tokens: TokenCache::default(),
            challenge: RwLock::new(None),
            learned: RwLock::new(std::collections::HashMap::new()),
            guard,
            metrics,
        })
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Send `req`, authenticating as the upstream demands (one retry after a 401 with fresh
    /// credentials) and following redirects (at most `MAX_REDIRECTS`).
    pub async fn send(&self, req: &UpstreamRequest) -> Result<UpstreamResponse, UpstreamError> {
        self.send_as(req, "pull").await
    }

    /// [`UpstreamClient::send`] for a request that needs `actions` on its repository (e.g.
    /// `delete`, distribution's name for DELETE). When the upstream's challenge asks for other
    /// actions on the same repository (`scope="repository:<name>:*"`), the token is fetched
    /// for those and they are used up front from then on.
    pub async fn send_scoped(
        &self,
        req: &UpstreamRequest,
        actions: &str,
    ) -> Result<UpstreamResponse, UpstreamError> {
        self.send_as(req, actions).await
    }

    async fn send_as(
        &self,
        req: &UpstreamRequest,
        actions: &str,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let url = format!("{}{}", self.registry.upstream.origin, req.path_and_query);
        let learned = self.learned_actions(actions);
        let mut scope = req
            .repository
            .as_ref()
            .map(|r| format!("repository:{}:{learned}", r.as_str()));
        let known = self.known_challenge();
        let auth = match &known {
            Some(c) => self.authorization(c, scope.as_deref(), false).await?,
            None => None,
        };
        let first = self.send_once(req, &url, auth.as_ref()).await?;
        if first.status() != StatusCode::UNAUTHORIZED {
            return self.follow(req, first, auth).await;
        }
        let challenges = first
            .headers()
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(parse_challenges)
            .collect::<Vec<_>>();
        let Some(challenge) = pick_challenge(challenges) else {
            return Err(self.denied(req, "it answered 401 without a usable challenge"));
        };
        self.learn(&challenge);
        if known.is_some() {
            // What we presented was refused: never reuse it.
            if let Some(s) = &scope {
                self.tokens.forget(s, DEFAULT_CREDENTIAL);
            }
            self.credentials.invalidate();
        }
        if actions != "pull" {
            if let (Some(repository), Some(wanted)) = (
                &req.repository,
                req.repository
                    .as_ref()
                    .and_then(|r| token::challenge_actions(&challenge, r.as_str())),
            ) {
                self.remember_actions(actions, &wanted);
                scope = Some(format!("repository:{}:{wanted}", repository.as_str()));
            }
        }
        let auth = self
            .authorization(&challenge, scope.as_deref(), true)
            .await?;
        if auth.is_none() && known.is_none() && self.credentials.is_anonymous() {
            return Err(self.denied(req, "it requires credentials and none are configured"));
        }
        let second = self.send_once(req, &url, auth.as_ref()).await?;
        if second.status() == StatusCode::UNAUTHORIZED {
            return Err(self.denied(req, "it answered 401 to a freshly issued token"));
        }
        self.follow(req, second, auth).await
    }

    /// The `Authorization` value for writes to `repository` (token scope `pull,push`, plus
    /// `pull` on `mount_from` for a cross-repository mount), for requests that go to the
    /// upstream through Pingora's proxy path rather than through this client. Learns the
    /// upstream's challenge with a `GET /v2/` first when none is known. `None`: the upstream
    /// wants no credentials. `refresh` skips the token cache (the last token was refused).
    pub async fn push_authorization(
        &self,
        repository: &Repository,
        mount_from: Option<&Repository>,
        refresh: bool,
    ) -> Result<Option<Secret>, UpstreamError> {
        let challenge = match self.known_challenge() {
            Some(c) => c,
            None => {
                let probe = UpstreamRequest {
                    method: Method::GET,
                    path_and_query: "/v2/".into(),
                    repository: Some(repository.clone()),
                    headers: HeaderMap::new(),
                };
                let url = format!("{}/v2/", self.registry.upstream.origin);
                let answer = self.send_once(&probe, &url, None).await?;
                if answer.status() != StatusCode::UNAUTHORIZED {
                    return Ok(None);
                }
                let challenges = answer
                    .headers()
                    .get_all(header::WWW_AUTHENTICATE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(parse_challenges)
                    .collect::<Vec<_>>();
                let Some(c) = pick_challenge(challenges) else {
                    return Err(self.denied(&probe, "it answered 401 without a usable challenge"));
                };
                self.learn(&c);
                c
            }
        };
        let mut scope = format!("repository:{}:pull,push", repository.as_str());
        if let Some(from) = mount_from {
            scope.push_str(&format!(" repository:{}:pull", from.as_str()));
        }
        self.authorization(&challenge, Some(&scope), refresh).await
    }

    /// The upstream's address for a direct connection (Pingora's proxy path): resolved without
    /// blocking, and only an address the SSRF guard allows (invariant 8).
    pub async fn resolve(&self) -> Result<std::net::SocketAddr, UpstreamError> {
        let up = &self.registry.upstream;
        let unreachable = |detail: String| UpstreamError::Unreachable {
            registry: self.registry.name.clone(),
            detail,
        };
        let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((up.host.as_str(), up.port))
            .await
            .map_err(|e| unreachable(format!("cannot resolve {}: {e}", up.host)))?
            .collect();
        self.guard
            .filter(&up.host, addrs)
            .into_iter()
            .next()
            .ok_or_else(|| unreachable(format!("{} has no usable address", up.host)))
    }

    /// The actions a token for `asked` carries: what the upstream's challenge asked for last
    /// time, else `asked` itself.
    fn learned_actions(&self, asked: &str) -> String {
        self.learned
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(asked)
            .cloned()
            .unwrap_or_else(|| asked.to_owned())
    }

    fn remember_actions(&self, asked: &str, wanted: &str) {
        self.learned
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(asked.to_owned(), wanted.to_owned());
    }

    fn known_challenge(&self) -> Option<Challenge> {
        self.challenge
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn learn(&self, challenge: &Challenge) {
        *self.challenge.write().unwrap_or_else(|e| e.into_inner()) = Some(challenge.clone());
    }

    fn denied(&self, req: &UpstreamRequest, detail: &str) -> UpstreamError {
        let repository = req
            .repository
            .as_ref()
            .map(|r| r.as_str().to_string())
            .unwrap_or_default();
        let detail = if self.credentials.is_anonymous() {
            format!("{detail} (anonymous access: the repository may not exist, or it needs credentials pullgate was not given)")
        } else {
            detail.to_string()
        };
        UpstreamError::AccessDenied {
            registry: self.registry.name.clone(),
            repository,
            detail,
        }
    }

    /// The `Authorization` value for a challenge: Basic with the credential, or a bearer token
    /// from the cache or the realm.
    async fn authorization(
        &self,
        challenge: &Challenge,
        scope: Option<&str>,
        refresh: bool,
    ) -> Result<Option<Secret>, UpstreamError> {
        match challenge {
            Challenge::Basic => Ok(self.credential().await?.and_then(|c| c.basic_header())),
            Challenge::Bearer {
                realm,
                service,
                scope: challenge_scope,
                ..
            } => {
                let scope = scope.or(challenge_scope.as_deref()).unwrap_or("");
                if !refresh {
                    if let Some(t) = self.tokens.get(scope, DEFAULT_CREDENTIAL) {
                        return Ok(Some(bearer(&t)));
                    }
                }
                let token = self.fetch_token(realm, service.as_deref(), scope).await;
                self.metrics.token_fetch(&self.registry.name, token.is_ok());
                Ok(Some(bearer(&token?)))
            }
        }
    }

    async fn credential(&self) -> Result<Option<Credential>, UpstreamError> {
        self.credentials
            .get()
            .await
            .map_err(|detail| UpstreamError::CredentialSource {
                registry: self.registry.name.clone(),
                detail,
            })
    }

    /// Ask the realm for a token for `scope`, presenting the credential only where invariant 1
    /// allows.
    async fn fetch_token(
        &self,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<Secret, UpstreamError> {
        let registry = self.registry.name.clone();
        let realm_url = url::Url::parse(realm).map_err(|_| UpstreamError::Protocol {
            registry: registry.clone(),
            detail: "its token realm is not a URL".into(),
        })?;
        if !matches!(realm_url.scheme(), "https" | "http") {
            return Err(UpstreamError::Protocol {
                registry,
                detail: "its token realm is not an http(s) URL".into(),
            });
        }
        self.check_literal_target(&realm_url)?;
        let trusted = token::realm_may_receive_credentials(
            &self.registry.upstream.host,
            self.registry.upstream.https,
            &realm_url,
            &self.registry.realm_hosts,
        );
        let credential = if trusted {
            self.credential().await?
        } else {
            None
        };
        if !trusted && !self.credentials.is_anonymous() {
            tracing::warn!(
                registry = %registry,
                realm_host = realm_url.host_str().unwrap_or(""),
                "token realm is not on the upstream's domain nor in realm_hosts; asking it anonymously"
            );
        }
        let mut query: Vec<(&str, &str)> = Vec::new();
        if let Some(s) = service {
            query.push(("service", s));
        }
        // Several scopes (a mount reads another repository) go as repeated parameters.
        for one in scope.split_whitespace() {
            query.push(("scope", one));
        }
        let request = match &credential {
            Some(Credential::IdentityToken(refresh)) => {
                let mut form = query.clone();
                form.push(("grant_type", "refresh_token"));
                form.push(("client_id", "pullgate"));
                form.push(("refresh_token", refresh.expose()));
                let body = url::form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(form)
                    .finish();
                self.http
                    .post(realm_url.clone())
                    .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .body(body)
            }
            Some(basic @ Credential::Basic { .. }) => {
                let mut r = self.http.get(with_query(&realm_url, &query));
                if let Some(h) = basic.basic_header() {
                    r = r.header(header::AUTHORIZATION, h.expose());
                }
                r
            }
            None => self.http.get(with_query(&realm_url, &query)),
        };
        let response = request
            .timeout(TOKEN_TIMEOUT)
            .send()
            .await
            .map_err(|e| self.transport_error(e, "token endpoint"))?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            self.credentials.invalidate();
            return Err(UpstreamError::CredentialsRejected {
                registry,
                detail: format!("its token endpoint answered {}", status.as_u16()),
            });
        }
        if !status.is_success() {
            return Err(UpstreamError::Unreachable {
                registry,
                detail: format!("its token endpoint answered {}", status.as_u16()),
            });
        }
        let body =
            read_capped(response, 1 << 20)
                .await
                .map_err(|detail| UpstreamError::Protocol {
                    registry: registry.clone(),
                    detail,
                })?;
        let parsed = token::parse_token_response(&body)
            .map_err(|detail| UpstreamError::Protocol { registry, detail })?;
        self.tokens.put(
            scope,
            DEFAULT_CREDENTIAL,
            parsed.token.clone(),
            parsed.expires_in,
        );
        Ok(parsed.token)
    }

    async fn send_once(
        &self,
        req: &UpstreamRequest,
        url: &str,
        auth: Option<&Secret>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let mut builder = self
            .http
            .request(req.method.clone(), url)
            .headers(req.headers.clone());
        if let Some(a) = auth {
            builder = builder.header(header::AUTHORIZATION, a.expose());
        }
        let started = std::time::Instant::now();
        let answer = builder.send().await;
        self.metrics.upstream(
            &self.registry.name,
            req.method.as_str(),
            answer.as_ref().ok().map(|r| r.status().as_u16()),
            started.elapsed().as_secs_f64(),
        );
        answer.map_err(|e| self.transport_error(e, "registry"))
    }

    /// Follow 3xx answers. Invariant 1: `Authorization` goes only to the upstream's own origin.
    async fn follow(
        &self,
        req: &UpstreamRequest,
        mut response: reqwest::Response,
        auth: Option<Secret>,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let mut hops = 0;
        while is_redirect(response.status()) {
            if hops == MAX_REDIRECTS {
                return Err(UpstreamError::TooManyRedirects {
                    registry: self.registry.name.clone(),
                });
            }
            hops += 1;
            let target = self.redirect_target(&response)?;
            let same_origin =
                target.origin().ascii_serialization() == self.registry.upstream.origin;
            let mut builder = self
                .http
                .request(req.method.clone(), target.clone())
                .headers(req.headers.clone());
            if same_origin {
                if let Some(a) = &auth {
                    builder = builder.header(header::AUTHORIZATION, a.expose());
                }
            }
            response = builder
                .send()
                .await
                .map_err(|e| self.transport_error(e, "redirect target"))?;
        }
        Ok(UpstreamResponse { response, hops })
    }

    fn redirect_target(&self, response: &reqwest::Response) -> Result<url::Url, UpstreamError> {
        let refused = |detail: &str| UpstreamError::RedirectRefused {
            registry: self.registry.name.clone(),
            detail: detail.to_string(),
        };
        let location = response
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| refused("a redirect without a Location"))?;
        let target = response
            .url()
            .join(location)
            .map_err(|_| refused("a Location that is not a URL"))?;
        if !matches!(target.scheme(), "https" | "http") {
            return Err(refused("a Location that is not http(s)"));
        }
        if self.registry.upstream.https && target.scheme() == "http" {
            tracing::debug!(registry = %self.registry.name, "following an https -> http redirect without credentials");
        }
        self.check_literal_target(&target)?;
        Ok(target)
    }

    /// Invariant 8 for IP literals (names are checked by the resolver when dialled).
    fn check_literal_target(&self, url: &url::Url) -> Result<(), UpstreamError> {
        let ip = match url.host() {
            Some(url::Host::Ipv4(ip)) => std::net::IpAddr::V4(ip),
            Some(url::Host::Ipv6(ip)) => std::net::IpAddr::V6(ip),
            Some(url::Host::Domain(_)) => return Ok(()),
            None => {
                return Err(UpstreamError::RedirectRefused {
                    registry: self.registry.name.clone(),
                    detail: "a URL without a host".into(),
                })
            }
        };
        if self.guard.allows(ip) {
            Ok(())
        } else {
            Err(UpstreamError::RedirectRefused {
                registry: self.registry.name.clone(),
                detail: format!(
                    "{ip} is a {:?} address the upstream does not live on",
                    classify(ip)
                ),
            })
        }
    }

    fn transport_error(&self, e: reqwest::Error, what: &str) -> UpstreamError {
        let registry = self.registry.name.clone();
        if e.is_timeout() {
            return UpstreamError::Timeout { registry };
        }
        // reqwest's Display never includes header values; the URL may carry a signed query,
        // so drop it.
        let detail = format!("{what}: {}", error_chain(&e.without_url()));
        if is_guard_refusal(&detail) {
            return UpstreamError::RedirectRefused { registry, detail };
        }
        UpstreamError::Unreachable { registry, detail }
    }
}

/// The realm URL with the token request's parameters added to its own.
fn with_query(realm: &url::Url, pairs: &[(&str, &str)]) -> url::Url {
    let mut url = realm.clone();
    if !pairs.is_empty() {
        url.query_pairs_mut().extend_pairs(pairs);
    }
    url
}

fn bearer(token: &Secret) -> Secret {
    Secret::new(format!("Bearer {}", token.expose()))
}

/// Prefer Bearer over Basic when an upstream offers both.
fn pick_challenge(challenges: Vec<Challenge>) -> Option<Challenge> {
    let bearer = challenges
        .iter()
        .find(|c| matches!(c, Challenge::Bearer { .. }))
        .cloned();
    bearer.or_else(|| challenges.into_iter().next())
}

fn is_redirect(status: StatusCode) -> bool {
    matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308)
}

fn is_guard_refusal(detail: &str) -> bool {
    detail.contains(guard::REFUSAL)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Read a whole body, refusing more than `cap` bytes (invariant 7).
pub async fn read_capped(mut response: reqwest::Response, cap: u64) -> Result<Vec<u8>, String> {
    if response.content_length().is_some_and(|n| n > cap) {
        return Err(format!("the body is larger than {cap} bytes"));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| format!("reading the body: {}", error_chain(&e.without_url())))?
    {
        if body.len() as u64 + chunk.len() as u64 > cap {
            return Err(format!("the body is larger than {cap} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Copy the headers an upstream request should carry from the client's request: every `Accept`
/// line (distribution refuses OCI manifests without them) and `Range`.
pub fn forwarded_headers(client: &HeaderMap, with_range: bool) -> HeaderMap {
    let mut out = HeaderMap::new();
    for value in client.get_all(header::ACCEPT) {
        out.append(header::ACCEPT, value.clone());
    }
    if with_range {
        if let Some(r) = client.get(header::RANGE) {
            out.insert(header::RANGE, r.clone());
        }
    }
    if out.get(header::ACCEPT).is_none() {
        out.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
    }
    out
}
