//! `pullgate dev-certs`: a development CA and certificates for TLS listeners and mTLS clients.
//!
//! Writes into one directory: `ca.crt` + `ca.key` (made once and reused by later runs, so new
//! certificates chain to a CA clients already trust), `<name>.crt` + `<name>.key` for the server
//! (its DNS names, wildcards and IP addresses as subjectAltNames), and `client-<id>.crt` +
//! `client-<id>.key` per client identity (CN and DNS SAN `<id>`, for `mtls_subject`). Keys are
//! ECDSA P-256, written with mode 0600 and never printed. For development and tests only: a
//! production endpoint uses certificates from the organisation's CA.

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData,
};

/// The CA's subject; a `ca.crt` with another subject was not made here and is not reused.
const CA_NAME: &str = "pullgate development CA";
const CA_DAYS: i64 = 3650;
const LEAF_DAYS: i64 = 397;

/// What to make.
#[derive(Debug, Clone)]
pub struct Request {
    pub out: PathBuf,
    /// DNS names (`*.x` allowed) and IP addresses for the server certificate; none makes no
    /// server certificate.
    pub hosts: Vec<String>,
    /// Base name of the server files (`<name>.crt`, `<name>.key`).
    pub name: String,
    /// Client identities: one certificate each.
    pub clients: Vec<String>,
}

/// Makes the files of `req`; returns the paths written (or reused, for the CA).
pub fn generate(req: &Request) -> Result<Vec<PathBuf>, String> {
    check_file_stem("--name", &req.name)?;
    for client in &req.clients {
        check_file_stem("--client", client)?;
    }
    if req.hosts.is_empty() && req.clients.is_empty() {
        return Err("nothing to make: give at least one --host or --client".into());
    }
    create_private_dir(&req.out)?;
    let mut written = Vec::new();
    let (ca_params, ca_key) = ca(&req.out, &mut written)?;
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    if !req.hosts.is_empty() {
        let mut params =
            CertificateParams::new(req.hosts.clone()).map_err(|e| format!("--host: {e}"))?;
        params
            .distinguished_name
            .push(DnType::CommonName, req.hosts[0].as_str());
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        leaf(&req.out, &req.name, params, &issuer, &mut written)?;
    }
    for client in &req.clients {
        // The DNS SAN only when the identity is a valid DNS name; the CN always.
        let sans = if is_dns_name(client) {
            vec![client.clone()]
        } else {
            Vec::new()
        };
        let mut params = CertificateParams::new(sans).map_err(|e| format!("--client: {e}"))?;
        params
            .distinguished_name
            .push(DnType::CommonName, client.as_str());
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        leaf(
            &req.out,
            &format!("client-{client}"),
            params,
            &issuer,
            &mut written,
        )?;
    }
    Ok(written)
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, CA_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// Reuses `ca.crt`/`ca.key` when both exist and were made here; makes them otherwise.
fn ca(out: &Path, written: &mut Vec<PathBuf>) -> Result<(CertificateParams, KeyPair), String> {
    let (crt, key) = (out.join("ca.crt"), out.join("ca.key"));
    let mut params = ca_params();
    match (crt.exists(), key.exists()) {
        (true, true) => {
            let key_pem = read(&key)?;
            let key_pair = KeyPair::from_pem(&key_pem)
                .map_err(|e| format!("{}: not a usable private key: {e}", key.display()))?;
            check_reusable_ca(&crt, &key_pair)?;
            written.push(crt);
            written.push(key);
            Ok((params, key_pair))
        }
        (false, false) => {
            let key_pair = KeyPair::generate().map_err(|e| format!("CA key: {e}"))?;
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now - time::Duration::days(1);
            params.not_after = now + time::Duration::days(CA_DAYS);
            let cert = params
                .self_signed(&key_pair)
                .map_err(|e| format!("CA certificate: {e}"))?;
            write_file(&crt, cert.pem().as_bytes(), false)?;
            write_file(&key, key_pair.serialize_pem().as_bytes(), true)?;
            written.push(crt);
            written.push(key);
            Ok((params, key_pair))
        }
        _ => Err(format!(
            "{} holds only one of ca.crt and ca.key: remove it or use another --out",
            out.display()
        )),
    }
}

/// A CA is reused only when its subject is exactly ours (so certificates issued now name it
/// correctly) and `ca.key` is its key.
fn check_reusable_ca(crt: &Path, key: &KeyPair) -> Result<(), String> {
    let pem = read(crt)?;
    let der = rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| format!("{}: no PEM certificate", crt.display()))?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| format!("{}: {e}", crt.display()))?;
    let cns: Vec<&str> = cert
        .subject()
        .iter_common_name()
        .filter_map(|a| a.as_str().ok())
        .collect();
    if cns != [CA_NAME] || cert.subject().iter_attributes().count() != 1 {
        return Err(format!(
            "{} was not made by `pullgate dev-certs`: use another --out",
            crt.display()
        ));
    }
    if cert.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(format!(
            "{} does not belong to {}",
            crt.with_file_name("ca.key").display(),
            crt.display()
        ));
    }
    Ok(())
}

fn leaf(
    out: &Path,
    stem: &str,
    mut params: CertificateParams,
    issuer: &Issuer<'_, &KeyPair>,
    written: &mut Vec<PathBuf>,
) -> Result<(), String> {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(LEAF_DAYS);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().map_err(|e| format!("{stem} key: {e}"))?;
    let cert = params
        .signed_by(&key, issuer)
        .map_err(|e| format!("{stem} certificate: {e}"))?;
    let crt_path = out.join(format!("{stem}.crt"));
    let key_path = out.join(format!("{stem}.key"));
    write_file(&crt_path, cert.pem().as_bytes(), false)?;
    write_file(&key_path, key.serialize_pem().as_bytes(), true)?;
    written.push(crt_path);
    written.push(key_path);
    Ok(())
}

fn check_file_stem(flag: &str, s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{flag} {s:?}: use letters, digits, '.', '_' and '-' (it names a file)"
        ))
    }
}

fn is_dns_name(s: &str) -> bool {
    rustls::pki_types::DnsName::try_from(s).is_ok() && s.parse::<std::net::IpAddr>().is_err()
}

fn create_private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Writes through a temporary file and a rename, so a TLS listener re-reading the files never
/// sees half of one; keys get mode 0600.
fn write_file(path: &Path, bytes: &[u8], private: bool) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let fail = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(fail)?;
    f.write_all(bytes).map_err(fail)?;
    f.sync_all().map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(out: &Path, hosts: &[&str], clients: &[&str]) -> Request {
        Request {
            out: out.to_path_buf(),
            hosts: hosts.iter().map(|s| s.to_string()).collect(),
            name: "server".into(),
            clients: clients.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn makes_a_ca_server_and_client_certificates_and_reuses_the_ca() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("dev");
        let files = generate(&request(
            &out,
            &["private.example.test", "*.data.example.test", "127.0.0.1"],
            &["build-farm.internal"],
        ))
        .unwrap();
        assert_eq!(files.len(), 6);
        let ca_before = std::fs::read(out.join("ca.crt")).unwrap();
        for key in ["ca.key", "server.key", "client-build-farm.internal.key"] {
            let mode = std::fs::metadata(out.join(key))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
        let crt = std::fs::read(out.join("server.crt")).unwrap();
        let der = rustls_pemfile::certs(&mut crt.as_slice())
            .next()
            .unwrap()
            .unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(san.value.general_names.len(), 3);

        // A second run reuses the CA and replaces the leaf.
        generate(&request(&out, &["other.example.test"], &[])).unwrap();
        assert_eq!(std::fs::read(out.join("ca.crt")).unwrap(), ca_before);
        assert_ne!(std::fs::read(out.join("server.crt")).unwrap(), crt);
    }

    #[test]
    fn refuses_odd_names_a_foreign_ca_and_nothing_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("dev");
        let err = generate(&request(&out, &[], &[])).unwrap_err();
        assert!(err.contains("nothing to make"), "{err}");
        let err = generate(&request(&out, &["a.test"], &["../x"])).unwrap_err();
        assert!(err.contains("--client"), "{err}");
        // A CA with another subject is not reused.
        std::fs::create_dir_all(&out).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "Someone");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(out.join("ca.crt"), cert.pem()).unwrap();
        std::fs::write(out.join("ca.key"), key.serialize_pem()).unwrap();
        let err = generate(&request(&out, &["a.test"], &[])).unwrap_err();
        assert!(err.contains("not made by"), "{err}");
    }
}
