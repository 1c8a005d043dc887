//! Who may pull what from where: a matrix of sources (client sockets bound to 127.0.0.2,
//! 127.0.0.3, ...) x registries x identities x actions against the real upstream; denials never
//! reach it; spoofed forwarding headers are ignored; the audit log records every decision; real
//! skopeo pulls allowed and denied.

use std::time::Duration;

use base64::Engine;

use crate::harness::{client_from, registry, request_with, Answer, Gateway, MANIFEST_ACCEPT};
use crate::support::{
    sha256_hex, skopeo_copy_to_oci, wait_until, Auth, ClientTls, TestImage, TokenIssuerOptions,
    Upstream, UpstreamOptions,
};

const CI_PASSWORD: &str = "ci-secret-7f3a";

/// Sends one request from source address `from` (optionally with Basic credentials and extra
/// headers).
fn request_from(
    from: &str,
    method: &str,
    url: &str,
    basic: Option<(&str, &str)>,
    headers: &[(&str, &str)],
) -> Answer {
    let token = basic.map(|(u, p)| {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
        format!("Basic {token}")
    });
    let mut all = headers.to_vec();
    all.push(("Accept", MANIFEST_ACCEPT));
    if let Some(token) = &token {
        all.push(("Authorization", token));
    }
    request_with(client_from(from), method, url, &all)
}

fn config(up: &Upstream) -> String {
    let table = |name: &str, extra: &str| {
        registry(
            name,
            up,
            &format!("prefix = \"{name}\"\nhosts = [\"{name}.example\"]\n{extra}"),
        )
    };
    format!(
        "[zones]\nvpc = [\"127.0.0.2/32\"]\nbuild = [\"127.0.0.3/32\", \"127.0.0.0/30\"]\n\n\
         [[identity]]\nname = \"ci\"\nusername = \"ci\"\npassword_sha256 = \"{}\"\nroles = [\"pull\"]\n\n{}{}{}{}{}",
        sha256_hex(CI_PASSWORD.as_bytes()),
        table("open", ""),
        table("zoned", "network_access = \"selected\"\nzones = [\"vpc\"]"),
        table("locked", "network_access = \"disabled\""),
        table(
            "strict",
            "network_access = \"selected\"\nzones = [\"vpc\"]\ntrusted_identities = false"
        ),
        table(
            "teams",
            "repositories = [\"team/**\"]\ndeny_repositories = [\"team/secret*\"]"
        ),
    )
}

/// The only peer whose forwarding headers are believed.
const TRUSTED_PROXY: &str = "127.0.0.5";

/// One cell: source, credentials, registry, repository, method, expected status and reason.
struct Cell {
    from: &'static str,
    basic: Option<(&'static str, &'static str)>,
    registry: &'static str,
    repo: &'static str,
    method: &'static str,
    status: u16,
    reason: Option<&'static str>,
}

const CI: Option<(&str, &str)> = Some(("ci", CI_PASSWORD));
const WRONG: Option<(&str, &str)> = Some(("ci", "not-the-password"));

#[rustfmt::skip]
const MATRIX: &[Cell] = &[
    // open: any source; wrong credentials are still refused, never a fall-through.
    Cell { from: "127.0.0.2", basic: None,  registry: "open",   repo: "team/app", method: "GET", status: 200, reason: None },
    Cell { from: "127.0.0.4", basic: None,  registry: "open",   repo: "team/app", method: "GET", status: 200, reason: None },
    Cell { from: "127.0.0.4", basic: CI,    registry: "open",   repo: "team/app", method: "GET", status: 200, reason: None },
    Cell { from: "127.0.0.2", basic: WRONG, registry: "open",   repo: "team/app", method: "GET", status: 401, reason: Some("bad_credentials") },
    Cell { from: "127.0.0.2", basic: None,  registry: "open",   repo: "team/app", method: "POST", status: 403, reason: Some("push_disabled") },
    // selected: vpc only; identities bypass (trusted_identities = true).
    Cell { from: "127.0.0.2", basic: None,  registry: "zoned",  repo: "team/app", method: "GET", status: 200, reason: None },
    Cell { from: "127.0.0.2", basic: None,  registry: "zoned",  repo: "team/app", method: "HEAD", status: 200, reason: None },
    Cell { from: "127.0.0.3", basic: None,  registry: "zoned",  repo: "team/app", method: "GET", status: 401, reason: Some("source_not_in_zone") },
    Cell { from: "127.0.0.4", basic: None,  registry: "zoned",  repo: "team/app", method: "GET", status: 401, reason: Some("source_not_in_zone") },
    Cell { from: "127.0.0.4", basic: CI,    registry: "zoned",  repo: "team/app", method: "GET", status: 200, reason: None },
    Cell { from: "127.0.0.4", basic: WRONG, registry: "zoned",  repo: "team/app", method: "GET", status: 401, reason: Some("bad_credentials") },
    // disabled: identities only.
    Cell { from: "127.0.0.2", basic: None,  registry: "locked", repo: "team/app", method: "GET", status: 401, reason: Some("identity_required") },
    Cell { from: "127.0.0.4", basic: CI,    registry: "locked", repo: "team/app", method: "GET", status: 200, reason: None },
    // selected with trusted_identities = false: identities are held to the zones too.
    Cell { from: "127.0.0.2", basic: None,  registry: "strict", repo: "team/app", method: "GET", status: 200, reason: None },
    Cell { from: "127.0.0.2", basic: CI,    registry: "strict", repo: "team/app", method: "GET", status: 200, reason: None },
    Cell { from: "127.0.0.4", basic: CI,    registry: "strict", repo: "team/app", method: "GET", status: 403, reason: Some("identity_not_in_zone") },
    Cell { from: "127.0.0.3", basic: None,  registry: "strict", repo: "team/app", method: "GET", status: 403, reason: Some("source_not_in_zone") },
    // repository rules, deny first; they hold for identities too.
    Cell { from: "127.0.0.4", basic: None,  registry: "teams",  repo: "team/app", method: "GET", status: 200, reason: None },
    Cell { from: "127.0.0.4", basic: None,  registry: "teams",  repo: "team/secret", method: "GET", status: 403, reason: Some("repository_denied") },
    Cell { from: "127.0.0.4", basic: CI,    registry: "teams",  repo: "team/secret", method: "GET", status: 403, reason: Some("repository_denied") },
    Cell { from: "127.0.0.4", basic: None,  registry: "teams",  repo: "other/app", method: "GET", status: 403, reason: Some("repository_not_allowed") },
];

#[test]
fn the_access_matrix_holds_and_denials_never_reach_the_upstream() {
    let up = Upstream::start(UpstreamOptions::default());
    let img = TestImage::small("policy");
    for repo in ["team/app", "team/secret", "other/app"] {
        up.push(&img, &format!("{repo}:v1"));
    }
    let gw = Gateway::start_full(
        &format!("trusted_proxies = [\"{TRUSTED_PROXY}/32\"]"),
        &config(&up),
        None,
        "",
    );
    for (i, cell) in MATRIX.iter().enumerate() {
        let path = if cell.method == "POST" {
            format!("/v2/{}/{}/blobs/uploads/", cell.registry, cell.repo)
        } else {
            format!("/v2/{}/{}/manifests/v1", cell.registry, cell.repo)
        };
        let before = up.requests().len();
        let answer = request_from(cell.from, cell.method, &gw.url(&path), cell.basic, &[]);
        // The audit line is written once the response is out: poll for it.
        wait_until(Duration::from_secs(5), "the audit line", || {
            gw.audit_lines().len() > i
        })
        .expect("audited");
        let what = format!(
            "cell {i}: {} {} from {} as {:?}",
            cell.method,
            path,
            cell.from,
            cell.basic.map(|b| b.0)
        );
        assert_eq!(
            answer.status,
            cell.status,
            "{what}: {}",
            String::from_utf8_lossy(&answer.body)
        );
        if cell.status == 200 {
            continue;
        }
        assert_eq!(
            up.requests().len(),
            before,
            "{what}: a denial never reaches the upstream"
        );
        if cell.method != "HEAD" {
            let code = if cell.status == 401 {
                "UNAUTHORIZED"
            } else {
                "DENIED"
            };
            assert_eq!(answer.oci_code().as_deref(), Some(code), "{what}");
            assert!(
                answer.oci_message().contains(cell.registry)
                    || cell.reason == Some("bad_credentials"),
                "{what}: the reason names the registry: {}",
                answer.oci_message()
            );
        }
        if cell.status == 401 {
            assert_eq!(
                answer.header("www-authenticate").as_deref(),
                Some("Basic realm=\"pullgate\""),
                "{what}"
            );
        }
        let audit = gw.audit_lines();
        let line = audit.last().expect("an audit line");
        assert_eq!(line["decision"], "deny", "{what}: {line}");
        assert_eq!(line["reason"].as_str(), cell.reason, "{what}: {line}");
        assert_eq!(line["client"].as_str(), Some(cell.from), "{what}");
        assert_eq!(line["registry"].as_str(), Some(cell.registry), "{what}");
    }

    // Every decision is audited, with the zone and the identity, and never a secret.
    let audit = gw.audit_lines();
    assert_eq!(audit.len(), MATRIX.len());
    let allowed_ci = audit
        .iter()
        .find(|l| l["identity"] == "ci" && l["decision"] == "allow")
        .expect("an allowed identity line");
    assert_eq!(allowed_ci["action"], "pull");
    assert!(allowed_ci["credential"]
        .as_str()
        .is_some_and(|c| c.ends_with(".credentials")));
    let in_vpc = audit
        .iter()
        .find(|l| l["client"] == "127.0.0.2")
        .expect("vpc line");
    assert_eq!(in_vpc["zone"], "vpc");
    let text = audit.iter().map(|l| l.to_string()).collect::<String>();
    assert!(!text.contains(CI_PASSWORD) && !text.contains(up.password()));

    // The metric counts denials by reason.
    let metrics = String::from_utf8(crate::harness::get(&gw.admin_url("/metrics")).body).unwrap();
    assert!(
        metrics
            .contains(r#"pullgate_denials_total{reason="repository_denied",registry="teams"} 2"#),
        "{metrics}"
    );
}

#[test]
fn forwarding_headers_count_only_from_trusted_proxies() {
    let up = Upstream::start(UpstreamOptions::default());
    let img = TestImage::small("policy-xff");
    up.push(&img, "team/app:v1");
    let gw = Gateway::start_full(
        &format!("trusted_proxies = [\"{TRUSTED_PROXY}/32\"]"),
        &config(&up),
        None,
        "",
    );
    let url = gw.url("/v2/zoned/team/app/manifests/v1");
    // A client outside the zone claiming to be inside it is not believed.
    for spoof in [
        ("X-Forwarded-For", "127.0.0.2"),
        ("Forwarded", "for=127.0.0.2"),
    ] {
        let answer = request_from("127.0.0.4", "GET", &url, None, &[spoof]);
        assert_eq!(answer.status, 401, "{spoof:?} from an untrusted peer");
    }
    // The trusted proxy's word is taken: the right-most untrusted hop is the client.
    let via_proxy = |xff: &str| {
        request_from(
            TRUSTED_PROXY,
            "GET",
            &url,
            None,
            &[("X-Forwarded-For", xff)],
        )
        .status
    };
    assert_eq!(via_proxy("127.0.0.2"), 200);
    assert_eq!(
        via_proxy("127.0.0.2, 127.0.0.4"),
        401,
        "right-most untrusted hop"
    );
    assert_eq!(via_proxy("127.0.0.4, 127.0.0.2"), 200);
    wait_until(Duration::from_secs(5), "five audit lines", || {
        gw.audit_lines().len() == 5
    })
    .expect("audited");
    assert_eq!(gw.audit_lines()[4]["client"], "127.0.0.2");
}

#[test]
fn skopeo_pulls_with_identity_credentials_and_is_refused_without() {
    let up = Upstream::start(UpstreamOptions::default());
    let img = TestImage::small("policy-skopeo");
    up.push(&img, "team/app:v1");
    // A private endpoint: the locked registry answers the gateway's own Host, so `/v2/` (the
    // clients' first request) is where the Basic challenge tells them to send credentials.
    let gw = Gateway::start_full(
        "",
        &config(&up).replace(
            "network_access = \"disabled\"",
            "network_access = \"disabled\"\ndefault = true",
        ),
        None,
        "",
    );
    let reference = format!("{}/team/app:v1", gw.addr());

    let pulled = skopeo_copy_to_oci(
        &reference,
        ClientTls::Plain,
        Some(("ci", CI_PASSWORD)),
        false,
    )
    .expect("an identity pulls through a registry open to identities only");
    assert_eq!(pulled.manifest_digest, img.manifest_digest());
    let refused = skopeo_copy_to_oci(&reference, ClientTls::Plain, None, false)
        .expect_err("anonymous callers are refused");
    assert!(
        refused.contains("401") || refused.to_lowercase().contains("unauthorized"),
        "{refused}"
    );
    let wrong = skopeo_copy_to_oci(&reference, ClientTls::Plain, WRONG, false)
        .expect_err("wrong credentials are refused");
    assert!(
        wrong.contains("401") || wrong.to_lowercase().contains("unauthorized"),
        "{wrong}"
    );
}

/// An upstream with two accounts (alice may use everything, bob only `team-b/`) and their
/// password files.
pub(crate) struct TwoAccounts {
    pub up: Upstream,
    bob: String,
    alice: String,
    _dir: tempfile::TempDir,
}

impl TwoAccounts {
    pub fn start() -> TwoAccounts {
        let up = Upstream::start(UpstreamOptions {
            auth: Auth::Token(TokenIssuerOptions {
                users: vec![
                    ("alice".into(), "alice-secret-pw".into()),
                    ("bob".into(), "bob-secret-pw".into()),
                ],
                restricted: vec![("bob".into(), "team-b/".into())],
                ..Default::default()
            }),
            ..Default::default()
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = |user: &str, pw: &str| {
            let path = dir.path().join(user);
            std::fs::write(&path, pw).expect("password file");
            path.display().to_string()
        };
        let (bob, alice) = (
            secret("bob", "bob-secret-pw"),
            secret("alice", "alice-secret-pw"),
        );
        TwoAccounts {
            up,
            bob,
            alice,
            _dir: dir,
        }
    }

    /// Zone `vpc` (127.0.0.2) and registry `hub` (plus `extra` lines): callers in the zone
    /// pull with alice's account (`scoped_credentials` "full"), everyone else with bob's.
    pub fn config(&self, extra: &str) -> String {
        format!(
            "[zones]\nvpc = [\"127.0.0.2/32\"]\n\n[[registry]]\nname = \"hub\"\nupstream = \"{}\"\nca = \"{}\"\n{extra}\n\
             credentials = {{ username = \"bob\", password_file = \"{}\" }}\n\
             [[registry.scoped_credentials]]\nname = \"full\"\nzones = [\"vpc\"]\n\
             credentials = {{ username = \"alice\", password_file = \"{}\" }}\n",
            self.up.url(),
            self.up.pki().ca_path().display(),
            self.bob,
            self.alice,
        )
    }
}

#[test]
fn scoped_credentials_pick_the_upstream_account_and_the_cache_keeps_them_apart() {
    let accounts = TwoAccounts::start();
    let up = &accounts.up;
    let a = TestImage::small("scoped-a");
    let b = TestImage::small("scoped-b");
    up.push(&a, "team-a/app:v1");
    up.push(&b, "team-b/app:v1");
    // Callers in the vpc zone pull with alice's account; everyone else with bob's.
    let gw = Gateway::start_full("", &accounts.config("default = true"), None, "");
    let manifest = |repo: &str| gw.url(&format!("/v2/{repo}/manifests/v1"));
    let layer = a.layer_digests()[0].clone();
    let blob = gw.url(&format!("/v2/team-a/app/blobs/{layer}"));

    assert_eq!(
        request_from("127.0.0.4", "GET", &manifest("team-b/app"), None, &[]).status,
        200
    );
    let vpc = request_from("127.0.0.2", "GET", &manifest("team-a/app"), None, &[]);
    assert_eq!(vpc.status, 200, "{}", String::from_utf8_lossy(&vpc.body));
    assert_eq!(
        request_from("127.0.0.2", "GET", &blob, None, &[]).status,
        200
    );

    // Outside the zone, bob's account applies: neither the cached tag answer nor the cached
    // blob of team-a may be handed out, since bob's account cannot read team-a.
    let tag = request_from("127.0.0.4", "GET", &manifest("team-a/app"), None, &[]);
    assert_eq!(tag.status, 403, "{}", String::from_utf8_lossy(&tag.body));
    assert_eq!(tag.oci_code().as_deref(), Some("DENIED"));
    let cached_blob = request_from("127.0.0.4", "GET", &blob, None, &[]);
    assert_eq!(
        cached_blob.status,
        403,
        "{}",
        String::from_utf8_lossy(&cached_blob.body)
    );

    wait_until(Duration::from_secs(5), "five audit lines", || {
        gw.audit_lines().len() == 5
    })
    .expect("audited");
    let credentials: Vec<String> = gw
        .audit_lines()
        .iter()
        .map(|l| l["credential"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        credentials,
        [
            "registry.hub.credentials",
            "registry.hub.scoped_credentials.full",
            "registry.hub.scoped_credentials.full",
            "registry.hub.credentials",
            "registry.hub.credentials",
        ]
    );
}
