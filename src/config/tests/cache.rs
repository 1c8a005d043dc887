//! `[cache]` tests: the default and absolute cache dir, and the manifest size bounds. Size and
//! duration syntax is in `values.rs`.

use std::path::PathBuf;

use super::*;

#[test]
fn load_str_defaults_cache_dir_and_absolute_paths_stay() {
    let config = load_str(HUB, Path::new("/x")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.cache.dir, PathBuf::from("/var/cache/pullgate"));
    let config = ok(&format!("[cache]\ndir = \"/srv/c\"\n{HUB}"));
    assert_eq!(config.cache.dir, PathBuf::from("/srv/c"));
}

#[test]
fn manifest_size_bounds() {
    assert_err(
        &format!("[cache]\nmax_manifest_size = \"512B\"\n{HUB}"),
        "cache.max_manifest_size",
        "between 1KiB and 64MiB",
    );
    assert_err(
        &format!("[cache]\nmax_manifest_size = \"65MiB\"\n{HUB}"),
        "cache.max_manifest_size",
        "between",
    );
    ok(&format!("[cache]\nmax_manifest_size = \"64MiB\"\n{HUB}"));
}
