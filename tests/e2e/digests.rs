//! Digest algorithms: sha512 blobs pushed to the real upstream are served through pullgate,
//! verified with SHA-512 and cached like sha256 ones; sha512 digests in manifest bodies count
//! as the repository's confirmation; unknown algorithms are DIGEST_INVALID, never a 500.

use sha2::Digest as _;

use crate::api::{push_blob_upstream, send, sha256};
use crate::harness::{raw_get, registry, request, Gateway, MANIFEST_ACCEPT};
use crate::support::{Upstream, UpstreamOptions};

fn sha512(bytes: &[u8]) -> String {
    format!("sha512:{}", hex::encode(sha2::Sha512::digest(bytes)))
}

#[test]
fn sha512_blobs_are_verified_cached_and_confirmed_through_manifests() {
    let up = Upstream::start(UpstreamOptions::default());
    let data: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let digest = sha512(&data);
    push_blob_upstream(&up, "team/app", &digest, &data);
    push_blob_upstream(&up, "team/two", &digest, &data);
    let gw = Gateway::start(&registry("hub", &up, "default = true\npush = true"));
    let url = gw.url(&format!("/v2/team/app/blobs/{digest}"));
    let upstream_gets = || up.count_requests("GET", &digest);

    let first = request("GET", &url, &[]);
    assert_eq!(
        first.status,
        200,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    assert!(first.body == data, "the verified bytes");
    assert_eq!(
        first.header("docker-content-digest").as_deref(),
        Some(digest.as_str())
    );
    let hex = &digest["sha512:".len()..];
    let cached = gw
        .cache_dir()
        .join("blobs/sha512")
        .join(&hex[..2])
        .join(hex);
    crate::support::wait_until(std::time::Duration::from_secs(10), "the commit", || {
        cached.exists()
    })
    .expect("cached under blobs/sha512");
    let gets = upstream_gets();
    assert!(request("GET", &url, &[]).body == data);
    let head = request("HEAD", &url, &[]);
    assert_eq!(head.header("content-length"), Some(data.len().to_string()));
    let part = request("GET", &url, &[("Range", "bytes=100-199")]);
    assert_eq!(part.status, 206);
    assert!(part.body == data[100..200]);
    assert_eq!(upstream_gets(), gets, "hits from the cache");

    // A manifest naming the sha512 layer (a sha256 config): pushed through pullgate, pulled
    // back, and its layer served for that repository with no upstream question.
    let config = b"{\"architecture\":\"amd64\",\"os\":\"linux\"}";
    let config_digest = sha256(config);
    push_blob_upstream(&up, "team/two", &config_digest, config);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest, "size": data.len()}],
    });
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let put = send(
        "PUT",
        &gw.url("/v2/team/two/manifests/v1"),
        &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
        bytes.clone(),
    );
    assert_eq!(put.status, 201, "{}", String::from_utf8_lossy(&put.body));
    let pulled = request(
        "GET",
        &gw.url("/v2/team/two/manifests/v1"),
        &[("Accept", MANIFEST_ACCEPT)],
    );
    assert_eq!(pulled.body, bytes);
    let asked = up.requests().len();
    let layer = request("GET", &gw.url(&format!("/v2/team/two/blobs/{digest}")), &[]);
    assert!(layer.status == 200 && layer.body == data);
    assert_eq!(
        up.requests().len(),
        asked,
        "confirmed by the manifest it came with"
    );

    // The manifest by a sha512 digest of its bytes: what the upstream says (it names
    // manifests by sha256), never a 500.
    let by512 = request(
        "GET",
        &gw.url(&format!("/v2/team/two/manifests/{}", sha512(&bytes))),
        &[("Accept", MANIFEST_ACCEPT)],
    );
    assert!(by512.status < 500, "{}", by512.status);
}

#[test]
fn unknown_digest_algorithms_are_digest_invalid_everywhere() {
    let up = Upstream::start(UpstreamOptions::default());
    let gw = Gateway::start(&registry("hub", &up, "default = true\npush = true"));
    let before = up.requests().len();
    for path in [
        "/v2/team/app/blobs/blake3:abcd".to_string(),
        "/v2/team/app/manifests/sha384:abcdef".to_string(),
        "/v2/team/app/referrers/md5:d41d8cd98f00b204e9800998ecf8427e".to_string(),
        format!("/v2/team/app/blobs/sha512:{}", "a".repeat(64)),
    ] {
        let a = raw_get(&gw.addr(), &path);
        assert_eq!(
            a.status,
            400,
            "{path}: {}",
            String::from_utf8_lossy(&a.body)
        );
        assert_eq!(a.oci_code().as_deref(), Some("DIGEST_INVALID"), "{path}");
    }
    // An upload finished with an unknown algorithm: the upstream's own answer, not a 500.
    let started = send("POST", &gw.url("/v2/team/app/blobs/uploads/"), &[], vec![]);
    let location = started.header("location").expect("Location");
    let sep = if location.contains('?') { '&' } else { '?' };
    let put = send(
        "PUT",
        &gw.url(&format!("{location}{sep}digest=blake3:abcd")),
        &[("Content-Type", "application/octet-stream")],
        b"x".to_vec(),
    );
    assert!((400..500).contains(&put.status), "{}", put.status);
    assert!(up.requests().len() > before);
}
