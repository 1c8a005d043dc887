//! The cache encrypted at rest (`[cache.encryption]`) with the `file` provider, its key file in
//! a tmpfs directory laid out and swapped the way the kubelet does a Secret volume
//! (`cache.kek -> ..data/cache.kek`, `..data -> ..<timestamp>/`, replaced by an atomic rename).
//! Real skopeo pulls through pullgate in front of the real token-auth upstream; the cache
//! directory is then searched for known plaintext of the test image: none may be found.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::harness::{get, registry, request, Gateway};
use crate::support::{
    skopeo_copy_to_oci, wait_until, ClientTls, TestImage, Upstream, UpstreamOptions,
};

/// A Secret-volume-like key dir on tmpfs (`/dev/shm` where there is one).
fn key_volume() -> tempfile::TempDir {
    let base = Path::new("/dev/shm");
    let builder = &mut tempfile::Builder::new();
    builder.prefix("pullgate-kek-");
    match base.is_dir() {
        true => builder.tempdir_in(base),
        false => builder.tempdir(),
    }
    .expect("key dir")
}

/// Puts a new key (base64 of `byte` x 32) in the volume with the kubelet's atomic `..data`
/// swap; returns the path pullgate is configured with.
fn swap_key(dir: &Path, version: u32, byte: u8) -> PathBuf {
    use base64::Engine as _;
    use std::os::unix::fs::PermissionsExt;
    let data = dir.join(format!("..2026_12_03_v{version}"));
    std::fs::create_dir_all(&data).unwrap();
    let file = data.join("cache.kek");
    std::fs::write(
        &file,
        base64::engine::general_purpose::STANDARD.encode([byte; 32]),
    )
    .unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o400)).unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(data.file_name().unwrap(), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    let link = dir.join("cache.kek");
    if std::fs::symlink_metadata(&link).is_err() {
        symlink("..data/cache.kek", &link).unwrap();
    }
    link
}

fn encryption_keys(key_file: &Path, on_revoked: &str) -> String {
    format!(
        "\n[cache.encryption]\nprovider = \"file\"\nkey_file = \"{}\"\non_revoked = \"{on_revoked}\"\ncheck_interval = \"200ms\"\n",
        key_file.display()
    )
}

fn keys_status(gw: &Gateway) -> serde_json::Value {
    let answer = get(&gw.admin_url("/-/keys"));
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    serde_json::from_slice(&answer.body).expect("json")
}

fn metric(gw: &Gateway, line_start: &str) -> f64 {
    let text = String::from_utf8(get(&gw.admin_url("/metrics")).body).expect("utf-8");
    text.lines()
        .filter(|l| l.starts_with(line_start))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                out.extend(files_under(&path));
            } else {
                out.push(path);
            }
        }
    }
    out
}

/// Windows of the image's blobs and manifest: byte strings that only a plaintext copy holds.
fn known_plaintext(image: &TestImage) -> Vec<Vec<u8>> {
    let mut needles = Vec::new();
    for (digest, size) in image.blobs() {
        let bytes = image.blob_bytes(&digest);
        assert_eq!(bytes.len() as u64, size);
        for at in [0, bytes.len() / 2, bytes.len().saturating_sub(48)] {
            let end = (at + 48).min(bytes.len());
            if end - at >= 16 {
                needles.push(bytes[at..end].to_vec());
            }
        }
    }
    let manifest = image.manifest_bytes();
    needles.push(manifest[..manifest.len().min(48)].to_vec());
    needles.push(b"\"schemaVersion\"".to_vec());
    needles
}

/// Files under `dir` holding any of `needles`.
fn plaintext_found(dir: &Path, needles: &[Vec<u8>]) -> Vec<String> {
    files_under(dir)
        .into_iter()
        .filter(|f| {
            let bytes = std::fs::read(f).unwrap_or_default();
            needles
                .iter()
                .any(|n| bytes.windows(n.len()).any(|w| w == n.as_slice()))
        })
        .map(|f| f.display().to_string())
        .collect()
}

fn blob_files(gw: &Gateway) -> Vec<PathBuf> {
    files_under(&gw.cache_dir().join("blobs"))
}

fn pull(gw: &Gateway, image: &TestImage, name: &str) {
    let got = skopeo_copy_to_oci(
        &format!("{}/{name}", gw.addr()),
        ClientTls::Plain,
        None,
        false,
    )
    .expect("pull through pullgate");
    assert_eq!(got.manifest_digest, image.manifest_digest());
    for (digest, _) in image.blobs() {
        assert!(got.has_blob(&digest), "{digest} pulled and verified");
    }
}

#[test]
fn a_file_kek_seals_the_cache_rotates_with_the_secret_and_revocation_empties_it() {
    let up = Upstream::start(UpstreamOptions::default());
    let image = TestImage::with_layer_size("enc-file", 300_000);
    up.push(&image, "team/enc:v1");
    let volume = key_volume();
    let key_file = swap_key(volume.path(), 1, 0x11);
    let gw = Gateway::start_configured(
        &registry("test", &up, "default = true"),
        None,
        &encryption_keys(&key_file, "passthrough"),
    );
    pull(&gw, &image, "team/enc:v1");
    // Every blob of the image is in the cache, sealed; nothing readable is left anywhere.
    assert_eq!(blob_files(&gw).len(), image.blobs().len());
    let needles = known_plaintext(&image);
    let found = plaintext_found(&gw.cache_dir(), &needles);
    assert!(found.is_empty(), "plaintext of the test image in {found:?}");
    for f in blob_files(&gw) {
        assert!(
            std::fs::read(&f).unwrap().starts_with(b"\x89PGSEAL\n"),
            "{}",
            f.display()
        );
    }
    let status = keys_status(&gw);
    assert_eq!(status["health"], "ok");
    let first_generation = status["current_generation"].as_u64().unwrap();
    let first_kek = status["kek_version"].as_str().unwrap().to_owned();

    // Warm pulls and a Range inside the layer come from the sealed files; no KMS call per pull.
    let layer = image.layer_digests()[0].clone();
    let bytes = image.blob_bytes(&layer);
    let calls = metric(&gw, "pullgate_kms_calls_total");
    let ranged = request(
        "GET",
        &gw.url(&format!("/v2/team/enc/blobs/{layer}")),
        &[("Range", "bytes=70000-200000")],
    );
    assert_eq!(ranged.status, 206);
    assert!(ranged.body == bytes[70_000..=200_000]);
    pull(&gw, &image, "team/enc:v1");
    // The periodic check calls the provider a few times a second here; pulls add none.
    let checks = metric(&gw, "pullgate_kms_calls_total") - calls;
    assert!(checks < 40.0, "{checks} KMS calls during two pulls");

    // A flipped bit in a cached layer: the client never gets it, the file is refetched.
    let path = blob_files(&gw)
        .into_iter()
        .find(|p| p.file_name().unwrap().to_str() == layer.strip_prefix("sha256:"))
        .expect("layer cached");
    let mut raw = std::fs::read(&path).unwrap();
    raw[80 + 100_000] ^= 0x01;
    std::fs::write(&path, &raw).unwrap();
    let damaged = get(&gw.url(&format!("/v2/team/enc/blobs/{layer}")));
    // Verified bytes or an aborted (short) body, never a wrong byte presented as complete.
    assert!(
        damaged.body.len() < bytes.len() || damaged.body == bytes,
        "status {} with {} bytes",
        damaged.status,
        damaged.body.len()
    );
    assert_eq!(metric(&gw, "pullgate_cache_integrity_failures_total"), 1.0);
    let again = get(&gw.url(&format!("/v2/team/enc/blobs/{layer}")));
    assert_eq!(again.status, 200);
    assert!(again.body == bytes, "refilled with the right bytes");

    // The Secret is rotated: a new KEK version, the old generation re-wrapped, still served.
    swap_key(volume.path(), 2, 0x22);
    wait_until(Duration::from_secs(10), "the new KEK", || {
        keys_status(&gw)["kek_version"] != first_kek.as_str()
    })
    .unwrap();
    let status = keys_status(&gw);
    assert!(status["current_generation"].as_u64().unwrap() > first_generation);
    let versions: Vec<&str> = status["generations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["kek_version"].as_str().unwrap())
        .collect();
    assert!(
        versions.iter().all(|v| *v == status["kek_version"]),
        "{versions:?}"
    );
    pull(&gw, &image, "team/enc:v1");

    // Revoked (the key removed from the volume): within the check interval the keys are
    // forgotten and the sealed blobs deleted; pulls pass through without caching.
    std::fs::remove_file(volume.path().join("..data")).unwrap();
    wait_until(Duration::from_secs(10), "revocation", || {
        keys_status(&gw)["health"] == "denied"
    })
    .unwrap();
    wait_until(
        Duration::from_secs(10),
        "files of the revoked key deleted",
        || blob_files(&gw).is_empty(),
    )
    .unwrap();
    pull(&gw, &image, "team/enc:v1");
    assert!(blob_files(&gw).is_empty(), "nothing cached while revoked");

    let ops: Vec<String> = gw
        .audit_lines()
        .into_iter()
        .filter(|l| l["action"] == "key")
        .map(|l| l["operation"].as_str().unwrap_or_default().to_owned())
        .collect();
    for op in ["rotate", "rewrap", "revoked"] {
        assert!(ops.iter().any(|o| o == op), "audited {op}: {ops:?}");
    }
}

#[test]
fn on_revoked_deny_answers_503() {
    let up = Upstream::start(UpstreamOptions::default());
    let image = TestImage::small("enc-deny");
    up.push(&image, "team/deny:v1");
    let volume = key_volume();
    let key_file = swap_key(volume.path(), 1, 0x33);
    let gw = Gateway::start_configured(
        &registry("test", &up, "default = true"),
        None,
        &encryption_keys(&key_file, "deny"),
    );
    pull(&gw, &image, "team/deny:v1");
    std::fs::remove_file(volume.path().join("..data")).unwrap();
    wait_until(Duration::from_secs(10), "revocation", || {
        keys_status(&gw)["health"] == "denied"
    })
    .unwrap();
    let answer = get(&gw.url(&format!("/v2/team/deny/blobs/{}", image.layer_digests()[0])));
    assert_eq!(answer.status, 503);
    assert_eq!(answer.oci_code().as_deref(), Some("UNAVAILABLE"));
    let answer = get(&gw.url("/v2/team/deny/manifests/v1"));
    assert_eq!(answer.status, 503);
}

#[test]
fn encryption_turned_on_and_off_by_reload_reseals_the_same_cache() {
    let up = Upstream::start(UpstreamOptions::default());
    let image = TestImage::with_layer_size("enc-reload", 150_000);
    up.push(&image, "team/reload:v1");
    let volume = key_volume();
    let key_file = swap_key(volume.path(), 1, 0x44);
    let gw = Gateway::start(&registry("test", &up, "default = true"));
    pull(&gw, &image, "team/reload:v1");
    let needles = known_plaintext(&image);
    assert!(
        !plaintext_found(&gw.cache_dir(), &needles).is_empty(),
        "the plaintext cache"
    );

    // On: the config gains [cache.encryption]; the reload sweeps the plaintext away.
    let path = gw.config_path();
    let plain = std::fs::read_to_string(&path).unwrap();
    let encrypted = plain.replacen(
        "\n\n[[registry]]",
        &format!(
            "{}\n\n[[registry]]",
            encryption_keys(&key_file, "passthrough")
        ),
        1,
    );
    assert_ne!(plain, encrypted);
    std::fs::write(&path, &encrypted).unwrap();
    let answer = request("POST", &gw.admin_url("/-/reload"), &[]);
    assert_eq!(
        answer.status,
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    wait_until(Duration::from_secs(10), "plaintext blobs evicted", || {
        blob_files(&gw).is_empty()
    })
    .unwrap();
    pull(&gw, &image, "team/reload:v1");
    let found = plaintext_found(&gw.cache_dir(), &needles);
    assert!(
        found.is_empty(),
        "plaintext left after turning encryption on: {found:?}"
    );
    assert_eq!(blob_files(&gw).len(), image.blobs().len());

    // Off again: sealed files are evicted and the next pull stores plaintext.
    std::fs::write(&path, &plain).unwrap();
    let answer = request("POST", &gw.admin_url("/-/reload"), &[]);
    assert_eq!(answer.status, 200);
    wait_until(Duration::from_secs(10), "sealed blobs evicted", || {
        blob_files(&gw).is_empty()
    })
    .unwrap();
    pull(&gw, &image, "team/reload:v1");
    assert!(blob_files(&gw)
        .iter()
        .all(|f| !std::fs::read(f).unwrap().starts_with(b"\x89PGSEAL\n")));
}
