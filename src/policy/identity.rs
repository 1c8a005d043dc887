//! Who is calling (issue 5, item 3): `[[identity]]` entries matched against an
//! `Authorization: Basic` header or the subjects of a verified client certificate.
//!
//! Owns: parsing Basic credentials, checking passwords, and the [`Authn`] result. Must never:
//! compare a secret in variable time, print a password (or a hash of one) through `Debug` or
//! `Display`, or turn wrong credentials into an anonymous caller: wrong credentials are
//! [`Authn::BadCredentials`], which the gateway answers with 401 and a Basic challenge.
//!
//! Order of checks in [`Authenticator::authenticate`]:
//! 1. An `Authorization` header, when at least one password identity is configured. Anything
//!    but valid Basic credentials of a configured user is `BadCredentials`. With no password
//!    identity configured the header is ignored: runtimes may send credentials they hold for
//!    the mirror's host name, and there is nothing to check them against.
//! 2. The client certificate's subjects (CN and DNS SANs, verified by the TLS layer against
//!    `client_ca`), matched ASCII-case-insensitively against `mtls_subject`; the first identity
//!    in config order wins. A verified certificate that matches no identity is anonymous.
//! 3. Otherwise `Anonymous`.
//!
//! Passwords: SHA-256 of the presented password compared with `password_sha256` in constant
//! time; a `password_file` is read on every check (so rotation needs no reload), trimmed,
//! hashed, and compared the same way. An unknown username is compared against a dummy hash so
//! that it costs about what a wrong password does.

use std::fmt;
use std::path::Path;

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use sha2::{Digest as _, Sha256};

use crate::config::{Identity, IdentityAuth, PasswordCheck, Roles};
use crate::secret::Secret;

/// Longest `Authorization` value parsed; longer ones are malformed.
const MAX_AUTHORIZATION_LEN: usize = 4096;

/// Base64 as clients write it in Basic credentials: standard alphabet, padding optional.
const BASIC_B64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Credentials presented in a request header.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    Basic { username: String, password: Secret },
}

impl Credentials {
    /// Parses an `Authorization` header value (RFC 7617): `Basic <base64(user:password)>`, the
    /// scheme case-insensitive, the decoded text UTF-8, split at the first `:`.
    pub fn parse_authorization(value: &str) -> Result<Credentials, AuthFailure> {
        if value.len() > MAX_AUTHORIZATION_LEN {
            return Err(AuthFailure::Malformed);
        }
        let value = value.trim();
        let (scheme, rest) = value.split_once([' ', '\t']).unwrap_or((value, ""));
        if !scheme.eq_ignore_ascii_case("basic") {
            return Err(AuthFailure::UnsupportedScheme);
        }
        let decoded = BASIC_B64
            .decode(rest.trim())
            .map_err(|_| AuthFailure::Malformed)?;
        let text = String::from_utf8(decoded).map_err(|_| AuthFailure::Malformed)?;
        let (username, password) = text.split_once(':').ok_or(AuthFailure::Malformed)?;
        Ok(Credentials::Basic {
            username: username.to_owned(),
            password: Secret::new(password),
        })
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
        }
    }
}

/// How an identity proved itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    Mtls,
    Basic,
}

impl AuthMethod {
    pub fn label(self) -> &'static str {
        match self {
            AuthMethod::Mtls => "mtls",
            AuthMethod::Basic => "basic",
        }
    }
}

/// The outcome of authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authn {
    /// No credentials (or none that apply).
    Anonymous,
    /// A configured identity.
    Identity {
        name: String,
        roles: Roles,
        method: AuthMethod,
    },
    /// Credentials were presented and are wrong: 401 with a Basic challenge, never a
    /// fall-through to zone rules.
    BadCredentials(AuthFailure),
}

impl Authn {
    /// The identity name, for the audit log.
    pub fn identity(&self) -> Option<&str> {
        match self {
            Authn::Identity { name, .. } => Some(name),
            _ => None,
        }
    }
}

/// Why presented credentials were refused. `Display` is for logs (it may name an identity and a
/// file error, never a secret); [`AuthFailure::public_message`] is for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthFailure {
    /// Not parseable as Basic credentials.
    Malformed,
    /// A scheme other than Basic (`Bearer ...`).
    UnsupportedScheme,
    /// Unknown username or wrong password (not told apart, to the client or in logs).
    WrongCredentials,
    /// The identity's `password_file` could not be read: a server problem, but the caller is
    /// still not authenticated.
    PasswordFileUnreadable { identity: String, error: String },
}

impl AuthFailure {
    /// What the client is told.
    pub fn public_message(&self) -> &'static str {
        match self {
            AuthFailure::Malformed => "malformed Authorization header: expected Basic credentials",
            AuthFailure::UnsupportedScheme => {
                "unsupported authorization scheme: pullgate accepts Basic credentials (docker login)"
            }
            AuthFailure::WrongCredentials | AuthFailure::PasswordFileUnreadable { .. } => {
                "unknown username or wrong password"
            }
        }
    }

    /// Short stable label for logs.
    pub fn label(&self) -> &'static str {
        match self {
            AuthFailure::Malformed => "malformed",
            AuthFailure::UnsupportedScheme => "unsupported_scheme",
            AuthFailure::WrongCredentials => "wrong_credentials",
            AuthFailure::PasswordFileUnreadable { .. } => "password_file_unreadable",
        }
    }
}

impl fmt::Display for AuthFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuthFailure::PasswordFileUnreadable { identity, error } => write!(
                f,
                "identity {identity}: cannot read its password_file: {error}"
            ),
            other => f.write_str(other.public_message()),
        }
    }
}

/// What kinds of identity the config has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdentityKinds {
    /// At least one `[[identity]]`.
    pub any: bool,
    /// At least one username identity: a Basic challenge can lead somewhere.
    pub password: bool,
}

/// Checks credentials against the configured identities. Built once per config.
pub struct Authenticator {
    identities: Vec<Identity>,
    kinds: IdentityKinds,
}

impl Authenticator {
    pub fn new(identities: &[Identity]) -> Authenticator {
        let password = identities
            .iter()
            .any(|i| matches!(i.auth, IdentityAuth::Password { .. }));
        Authenticator {
            identities: identities.to_vec(),
            kinds: IdentityKinds {
                any: !identities.is_empty(),
                password,
            },
        }
    }

    pub fn kinds(&self) -> IdentityKinds {
        self.kinds
    }

    /// Authenticates a request from its `Authorization` header value (if any) and the verified
    /// client-certificate subjects (CN and DNS SANs; empty without a certificate).
    pub fn authenticate(&self, authorization: Option<&str>, mtls_subjects: &[&str]) -> Authn {
        if let Some(value) = authorization.filter(|_| self.kinds.password) {
            return match Credentials::parse_authorization(value) {
                Ok(creds) => self.check(&creds),
                Err(failure) => Authn::BadCredentials(failure),
            };
        }
        self.match_subjects(mtls_subjects)
            .unwrap_or(Authn::Anonymous)
    }

    /// Checks parsed credentials: the identity, or `BadCredentials`.
    pub fn check(&self, creds: &Credentials) -> Authn {
        let Credentials::Basic { username, password } = creds;
        let presented = sha256(password.expose().as_bytes());
        let mut checked_any = false;
        for identity in &self.identities {
            let IdentityAuth::Password {
                username: user,
                password: check,
            } = &identity.auth
            else {
                continue;
            };
            if user != username {
                continue;
            }
            checked_any = true;
            let expected = match check {
                PasswordCheck::Sha256(hash) => *hash,
                PasswordCheck::File(path) => match read_password_file(path) {
                    Ok(hash) => hash,
                    Err(error) => {
                        return Authn::BadCredentials(AuthFailure::PasswordFileUnreadable {
                            identity: identity.name.clone(),
                            error,
                        })
                    }
                },
            };
            if ct_eq(&presented, &expected) {
                return Authn::Identity {
                    name: identity.name.clone(),
                    roles: identity.roles,
                    method: AuthMethod::Basic,
                };
            }
        }
        if !checked_any {
            // Unknown user: spend one comparison, like a wrong password does.
            let _ = ct_eq(&presented, &[0u8; 32]);
        }
        Authn::BadCredentials(AuthFailure::WrongCredentials)
    }

    /// The first mTLS identity (config order) whose subject is one of `subjects`.
    pub fn match_subjects(&self, subjects: &[&str]) -> Option<Authn> {
        self.identities
            .iter()
            .find_map(|identity| match &identity.auth {
                IdentityAuth::Mtls { subject }
                    if subjects.iter().any(|s| s.eq_ignore_ascii_case(subject)) =>
                {
                    Some(Authn::Identity {
                        name: identity.name.clone(),
                        roles: identity.roles,
                        method: AuthMethod::Mtls,
                    })
                }
                _ => None,
            })
    }
}

impl fmt::Debug for Authenticator {
    /// Names and kinds only: a password hash is not printed either.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let entries: Vec<String> = self
            .identities
            .iter()
            .map(|i| match &i.auth {
                IdentityAuth::Mtls { subject } => format!("{} (mtls {subject})", i.name),
                IdentityAuth::Password { username, .. } => {
                    format!("{} (basic {username})", i.name)
                }
            })
            .collect();
        f.debug_struct("Authenticator")
            .field("identities", &entries)
            .finish()
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// SHA-256 of the trimmed content of a password file. The error text names the failure kind
/// only, never content.
fn read_password_file(path: &Path) -> Result<[u8; 32], String> {
    let content = std::fs::read(path).map_err(|e| e.to_string())?;
    let hash = sha256(content.trim_ascii());
    Ok(hash)
}

/// Constant-time equality of two 32-byte values: every byte is always examined, and the
/// accumulated difference goes through `black_box` so the compiler cannot turn the loop into
/// an early exit.
pub fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b.iter()) {
        diff |= std::hint::black_box(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests;
