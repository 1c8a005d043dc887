//! Starting pullgate in-process for a test, with a config written the way users write theirs.

use pullgate::RunningGateway;

use crate::support::{free_port, Upstream};

/// A running pullgate and the temp dir holding its cache and secret files.
pub struct Gateway {
    pub port: u16,
    /// The admin listener (`/metrics`, `/healthz`, `/readyz`).
    pub admin_port: u16,
    running: Option<RunningGateway>,
    _dir: tempfile::TempDir,
}

impl Gateway {
    /// Start pullgate with `registries` (TOML `[[registry]]` tables) on a free loopback port.
    pub fn start(registries: &str) -> Gateway {
        Self::start_with_cache(registries, None)
    }

    /// Like `start`, with the blob cache in `cache` (to test restarts) instead of a new dir.
    pub fn start_with_cache(registries: &str, cache: Option<&std::path::Path>) -> Gateway {
        Self::start_configured(registries, cache, "")
    }

    /// Like `start_with_cache`, with more `[cache]` keys (`tag_ttl = "0s"`, ...).
    pub fn start_configured(
        registries: &str,
        cache: Option<&std::path::Path>,
        cache_keys: &str,
    ) -> Gateway {
        Self::start_full("", registries, cache, cache_keys)
    }

    /// The most general start: extra `[server]` keys, then `rest` (zones, identities,
    /// registries), the cache in `cache` or a new dir, extra `[cache]` keys.
    pub fn start_full(
        server_keys: &str,
        rest: &str,
        cache: Option<&std::path::Path>,
        cache_keys: &str,
    ) -> Gateway {
        let registries = rest;
        pullgate::install_crypto_provider();
        // Captured per test by libtest: shown only for failing tests.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_test_writer()
            .try_init();
        let dir = tempfile::Builder::new()
            .prefix("pullgate-")
            .tempdir()
            .expect("tempdir");
        let port = free_port();
        let admin_port = free_port();
        let text = format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\nadmin_listen = \"127.0.0.1:{admin_port}\"\naudit_log = \"{}\"\n{server_keys}\n\n[cache]\ndir = \"{}\"\n{cache_keys}\n\n{registries}",
            dir.path().join("audit.log").display(),
            cache.map(|c| c.to_path_buf()).unwrap_or_else(|| dir.path().join("cache")).display()
        );
        // Also on disk, for the binary's commands that read a config (`client-config`).
        std::fs::write(dir.path().join("pullgate.toml"), &text).expect("write config");
        // Validated here first for a readable failure; the gateway then loads the file.
        pullgate::config::load_str(&text, dir.path())
            .unwrap_or_else(|e| panic!("test config invalid:\n{e}\n---\n{text}"));
        let running =
            RunningGateway::start_file(&dir.path().join("pullgate.toml")).expect("gateway starts");
        Gateway {
            port,
            admin_port,
            running: Some(running),
            _dir: dir,
        }
    }

    /// "127.0.0.1:P", as clients name the gateway.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The config this gateway runs, as a file.
    pub fn config_path(&self) -> std::path::PathBuf {
        self._dir.path().join("pullgate.toml")
    }

    /// The audit log's lines so far, parsed. Audit lines are written by a thread of their own
    /// after each answer, so this reads until the file has stopped growing for 100 ms (at most
    /// 5 s): every request the test already got an answer to is in it.
    pub fn audit_lines(&self) -> Vec<serde_json::Value> {
        let path = self._dir.path().join("audit.log");
        let read = || std::fs::read_to_string(&path).unwrap_or_default();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let (mut text, mut since) = (read(), std::time::Instant::now());
        while since.elapsed() < std::time::Duration::from_millis(100)
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
            let now = read();
            if now.len() != text.len() {
                (text, since) = (now, std::time::Instant::now());
            }
        }
        text.lines()
            .map(|l| serde_json::from_str(l).expect("audit lines are JSON"))
            .collect()
    }

    /// The blob cache directory of a gateway started without an explicit one.
    pub fn cache_dir(&self) -> std::path::PathBuf {
        self._dir.path().join("cache")
    }

    /// A URL on the admin listener.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    pub fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop();
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A `[[registry]]` table for `upstream`: its CA trusted, the test user's credentials injected
/// (from a file next to the config), plus `extra` lines.
pub fn registry(name: &str, upstream: &Upstream, extra: &str) -> String {
    registry_at(name, upstream, &upstream.url(), extra)
}

/// [`registry`] reached at `url` (a relay in front of `upstream`) instead of the upstream itself.
pub fn registry_at(name: &str, upstream: &Upstream, url: &str, extra: &str) -> String {
    let mut t = format!(
        "[[registry]]\nname = \"{name}\"\nupstream = \"{url}\"\nca = \"{}\"\n",
        upstream.pki().ca_path().display()
    );
    if let Some((user, password)) = upstream.creds() {
        let dir = upstream.storage_dir();
        let file = dir.join(format!("{name}-password"));
        std::fs::write(&file, format!("{password}\n")).expect("write password file");
        t += &format!(
            "credentials = {{ username = \"{user}\", password_file = \"{}\" }}\n",
            file.display()
        );
    }
    t + extra + "\n"
}

/// A `[[registry]]` table with no credentials.
pub fn anonymous_registry(name: &str, upstream: &Upstream, extra: &str) -> String {
    format!(
        "[[registry]]\nname = \"{name}\"\nupstream = \"{}\"\nca = \"{}\"\n{extra}\n",
        upstream.url(),
        upstream.pki().ca_path().display()
    )
}

/// What the gateway answered to a raw request.
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Answer {
    /// The first OCI error code of the body, if it is an OCI error.
    pub fn oci_code(&self) -> Option<String> {
        let json: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        json["errors"][0]["code"].as_str().map(str::to_string)
    }

    pub fn oci_message(&self) -> String {
        let json: serde_json::Value = serde_json::from_slice(&self.body).unwrap_or_default();
        json["errors"][0]["message"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
}

/// Send one request (no redirects followed) and read the whole answer.
pub fn request(method: &str, url: &str, headers: &[(&str, &str)]) -> Answer {
    request_with(crate::support::http_client(None), method, url, headers)
}

/// A client whose connections start from `from` (all of 127/8 is loopback), following no
/// redirects: for source-address rules.
pub fn client_from(from: &str) -> reqwest::Client {
    let from: std::net::IpAddr = from.parse().expect("source ip");
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .local_address(from)
        .build()
        .expect("client")
}

/// [`request`] through a client of the caller's (TLS trust, name resolution).
pub fn request_with(
    client: reqwest::Client,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
) -> Answer {
    request_with_body(client, method, url, headers, Vec::new())
}

/// [`request_with`] sending `body` (none when empty).
pub fn request_with_body(
    client: reqwest::Client,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Answer {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let url = url.to_string();
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    crate::support::block_on(async move {
        let mut req = client.request(method, &url);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        if !body.is_empty() {
            req = req.body(body);
        }
        let resp = req.send().await.unwrap_or_else(|e| panic!("{url}: {e:?}"));
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
        Answer {
            status,
            headers,
            body,
        }
    })
}

pub fn get(url: &str) -> Answer {
    request("GET", url, &[])
}

/// GET `url` with `headers` from `n` clients at once; each answer's status and body.
pub fn concurrent_gets(url: &str, headers: &[(&str, &str)], n: usize) -> Vec<(u16, Vec<u8>)> {
    let url = url.to_string();
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    crate::support::block_on(async move {
        let client = crate::support::http_client(None);
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let mut request = client.get(&url);
                for (k, v) in &headers {
                    request = request.header(k, v);
                }
                tokio::spawn(async move {
                    let resp = request.send().await.expect("send");
                    let status = resp.status().as_u16();
                    let body = resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
                    (status, body)
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("task"));
        }
        out
    })
}

/// Accept lines a registry client sends for manifests.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// Send a raw HTTP/1.1 request line (for paths an HTTP client would normalise, like `/../`)
/// and return the status and body.
pub fn raw_get(addr: &str, path: &str) -> Answer {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read");
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut headers = reqwest::header::HeaderMap::new();
    for line in head.lines().skip(1) {
        if let Some((k, v)) = line.split_once(':') {
            if let (Ok(k), Ok(v)) = (
                reqwest::header::HeaderName::from_bytes(k.trim().as_bytes()),
                reqwest::header::HeaderValue::from_str(v.trim()),
            ) {
                headers.insert(k, v);
            }
        }
    }
    Answer {
        status,
        headers,
        body: body.as_bytes().to_vec(),
    }
}
