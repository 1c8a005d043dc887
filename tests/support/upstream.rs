//! The REAL upstream: CNCF distribution 2.8 (`/usr/bin/docker-registry`) over TLS, with
//! bearer-token auth from our [`TokenIssuer`] (or anonymous), filesystem storage in a temp dir.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use super::images::TestImage;
use super::token::{TokenIssuer, TokenIssuerOptions};
use super::{block_on, free_port, http_client, read_lossy, run_cmd, tail, ChildGuard, Pki};

/// The registry binary (Debian package `docker-registry`).
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
/// `auth.token.service` of the upstream: the `service=` of every token request.
pub const SERVICE: &str = "test-registry";

/// How the upstream authenticates.
#[derive(Clone, Debug)]
pub enum Auth {
    /// Anonymous registry: anyone may pull and push.
    None,
    /// Bearer tokens from a [`TokenIssuer`] started with these options.
    Token(TokenIssuerOptions),
}

/// Options for [`Upstream::start`].
#[derive(Clone)]
pub struct UpstreamOptions {
    pub auth: Auth,
    /// Serve TLS (true, default) or plain HTTP.
    pub tls: bool,
    /// Share a Pki (e.g. with the gateway) so one CA covers everything; a new one otherwise.
    pub pki: Option<Arc<Pki>>,
}

impl Default for UpstreamOptions {
    fn default() -> Self {
        UpstreamOptions {
            auth: Auth::Token(TokenIssuerOptions::default()),
            tls: true,
            pki: None,
        }
    }
}

/// One line of distribution's access log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedRequest {
    pub method: String,
    /// Path and query, as sent.
    pub uri: String,
    pub status: u16,
}

/// A running distribution registry; killed on Drop.
pub struct Upstream {
    pki: Arc<Pki>,
    issuer: Option<TokenIssuer>,
    creds: Option<(String, String)>,
    tls: bool,
    port: u16,
    dir: tempfile::TempDir,
    child: Option<ChildGuard>,
    /// Log lines of earlier runs (before a restart), so counts span restarts.
    old_log: String,
}

impl Upstream {
    /// Starts the registry and waits until `/v2/` answers (401 or 200). Panics with the log
    /// tail when it does not come up.
    pub fn start(opts: UpstreamOptions) -> Upstream {
        let pki = opts.pki.clone().unwrap_or_else(|| Arc::new(Pki::new()));
        let (issuer, creds) = match &opts.auth {
            Auth::None => (None, None),
            Auth::Token(t) => (
                Some(TokenIssuer::start(&pki, t.clone())),
                t.users.first().cloned(),
            ),
        };
        let dir = tempfile::Builder::new()
            .prefix("upstream-")
            .tempdir()
            .expect("tempdir");
        std::fs::create_dir_all(dir.path().join("data")).expect("mkdir");
        let mut up = Upstream {
            pki,
            issuer,
            creds,
            tls: opts.tls,
            port: 0,
            dir,
            child: None,
            old_log: String::new(),
        };
        for attempt in 0..5 {
            up.port = free_port();
            up.write_config();
            match up.spawn_and_wait() {
                Ok(()) => return up,
                Err(e) if attempt < 4 && up.log_text().contains("address already in use") => {
                    eprintln!("upstream: port race, retrying: {e}");
                    up.stop();
                }
                Err(e) => panic!(
                    "upstream did not start: {e}\n--- registry log:\n{}",
                    tail(&up.log_text(), 40)
                ),
            }
        }
        unreachable!()
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.yml")
    }
    fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    fn write_config(&self) {
        let mut y = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{}\n  secret: testbed-secret\n",
            self.dir.path().join("data").display(),
            self.port
        );
        if self.tls {
            y += &format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                self.pki.server_cert_path().display(),
                self.pki.server_key_path().display()
            );
        }
        if let Some(iss) = &self.issuer {
            y += &format!(
                "auth:\n  token:\n    realm: {}\n    service: {SERVICE}\n    issuer: {}\n    rootcertbundle: {}\n",
                iss.realm(),
                iss.issuer_name(),
                iss.rootcert_path().display()
            );
        }
        std::fs::write(self.config_path(), y).expect("write config");
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log");
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn {REGISTRY_BIN}: {e}"))?;
        self.child = Some(ChildGuard::new(child));
        let client = http_client(Some(self.pki.ca_pem()));
        let url = format!("{}/v2/", self.url());
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if !self.child.as_mut().unwrap().is_running() {
                return Err("registry exited".into());
            }
            let c = client.clone();
            let u = url.clone();
            let status =
                block_on(async move { c.get(u).send().await.map(|r| r.status().as_u16()) });
            if let Ok(200 | 401) = status {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(format!("no answer on {url}: {status:?}"));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Kills the registry (an upstream outage); storage and port are kept.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill();
        }
        self.old_log = self.log_text();
        let _ = std::fs::remove_file(self.log_path());
    }

    /// Starts it again on the same port with the same storage (after [`Upstream::stop`]).
    pub fn restart(&mut self) {
        self.stop();
        if let Err(e) = self.spawn_and_wait() {
            panic!(
                "upstream restart failed: {e}\n--- registry log:\n{}",
                tail(&self.log_text(), 40)
            );
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().map(|c| c.is_running()).unwrap_or(false)
    }

    /// "https://127.0.0.1:P" (or http:// without TLS).
    pub fn url(&self) -> String {
        format!(
            "{}://127.0.0.1:{}",
            if self.tls { "https" } else { "http" },
            self.port
        )
    }
    /// "127.0.0.1:P"
    pub fn host_port(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn pki(&self) -> &Pki {
        &self.pki
    }
    pub fn pki_arc(&self) -> Arc<Pki> {
        self.pki.clone()
    }
    /// The token issuer; panics for an anonymous upstream.
    pub fn issuer(&self) -> &TokenIssuer {
        self.issuer
            .as_ref()
            .expect("anonymous upstream (Auth::None) has no token issuer")
    }
    pub fn try_issuer(&self) -> Option<&TokenIssuer> {
        self.issuer.as_ref()
    }
    /// The first configured user ("alice" by default).
    pub fn user(&self) -> &str {
        self.creds.as_ref().map(|c| c.0.as_str()).unwrap_or("")
    }
    pub fn password(&self) -> &str {
        self.creds.as_ref().map(|c| c.1.as_str()).unwrap_or("")
    }
    pub fn creds(&self) -> Option<(&str, &str)> {
        self.creds.as_ref().map(|(u, p)| (u.as_str(), p.as_str()))
    }
    /// The storage root (to corrupt or delete blobs behind the registry's back).
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The registry's log so far (across restarts).
    pub fn log_text(&self) -> String {
        format!("{}{}", self.old_log, read_lossy(&self.log_path()))
    }

    /// Every completed request, from the access-log lines
    /// (`127.0.0.1 - - [date] "GET /v2/... HTTP/1.1" 200 123 "" "ua"`), one per response.
    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.log_text()
            .lines()
            .filter_map(parse_access_line)
            .collect()
    }

    /// Completed requests with this method whose path+query contains `path_contains`.
    pub fn count_requests(&self, method: &str, path_contains: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.method.eq_ignore_ascii_case(method) && r.uri.contains(path_contains))
            .count()
    }

    /// Pushes every platform of `image` as `repo:tag` (OCI media types); returns the digest of
    /// the pushed top-level manifest (equal to `image.manifest_digest()`).
    pub fn push(&self, image: &TestImage, repo_tag: &str) -> String {
        self.push_with(image, repo_tag, &[])
    }

    /// Pushes as Docker schema 2 (manifest list for indexes): new manifest digests, same
    /// config and layer blobs; returns the pushed top-level digest.
    pub fn push_v2s2(&self, image: &TestImage, repo_tag: &str) -> String {
        self.push_with(image, repo_tag, &["--format", "v2s2"])
    }

    fn push_with(&self, image: &TestImage, repo_tag: &str, extra: &[&str]) -> String {
        let tmp = tempfile::tempdir().expect("tempdir");
        let digestfile = tmp.path().join("digest");
        let mut cmd = Command::new("skopeo");
        cmd.args(["--insecure-policy", "copy", "--all", "--retry-times", "2"])
            .args(extra);
        cmd.arg("--digestfile").arg(&digestfile);
        if let Some((u, p)) = self.creds() {
            cmd.arg("--dest-creds").arg(format!("{u}:{p}"));
        }
        self.dest_tls_args(&mut cmd);
        cmd.env("REGISTRY_AUTH_FILE", tmp.path().join("auth.json"));
        cmd.arg(image.oci_ref())
            .arg(format!("docker://{}/{}", self.host_port(), repo_tag));
        if let Err(e) = run_cmd(&mut cmd) {
            panic!(
                "push {repo_tag} failed: {e}\n--- registry log:\n{}",
                tail(&self.log_text(), 30)
            );
        }
        std::fs::read_to_string(&digestfile)
            .expect("digestfile")
            .trim()
            .to_string()
    }

    fn dest_tls_args(&self, cmd: &mut Command) {
        if self.tls {
            cmd.arg("--dest-cert-dir")
                .arg(self.pki.cert_dir_for_clients());
        } else {
            cmd.arg("--dest-tls-verify=false");
        }
    }

    /// Where the registry keeps the blob with this digest ("sha256:...").
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.storage_dir()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

/// Pushes `body` as a blob of `repo` straight to the upstream (monolithic POST + PUT) with
/// the upstream's own credentials; `digest` names it (any algorithm the upstream takes).
pub fn push_blob_upstream(up: &super::Upstream, repo: &str, digest: &str, body: &[u8]) {
    let token = upstream_token(up, repo, "pull,push");
    let client = super::http_client(Some(up.pki().ca_pem()));
    let base = up.url();
    let (repo, digest, body) = (repo.to_string(), digest.to_string(), body.to_vec());
    let status = super::block_on(async move {
        let started = client
            .post(format!("{base}/v2/{repo}/blobs/uploads/"))
            .bearer_auth(&token)
            .send()
            .await
            .expect("POST upload");
        assert_eq!(started.status().as_u16(), 202, "upload start");
        let location = started.headers()["location"].to_str().unwrap().to_string();
        let url = if location.starts_with('/') {
            format!("{base}{location}")
        } else {
            location
        };
        let sep = if url.contains('?') { '&' } else { '?' };
        client
            .put(format!("{url}{sep}digest={digest}"))
            .bearer_auth(&token)
            .header("Content-Type", "application/octet-stream")
            .body(body)
            .send()
            .await
            .expect("PUT upload")
            .status()
            .as_u16()
    });
    assert_eq!(status, 201, "upstream took the blob");
}

/// PUTs a manifest straight to the upstream.
pub fn push_manifest_upstream(
    up: &super::Upstream,
    repo: &str,
    reference: &str,
    media_type: &str,
    body: &[u8],
) {
    let token = upstream_token(up, repo, "pull,push");
    let client = super::http_client(Some(up.pki().ca_pem()));
    let url = format!("{}/v2/{repo}/manifests/{reference}", up.url());
    let (media_type, body) = (media_type.to_string(), body.to_vec());
    let status = super::block_on(async move {
        let r = client
            .put(url)
            .bearer_auth(&token)
            .header("Content-Type", media_type)
            .body(body)
            .send()
            .await
            .expect("PUT manifest");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        (status, text)
    });
    assert_eq!(status.0, 201, "upstream took the manifest: {}", status.1);
}

/// A token for the upstream user, minted by the issuer.
pub fn upstream_token(up: &super::Upstream, repo: &str, actions: &str) -> String {
    let actions: Vec<&str> = actions.split(',').collect();
    up.issuer().mint(
        up.user(),
        super::upstream::SERVICE,
        serde_json::json!([{"type": "repository", "name": repo, "actions": actions}]),
    )
}

/// Parses one access-log line; None for every other kind of line.
pub fn parse_access_line(line: &str) -> Option<LoggedRequest> {
    let start = line.find("] \"")? + 3;
    let rest = &line[start..];
    let end = rest.find('"')?;
    let mut req = rest[..end].split(' ');
    let method = req.next()?.to_string();
    let uri = req.next()?.to_string();
    if !req.next()?.starts_with("HTTP/") {
        return None;
    }
    let status = rest[end + 1..].split_whitespace().next()?.parse().ok()?;
    Some(LoggedRequest {
        method,
        uri,
        status,
    })
}
