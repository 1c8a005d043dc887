//! TLS listeners (`[[server.tls]]`): server certificates chosen by SNI and re-read when their
//! files change, and client certificates whose names become identities.
//!
//! Owns: reading PEM files (rustls-pemfile), the SNI table (exact names, then `*.` wildcards,
//! then the listener's first pair), the background task that re-reads certificates (every
//! [`POLL_INTERVAL`] and on SIGHUP), the client-certificate verifier for `client_ca`, and the
//! handshake callback that hands a verified certificate's CN and DNS SANs to the gateway as
//! [`ClientCertSubjects`]. Must never: log or return key material (errors name files and config
//! keys only), or serve a half-loaded pair (a broken new file keeps the pair in use).

use std::any::Any;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::TlsAccept;
use pingora::protocols::tls::TlsRef;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;

use crate::config::model::{CertPair, TlsListener};
use crate::gateway::ClientCertSubjects;
use crate::metrics::Metrics;

/// How often certificate files are checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Everything one `[[server.tls]]` listener needs: the Pingora settings to listen with, and
/// the resolver the reload task refreshes.
pub struct Prepared {
    pub settings: TlsSettings,
    pub resolver: Arc<CertResolver>,
}

/// Loads the certificates (and `client_ca`) of `server.tls[index]` and builds its settings:
/// TLS 1.2 and 1.3 (Pingora's fixed set), ALPN h2 then http/1.1. Errors name the config key.
pub fn prepare(
    index: usize,
    listener: &TlsListener,
    metrics: Arc<Metrics>,
) -> Result<Prepared, String> {
    let key = format!("server.tls[{index}]");
    let resolver = Arc::new(CertResolver::load(&key, &listener.certs)?);
    let callbacks = Box::new(ClientIdentity { metrics });
    let mut settings = TlsSettings::with_callbacks(callbacks)
        .map_err(|e| format!("{key}: cannot set up TLS: {e}"))?;
    settings.set_cert_resolver(resolver.clone());
    if let Some(ca) = &listener.client_ca {
        settings.set_client_cert_verifier(client_verifier(&key, ca, listener.require_client_cert)?);
    }
    settings.enable_h2();
    Ok(Prepared { settings, resolver })
}

/// Reads every PEM file of every TLS listener the way serving would, without serving: what
/// `pullgate check` adds to the config validation. One message per problem, naming the key.
pub fn check_files(listeners: &[TlsListener]) -> Vec<String> {
    let mut errors = Vec::new();
    for (i, listener) in listeners.iter().enumerate() {
        for (j, pair) in listener.certs.iter().enumerate() {
            if let Err(e) = load_pair(&format!("server.tls[{i}].certs[{j}]"), pair) {
                errors.push(e);
            }
        }
        if let Some(ca) = &listener.client_ca {
            let key = format!("server.tls[{i}]");
            if let Err(e) = client_verifier(&key, ca, listener.require_client_cert) {
                errors.push(e);
            }
        }
    }
    errors
}

// ---------------------------------------------------------------------------------------------
// Server certificates

/// One certificate chain with its key, ready for rustls, and the names it answers for.
#[derive(Debug)]
struct LoadedCert {
    certified: Arc<CertifiedKey>,
    /// DNS names from the leaf's subjectAltName, lowercased; `*.` names are wildcards.
    names: Vec<String>,
    not_after: String,
}

/// What a file looked like when it was last read: a change in any field means "read again".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
    device: u64,
}

fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    // `metadata` follows symlinks, so a Kubernetes secret volume's `..data` swap shows up as
    // a new inode.
    let meta = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        inode: meta.ino(),
        device: meta.dev(),
    })
}

/// A configured pair and the certificate it currently serves.
#[derive(Debug)]
struct Slot {
    key: String,
    pair: CertPair,
    current: LoadedCert,
    /// The files as they were at the last attempt to read them (successful or not), so that
    /// a broken file is reported once, not at every poll.
    seen: (Option<FileStamp>, Option<FileStamp>),
}

/// Lookup tables for the handshake, rebuilt whenever a pair is reloaded.
#[derive(Debug)]
struct CertTable {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` is stored as `example.com` and matches exactly one more label.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl CertTable {
    /// Earlier pairs win a name claimed twice; the first pair is the default.
    fn build(slots: &[Slot]) -> CertTable {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for slot in slots {
            for name in &slot.current.names {
                let (map, key) = match name.strip_prefix("*.") {
                    Some(parent) => (&mut wildcard, parent),
                    None => (&mut exact, name.as_str()),
                };
                map.entry(key.to_owned())
                    .or_insert_with(|| slot.current.certified.clone());
            }
        }
        CertTable {
            exact,
            wildcard,
            default: slots[0].current.certified.clone(),
        }
    }

    fn pick(&self, server_name: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = server_name.map(normalize_name) else {
            return self.default.clone();
        };
        if let Some(found) = self.exact.get(&name) {
            return found.clone();
        }
        name.split_once('.')
            .and_then(|(_, parent)| self.wildcard.get(parent))
            .unwrap_or(&self.default)
            .clone()
    }
}

fn normalize_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// The certificates of one listener: answers rustls during handshakes and re-reads its files
/// on demand ([`CertResolver::refresh`]).
#[derive(Debug)]
pub struct CertResolver {
    listener: String,
    slots: Mutex<Vec<Slot>>,
    table: RwLock<Arc<CertTable>>,
}

/// What a [`CertResolver::refresh`] did: the keys of pairs reloaded, and the problems of pairs
/// that changed but could not be read (those keep their previous certificate).
#[derive(Debug, Default)]
pub struct Refresh {
    pub reloaded: Vec<String>,
    pub failed: Vec<String>,
}

impl CertResolver {
    /// Loads every pair; any failure is an error naming its key (`server.tls[i].certs[j]`).
    pub fn load(listener: &str, pairs: &[CertPair]) -> Result<CertResolver, String> {
        if pairs.is_empty() {
            return Err(format!("{listener}.certs: at least one pair is required"));
        }
        let mut slots = Vec::with_capacity(pairs.len());
        for (j, pair) in pairs.iter().enumerate() {
            let key = format!("{listener}.certs[{j}]");
            let seen = (stamp(&pair.cert), stamp(&pair.key));
            let current = load_pair(&key, pair)?;
            log_loaded(&key, &current, "certificate loaded");
            slots.push(Slot {
                key,
                pair: pair.clone(),
                current,
                seen,
            });
        }
        let table = CertTable::build(&slots);
        Ok(CertResolver {
            listener: listener.to_owned(),
            slots: Mutex::new(slots),
            table: RwLock::new(Arc::new(table)),
        })
    }

    /// Re-reads the pairs whose files changed since they were last read (all of them with
    /// `force`). A pair that fails keeps serving its previous certificate, and the reason is
    /// logged with its key.
    pub fn refresh(&self, force: bool) -> Refresh {
        let mut report = Refresh::default();
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        for slot in slots.iter_mut() {
            let seen = (stamp(&slot.pair.cert), stamp(&slot.pair.key));
            if !force && seen == slot.seen {
                continue;
            }
            slot.seen = seen;
            match load_pair(&slot.key, &slot.pair) {
                Ok(loaded) => {
                    log_loaded(&slot.key, &loaded, "certificate reloaded");
                    slot.current = loaded;
                    report.reloaded.push(slot.key.clone());
                }
                Err(e) => {
                    tracing::error!(
                        key = %slot.key,
                        "keeping the certificate in use: the new files cannot be used: {e}"
                    );
                    report.failed.push(e);
                }
            }
        }
        if !report.reloaded.is_empty() {
            let table = Arc::new(CertTable::build(&slots));
            *self.table.write().unwrap_or_else(|p| p.into_inner()) = table;
        }
        report
    }

    /// The certificate chain a client naming `server_name` (SNI) gets.
    pub fn chain_for(&self, server_name: Option<&str>) -> Vec<CertificateDer<'static>> {
        self.current_table().pick(server_name).cert.clone()
    }

    fn current_table(&self) -> Arc<CertTable> {
        self.table.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// `server.tls[i]`, for logs.
    pub fn listener(&self) -> &str {
        &self.listener
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current_table().pick(hello.server_name()))
    }
}

fn log_loaded(key: &str, cert: &LoadedCert, what: &str) {
    tracing::info!(key, names = ?cert.names, not_after = %cert.not_after, "{what}");
}

/// Reads one cert/key pair: the chain (leaf first), the private key (PKCS#8, PKCS#1 or SEC1),
/// and checks that they belong together.
fn load_pair(key: &str, pair: &CertPair) -> Result<LoadedCert, String> {
    let chain = read_certs(&format!("{key}.cert"), &pair.cert)?;
    let private = read_key(&format!("{key}.key"), &pair.key)?;
    let provider = rustls::crypto::ring::default_provider();
    let certified = CertifiedKey::from_der(chain, private, &provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => format!(
            "{key}: the key in {} does not belong to the certificate in {}",
            pair.key.display(),
            pair.cert.display()
        ),
        other => format!(
            "{key}.key: {} holds a key that cannot be used: {other}",
            pair.key.display()
        ),
    })?;
    let leaf = X509Facts::parse(&certified.cert[0])
        .map_err(|e| format!("{key}.cert: {}: {e}", pair.cert.display()))?;
    if leaf.dns_names.is_empty() {
        tracing::warn!(
            key,
            "the certificate names no DNS host (subjectAltName): it can only be the default"
        );
    }
    if !leaf.valid_now {
        tracing::warn!(key, not_after = %leaf.not_after, "the certificate is not valid now");
    }
    Ok(LoadedCert {
        certified: Arc::new(certified),
        names: leaf.dns_names.iter().map(|n| normalize_name(n)).collect(),
        not_after: leaf.not_after,
    })
}

fn read_file(key: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{key}: cannot read {}: {e}", path.display()))
}

/// Every CERTIFICATE block of a PEM file; none is an error.
fn read_certs(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read_file(key, path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{key}: {} is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{key}: {} holds no PEM CERTIFICATE block",
            path.display()
        ));
    }
    Ok(certs)
}

/// The first private key of a PEM file; none is an error. The error never quotes the file.
fn read_key(key: &str, path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read_file(key, path)?;
    match rustls_pemfile::private_key(&mut pem.as_slice()) {
        Ok(Some(k)) => Ok(k),
        Ok(None) => Err(format!(
            "{key}: {} holds no PEM private key (PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)",
            path.display()
        )),
        Err(e) => Err(format!("{key}: {} is not valid PEM: {e}", path.display())),
    }
}

/// What pullgate reads from an X.509 certificate.
#[derive(Debug)]
struct X509Facts {
    common_names: Vec<String>,
    dns_names: Vec<String>,
    not_after: String,
    valid_now: bool,
}

impl X509Facts {
    fn parse(der: &[u8]) -> Result<X509Facts, String> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("not a usable X.509 certificate: {e}"))?;
        let common_names = cert
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok())
            .map(str::to_owned)
            .collect();
        let dns_names = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(name) => Some((*name).to_owned()),
                    _ => None,
                })
                .collect(),
            Ok(None) => Vec::new(),
            Err(e) => return Err(format!("unreadable subjectAltName: {e}")),
        };
        Ok(X509Facts {
            common_names,
            dns_names,
            not_after: cert.validity().not_after.to_string(),
            valid_now: cert.validity().is_valid(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Client certificates

/// Verifies client certificates against `client_ca`. Without `require`, a client may send
/// none (and stays anonymous); a certificate that does not verify always fails the handshake.
fn client_verifier(
    listener: &str,
    ca: &Path,
    require: bool,
) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let key = format!("{listener}.client_ca");
    let mut roots = RootCertStore::empty();
    for cert in read_certs(&key, ca)? {
        roots.add(cert).map_err(|e| {
            format!(
                "{key}: {} holds an unusable CA certificate: {e}",
                ca.display()
            )
        })?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
    if !require {
        builder = builder.allow_unauthenticated();
    }
    builder
        .build()
        .map_err(|e| format!("{key}: cannot verify clients with {}: {e}", ca.display()))
}

/// The names policy matches `mtls_subject` against: the subject CNs, then the DNS SANs, each
/// once. Empty when the certificate cannot be parsed (it was verified, so that is unusual).
pub fn certificate_subjects(der: &[u8]) -> Vec<String> {
    let Ok(facts) = X509Facts::parse(der) else {
        return Vec::new();
    };
    let mut out: Vec<String> = Vec::new();
    for name in facts.common_names.into_iter().chain(facts.dns_names) {
        if !name.is_empty() && !out.iter().any(|n| n.eq_ignore_ascii_case(&name)) {
            out.push(name);
        }
    }
    out
}

/// After a handshake: the verified client certificate's names, for the gateway to read from
/// the session's TLS digest. rustls verified the chain before this runs; no certificate means
/// no identity.
struct ClientIdentity {
    metrics: Arc<Metrics>,
}

#[async_trait]
impl TlsAccept for ClientIdentity {
    async fn handshake_complete_callback(
        &self,
        tls: &TlsRef,
    ) -> Option<Arc<dyn Any + Send + Sync>> {
        // Failed handshakes never reach this callback; Pingora logs them.
        self.metrics.tls_handshakes.with_label_values(&["ok"]).inc();
        let subjects = certificate_subjects(tls.peer_certificate_der()?);
        if subjects.is_empty() {
            return None;
        }
        Some(Arc::new(ClientCertSubjects(subjects)))
    }
}

// ---------------------------------------------------------------------------------------------
// Reloading

/// Re-reads certificates: on each poll ([`POLL_INTERVAL`], driven by the reload service) the
/// files whose modification time, size or inode changed, and on SIGHUP all of them.
pub struct CertReloader {
    resolvers: Vec<Arc<CertResolver>>,
}

impl CertReloader {
    pub fn new(resolvers: Vec<Arc<CertResolver>>) -> CertReloader {
        CertReloader { resolvers }
    }

    /// How many TLS listeners it looks after.
    pub fn listeners(&self) -> usize {
        self.resolvers.len()
    }

    pub fn refresh_all(&self, force: bool) {
        if force && self.resolvers.is_empty() {
            tracing::info!("SIGHUP: no [[server.tls]] listener, nothing to reload");
        }
        for resolver in &self.resolvers {
            let report = resolver.refresh(force);
            if force && report.reloaded.is_empty() && report.failed.is_empty() {
                tracing::info!(listener = resolver.listener(), "no certificate to reload");
            }
        }
    }
}

#[cfg(test)]
mod tests;
