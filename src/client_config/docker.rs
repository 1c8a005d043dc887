//! docker's `daemon.json` keys: `registry-mirrors` and, for a plain-HTTP gateway,
//! `insecure-registries`.
//!
//! dockerd uses `registry-mirrors` for docker.io images only, and a mirror URL cannot carry a
//! path. Its requests reach pullgate as bare `/v2/<name>/...` (no `ns`, no prefix), which only
//! the `default` registry serves; that registry must be Docker Hub, or docker.io names would be
//! answered from another registry.

use std::path::PathBuf;

use super::{is_docker_hub, Context, Error, File, Output};

pub(super) fn generate(ctx: &Context<'_>) -> Result<Output, Error> {
    let endpoint = ctx.endpoint;
    if !endpoint.path.is_empty() {
        return Err(Error::Unsupported(format!(
            "docker's registry-mirrors cannot have a path ({}); publish the gateway at a URL \
             without one",
            endpoint.url()
        )));
    }
    let Some(hub) = ctx.registries.iter().find(|r| r.default) else {
        return Err(Error::Unsupported(
            "docker sends its mirror bare /v2/<name>/... requests, which only the registry with \
             `default = true` serves, and this config has none; make the Docker Hub registry \
             the default"
                .into(),
        ));
    };
    if !is_docker_hub(hub) {
        return Err(Error::Unsupported(format!(
            "docker uses registry-mirrors for docker.io only, but the default registry {:?} \
             mirrors {} (neither Docker Hub nor ns = [\"docker.io\"]); docker.io names would be \
             served from it",
            hub.name, hub.upstream.origin
        )));
    }
    let mut daemon = serde_json::Map::new();
    daemon.insert("registry-mirrors".into(), vec![endpoint.url()].into());
    if !endpoint.https {
        daemon.insert(
            "insecure-registries".into(),
            vec![endpoint.authority.clone()].into(),
        );
    }
    let mut contents =
        serde_json::to_string_pretty(&serde_json::Value::Object(daemon)).unwrap_or_default();
    contents.push('\n');
    let mut notes = vec![format!(
        "docker uses the mirror for docker.io images only (registry {:?}); images from other \
         registries are pulled from those registries directly. Merge these keys into \
         /etc/docker/daemon.json and restart dockerd",
        hub.name
    )];
    if endpoint.https {
        if let Some(ca) = ctx.ca {
            notes.push(format!(
                "docker reads the gateway's CA from /etc/docker/certs.d/{}/ca.crt: copy {ca} there",
                endpoint.authority
            ));
        }
    }
    Ok(Output {
        files: vec![File {
            path: PathBuf::from("daemon.json"),
            contents,
        }],
        notes,
    })
}
