//! The key hierarchy with the `file` provider, on key files in a temp dir laid out like a
//! Kubernetes Secret volume (`cache.kek -> ..data/cache.kek`, `..data -> ..<timestamp>`).

use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::Duration;

use super::*;
use crate::config::OnRevoked;

/// A Secret volume in `dir` whose `cache.kek` holds `key` (base64) after an atomic
/// `..data` swap, as the kubelet does it.
fn secret_volume(dir: &Path, version: u32, key: &[u8; 32]) -> PathBuf {
    use base64::Engine as _;
    let data = dir.join(format!("..2026_v{version}"));
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("cache.kek"),
        base64::engine::general_purpose::STANDARD.encode(key),
    )
    .unwrap();
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(data.file_name().unwrap(), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    let link = dir.join("cache.kek");
    if !link.exists() {
        symlink("..data/cache.kek", &link).unwrap();
    }
    link
}

fn config(key_file: PathBuf) -> Encryption {
    Encryption {
        provider: KeyProvider::File { key_file },
        rotate: Duration::from_secs(24 * 3600),
        on_revoked: OnRevoked::Passthrough,
        unavailable_grace: Duration::from_secs(3600),
        check_interval: Duration::from_secs(60),
    }
}

#[tokio::test]
async fn file_provider_wraps_and_only_its_own_kek_unwraps() {
    let dir = tempfile::tempdir().unwrap();
    let path = secret_volume(dir.path(), 1, &[1; 32]);
    let provider = FileProvider::new(path.clone());
    let key = SecretKey::random().unwrap();
    let wrapped = provider.wrap(&key).await.unwrap();
    assert_eq!(wrapped.kek_version, provider.status().await.unwrap());
    assert!(!wrapped.ciphertext.contains(&hex::encode(key.expose())));
    assert_eq!(
        provider.unwrap(&wrapped).await.unwrap().expose(),
        key.expose()
    );
    // The volume swapped to a new key: a new KEK version, and the old wrap is refused.
    secret_volume(dir.path(), 2, &[2; 32]);
    assert_ne!(provider.status().await.unwrap(), wrapped.kek_version);
    assert!(matches!(
        provider.unwrap(&wrapped).await,
        Err(ProviderError::Denied(_))
    ));
    // Raw 32 bytes are a key too; anything else is refused.
    let raw = dir.path().join("raw.kek");
    std::fs::write(&raw, [7u8; 32]).unwrap();
    assert!(FileProvider::new(raw.clone()).status().await.is_ok());
    std::fs::write(&raw, b"short").unwrap();
    assert!(matches!(
        FileProvider::new(raw).status().await,
        Err(ProviderError::Denied(_))
    ));
}

fn start(cache: &Path, key_file: &Path) -> Arc<KeyService> {
    KeyService::start(&config(key_file.to_path_buf()), cache).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_is_made_once_kept_across_restarts_and_rewrapped_when_the_kek_rotates() {
    let keys_dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let path = secret_volume(keys_dir.path(), 1, &[1; 32]);
    let service = start(cache.path(), &path);
    let (id, key) = service.sealing_key().expect("a generation key");
    assert_eq!(service.health(), Health::Ok);
    let ring = std::fs::read_to_string(Keyring::path(&keys_dir_of(cache.path()))).unwrap();
    assert!(
        !ring.contains(&hex::encode(key.expose())),
        "only wrapped keys on disk"
    );
    let calls = service.kms_calls();
    for _ in 0..1000 {
        service.opening_key(id).unwrap();
        service.sealing_key().unwrap();
    }
    assert_eq!(
        service.kms_calls(),
        calls,
        "no provider call per blob or request"
    );
    drop(service);

    // A restart unwraps the same generation.
    let service = start(cache.path(), &path);
    assert_eq!(service.opening_key(id).unwrap().expose(), key.expose());
    assert_eq!(service.sealing_key().unwrap().0, id);

    // The Secret is rotated: the next check re-wraps generation `id` under the new KEK and
    // makes a new current generation; both open.
    secret_volume(keys_dir.path(), 2, &[2; 32]);
    service.check().await;
    let (new_id, _) = service.sealing_key().unwrap();
    assert_ne!(new_id, id);
    assert_eq!(service.opening_key(id).unwrap().expose(), key.expose());
    let status = service.status();
    let v2 = status.kek_version.clone().unwrap();
    assert!(status.generations.iter().all(|g| g.kek_version == v2));
    drop(service);
    let service = start(cache.path(), &path);
    assert_eq!(
        service.opening_key(id).unwrap().expose(),
        key.expose(),
        "rewrapped on disk"
    );

    // `keys rotate`: a new generation at the next check.
    service.rotate();
    service.check().await;
    assert!(service.sealing_key().unwrap().0 > new_id);
}

fn keys_dir_of(cache: &Path) -> PathBuf {
    keys_dir(cache)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_key_file_is_a_revocation_and_every_key_is_forgotten() {
    let keys_dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let path = secret_volume(keys_dir.path(), 1, &[1; 32]);
    let service = start(cache.path(), &path);
    let (id, _) = service.sealing_key().unwrap();
    let fired = Arc::new(AtomicBool::new(false));
    let seen = Arc::clone(&fired);
    service.set_on_revoked(Box::new(move || seen.store(true, Ordering::Relaxed)));
    let events = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&events);
    service.set_sink(Box::new(move |e| log.lock().unwrap().push(e.operation)));
    std::fs::remove_file(keys_dir.path().join("..data")).unwrap();
    service.check().await;
    assert_eq!(service.health(), Health::Denied);
    assert!(fired.load(Ordering::Relaxed));
    assert_eq!(service.opening_key(id).unwrap_err(), KeyMissing::Revoked);
    assert_eq!(service.sealing_key().unwrap_err(), KeyMissing::Revoked);
    assert!(events.lock().unwrap().contains(&"revoked"));
}

/// A provider that is down: answers `Unavailable` once `down` is set.
struct Flaky {
    inner: FileProvider,
    down: AtomicBool,
}

#[async_trait::async_trait]
impl Provider for Flaky {
    fn kind(&self) -> &'static str {
        "file"
    }
    fn identity(&self) -> String {
        self.inner.identity()
    }
    async fn status(&self) -> Result<String, ProviderError> {
        if self.down.load(Ordering::Relaxed) {
            return Err(ProviderError::Unavailable("connection refused".into()));
        }
        self.inner.status().await
    }
    async fn wrap(&self, key: &SecretKey) -> Result<Wrapped, ProviderError> {
        self.inner.wrap(key).await
    }
    async fn unwrap(&self, wrapped: &Wrapped) -> Result<SecretKey, ProviderError> {
        self.inner.unwrap(wrapped).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_provider_keeps_keys_for_the_grace_then_counts_as_revoked() {
    let keys_dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let path = secret_volume(keys_dir.path(), 1, &[1; 32]);
    let flaky = Arc::new(Flaky {
        inner: FileProvider::new(path.clone()),
        down: AtomicBool::new(false),
    });
    let mut cfg = config(path);
    cfg.unavailable_grace = Duration::from_millis(300);
    let service = KeyService::start_with(&cfg, cache.path(), flaky.clone()).unwrap();
    let (id, _) = service.sealing_key().unwrap();
    flaky.down.store(true, Ordering::Relaxed);
    service.check().await;
    assert!(matches!(service.health(), Health::Unavailable { .. }));
    assert!(
        service.opening_key(id).is_ok(),
        "keys in memory work during the grace"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while service.health() != Health::Denied && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        service.check().await;
    }
    assert_eq!(service.health(), Health::Denied);
    assert_eq!(service.opening_key(id).unwrap_err(), KeyMissing::Revoked);
}
