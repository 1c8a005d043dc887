//! podman 4.3 as a real client: rootful, vfs storage under a temp `--root`/`--runroot`, the
//! registries.conf given by `CONTAINERS_REGISTRIES_CONF`, auth file and temp files in the same
//! temp dir. podman runs no daemon: each command is one process, run to completion.

use std::path::Path;
use std::process::Command;

use super::run_cmd;

/// A podman image store in a temp dir, configured by one registries.conf.
pub struct Podman {
    dir: tempfile::TempDir,
    registries_conf: std::path::PathBuf,
}

impl Podman {
    pub fn new(registries_conf: &Path) -> Podman {
        let dir = tempfile::Builder::new()
            .prefix("podman-")
            .tempdir()
            .expect("tempdir");
        std::fs::create_dir_all(dir.path().join("tmp")).expect("mkdir");
        // podman refuses a REGISTRY_AUTH_FILE that does not exist.
        std::fs::write(dir.path().join("auth.json"), "{}").expect("auth.json");
        Podman {
            dir,
            registries_conf: registries_conf.to_path_buf(),
        }
    }

    /// `podman --root R --runroot RR --storage-driver vfs` with the registries.conf.
    pub fn podman(&self) -> Command {
        let d = self.dir.path();
        let mut cmd = Command::new("podman");
        cmd.arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("run"))
            .args(["--storage-driver", "vfs", "--events-backend", "file"])
            .arg("--tmpdir")
            .arg(d.join("libpod-tmp"))
            .env("CONTAINERS_REGISTRIES_CONF", &self.registries_conf)
            .env("REGISTRY_AUTH_FILE", d.join("auth.json"))
            .env("TMPDIR", d.join("tmp"));
        cmd
    }

    /// `podman pull -q REF`; returns the image ID podman prints.
    pub fn pull(&self, reference: &str) -> Result<String, String> {
        let out = run_cmd(self.podman().args(["pull", "--quiet", reference]))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `.RepoDigests` of a pulled image (`name@sha256:...`).
    pub fn repo_digests(&self, reference: &str) -> Result<Vec<String>, String> {
        super::repo_digests(self.podman(), reference)
    }
}
