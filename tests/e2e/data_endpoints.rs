//! Data endpoints over TLS (issue 4): a registry host with `redirect = "data-endpoint"` sends
//! blob GETs to a data host with a 307 and a signed URL; real clients (skopeo, ctr) follow it,
//! both names resolving to 127.0.0.1 only inside the client's own mount namespace
//! ([`PrivateHosts`]) and both on one certificate from the test CA. The data host serves blob
//! reads only, and only with a signature the registry host made: tampered, expired and missing
//! signatures are `DENIED` before anything reaches the upstream or the cache.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::harness::{registry, Answer, Gateway};
use crate::support::{
    digest_of, free_port, run_cmd, wait_until, write_hosts_toml, Containerd, Pki, PrivateHosts,
    TestImage, Upstream, UpstreamOptions,
};
use crate::tls::{listener_keys, skopeo_pull};

/// The registry's private name, its data endpoint, and a name the certificate has but no
/// registry answers.
const HOST: &str = "private.dataep.test";
const DATA: &str = "blobs.dataep.test";
const NOBODY: &str = "nobody.dataep.test";
const REGISTRY: &str = "dataep";

/// An upstream with one image, and pullgate answering `HOST` and `DATA` on one TLS listener.
struct Bed {
    up: Upstream,
    img: TestImage,
    certs: Pki,
    tls_port: u16,
    gw: Gateway,
    /// The `server.redirect_key_file` the gateway signs with.
    key_file: PathBuf,
    _key_dir: tempfile::TempDir,
}

fn start(seed: &str) -> Bed {
    let up = Upstream::start(UpstreamOptions::default());
    let img = TestImage::multi_layer(seed, 2);
    up.push(&img, "team/app:v1");
    let certs = Pki::new();
    let pair = certs.issue(&[HOST, DATA, NOBODY]);
    let tls_port = free_port();
    let key_dir = tempfile::tempdir().expect("tempdir");
    let key_file = key_dir.path().join("redirect.key");
    std::fs::write(
        &key_file,
        format!("test-key-{seed}-0123456789abcdef0123456789abcdef\n"),
    )
    .expect("write key");
    let server = format!(
        "{}\nredirect_key_file = \"{}\"\n",
        listener_keys(tls_port, &[pair], ""),
        key_file.display()
    );
    let registries = registry(
        REGISTRY,
        &up,
        &format!("hosts = [\"{HOST}\"]\ndata_hosts = [\"{DATA}\"]\nredirect = \"data-endpoint\""),
    );
    let gw = Gateway::start_full(&server, &registries, None, "");
    Bed {
        up,
        img,
        certs,
        tls_port,
        gw,
        key_file,
        _key_dir: key_dir,
    }
}

impl Bed {
    fn url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.tls_port)
    }

    /// The image's layer and config digests (every blob a pull fetches).
    fn blobs(&self) -> Vec<String> {
        self.img.blobs().into_iter().map(|(d, _)| d).collect()
    }

    /// A URL for `digest` on the data host, signed with the gateway's key by the test itself.
    fn signed_by_test(&self, repository: &str, digest: &str, expires: u64) -> String {
        let key = pullgate::sign::RedirectKey::load(&self.key_file).expect("key");
        let grant = pullgate::sign::Grant {
            registry: REGISTRY.into(),
            account: None,
            repository: repository.into(),
            digest: digest.into(),
            expires,
        };
        self.url(
            DATA,
            &format!(
                "/v2/{repository}/blobs/{digest}?{}",
                key.signed_query(&grant)
            ),
        )
    }

    fn metrics(&self) -> String {
        String::from_utf8(crate::harness::get(&self.gw.admin_url("/metrics")).body).expect("utf8")
    }
}

/// One HTTPS request trusting the test CA, the test names resolved to 127.0.0.1, no redirects
/// followed.
fn fetch(ca_pem: &str, method: &str, url: &str, headers: &[(&str, &str)]) -> Answer {
    crate::support::install_crypto_provider();
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let client = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("CA")])
        .resolve(HOST, loopback)
        .resolve(DATA, loopback)
        .resolve(NOBODY, loopback)
        .build()
        .expect("client");
    crate::harness::request_with(client, method, url, headers)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// Audit lines for `digest` with this status.
fn audited(gw: &Gateway, digest: &str, status: u16) -> Vec<serde_json::Value> {
    gw.audit_lines()
        .into_iter()
        .filter(|l| l["reference"] == digest && l["status"] == status)
        .collect()
}

/// Waits until the audit log has a line for `digest` with `status` that `ok` accepts (lines are
/// written once the response is out, so a client may finish first).
fn wait_audited(gw: &Gateway, digest: &str, status: u16, ok: impl Fn(&serde_json::Value) -> bool) {
    wait_until(Duration::from_secs(10), "an audit line", || {
        audited(gw, digest, status).iter().any(&ok)
    })
    .unwrap_or_else(|e| panic!("{e}: {digest} {status}\n{:#?}", gw.audit_lines()));
}

/// Upstream requests with this method and path fragment after the first `since` requests
/// (the setup's push is in the log too).
fn upstream_count(up: &Upstream, since: usize, method: &str, fragment: &str) -> usize {
    up.requests()
        .iter()
        .skip(since)
        .filter(|r| r.method.eq_ignore_ascii_case(method) && r.uri.contains(fragment))
        .count()
}

// ---------------------------------------------------------------------------------------------
// Real clients follow the redirect

#[test]
fn data_endpoint_skopeo_follows_the_redirect_to_the_data_host() {
    let bed = start("dataep-skopeo");
    let hosts = PrivateHosts::new(&[HOST, DATA]);
    let reference = format!("{HOST}:{}/team/app:v1", bed.tls_port);
    let digest = skopeo_pull(&hosts, &reference, &bed.certs.cert_dir_for_clients())
        .expect("skopeo pulls, following the 307s to the data host");
    assert_eq!(digest, bed.img.manifest_digest());

    // Every blob: redirected on the registry host, served on the data host from one fill.
    for blob in bed.blobs() {
        wait_audited(&bed.gw, &blob, 307, |_| true);
        wait_audited(&bed.gw, &blob, 200, |l| {
            l["decision"] == "allow" && l["cache"] == "fill"
        });
        assert_eq!(bed.up.count_requests("GET", &format!("/blobs/{blob}")), 1);
    }

    // Again: the data host serves from the cache, the upstream is not asked for blobs.
    let again =
        skopeo_pull(&hosts, &reference, &bed.certs.cert_dir_for_clients()).expect("second pull");
    assert_eq!(again, bed.img.manifest_digest());
    for blob in bed.blobs() {
        wait_audited(&bed.gw, &blob, 200, |l| l["cache"] == "hit");
        assert_eq!(bed.up.count_requests("GET", &format!("/blobs/{blob}")), 1);
    }
}

#[test]
fn data_endpoint_ctr_follows_the_redirect_to_the_data_host() {
    let bed = start("dataep-ctr");
    let hosts = PrivateHosts::new(&[HOST, DATA]);
    let ctr = Containerd::start();
    let dir = ctr.hosts_dir();
    let endpoint = format!("{HOST}:{}", bed.tls_port);
    write_hosts_toml(
        &dir,
        &endpoint,
        &format!("https://{endpoint}"),
        None,
        Some(&bed.certs.ca_path()),
        false,
    );
    let reference = format!("{endpoint}/team/app:v1");
    let mut pull = hosts.wrap(&ctr.ctr());
    pull.args(["images", "pull", "--hosts-dir"])
        .arg(&dir)
        .arg(&reference);
    run_cmd(&mut pull).expect("ctr pulls, following the 307s to the data host");
    assert_eq!(
        ctr.image_digest(&reference).expect("pulled"),
        bed.img.manifest_digest()
    );
    for blob in bed.blobs() {
        wait_audited(&bed.gw, &blob, 307, |_| true);
        wait_audited(&bed.gw, &blob, 200, |l| l["decision"] == "allow");
    }
}

// ---------------------------------------------------------------------------------------------
// Signatures

#[test]
fn data_endpoint_redirect_is_signed_and_bad_signatures_are_denied_before_the_upstream() {
    let bed = start("dataep-sig");
    let ca = bed.certs.ca_pem();
    let blobs = bed.blobs();
    let layer = bed.img.layer_digests()[0].clone();
    let untouched: Vec<&String> = blobs.iter().filter(|b| **b != layer).collect();
    assert!(!untouched.is_empty());
    let since = bed.up.requests().len();

    // The registry host: a HEAD stays local, a GET is a 307 to the data host.
    let head = fetch(
        ca,
        "HEAD",
        &bed.url(HOST, &format!("/v2/team/app/blobs/{layer}")),
        &[],
    );
    assert_eq!(head.status, 200);
    let redirect = fetch(
        ca,
        "GET",
        &bed.url(HOST, &format!("/v2/team/app/blobs/{layer}")),
        &[],
    );
    assert_eq!(redirect.status, 307, "{}", redirect.oci_message());
    assert_eq!(
        redirect.header("cache-control").as_deref(),
        Some("no-store")
    );
    let location = redirect.header("location").expect("Location");
    let prefix = bed.url(DATA, &format!("/v2/team/app/blobs/{layer}?"));
    assert!(location.starts_with(&prefix), "{location}");
    assert!(
        location.contains("expires=") && location.contains("signature="),
        "{location}"
    );

    // Tampered: another digest, another repository, a later expiry, a changed signature.
    let (path, query) = location.split_once('?').expect("query");
    let params: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let expires: u64 = params
        .iter()
        .find(|(k, _)| k == "expires")
        .expect("expires")
        .1
        .parse()
        .expect("number");
    let signature = &params
        .iter()
        .find(|(k, _)| k == "signature")
        .expect("signature")
        .1;
    let mut flipped = signature.clone().into_bytes();
    flipped[0] = if flipped[0] == b'A' { b'B' } else { b'A' };
    let flipped = String::from_utf8(flipped).expect("ascii");
    let tampered = [
        format!("{}?{query}", path.replace(&layer, untouched[0])),
        format!("{}?{query}", path.replace("team/app", "team/other")),
        format!(
            "{path}?{}",
            query.replace(
                &format!("expires={expires}"),
                &format!("expires={}", expires + 3600)
            )
        ),
        format!("{path}?{}", query.replace(signature.as_str(), &flipped)),
    ];
    for url in &tampered {
        let denied = fetch(ca, "GET", url, &[]);
        assert_eq!(denied.status, 403, "{url}");
        assert_eq!(denied.oci_code().as_deref(), Some("DENIED"), "{url}");
        assert!(
            denied.oci_message().contains("does not match") && denied.oci_message().contains(HOST),
            "says what to do: {}",
            denied.oci_message()
        );
    }

    // Missing: a bare data-host URL.
    let bare = fetch(ca, "GET", path, &[]);
    assert_eq!(bare.status, 403);
    assert_eq!(bare.oci_code().as_deref(), Some("DENIED"));
    assert!(
        bare.oci_message().contains("data endpoint") && bare.oci_message().contains(HOST),
        "{}",
        bare.oci_message()
    );

    // Expired: genuinely signed with the gateway's key, ten seconds in the past.
    let expired_url = bed.signed_by_test("team/app", untouched[0], unix_now() - 10);
    let expired = fetch(ca, "GET", &expired_url, &[]);
    assert_eq!(expired.status, 403);
    assert_eq!(expired.oci_code().as_deref(), Some("DENIED"));
    assert!(
        expired.oci_message().contains("expired"),
        "{}",
        expired.oci_message()
    );

    // None of that reached the upstream or the cache.
    for blob in &untouched {
        for method in ["GET", "HEAD"] {
            assert_eq!(
                upstream_count(&bed.up, since, method, blob),
                0,
                "a denied request for {blob} reached the upstream"
            );
        }
    }
    for method in ["GET", "HEAD"] {
        assert_eq!(upstream_count(&bed.up, since, method, "/v2/team/other/"), 0);
    }
    let cache = bed.gw.cache_dir();
    for blob in &untouched {
        let hex = blob.trim_start_matches("sha256:");
        assert!(
            !cache
                .join("blobs/sha256")
                .join(&hex[..2])
                .join(hex)
                .exists(),
            "a denied request filled the cache"
        );
    }
    let metrics = bed.metrics();
    for (reason, n) in [
        ("signature_invalid", 4),
        ("signature_missing", 1),
        ("signature_expired", 1),
    ] {
        let line =
            format!("pullgate_denials_total{{reason=\"{reason}\",registry=\"{REGISTRY}\"}} {n}");
        assert!(metrics.contains(&line), "{line}\n{metrics}");
    }
    let denials = || -> Vec<serde_json::Value> {
        bed.gw
            .audit_lines()
            .into_iter()
            .filter(|l| l["decision"] == "deny")
            .collect()
    };
    wait_until(Duration::from_secs(10), "six denials audited", || {
        denials().len() == 6
    })
    .unwrap_or_else(|e| panic!("{e}: {:#?}", denials()));
    assert!(denials().iter().all(|l| {
        l["status"] == 403
            && l["registry"] == REGISTRY
            && l["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("signature_"))
    }));

    // The genuine URL serves the verified blob, whole and by Range.
    let served = fetch(ca, "GET", &location, &[]);
    assert_eq!(served.status, 200);
    assert_eq!(digest_of(&served.body), layer);
    let partial = fetch(ca, "GET", &location, &[("Range", "bytes=10-19")]);
    assert_eq!(partial.status, 206);
    assert_eq!(partial.body, served.body[10..20].to_vec());
    // A URL the test signed with the gateway's key, for a blob not cached yet: a fill.
    let fresh = fetch(
        ca,
        "GET",
        &bed.signed_by_test("team/app", untouched[0], unix_now() + 60),
        &[],
    );
    assert_eq!(fresh.status, 200);
    assert_eq!(&digest_of(&fresh.body), untouched[0]);

    // On the plain listener the redirect says http, with the port the client used.
    let plain = crate::harness::request(
        "GET",
        &bed.gw.url(&format!("/v2/team/app/blobs/{layer}")),
        &[("Host", &format!("{HOST}:{}", bed.gw.port))],
    );
    assert_eq!(plain.status, 307);
    let plain_location = plain.header("location").expect("Location");
    assert!(
        plain_location.starts_with(&format!(
            "http://{DATA}:{}/v2/team/app/blobs/{layer}?",
            bed.gw.port
        )),
        "{plain_location}"
    );
}

#[test]
fn data_host_serves_blobs_only_and_unknown_hosts_stay_name_unknown() {
    let bed = start("dataep-only");
    let ca = bed.certs.ca_pem();
    let layer = bed.img.layer_digests()[0].clone();
    let since = bed.up.requests().len();
    let signed = bed.signed_by_test("team/app", &layer, unix_now() + 60);
    let query = signed.split_once('?').expect("query").1.to_string();
    for (method, path) in [
        ("GET", "/v2/team/app/manifests/v1".to_string()),
        ("HEAD", "/v2/team/app/manifests/v1".to_string()),
        ("GET", format!("/v2/team/app/manifests/v1?{query}")),
        ("GET", "/v2/team/app/manifests/v1?ns=docker.io".to_string()),
        ("GET", "/v2/team/app/tags/list".to_string()),
        ("GET", format!("/v2/team/app/referrers/{layer}")),
        ("POST", "/v2/team/app/blobs/uploads/".to_string()),
        ("DELETE", format!("/v2/team/app/blobs/{layer}?{query}")),
    ] {
        let refused = fetch(ca, method, &bed.url(DATA, &path), &[]);
        assert_eq!(refused.status, 405, "{method} {path}");
        if method != "HEAD" {
            assert_eq!(refused.oci_code().as_deref(), Some("UNSUPPORTED"));
            let message = refused.oci_message();
            assert!(
                message.contains(DATA) && message.contains("blobs only") && message.contains(HOST),
                "{message}"
            );
        }
    }
    // A host no registry has stays NAME_UNKNOWN, naming it.
    let unknown = fetch(
        ca,
        "GET",
        &bed.url(NOBODY, &format!("/v2/team/app/blobs/{layer}")),
        &[],
    );
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.oci_code().as_deref(), Some("NAME_UNKNOWN"));
    assert!(unknown.oci_message().contains(NOBODY));

    // Nothing of it reached the upstream.
    let reached: Vec<_> = bed.up.requests().into_iter().skip(since).collect();
    assert!(reached.is_empty(), "reached the upstream: {reached:?}");
    // The signed blob itself is served.
    let served = fetch(ca, "GET", &signed, &[]);
    assert_eq!(served.status, 200);
    assert_eq!(digest_of(&served.body), layer);
}

// ---------------------------------------------------------------------------------------------
// Scoped credentials

/// A plain-HTTP GET from source address `from` to the gateway, with this Host header; no
/// redirects followed.
fn get_from(from: &str, gw: &Gateway, path_and_query: &str, host: &str) -> Answer {
    crate::harness::request_with(
        crate::harness::client_from(from),
        "GET",
        &gw.url(path_and_query),
        &[("Host", host)],
    )
}

#[test]
fn data_endpoint_fills_with_the_account_the_registry_host_chose() {
    // Upstream accounts: alice may use everything, bob only team-b/.
    let accounts = crate::policy::TwoAccounts::start();
    let img = TestImage::small("dataep-scoped");
    accounts.up.push(&img, "team-a/app:v1");
    // Callers in the vpc zone pull with alice's account ("full"); everyone else with bob's.
    // The key is generated in the cache dir (no redirect_key_file).
    let gw = Gateway::start_full(
        "",
        &accounts.config(&format!(
            "hosts = [\"{HOST}\"]\ndata_hosts = [\"{DATA}\"]\nredirect = \"data-endpoint\""
        )),
        None,
        "",
    );
    let key = gw.cache_dir().join(pullgate::sign::GENERATED_KEY_FILE);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key)
        .expect("generated key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let layer = img.layer_digests()[0].clone();
    let path = format!("/v2/team-a/app/blobs/{layer}");
    let registry_host = format!("{HOST}:{}", gw.port);
    let data_host = format!("{DATA}:{}", gw.port);

    // Outside the zone: bob's account, which cannot read team-a. The redirect carries no
    // account, and the data host fills with bob's: the upstream refuses.
    let outside = get_from("127.0.0.4", &gw, &path, &registry_host);
    assert_eq!(outside.status, 307);
    let outside_location = outside.header("location").expect("Location");
    assert!(!outside_location.contains("account="), "{outside_location}");

    // In the zone: alice's account, named in the signed URL.
    let inside = get_from("127.0.0.2", &gw, &path, &registry_host);
    assert_eq!(inside.status, 307);
    let location = inside.header("location").expect("Location");
    let prefix = format!("http://{data_host}");
    let target = location
        .strip_prefix(&prefix)
        .expect("the data host, same port");
    assert!(target.contains("account=full"), "{location}");

    // Followed from anywhere (the data host has no zones to check): filled with alice's account.
    let served = get_from("127.0.0.4", &gw, target, &data_host);
    assert_eq!(served.status, 200, "{}", served.oci_message());
    assert_eq!(digest_of(&served.body), layer);

    // The account dropped or swapped is an altered URL.
    for altered in [
        target.replace("account=full&", ""),
        target.replace("account=full", "account=other"),
    ] {
        let denied = get_from("127.0.0.4", &gw, &altered, &data_host);
        assert_eq!(denied.status, 403, "{altered}");
        assert_eq!(denied.oci_code().as_deref(), Some("DENIED"));
    }
    // Bob's URL: the signature is good, bob's account is not (upstream's answer).
    let bobs = outside_location.strip_prefix(&prefix).expect("data host");
    let refused = get_from("127.0.0.4", &gw, bobs, &data_host);
    assert_eq!(refused.status, 403, "{}", refused.oci_message());
    assert!(
        !refused.oci_message().contains("signature"),
        "{}",
        refused.oci_message()
    );

    wait_until(
        Duration::from_secs(10),
        "the data host's audit line",
        || {
            audited(&gw, &layer, 200)
                .iter()
                .any(|l| l["credential"] == "registry.hub.scoped_credentials.full")
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {:#?}", gw.audit_lines()));
}
