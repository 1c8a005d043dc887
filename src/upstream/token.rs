//! The bearer-token flow: `WWW-Authenticate` parsing, realm trust, token responses and the
//! token cache.
//!
//! Tokens are cached per (scope, credential) until shortly before they expire, so a warm pull
//! costs no token round trip. Nothing here does I/O; `upstream::client` drives it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::secret::Secret;

/// One challenge from a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
        error: Option<String>,
    },
}

/// Parse every challenge in a `WWW-Authenticate` value. Unknown schemes and malformed parts are
/// skipped; a Bearer challenge without a realm is dropped (there is nowhere to ask).
pub fn parse_challenges(value: &str) -> Vec<Challenge> {
    let mut out = Vec::new();
    let mut rest = value.trim();
    while !rest.is_empty() {
        let (scheme, after) = split_token(rest);
        if scheme.is_empty() {
            break;
        }
        let (params, after) = parse_params(after);
        rest = after.trim_start_matches([',', ' ']);
        if scheme.eq_ignore_ascii_case("basic") {
            out.push(Challenge::Basic);
        } else if scheme.eq_ignore_ascii_case("bearer") {
            let get = |k: &str| {
                params
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(k))
                    .map(|(_, v)| v.clone())
            };
            if let Some(realm) = get("realm") {
                out.push(Challenge::Bearer {
                    realm,
                    service: get("service"),
                    scope: get("scope"),
                    error: get("error"),
                });
            }
        }
    }
    out
}

/// The actions a Bearer challenge's `scope` asks for on `repository`
/// (`repository:<name>:<actions>`), when they are all actions of the distribution spec
/// (`pull`, `push`, `delete`, `*`). A scope for another repository or resource, or with other
/// actions, is not taken: pullgate asks only for what the policy allowed it to do here.
pub fn challenge_actions(challenge: &Challenge, repository: &str) -> Option<String> {
    let Challenge::Bearer {
        scope: Some(scope), ..
    } = challenge
    else {
        return None;
    };
    scope.split_whitespace().find_map(|one| {
        let rest = one.strip_prefix("repository:")?;
        let (name, actions) = rest.rsplit_once(':')?;
        let known = !actions.is_empty()
            && actions
                .split(',')
                .all(|a| matches!(a, "pull" | "push" | "delete" | "*"));
        (name == repository && known).then(|| actions.to_owned())
    })
}

fn split_token(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    let end = s
        .find(|c: char| c.is_whitespace() || c == ',')
        .unwrap_or(s.len());
    (&s[..end], &s[end..])
}

/// Parse `k=v, k="quoted \" value"` pairs until a token that is not followed by `=` (the next
/// challenge's scheme) or the end.
fn parse_params(mut s: &str) -> (Vec<(String, String)>, &str) {
    let mut params = Vec::new();
    loop {
        let trimmed = s.trim_start_matches([',', ' ', '\t']);
        let Some(eq) = trimmed.find('=') else {
            return (params, trimmed);
        };
        let name = trimmed[..eq].trim();
        if name.is_empty() || name.contains([' ', ',', '"']) {
            return (params, trimmed);
        }
        let after = trimmed[eq + 1..].trim_start();
        let (value, rest) = if let Some(quoted) = after.strip_prefix('"') {
            read_quoted(quoted)
        } else {
            let end = after.find([',', ' ']).unwrap_or(after.len());
            (after[..end].to_string(), &after[end..])
        };
        params.push((name.to_string(), value));
        s = rest;
    }
}

fn read_quoted(s: &str) -> (String, &str) {
    let mut value = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => {
                if let Some((_, escaped)) = chars.next() {
                    value.push(escaped);
                }
            }
            '"' => return (value, &s[i + 1..]),
            _ => value.push(c),
        }
    }
    (value, "")
}

/// What a token endpoint answered, reduced to what pullgate needs.
#[derive(Debug)]
pub struct TokenResponse {
    pub token: Secret,
    pub expires_in: Duration,
}

/// The distribution token spec's response: `token` or `access_token`, `expires_in` defaulting
/// to 60 seconds.
pub fn parse_token_response(body: &[u8]) -> Result<TokenResponse, String> {
    #[derive(serde::Deserialize)]
    struct Raw {
        token: Option<String>,
        access_token: Option<String>,
        expires_in: Option<u64>,
    }
    let raw: Raw = serde_json::from_slice(body).map_err(|e| {
        format!("token endpoint answered something that is not a token response: {e}")
    })?;
    let token = raw
        .token
        .filter(|t| !t.is_empty())
        .or(raw.access_token.filter(|t| !t.is_empty()))
        .ok_or("token endpoint answered without a token")?;
    let expires_in = Duration::from_secs(raw.expires_in.filter(|s| *s > 0).unwrap_or(60));
    Ok(TokenResponse {
        token: Secret::new(token),
        expires_in,
    })
}

/// How long a token may be reused: its lifetime less a margin (a tenth, at least 1 s and at
/// most 30 s), so it is never presented in its last moments.
pub fn usable_for(expires_in: Duration) -> Duration {
    let margin = (expires_in / 10).clamp(Duration::from_secs(1), Duration::from_secs(30));
    expires_in.saturating_sub(margin)
}

/// May the configured credentials be sent to this realm? Invariant 1: only to the upstream host,
/// hosts on its registrable domain, or hosts the config lists in `realm_hosts`; and never over
/// plain HTTP to a realm when the upstream itself is HTTPS.
pub fn realm_may_receive_credentials(
    upstream_host: &str,
    upstream_https: bool,
    realm: &url::Url,
    realm_hosts: &[String],
) -> bool {
    let Some(realm_host) = realm.host_str() else {
        return false;
    };
    let realm_host = realm_host.trim_matches(['[', ']']).to_ascii_lowercase();
    if upstream_https && realm.scheme() != "https" {
        return false;
    }
    if realm_host == upstream_host || realm_hosts.contains(&realm_host) {
        return true;
    }
    match (
        registrable_domain(&realm_host),
        registrable_domain(upstream_host),
    ) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// The registrable domain ("eTLD+1") of a host name; `None` for IP literals and bare suffixes.
fn registrable_domain(host: &str) -> Option<String> {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return None;
    }
    let domain = psl::domain(host.as_bytes())?;
    if domain.suffix().is_known() {
        std::str::from_utf8(domain.as_bytes())
            .ok()
            .map(str::to_string)
    } else {
        None
    }
}

/// Tokens by (scope, credential name), each with its reuse deadline.
#[derive(Debug, Default)]
pub struct TokenCache {
    entries: Mutex<HashMap<(String, String), (Secret, Instant)>>,
}

impl TokenCache {
    pub fn get(&self, scope: &str, credential: &str) -> Option<Secret> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let (token, until) = entries.get(&(scope.to_string(), credential.to_string()))?;
        (Instant::now() < *until).then(|| token.clone())
    }

    pub fn put(&self, scope: &str, credential: &str, token: Secret, expires_in: Duration) {
        let until = Instant::now() + usable_for(expires_in);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|_, (_, u)| *u > Instant::now());
        entries.insert((scope.to_string(), credential.to_string()), (token, until));
    }

    pub fn forget(&self, scope: &str, credential: &str) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.remove(&(scope.to_string(), credential.to_string()));
    }
}

#[cfg(test)]
mod tests;
