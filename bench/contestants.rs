//! The servers measured: pullgate, distribution in proxy mode, nginx `proxy_cache`, and as
//! limits nginx serving the blob files and Pingora answering the small ones from memory. Each
//! runs as its own process (tree) on a free loopback port, is polled until it answers, and is
//! stopped by PID.
//!
//! A server's cache lives in a state folder the caller owns, so a new process can start on a
//! warm cache: every measurement that needs a cold cache or a fresh peak-RSS count starts a new
//! process.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::client::{fetch, BodyMode, Target};
use crate::support::{free_port, isolate_env, tail};

/// Which server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Pullgate,
    /// pullgate with a signature policy over the benchmark repositories (W3 only).
    PullgateSigned,
    /// pullgate with `[cache.encryption]` (the `file` provider): the same bed, sealed cache.
    PullgateEncrypted,
    Distribution,
    NginxCache,
    NginxStatic,
    /// This bench binary as a Pingora server answering the small files from memory (W3).
    PingoraStatic,
}

impl Kind {
    /// The id used in results.
    pub fn id(self) -> &'static str {
        match self {
            Kind::Pullgate => "pullgate",
            Kind::PullgateSigned => "pullgate-signed",
            Kind::PullgateEncrypted => "pullgate-enc",
            Kind::Distribution => "distribution",
            Kind::NginxCache => "nginx-cache",
            Kind::NginxStatic => "nginx-static",
            Kind::PingoraStatic => "pingora-static",
        }
    }
}

/// What the servers need to know about the test bed.
pub struct Env {
    pub pullgate_bin: PathBuf,
    /// "https://127.0.0.1:P"
    pub upstream_url: String,
    pub upstream_port: u16,
    /// The test CA (PEM file) that signed the upstream's certificate.
    pub ca_path: PathBuf,
    pub user: String,
    pub password: String,
    /// A long-lived bearer token for the benchmark repositories (nginx injects it).
    pub nginx_token: String,
    /// The folder nginx-static serves.
    pub www: PathBuf,
    /// The public key `pullgate-signed` trusts (the benchmark manifests are signed with it).
    pub signature_key: PathBuf,
}

/// A running server.
pub struct Server {
    pub kind: Kind,
    pub port: u16,
    /// Where it listens: 127.0.0.1, or a loopback alias for a cluster replica.
    pub addr: SocketAddr,
    /// pullgate's admin listener (`/metrics`; W7 starts warm jobs there); `None` for the others.
    pub admin_port: Option<u16>,
    proc: Proc,
}

impl Server {
    /// Starts `kind` with its cache in `state` (created if missing) and its config and logs in
    /// a new folder under `run`, and `cache_extra` (TOML lines) in pullgate's `[cache]`;
    /// returns once it answers HTTP.
    pub fn start(
        kind: Kind,
        env: &Env,
        state: &Path,
        run: &Path,
        cache_extra: &str,
    ) -> Result<Server, String> {
        std::fs::create_dir_all(state).map_err(|e| e.to_string())?;
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            let admin = free_port();
            let dir = tempfile::Builder::new()
                .prefix(&format!("{}-", kind.id()))
                .tempdir_in(run)
                .map_err(|e| e.to_string())?
                .keep();
            let log = dir.join("server.log");
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let cmd = match kind {
                Kind::Pullgate | Kind::PullgateSigned | Kind::PullgateEncrypted => {
                    pullgate_cmd(env, addr, admin, state, &dir, kind, cache_extra, "")?
                }
                Kind::Distribution => distribution_cmd(env, port, state, &dir)?,
                Kind::NginxCache => nginx_cmd(&nginx_cache_conf(env, port, state, &dir), &dir)?,
                Kind::NginxStatic => nginx_cmd(&nginx_static_conf(env, port, &dir), &dir)?,
                Kind::PingoraStatic => {
                    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
                    let mut cmd = Command::new(exe);
                    cmd.arg(crate::pingora_static::FLAG)
                        .arg(&env.www)
                        .arg(addr.to_string());
                    cmd
                }
            };
            let mut proc = Proc::spawn(
                cmd,
                &log,
                matches!(kind, Kind::NginxCache | Kind::NginxStatic),
            )?;
            match wait_ready(&mut proc, addr) {
                Ok(()) => {
                    let admin_port =
                        matches!(kind, Kind::Pullgate | Kind::PullgateEncrypted).then_some(admin);
                    return Ok(Server {
                        kind,
                        port,
                        addr,
                        admin_port,
                        proc,
                    });
                }
                Err(e) => {
                    proc.stop();
                    let text = crate::support::read_lossy(&log);
                    last = format!(
                        "{} did not start: {e}\n--- log:\n{}",
                        kind.id(),
                        tail(&text, 20)
                    );
                    if !text.to_ascii_lowercase().contains("address already in use") {
                        break;
                    }
                }
            }
        }
        Err(last)
    }

    /// A pullgate replica of the cluster round: pullgate's plain config on `addr` (a loopback
    /// alias chosen by the caller, who lists every replica in `extra`), with `extra` (TOML
    /// tables: `[cluster]`, `[cache.l2]`) and the environment `vars`.
    pub fn start_replica(
        env: &Env,
        addr: SocketAddr,
        state: &Path,
        run: &Path,
        extra: &str,
        vars: &[(&str, &str)],
    ) -> Result<Server, String> {
        std::fs::create_dir_all(state).map_err(|e| e.to_string())?;
        let admin = free_port();
        let dir = tempfile::Builder::new()
            .prefix("pullgate-replica-")
            .tempdir_in(run)
            .map_err(|e| e.to_string())?
            .keep();
        let log = dir.join("server.log");
        let kind = Kind::Pullgate;
        let mut cmd = pullgate_cmd(env, addr, admin, state, &dir, kind, "", extra)?;
        cmd.envs(vars.iter().copied());
        let mut proc = Proc::spawn(cmd, &log, false)?;
        if let Err(e) = wait_ready(&mut proc, addr) {
            proc.stop();
            let text = crate::support::read_lossy(&log);
            return Err(format!(
                "replica on {addr} did not start: {e}\n--- log:\n{}",
                tail(&text, 20)
            ));
        }
        Ok(Server {
            kind,
            port: addr.port(),
            addr,
            admin_port: Some(admin),
            proc,
        })
    }

    pub fn target(&self) -> Target {
        Target::Plain(self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid
    }

    /// Peak resident memory of the server's processes so far (sum of `VmHWM`), in bytes.
    pub fn peak_rss(&self) -> u64 {
        self.proc
            .tree()
            .iter()
            .map(|p| status_kib(*p, "VmHWM:") * 1024)
            .sum()
    }

    /// CPU time the server's processes have used so far (user + system, all threads), in
    /// seconds: what a request costs the server, whoever else shares the cores.
    pub fn cpu_seconds(&self) -> f64 {
        self.proc.tree().iter().map(|p| cpu_seconds(*p)).sum()
    }

    pub fn log_path(&self) -> &Path {
        &self.proc.log
    }

    pub fn stop(mut self) {
        self.proc.stop();
    }
}

/// Polls until the process answers an HTTP request on `addr`.
fn wait_ready(proc: &mut Proc, addr: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let target = Target::Plain(addr);
    loop {
        if !proc.running() {
            return Err("process exited".into());
        }
        if fetch(&target, "GET", "/v2/", &[], BodyMode::Discard).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("no HTTP answer on {addr} after 20 s"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// pullgate's config for `kind`: listening on `listen`, the admin listener on `admin`,
/// `cache_extra` in `[cache]` and `extra` (tables) at the end; `pullgate-signed` adds a
/// signature policy over the benchmark repositories, `pullgate-enc` seals the cache under a
/// `file` KEK kept next to the state (the same KEK for every process on that state).
#[allow(clippy::too_many_arguments)]
fn pullgate_cmd(
    env: &Env,
    listen: SocketAddr,
    admin: u16,
    state: &Path,
    dir: &Path,
    kind: Kind,
    cache_extra: &str,
    extra: &str,
) -> Result<Command, String> {
    let password = dir.join("password");
    std::fs::write(&password, format!("{}\n", env.password)).map_err(|e| e.to_string())?;
    let encryption = if kind == Kind::PullgateEncrypted {
        use std::os::unix::fs::PermissionsExt;
        let kek = state.join("cache.kek");
        if !kek.exists() {
            std::fs::write(&kek, [0x5au8; 32]).map_err(|e| e.to_string())?;
            std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| e.to_string())?;
        }
        format!(
            "\n[cache.encryption]\nprovider = \"file\"\nkey_file = \"{}\"\n",
            kek.display()
        )
    } else {
        String::new()
    };
    let config = format!(
        r#"[server]
listen = ["{listen}"]
admin_listen = "127.0.0.1:{admin}"

[cache]
dir = "{cache}"
max_size = "20GiB"
{cache_extra}
{encryption}
[[registry]]
name = "upstream"
upstream = "{url}"
ca = "{ca}"
default = true
credentials = {{ username = "{user}", password_file = "{password}" }}
{extra}
"#,
        cache = state.join("cache").display(),
        url = env.upstream_url,
        ca = env.ca_path.display(),
        user = env.user,
        password = password.display(),
    );
    let config = if kind == Kind::PullgateSigned {
        format!(
            "{config}\n[[registry.signatures]]\nrepositories = [\"bench/**\"]\nkeys = [\"{}\"]\n",
            env.signature_key.display()
        )
    } else {
        config
    };
    let path = dir.join("pullgate.toml");
    std::fs::write(&path, config).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(&env.pullgate_bin);
    cmd.arg("serve").arg("-c").arg(&path);
    Ok(cmd)
}

fn distribution_cmd(env: &Env, port: u16, state: &Path, dir: &Path) -> Result<Command, String> {
    let config = format!(
        "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {root}\n  cache:\n    blobdescriptor: inmemory\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: bench-proxy-secret\nproxy:\n  remoteurl: {url}\n  username: {user}\n  password: {password}\n",
        root = state.join("registry").display(),
        url = env.upstream_url,
        user = env.user,
        password = env.password,
    );
    let path = dir.join("config.yml");
    std::fs::write(&path, config).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(crate::support::upstream::REGISTRY_BIN);
    cmd.arg("serve")
        .arg(&path)
        .env("SSL_CERT_FILE", &env.ca_path);
    Ok(cmd)
}

/// The parts of an nginx config every nginx here shares.
fn nginx_main(dir: &Path, http: &str) -> String {
    let d = dir.display();
    format!(
        r#"daemon off;
master_process on;
worker_processes auto;
user root;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  default_type application/octet-stream;
  access_log {d}/access.log;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  client_body_temp_path {d}/client_body;
  proxy_temp_path {d}/proxy_temp;
  fastcgi_temp_path {d}/fastcgi_temp;
  uwsgi_temp_path {d}/uwsgi_temp;
  scgi_temp_path {d}/scgi_temp;
{http}}}
"#
    )
}

/// nginx as a pull-through cache: blobs cached on disk for good, manifests for 5 minutes
/// (pullgate's default `tag_ttl`), one upstream fetch per key (`proxy_cache_lock`), the
/// upstream token injected, the upstream's certificate verified against the test CA.
fn nginx_cache_conf(env: &Env, port: u16, state: &Path, dir: &Path) -> String {
    let mut http = String::new();
    let _ = write!(
        http,
        r#"  proxy_cache_path {blobs} levels=1:2 keys_zone=blobs:16m max_size=20g inactive=30d use_temp_path=off;
  proxy_cache_path {manifests} levels=1:2 keys_zone=manifests:4m max_size=1g inactive=1h use_temp_path=off;
  upstream registry {{
    server 127.0.0.1:{up};
    keepalive 32;
  }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host 127.0.0.1:{up};
    proxy_set_header Authorization "Bearer {token}";
    proxy_ssl_trusted_certificate {ca};
    proxy_ssl_verify on;
    proxy_ssl_name localhost;
    proxy_ssl_session_reuse on;
    proxy_read_timeout 120s;
    location ~ "^/v2/.+/blobs/sha256:[0-9a-f]{{64}}$" {{
      proxy_pass https://registry;
      proxy_cache blobs;
      proxy_cache_key $uri;
      proxy_cache_valid 200 30d;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 120s;
      proxy_cache_lock_age 120s;
    }}
    location ~ ^/v2/.+/manifests/ {{
      proxy_pass https://registry;
      proxy_cache manifests;
      proxy_cache_key "$uri|$http_accept";
      proxy_cache_valid 200 5m;
      proxy_cache_lock on;
    }}
    location / {{
      proxy_pass https://registry;
    }}
  }}
"#,
        blobs = state.join("nginx-blobs").display(),
        manifests = state.join("nginx-manifests").display(),
        up = env.upstream_port,
        token = env.nginx_token,
        ca = env.ca_path.display(),
    );
    nginx_main(dir, &http)
}

/// nginx serving the blob files themselves: the ceiling for a disk-cache hit.
fn nginx_static_conf(env: &Env, port: u16, dir: &Path) -> String {
    let http = format!(
        "  server {{\n    listen 127.0.0.1:{port} backlog=4096;\n    root {};\n    location / {{ }}\n  }}\n",
        env.www.display()
    );
    nginx_main(dir, &http)
}

fn nginx_cmd(conf: &str, dir: &Path) -> Result<Command, String> {
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).map_err(|e| e.to_string())?;
    let mut cmd = Command::new("nginx");
    cmd.arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&path)
        .arg("-e")
        .arg(dir.join("error.log"));
    Ok(cmd)
}

/// A child process (and, for nginx, its workers), stopped by PID.
pub struct Proc {
    child: Option<Child>,
    pid: u32,
    /// Stop with SIGTERM first (nginx: the master then stops its workers).
    graceful: bool,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(mut cmd: Command, log: &Path, graceful: bool) -> Result<Proc, String> {
        let file = std::fs::File::create(log).map_err(|e| e.to_string())?;
        isolate_env(&mut cmd);
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone().map_err(|e| e.to_string())?)
            .stderr(file);
        let child = cmd.spawn().map_err(|e| format!("spawn {cmd:?}: {e}"))?;
        Ok(Proc {
            pid: child.id(),
            child: Some(child),
            graceful,
            log: log.to_path_buf(),
        })
    }

    fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// This process and its descendants.
    pub fn tree(&self) -> Vec<u32> {
        if self.child.is_none() {
            return Vec::new();
        }
        descendants(self.pid)
    }

    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let tree = descendants(self.pid);
        if self.graceful {
            signal(self.pid, "TERM");
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        // Anything of its tree still alive (a worker of a master that could not stop it).
        for pid in tree.into_iter().skip(1) {
            if Path::new(&format!("/proc/{pid}")).exists() {
                signal(pid, "KILL");
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `kill -SIG PID` (no `unsafe` here, so no libc).
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// `pid` and every process below it, from `/proc/*/stat`.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(pp) = parent_of(p) {
                parents.push((p, pp));
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let cur = out[i];
        out.extend(parents.iter().filter(|(_, pp)| *pp == cur).map(|(p, _)| *p));
        i += 1;
    }
    out
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    let after = &stat[stat.rfind(')')? + 2..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// User + system CPU time of `pid` (every thread), in seconds (0 when gone).
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // After "pid (comm) ": state is field 3, utime 14 and stime 15.
    let Some(after) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return 0.0;
    };
    let ticks: u64 = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse::<u64>().ok())
        .sum();
    ticks as f64 / clock_ticks_per_second()
}

/// `getconf CLK_TCK` (the unit of `/proc/PID/stat`'s times), asked once.
fn clock_ticks_per_second() -> f64 {
    static HZ: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// A `kB` field of `/proc/PID/status` (0 when gone).
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
