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

pub use crate::support::upstream::{push_blob_upstream, push_manifest_upstream, upstream_token};
