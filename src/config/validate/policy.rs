//! Who a caller is: the `[zones]` and `server.trusted_proxies` CIDR lists (where a request
//! comes from) and the `[[identity]]` entries (who presents an mTLS subject or a password), with
//! their roles. Registries refer to zones and identities by name; `registry.rs` checks those
//! references against what is defined here.

use std::collections::HashMap;

use ipnet::IpNet;

use super::values::{is_zone_name, parse_net, parse_sha256_hex};
use super::{entry_key, Ctx};
use crate::config::file::IdentityFile;
use crate::config::model::*;

// ---------------------------------------------------------------------------------------------
// [zones]

pub(super) fn check_zones(
    ctx: &mut Ctx<'_>,
    zones: &std::collections::BTreeMap<String, Vec<String>>,
) -> Vec<Zone> {
    let mut out = Vec::new();
    for (name, nets) in zones {
        let key = format!("zones.{name}");
        if !is_zone_name(name) {
            ctx.err(&key, "zone names use only a-z, 0-9, '_' and '-'");
        }
        if nets.is_empty() {
            ctx.err(&key, "a zone needs at least one CIDR");
        }
        let nets = check_nets(ctx, &key, nets);
        out.push(Zone {
            name: name.clone(),
            nets,
        });
    }
    out
}

/// CIDR list; a bare IP address stands for itself (/32 or /128).
pub(super) fn check_nets(ctx: &mut Ctx<'_>, key: &str, raw: &[String]) -> Vec<IpNet> {
    raw.iter()
        .enumerate()
        .filter_map(|(i, s)| ctx.ok(&format!("{key}[{i}]"), parse_net(s)))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// [[identity]]

pub(super) fn check_identities(ctx: &mut Ctx<'_>, files: &[IdentityFile]) -> Vec<Identity> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut out = Vec::new();
    for (i, file) in files.iter().enumerate() {
        let key = entry_key(ctx, "identity", i, file.name.as_deref(), |_| true);
        if let Some(name) = file.name.as_deref() {
            if let Some(first) = seen.insert(name, i) {
                ctx.err(
                    format!("identity[{i}].name"),
                    format!("duplicate identity name {name:?} (also identity[{first}])"),
                );
            }
        }
        if let Some(identity) = check_identity(ctx, &key, file) {
            out.push(identity);
        }
    }
    out
}

fn check_identity(ctx: &mut Ctx<'_>, key: &str, file: &IdentityFile) -> Option<Identity> {
    let roles = check_roles(ctx, &format!("{key}.roles"), file.roles.as_deref());
    let auth = match (&file.mtls_subject, &file.username) {
        (Some(subject), None) => check_mtls_identity(ctx, key, subject, file),
        (None, Some(username)) => check_password_identity(ctx, key, username, file),
        (Some(_), Some(_)) => {
            ctx.err(key, "set either mtls_subject or username, not both");
            None
        }
        (None, None) => {
            ctx.err(key, "set mtls_subject or username (with a password)");
            None
        }
    };
    Some(Identity {
        name: file.name.clone()?,
        auth: auth?,
        roles,
    })
}

fn check_mtls_identity(
    ctx: &mut Ctx<'_>,
    key: &str,
    subject: &str,
    file: &IdentityFile,
) -> Option<IdentityAuth> {
    for (name, set) in [
        ("password_sha256", file.password_sha256.is_some()),
        ("password_file", file.password_file.is_some()),
    ] {
        if set {
            ctx.err(
                format!("{key}.{name}"),
                "only for username identities, not mtls_subject",
            );
        }
    }
    if subject.is_empty() {
        ctx.err(format!("{key}.mtls_subject"), "must not be empty");
        return None;
    }
    Some(IdentityAuth::Mtls {
        subject: subject.to_owned(),
    })
}

fn check_password_identity(
    ctx: &mut Ctx<'_>,
    key: &str,
    username: &str,
    file: &IdentityFile,
) -> Option<IdentityAuth> {
    if username.is_empty() {
        ctx.err(format!("{key}.username"), "must not be empty");
    }
    let password = match (&file.password_sha256, &file.password_file) {
        (Some(hash), None) => {
            let parsed = parse_sha256_hex(hash);
            ctx.ok(&format!("{key}.password_sha256"), parsed)
                .map(PasswordCheck::Sha256)
        }
        (None, Some(path)) => ctx
            .existing_file(&format!("{key}.password_file"), path)
            .map(PasswordCheck::File),
        _ => {
            ctx.err(
                key,
                "a username identity needs exactly one of password_sha256 or password_file",
            );
            None
        }
    };
    if username.is_empty() {
        return None;
    }
    Some(IdentityAuth::Password {
        username: username.to_owned(),
        password: password?,
    })
}

fn check_roles(ctx: &mut Ctx<'_>, key: &str, raw: Option<&[String]>) -> Roles {
    let Some(raw) = raw else {
        return Roles {
            pull: true,
            ..Roles::default()
        };
    };
    if raw.is_empty() {
        ctx.err(
            key,
            "must name at least one role: \"pull\", \"push\", \"delete\"",
        );
    }
    let mut roles = Roles::default();
    for (i, role) in raw.iter().enumerate() {
        match role.as_str() {
            "pull" => roles.pull = true,
            "push" => roles.push = true,
            "delete" => roles.delete = true,
            other => ctx.err(
                format!("{key}[{i}]"),
                format!("unknown role {other:?}: expected \"pull\", \"push\" or \"delete\""),
            ),
        }
    }
    roles
}
