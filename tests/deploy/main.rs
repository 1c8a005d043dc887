//! The deployment files in deploy/ and the Containerfile, checked the way an operator would
//! use them: every Kubernetes manifest parsed and cross-checked (selectors, probes, mounts,
//! ports, grace periods), the pullgate config inside each ConfigMap and beside the systemd unit
//! and the image run through `pullgate check`, the configs' probe paths asked of the real
//! binary, the unit through `systemd-analyze`, and the alert rules through `promtool`.
//!
//! No network beyond 127.0.0.1: the configs are started with their listeners moved to free
//! loopback ports, and nothing here talks to an upstream. Every process started is waited for
//! or stopped by its PID.

mod container;
mod kubernetes;
mod pod;
mod systemd;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_pullgate");
pub const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The user the image runs as (Containerfile `USER`) and the manifests' `runAsUser`.
pub const IMAGE_UID: i64 = 65532;

/// A path inside the repository.
pub fn repo(path: &str) -> PathBuf {
    Path::new(ROOT).join(path)
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every file under `dir`, recursively, as paths relative to the repository root, sorted.
pub fn files_under(dir: &str) -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.push(path);
            }
        }
    }
    let mut found = Vec::new();
    walk(&repo(dir), &mut found);
    let mut names: Vec<String> = found
        .iter()
        .map(|p| {
            p.strip_prefix(ROOT)
                .expect("under the repository")
                .to_string_lossy()
                .trim_start_matches('/')
                .to_owned()
        })
        .collect();
    names.sort();
    names
}

/// Seconds pullgate takes at most from SIGTERM to exit: the grace period in-flight requests
/// get plus the time the runtimes get to stop, read from the constants in src/listen/mod.rs
/// so that a change there fails the manifests that depend on it.
pub fn drain_seconds() -> u64 {
    let source = read(&repo("src/listen/mod.rs"));
    let constant = |name: &str| -> u64 {
        source
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix(&format!("const {name}: u64 = "))?
                    .strip_suffix(';')?
                    .parse()
                    .ok()
            })
            .unwrap_or_else(|| panic!("const {name} in src/listen/mod.rs"))
    };
    constant("GRACE_PERIOD_SECS") + constant("SHUTDOWN_TIMEOUT_SECS")
}

/// Runs `pullgate check` on `config` with exactly the environment variables in `env`;
/// returns the output (the caller asserts on status and warnings).
pub fn pullgate_check(config: &Path, strict: bool, env: &[(String, String)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.arg("check");
    if strict {
        cmd.arg("--strict");
    }
    cmd.arg("-c")
        .arg(config)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run pullgate check")
}

/// The `warning: <key>: <message>` lines of `pullgate check`.
pub fn warnings(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("warning: ").map(str::to_owned))
        .collect()
}

pub fn show(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Bytes in a size written like pullgate's `cache.max_size` ("40GiB") or a Kubernetes
/// quantity ("48Gi", "512Mi").
pub fn size_bytes(text: &str) -> u64 {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().unwrap_or_else(|_| panic!("size {text:?}"));
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "Ki" => 1 << 10,
        "MiB" | "Mi" => 1 << 20,
        "GiB" | "Gi" => 1 << 30,
        "TiB" | "Ti" => 1 << 40,
        other => panic!("unit {other:?} in {text:?}"),
    };
    number * scale
}

/// The status code of `GET path` on `addr` (HTTP/1.1, connection closed after), or None when
/// nothing answers.
pub fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = String::new();
    stream.read_to_string(&mut head).ok()?;
    head.split_whitespace().nth(1)?.parse().ok()
}

/// A whole TOML document as a value (a table).
pub fn parse_toml(text: &str) -> toml::Value {
    toml::Value::Table(toml::from_str::<toml::Table>(text).expect("a TOML document"))
}

/// Polls `f` every 50 ms until it holds or `limit` passes.
pub fn poll(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// A pullgate started by a test: SIGTERM by PID with [`Running::terminate`], SIGKILL and reap
/// when dropped.
pub struct Running {
    child: Child,
}

impl Running {
    pub fn serve(config: &Path, env: &[(String, String)]) -> Running {
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "-c"])
            .arg(config)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        Running {
            child: cmd.spawn().expect("spawn pullgate serve"),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Has it exited? (Reaps it if so.)
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Sends SIGTERM to the PID and returns how long pullgate took to exit (None: it did not
    /// within `limit`).
    pub fn terminate(&mut self, limit: Duration) -> Option<Duration> {
        let start = Instant::now();
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(sent.success(), "kill -TERM {}", self.child.id());
        poll(limit, || matches!(self.child.try_wait(), Ok(Some(_)))).then(|| start.elapsed())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// deploy/README.md lists every file in deploy/ and the Containerfile, and every file in
/// deploy/ is one the tests check: a new file without a check fails here.
#[test]
fn every_file_in_deploy_is_listed_and_checked() {
    let index = read(&repo("deploy/README.md"));
    let checked_by = |file: &str| -> Option<&str> {
        let rest = file.strip_prefix("deploy/")?;
        Some(match rest {
            "README.md" => "this test",
            "grafana/pullgate.json" => "src/metrics.rs (metric names), grafana_dashboard_is_json",
            "prometheus/alerts.yml" => "promtool_accepts_the_alert_rules, src/metrics.rs",
            "systemd/pullgate.service" | "systemd/config.toml" => "systemd.rs",
            "container/config.toml" => "container.rs",
            _ if rest.starts_with("kubernetes/") && rest.ends_with(".yaml") => "kubernetes.rs",
            _ => return None,
        })
    };
    let mut unchecked = Vec::new();
    let mut unlisted = Vec::new();
    for file in files_under("deploy") {
        if checked_by(&file).is_none() {
            unchecked.push(file.clone());
        }
        let relative = file.trim_start_matches("deploy/");
        if relative != "README.md" && !index.contains(&format!("`{relative}`")) {
            unlisted.push(file);
        }
    }
    assert!(unchecked.is_empty(), "no test checks {unchecked:?}");
    assert!(
        unlisted.is_empty(),
        "deploy/README.md does not list {unlisted:?}"
    );
    assert!(
        index.contains("`../Containerfile`"),
        "deploy/README.md lists the Containerfile"
    );
}

#[test]
fn promtool_accepts_the_alert_rules() {
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(repo("deploy/prometheus/alerts.yml"))
        .output()
        .expect("promtool (Debian package prometheus, installed by tests/install-deps.sh)");
    assert!(out.status.success(), "{}", show(&out));
}

#[test]
fn grafana_dashboard_is_json() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read(&repo("deploy/grafana/pullgate.json"))).expect("JSON");
    assert!(dashboard["panels"]
        .as_array()
        .is_some_and(|p| !p.is_empty()));
}
