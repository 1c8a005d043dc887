//! A registry's upstream `credentials` (and each scoped credential's): exactly one kind of
//! basic, `docker_config` or `credential_helper`. `password_env` is read at load, so
//! `pullgate check` finds a missing variable; secrets never reach an error message.

use super::Ctx;
use crate::config::file::CredentialsFile;
use crate::config::model::*;
use crate::secret::Secret;

/// Exactly one credential kind: basic (`username` + one password source), `docker_config`
/// or `credential_helper`.
pub(super) fn check_credentials(
    ctx: &mut Ctx<'_>,
    key: &str,
    file: &CredentialsFile,
) -> Option<CredentialSource> {
    let basic = file.username.is_some()
        || file.password.is_some()
        || file.password_env.is_some()
        || file.password_file.is_some();
    let kinds = [
        basic,
        file.docker_config.is_some(),
        file.credential_helper.is_some(),
    ];
    match kinds.iter().filter(|k| **k).count() {
        0 => {
            ctx.err(
                key,
                "empty: set username + a password, docker_config or credential_helper",
            );
            return None;
        }
        1 => {}
        _ => {
            ctx.err(
                key,
                "use one kind: username + password*, docker_config or credential_helper",
            );
            return None;
        }
    }
    if let Some(raw) = file.docker_config.as_deref() {
        if raw.is_empty() {
            ctx.err(format!("{key}.docker_config"), "must not be empty");
            return None;
        }
        return Some(CredentialSource::DockerConfig {
            path: ctx.path(raw),
        });
    }
    if let Some(name) = file.credential_helper.as_deref() {
        let checked = check_helper_name(name);
        return ctx
            .ok(&format!("{key}.credential_helper"), checked)
            .map(|name| CredentialSource::Helper { name });
    }
    check_basic_credentials(ctx, key, file)
}

fn check_basic_credentials(
    ctx: &mut Ctx<'_>,
    key: &str,
    file: &CredentialsFile,
) -> Option<CredentialSource> {
    let username = match file.username.as_deref() {
        Some("") => {
            ctx.err(format!("{key}.username"), "must not be empty");
            None
        }
        Some(user) => Some(user.to_owned()),
        None => {
            ctx.err(
                format!("{key}.username"),
                "missing: a password needs a username",
            );
            None
        }
    };
    let sources = [
        file.password.is_some(),
        file.password_env.is_some(),
        file.password_file.is_some(),
    ];
    if sources.iter().filter(|s| **s).count() != 1 {
        ctx.err(
            key,
            "set exactly one of password, password_env or password_file",
        );
        return None;
    }
    let password = check_password_source(ctx, key, file)?;
    Some(CredentialSource::Basic {
        username: username?,
        password,
    })
}

fn check_password_source(
    ctx: &mut Ctx<'_>,
    key: &str,
    file: &CredentialsFile,
) -> Option<PasswordSource> {
    if let Some(password) = file.password.as_deref() {
        ctx.warn(
            format!("{key}.password"),
            "[inline-password] inline password in the config file; prefer password_env or password_file",
        );
        return Some(PasswordSource::Inline(Secret::new(password)));
    }
    if let Some(var) = file.password_env.as_deref() {
        let read = read_env(ctx.inputs.env, var);
        return ctx
            .ok(&format!("{key}.password_env"), read)
            .map(|value| PasswordSource::Env {
                var: var.to_owned(),
                value,
            });
    }
    let raw = file.password_file.as_deref()?;
    ctx.existing_file(&format!("{key}.password_file"), raw)
        .map(PasswordSource::File)
}

/// `password_env` is read once, at load: a missing variable is caught by `pullgate check`
/// rather than by the first pull.
fn read_env(env: &dyn Fn(&str) -> Option<String>, var: &str) -> Result<Secret, String> {
    if var.is_empty() {
        return Err("must name an environment variable".to_owned());
    }
    match env(var) {
        None => Err(format!("environment variable {var} is not set")),
        Some(value) if value.is_empty() => Err(format!("environment variable {var} is empty")),
        Some(value) => Ok(Secret::new(value)),
    }
}

fn check_helper_name(name: &str) -> Result<String, String> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "invalid helper name {name:?}: use a-z, 0-9, '.', '_' and '-' (docker-credential-<name>)"
        ))
    }
}
