//! containerd `hosts.toml` files (the `config_path` / `ctr --hosts-dir` layout): one directory
//! per registry host name, plus `_default` for every other host.
//!
//! containerd tries each `[host]` in file order, then `server`; a host that refuses the
//! connection, times out dialing or answers 404 makes it go on to the next one. Mirrors get
//! `?ns=<registry host>` on every request, which is how pullgate picks the registry.

use std::fmt::Write;
use std::path::PathBuf;

use super::{client_names, toml_string, Context, Error, File, Output};
use crate::config::model::Registry;

/// How long containerd (1.7 and later) waits for a TCP connection to the mirror before it goes
/// on to `server`. Short, because the mirror is normally on the node or next to it. containerd
/// 1.6 ignores the key and uses its 30 s dialer timeout; a refused connection (the gateway not
/// running) falls back at once on every version.
pub const DIAL_TIMEOUT: &str = "3s";

pub(super) fn generate(ctx: &Context<'_>) -> Result<Output, Error> {
    let mut out = Output::default();
    let mut dirs: Vec<String> = Vec::new();
    for registry in &ctx.registries {
        if registry.ns.is_empty() {
            out.notes.push(format!(
                "registry {:?} has no `ns` values, so containerd cannot reach it through the \
                 mirror (containerd sends ?ns=<registry host> on every request and an unknown \
                 ns is refused); add ns = [{}] to it to include it",
                registry.name,
                toml_string(&client_names(registry)[0])
            ));
            continue;
        }
        for ns in &registry.ns {
            if dirs.contains(ns) {
                continue;
            }
            dirs.push(ns.clone());
            out.files.push(File {
                path: PathBuf::from(ns).join("hosts.toml"),
                contents: registry_file(ctx, registry, ns),
            });
        }
    }
    out.files.push(File {
        path: PathBuf::from("_default").join("hosts.toml"),
        contents: default_file(ctx),
    });
    if !ctx.endpoint.path.is_empty() {
        out.notes.push(format!(
            "the endpoint has a path ({}): hosts.toml uses override_path = true, so the proxy \
             in front of pullgate must strip {} before passing /v2/... on",
            ctx.endpoint.path, ctx.endpoint.path
        ));
    }
    Ok(out)
}

/// `<ns>/hosts.toml`: the gateway first, then the registry's own upstream.
fn registry_file(ctx: &Context<'_>, registry: &Registry, ns: &str) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# {ns}: written by `pullgate client-config containerd` for registry {:?}.",
        registry.name
    );
    let _ = writeln!(
        t,
        "# containerd asks the gateway first (adding ?ns={ns}, which routes to that registry),"
    );
    let _ = writeln!(
        t,
        "# then the upstream itself when the gateway cannot be reached or does not have it."
    );
    let _ = writeln!(t, "server = {}", toml_string(&registry.upstream.origin));
    if let Some(ca) = &registry.ca {
        // The gateway's own extra trust for this upstream; the fallback needs the same.
        let _ = writeln!(t, "ca = {}", toml_string(&ca.display().to_string()));
    }
    t.push('\n');
    host_table(ctx, &mut t);
    t
}

/// `_default/hosts.toml`: the gateway for any other registry host, then that host itself.
fn default_file(ctx: &Context<'_>) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# Every registry host without its own directory: written by `pullgate client-config containerd`."
    );
    let _ = writeln!(
        t,
        "# The gateway serves the host when it is one of its ns values; otherwise it answers"
    );
    let _ = writeln!(
        t,
        "# NAME_UNKNOWN and containerd goes on to the host itself (no `server` here means that)."
    );
    t.push('\n');
    host_table(ctx, &mut t);
    t
}

/// The `[host."<endpoint>"]` table for the gateway.
fn host_table(ctx: &Context<'_>, t: &mut String) {
    let mut url = ctx.endpoint.url();
    if !ctx.endpoint.path.is_empty() {
        // With override_path containerd uses the path as the API root instead of adding /v2.
        url.push_str("/v2");
    }
    let _ = writeln!(t, "[host.{}]", toml_string(&url));
    let _ = writeln!(t, "  capabilities = [\"pull\", \"resolve\"]");
    let _ = writeln!(
        t,
        "  dial_timeout = {}   # containerd >= 1.7; a dead gateway falls back to the next host fast",
        toml_string(DIAL_TIMEOUT)
    );
    if let Some(ca) = ctx.ca {
        let _ = writeln!(t, "  ca = {}", toml_string(ca));
    }
    if !ctx.endpoint.path.is_empty() {
        let _ = writeln!(t, "  override_path = true");
    }
}
