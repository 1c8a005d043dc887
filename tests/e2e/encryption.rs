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
    skopeo_copy_to_oci, wait_until, ClientTls, Containerd, OpenBao, PullOpts, TestImage, Upstream,
    UpstreamOptions,
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
    let before = keys_status(&gw);
    let ranged = request(
        "GET",
        &gw.url(&format!("/v2/team/enc/blobs/{layer}")),
        &[("Range", "bytes=70000-200000")],
    );
    assert_eq!(ranged.status, 206);
    assert!(ranged.body == bytes[70_000..=200_000]);
    pull(&gw, &image, "team/enc:v1");
    // The periodic check calls the provider a few times a second here; pulls add none.
    // Provider calls come from the periodic checks only (two each: status and one unwrap).
    let after = keys_status(&gw);
    let n = |s: &serde_json::Value, k: &str| s[k].as_u64().unwrap();
    let calls = n(&after, "kms_calls") - n(&before, "kms_calls");
    let checks = n(&after, "checks") - n(&before, "checks");
    assert!(
        calls <= 2 * checks + 2,
        "{calls} KMS calls in {checks} checks during a Range and a pull"
    );
    // The metric counts the calls since the stores were wired up (after the first round).
    assert!(metric(&gw, "pullgate_kms_calls_total") >= calls as f64);

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

    // `pullgate keys status|rotate` through the admin listener the config names.
    let keys_cli = |action: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pullgate"))
            .args(["keys", action, "-c"])
            .arg(gw.config_path())
            .output()
            .expect("pullgate keys runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let status: serde_json::Value = serde_json::from_str(&keys_cli("status")).expect("JSON");
    assert_eq!(status["provider"], "file");
    assert_eq!(status["health"], "ok");
    let before = status["current_generation"].as_u64().unwrap();
    keys_cli("rotate");
    wait_until(Duration::from_secs(10), "a new generation", || {
        keys_status(&gw)["current_generation"].as_u64().unwrap() > before
    })
    .unwrap();
    // Blobs sealed under the older generation still open.
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

// ---------------------------------------------------------------------------------------------
// transit: a real OpenBao

fn transit_keys(bao: &OpenBao, token_file: &Path, grace: &str) -> String {
    format!(
        "\n[cache.encryption]\nprovider = \"transit\"\naddress = \"{}\"\nkey = \"pullgate\"\ntoken_file = \"{}\"\ncheck_interval = \"200ms\"\nunavailable_grace = \"{grace}\"\n",
        bao.address(),
        token_file.display()
    )
}

fn ctr_pull(gw: &Gateway, image: &TestImage, name: &str) {
    // A new containerd each time: one daemon's content store would not fetch again.
    let ctr = Containerd::start();
    let digest = ctr
        .pull_with(
            &format!("{}/{name}", gw.addr()),
            &PullOpts {
                plain_http: true,
                ..Default::default()
            },
        )
        .expect("ctr pulls through pullgate");
    assert_eq!(digest, image.manifest_digest());
}

fn sealed_files(dir: &Path) -> Vec<PathBuf> {
    files_under(&dir.join("blobs"))
}

#[test]
fn transit_rotation_and_an_outage_while_skopeo_and_ctr_pull() {
    let up = Upstream::start(UpstreamOptions::default());
    let image = TestImage::with_layer_size("enc-transit", 200_000);
    up.push(&image, "team/transit:v1");
    let mut bao = OpenBao::start("pullgate");
    let secrets = tempfile::tempdir().unwrap();
    let token_file = bao.token_file(secrets.path());
    let gw = Gateway::start_configured(
        &registry("test", &up, "default = true"),
        None,
        &transit_keys(&bao, &token_file, "8s"),
    );
    ctr_pull(&gw, &image, "team/transit:v1");
    let status = keys_status(&gw);
    assert_eq!(status["provider"], "transit");
    assert_eq!(status["kek_version"], "1");
    let found = plaintext_found(&gw.cache_dir(), &known_plaintext(&image));
    assert!(found.is_empty(), "plaintext of the test image in {found:?}");
    let ring = std::fs::read_to_string(gw.cache_dir().join("keys/keyring.json")).unwrap();
    assert!(
        ring.contains("vault:v1:"),
        "generation keys wrapped by Transit"
    );

    // The Transit key rotates: pullgate re-wraps its generations (transit/rewrap) and makes a
    // new one under version 2; the cache keeps serving.
    bao.cmd(&["write", "-f", "transit/keys/pullgate/rotate"]);
    wait_until(Duration::from_secs(10), "KEK version 2", || {
        keys_status(&gw)["kek_version"] == "2"
    })
    .unwrap();
    wait_until(
        Duration::from_secs(10),
        "every generation re-wrapped",
        || {
            keys_status(&gw)["generations"]
                .as_array()
                .unwrap()
                .iter()
                .all(|g| g["kek_version"] == "2")
        },
    )
    .unwrap();
    pull(&gw, &image, "team/transit:v1");

    // An outage: the server is stopped. Keys in memory keep working for the grace...
    let cached = sealed_files(&gw.cache_dir());
    assert_eq!(cached.len(), image.blobs().len());
    bao.stop();
    wait_until(Duration::from_secs(10), "the outage noticed", || {
        keys_status(&gw)["health"] == "unavailable"
    })
    .unwrap();
    pull(&gw, &image, "team/transit:v1");
    assert_eq!(
        sealed_files(&gw.cache_dir()),
        cached,
        "served from the sealed cache"
    );
    // ...then count as revoked: the keys are forgotten, the files deleted, pulls pass through.
    wait_until(Duration::from_secs(30), "the grace ran out", || {
        keys_status(&gw)["health"] == "denied"
    })
    .unwrap();
    wait_until(Duration::from_secs(10), "sealed files deleted", || {
        sealed_files(&gw.cache_dir()).is_empty()
    })
    .unwrap();
    ctr_pull(&gw, &image, "team/transit:v1");
    assert!(
        sealed_files(&gw.cache_dir()).is_empty(),
        "nothing cached without a key"
    );
}

#[test]
fn transit_revocation_by_min_decryption_version_and_by_key_deletion() {
    let up = Upstream::start(UpstreamOptions::default());
    let image = TestImage::with_layer_size("enc-revoke", 120_000);
    up.push(&image, "team/revoke:v1");
    let bao = OpenBao::start("pullgate");
    let secrets = tempfile::tempdir().unwrap();
    let token_file = bao.token_file(secrets.path());
    let cache = tempfile::tempdir().unwrap();
    let registries = registry("test", &up, "default = true");
    let keys = transit_keys(&bao, &token_file, "1h");
    let mut gw = Gateway::start_configured(&registries, Some(cache.path()), &keys);
    pull(&gw, &image, "team/revoke:v1");
    let old: Vec<PathBuf> = sealed_files(cache.path());
    assert_eq!(old.len(), image.blobs().len());
    gw.stop();

    // While pullgate is down, version 1 is made undecryptable (min_decryption_version = 2):
    // on restart its generation is refused, its files are deleted, a new one is made.
    bao.cmd(&["write", "-f", "transit/keys/pullgate/rotate"]);
    bao.cmd(&[
        "write",
        "transit/keys/pullgate/config",
        "min_decryption_version=2",
    ]);
    let gw = Gateway::start_configured(&registries, Some(cache.path()), &keys);
    wait_until(
        Duration::from_secs(10),
        "files of version 1 deleted",
        || sealed_files(cache.path()).is_empty(),
    )
    .unwrap();
    let status = keys_status(&gw);
    assert_eq!(status["kek_version"], "2");
    let ops: Vec<(String, String)> = gw
        .audit_lines()
        .into_iter()
        .filter(|l| l["action"] == "key")
        .map(|l| {
            (
                l["operation"].as_str().unwrap_or_default().to_owned(),
                l["outcome"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert!(
        ops.contains(&("unwrap".into(), "denied".into())),
        "the refused unwrap is audited: {ops:?}"
    );
    pull(&gw, &image, "team/revoke:v1");
    assert_eq!(sealed_files(cache.path()).len(), image.blobs().len());

    // The key is deleted: denied within the check interval, files deleted, pulls pass through.
    bao.cmd(&[
        "write",
        "transit/keys/pullgate/config",
        "deletion_allowed=true",
    ]);
    bao.cmd(&["delete", "transit/keys/pullgate"]);
    wait_until(Duration::from_secs(10), "the deletion noticed", || {
        keys_status(&gw)["health"] == "denied"
    })
    .unwrap();
    wait_until(Duration::from_secs(10), "sealed files deleted", || {
        sealed_files(cache.path()).is_empty()
    })
    .unwrap();
    pull(&gw, &image, "team/revoke:v1");
    assert!(sealed_files(cache.path()).is_empty());
}

// ---------------------------------------------------------------------------------------------
// exec: the documented protocol with a test helper

#[test]
fn an_exec_helper_holds_the_kek_through_rotation_and_revocation() {
    let up = Upstream::start(UpstreamOptions::default());
    let image = TestImage::with_layer_size("enc-exec", 90_000);
    up.push(&image, "team/exec:v1");
    let control = tempfile::tempdir().unwrap();
    let helper = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/kms_helper.py");
    let keys = format!(
        "\n[cache.encryption]\nprovider = \"exec\"\ncommand = [\"python3\", \"{}\", \"{}\"]\ncheck_interval = \"200ms\"\n",
        helper.display(),
        control.path().display()
    );
    let gw = Gateway::start_configured(&registry("test", &up, "default = true"), None, &keys);
    pull(&gw, &image, "team/exec:v1");
    assert_eq!(keys_status(&gw)["provider"], "exec");
    assert_eq!(keys_status(&gw)["kek_version"], "1");
    let found = plaintext_found(&gw.cache_dir(), &known_plaintext(&image));
    assert!(found.is_empty(), "plaintext of the test image in {found:?}");

    // A new KEK version: the helper cannot rewrap, so pullgate wraps the keys it holds again.
    std::fs::write(control.path().join("version"), "2").unwrap();
    wait_until(
        Duration::from_secs(10),
        "every generation under version 2",
        || {
            let status = keys_status(&gw);
            status["kek_version"] == "2"
                && status["generations"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|g| g["kek_version"] == "2")
        },
    )
    .unwrap();
    pull(&gw, &image, "team/exec:v1");
    assert_eq!(blob_files(&gw).len(), image.blobs().len());

    // {"error":"denied"}: revoked.
    std::fs::write(control.path().join("state"), "denied").unwrap();
    wait_until(Duration::from_secs(10), "revocation", || {
        keys_status(&gw)["health"] == "denied"
    })
    .unwrap();
    wait_until(Duration::from_secs(10), "files deleted", || {
        blob_files(&gw).is_empty()
    })
    .unwrap();
    pull(&gw, &image, "team/exec:v1");
    assert!(blob_files(&gw).is_empty());
}
