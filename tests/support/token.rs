//! The Docker token service in front of the upstream (what auth.docker.io / ghcr.io/token do),
//! so the bearer flow pullgate speaks to registries is exercised against distribution itself.
//!
//! Tokens are ES256 JWS with a libtrust `kid`, which is the form distribution 2.8 verifies
//! against its `rootcertbundle` (the self-signed certificate of the signing key).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::Request;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

use super::{resp, serve, Handler, Pki, Resp, ServerHandle};

/// Who may do what, and how tokens look.
#[derive(Clone, Debug)]
pub struct TokenIssuerOptions {
    /// (user, password) pairs; each user may pull and push every repository.
    pub users: Vec<(String, String)>,
    /// Repositories whose name starts with one of these may be pulled anonymously.
    pub public_prefixes: Vec<String>,
    /// (user, prefix): that user may use only repositories whose name starts with the prefix.
    pub restricted: Vec<(String, String)>,
    /// Token lifetime in seconds (`exp - iat`), also sent as `expires_in`.
    pub ttl_secs: u64,
    /// Whether the response carries `expires_in` (clients then assume 60 s).
    pub send_expires_in: bool,
    /// The `iss` claim; must equal the registry's `auth.token.issuer`.
    pub issuer: String,
    /// distribution 2.8 accepts a token until 60 s AFTER its `exp` (a fixed leeway). When true,
    /// `exp` is written 60 s early so the registry really refuses the token `ttl_secs` after
    /// issue (what short-TTL tests want); `expires_in` still says `ttl_secs`. A client that
    /// reads `exp` from the JWT then sees an already-past `exp`: leave false for such tests.
    pub cancel_registry_leeway: bool,
}

/// The fixed clock leeway distribution 2.8.2 applies to `exp` and `nbf` (measured).
pub const REGISTRY_LEEWAY_SECS: u64 = 60;

impl Default for TokenIssuerOptions {
    fn default() -> Self {
        TokenIssuerOptions {
            users: vec![("alice".into(), "alice-secret-pw".into())],
            public_prefixes: vec!["public/".into()],
            restricted: Vec::new(),
            ttl_secs: 300,
            send_expires_in: true,
            issuer: "test-issuer".into(),
            cancel_registry_leeway: false,
        }
    }
}

/// One request the issuer saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRequest {
    /// "GET" or "POST".
    pub method: String,
    /// The user named by Basic auth (GET) or the form's `username` (POST password grant), or the
    /// owner of a refresh token.
    pub basic_user: Option<String>,
    /// Credentials were given and valid.
    pub authenticated: bool,
    /// Requested scopes, as sent (`repository:NAME:ACTIONS`).
    pub scopes: Vec<String>,
    /// Every requested action of every scope was granted (false on 401 and on partial grants).
    pub granted: bool,
}

struct State {
    opts: TokenIssuerOptions,
    ttl: AtomicU64,
    send_expires_in: AtomicBool,
    cancel_leeway: AtomicBool,
    key: EcdsaKeyPair,
    kid: String,
    requests: Mutex<Vec<TokenRequest>>,
    refresh_tokens: Mutex<HashMap<String, String>>,
    fail_all: AtomicBool,
}

/// An HTTPS token server on 127.0.0.1:0; stopped on Drop.
pub struct TokenIssuer {
    state: Arc<State>,
    server: ServerHandle,
    rootcert: PathBuf,
    _dir: tempfile::TempDir,
}

impl TokenIssuer {
    /// Starts the issuer with the Pki's loopback certificate.
    pub fn start(pki: &Pki, opts: TokenIssuerOptions) -> TokenIssuer {
        let dir = tempfile::Builder::new()
            .prefix("token-")
            .tempdir()
            .expect("tempdir");
        let (key_pkcs8, cert_pem, spki) = signing_key();
        let rootcert = dir.path().join("token-signing.crt");
        std::fs::write(&rootcert, cert_pem).expect("write rootcert");
        let rng = ring::rand::SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &key_pkcs8, &rng)
            .expect("ring key");
        let state = Arc::new(State {
            ttl: AtomicU64::new(opts.ttl_secs),
            send_expires_in: AtomicBool::new(opts.send_expires_in),
            cancel_leeway: AtomicBool::new(opts.cancel_registry_leeway),
            opts,
            key,
            kid: libtrust_kid(&spki),
            requests: Mutex::new(Vec::new()),
            refresh_tokens: Mutex::new(HashMap::new()),
            fail_all: AtomicBool::new(false),
        });
        let st = state.clone();
        let handler: Handler = Arc::new(move |req| {
            let st = st.clone();
            Box::pin(async move { handle(&st, req).await })
        });
        let server = serve(Some(pki.server_config()), handler);
        TokenIssuer {
            state,
            server,
            rootcert,
            _dir: dir,
        }
    }

    /// `https://127.0.0.1:PORT/token`
    pub fn realm(&self) -> String {
        format!("https://127.0.0.1:{}/token", self.server.addr.port())
    }
    pub fn port(&self) -> u16 {
        self.server.addr.port()
    }
    /// The self-signed certificate of the signing key: the registry's `rootcertbundle`.
    pub fn rootcert_path(&self) -> &Path {
        &self.rootcert
    }
    /// The `iss` claim of its tokens (the registry's `auth.token.issuer`).
    pub fn issuer_name(&self) -> &str {
        &self.state.opts.issuer
    }
    /// The libtrust key id in every token header.
    pub fn kid(&self) -> &str {
        &self.state.kid
    }
    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.state.requests.lock().unwrap().clone()
    }
    pub fn clear_requests(&self) {
        self.state.requests.lock().unwrap().clear();
    }
    /// Changes the lifetime of tokens issued from now on.
    pub fn set_ttl(&self, secs: u64) {
        self.state.ttl.store(secs, Ordering::SeqCst);
    }
    /// See [`TokenIssuerOptions::cancel_registry_leeway`].
    pub fn set_cancel_registry_leeway(&self, on: bool) {
        self.state.cancel_leeway.store(on, Ordering::SeqCst);
    }
    pub fn set_send_expires_in(&self, on: bool) {
        self.state.send_expires_in.store(on, Ordering::SeqCst);
    }
    /// While on, every token request gets 503 (a token-service outage).
    pub fn set_unavailable(&self, on: bool) {
        self.state.fail_all.store(on, Ordering::SeqCst);
    }
    /// Signs a token issued `age_secs` ago with lifetime `ttl_secs` (to probe expiry without
    /// waiting).
    pub fn mint_aged(
        &self,
        sub: &str,
        service: &str,
        access: serde_json::Value,
        age_secs: u64,
        ttl_secs: u64,
    ) -> String {
        sign_jwt_at(
            &self.state,
            sub,
            service,
            access,
            now().saturating_sub(age_secs),
            ttl_secs,
        )
    }
    /// Signs a token directly (for tests that need one without HTTP).
    pub fn mint(&self, sub: &str, service: &str, access: serde_json::Value) -> String {
        sign_jwt(&self.state, sub, service, access)
    }
}

/// A fresh P-256 key: (PKCS#8 DER, self-signed cert PEM, SPKI DER).
fn signing_key() -> (Vec<u8>, String, Vec<u8>) {
    use rcgen::PublicKeyData;
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params =
        rcgen::CertificateParams::new(vec!["token-signer".to_string()]).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "token-signer");
    let cert = params.self_signed(&kp).expect("self-signed");
    (kp.serialize_der(), cert.pem(), kp.subject_public_key_info())
}

/// libtrust key id: base32 (no padding) of the first 30 bytes of SHA-256(SPKI DER), in groups
/// of 4 joined by ':' — what distribution 2.8 matches against its rootcertbundle.
pub fn libtrust_kid(spki_der: &[u8]) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(spki_der);
    let b32 = data_encoding::BASE32_NOPAD.encode(&h[..30]);
    b32.as_bytes()
        .chunks(4)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect::<Vec<_>>()
        .join(":")
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn sign_jwt(st: &State, sub: &str, service: &str, access: serde_json::Value) -> String {
    sign_jwt_at(
        st,
        sub,
        service,
        access,
        now(),
        st.ttl.load(Ordering::SeqCst),
    )
}

fn sign_jwt_at(
    st: &State,
    sub: &str,
    service: &str,
    access: serde_json::Value,
    iat: u64,
    ttl: u64,
) -> String {
    let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "kid": st.kid});
    let mut exp = iat + ttl;
    if st.cancel_leeway.load(Ordering::SeqCst) {
        exp = exp.saturating_sub(REGISTRY_LEEWAY_SECS);
    }
    let jti = format!("{:016x}{:08x}", iat, rand_u32());
    let claims = serde_json::json!({
        "iss": st.opts.issuer, "sub": sub, "aud": service,
        "exp": exp, "nbf": iat.saturating_sub(1), "iat": iat,
        "jti": jti, "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let rng = ring::rand::SystemRandom::new();
    let sig = st.key.sign(&rng, signing_input.as_bytes()).expect("sign");
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).unwrap();
    u32::from_le_bytes(b)
}

/// Parsed `application/x-www-form-urlencoded` / query pairs.
pub fn parse_form(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Result of checking credentials.
enum Who {
    Anonymous,
    User(String),
    BadCredentials(Option<String>),
}

fn check_password(st: &State, user: &str, pw: &str) -> Who {
    if st.opts.users.iter().any(|(u, p)| u == user && p == pw) {
        Who::User(user.to_string())
    } else {
        Who::BadCredentials(Some(user.to_string()))
    }
}

fn basic_auth(req: &Request<Incoming>) -> Option<(String, String)> {
    let v = req.headers().get("authorization")?.to_str().ok()?;
    let b64 = v
        .strip_prefix("Basic ")
        .or_else(|| v.strip_prefix("basic "))?;
    let raw = String::from_utf8(STANDARD.decode(b64.trim()).ok()?).ok()?;
    let (u, p) = raw.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

/// The actions `who` may do on repository `name`.
fn allowed(st: &State, who: &Who, typ: &str, name: &str) -> Vec<&'static str> {
    match (who, typ) {
        (Who::User(u), "repository")
            if st
                .opts
                .restricted
                .iter()
                .any(|(user, prefix)| user == u && !name.starts_with(prefix.as_str())) =>
        {
            vec![]
        }
        (Who::User(_), "repository") => vec!["pull", "push", "delete", "*"],
        (Who::User(_), "registry") => vec!["*"],
        (Who::Anonymous, "repository")
            if st
                .opts
                .public_prefixes
                .iter()
                .any(|p| name.starts_with(p.as_str())) =>
        {
            vec!["pull"]
        }
        _ => vec![],
    }
}

/// Grants the intersection of requested and allowed actions for each scope; returns the access
/// claim and whether everything requested was granted.
fn grant(st: &State, who: &Who, scopes: &[String]) -> (serde_json::Value, bool) {
    let mut access = Vec::new();
    let mut all = true;
    for scope in scopes {
        for one in scope.split(' ').filter(|s| !s.is_empty()) {
            let Some((typ, rest)) = one.split_once(':') else {
                continue;
            };
            let Some((name, actions)) = rest.rsplit_once(':') else {
                continue;
            };
            let ok = allowed(st, who, typ, name);
            let wanted: Vec<&str> = actions.split(',').filter(|a| !a.is_empty()).collect();
            let given: Vec<&str> = wanted.iter().copied().filter(|a| ok.contains(a)).collect();
            all &= given.len() == wanted.len();
            if !given.is_empty() {
                access.push(serde_json::json!({"type": typ, "name": name, "actions": given}));
            }
        }
    }
    (serde_json::Value::Array(access), all)
}

async fn handle(st: &State, req: Request<Incoming>) -> Resp {
    if st.fail_all.load(Ordering::SeqCst) {
        return resp(503, &[], "token service unavailable");
    }
    if req.uri().path() != "/token" {
        return resp(404, &[], "not found");
    }
    let method = req.method().as_str().to_string();
    let query = parse_form(req.uri().query().unwrap_or(""));
    let basic = basic_auth(&req);
    let mut params = query;
    if method == "POST" {
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        params.extend(parse_form(&String::from_utf8_lossy(&body)));
    }
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let scopes: Vec<String> = params
        .iter()
        .filter(|(k, _)| k == "scope")
        .map(|(_, v)| v.clone())
        .collect();
    let service = get("service").unwrap_or_default();
    let who = if method == "POST" {
        match get("grant_type").as_deref() {
            Some("password") => check_password(
                st,
                &get("username").unwrap_or_default(),
                &get("password").unwrap_or_default(),
            ),
            Some("refresh_token") => match st
                .refresh_tokens
                .lock()
                .unwrap()
                .get(&get("refresh_token").unwrap_or_default())
            {
                Some(u) => Who::User(u.clone()),
                None => Who::BadCredentials(None),
            },
            _ => Who::Anonymous,
        }
    } else {
        match &basic {
            Some((u, p)) => check_password(st, u, p),
            None => Who::Anonymous,
        }
    };
    let (user, authenticated) = match &who {
        Who::User(u) => (Some(u.clone()), true),
        Who::BadCredentials(u) => (u.clone(), false),
        Who::Anonymous => (None, false),
    };
    let mut record = TokenRequest {
        method: method.clone(),
        basic_user: user.clone(),
        authenticated,
        scopes: scopes.clone(),
        granted: false,
    };
    if let Who::BadCredentials(_) = who {
        st.requests.lock().unwrap().push(record);
        let body =
            r#"{"errors":[{"code":"UNAUTHORIZED","message":"invalid username or password"}]}"#;
        return resp(
            401,
            &[
                ("content-type", "application/json"),
                ("www-authenticate", "Basic realm=\"token\""),
            ],
            body,
        );
    }
    let (access, all) = grant(st, &who, &scopes);
    record.granted = all;
    st.requests.lock().unwrap().push(record);
    let token = sign_jwt(st, user.as_deref().unwrap_or(""), &service, access);
    let mut body = serde_json::json!({
        "token": token, "access_token": token, "issued_at": rfc3339(now()),
    });
    if st.send_expires_in.load(Ordering::SeqCst) {
        body["expires_in"] = st.ttl.load(Ordering::SeqCst).into();
    }
    if method == "POST" {
        if let Some(u) = &user {
            let rt = format!("rt-{u}-{:08x}{:08x}", rand_u32(), rand_u32());
            st.refresh_tokens
                .lock()
                .unwrap()
                .insert(rt.clone(), u.clone());
            body["refresh_token"] = rt.into();
        }
    }
    resp(
        200,
        &[("content-type", "application/json")],
        body.to_string(),
    )
}

/// Seconds since the epoch as RFC 3339 UTC (civil-from-days, no chrono dependency).
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
