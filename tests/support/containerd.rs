//! containerd 1.6 + `ctr` as a real client: a private daemon per test (temp root, state and
//! sockets), CRI and host-wide plugins disabled, overlayfs snapshotter (works here; `ctr images
//! pull` unpacks into it).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{isolate_env, read_lossy, run_cmd, tail, wait_until, ChildGuard};

/// The ctr namespace every helper uses.
pub const NAMESPACE: &str = "testbed";

/// Options of one `ctr images pull`.
#[derive(Clone, Debug, Default)]
pub struct PullOpts {
    /// `--hosts-dir DIR` (mirrors, CA, skip_verify; see [`write_hosts_toml`]).
    pub hosts_dir: Option<PathBuf>,
    /// `--plain-http`.
    pub plain_http: bool,
    /// `--user u:p` (containerd then asks the realm with POST grant_type=password).
    pub user: Option<(String, String)>,
    /// `--tlscacert`. Gotcha: without a hosts.toml, ctr 1.6 talks PLAIN HTTP to 127.0.0.1/localhost
    /// registries (a TLS port then answers 400); for a TLS registry on loopback write a hosts.toml
    /// with `server = "https://..."` and `ca` or `skip_verify` instead.
    pub ca: Option<PathBuf>,
    /// `--skip-verify`.
    pub skip_verify: bool,
    /// `--platform` (e.g. "linux/arm64"); none means the host's.
    pub platform: Option<String>,
    /// `--all-platforms`.
    pub all_platforms: bool,
}

/// A running containerd; killed on Drop.
pub struct Containerd {
    dir: tempfile::TempDir,
    child: ChildGuard,
}

impl Containerd {
    /// Starts the daemon and waits until `ctr version` answers on its socket.
    pub fn start() -> Containerd {
        let dir = tempfile::Builder::new()
            .prefix("ctrd-")
            .tempdir()
            .expect("tempdir");
        let d = dir.path();
        let cfg = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  address = "{dbg}"
  level = "info"
[metrics]
  address = ""
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = d.join("c.sock").display(),
            dbg = d.join("debug.sock").display()
        );
        std::fs::write(d.join("config.toml"), cfg).expect("config");
        let log = std::fs::File::create(d.join("containerd.log")).expect("log");
        let mut cmd = Command::new("containerd");
        cmd.arg("--config")
            .arg(d.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        isolate_env(&mut cmd);
        let child = ChildGuard::new(cmd.spawn().expect("spawn containerd"));
        let mut c = Containerd { dir, child };
        let ready = wait_until(Duration::from_secs(20), "containerd socket", || {
            c.socket().exists()
                && c.ctr()
                    .arg("version")
                    .output()
                    .map(|o| o.status.success())
                    .unwrap_or(false)
        });
        if let Err(e) = ready {
            panic!("{e}\n--- containerd log:\n{}", tail(&c.log_text(), 40));
        }
        assert!(
            c.child.is_running(),
            "containerd exited:\n{}",
            tail(&c.log_text(), 40)
        );
        c
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("c.sock")
    }
    pub fn log_text(&self) -> String {
        read_lossy(&self.dir.path().join("containerd.log"))
    }
    /// A dir for hosts.toml trees, inside this daemon's temp dir.
    pub fn hosts_dir(&self) -> PathBuf {
        let p = self.dir.path().join("hosts.d");
        std::fs::create_dir_all(&p).expect("mkdir");
        p
    }

    /// `ctr -a SOCK -n testbed` (with the isolating proxy env).
    pub fn ctr(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("-a").arg(self.socket()).arg("-n").arg(NAMESPACE);
        isolate_env(&mut cmd);
        cmd
    }

    /// `ctr images pull [--plain-http] [--hosts-dir DIR] REF`; returns the image's target digest.
    pub fn pull(
        &self,
        reference: &str,
        hosts_dir: Option<&Path>,
        plain_http: bool,
    ) -> Result<String, String> {
        self.pull_with(
            reference,
            &PullOpts {
                hosts_dir: hosts_dir.map(Path::to_path_buf),
                plain_http,
                ..Default::default()
            },
        )
    }

    /// `ctr images pull` with every option; Err carries ctr's output and the daemon log tail.
    /// The pull unpacks into overlayfs. Content is shared across namespaces of one daemon: to
    /// make a second pull fetch again, use a new `Containerd`.
    pub fn pull_with(&self, reference: &str, o: &PullOpts) -> Result<String, String> {
        let mut cmd = self.ctr();
        cmd.args(["images", "pull"]);
        if o.plain_http {
            cmd.arg("--plain-http");
        }
        if o.skip_verify {
            cmd.arg("--skip-verify");
        }
        if let Some(h) = &o.hosts_dir {
            cmd.arg("--hosts-dir").arg(h);
        }
        if let Some((u, p)) = &o.user {
            cmd.arg("--user").arg(format!("{u}:{p}"));
        }
        if let Some(ca) = &o.ca {
            cmd.arg("--tlscacert").arg(ca);
        }
        if let Some(p) = &o.platform {
            cmd.arg("--platform").arg(p);
        }
        if o.all_platforms {
            cmd.arg("--all-platforms");
        }
        cmd.arg(reference);
        run_cmd(&mut cmd)
            .map_err(|e| format!("{e}\n--- containerd log:\n{}", tail(&self.log_text(), 20)))?;
        self.image_digest(reference)
    }

    /// The target digest of a pulled image, from `ctr images ls`
    /// (columns: REF TYPE DIGEST SIZE PLATFORMS LABELS).
    pub fn image_digest(&self, reference: &str) -> Result<String, String> {
        let out = run_cmd(self.ctr().args(["images", "ls"]))?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|cols| cols.first() == Some(&reference))
            .and_then(|cols| cols.get(2).map(|d| d.to_string()))
            .ok_or_else(|| format!("{reference} not in `ctr images ls`:\n{text}"))
    }

    /// `ctr images rm REF` (content stays until garbage collection).
    pub fn remove_image(&self, reference: &str) -> Result<(), String> {
        run_cmd(self.ctr().args(["images", "rm", "--sync", reference])).map(|_| ())
    }

    /// Snapshot keys of the overlayfs snapshotter (non-empty once a pull unpacked).
    pub fn snapshots(&self) -> Result<Vec<String>, String> {
        let out = run_cmd(self.ctr().args(["snapshots", "ls"]))?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next().map(String::from))
            .collect())
    }

    /// Digests in the content store (`ctr content ls`).
    pub fn content_digests(&self) -> Result<Vec<String>, String> {
        let out = run_cmd(self.ctr().args(["content", "ls", "-q"]))?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect())
    }
}

/// Writes `<dir>/<namespace>/hosts.toml` ("docker.io", "127.0.0.1:5000", or "_default") with one
/// mirror `[host."<mirror_url>"]` for pull and resolve; `server` sets the upstream fallback,
/// `ca` the mirror's CA file, `override_path` for a mirror URL with a path (".../v2/prefix").
/// Returns the file written.
pub fn write_hosts_toml(
    dir: &Path,
    namespace: &str,
    mirror_url: &str,
    server: Option<&str>,
    ca: Option<&Path>,
    override_path: bool,
) -> PathBuf {
    write_hosts_toml_ext(dir, namespace, mirror_url, server, ca, override_path, false)
}

/// [`write_hosts_toml`] plus `skip_verify` for the mirror.
pub fn write_hosts_toml_ext(
    dir: &Path,
    namespace: &str,
    mirror_url: &str,
    server: Option<&str>,
    ca: Option<&Path>,
    override_path: bool,
    skip_verify: bool,
) -> PathBuf {
    let ns = dir.join(namespace);
    std::fs::create_dir_all(&ns).expect("mkdir hosts ns");
    let mut t = String::new();
    if let Some(s) = server {
        t += &format!("server = \"{s}\"\n\n");
    }
    t += &format!("[host.\"{mirror_url}\"]\n  capabilities = [\"pull\", \"resolve\"]\n");
    if let Some(ca) = ca {
        t += &format!("  ca = \"{}\"\n", ca.display());
    }
    if override_path {
        t += "  override_path = true\n";
    }
    if skip_verify {
        t += "  skip_verify = true\n";
    }
    let file = ns.join("hosts.toml");
    std::fs::write(&file, t).expect("write hosts.toml");
    file
}
