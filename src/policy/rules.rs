//! The access rules of one registry (DESIGN.md "Configuration", issue 5 items 2-4, 7).
//!
//! Owns: [`decide`] and the denial [`Reason`]s. Must never: let wrong credentials fall through
//! to network rules, give an authenticated caller less than an anonymous caller from the same
//! source would get, or put anything but the caller's own address, zone, identity and
//! repository and the names of config keys into a reason (invariant 6: actionable, no
//! internals).
//!
//! The rules, checked in this order (the first that fails is the reason):
//!
//! 1. **Credentials.** `Authn::BadCredentials` is denied with a Basic challenge (401).
//! 2. **Push and delete switches.** A push to a registry with `push = false` is denied; a
//!    delete on a registry without `delete = true` is `UNSUPPORTED` (405), naming the key.
//! 3. **Network.** The source passes when `network_access` is `enabled`, or `selected` and one
//!    of the source's zones (any of them, zones may overlap) is in the registry's `zones`.
//!    Otherwise the caller must be an identity holding the role of the action (`pull` for a
//!    pull, `push` for a push) to pass as an identity, and:
//!    - `trusted_identities = true` (default): such an identity passes from any source.
//!    - `trusted_identities = false`: identities are held to the zone rules too. Under
//!      `selected` that means the same zones as everyone; under `disabled` (identities only)
//!      the identity must come from one of the registry's `zones`, or from anywhere when the
//!      registry lists none.
//!
//!    An identity without the action's role is treated like an anonymous caller from its
//!    source, so credentials never reduce access.
//! 4. **Push and delete roles.** When any `[[identity]]` is configured, a push needs an
//!    identity with the `push` role, a delete one with the `delete` role. With no identity
//!    configured at all, `push = true` plus the network rule is the whole gate (the
//!    private-endpoint case: the VPC is the boundary, so `pullgate check` does not warn about
//!    it).
//! 5. **Repositories.** `deny_repositories` first: any match denies. Then, when `repositories`
//!    is not empty, the repository must match one of them. These hold for identities too.
//!    Network comes before repositories so that a caller outside the network learns nothing
//!    about repository rules.
//!
//! A denial invites authentication (401 with a Basic challenge instead of 403) when the caller
//! is anonymous, password identities exist, and an identity with the right role would pass
//! the rule that failed.

use std::fmt;

use crate::config::{NetworkAccess, Registry, Roles};
use crate::oci::{ErrorCode, Repository};

use super::{glob, Action, Authn, Decision, Facts};

/// Why a request was denied: a bounded set, for metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReasonCode {
    /// Credentials were presented and are wrong (or malformed).
    BadCredentials,
    /// `network_access = "disabled"` and the caller is not an identity.
    IdentityRequired,
    /// `network_access = "selected"` and the source is in none of the registry's zones.
    SourceNotInZone,
    /// `trusted_identities = false` and the identity's source is in none of the zones.
    IdentityNotInZone,
    /// The identity lacks the role (`pull` / `push`) the request needs.
    MissingRole,
    /// A push to a registry with `push = false`.
    PushDisabled,
    /// A push without an identity, while identities are configured.
    PushNeedsIdentity,
    /// A delete on a registry without `delete = true`.
    DeleteDisabled,
    /// A delete without an identity, while identities are configured.
    DeleteNeedsIdentity,
    /// The repository matches a `deny_repositories` glob.
    RepositoryDenied,
    /// The repository matches none of the `repositories` globs.
    RepositoryNotAllowed,
}

impl ReasonCode {
    pub const ALL: [ReasonCode; 11] = [
        ReasonCode::BadCredentials,
        ReasonCode::IdentityRequired,
        ReasonCode::SourceNotInZone,
        ReasonCode::IdentityNotInZone,
        ReasonCode::MissingRole,
        ReasonCode::PushDisabled,
        ReasonCode::PushNeedsIdentity,
        ReasonCode::DeleteDisabled,
        ReasonCode::DeleteNeedsIdentity,
        ReasonCode::RepositoryDenied,
        ReasonCode::RepositoryNotAllowed,
    ];

    /// Short stable label for metrics and the audit log.
    pub fn label(self) -> &'static str {
        match self {
            ReasonCode::BadCredentials => "bad_credentials",
            ReasonCode::IdentityRequired => "identity_required",
            ReasonCode::SourceNotInZone => "source_not_in_zone",
            ReasonCode::IdentityNotInZone => "identity_not_in_zone",
            ReasonCode::MissingRole => "missing_role",
            ReasonCode::PushDisabled => "push_disabled",
            ReasonCode::PushNeedsIdentity => "push_needs_identity",
            ReasonCode::DeleteDisabled => "delete_disabled",
            ReasonCode::DeleteNeedsIdentity => "delete_needs_identity",
            ReasonCode::RepositoryDenied => "repository_denied",
            ReasonCode::RepositoryNotAllowed => "repository_not_allowed",
        }
    }
}

/// A denial: a stable code and a sentence a person can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason {
    code: ReasonCode,
    message: String,
    challenge: bool,
}

impl Reason {
    fn new(code: ReasonCode, message: String, challenge: bool) -> Reason {
        Reason {
            code,
            message,
            challenge,
        }
    }

    pub fn code(&self) -> ReasonCode {
        self.code
    }

    pub fn label(&self) -> &'static str {
        self.code.label()
    }

    /// For the client's error body, logs and the audit line. Names the registry and the rule
    /// (as a config key); never a secret, a CIDR or another caller's data.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Answer 401 with `WWW-Authenticate: Basic realm="pullgate"`: credentials would help.
    pub fn challenge(&self) -> bool {
        self.challenge
    }

    /// 401 when [`Reason::challenge`], else 403 (405 for a registry that takes no deletes).
    pub fn status(&self) -> u16 {
        if self.code == ReasonCode::DeleteDisabled {
            405
        } else if self.challenge {
            401
        } else {
            403
        }
    }

    /// `UNAUTHORIZED` when [`Reason::challenge`], else `DENIED` (`UNSUPPORTED` for a registry
    /// that takes no deletes).
    pub fn error_code(&self) -> ErrorCode {
        if self.code == ReasonCode::DeleteDisabled {
            ErrorCode::Unsupported
        } else if self.challenge {
            ErrorCode::Unauthorized
        } else {
            ErrorCode::Denied
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Allow or deny one request. Pure: the same facts always give the same decision.
pub fn decide(facts: &Facts<'_>) -> Decision {
    match check(facts) {
        Ok(()) => Decision::Allow,
        Err(reason) => Decision::Deny(reason),
    }
}

fn check(f: &Facts<'_>) -> Result<(), Reason> {
    let reg = f.registry;
    let name = &reg.name;
    // Issue 5 item 3: wrong credentials are a 401 with a challenge, not a fall-through.
    if let Authn::BadCredentials(failure) = f.authn {
        let message = failure.public_message().to_owned();
        return Err(Reason::new(ReasonCode::BadCredentials, message, true));
    }
    if f.action == Action::Push && !reg.push {
        let message =
            format!("registry {name} does not accept pushes (registry.{name}.push = false)");
        return Err(Reason::new(ReasonCode::PushDisabled, message, false));
    }
    if f.action == Action::Delete && !reg.delete {
        let message = format!(
            "deletes through pullgate are not enabled for registry {name} \
             (registry.{name}.delete = false)"
        );
        return Err(Reason::new(ReasonCode::DeleteDisabled, message, false));
    }
    let (identity, has_role) = match f.authn {
        Authn::Identity { name, roles, .. } => (Some(name.as_str()), has_role(*roles, f.action)),
        _ => (None, false),
    };
    network(f, identity, has_role)?;
    if f.action != Action::Pull && f.identities.any && !has_role {
        return Err(match identity {
            Some(id) => missing_role(id, f.action, name),
            None => {
                let (code, what) = match f.action {
                    Action::Delete => (ReasonCode::DeleteNeedsIdentity, "deleting on"),
                    _ => (ReasonCode::PushNeedsIdentity, "pushing to"),
                };
                Reason::new(
                    code,
                    format!(
                        "{what} registry {name} needs an identity with the {} role: \
                         log in (docker login) or present a client certificate",
                        f.action.label()
                    ),
                    f.identities.password,
                )
            }
        });
    }
    if let Some(repository) = f.repository {
        repositories(reg, repository)?;
    }
    Ok(())
}

fn has_role(roles: Roles, action: Action) -> bool {
    match action {
        Action::Pull => roles.pull,
        Action::Push => roles.push,
        Action::Delete => roles.delete,
    }
}

/// Rule 3: `network_access`, `zones`, `trusted_identities`.
fn network(f: &Facts<'_>, identity: Option<&str>, has_role: bool) -> Result<(), Reason> {
    let reg = f.registry;
    let name = &reg.name;
    let in_zone = f.zones.any_of(&reg.zones).is_some();
    let open = match reg.network_access {
        NetworkAccess::Enabled => true,
        NetworkAccess::Selected => in_zone,
        NetworkAccess::Disabled => false,
    };
    if open {
        return Ok(());
    }
    // Would an identity holding the role get in from this source?
    let identity_source_ok = reg.trusted_identities
        || (reg.network_access == NetworkAccess::Disabled && (reg.zones.is_empty() || in_zone));
    if has_role {
        if identity_source_ok {
            return Ok(());
        }
        let id = identity.unwrap_or("?");
        let message = format!(
            "identity {id} connects from {} ({}), which is not in a zone allowed for registry \
             {name}; identities must come from its zones too \
             (registry.{name}.trusted_identities = false)",
            f.source, f.zones
        );
        return Err(Reason::new(ReasonCode::IdentityNotInZone, message, false));
    }
    let identity_passes = f.identities.any && identity_source_ok;
    if let (Some(id), true) = (identity, identity_passes) {
        return Err(missing_role(id, f.action, name));
    }
    let challenge = identity_passes && f.identities.password;
    let hint = if identity_passes {
        format!("; an identity with the {} role may pass", f.action.label())
    } else {
        String::new()
    };
    Err(match reg.network_access {
        NetworkAccess::Disabled => Reason::new(
            ReasonCode::IdentityRequired,
            if f.identities.any {
                format!(
                    "registry {name} accepts identities only \
                     (registry.{name}.network_access = \"disabled\"): log in (docker login) or \
                     present a client certificate{}",
                    if identity_passes {
                        String::new()
                    } else {
                        format!(", from a zone listed in registry.{name}.zones")
                    }
                )
            } else {
                format!(
                    "registry {name} accepts identities only \
                     (registry.{name}.network_access = \"disabled\"), and none is configured"
                )
            },
            challenge,
        ),
        _ => Reason::new(
            ReasonCode::SourceNotInZone,
            format!(
                "source {} ({}) is not in a zone allowed for registry {name} \
                 (registry.{name}.zones){hint}",
                f.source, f.zones
            ),
            challenge,
        ),
    })
}

fn missing_role(identity: &str, action: Action, registry: &str) -> Reason {
    let role = action.label();
    Reason::new(
        ReasonCode::MissingRole,
        format!(
            "identity {identity} lacks the {role} role needed to {role} on registry {registry} \
             (identity.{identity}.roles)"
        ),
        false,
    )
}

/// Rule 5: `deny_repositories`, then `repositories`.
/// Rule 5 alone: `deny_repositories`, then `repositories`. For callers the other rules do not
/// concern (the gateway's own warm jobs).
pub fn repository_rules(reg: &Registry, repository: &Repository) -> Decision {
    match repositories(reg, repository) {
        Ok(()) => Decision::Allow,
        Err(reason) => Decision::Deny(reason),
    }
}

fn repositories(reg: &Registry, repository: &Repository) -> Result<(), Reason> {
    let name = &reg.name;
    let repo = repository.as_str();
    if let Some(rule) = reg
        .deny_repositories
        .iter()
        .find(|g| glob::matches(g, repo))
    {
        let message = format!(
            "repository {repo} is denied on registry {name} by the \
             registry.{name}.deny_repositories rule \"{rule}\""
        );
        return Err(Reason::new(ReasonCode::RepositoryDenied, message, false));
    }
    if !reg.repositories.is_empty() && !reg.repositories.iter().any(|g| glob::matches(g, repo)) {
        let message = format!(
            "repository {repo} is not among the repositories allowed on registry {name} \
             (registry.{name}.repositories)"
        );
        return Err(Reason::new(
            ReasonCode::RepositoryNotAllowed,
            message,
            false,
        ));
    }
    Ok(())
}
