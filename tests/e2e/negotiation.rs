//! Content negotiation in the manifest cache: every `Accept` shape that admits a cached
//! manifest's type is served from the cache (by tag within `tag_ttl`, by digest always); a
//! client that refuses the tag's real type gets the upstream's answer in its own terms, cached
//! as a variant of the tag. Every answer is compared with what the upstream itself says, and
//! upstream requests are counted from its access log.

use crate::api::upstream_token;
use crate::harness::{registry, request, Answer, Gateway, MANIFEST_ACCEPT};
use crate::support::{TestImage, Upstream, UpstreamOptions};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// The Accept shapes of the matrix (`None`: no Accept header at all).
const SHAPES: [Option<&str>; 7] = [
    Some(OCI_MANIFEST),
    Some(MANIFEST_ACCEPT),
    Some("*/*"),
    Some("application/*"),
    None,
    Some(DOCKER_V2),
    Some(OCI_INDEX),
];

/// What a manifest request got: status, digest, type, length.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Got {
    status: u16,
    digest: Option<String>,
    media_type: Option<String>,
    length: Option<String>,
}

fn got(a: &Answer) -> Got {
    let ok = a.status == 200;
    Got {
        status: a.status,
        digest: ok.then(|| a.header("docker-content-digest")).flatten(),
        media_type: ok.then(|| a.header("content-type")).flatten(),
        length: ok.then(|| a.header("content-length")).flatten(),
    }
}

/// The upstream's own answer, asked directly with its credentials.
fn direct(up: &Upstream, method: &str, repo: &str, reference: &str, accept: Option<&str>) -> Got {
    let token = upstream_token(up, repo, "pull");
    let client = crate::support::http_client(Some(up.pki().ca_pem()));
    let url = format!("{}/v2/{repo}/manifests/{reference}", up.url());
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let accept = accept.map(str::to_string);
    crate::support::block_on(async move {
        let mut req = client.request(method, url).bearer_auth(token);
        if let Some(a) = accept {
            req = req.header("Accept", a);
        }
        let resp = req.send().await.expect("direct request");
        let status = resp.status().as_u16();
        let h = |n: &str| {
            (status == 200)
                .then(|| resp.headers().get(n))
                .flatten()
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        Got {
            status,
            digest: h("docker-content-digest"),
            media_type: h("content-type"),
            length: h("content-length"),
        }
    })
}

/// What pullgate must answer: the upstream's answer to the same Accept, except that no
/// Accept and wildcards take every type (distribution honours only listed types).
fn expected(up: &Upstream, method: &str, repo: &str, reference: &str, accept: Option<&str>) -> Got {
    let takes_all = matches!(accept, None | Some("*/*") | Some("application/*"));
    direct(
        up,
        method,
        repo,
        reference,
        if takes_all {
            Some(MANIFEST_ACCEPT)
        } else {
            accept
        },
    )
}

fn through(gw: &Gateway, method: &str, repo: &str, reference: &str, accept: Option<&str>) -> Got {
    let headers: Vec<(&str, &str)> = accept.map(|a| ("Accept", a)).into_iter().collect();
    got(&request(
        method,
        &gw.url(&format!("/v2/{repo}/manifests/{reference}")),
        &headers,
    ))
}

/// Does this Accept admit `media_type` (pullgate's rule)?
fn admits(accept: Option<&str>, media_type: &str) -> bool {
    match accept {
        None | Some("*/*") | Some("application/*") => true,
        Some(list) => list.split(',').any(|t| t.trim() == media_type),
    }
}

#[test]
fn every_accept_shape_is_answered_as_the_upstream_would_and_served_from_the_cache() {
    let up = Upstream::start(UpstreamOptions::default());
    let tags = [
        ("team/oci", "v1"),
        ("team/index", "v1"),
        ("team/list", "v1"),
        ("team/docker", "v1"),
    ];
    up.push(&TestImage::small("neg-oci"), "team/oci:v1");
    up.push(&TestImage::two_platform_index("neg-index"), "team/index:v1");
    up.push_v2s2(&TestImage::two_platform_index("neg-list"), "team/list:v1");
    up.push_v2s2(&TestImage::small("neg-docker"), "team/docker:v1");

    // The upstream's answers first, so that everything logged later is pullgate's.
    let mut by_tag = Vec::new();
    for (repo, tag) in tags {
        for accept in SHAPES {
            for method in ["GET", "HEAD"] {
                let want = expected(&up, method, repo, tag, accept);
                by_tag.push((repo, tag, accept, method, want));
            }
        }
    }
    let mut digests: Vec<(&str, String, String)> = by_tag
        .iter()
        .filter_map(|(repo, _, _, _, w)| Some((*repo, w.digest.clone()?, w.media_type.clone()?)))
        .collect();
    digests.sort();
    digests.dedup();
    let mut by_digest = Vec::new();
    for (repo, digest, media_type) in &digests {
        for accept in SHAPES {
            for method in ["GET", "HEAD"] {
                let want = expected(&up, method, repo, digest, accept);
                by_digest.push((
                    *repo,
                    digest.clone(),
                    media_type.clone(),
                    accept,
                    method,
                    want,
                ));
            }
        }
    }
    let logged = || up.requests().len();

    let gw = Gateway::start(&registry("hub", &up, "default = true\ntag_ttl = \"1h\""));
    let start = logged();
    let mut rounds = Vec::new();
    for round in 0..2 {
        let before = logged();
        for (repo, tag, accept, method, want) in &by_tag {
            let answer = through(&gw, method, repo, tag, *accept);
            assert_eq!(
                &answer, want,
                "round {round}: {method} {repo}:{tag} Accept {accept:?}"
            );
        }
        let tags_done = logged();
        for (repo, digest, _, accept, method, want) in &by_digest {
            let answer = through(&gw, method, repo, digest, *accept);
            assert_eq!(
                &answer, want,
                "round {round}: {method} {repo}@{digest} Accept {accept:?}"
            );
        }
        rounds.push((tags_done - before, logged() - tags_done));
    }
    let cases = by_tag.len() + by_digest.len();
    // Warm, tags come from the cache whatever the Accept (the 404s from negative caching),
    // except schema 1: distribution makes it on the fly for clients that take nothing newer,
    // and pullgate passes it on without caching it.
    let schema1 = by_tag
        .iter()
        .filter(|(.., want)| {
            want.media_type
                .as_deref()
                .is_some_and(|t| t.starts_with("application/vnd.docker.distribution.manifest.v1"))
        })
        .count();
    eprintln!(
        "negotiation matrix: {} tag and {} digest requests per round ({schema1} schema 1 \
         answers by tag); upstream requests (tag, digest): cold {:?}, warm {:?}",
        by_tag.len(),
        by_digest.len(),
        rounds[0],
        rounds[1]
    );
    assert_eq!(rounds[1].0, schema1, "warm tag requests upstream");
    // By digest, only a client refusing the cached type is sent upstream (and its 404s are
    // remembered).
    let refused_ok = by_digest
        .iter()
        .filter(|(_, _, t, accept, _, want)| !admits(*accept, t) && want.status == 200)
        .count();
    assert_eq!(rounds[1].1, refused_ok, "warm digest requests upstream");
    assert!(
        logged() - start < cases,
        "fewer upstream requests than requests"
    );
}

#[test]
fn a_one_type_head_poller_is_a_cache_hit_within_tag_ttl() {
    let up = Upstream::start(UpstreamOptions::default());
    let img = TestImage::small("neg-poller");
    up.push(&img, "team/app:latest");
    let gw = Gateway::start(&registry("hub", &up, "default = true\ntag_ttl = \"1h\""));
    let before = up.requests().len();
    for _ in 0..110 {
        let a = request(
            "HEAD",
            &gw.url("/v2/team/app/manifests/latest"),
            &[("Accept", OCI_MANIFEST)],
        );
        assert_eq!(a.status, 200);
        assert_eq!(
            a.header("docker-content-digest").as_deref(),
            Some(img.manifest_digest())
        );
        assert_eq!(
            a.header("content-length"),
            Some(img.manifest_bytes().len().to_string())
        );
    }
    let asked: Vec<_> = up.requests().into_iter().skip(before).collect();
    eprintln!(
        "one-type HEAD poller: 110 requests, {} upstream requests ({:?})",
        asked.len(),
        asked
            .iter()
            .map(|r| format!("{} {}", r.method, r.status))
            .collect::<Vec<_>>()
    );
    // One HEAD learned the tag (the first try met the token challenge), the rest were hits.
    assert_eq!(asked.iter().filter(|r| r.status == 200).count(), 1);
    assert!(asked.len() <= 2 && asked.iter().all(|r| r.method == "HEAD"));
    // A client taking every type afterwards: the answer is the same manifest.
    let full = request(
        "GET",
        &gw.url("/v2/team/app/manifests/latest"),
        &[("Accept", MANIFEST_ACCEPT)],
    );
    assert_eq!(full.body, img.manifest_bytes());
}

#[test]
fn variants_serve_stale_while_the_upstream_is_down() {
    let mut up = Upstream::start(UpstreamOptions::default());
    let img = TestImage::two_platform_index("neg-stale");
    let list = up.push_v2s2(&img, "team/list:v1");
    let gw = Gateway::start(&registry("hub", &up, "default = true\ntag_ttl = \"0s\""));
    let ask = |accept: &str| {
        request(
            "GET",
            &gw.url("/v2/team/list/manifests/v1"),
            &[("Accept", accept)],
        )
    };
    let primary = ask(MANIFEST_ACCEPT);
    assert_eq!(
        primary.header("docker-content-digest").as_deref(),
        Some(list.as_str())
    );
    let variant = ask(DOCKER_V2);
    assert_eq!(
        variant.status,
        200,
        "{}",
        String::from_utf8_lossy(&variant.body)
    );
    let amd64 = variant.header("docker-content-digest").unwrap();
    assert_ne!(
        amd64, list,
        "the registry picked a platform for a client without lists"
    );
    assert_eq!(variant.header("content-type").as_deref(), Some(DOCKER_V2));
    up.stop();
    for (accept, digest) in [
        (DOCKER_V2, &amd64),
        (MANIFEST_ACCEPT, &list),
        (DOCKER_LIST, &list),
    ] {
        let a = ask(accept);
        assert_eq!(a.status, 200, "{accept}");
        assert_eq!(
            a.header("docker-content-digest").as_ref(),
            Some(digest),
            "{accept}"
        );
        assert!(
            a.header("warning").is_some_and(|w| w.starts_with("110")),
            "{accept}"
        );
    }
}
