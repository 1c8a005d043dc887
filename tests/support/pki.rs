//! A throwaway PKI: one CA and server certificates for loopback, written to a temp dir so real
//! clients (skopeo, ctr, distribution) can read them by path.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

/// CA + server certificate for 127.0.0.1, ::1 and "localhost".
pub struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
    ca_params: CertificateParams,
    ca_key: KeyPair,
    server_cert: PathBuf,
    server_key: PathBuf,
    issued: AtomicUsize,
}

impl Pki {
    /// Generates the CA and the loopback server certificate (ECDSA P-256).
    pub fn new() -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("pki-")
            .tempdir()
            .expect("tempdir");
        let ca_key = KeyPair::generate().expect("ca key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "pullgate test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_pem = ca_params.self_signed(&ca_key).expect("ca cert").pem();
        std::fs::write(dir.path().join("ca.crt"), &ca_pem).expect("write ca");
        let clients = dir.path().join("clients");
        std::fs::create_dir_all(&clients).expect("mkdir");
        std::fs::write(clients.join("ca.crt"), &ca_pem).expect("write ca");
        let mut pki = Pki {
            dir,
            ca_pem,
            ca_params,
            ca_key,
            server_cert: PathBuf::new(),
            server_key: PathBuf::new(),
            issued: AtomicUsize::new(0),
        };
        let (c, k) = pki.issue(&["127.0.0.1", "::1", "localhost"]);
        pki.server_cert = c;
        pki.server_key = k;
        pki
    }

    /// Issues a server certificate for more names (IPs or DNS names); returns (cert, key) paths.
    /// The cert file holds the leaf only; clients trust the CA.
    pub fn issue(&self, names: &[&str]) -> (PathBuf, PathBuf) {
        let n = self.issued.fetch_add(1, Ordering::SeqCst);
        let key = KeyPair::generate().expect("key");
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("params");
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("server"),
        );
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).expect("sign");
        let cert_path = self.dir.path().join(format!("server-{n}.crt"));
        let key_path = self.dir.path().join(format!("server-{n}.key"));
        std::fs::write(&cert_path, cert.pem()).expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        (cert_path, key_path)
    }

    /// Issues a client certificate (clientAuth) with CN `name`, and `name` as a DNS SAN when
    /// it is a DNS name; returns (cert, key) paths. For listeners whose `client_ca` is this CA.
    pub fn issue_client(&self, name: &str) -> (PathBuf, PathBuf) {
        let n = self.issued.fetch_add(1, Ordering::SeqCst);
        let key = KeyPair::generate().expect("key");
        let sans = if name.contains(' ') {
            Vec::new()
        } else {
            vec![name.to_string()]
        };
        let mut params = CertificateParams::new(sans).expect("params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).expect("sign");
        let cert_path = self.dir.path().join(format!("client-{n}.crt"));
        let key_path = self.dir.path().join(format!("client-{n}.key"));
        std::fs::write(&cert_path, cert.pem()).expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        (cert_path, key_path)
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
    /// The loopback server certificate (PEM) and key (PKCS#8 PEM).
    pub fn server_cert_path(&self) -> &Path {
        &self.server_cert
    }
    pub fn server_key_path(&self) -> &Path {
        &self.server_key
    }
    /// A dir holding only `ca.crt`: what skopeo's `--src-cert-dir`/`--dest-cert-dir` and
    /// docker's `certs.d/<host>` expect.
    pub fn cert_dir_for_clients(&self) -> PathBuf {
        self.dir.path().join("clients")
    }

    /// A rustls server config with the loopback certificate, ALPN h2 + http/1.1.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.server_config_for(&self.server_cert, &self.server_key)
    }

    /// A rustls server config for a cert/key pair from [`Pki::issue`].
    pub fn server_config_for(&self, cert: &Path, key: &Path) -> Arc<rustls::ServerConfig> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        super::install_crypto_provider();
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .expect("cert pem")
            .map(|c| c.expect("cert"))
            .collect();
        let key = PrivateKeyDer::from_pem_file(key).expect("key pem");
        let mut cfg = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server config");
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(cfg)
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}
