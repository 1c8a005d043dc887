//! `decide` and `Policy`: every switch in both positions, and the network matrix of issue 5.

use std::net::IpAddr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use super::*;
use crate::config::{IdentityAuth, NetworkAccess, PasswordCheck, RedirectMode, Roles, Upstream};

const NONE: Roles = Roles {
    pull: false,
    push: false,
    delete: false,
};
const PULL: Roles = Roles {
    pull: true,
    push: false,
    delete: false,
};
const PUSH_ONLY: Roles = Roles {
    pull: false,
    push: true,
    delete: false,
};
const PULL_PUSH: Roles = Roles {
    pull: true,
    push: true,
    delete: false,
};

/// Kinds used by most tests: password identities exist (so challenges are possible).
const WITH_IDS: IdentityKinds = IdentityKinds {
    any: true,
    password: true,
};
const NO_IDS: IdentityKinds = IdentityKinds {
    any: false,
    password: false,
};

fn registry(access: NetworkAccess) -> Registry {
    Registry {
        name: "icr".into(),
        upstream: Upstream {
            origin: "https://icr.io".into(),
            https: true,
            host: "icr.io".into(),
            port: 443,
        },
        hosts: vec!["private.icr.io".into()],
        data_hosts: vec![],
        ns: vec![],
        prefix: None,
        default: false,
        library_namespace: false,
        credentials: None,
        realm_hosts: vec![],
        ca: None,
        network_access: access,
        zones: if access == NetworkAccess::Selected {
            vec!["vpc".into()]
        } else {
            vec![]
        },
        trusted_identities: true,
        repositories: vec![],
        deny_repositories: vec![],
        push: false,
        delete: false,
        redirect: RedirectMode::Follow,
        tag_ttl: None,
        scoped_credentials: Vec::new(),
        signatures: Vec::new(),
    }
}

fn zones() -> ZoneTable {
    ZoneTable::new(&[
        Zone {
            name: "build".into(),
            nets: vec!["10.1.0.0/16".parse().unwrap()],
        },
        Zone {
            name: "vpc".into(),
            nets: vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()],
        },
    ])
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn id(roles: Roles) -> Authn {
    Authn::Identity {
        name: "farm".into(),
        roles,
        method: AuthMethod::Mtls,
    }
}

fn repo(name: &str) -> Repository {
    Repository::parse(name).unwrap()
}

const IN_ZONE: &str = "10.2.3.4";
const OUT_ZONE: &str = "192.0.2.7";

/// One decision with the usual knobs; `repository` defaults to `team-a/app`.
struct Case<'a> {
    registry: &'a Registry,
    source: &'a str,
    authn: Authn,
    action: Action,
    identities: IdentityKinds,
    repository: Option<&'a str>,
}

impl<'a> Case<'a> {
    fn new(registry: &'a Registry, source: &'a str, authn: Authn) -> Case<'a> {
        Case {
            registry,
            source,
            authn,
            action: Action::Pull,
            identities: WITH_IDS,
            repository: Some("team-a/app"),
        }
    }

    fn push(mut self) -> Self {
        self.action = Action::Push;
        self
    }

    fn kinds(mut self, kinds: IdentityKinds) -> Self {
        self.identities = kinds;
        self
    }

    fn repo(mut self, name: Option<&'a str>) -> Self {
        self.repository = name;
        self
    }

    fn decide(&self) -> Decision {
        let table = zones();
        let source = ip(self.source);
        let repository = self.repository.map(repo);
        decide(&Facts {
            registry: self.registry,
            source,
            zones: table.lookup(source),
            authn: &self.authn,
            repository: repository.as_ref(),
            action: self.action,
            identities: self.identities,
        })
    }

    /// `allow` or the denial label, with `+401` when it challenges.
    fn outcome(&self) -> String {
        match self.decide() {
            Decision::Allow => "allow".into(),
            Decision::Deny(r) if r.challenge() => format!("{}+401", r.label()),
            Decision::Deny(r) => r.label().into(),
        }
    }

    fn reason(&self) -> Reason {
        match self.decide() {
            Decision::Deny(r) => r,
            Decision::Allow => panic!("expected a denial"),
        }
    }
}

#[test]
fn bad_credentials_never_fall_through() {
    let failure = AuthFailure::WrongCredentials;
    for access in [
        NetworkAccess::Enabled,
        NetworkAccess::Selected,
        NetworkAccess::Disabled,
    ] {
        let reg = registry(access);
        let case = Case::new(&reg, IN_ZONE, Authn::BadCredentials(failure.clone()));
        let reason = case.reason();
        assert_eq!(reason.code(), ReasonCode::BadCredentials);
        assert!(reason.challenge());
        assert_eq!(reason.status(), 401);
        assert_eq!(reason.error_code(), crate::oci::ErrorCode::Unauthorized);
        assert_eq!(reason.message(), "unknown username or wrong password");
    }
}

/// Issue 5 item 10, network part: access x trusted_identities x caller x source, for pulls.
/// `id` has the pull role, `id-` has none (it counts as anonymous where that is better).
#[test]
fn network_matrix_for_pulls() {
    let table = "
        enabled  trusted   anon in  allow
        enabled  trusted   anon out allow
        enabled  trusted   id   out allow
        enabled  trusted   id-  out allow
        enabled  untrusted anon out allow
        enabled  untrusted id   out allow
        selected trusted   anon in  allow
        selected trusted   anon out source_not_in_zone+401
        selected trusted   id   in  allow
        selected trusted   id   out allow
        selected trusted   id-  in  allow
        selected trusted   id-  out missing_role
        selected untrusted anon in  allow
        selected untrusted anon out source_not_in_zone
        selected untrusted id   in  allow
        selected untrusted id   out identity_not_in_zone
        selected untrusted id-  in  allow
        selected untrusted id-  out source_not_in_zone
        disabled trusted   anon in  identity_required+401
        disabled trusted   anon out identity_required+401
        disabled trusted   id   in  allow
        disabled trusted   id   out allow
        disabled trusted   id-  out missing_role
        disabled untrusted anon in  identity_required+401
        disabled untrusted anon out identity_required
        disabled untrusted id   in  allow
        disabled untrusted id   out identity_not_in_zone
        disabled untrusted id-  in  missing_role
        disabled untrusted id-  out identity_required
    ";
    for line in table.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let [access, trust, caller, source, want] = cols[..] else {
            panic!("bad row {line:?}");
        };
        let mut reg = registry(match access {
            "enabled" => NetworkAccess::Enabled,
            "selected" => NetworkAccess::Selected,
            _ => NetworkAccess::Disabled,
        });
        reg.trusted_identities = trust == "trusted";
        // Under `disabled` the zones matter only to untrusted identities.
        reg.zones = vec!["vpc".into()];
        let authn = match caller {
            "anon" => Authn::Anonymous,
            "id" => id(PULL),
            _ => id(NONE),
        };
        let source = if source == "in" { IN_ZONE } else { OUT_ZONE };
        let got = Case::new(&reg, source, authn).outcome();
        assert_eq!(got, want, "{line}");
    }
}

#[test]
fn selected_accepts_any_of_overlapping_zones() {
    let mut reg = registry(NetworkAccess::Selected);
    reg.zones = vec!["vpc".into()];
    // 10.1.2.3 is in build (longest) and vpc.
    assert!(Case::new(&reg, "10.1.2.3", Authn::Anonymous)
        .decide()
        .is_allow());
    reg.zones = vec!["build".into()];
    assert!(Case::new(&reg, "10.1.2.3", Authn::Anonymous)
        .decide()
        .is_allow());
    assert!(!Case::new(&reg, "10.2.0.1", Authn::Anonymous)
        .decide()
        .is_allow());
    reg.zones = vec!["office".into(), "build".into()];
    assert!(Case::new(&reg, "10.1.2.3", Authn::Anonymous)
        .decide()
        .is_allow());
}

#[test]
fn selected_ipv6_and_mapped_sources() {
    let reg = registry(NetworkAccess::Selected);
    assert!(Case::new(&reg, "fd00::1", Authn::Anonymous)
        .decide()
        .is_allow());
    assert!(Case::new(&reg, "::ffff:10.9.9.9", Authn::Anonymous)
        .decide()
        .is_allow());
    assert!(!Case::new(&reg, "2001:db8::1", Authn::Anonymous)
        .decide()
        .is_allow());
    assert!(!Case::new(&reg, "::ffff:192.0.2.7", Authn::Anonymous)
        .decide()
        .is_allow());
}

#[test]
fn disabled_without_zones_lets_untrusted_identities_in_from_anywhere() {
    let mut reg = registry(NetworkAccess::Disabled);
    reg.trusted_identities = false;
    assert!(reg.zones.is_empty());
    assert!(Case::new(&reg, OUT_ZONE, id(PULL)).decide().is_allow());
    assert_eq!(
        Case::new(&reg, OUT_ZONE, Authn::Anonymous).outcome(),
        "identity_required+401"
    );
}

#[test]
fn challenges_only_when_a_password_could_help() {
    let reg = registry(NetworkAccess::Disabled);
    let mtls_only = IdentityKinds {
        any: true,
        password: false,
    };
    let case = Case::new(&reg, OUT_ZONE, Authn::Anonymous);
    assert_eq!(case.outcome(), "identity_required+401");
    assert_eq!(case.kinds(mtls_only).outcome(), "identity_required");
    let none = Case::new(&reg, OUT_ZONE, Authn::Anonymous).kinds(NO_IDS);
    assert_eq!(none.outcome(), "identity_required");
    assert!(none.reason().message().contains("none is configured"));
    // Selected + no identities at all: nothing to log in as.
    let selected = registry(NetworkAccess::Selected);
    let case = Case::new(&selected, OUT_ZONE, Authn::Anonymous).kinds(NO_IDS);
    assert_eq!(case.outcome(), "source_not_in_zone");
    assert_eq!(case.reason().status(), 403);
    assert_eq!(case.reason().error_code(), crate::oci::ErrorCode::Denied);
}

#[test]
fn push_switch_both_positions() {
    let mut reg = registry(NetworkAccess::Enabled);
    reg.push = false;
    for authn in [Authn::Anonymous, id(PULL_PUSH)] {
        assert_eq!(
            Case::new(&reg, IN_ZONE, authn).push().outcome(),
            "push_disabled"
        );
    }
    // Pulls are unaffected by the push switch.
    assert!(Case::new(&reg, IN_ZONE, Authn::Anonymous)
        .decide()
        .is_allow());
    reg.push = true;
    assert!(Case::new(&reg, IN_ZONE, id(PULL_PUSH))
        .push()
        .decide()
        .is_allow());
}

#[test]
fn push_role() {
    let mut reg = registry(NetworkAccess::Enabled);
    reg.push = true;
    // Identities configured: pushing needs one with the push role.
    assert_eq!(
        Case::new(&reg, IN_ZONE, Authn::Anonymous).push().outcome(),
        "push_needs_identity+401"
    );
    let mtls_only = IdentityKinds {
        any: true,
        password: false,
    };
    assert_eq!(
        Case::new(&reg, IN_ZONE, Authn::Anonymous)
            .push()
            .kinds(mtls_only)
            .outcome(),
        "push_needs_identity"
    );
    assert_eq!(
        Case::new(&reg, IN_ZONE, id(PULL)).push().outcome(),
        "missing_role"
    );
    assert!(Case::new(&reg, IN_ZONE, id(PUSH_ONLY))
        .push()
        .decide()
        .is_allow());
    // No identity configured anywhere: push = true and the network rule decide alone.
    let case = Case::new(&reg, OUT_ZONE, Authn::Anonymous)
        .push()
        .kinds(NO_IDS);
    assert!(case.decide().is_allow());
    reg.network_access = NetworkAccess::Selected;
    reg.zones = vec!["vpc".into()];
    let case = Case::new(&reg, OUT_ZONE, Authn::Anonymous)
        .push()
        .kinds(NO_IDS);
    assert_eq!(case.outcome(), "source_not_in_zone");
    let case = Case::new(&reg, IN_ZONE, Authn::Anonymous)
        .push()
        .kinds(NO_IDS);
    assert!(case.decide().is_allow());
}

#[test]
fn push_and_network_rules_combine() {
    let mut reg = registry(NetworkAccess::Selected);
    reg.push = true;
    // A pusher passes as an identity with the push role (trusted).
    assert!(Case::new(&reg, OUT_ZONE, id(PUSH_ONLY))
        .push()
        .decide()
        .is_allow());
    // Its pull-only colleague from outside is out on the network rule (missing role there).
    assert_eq!(
        Case::new(&reg, OUT_ZONE, id(PULL)).push().outcome(),
        "missing_role"
    );
    // Untrusted identities must push from a zone.
    reg.trusted_identities = false;
    assert_eq!(
        Case::new(&reg, OUT_ZONE, id(PULL_PUSH)).push().outcome(),
        "identity_not_in_zone"
    );
    assert!(Case::new(&reg, IN_ZONE, id(PULL_PUSH))
        .push()
        .decide()
        .is_allow());
    // A push-only identity pulling is an anonymous caller from its source.
    assert!(Case::new(&reg, IN_ZONE, id(PUSH_ONLY)).decide().is_allow());
    assert_eq!(
        Case::new(&reg, OUT_ZONE, id(PUSH_ONLY)).outcome(),
        "source_not_in_zone"
    );
}

#[test]
fn repository_allow_and_deny_globs() {
    let mut reg = registry(NetworkAccess::Enabled);
    let outcome = |reg: &Registry, name: &str, authn: Authn| {
        Case::new(reg, IN_ZONE, authn).repo(Some(name)).outcome()
    };
    // Empty lists: everything.
    assert_eq!(outcome(&reg, "anything/at/all", Authn::Anonymous), "allow");

    reg.repositories = vec!["team-a/**".into(), "library/*".into()];
    assert_eq!(outcome(&reg, "team-a/app", Authn::Anonymous), "allow");
    assert_eq!(outcome(&reg, "team-a", Authn::Anonymous), "allow");
    assert_eq!(outcome(&reg, "library/alpine", Authn::Anonymous), "allow");
    assert_eq!(
        outcome(&reg, "team-b/app", Authn::Anonymous),
        "repository_not_allowed"
    );
    assert_eq!(
        outcome(&reg, "library/a/b", Authn::Anonymous),
        "repository_not_allowed"
    );
    // Identities are held to repository rules too.
    assert_eq!(
        outcome(&reg, "team-b/app", id(PULL)),
        "repository_not_allowed"
    );

    // Deny first, even when an allow glob matches.
    reg.deny_repositories = vec!["team-a/secret/**".into()];
    assert_eq!(
        outcome(&reg, "team-a/secret/x", Authn::Anonymous),
        "repository_denied"
    );
    assert_eq!(
        outcome(&reg, "team-a/secret", id(PULL_PUSH)),
        "repository_denied"
    );
    assert_eq!(outcome(&reg, "team-a/secrets", Authn::Anonymous), "allow");

    // Deny list alone.
    reg.repositories.clear();
    assert_eq!(outcome(&reg, "team-z/x", Authn::Anonymous), "allow");
    assert_eq!(
        outcome(&reg, "team-a/secret/y", Authn::Anonymous),
        "repository_denied"
    );

    // Pushes too.
    reg.push = true;
    let push = Case::new(&reg, IN_ZONE, id(PULL_PUSH))
        .push()
        .repo(Some("team-a/secret/z"));
    assert_eq!(push.outcome(), "repository_denied");
}

#[test]
fn no_repository_skips_repository_rules() {
    let mut reg = registry(NetworkAccess::Selected);
    reg.repositories = vec!["team-a/**".into()];
    reg.deny_repositories = vec!["**".into()];
    assert!(Case::new(&reg, IN_ZONE, Authn::Anonymous)
        .repo(None)
        .decide()
        .is_allow());
    // Network and credentials still apply.
    let out = Case::new(&reg, OUT_ZONE, Authn::Anonymous).repo(None);
    assert_eq!(out.outcome(), "source_not_in_zone+401");
    let bad = Case::new(&reg, IN_ZONE, Authn::BadCredentials(AuthFailure::Malformed)).repo(None);
    assert_eq!(bad.outcome(), "bad_credentials+401");
}

#[test]
fn network_is_checked_before_repositories() {
    let mut reg = registry(NetworkAccess::Selected);
    reg.deny_repositories = vec!["**".into()];
    assert_eq!(
        Case::new(&reg, OUT_ZONE, Authn::Anonymous)
            .kinds(NO_IDS)
            .outcome(),
        "source_not_in_zone"
    );
    assert_eq!(
        Case::new(&reg, IN_ZONE, Authn::Anonymous).outcome(),
        "repository_denied"
    );
}

#[test]
fn reasons_are_actionable_and_bounded() {
    let reg = registry(NetworkAccess::Selected);
    let r = Case::new(&reg, OUT_ZONE, Authn::Anonymous)
        .kinds(NO_IDS)
        .reason();
    assert_eq!(
        r.message(),
        "source 192.0.2.7 (no zone) is not in a zone allowed for registry icr (registry.icr.zones)"
    );
    assert_eq!(r.to_string(), r.message());
    let mut other = registry(NetworkAccess::Selected);
    other.zones = vec!["office".into()];
    let r = Case::new(&other, "10.1.0.9", Authn::Anonymous).reason();
    assert!(
        r.message()
            .starts_with("source 10.1.0.9 (zones build, vpc) is not in a zone allowed"),
        "{}",
        r.message()
    );
    assert!(r
        .message()
        .ends_with("; an identity with the pull role may pass"));

    let mut reg = registry(NetworkAccess::Enabled);
    reg.deny_repositories = vec!["secret/**".into()];
    let r = Case::new(&reg, IN_ZONE, Authn::Anonymous)
        .repo(Some("secret/x"))
        .reason();
    assert_eq!(
        r.message(),
        "repository secret/x is denied on registry icr by the \
         registry.icr.deny_repositories rule \"secret/**\""
    );
    let r = Case::new(&reg, IN_ZONE, id(PULL)).push().reason();
    assert!(r.message().contains("registry.icr.push = false"));
    reg.push = true;
    let r = Case::new(&reg, IN_ZONE, id(PULL)).push().reason();
    assert_eq!(
        r.message(),
        "identity farm lacks the push role needed to push on registry icr (identity.farm.roles)"
    );

    // Labels: distinct, snake_case, and no reason names a CIDR.
    let labels: std::collections::HashSet<_> = ReasonCode::ALL.iter().map(|c| c.label()).collect();
    assert_eq!(labels.len(), ReasonCode::ALL.len());
    assert!(labels
        .iter()
        .all(|l| l.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')));
    assert_eq!(Decision::Allow.label(), "allow");
    assert_eq!(Decision::Deny(r.clone()).label(), "missing_role");
    assert!(!r.message().contains("10.0.0.0/8"));
    assert_eq!(Action::Pull.label(), "pull");
    assert_eq!(Action::Push.label(), "push");
}

#[test]
fn untrusted_identity_message_names_the_switch() {
    let mut reg = registry(NetworkAccess::Selected);
    reg.trusted_identities = false;
    let r = Case::new(&reg, OUT_ZONE, id(PULL)).reason();
    assert_eq!(
        r.message(),
        "identity farm connects from 192.0.2.7 (no zone), which is not in a zone allowed for \
         registry icr; identities must come from its zones too \
         (registry.icr.trusted_identities = false)"
    );
    assert_eq!(r.status(), 403);
}

/// The gateway's path end to end: address, credentials, facts, decision.
#[test]
fn policy_from_config() {
    use sha2::{Digest as _, Sha256};
    let hash: [u8; 32] = Sha256::digest(b"pw").into();
    // `Policy::new(&Config)` passes exactly these three parts; building a whole `Config` here
    // would tie this test to every unrelated config field.
    let policy = Policy::from_parts(
        &[Zone {
            name: "vpc".into(),
            nets: vec!["10.0.0.0/8".parse().unwrap()],
        }],
        &[Identity {
            name: "ci".into(),
            auth: IdentityAuth::Password {
                username: "ci".into(),
                password: PasswordCheck::Sha256(hash),
            },
            roles: PULL_PUSH,
        }],
        &["127.0.0.1/32".parse().unwrap()],
    );
    assert_eq!(policy.zones().prefix_count(), 1);
    assert!(!policy.trusted_proxies().is_empty());
    assert!(policy.authenticator().kinds().password);

    let mut reg = registry(NetworkAccess::Selected);
    reg.push = true;
    let repository = repo("team-a/app");

    // Behind the trusted proxy, a client inside the zone pulls anonymously.
    let source = policy.client_addr(ip("127.0.0.1"), &["10.4.4.4"], &[]);
    assert_eq!(source, ip("10.4.4.4"));
    let anon = policy.authenticate(None, &[]);
    let facts = policy.facts(&reg, source, &anon, Some(&repository), Action::Pull);
    assert_eq!(facts.zones.best(), Some("vpc"));
    assert!(decide(&facts).is_allow());
    // ... but must log in to push.
    let facts = policy.facts(&reg, source, &anon, Some(&repository), Action::Push);
    assert_eq!(decide(&facts).label(), "push_needs_identity");

    // A spoofed header from an untrusted peer does not put it in the zone.
    let spoofed = policy.client_addr(ip("192.0.2.7"), &["10.4.4.4"], &[]);
    assert_eq!(spoofed, ip("192.0.2.7"));
    let facts = policy.facts(&reg, spoofed, &anon, Some(&repository), Action::Pull);
    assert_eq!(decide(&facts).label(), "source_not_in_zone");

    // With the password it gets in from anywhere (trusted identities), and may push.
    let header = format!("Basic {}", STANDARD.encode("ci:pw"));
    let ci = policy.authenticate(Some(&header), &[]);
    assert_eq!(ci.identity(), Some("ci"));
    for action in [Action::Pull, Action::Push] {
        let facts = policy.facts(&reg, spoofed, &ci, Some(&repository), action);
        assert!(decide(&facts).is_allow(), "{action:?}");
    }
    // A wrong password is a 401, whatever the source.
    let header = format!("Basic {}", STANDARD.encode("ci:nope"));
    let bad = policy.authenticate(Some(&header), &[]);
    let facts = policy.facts(&reg, source, &bad, Some(&repository), Action::Pull);
    let Decision::Deny(reason) = decide(&facts) else {
        panic!("wrong password allowed");
    };
    assert_eq!((reason.label(), reason.status()), ("bad_credentials", 401));
    assert!(!format!("{facts:?}").contains("nope"));
}

#[test]
fn deletes_need_the_registry_switch_then_the_delete_role() {
    let mut reg = registry(NetworkAccess::Enabled);
    fn delete(c: Case<'_>) -> Case<'_> {
        Case {
            action: Action::Delete,
            ..c
        }
    }
    let cleaner = Roles {
        pull: true,
        delete: true,
        ..Roles::default()
    };
    // Without `delete = true`: UNSUPPORTED (405) naming the key, whoever asks.
    let reason = delete(Case::new(&reg, IN_ZONE, id(cleaner))).reason();
    assert_eq!(reason.code(), ReasonCode::DeleteDisabled);
    assert_eq!(
        (reason.status(), reason.error_code()),
        (405, crate::oci::ErrorCode::Unsupported)
    );
    assert!(
        reason.message().contains("registry.icr.delete"),
        "{}",
        reason.message()
    );
    reg.delete = true;
    let cases = [
        (id(cleaner), "allow"),
        (id(PULL_PUSH), "missing_role"),
        (Authn::Anonymous, "delete_needs_identity+401"),
    ];
    for (authn, want) in cases {
        assert_eq!(
            delete(Case::new(&reg, IN_ZONE, authn)).outcome(),
            want,
            "{want}"
        );
    }
    // No identity configured: the switch and the network rule are the whole gate.
    let open = delete(Case::new(&reg, OUT_ZONE, Authn::Anonymous).kinds(IdentityKinds::default()));
    assert_eq!(open.outcome(), "allow");
    // The push switch does not open deletes, nor the delete switch pushes.
    assert_eq!(
        Case::new(&reg, IN_ZONE, id(cleaner)).push().outcome(),
        "push_disabled"
    );
}
