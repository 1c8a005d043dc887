//! Where the upstream credentials come from: inline, environment, a file, a docker
//! `config.json`, or a docker credential helper.
//!
//! Sources that can change under a running gateway (files, docker config, helpers) are re-read
//! when their file changes or, for helpers, after a few minutes, so rotated secrets take effect
//! without a restart. Every value is a `Secret`; errors name the source, never the secret.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use tokio::io::AsyncWriteExt;

use crate::config::{CredentialSource, PasswordSource};
use crate::secret::Secret;

/// A credential ready to present upstream.
#[derive(Debug, Clone)]
pub enum Credential {
    Basic {
        username: String,
        password: Secret,
    },
    /// An OAuth2 refresh token (docker's `identitytoken`, or a helper's `<token>` user).
    IdentityToken(Secret),
}

impl Credential {
    /// The value of an `Authorization: Basic` header.
    pub fn basic_header(&self) -> Option<Secret> {
        match self {
            Credential::Basic { username, password } => {
                let raw = format!("{username}:{}", password.expose());
                let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
                Some(Secret::new(format!("Basic {b64}")))
            }
            Credential::IdentityToken(_) => None,
        }
    }
}

/// How long a credential helper's answer is reused.
const HELPER_TTL: Duration = Duration::from_secs(300);
/// A helper that has not answered by then is killed.
const HELPER_TIMEOUT: Duration = Duration::from_secs(30);

/// Resolves a registry's `CredentialSource` to a `Credential`, caching what is costly to read.
#[derive(Debug)]
pub struct CredentialProvider {
    source: Option<CredentialSource>,
    /// `host[:port]` as docker config files and helpers key it.
    server: String,
    cached: Mutex<Option<Cached>>,
}

#[derive(Debug, Clone)]
struct Cached {
    credential: Option<Credential>,
    /// File modification time it was read at, for file-backed sources.
    mtime: Option<SystemTime>,
    read_at: Instant,
}

impl CredentialProvider {
    pub fn new(source: Option<CredentialSource>, server: String) -> Self {
        CredentialProvider {
            source,
            server,
            cached: Mutex::new(None),
        }
    }

    pub fn is_anonymous(&self) -> bool {
        self.source.is_none()
    }

    /// The credential to use now; `Ok(None)` for anonymous access.
    pub async fn get(&self) -> Result<Option<Credential>, String> {
        let Some(source) = &self.source else {
            return Ok(None);
        };
        match source {
            CredentialSource::Basic { username, password } => match password {
                PasswordSource::Inline(p) | PasswordSource::Env { value: p, .. } => {
                    Ok(Some(Credential::Basic {
                        username: username.clone(),
                        password: p.clone(),
                    }))
                }
                PasswordSource::File(path) => {
                    let username = username.clone();
                    self.read_file(path, move |text| {
                        Ok(Some(Credential::Basic {
                            username,
                            password: Secret::new(text.trim_end_matches(['\n', '\r'])),
                        }))
                    })
                    .await
                }
            },
            CredentialSource::DockerConfig { path } => {
                if let Some(helper) = self.docker_config_helper(path).await? {
                    return self.ask_helper(&helper).await;
                }
                let server = self.server.clone();
                self.read_file(path, move |text| docker_config_auth(&text, &server))
                    .await
            }
            CredentialSource::Helper { name } => self.ask_helper(name).await,
        }
    }

    /// Forget what was cached (after the upstream rejected it), so the next use reads again.
    pub fn invalidate(&self) {
        *self.cached.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    async fn read_file(
        &self,
        path: &Path,
        parse: impl FnOnce(String) -> Result<Option<Credential>, String>,
    ) -> Result<Option<Credential>, String> {
        let mtime = tokio::fs::metadata(path)
            .await
            .and_then(|m| m.modified())
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if let Some(c) = self.cached_if(|c| c.mtime == Some(mtime)) {
            return Ok(c);
        }
        let text = tokio::fs::read_to_string(path)
            .await
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let credential = parse(text)?;
        self.store(credential.clone(), Some(mtime));
        Ok(credential)
    }

    async fn ask_helper(&self, name: &str) -> Result<Option<Credential>, String> {
        if let Some(c) = self.cached_if(|c| c.read_at.elapsed() < HELPER_TTL) {
            return Ok(c);
        }
        let credential = run_helper(name, &self.server).await?;
        self.store(credential.clone(), None);
        Ok(credential)
    }

    /// A `credHelpers` entry for this server, or `credsStore`, in a docker config file.
    async fn docker_config_helper(&self, path: &Path) -> Result<Option<String>, String> {
        let text = tokio::fs::read_to_string(path)
            .await
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("{} is not valid JSON: {e}", path.display()))?;
        if let Some(h) = json
            .get("credHelpers")
            .and_then(|h| h.get(&self.server))
            .and_then(|h| h.as_str())
        {
            return Ok(Some(h.to_string()));
        }
        let has_auth = docker_config_auth(&text, &self.server)?.is_some();
        Ok(match json.get("credsStore").and_then(|s| s.as_str()) {
            Some(store) if !has_auth => Some(store.to_string()),
            _ => None,
        })
    }

    fn cached_if(&self, fresh: impl Fn(&Cached) -> bool) -> Option<Option<Credential>> {
        let cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        cached
            .as_ref()
            .filter(|c| fresh(c))
            .map(|c| c.credential.clone())
    }

    fn store(&self, credential: Option<Credential>, mtime: Option<SystemTime>) {
        *self.cached.lock().unwrap_or_else(|e| e.into_inner()) = Some(Cached {
            credential,
            mtime,
            read_at: Instant::now(),
        });
    }
}

/// The keys a docker config may file a registry under.
fn docker_config_keys(server: &str) -> Vec<String> {
    let host = server.split(':').next().unwrap_or(server);
    let mut keys = vec![
        server.to_string(),
        format!("https://{server}"),
        format!("https://{server}/v1/"),
        format!("https://{server}/v2/"),
        format!("http://{server}"),
    ];
    if matches!(
        host,
        "registry-1.docker.io" | "docker.io" | "index.docker.io" | "registry.hub.docker.com"
    ) {
        keys.insert(0, "https://index.docker.io/v1/".to_string());
        keys.push("docker.io".to_string());
        keys.push("index.docker.io".to_string());
    }
    keys
}

/// The `auths` entry of a docker `config.json` for `server`.
pub fn docker_config_auth(text: &str, server: &str) -> Result<Option<Credential>, String> {
    let json: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("docker config is not valid JSON: {e}"))?;
    let Some(auths) = json.get("auths").and_then(|a| a.as_object()) else {
        return Ok(None);
    };
    let Some(entry) = docker_config_keys(server)
        .iter()
        .find_map(|k| auths.get(k.as_str()))
    else {
        return Ok(None);
    };
    let field = |k: &str| {
        entry
            .get(k)
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
    };
    if let Some(token) = field("identitytoken") {
        return Ok(Some(Credential::IdentityToken(Secret::new(token))));
    }
    if let (Some(u), Some(p)) = (field("username"), field("password")) {
        return Ok(Some(Credential::Basic {
            username: u.to_string(),
            password: Secret::new(p),
        }));
    }
    if let Some(auth) = field("auth") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|_| format!("docker config entry for {server}: `auth` is not base64"))?;
        let decoded = String::from_utf8(decoded)
            .map_err(|_| format!("docker config entry for {server}: `auth` is not UTF-8"))?;
        let (u, p) = decoded.split_once(':').ok_or_else(|| {
            format!("docker config entry for {server}: `auth` is not user:password")
        })?;
        return Ok(Some(Credential::Basic {
            username: u.to_string(),
            password: Secret::new(p),
        }));
    }
    Ok(None)
}

/// Run `docker-credential-<name> get` with the server on stdin (the docker credential-helper
/// protocol). "credentials not found" means anonymous.
async fn run_helper(name: &str, server: &str) -> Result<Option<Credential>, String> {
    let program = PathBuf::from(format!("docker-credential-{name}"));
    let mut child = tokio::process::Command::new(&program)
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(server.as_bytes())
            .await
            .map_err(|e| format!("{}: writing stdin: {e}", program.display()))?;
    }
    let output = tokio::time::timeout(HELPER_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| {
            format!(
                "{} did not answer within {HELPER_TIMEOUT:?}",
                program.display()
            )
        })?
        .map_err(|e| format!("{}: {e}", program.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        if stdout.contains("credentials not found") {
            return Ok(None);
        }
        // The helper's stderr may echo what it was given, never a secret we hold; still, keep
        // it short.
        let err: String = String::from_utf8_lossy(&output.stderr)
            .chars()
            .take(200)
            .collect();
        return Err(format!(
            "{} failed ({}): {err}",
            program.display(),
            output.status
        ));
    }
    parse_helper_output(&stdout).map(Some)
}

fn parse_helper_output(stdout: &str) -> Result<Credential, String> {
    #[derive(serde::Deserialize)]
    struct Out {
        #[serde(rename = "Username")]
        username: String,
        #[serde(rename = "Secret")]
        secret: String,
    }
    let out: Out = serde_json::from_str(stdout).map_err(|_| {
        "credential helper printed something that is not its JSON answer".to_string()
    })?;
    if out.username == "<token>" {
        Ok(Credential::IdentityToken(Secret::new(out.secret)))
    } else {
        Ok(Credential::Basic {
            username: out.username,
            password: Secret::new(out.secret),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_docker_config_auths() {
        let cfg = r#"{"auths":{"ghcr.io":{"auth":"dXNlcjpwYXNzOndpdGg6Y29sb25z"},
            "https://index.docker.io/v1/":{"username":"hub","password":"pw"},
            "quay.io":{"identitytoken":"refresh"}}}"#;
        match docker_config_auth(cfg, "ghcr.io").unwrap() {
            Some(Credential::Basic { username, password }) => {
                assert_eq!(username, "user");
                assert_eq!(password.expose(), "pass:with:colons");
            }
            other => panic!("{other:?}"),
        }
        match docker_config_auth(cfg, "registry-1.docker.io").unwrap() {
            Some(Credential::Basic { username, .. }) => assert_eq!(username, "hub"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            docker_config_auth(cfg, "quay.io").unwrap(),
            Some(Credential::IdentityToken(_))
        ));
        assert!(docker_config_auth(cfg, "gcr.io").unwrap().is_none());
        assert!(docker_config_auth("not json", "gcr.io").is_err());
    }

    #[test]
    fn errors_never_contain_the_secret() {
        let cfg = r#"{"auths":{"ghcr.io":{"auth":"c2VjcmV0LXdpdGhvdXQtY29sb24="}}}"#;
        let err = docker_config_auth(cfg, "ghcr.io").unwrap_err();
        assert!(!err.contains("secret-without-colon"), "{err}");
    }

    #[test]
    fn parses_helper_answers() {
        match parse_helper_output(r#"{"ServerURL":"x","Username":"AWS","Secret":"tok"}"#).unwrap() {
            Credential::Basic { username, password } => {
                assert_eq!(username, "AWS");
                assert_eq!(password.expose(), "tok");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_helper_output(r#"{"Username":"<token>","Secret":"r"}"#).unwrap(),
            Credential::IdentityToken(_)
        ));
        assert!(parse_helper_output("garbage").is_err());
    }

    #[tokio::test]
    async fn password_file_is_reread_when_it_changes() {
        let dir = std::env::temp_dir().join(format!("pullgate-cred-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pw");
        std::fs::write(&path, "first\n").unwrap();
        let provider = CredentialProvider::new(
            Some(CredentialSource::Basic {
                username: "u".into(),
                password: PasswordSource::File(path.clone()),
            }),
            "example.com".into(),
        );
        let pw = |c: Option<Credential>| match c {
            Some(Credential::Basic { password, .. }) => password.expose().to_string(),
            other => panic!("{other:?}"),
        };
        assert_eq!(pw(provider.get().await.unwrap()), "first");
        // A different modification time marks the change, whatever the clock resolution.
        std::fs::write(&path, "second\n").unwrap();
        let later = SystemTime::now() + Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert_eq!(pw(provider.get().await.unwrap()), "second");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
