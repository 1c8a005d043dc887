//! TLS listeners: real clients (skopeo, ctr, dockerd, reqwest, a bare rustls client) over TLS
//! with the test CA, through a `private.*` host name that only the client's own /etc/hosts knows
//! ([`PrivateHosts`]), dockerd trusting it through its certs.d; certificates picked by SNI;
//! HTTP/2 by ALPN; client certificates as identities; a certificate swapped on disk served
//! without a restart; errors that name keys.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use crate::harness::{registry, Gateway, MANIFEST_ACCEPT};
use crate::support::{
    free_port, run_cmd, wait_until, write_hosts_toml, Containerd, Dockerd, Pki, PrivateHosts,
    TestImage, Upstream, UpstreamOptions,
};

/// The registry's private name, and a sibling only the wildcard certificate covers.
const HOST: &str = "private.tls.test";
const OTHER: &str = "nobody.tls.test";
const CLIENT: &str = "puller.internal";

/// An upstream with one image, and pullgate answering `HOST` on a TLS listener whose first
/// certificate names `HOST` and 127.0.0.1 and whose second is `*.tls.test`.
struct Bed {
    _up: Upstream,
    img: TestImage,
    /// The CA of the gateway's server certificates.
    certs: Pki,
    /// The CA of client certificates (`client_ca`).
    clients: Pki,
    pairs: Vec<(PathBuf, PathBuf)>,
    tls_port: u16,
    gw: Gateway,
}

struct Options<'a> {
    /// Extra keys of the `[[server.tls]]` listener (`client_ca = ...`).
    listener: &'a str,
    /// Extra lines of the registry.
    registry: &'a str,
    /// Tables before the registry (`[[identity]]`).
    before: &'a str,
}

const PLAIN: Options<'static> = Options {
    listener: "",
    registry: "",
    before: "",
};

fn start(seed: &str, opts: Options<'_>) -> Bed {
    let up = Upstream::start(UpstreamOptions::default());
    let img = TestImage::small(seed);
    assert_eq!(up.push(&img, "team/app:v1"), img.manifest_digest());
    let certs = Pki::new();
    let clients = Pki::new();
    let pairs = vec![
        certs.issue(&[HOST, "127.0.0.1"]),
        certs.issue(&["*.tls.test"]),
    ];
    let tls_port = free_port();
    let listener = listener_keys(
        tls_port,
        &pairs,
        &opts
            .listener
            .replace("{clients_ca}", &clients.ca_path().display().to_string()),
    );
    let rest = format!(
        "{}\n{}",
        opts.before,
        registry(
            "tlsreg",
            &up,
            &format!("hosts = [\"{HOST}\"]\n{}", opts.registry)
        )
    );
    let gw = Gateway::start_full(&listener, &rest, None, "");
    Bed {
        _up: up,
        img,
        certs,
        clients,
        pairs,
        tls_port,
        gw,
    }
}

/// `tls = [{ listen, certs, ... }]` as one `[server]` key (inline tables are one line).
pub fn listener_keys(port: u16, pairs: &[(PathBuf, PathBuf)], extra: &str) -> String {
    let certs: Vec<String> = pairs
        .iter()
        .map(|(c, k)| {
            format!(
                "{{ cert = \"{}\", key = \"{}\" }}",
                c.display(),
                k.display()
            )
        })
        .collect();
    format!(
        "tls = [{{ listen = \"127.0.0.1:{port}\", certs = [{}]{extra} }}]",
        certs.join(", ")
    )
}

impl Bed {
    /// `private.tls.test:PORT`, as clients name the endpoint.
    fn endpoint(&self) -> String {
        format!("{HOST}:{}", self.tls_port)
    }
    fn url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.tls_port)
    }
}

// ---------------------------------------------------------------------------------------------
// Clients

/// What an HTTPS request came back with.
#[derive(Debug)]
struct Reply {
    status: u16,
    version: reqwest::Version,
    body: Vec<u8>,
}

impl Reply {
    fn oci_code(&self) -> String {
        let json: serde_json::Value = serde_json::from_slice(&self.body).unwrap_or_default();
        json["errors"][0]["code"].as_str().unwrap_or("").to_string()
    }
    fn oci_message(&self) -> String {
        let json: serde_json::Value = serde_json::from_slice(&self.body).unwrap_or_default();
        json["errors"][0]["message"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

#[derive(Default)]
struct Https<'a> {
    /// Client certificate and key files.
    identity: Option<(&'a Path, &'a Path)>,
    http1_only: bool,
}

/// GET `url` with reqwest trusting only `ca_pem`; the test names resolve to 127.0.0.1. Err is
/// a connection or handshake failure.
fn https_get(ca_pem: &str, url: &str, o: Https<'_>) -> Result<Reply, String> {
    crate::support::install_crypto_provider();
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut b = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .tls_certs_only([reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("CA")])
        .resolve(HOST, loopback)
        .resolve(OTHER, loopback)
        .resolve("x.tls.test", loopback)
        .resolve("private.ghcr.io", loopback);
    if let Some((cert, key)) = o.identity {
        let mut pem = std::fs::read(cert).expect("client cert");
        pem.extend(std::fs::read(key).expect("client key"));
        b = b.identity(reqwest::Identity::from_pem(&pem).expect("identity"));
    }
    if o.http1_only {
        b = b.http1_only();
    }
    let client = b.build().expect("client");
    let url = url.to_string();
    crate::support::block_on(async move {
        let resp = client
            .get(&url)
            .header("Accept", MANIFEST_ACCEPT)
            .send()
            .await
            .map_err(|e| format!("{url}: {e:?}"))?;
        let status = resp.status().as_u16();
        let version = resp.version();
        let body = resp.bytes().await.map_err(|e| e.to_string())?.to_vec();
        Ok(Reply {
            status,
            version,
            body,
        })
    })
}

/// What a bare rustls client saw in a handshake.
struct Handshake {
    leaf: Vec<u8>,
    alpn: Option<Vec<u8>>,
    version: rustls::ProtocolVersion,
}

/// A handshake with `sni` (None: an IP address, so no SNI is sent), accepting any server
/// certificate so the test can look at which one was served.
fn handshake(
    port: u16,
    sni: Option<&str>,
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<Handshake, String> {
    use std::io::Write;
    crate::support::install_crypto_provider();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = match sni {
        Some(n) => rustls::pki_types::ServerName::try_from(n.to_string()).expect("name"),
        None => {
            rustls::pki_types::ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into())
        }
    };
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).map_err(|e| e.to_string())?;
    }
    let leaf = conn.peer_certificates().ok_or("no certificate")?[0].to_vec();
    let seen = Handshake {
        leaf,
        alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
        version: conn.protocol_version().ok_or("no version")?,
    };
    conn.send_close_notify();
    let _ = conn.complete_io(&mut tcp);
    let _ = tcp.flush();
    Ok(seen)
}

/// Accepts any server certificate (signatures are still checked): for looking, not trusting.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The DER of the first certificate of a PEM file.
fn leaf_of(pem_file: &Path) -> Vec<u8> {
    let pem = std::fs::read(pem_file).expect("pem");
    let first = rustls_pemfile::certs(&mut pem.as_slice()).next();
    first.expect("a certificate").expect("pem").to_vec()
}

/// `skopeo copy docker://REF oci:TMP:pulled` with `cert_dir` (ca.crt, and client.cert +
/// client.key for mTLS), the names of `hosts` resolving to 127.0.0.1. Returns the manifest
/// digest skopeo wrote.
pub fn skopeo_pull(
    hosts: &PrivateHosts,
    reference: &str,
    cert_dir: &Path,
) -> Result<String, String> {
    let out = tempfile::tempdir().expect("tempdir");
    let aux = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new("skopeo");
    cmd.env("REGISTRY_AUTH_FILE", aux.path().join("auth.json"))
        .env("XDG_RUNTIME_DIR", aux.path())
        .env("DOCKER_CONFIG", aux.path())
        .args([
            "--insecure-policy",
            "copy",
            "--src-no-creds",
            "--src-cert-dir",
        ])
        .arg(cert_dir)
        .arg(format!("docker://{reference}"))
        .arg(format!("oci:{}:pulled", out.path().display()));
    run_cmd(&mut hosts.wrap(&cmd))?;
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("index.json")).expect("index"))
            .expect("index.json");
    Ok(index["manifests"][0]["digest"]
        .as_str()
        .expect("a manifest")
        .to_string())
}

// ---------------------------------------------------------------------------------------------
// Tests

#[test]
fn tls_skopeo_pulls_through_a_private_name_trusting_the_test_ca() {
    let bed = start("tls-skopeo", PLAIN);
    let hosts = PrivateHosts::new(&[HOST]);
    let reference = format!("{}/team/app:v1", bed.endpoint());
    let digest = skopeo_pull(&hosts, &reference, &bed.certs.cert_dir_for_clients())
        .expect("skopeo pulls over TLS through the private name");
    assert_eq!(digest, bed.img.manifest_digest());

    // Another CA: skopeo refuses the endpoint (the trust is real, not skipped).
    let other = Pki::new();
    let err = skopeo_pull(&hosts, &reference, &other.cert_dir_for_clients())
        .expect_err("an untrusted certificate is refused");
    assert!(err.contains("certificate"), "{err}");
}

#[test]
fn tls_ctr_pulls_through_a_private_name_with_hosts_toml_ca() {
    let bed = start("tls-ctr", PLAIN);
    let hosts = PrivateHosts::new(&[HOST]);
    let ctr = Containerd::start();
    let dir = ctr.hosts_dir();
    write_hosts_toml(
        &dir,
        &bed.endpoint(),
        &format!("https://{}", bed.endpoint()),
        None,
        Some(&bed.certs.ca_path()),
        false,
    );
    let reference = format!("{}/team/app:v1", bed.endpoint());
    let mut pull = hosts.wrap(&ctr.ctr());
    pull.args(["images", "pull", "--hosts-dir"])
        .arg(&dir)
        .arg(&reference);
    run_cmd(&mut pull).expect("ctr pulls over TLS with the CA from hosts.toml");
    assert_eq!(
        ctr.image_digest(&reference).expect("pulled"),
        bed.img.manifest_digest()
    );
}

/// Audit lines of manifest and blob requests for `team/app` the gateway answered 200.
fn served(gw: &Gateway) -> usize {
    gw.audit_lines()
        .iter()
        .filter(|l| {
            l["registry"] == "tlsreg" && l["repository"] == "team/app" && l["status"] == 200
        })
        .count()
}

#[test]
fn tls_dockerd_pulls_through_a_private_name_trusting_the_ca_in_certs_d() {
    let bed = start("tls-dockerd", PLAIN);
    // dockerd reads registry CAs from the fixed /etc/docker/certs.d/<host:port>/. It runs in a
    // private mount namespace where a temp dir is bind-mounted over /etc/docker (which the
    // docker.io package creates), so the machine's /etc/docker is neither read nor written
    // (dockerd also keeps its key.json there).
    let etc_docker = tempfile::Builder::new()
        .prefix("etc-docker-")
        .tempdir()
        .expect("tempdir");
    let host_dir = etc_docker.path().join("certs.d").join(bed.endpoint());
    std::fs::create_dir_all(&host_dir).expect("mkdir certs.d/<host:port>");
    let config = etc_docker.path().join("daemon.json");
    // No `insecure-registries`, no mirrors.
    std::fs::write(&config, "{}").expect("daemon.json");
    // The name resolves to 0.0.0.0, not 127.0.0.1: dockerd always counts 127.0.0.0/8 as an
    // insecure registry network and, for a name that resolves into it, skips certificate
    // verification (and ignores certs.d). A connection to 0.0.0.0 goes to the loopback
    // interface on Linux (the kernel makes it 127.0.0.1), so the traffic stays on 127.0.0.1
    // while the registry counts as secure.
    let names =
        PrivateHosts::at("0.0.0.0", &[HOST]).bind(etc_docker.path(), Path::new("/etc/docker"));
    let daemon = Dockerd::start_in(&config, &names);
    let reference = format!("{}/team/app:v1", bed.endpoint());

    // No ca.crt yet: the handshake fails on the certificate; nothing reached the registry.
    let err = daemon
        .pull(&reference)
        .expect_err("an untrusted certificate is refused");
    assert!(
        err.contains("x509: certificate signed by unknown authority"),
        "{err}"
    );
    assert_eq!(served(&bed.gw), 0);

    // The test CA in certs.d (read at each pull): the pull goes through over TLS.
    std::fs::copy(bed.certs.ca_path(), host_dir.join("ca.crt")).expect("ca.crt");
    let want = bed.img.manifest_digest();
    let got = daemon.pull(&reference).expect("docker pull over TLS");
    assert_eq!(got, want);
    let digests = daemon.repo_digests(&reference).expect("inspect");
    assert_eq!(
        digests,
        vec![format!("{}/team/app@{want}", bed.endpoint())],
        "RepoDigests"
    );
    assert!(
        served(&bed.gw) >= 2,
        "the gateway served the manifest and blobs"
    );
    // Over loopback: every request the gateway saw came from 127.0.0.1.
    let audit = bed.gw.audit_lines();
    assert!(
        audit.iter().all(|l| l["client"] == "127.0.0.1"),
        "{audit:?}"
    );
}

#[test]
fn tls_sni_picks_the_certificate_and_alpn_offers_h2_then_http1() {
    let bed = start("tls-sni", PLAIN);
    let first = leaf_of(&bed.pairs[0].0);
    let wildcard = leaf_of(&bed.pairs[1].0);
    let both: &[&[u8]] = &[b"h2", b"http/1.1"];
    let all = rustls::ALL_VERSIONS;
    let seen = |sni| handshake(bed.tls_port, sni, both, all).expect("handshake");

    assert_eq!(seen(Some(HOST)).leaf, first, "exact name");
    assert_eq!(seen(Some("x.tls.test")).leaf, wildcard, "wildcard name");
    assert_eq!(seen(None).leaf, first, "no SNI: the first pair");
    assert_eq!(seen(Some("unknown.example")).leaf, first, "unknown name");

    let h = seen(Some(HOST));
    assert_eq!(h.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(h.version, rustls::ProtocolVersion::TLSv1_3);
    let h = handshake(bed.tls_port, Some(HOST), &[b"http/1.1"], all).expect("h1");
    assert_eq!(h.alpn.as_deref(), Some(&b"http/1.1"[..]));
    let h = handshake(bed.tls_port, Some(HOST), both, &[&rustls::version::TLS12]).expect("1.2");
    assert_eq!(h.version, rustls::ProtocolVersion::TLSv1_2);

    // A verifying client pulls a manifest over HTTP/2, and over HTTP/1.1 when it asks for it.
    let ca = bed.certs.ca_pem();
    let url = bed.url(HOST, "/v2/team/app/manifests/v1");
    let h2 = https_get(ca, &url, Https::default()).expect("h2");
    assert_eq!((h2.status, h2.version), (200, reqwest::Version::HTTP_2));
    assert_eq!(
        crate::support::digest_of(&h2.body),
        bed.img.manifest_digest()
    );
    let h1 = https_get(
        ca,
        &url,
        Https {
            http1_only: true,
            ..Default::default()
        },
    )
    .expect("h1");
    assert_eq!((h1.status, h1.version), (200, reqwest::Version::HTTP_11));
    assert_eq!(h1.body, h2.body);

    // A client without SNI (an IP address) verifies the first pair by its IP SAN.
    let base = https_get(ca, &bed.url("127.0.0.1", "/v2/"), Https::default()).expect("by IP");
    assert_eq!(base.status, 200);
}

#[test]
fn tls_unknown_host_is_name_unknown_naming_the_host() {
    let bed = start("tls-unknown", PLAIN);
    // The wildcard certificate covers the name, so TLS succeeds and routing decides.
    let reply = https_get(
        bed.certs.ca_pem(),
        &bed.url(OTHER, "/v2/team/app/manifests/v1"),
        Https::default(),
    )
    .expect("request");
    assert_eq!(reply.status, 404);
    assert_eq!(reply.oci_code(), "NAME_UNKNOWN");
    assert!(
        reply.oci_message().contains(OTHER),
        "names the host: {}",
        reply.oci_message()
    );
    // The same path on the registry's own name is served.
    let reply = https_get(
        bed.certs.ca_pem(),
        &bed.url(HOST, "/v2/team/app/manifests/v1"),
        Https::default(),
    )
    .expect("request");
    assert_eq!(reply.status, 200);
}

/// A registry only identities may use, and one identity known by its client certificate.
const IDENTITY: &str =
    "[[identity]]\nname = \"puller\"\nmtls_subject = \"puller.internal\"\nroles = [\"pull\"]\n";

#[test]
fn tls_client_certificate_makes_the_caller_an_identity() {
    let bed = start(
        "tls-mtls",
        Options {
            listener: ", client_ca = \"{clients_ca}\"",
            registry: "network_access = \"disabled\"",
            before: IDENTITY,
        },
    );
    let (cert, key) = bed.clients.issue_client(CLIENT);
    let ca = bed.certs.ca_pem();
    let url = bed.url(HOST, "/v2/team/app/manifests/v1");

    let with = https_get(
        ca,
        &url,
        Https {
            identity: Some((&cert, &key)),
            ..Default::default()
        },
    )
    .expect("handshake with a client certificate");
    assert_eq!(with.status, 200, "{}", String::from_utf8_lossy(&with.body));
    assert_eq!(with.version, reqwest::Version::HTTP_2);

    // No certificate: the handshake succeeds, the caller is anonymous and refused.
    let without = https_get(ca, &url, Https::default()).expect("handshake without one");
    assert_eq!(without.status, 403, "{}", without.oci_message());
    assert!(
        without.oci_message().contains("client certificate"),
        "{}",
        without.oci_message()
    );

    // A certificate from another CA fails the handshake.
    let rogue = Pki::new();
    let (rc, rk) = rogue.issue_client(CLIENT);
    https_get(
        ca,
        &url,
        Https {
            identity: Some((&rc, &rk)),
            ..Default::default()
        },
    )
    .expect_err("a certificate the client_ca did not sign is refused");

    // A CN that names no identity: verified, but nobody.
    let (sc, sk) = bed.clients.issue_client("stranger.internal");
    let stranger = https_get(
        ca,
        &url,
        Https {
            identity: Some((&sc, &sk)),
            ..Default::default()
        },
    )
    .expect("handshake");
    assert_eq!(stranger.status, 403);

    // skopeo presents the certificate from its cert dir (client.cert + client.key).
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(bed.certs.ca_path(), dir.path().join("ca.crt")).expect("ca");
    std::fs::copy(&cert, dir.path().join("client.cert")).expect("cert");
    std::fs::copy(&key, dir.path().join("client.key")).expect("key");
    let hosts = PrivateHosts::new(&[HOST]);
    let reference = format!("{}/team/app:v1", bed.endpoint());
    let digest = skopeo_pull(&hosts, &reference, dir.path()).expect("skopeo pulls with mTLS");
    assert_eq!(digest, bed.img.manifest_digest());
    skopeo_pull(&hosts, &reference, &bed.certs.cert_dir_for_clients())
        .expect_err("skopeo without a client certificate is refused");

    wait_until(Duration::from_secs(5), "audit lines", || {
        bed.gw
            .audit_lines()
            .iter()
            .any(|l| l["identity"] == "puller" && l["decision"] == "allow")
    })
    .expect("the certificate's identity is audited");
}

#[test]
fn tls_require_client_cert_refuses_the_handshake_without_one() {
    let bed = start(
        "tls-require",
        Options {
            listener: ", client_ca = \"{clients_ca}\", require_client_cert = true",
            registry: "",
            before: IDENTITY,
        },
    );
    let (cert, key) = bed.clients.issue_client(CLIENT);
    let url = bed.url(HOST, "/v2/team/app/manifests/v1");
    let err = https_get(bed.certs.ca_pem(), &url, Https::default())
        .expect_err("no client certificate, no connection");
    assert!(!err.is_empty());
    let ok = https_get(
        bed.certs.ca_pem(),
        &url,
        Https {
            identity: Some((&cert, &key)),
            ..Default::default()
        },
    )
    .expect("with a certificate");
    assert_eq!(ok.status, 200);
}

#[test]
fn tls_certificate_swap_on_disk_is_served_without_a_restart() {
    let bed = start("tls-swap", PLAIN);
    let (live_cert, live_key) = &bed.pairs[0];
    let before = leaf_of(live_cert);
    let both: &[&[u8]] = &[b"h2", b"http/1.1"];
    let served = || handshake(bed.tls_port, Some(HOST), both, rustls::ALL_VERSIONS).map(|h| h.leaf);
    assert_eq!(served().expect("handshake"), before);

    // Renamed into place, key first, as deploy tools do.
    let (new_cert, new_key) = bed.certs.issue(&[HOST, "127.0.0.1"]);
    let after = leaf_of(&new_cert);
    std::fs::rename(&new_key, live_key).expect("swap key");
    std::fs::rename(&new_cert, live_cert).expect("swap cert");
    wait_until(Duration::from_secs(15), "the new certificate", || {
        served().is_ok_and(|leaf| leaf == after)
    })
    .expect("the swapped certificate is served");
    let reply = https_get(bed.certs.ca_pem(), &bed.url(HOST, "/v2/"), Https::default())
        .expect("clients verify the new certificate");
    assert_eq!(reply.status, 200);

    // A broken file keeps the certificate in use. To know the reloader has looked at it
    // without sleeping, the wildcard pair is swapped after it: once the new wildcard
    // certificate is served, the pass that found it had the broken file in view too.
    std::fs::write(live_cert, "-----BEGIN CERTIFICATE-----\nnot really\n").expect("break");
    let (wild_cert, wild_key) = &bed.pairs[1];
    let (new_wild_cert, new_wild_key) = bed.certs.issue(&["*.tls.test"]);
    let new_wild = leaf_of(&new_wild_cert);
    std::fs::rename(&new_wild_key, wild_key).expect("swap key");
    std::fs::rename(&new_wild_cert, wild_cert).expect("swap cert");
    wait_until(
        Duration::from_secs(15),
        "the new wildcard certificate",
        || {
            handshake(bed.tls_port, Some("x.tls.test"), both, rustls::ALL_VERSIONS)
                .is_ok_and(|h| h.leaf == new_wild)
        },
    )
    .expect("the wildcard swap is served");
    assert_eq!(
        served().expect("still serving"),
        after,
        "the broken file changed nothing"
    );

    // Repaired: picked up like any change.
    let (third_cert, third_key) = bed.certs.issue(&[HOST]);
    let third = leaf_of(&third_cert);
    std::fs::rename(&third_key, live_key).expect("swap key");
    std::fs::rename(&third_cert, live_cert).expect("swap cert");
    wait_until(Duration::from_secs(15), "the third certificate", || {
        served().is_ok_and(|leaf| leaf == third)
    })
    .expect("a fixed file is picked up");
}

#[test]
fn tls_certificate_errors_name_the_key_at_start_and_in_check() {
    let pki = Pki::new();
    let (a_cert, _) = pki.issue(&["a.tls.test"]);
    let (_, b_key) = pki.issue(&["b.tls.test"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let good = (
        pki.server_cert_path().to_path_buf(),
        pki.server_key_path().to_path_buf(),
    );
    let text = format!(
        "[server]\nlisten = []\nadmin_listen = \"\"\n{}\n[cache]\ndir = \"{}\"\n\n[[registry]]\nname = \"r\"\nupstream = \"https://registry.invalid\"\ndefault = true\n",
        listener_keys(free_port(), &[good, (a_cert, b_key)], ""),
        dir.path().join("cache").display()
    );
    let config = pullgate::config::load_str(&text, dir.path()).expect("the files exist");
    let launch = pullgate::listen::Launch {
        checked: pullgate::listen::Checked {
            config,
            sha256: String::new(),
        },
        source: pullgate::listen::ConfigSource::Value,
        upgrade: false,
    };
    let err = pullgate::build_server(launch)
        .err()
        .expect("a key that is not the certificate's");
    assert!(err.contains("server.tls[0].certs[1]"), "{err}");

    let path = dir.path().join("bad.toml");
    std::fs::write(&path, &text).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_pullgate"))
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .expect("run check");
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("server.tls[0].certs[1]"), "{stderr}");
    assert!(!stderr.contains("PRIVATE KEY"), "{stderr}");
}

/// The commands README gives for `conf/private-endpoint.toml`.
pub fn make_dev_certs(out: &Path) {
    for args in [
        &[
            "--name",
            "icr",
            "--host",
            "private.icr.io",
            "--host",
            "icr.data.vpc.internal",
            "--host",
            "127.0.0.1",
            "--client",
            "build-farm.internal",
        ][..],
        &["--name", "ghcr", "--host", "private.ghcr.io"][..],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_pullgate"))
            .arg("dev-certs")
            .arg("--out")
            .arg(out)
            .args(args)
            .output()
            .expect("run dev-certs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn tls_dev_certs_make_the_private_endpoint_example_work() {
    let root = tempfile::tempdir().expect("tempdir");
    let certs = root.path().join("certs/dev");
    make_dev_certs(&certs);
    let conf = root.path().join("conf");
    std::fs::create_dir_all(&conf).expect("mkdir");
    let example = conf.join("private-endpoint.toml");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/conf/private-endpoint.toml"),
        &example,
    )
    .expect("copy the example");
    let out = Command::new(env!("CARGO_BIN_EXE_pullgate"))
        .args(["check", "-c"])
        .arg(&example)
        .output()
        .expect("run check");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The certificates serve: SNI picks ghcr's pair, the client certificate is an identity.
    let port = free_port();
    let pair = |name: &str| {
        (
            certs.join(format!("{name}.crt")),
            certs.join(format!("{name}.key")),
        )
    };
    let listener = listener_keys(
        port,
        &[pair("icr"), pair("ghcr")],
        &format!(", client_ca = \"{}\"", certs.join("ca.crt").display()),
    );
    let _gw = Gateway::start_full(
        &listener,
        "[[identity]]\nname = \"build-farm\"\nmtls_subject = \"build-farm.internal\"\n\n[[registry]]\nname = \"ghcr\"\nupstream = \"https://registry.invalid\"\nhosts = [\"private.ghcr.io\"]\nnetwork_access = \"disabled\"\n",
        None,
        "",
    );
    let ghcr = handshake(
        port,
        Some("private.ghcr.io"),
        &[b"h2"],
        rustls::ALL_VERSIONS,
    )
    .expect("handshake");
    assert_eq!(ghcr.leaf, leaf_of(&certs.join("ghcr.crt")));
    let ca = std::fs::read_to_string(certs.join("ca.crt")).expect("ca");
    let (cert, key) = (
        certs.join("client-build-farm.internal.crt"),
        certs.join("client-build-farm.internal.key"),
    );
    // `/v2/` of a registry for identities only: the dev client certificate is the identity.
    let url = format!("https://private.ghcr.io:{port}/v2/");
    let anonymous = https_get(&ca, &url, Https::default()).expect("the dev CA is trusted");
    assert_eq!(anonymous.status, 403, "{}", anonymous.oci_message());
    let farm = https_get(
        &ca,
        &url,
        Https {
            identity: Some((&cert, &key)),
            ..Default::default()
        },
    )
    .expect("handshake with the dev client certificate");
    assert_eq!(farm.status, 200);
}

#[test]
fn tls_sighup_rereads_every_certificate_in_the_running_binary() {
    let pki = Pki::new();
    let (cert, key) = pki.issue(&[HOST, "127.0.0.1"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = dir.path().join("pullgate.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = []\nadmin_listen = \"\"\nlog_format = \"json\"\n{}\n[cache]\ndir = \"cache\"\n[[registry]]\nname = \"r\"\nupstream = \"https://registry.invalid\"\nhosts = [\"{HOST}\"]\n",
            listener_keys(port, &[(cert.clone(), key)], "")
        ),
    )
    .expect("write config");
    let log = dir.path().join("serve.log");
    let child = Command::new(env!("CARGO_BIN_EXE_pullgate"))
        .args(["serve", "-c"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn pullgate");
    let mut guard = crate::support::ChildGuard::new(child);
    let pid = guard.id().expect("pid");
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    // Until the reloader has its SIGHUP handler, SIGHUP would end the process.
    wait_until(Duration::from_secs(10), "the reloader", || {
        read_log().contains("reloader started")
    })
    .expect("reloader started");
    wait_until(Duration::from_secs(10), "the TLS listener", || {
        handshake(port, Some(HOST), &[b"h2"], rustls::ALL_VERSIONS).is_ok()
    })
    .expect("serving TLS");
    let served = handshake(port, Some(HOST), &[b"h2"], rustls::ALL_VERSIONS).expect("handshake");
    assert_eq!(served.leaf, leaf_of(&cert));

    run_cmd(Command::new("kill").args(["-HUP", &pid.to_string()])).expect("send SIGHUP");
    wait_until(Duration::from_secs(10), "a forced reload", || {
        read_log().contains("certificate reloaded")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", read_log()));
    assert!(guard.is_running(), "SIGHUP does not stop pullgate");
    assert!(handshake(port, Some(HOST), &[b"h2"], rustls::ALL_VERSIONS).is_ok());
    guard.kill();
}
