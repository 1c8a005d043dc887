//! File schema -> validated model. Collects every problem, not just the first.
//!
//! Each `check_*` function converts one part of the file and records errors (and warnings)
//! in a [`Ctx`] under the key's readable dotted path; it returns a best-effort value so the
//! later cross-checks still run and report their own problems in the same round.
//!
//! This module is the entry point ([`validate`]) and what several sections share: the [`Ctx`],
//! [`entry_key`] and [`check_duration`]. Each part of the file has its own module, in the
//! order they are checked: `server`, `cache`, `policy` (zones, trusted proxies, identities),
//! `registry` (with its `credentials`); then `audit` warns about valid but risky configs.
//! `values` holds the pure value parsers (addresses, sizes, durations, names, globs) they use.

mod audit;
mod cache;
mod cluster;
mod credentials;
mod policy;
mod registry;
mod server;
pub(super) mod values;
mod warm;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::error::{ConfigError, ConfigErrors};
use super::file::FileConfig;
use super::model::*;
use values::{check_file_exists, parse_duration, resolve_path};

/// Where relative paths start, how environment variables are read, and the cache dir to use
/// when the file leaves it empty. Injected so tests need not touch the process environment.
pub(super) struct Inputs<'a> {
    pub base_dir: &'a Path,
    pub default_cache_dir: PathBuf,
    pub env: &'a dyn Fn(&str) -> Option<String>,
}

/// Accumulates errors and warnings while the file is converted.
struct Ctx<'a> {
    inputs: &'a Inputs<'a>,
    errors: Vec<ConfigError>,
    warnings: Vec<Warning>,
}

impl Ctx<'_> {
    fn err(&mut self, key: impl Into<String>, problem: impl Into<String>) {
        self.errors.push(ConfigError::new(key, problem));
    }

    fn warn(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(Warning {
            key: key.into(),
            message: message.into(),
        });
    }

    /// Records `Err` under `key` and turns the result into an `Option`.
    fn ok<T>(&mut self, key: &str, result: Result<T, String>) -> Option<T> {
        result.map_err(|problem| self.err(key, problem)).ok()
    }

    /// A path from the file: `~/` is the home directory, relative is against the config's dir.
    fn path(&self, raw: &str) -> PathBuf {
        resolve_path(raw, self.inputs.base_dir)
    }

    /// A path that must name an existing file at load time.
    fn existing_file(&mut self, key: &str, raw: &str) -> Option<PathBuf> {
        if raw.is_empty() {
            self.err(key, "must not be empty");
            return None;
        }
        let path = self.path(raw);
        let checked = check_file_exists(&path);
        self.ok(key, checked).map(|()| path)
    }
}

/// Converts the parsed file into the validated [`Config`], or every problem found.
pub(super) fn validate(file: FileConfig, inputs: &Inputs<'_>) -> Result<Config, ConfigErrors> {
    let mut ctx = Ctx {
        inputs,
        errors: Vec::new(),
        warnings: Vec::new(),
    };
    let server = server::check_server(&mut ctx, &file.server);
    let cache = cache::check_cache(&mut ctx, &file.cache);
    let zones = policy::check_zones(&mut ctx, &file.zones);
    let identities = policy::check_identities(&mut ctx, &file.identity);
    let registries = registry::check_registries(&mut ctx, &file.registry, &zones, &identities);
    let warm = warm::check_warm(&mut ctx, &file.warm, &cache);
    let cluster = file
        .cluster
        .as_ref()
        .and_then(|c| cluster::check_cluster(&mut ctx, c));
    if let Some(c) = &cluster {
        cluster::check_advertised_listener(&mut ctx, c, &server);
    }
    if !ctx.errors.is_empty() {
        return Err(ConfigErrors(ctx.errors));
    }
    let mut config = Config {
        server,
        cache,
        zones,
        identities,
        registries: registries.into_iter().map(Arc::new).collect(),
        warm,
        cluster,
        warnings: ctx.warnings,
    };
    let findings = audit::audit_rules(&config);
    config.warnings.extend(findings);
    let later = audit::not_yet_enforced(&config);
    config.warnings.extend(later);
    Ok(config)
}

/// The readable key of the i-th `[[registry]]`/`[[identity]]`: by name when it has a usable
/// one, by index otherwise. A missing or malformed name is reported here.
fn entry_key(
    ctx: &mut Ctx<'_>,
    table: &str,
    i: usize,
    name: Option<&str>,
    valid: fn(&str) -> bool,
) -> String {
    match name {
        Some(name) if !name.is_empty() && valid(name) => format!("{table}.{name}"),
        Some("") | None => {
            ctx.err(format!("{table}[{i}].name"), "missing: a name is required");
            format!("{table}[{i}]")
        }
        Some(name) => {
            ctx.err(
                format!("{table}[{i}].name"),
                format!("invalid name {name:?}: use a-z, 0-9, '_' and '-', starting with a letter or digit"),
            );
            format!("{table}[{i}]")
        }
    }
}

fn check_duration(ctx: &mut Ctx<'_>, key: &str, raw: Option<&str>) -> Option<Duration> {
    ctx.ok(key, parse_duration(raw?))
}
