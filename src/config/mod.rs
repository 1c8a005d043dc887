//! Configuration: the TOML file, its validation, and the embedded default.
//!
//! Owns the one way a config comes into pullgate: [`load`] (a file), [`load_str`] (text) or
//! [`embedded_default`]. The serde schema (`file.rs`) never leaves this module; the rest of
//! pullgate sees only the validated types of [`model`], so no other module re-checks a value.
//! Validation reports *every* problem, each naming its key (`registry.hub.upstream: ...`), and
//! never panics on bad input. Keys accepted but not acted on yet produce [`Warning`]s.

pub mod live;
pub mod model;

mod error;
mod file;
mod validate;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

pub use error::{ConfigError, ConfigErrors};
pub use model::*;

use file::FileConfig;
use validate::Inputs;

/// The embedded default config, shown by `pullgate check` and the docs.
pub const DEFAULT_TOML: &str = include_str!("default.toml");

/// Cache directory for files that leave `cache.dir` unset.
const DEFAULT_CACHE_DIR: &str = "/var/cache/pullgate";

/// Cache directory of the embedded default when the user has no cache directory.
const FALLBACK_USER_CACHE_DIR: &str = "/var/tmp/pullgate-cache";

/// Reads, parses and validates the config file at `path`. Relative paths inside it are
/// resolved against the file's directory.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    load_with_text(path).map(|(config, _)| config)
}

/// [`load`], also returning the text that was validated (a reload hashes exactly what it
/// applied, even when the file changes again meanwhile).
pub fn load_with_text(path: &Path) -> Result<(Config, String), ConfigErrors> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|err| {
        ConfigError::new(origin.clone(), format!("cannot read config file: {err}"))
    })?;
    let base_dir = path.parent().unwrap_or(Path::new(""));
    let config = load_text(
        &text,
        &origin,
        inputs(base_dir, DEFAULT_CACHE_DIR.into(), &process_env),
    )?;
    Ok((config, text))
}

/// Parses and validates config text; relative paths are resolved against `base_dir`.
pub fn load_str(text: &str, base_dir: &Path) -> Result<Config, ConfigErrors> {
    load_text(
        text,
        "config",
        inputs(base_dir, DEFAULT_CACHE_DIR.into(), &process_env),
    )
}

/// The embedded default: a loopback mirror of the big public registries, caching in the
/// user's cache directory.
pub fn embedded_default() -> Config {
    let cache_dir = dirs::cache_dir()
        .map(|dir| dir.join("pullgate"))
        .unwrap_or_else(|| PathBuf::from(FALLBACK_USER_CACHE_DIR));
    match load_text(
        DEFAULT_TOML,
        "default.toml",
        inputs(Path::new("/"), cache_dir, &process_env),
    ) {
        Ok(config) => config,
        // Unreachable in practice: `tests/loading.rs` proves default.toml validates.
        Err(errors) => panic!("the embedded default.toml is invalid:\n{errors}"),
    }
}

fn process_env(var: &str) -> Option<String> {
    std::env::var(var).ok()
}

fn inputs<'a>(
    base_dir: &'a Path,
    default_cache_dir: PathBuf,
    env: &'a dyn Fn(&str) -> Option<String>,
) -> Inputs<'a> {
    Inputs {
        base_dir,
        default_cache_dir,
        env,
    }
}

/// Parse then validate. `origin` names the text in parse errors (a file path or "config").
fn load_text(text: &str, origin: &str, inputs: Inputs<'_>) -> Result<Config, ConfigErrors> {
    let file: FileConfig = toml::from_str(text).map_err(|err| parse_error(text, origin, &err))?;
    validate::validate(file, &inputs)
}

/// A TOML syntax, type or unknown-key error, as one line naming the key, file, line and column.
fn parse_error(text: &str, origin: &str, err: &toml::de::Error) -> ConfigError {
    let message = err.message().trim_end().replace('\n', "; ");
    let Some(span) = err.span() else {
        return ConfigError::new(origin, message);
    };
    let (line, column) = line_col(text, span.start);
    let key = key_at(text, span.start).unwrap_or_else(|| origin.to_owned());
    ConfigError::new(
        key,
        format!("{message} ({origin}, line {line}, column {column})"),
    )
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Best-effort dotted key path of the key written at (or before) `offset`: the enclosing
/// `[table]`/`[[array]]` header (arrays get `[index]`) plus the key on that line. Only used to
/// make parse errors easier to place; `None` when the position is not recognisable.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let line_start = text.get(..offset)?.rfind('\n').map_or(0, |i| i + 1);
    let mut table = String::new();
    let mut counts: std::collections::HashMap<String, usize> = Default::default();
    for raw_line in text.get(..line_start)?.lines() {
        let line = raw_line.trim();
        if let Some(name) = line.strip_prefix("[[").and_then(|l| l.split("]]").next()) {
            let name = name.trim().to_owned();
            let n = counts.entry(name.clone()).or_insert(0);
            table = format!("{name}[{n}]");
            *n += 1;
        } else if let Some(name) = line.strip_prefix('[').and_then(|l| l.split(']').next()) {
            table = name.trim().to_owned();
        }
    }
    let line = text.get(line_start..)?.lines().next().unwrap_or("");
    let trimmed = line.trim_start();
    if trimmed.starts_with('[') {
        let header = trimmed.trim_start_matches('[').split(']').next()?.trim();
        return Some(header.to_owned());
    }
    let first_key = trimmed.split('=').next()?.trim();
    // Inside an inline table (`credentials = { bogus = 1 }`): add the inner key.
    let column = offset - line_start;
    let inner = line
        .get(column..)
        .and_then(|rest| rest.split_once('='))
        .map(|(k, _)| k.trim())
        .filter(|k| !k.is_empty() && !k.contains([',', '{', '"']) && *k != first_key);
    let mut path = if table.is_empty() {
        first_key.to_owned()
    } else {
        format!("{table}.{first_key}")
    };
    if let Some(inner) = inner {
        path = format!("{path}.{inner}");
    }
    (!first_key.is_empty()).then_some(path)
}
