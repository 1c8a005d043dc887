//! A limit for W3's small answers: Pingora itself, answering from memory. The bench binary
//! started with [`FLAG`] serves the files nginx-static serves, held in memory, from
//! `request_filter`, on the Pingora build, thread count and connection write buffer pullgate
//! runs on, with the response head pullgate gives a warm HEAD or GET (content type, digest,
//! length, API version). What pullgate spends above this is its own work (routing, policy, the
//! cache lookup, logs, metrics); what this spends above nginx-static is Pingora's.

use std::collections::HashMap;
use std::path::Path;

use async_trait::async_trait;
use bytes::Bytes;
use http::{header, Method};
use pingora::http::ResponseHeader;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::prelude::*;
use sha2::{Digest as _, Sha256};

/// The first argument that turns the bench binary into this server: `FLAG <dir> <addr>`.
pub const FLAG: &str = "--serve-pingora-static";

/// One file's answer.
struct File {
    body: Bytes,
    media_type: &'static str,
    digest: String,
}

struct Static {
    files: HashMap<String, File>,
}

#[async_trait]
impl ProxyHttp for Static {
    type CTX = ();

    fn new_ctx(&self) {}

    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {
        // None, as pullgate.
    }

    async fn request_filter(&self, session: &mut Session, _ctx: &mut ()) -> Result<bool> {
        let req = session.req_header();
        let head_only = req.method == Method::HEAD;
        let Some(file) = self.files.get(req.uri.path().trim_start_matches('/')) else {
            let mut resp = ResponseHeader::build(404, Some(1))?;
            resp.insert_header(header::CONTENT_LENGTH, 0)?;
            session.write_response_header(Box::new(resp), true).await?;
            return Ok(true);
        };
        let mut resp = ResponseHeader::build(200, Some(4))?;
        resp.insert_header("Docker-Distribution-API-Version", "registry/2.0")?;
        resp.insert_header(header::CONTENT_TYPE, file.media_type)?;
        resp.insert_header("Docker-Content-Digest", file.digest.as_str())?;
        resp.insert_header(header::CONTENT_LENGTH, file.body.len())?;
        session
            .write_response_header(Box::new(resp), head_only)
            .await?;
        if !head_only {
            session
                .write_response_body(Some(file.body.clone()), true)
                .await?;
        }
        Ok(true)
    }

    async fn upstream_peer(&self, _: &mut Session, _: &mut ()) -> Result<Box<HttpPeer>> {
        Err(Error::new(ErrorType::InternalError))
    }
}

/// Serves the small files of `dir` on `addr` until killed.
pub fn run(dir: &Path, addr: &str) -> ! {
    let mut files = HashMap::new();
    for entry in std::fs::read_dir(dir).expect("read the static folder") {
        let path = entry.expect("static folder entry").path();
        let meta = std::fs::metadata(&path).expect("stat a static file");
        // W3 asks for the small blob and the manifest; the big ones are W1/W2's.
        if meta.len() > 1 << 20 {
            continue;
        }
        let body = Bytes::from(std::fs::read(&path).expect("read a static file"));
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let media_type = match name.as_str() {
            "manifest" => "application/vnd.oci.image.manifest.v1+json",
            _ => "application/octet-stream",
        };
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
        files.insert(
            name,
            File {
                body,
                media_type,
                digest,
            },
        );
    }
    let conf = pingora::server::configuration::ServerConf {
        // pullgate's `server.threads` in the bench (its default).
        threads: 2,
        ..Default::default()
    };
    let mut server = pingora::server::Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut service = pingora::proxy::http_proxy_service(&server.configuration, Static { files });
    service.add_listener(
        ListenerConfig::tcp(addr.to_string())
            .l4_buffer(L4BufferSettings::default().write(pullgate::listen::WRITE_BUFFER)),
    );
    server.add_service(service);
    server.run_forever()
}
