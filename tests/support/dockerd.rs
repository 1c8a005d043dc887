//! dockerd 20.10 as a real client: a private daemon per test, on its own containerd
//! ([`Containerd`]), with data-root, exec-root, pidfile and API socket in a temp dir; no
//! iptables, no bridge, the vfs storage driver (no mounts left behind). Stopped by PID:
//! SIGTERM, then SIGKILL if it lingers.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{
    isolate_env, read_lossy, run_cmd, tail, wait_until, ChildGuard, Containerd, PrivateHosts,
};

/// A running dockerd; stopped on Drop.
pub struct Dockerd {
    // Field order is drop order: dockerd stops before its containerd and its files go.
    child: ChildGuard,
    _containerd: Containerd,
    dir: tempfile::TempDir,
    /// What dockerd sees as /etc/docker, when [`Dockerd::start`] made it.
    _etc_docker: Option<tempfile::TempDir>,
}

impl Dockerd {
    /// Starts dockerd with `config_file` as its `--config-file` (used as it is) and everything
    /// else as flags, and waits until `docker version` answers on its socket.
    /// dockerd runs in a mount namespace where an empty temp dir stands over /etc/docker, so
    /// what it writes there on its own (its `key.json`) never lands on the machine.
    pub fn start(config_file: &Path) -> Dockerd {
        let etc_docker = tempfile::Builder::new()
            .prefix("etc-docker-")
            .tempdir()
            .expect("tempdir");
        let namespace = PrivateHosts::new(&[]).bind(etc_docker.path(), Path::new("/etc/docker"));
        let mut daemon = Dockerd::launch(config_file, Some(&namespace));
        daemon._etc_docker = Some(etc_docker);
        daemon
    }

    /// As [`Dockerd::start`], with dockerd alone in the private mount namespace of `namespace`
    /// (its /etc/hosts names and bind mounts, e.g. a temp dir over /etc/docker for certs.d).
    /// Its containerd runs outside; the `docker` CLI reaches it through the socket in the temp
    /// dir, which both sides see. Mounts dockerd makes itself stay in the namespace.
    pub fn start_in(config_file: &Path, namespace: &PrivateHosts) -> Dockerd {
        Dockerd::launch(config_file, Some(namespace))
    }

    fn launch(config_file: &Path, namespace: Option<&PrivateHosts>) -> Dockerd {
        let containerd = Containerd::start();
        let dir = tempfile::Builder::new()
            .prefix("dockerd-")
            .tempdir()
            .expect("tempdir");
        let d = dir.path();
        let log = std::fs::File::create(d.join("dockerd.log")).expect("log");
        let mut cmd = Command::new("dockerd");
        cmd.arg("--config-file")
            .arg(config_file)
            .arg("--host")
            .arg(format!("unix://{}", d.join("docker.sock").display()))
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("dockerd.pid"))
            .arg("--containerd")
            .arg(containerd.socket())
            .args([
                "--iptables=false",
                "--ip6tables=false",
                "--bridge=none",
                "--storage-driver=vfs",
            ]);
        isolate_env(&mut cmd);
        if let Some(ns) = namespace {
            cmd = ns.wrap(&cmd);
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log);
        let child = ChildGuard::new(cmd.spawn().expect("spawn dockerd"));
        let mut daemon = Dockerd {
            child,
            _containerd: containerd,
            dir,
            _etc_docker: None,
        };
        let ready = wait_until(Duration::from_secs(30), "dockerd socket", || {
            daemon.socket().exists()
                && daemon
                    .docker()
                    .arg("version")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false)
        });
        if let Err(e) = ready {
            panic!("{e}\n--- dockerd log:\n{}", tail(&daemon.log_text(), 40));
        }
        assert!(
            daemon.child.is_running(),
            "dockerd exited:\n{}",
            tail(&daemon.log_text(), 40)
        );
        daemon
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("docker.sock")
    }

    pub fn log_text(&self) -> String {
        read_lossy(&self.dir.path().join("dockerd.log"))
    }

    /// `docker -H unix://SOCK` with a private client config dir and the isolating proxy env.
    pub fn docker(&self) -> Command {
        let mut cmd = Command::new("docker");
        cmd.arg("-H")
            .arg(format!("unix://{}", self.socket().display()))
            .env("DOCKER_CONFIG", self.dir.path().join("cli"));
        isolate_env(&mut cmd);
        cmd
    }

    /// `docker pull REF`; returns the digest docker reports (`Digest: sha256:...`).
    pub fn pull(&self, reference: &str) -> Result<String, String> {
        let out = run_cmd(self.docker().args(["pull", reference]))
            .map_err(|e| format!("{e}\n--- dockerd log:\n{}", tail(&self.log_text(), 20)))?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find_map(|l| l.strip_prefix("Digest: "))
            .map(|d| d.trim().to_string())
            .ok_or_else(|| format!("no digest in `docker pull` output:\n{text}"))
    }

    /// `docker image inspect` `.RepoDigests` of a pulled image (`name@sha256:...`).
    pub fn repo_digests(&self, reference: &str) -> Result<Vec<String>, String> {
        super::repo_digests(self.docker(), reference)
    }

    /// SIGTERM by PID, up to 15 s for a clean shutdown, then SIGKILL. Idempotent.
    pub fn stop(&mut self) {
        if let Some(pid) = self.child.id() {
            if self.child.is_running() {
                let _ = Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
                let _ = wait_until(Duration::from_secs(15), "dockerd to exit", || {
                    !self.child.is_running()
                });
            }
        }
        self.child.kill();
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        self.stop();
    }
}
