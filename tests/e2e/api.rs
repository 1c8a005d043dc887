//! Raw registry-API requests with bodies, for the OCI-fidelity tests (DELETE, negotiation,
//! referrers, sha512, uploads, challenges).
#![allow(dead_code)]

use base64::Engine;

use crate::harness::{request_with_body, Answer};

/// Send one request with a body (no redirects followed) and read the whole answer.
pub fn send(method: &str, url: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Answer {
    request_with_body(
        crate::support::http_client(None),
        method,
        url,
        headers,
        body,
    )
}

/// `Authorization: Basic ...` for a pullgate identity.
pub fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// An `[[identity]]` table with a password and roles.
pub fn identity(name: &str, password: &str, roles: &[&str]) -> String {
    let roles: Vec<String> = roles.iter().map(|r| format!("\"{r}\"")).collect();
    format!(
        "[[identity]]\nname = \"{name}\"\nusername = \"{name}\"\npassword_sha256 = \"{}\"\nroles = [{}]\n\n",
        crate::support::sha256_hex(password.as_bytes()),
        roles.join(", ")
    )
}

/// `sha256:<hex>` of bytes.
pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", crate::support::sha256_hex(bytes))
}

/// Pushes `body` as a blob of `repo` straight to the upstream (monolithic POST + PUT) with
/// the upstream's own credentials; `digest` names it (any algorithm the upstream takes).
pub fn push_blob_upstream(up: &crate::support::Upstream, repo: &str, digest: &str, body: &[u8]) {
    let token = upstream_token(up, repo, "pull,push");
    let client = crate::support::http_client(Some(up.pki().ca_pem()));
    let base = up.url();
    let (repo, digest, body) = (repo.to_string(), digest.to_string(), body.to_vec());
    let status = crate::support::block_on(async move {
        let started = client
            .post(format!("{base}/v2/{repo}/blobs/uploads/"))
            .bearer_auth(&token)
            .send()
            .await
            .expect("POST upload");
        assert_eq!(started.status().as_u16(), 202, "upload start");
        let location = started.headers()["location"].to_str().unwrap().to_string();
        let url = if location.starts_with('/') {
            format!("{base}{location}")
        } else {
            location
        };
        let sep = if url.contains('?') { '&' } else { '?' };
        client
            .put(format!("{url}{sep}digest={digest}"))
            .bearer_auth(&token)
            .header("Content-Type", "application/octet-stream")
            .body(body)
            .send()
            .await
            .expect("PUT upload")
            .status()
            .as_u16()
    });
    assert_eq!(status, 201, "upstream took the blob");
}

/// PUTs a manifest straight to the upstream.
pub fn push_manifest_upstream(
    up: &crate::support::Upstream,
    repo: &str,
    reference: &str,
    media_type: &str,
    body: &[u8],
) {
    let token = upstream_token(up, repo, "pull,push");
    let client = crate::support::http_client(Some(up.pki().ca_pem()));
    let url = format!("{}/v2/{repo}/manifests/{reference}", up.url());
    let (media_type, body) = (media_type.to_string(), body.to_vec());
    let status = crate::support::block_on(async move {
        let r = client
            .put(url)
            .bearer_auth(&token)
            .header("Content-Type", media_type)
            .body(body)
            .send()
            .await
            .expect("PUT manifest");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        (status, text)
    });
    assert_eq!(status.0, 201, "upstream took the manifest: {}", status.1);
}

/// A token for the upstream user, minted by the issuer.
pub fn upstream_token(up: &crate::support::Upstream, repo: &str, actions: &str) -> String {
    let actions: Vec<&str> = actions.split(',').collect();
    up.issuer().mint(
        up.user(),
        crate::support::upstream::SERVICE,
        serde_json::json!([{"type": "repository", "name": repo, "actions": actions}]),
    )
}
