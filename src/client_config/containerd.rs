//! containerd `hosts.toml` files (the `config_path` / `ctr --hosts-dir` layout): one directory
//! per `ns` value with the gateway as mirror and the upstream as `server`, plus `_default` for
//! every other host; for registries without `ns`, one directory per private host name.
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
    let mut add = |out: &mut Output, dir: String, contents: String| {
        if !dirs.contains(&dir) {
            out.files.push(File {
                path: PathBuf::from(&dir).join("hosts.toml"),
                contents,
            });
            dirs.push(dir);
        }
    };
    for registry in &ctx.registries {
        if registry.ns.is_empty() && registry.hosts.is_empty() {
            out.notes.push(format!(
                "registry {:?} has neither `ns` values nor `hosts`, so containerd cannot reach \
                 it; add ns = [{}] to it",
                registry.name,
                toml_string(&client_names(registry)[0])
            ));
            continue;
        }
        if registry.ns.is_empty() {
            // No ns: reachable only by its own names (Host routing), which clients pull
            // directly (`private.icr.io/team/app`); containerd then sends no ns.
            let port = ctx.endpoint.port_suffix();
            for host in &registry.hosts {
                let name = format!("{host}{port}");
                add(
                    &mut out,
                    name.clone(),
                    private_host_file(ctx, registry, &name),
                );
            }
            out.notes.push(format!(
                "registry {:?} has no `ns` values, so containerd cannot use the gateway as its \
                 mirror (containerd sends ?ns=<registry host>, and an unknown ns is refused); \
                 clients pull it by its own name{} ({}), which must resolve to the gateway, or \
                 add ns = [{}] to it",
                registry.name,
                if registry.hosts.len() == 1 { "" } else { "s" },
                registry
                    .hosts
                    .iter()
                    .map(|h| format!("{h}{port}/<repository>"))
                    .collect::<Vec<_>>()
                    .join(", "),
                toml_string(&client_names(registry)[0])
            ));
            continue;
        }
        for ns in &registry.ns {
            add(&mut out, ns.clone(), registry_file(ctx, registry, ns));
        }
    }
    // `_default` routes by ns too: only worth writing when some registry has ns values.
    if ctx.registries.iter().any(|r| !r.ns.is_empty()) {
        add(&mut out, "_default".into(), default_file(ctx));
    }
    if out.files.is_empty() {
        return Err(Error::Unsupported(
            "no registry has `ns` values or `hosts`: containerd has no way to reach any".into(),
        ));
    }
    if !ctx.endpoint.path.is_empty() {
        out.notes.push(format!(
            "the endpoint has a path ({}): hosts.toml uses override_path = true, so the proxy \
             in front of pullgate must strip {} before passing /v2/... on",
            ctx.endpoint.path, ctx.endpoint.path
        ));
    }
    Ok(out)
}

/// `<private host>[:port]/hosts.toml`: the image's own host is the gateway (no mirror, no ns),
/// so the file only says how to talk to it: its scheme, the CA, what it may do.
fn private_host_file(ctx: &Context<'_>, registry: &Registry, name: &str) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# {name}: the gateway's own name for registry {:?} (Host routing), written by",
        registry.name
    );
    let _ = writeln!(
        t,
        "# `pullgate client-config containerd`. Images are pulled as {name}/<repository>."
    );
    let url = format!("{}://{name}", ctx.endpoint.scheme());
    let _ = writeln!(t, "[host.{}]", toml_string(&url));
    let capabilities = if registry.push {
        "[\"pull\", \"resolve\", \"push\"]"
    } else {
        "[\"pull\", \"resolve\"]"
    };
    let _ = writeln!(t, "  capabilities = {capabilities}");
    if let Some(ca) = ctx.ca {
        let _ = writeln!(t, "  ca = {}", toml_string(ca));
    }
    t
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
