//! A real S3-compatible server on a free loopback port: `s3s-fs` (crates.io; it keeps each
//! bucket as a directory and speaks the S3 HTTP API with SigV4), which tests/install-deps.sh
//! builds into `target/tools/bin`. Started and stopped by PID.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{can_connect, free_port, wait_until, ChildGuard};

pub const BUCKET: &str = "pullgate-cache";
pub const ACCESS_KEY: &str = "pullgate-test";
const SECRET_KEY: &str = "pullgate-test-secret-0123456789";
/// The environment variable the configs written by [`S3Server::l2_table`] name.
pub const ACCESS_KEY_ENV: &str = "PULLGATE_TEST_S3_KEY";

pub struct S3Server {
    pub port: u16,
    root: PathBuf,
    server: Option<ChildGuard>,
}

/// `$PULLGATE_S3S_FS`, else the one install-deps.sh built, else `s3s-fs` on PATH.
pub fn s3s_fs_bin() -> PathBuf {
    if let Ok(path) = std::env::var("PULLGATE_S3S_FS") {
        return PathBuf::from(path);
    }
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/bin/s3s-fs");
    if built.is_file() {
        return built;
    }
    PathBuf::from("s3s-fs")
}

impl S3Server {
    /// A server on a new directory under `dir` with the bucket [`BUCKET`].
    pub fn start(dir: &Path) -> S3Server {
        let root = dir.join("s3");
        std::fs::create_dir_all(root.join(BUCKET)).expect("bucket directory");
        let mut s3 = S3Server {
            port: free_port(),
            root,
            server: None,
        };
        s3.restart();
        s3
    }

    /// Starts it again on the same port and directory (after [`S3Server::stop`]).
    pub fn restart(&mut self) {
        let child = Command::new(s3s_fs_bin())
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&self.root)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("s3s-fs starts (tests/install-deps.sh builds it into target/tools/bin)");
        self.server = Some(ChildGuard::new(child));
        let addr = format!("127.0.0.1:{}", self.port).parse().unwrap();
        wait_until(Duration::from_secs(20), "s3s-fs listening", || {
            can_connect(addr)
        })
        .expect("s3s-fs listens");
    }

    /// An outage: the server is killed (by PID).
    pub fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            server.kill();
        }
    }

    /// A `[cache.l2]` table for this server; the secret goes to a file under `dir`, the key id
    /// is read from [`ACCESS_KEY_ENV`] (set it to [`ACCESS_KEY`] on the child).
    pub fn l2_table(&self, dir: &Path) -> String {
        let secret = dir.join("s3.secret");
        std::fs::write(&secret, SECRET_KEY).expect("secret file");
        format!(
            "[cache.l2]\nurl = \"s3://{BUCKET}/cache\"\nendpoint = \"http://127.0.0.1:{}\"\n\
             region = \"us-east-1\"\naccess_key_id_env = \"{ACCESS_KEY_ENV}\"\n\
             secret_access_key_file = \"{}\"\n",
            self.port,
            secret.display()
        )
    }

    /// Where the object of `digest` ("sha256:...") lives on disk.
    pub fn blob_object(&self, digest: &str) -> PathBuf {
        let (algorithm, hex) = digest.split_once(':').expect("algorithm:hex");
        self.root
            .join(BUCKET)
            .join("cache/blobs")
            .join(algorithm)
            .join(hex)
    }
}
