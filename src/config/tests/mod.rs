//! Unit tests for loading and validation: each error class names its key.
//!
//! This file holds the shared fixtures (a minimal registry, loaders with a fixed environment,
//! error assertions); the tests are grouped like `validate/`: the whole file and its errors
//! (`loading`), then one module per section and one for the value parsers.

mod audit;
mod cache;
mod cluster;
mod loading;
mod policy;
mod registry;
mod server;
mod signatures;
mod values;

use std::path::Path;

use super::*;

/// A registry that needs nothing from the environment.
const HUB: &str = "[[registry]]\nname = \"hub\"\nupstream = \"https://registry-1.docker.io\"\n";

/// Loads `text` with a fixed environment, never the process's.
fn load_env(text: &str, base: &Path, env: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
    let lookup = |var: &str| {
        env.iter()
            .find(|(k, _)| *k == var)
            .map(|(_, v)| (*v).to_owned())
    };
    load_text(
        text,
        "test.toml",
        inputs(base, DEFAULT_CACHE_DIR.into(), &lookup),
    )
}

fn ok(text: &str) -> Config {
    match load_env(text, Path::new("/etc/pullgate"), &[]) {
        Ok(config) => config,
        Err(errors) => panic!("expected a valid config, got:\n{errors}"),
    }
}

fn errors(text: &str) -> ConfigErrors {
    match load_env(text, Path::new("/etc/pullgate"), &[]) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(errors) => errors,
    }
}

/// Asserts that some error has exactly `key` and a problem containing `fragment`.
#[track_caller]
fn assert_error(errs: &ConfigErrors, key: &str, fragment: &str) {
    assert!(
        errs.0
            .iter()
            .any(|e| e.key == key && e.problem.contains(fragment)),
        "no error {key}: ...{fragment}... in:\n{errs}"
    );
}

#[track_caller]
fn assert_err(text: &str, key: &str, fragment: &str) {
    assert_error(&errors(text), key, fragment);
}

/// A temp dir with the named (empty) files in it.
fn dir_with(files: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for name in files {
        std::fs::write(dir.path().join(name), "x").expect("write fixture");
    }
    dir
}
