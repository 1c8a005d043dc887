//! Uploads pass through unchanged: the same chunked upload sent to the upstream directly and
//! through pullgate gets the same statuses and the same upload headers (`Range`,
//! `Docker-Upload-UUID`, `OCI-Chunk-Min-Length`, `Docker-Content-Digest`), the upstream's
//! answers to out-of-order chunks and bad digests included; only `Location` differs, rewritten
//! to pullgate and the client's name.

use crate::api::{sha256, upstream_token};
use crate::harness::{registry, request_with_body, Answer, Gateway};
use crate::support::{Upstream, UpstreamOptions};

/// The headers whose values must be the same either way.
const SAME: [&str; 4] = [
    "range",
    "oci-chunk-min-length",
    "docker-content-digest",
    "content-type",
];

/// One side of the comparison: where requests go and how.
struct Side<'a> {
    base: String,
    repo: &'a str,
    auth: Option<String>,
    ca: Option<String>,
}

impl Side<'_> {
    fn send(&self, method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
        let url = if target.starts_with("http") {
            target.to_string()
        } else {
            format!("{}{target}", self.base)
        };
        let mut all = headers.to_vec();
        if let Some(a) = &self.auth {
            all.push(("Authorization", a));
        }
        request_with_body(
            crate::support::http_client(self.ca.as_deref()),
            method,
            &url,
            &all,
            body.to_vec(),
        )
    }
}

fn kind_of_location(location: &str, repo: &str) -> String {
    let path = location
        .find("/v2/")
        .map(|i| &location[i..])
        .unwrap_or(location);
    let rest = path
        .strip_prefix(&format!("/v2/{repo}/"))
        .unwrap_or_else(|| panic!("{location} is not under {repo}"));
    if rest.starts_with("blobs/uploads/") {
        "upload".into()
    } else {
        rest.split(':').next().unwrap_or("").to_string()
    }
}

fn compare(step: &str, direct: &Answer, through: &Answer, repos: (&str, &str)) {
    assert_eq!(
        direct.status,
        through.status,
        "{step}: status (through pullgate: {})",
        String::from_utf8_lossy(&through.body)
    );
    for name in SAME {
        assert_eq!(
            direct.header(name),
            through.header(name),
            "{step}: header {name}"
        );
    }
    assert_eq!(
        direct.header("docker-upload-uuid").is_some(),
        through.header("docker-upload-uuid").is_some(),
        "{step}: Docker-Upload-UUID"
    );
    match (direct.header("location"), through.header("location")) {
        (Some(d), Some(t)) => {
            assert!(t.starts_with('/'), "{step}: {t} is a path on pullgate");
            assert_eq!(
                kind_of_location(&d, repos.0),
                kind_of_location(&t, repos.1),
                "{step}: Location"
            );
        }
        (None, None) => {}
        other => panic!("{step}: Location {other:?}"),
    }
    if direct.status >= 400 && direct.header("content-type").as_deref() == Some("application/json")
    {
        assert_eq!(direct.oci_code(), through.oci_code(), "{step}: error code");
    }
}

#[test]
fn chunked_uploads_answer_as_the_upstream_does() {
    let up = Upstream::start(UpstreamOptions::default());
    let gw = Gateway::start(&registry("hub", &up, "default = true\npush = true"));
    let (direct_repo, gw_repo) = ("team/direct", "team/through");
    let direct = Side {
        base: up.url(),
        repo: direct_repo,
        auth: Some(format!(
            "Bearer {}",
            upstream_token(&up, direct_repo, "pull,push,delete")
        )),
        ca: Some(up.pki().ca_pem().to_string()),
    };
    let through = Side {
        base: gw.url(""),
        repo: gw_repo,
        auth: None,
        ca: None,
    };
    let sides = [&direct, &through];
    let a: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
    let b: Vec<u8> = (0..1000u32).map(|i| (i % 241) as u8).collect();
    let whole = [a.clone(), b.clone()].concat();
    let digest = sha256(&whole);

    // Each step on both sides, each side following its own Location.
    let mut locations = [String::new(), String::new()];
    let mut run = |step: &str,
                   method: &str,
                   target: &dyn Fn(&Side, &str) -> String,
                   headers: &[(&str, &str)],
                   body: &[u8],
                   follow: bool| {
        let answers: Vec<Answer> = sides
            .iter()
            .zip(locations.iter())
            .map(|(side, loc)| side.send(method, &target(side, loc), headers, body))
            .collect();
        eprintln!(
            "upload step {step}: upstream {} / pullgate {} (Range {:?})",
            answers[0].status,
            answers[1].status,
            answers[1].header("range")
        );
        compare(step, &answers[0], &answers[1], (direct_repo, gw_repo));
        if follow {
            for (loc, answer) in locations.iter_mut().zip(&answers) {
                if let Some(l) = answer.header("location") {
                    *loc = l;
                }
            }
        }
        answers
    };
    let start = |s: &Side, _: &str| format!("/v2/{}/blobs/uploads/", s.repo);
    let at = |_: &Side, loc: &str| loc.to_string();
    let octets = ("Content-Type", "application/octet-stream");

    let started = run("POST", "POST", &start, &[], b"", true);
    assert_eq!(started[1].status, 202);
    assert_eq!(started[1].header("range").as_deref(), Some("0-0"));
    run(
        "PATCH first chunk",
        "PATCH",
        &at,
        &[octets, ("Content-Range", "0-999")],
        &a,
        true,
    );
    let status = run("GET upload status", "GET", &at, &[], b"", false);
    assert_eq!(status[1].header("range").as_deref(), Some("0-999"));
    run(
        "PATCH second chunk",
        "PATCH",
        &at,
        &[octets, ("Content-Range", "1000-1999")],
        &b,
        true,
    );
    let finish = |_: &Side, loc: &str| {
        let sep = if loc.contains('?') { '&' } else { '?' };
        format!("{loc}{sep}digest={digest}")
    };
    let done = run("PUT finish", "PUT", &finish, &[octets], b"", false);
    assert_eq!(done[1].status, 201);
    assert_eq!(
        done[1].header("docker-content-digest"),
        Some(digest.clone())
    );
    run("PUT again", "PUT", &finish, &[octets], b"", false);

    // A chunk that does not start where the upload is: whatever the upstream says
    // (distribution 2.8 takes it: 202; 3.x refuses it: 416).
    run("POST for out of order", "POST", &start, &[], b"", true);
    run(
        "PATCH out of order",
        "PATCH",
        &at,
        &[octets, ("Content-Range", "5000-5999")],
        &b,
        false,
    );

    // A monolithic upload with the wrong digest, and a cancelled session.
    run("POST again", "POST", &start, &[], b"", true);
    let wrong = |_: &Side, loc: &str| {
        let sep = if loc.contains('?') { '&' } else { '?' };
        format!("{loc}{sep}digest=sha256:{}", "0".repeat(64))
    };
    let refused = run("PUT wrong digest", "PUT", &wrong, &[octets], &a, false);
    assert_eq!(refused[1].oci_code().as_deref(), Some("DIGEST_INVALID"));
    run("POST to cancel", "POST", &start, &[], b"", true);
    run("DELETE cancels", "DELETE", &at, &[], b"", false);
    let gone = run("GET cancelled", "GET", &at, &[], b"", false);
    assert_eq!(gone[1].status, 404);
}
