//! podman / CRI-O / skopeo `registries.conf` (containers-registries.conf(5), version 2): one
//! `[[registry]]` per registry host name, with the gateway as its `[[registry.mirror]]`.
//!
//! containers/image sends a mirror no `ns`; it puts the mirror location's path in front of the
//! repository (`/v2/<path>/<repository>/...`), so each registry is reached by its `prefix`.
//! The default registry needs no prefix: bare names reach it.

use std::fmt::Write;
use std::path::PathBuf;

use super::{client_names, toml_string, Context, Error, File, Output};

pub(super) fn generate(ctx: &Context<'_>) -> Result<Output, Error> {
    let endpoint = ctx.endpoint;
    if !endpoint.path.is_empty() {
        return Err(Error::Unsupported(format!(
            "podman puts a mirror's path after /v2/, so a gateway published under a path ({}) \
             cannot be a podman mirror",
            endpoint.url()
        )));
    }
    let mut notes = Vec::new();
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# Written by `pullgate client-config podman`: each registry is pulled through the gateway"
    );
    let _ = writeln!(
        t,
        "# first (by path prefix), then from the registry itself. Use as /etc/containers/registries.conf"
    );
    let _ = writeln!(
        t,
        "# or as a drop-in: /etc/containers/registries.conf.d/50-pullgate.conf."
    );
    let mut seen: Vec<String> = Vec::new();
    for registry in &ctx.registries {
        let path = match (&registry.prefix, registry.default) {
            (Some(prefix), _) => format!("/{prefix}"),
            (None, true) => String::new(),
            (None, false) => {
                notes.push(format!(
                    "registry {:?} has neither a `prefix` nor `default = true`, so podman cannot \
                     reach it through the mirror; give it a prefix to include it",
                    registry.name
                ));
                continue;
            }
        };
        for name in client_names(registry) {
            if seen.contains(&name) {
                continue;
            }
            seen.push(name.clone());
            let _ = writeln!(t, "\n# registry {:?}", registry.name);
            let _ = writeln!(t, "[[registry]]");
            let _ = writeln!(t, "prefix = {}", toml_string(&name));
            let _ = writeln!(t, "location = {}", toml_string(&name));
            let _ = writeln!(t, "\n[[registry.mirror]]");
            let location = format!("{}{path}", endpoint.authority);
            let _ = writeln!(t, "location = {}", toml_string(&location));
            if !endpoint.https {
                let _ = writeln!(t, "insecure = true   # the gateway speaks plain HTTP");
            }
        }
    }
    if seen.is_empty() {
        return Err(Error::Unsupported(
            "no registry has a `prefix` or `default = true`, so podman cannot use the gateway as \
             a mirror; registries with `hosts` are pulled by those names directly (the CA in \
             /etc/containers/certs.d/<host>/ca.crt)"
                .into(),
        ));
    }
    if endpoint.https {
        if let Some(ca) = ctx.ca {
            notes.push(format!(
                "podman reads the gateway's CA from /etc/containers/certs.d/{}/ca.crt: copy {ca} there",
                endpoint.authority
            ));
        }
    }
    Ok(Output {
        files: vec![File {
            path: PathBuf::from("registries.conf"),
            contents: t,
        }],
        notes,
    })
}
