//! skopeo as a real client pulling THROUGH a gateway (or directly from the upstream).
//! Every run is isolated: proxies point at a closed port, no ambient auth file is read, the
//! signature policy is not consulted.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{run_cmd, sha256_hex};

/// How the client treats the server's certificate.
#[derive(Clone, Debug)]
pub enum ClientTls {
    /// `--src-tls-verify=false`: plain HTTP, or HTTPS without verification.
    Plain,
    /// `--src-cert-dir DIR` (a dir holding `ca.crt`, see `Pki::cert_dir_for_clients`).
    Ca(PathBuf),
}

/// The result of a pull: a layout whose every blob was verified against its name.
#[derive(Debug)]
pub struct PulledImage {
    dir: tempfile::TempDir,
    /// Digest of the top-level manifest written (the index with `all`, else one manifest).
    pub manifest_digest: String,
    /// Every verified blob/manifest file: (digest, size).
    pub blobs: Vec<(String, u64)>,
}

impl PulledImage {
    pub fn layout_dir(&self) -> &Path {
        self.dir.path()
    }
    pub fn has_blob(&self, digest: &str) -> bool {
        self.blobs.iter().any(|(d, _)| d == digest)
    }
}

/// skopeo with no ambient credentials (auth file, docker config) and no signature policy.
fn base_cmd(aux_dir: &Path) -> Command {
    let mut cmd = Command::new("skopeo");
    cmd.env("REGISTRY_AUTH_FILE", aux_dir.join("auth.json"))
        .env("XDG_RUNTIME_DIR", aux_dir)
        .env("DOCKER_CONFIG", aux_dir)
        .arg("--insecure-policy");
    cmd
}

fn src_args(cmd: &mut Command, tls: &ClientTls, creds: Option<(&str, &str)>, prefix: &str) {
    match tls {
        ClientTls::Plain => {
            cmd.arg(format!("--{prefix}tls-verify=false"));
        }
        ClientTls::Ca(dir) => {
            cmd.arg(format!("--{prefix}cert-dir")).arg(dir);
        }
    }
    match creds {
        Some((u, p)) => {
            cmd.arg(format!("--{prefix}creds")).arg(format!("{u}:{p}"));
        }
        None => {
            cmd.arg(format!("--{prefix}no-creds"));
        }
    }
}

/// `skopeo copy [--all] docker://SRC oci:TMP:pulled`; returns the top-level manifest digest
/// (from the result's index.json) after checking every blob file hashes to its name.
/// Note: with `all` the source digest is preserved; without it skopeo picks the host's
/// platform from an index and writes only that manifest.
pub fn skopeo_copy_to_oci(
    src_docker_ref: &str,
    tls: ClientTls,
    creds: Option<(&str, &str)>,
    all: bool,
) -> Result<PulledImage, String> {
    let dir = tempfile::Builder::new()
        .prefix("pulled-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let aux = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut cmd = base_cmd(aux.path());
    cmd.arg("copy");
    if all {
        cmd.arg("--all");
    }
    src_args(&mut cmd, &tls, creds, "src-");
    cmd.arg(format!("docker://{src_docker_ref}"))
        .arg(format!("oci:{}:pulled", dir.path().display()));
    run_cmd(&mut cmd)?;
    let index: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("index.json")).map_err(|e| e.to_string())?,
    )
    .map_err(|e| format!("index.json: {e}"))?;
    let manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .ok_or("index.json without manifests")?
        .to_string();
    let blobs = verify_files(&dir.path().join("blobs/sha256"), |name| {
        Some(name.to_string())
    })?;
    Ok(PulledImage {
        dir,
        manifest_digest,
        blobs,
    })
}

/// `skopeo copy [--all] docker://SRC dir:TMP`: keeps manifests byte for byte (Docker schema 2
/// and manifest lists included, which an `oci:` destination would convert); returns the
/// digest of `manifest.json`.
pub fn skopeo_copy_to_dir(
    src_docker_ref: &str,
    tls: ClientTls,
    creds: Option<(&str, &str)>,
    all: bool,
) -> Result<PulledImage, String> {
    let dir = tempfile::Builder::new()
        .prefix("pulled-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let aux = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut cmd = base_cmd(aux.path());
    cmd.arg("copy");
    if all {
        cmd.arg("--all");
    }
    src_args(&mut cmd, &tls, creds, "src-");
    let dest = dir.path().join("img");
    cmd.arg(format!("docker://{src_docker_ref}"))
        .arg(format!("dir:{}", dest.display()));
    run_cmd(&mut cmd)?;
    let manifest = std::fs::read(dest.join("manifest.json")).map_err(|e| e.to_string())?;
    let blobs = verify_files(&dest, |name| {
        let hex = name.strip_suffix(".manifest.json").unwrap_or(name);
        (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then(|| hex.to_string())
    })?;
    Ok(PulledImage {
        dir,
        manifest_digest: format!("sha256:{}", sha256_hex(&manifest)),
        blobs,
    })
}

/// Hashes every file of `dir` whose name maps to an expected hex digest; Err on a mismatch.
fn verify_files(
    dir: &Path,
    expected_hex: impl Fn(&str) -> Option<String>,
) -> Result<Vec<(String, u64)>, String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let entry = entry.map_err(|e| e.to_string())?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(want) = expected_hex(&name) else {
            continue;
        };
        let data = std::fs::read(entry.path()).map_err(|e| e.to_string())?;
        let got = sha256_hex(&data);
        if got != want {
            return Err(format!("blob {name} in {} hashes to {got}", dir.display()));
        }
        out.push((format!("sha256:{want}"), data.len() as u64));
    }
    out.sort();
    Ok(out)
}

/// `skopeo inspect --raw docker://REF`: the manifest bytes as served.
pub fn skopeo_inspect_raw(
    docker_ref: &str,
    tls: ClientTls,
    creds: Option<(&str, &str)>,
) -> Result<Vec<u8>, String> {
    let aux = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut cmd = base_cmd(aux.path());
    cmd.args(["inspect", "--raw"]);
    src_args(&mut cmd, &tls, creds, "");
    cmd.arg(format!("docker://{docker_ref}"));
    Ok(run_cmd(&mut cmd)?.stdout)
}

/// `skopeo copy [--all] SRC docker://DEST` with no credentials on either side (pullgate injects
/// them); returns the digest of the pushed top-level manifest.
pub fn skopeo_copy_to_registry(
    src_ref: &str,
    dest_docker_ref: &str,
    tls: ClientTls,
    all: bool,
) -> Result<String, String> {
    let aux = tempfile::tempdir().map_err(|e| e.to_string())?;
    let digestfile = aux.path().join("digest");
    let mut cmd = base_cmd(aux.path());
    cmd.arg("copy");
    if all {
        cmd.arg("--all");
    }
    if src_ref.starts_with("docker://") {
        src_args(&mut cmd, &tls, None, "src-");
    }
    src_args(&mut cmd, &tls, None, "dest-");
    cmd.arg("--digestfile")
        .arg(&digestfile)
        .arg(src_ref)
        .arg(format!("docker://{dest_docker_ref}"));
    run_cmd(&mut cmd)?;
    Ok(std::fs::read_to_string(&digestfile)
        .map_err(|e| e.to_string())?
        .trim()
        .to_string())
}
