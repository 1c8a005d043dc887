//! The key hierarchy of the encrypted cache (the Kubernetes KMS v2 design): the operator's key
//! (KEK) stays in its provider and wraps generation keys; every file key is derived from a
//! generation key (`crypt::FileKey`), so the provider is called once per generation, never per
//! blob or request.
//!
//! Owns: the [`KeyService`] (unwrapped generation keys in memory, the keyring on disk,
//! rotation every `rotate` and on a KEK version change, re-wrapping old generations under the
//! new version, the periodic check that notices revocation, the grace while the provider is
//! unreachable) and the providers (`file`, `transit`, `exec`). It runs on a thread of its own
//! with its own small runtime, so provider calls never hold up requests.
//! Must never: write an unwrapped key anywhere, log a key or token, or hand out a key once the
//! provider denied it (denied = forgotten, and the store deletes the files).

mod exec;
mod file;
mod keyring;
mod provider;
#[cfg(test)]
mod tests;
mod transit;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use file::{fingerprint, FileProvider};
pub use keyring::{Generation, Keyring};
pub use provider::{Provider, ProviderError, Wrapped};

use crate::config::{Encryption, KeyProvider};
use crate::crypt::SecretKey;
use crate::store::{KeyMissing, Keys};

/// Where the keyring lives under the cache directory.
pub fn keys_dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join("keys")
}

/// The provider a config names.
pub fn provider_for(config: &Encryption) -> Result<Arc<dyn Provider>, String> {
    Ok(match &config.provider {
        KeyProvider::File { key_file } => Arc::new(FileProvider::new(key_file.clone())),
        KeyProvider::Transit {
            address,
            key,
            token_file,
            ca,
        } => Arc::new(transit::TransitProvider::new(
            address.clone(),
            key.clone(),
            token_file.clone(),
            ca.as_deref(),
        )?),
        KeyProvider::Exec { command } => Arc::new(exec::ExecProvider::new(command.clone())),
    })
}

/// Where the provider stands, as the last check saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Ok,
    /// Unreachable since then; keys in memory keep working for `unavailable_grace`.
    Unavailable {
        since: Instant,
    },
    /// Revoked (or unreachable past the grace): no key is handed out.
    Denied,
}

/// One audited key operation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyEvent {
    /// `unwrap`, `wrap`, `rewrap`, `rotate`, `check`, `revoked`, `unavailable`, `restored`,
    /// `unwrap_shared` (another replica's generation key, met in the shared object store).
    pub operation: &'static str,
    /// `ok`, `denied`, `unavailable`, `error`.
    pub outcome: &'static str,
    pub provider: &'static str,
    pub generation: Option<u32>,
    pub kek_version: Option<String>,
    pub message: Option<String>,
}

type Sink = Box<dyn Fn(&KeyEvent) + Send + Sync>;

/// What `pullgate keys status` shows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    pub provider: &'static str,
    pub health: &'static str,
    pub current_generation: Option<u32>,
    pub kek_version: Option<String>,
    pub generations: Vec<GenerationStatus>,
    pub kms_calls: u64,
    /// Check rounds so far (each makes two provider calls: status and one unwrap).
    pub checks: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerationStatus {
    pub id: u32,
    pub created: u64,
    pub kek_version: String,
    pub unwrapped: bool,
}

struct State {
    ring: Keyring,
    keys: HashMap<u32, Arc<SecretKey>>,
    /// Other replicas' generation keys met in the shared object store, by wrapped ciphertext.
    shared: HashMap<String, Arc<SecretKey>>,
    /// Generations of the keyring the provider refused to unwrap (another KEK): their files
    /// are deleted, not counted as damaged.
    lost: HashSet<u32>,
    health: Health,
}

/// Timings a reload may change without a new service.
#[derive(Debug, Clone, Copy)]
struct Timings {
    rotate: Duration,
    grace: Duration,
    check: Duration,
}

/// The running key hierarchy. Implements [`Keys`] for the stores.
pub struct KeyService {
    provider: Arc<dyn Provider>,
    dir: PathBuf,
    timings: Mutex<Timings>,
    state: RwLock<State>,
    sink: Mutex<Option<Sink>>,
    /// Events from before a sink was set (the first round at start), written once it is.
    pending: Mutex<Vec<KeyEvent>>,
    /// Called after a revocation (keys forgotten): the gateway sweeps the stores.
    on_revoked: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
    kms_calls: AtomicU64,
    checks: AtomicU64,
    metrics: Mutex<Option<Arc<crate::metrics::Metrics>>>,
    stop: AtomicBool,
    /// Wakes the check loop early (`keys rotate`, stop).
    wake: Arc<tokio::sync::Notify>,
    rotate_now: AtomicBool,
    /// One check at a time: the loop's and one asked for (`keys rotate`, tests) never
    /// interleave, so a check that returns has seen a rotation requested before it.
    checking: tokio::sync::Mutex<()>,
    config: Encryption,
    /// Unwraps of other replicas' keys, run on the key thread (provider clients live there).
    unwraps: tokio::sync::mpsc::UnboundedSender<UnwrapJob>,
}

type UnwrapJob = (
    Wrapped,
    tokio::sync::oneshot::Sender<Result<Arc<SecretKey>, KeyMissing>>,
);

/// A generation key as it travels with a sealed object in the shared object store: which KEK
/// wrapped it (a replica with another KEK knows at once it cannot open it) and how.
#[derive(serde::Serialize, serde::Deserialize)]
struct SharedKey {
    provider: String,
    wrapped: Wrapped,
}

/// Most other replicas' keys remembered at once (one per replica and generation in use).
const SHARED_KEYS: usize = 1024;

impl std::fmt::Debug for KeyService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyService")
            .field("provider", &self.provider.kind())
            .finish_non_exhaustive()
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn outcome(e: &ProviderError) -> &'static str {
    match e {
        ProviderError::Denied(_) => "denied",
        ProviderError::Unavailable(_) => "unavailable",
    }
}

impl KeyService {
    /// Starts the service for `config` on the cache in `cache_dir`: loads the keyring,
    /// unwraps its generations (one provider call each), makes a generation if there is none
    /// usable, then checks the provider every `check_interval` on a thread of its own. A
    /// provider that cannot be reached at start leaves the service `Unavailable` (nothing is
    /// cached until it answers). Blocks for the first round (at most ~30 s).
    pub fn start(config: &Encryption, cache_dir: &Path) -> Result<Arc<KeyService>, String> {
        let provider = provider_for(config)?;
        KeyService::start_with(config, cache_dir, provider)
    }

    pub fn start_with(
        config: &Encryption,
        cache_dir: &Path,
        provider: Arc<dyn Provider>,
    ) -> Result<Arc<KeyService>, String> {
        let dir = keys_dir(cache_dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let (unwraps_tx, mut unwraps_rx) = tokio::sync::mpsc::unbounded_channel::<UnwrapJob>();
        let mut ring = Keyring::load(&dir)
            .map_err(|e| format!("keyring {}: {e}", Keyring::path(&dir).display()))?;
        if ring.provider != provider.identity() {
            // Another KEK (a provider change): its generations cannot be opened here.
            ring.current = None;
        }
        let service = Arc::new(KeyService {
            provider,
            dir,
            timings: Mutex::new(Timings {
                rotate: config.rotate,
                grace: config.unavailable_grace,
                check: config.check_interval,
            }),
            state: RwLock::new(State {
                ring,
                keys: HashMap::new(),
                shared: HashMap::new(),
                lost: HashSet::new(),
                health: Health::Unavailable {
                    since: Instant::now(),
                },
            }),
            sink: Mutex::new(None),
            pending: Mutex::new(Vec::new()),
            on_revoked: Mutex::new(None),
            kms_calls: AtomicU64::new(0),
            checks: AtomicU64::new(0),
            metrics: Mutex::new(None),
            stop: AtomicBool::new(false),
            wake: Arc::new(tokio::sync::Notify::new()),
            rotate_now: AtomicBool::new(false),
            checking: tokio::sync::Mutex::new(()),
            config: config.clone(),
            unwraps: unwraps_tx,
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        // The thread holds the service weakly: when the last snapshot using it is dropped (a
        // reload to another provider, the end of `serve`), the loop ends.
        let run = Arc::downgrade(&service);
        let wake = Arc::clone(&service.wake);
        std::thread::Builder::new()
            .name("pullgate-keys".into())
            .spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                rt.block_on(async move {
                    let shared = run.clone();
                    tokio::spawn(async move {
                        while let Some((wrapped, reply)) = unwraps_rx.recv().await {
                            let Some(service) = shared.upgrade() else {
                                return;
                            };
                            let _ = reply.send(service.unwrap_shared(&wrapped).await);
                        }
                    });
                    if let Some(service) = run.upgrade() {
                        service.load().await;
                    }
                    let _ = ready_tx.send(());
                    loop {
                        let Some(wait) = run.upgrade().map(|s| s.check_interval()) else {
                            return;
                        };
                        let _ = tokio::time::timeout(wait, wake.notified()).await;
                        match run.upgrade() {
                            Some(service) if !service.stop.load(Ordering::Relaxed) => {
                                service.check().await
                            }
                            _ => return,
                        }
                    }
                });
            })
            .map_err(|e| format!("cannot start the key thread: {e}"))?;
        let _ = ready_rx.recv_timeout(Duration::from_secs(30));
        Ok(service)
    }

    /// The config this service was started with: a reload with another provider (or another
    /// key of the same one) needs a new service.
    pub fn config(&self) -> &Encryption {
        &self.config
    }

    /// Same provider: takes the reload's new timings.
    pub fn set_timings(&self, config: &Encryption) {
        *self.timings.lock().unwrap_or_else(|e| e.into_inner()) = Timings {
            rotate: config.rotate,
            grace: config.unavailable_grace,
            check: config.check_interval,
        };
        self.wake.notify_one();
    }

    /// Where audit lines go (the audit log of the snapshot in use).
    pub fn set_sink(&self, sink: Sink) {
        let mut slot = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        for event in std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner())) {
            sink(&event);
        }
        *slot = Some(sink);
    }

    /// Where provider calls are counted (`pullgate_kms_calls_total`).
    pub fn set_metrics(&self, metrics: Arc<crate::metrics::Metrics>) {
        *self.metrics.lock().unwrap_or_else(|e| e.into_inner()) = Some(metrics);
    }

    pub fn set_on_revoked(&self, hook: Box<dyn Fn() + Send + Sync>) {
        *self.on_revoked.lock().unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    /// Stops the check loop (a reload replaced this service). Keys stay until it is dropped.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// A new generation at the next check (`pullgate keys rotate`).
    pub fn rotate(&self) {
        self.rotate_now.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }

    pub fn health(&self) -> Health {
        self.read().health
    }

    /// Provider calls made so far (for the bench's calls per 1,000 pulls).
    pub fn kms_calls(&self) -> u64 {
        self.kms_calls.load(Ordering::Relaxed)
    }

    pub fn status(&self) -> Status {
        let state = self.read();
        Status {
            provider: self.provider.kind(),
            health: match state.health {
                Health::Ok => "ok",
                Health::Unavailable { .. } => "unavailable",
                Health::Denied => "denied",
            },
            current_generation: state.ring.current,
            kek_version: state.ring.current().map(|g| g.wrapped.kek_version.clone()),
            generations: state
                .ring
                .generations
                .iter()
                .map(|g| GenerationStatus {
                    id: g.id,
                    created: g.created,
                    kek_version: g.wrapped.kek_version.clone(),
                    unwrapped: state.keys.contains_key(&g.id),
                })
                .collect(),
            kms_calls: self.kms_calls(),
            checks: self.checks.load(Ordering::Relaxed),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    fn audit(&self, event: KeyEvent) {
        match event.outcome {
            "ok" => {
                tracing::info!(operation = event.operation, generation = ?event.generation, kek_version = ?event.kek_version, "key operation")
            }
            _ => {
                tracing::warn!(operation = event.operation, outcome = event.outcome, generation = ?event.generation, message = ?event.message, "key operation failed")
            }
        }
        match self.sink.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            Some(sink) => sink(&event),
            None => self
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(event),
        }
    }

    fn event(
        &self,
        operation: &'static str,
        result: Result<Option<String>, &ProviderError>,
        generation: Option<u32>,
    ) -> KeyEvent {
        let (outcome, kek_version, message) = match result {
            Ok(version) => ("ok", version, None),
            Err(e) => (outcome(e), None, Some(e.to_string())),
        };
        KeyEvent {
            operation,
            outcome,
            provider: self.provider.kind(),
            generation,
            kek_version,
            message,
        }
    }

    async fn call<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, ProviderError>>,
    ) -> Result<T, ProviderError> {
        self.kms_calls.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = self
            .metrics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            m.kms_call(self.provider.kind());
        }
        match tokio::time::timeout(Duration::from_secs(10), f).await {
            Ok(r) => r,
            Err(_) => Err(ProviderError::Unavailable("no answer in 10s".into())),
        }
    }

    /// The first round: unwrap what the keyring holds, then one check.
    async fn load(&self) {
        let generations = {
            let state = self.read();
            if state.ring.provider == self.provider.identity() {
                state.ring.generations.clone()
            } else {
                Vec::new()
            }
        };
        let lost_ring: Vec<u32> = {
            let state = self.read();
            if state.ring.provider != self.provider.identity() {
                state.ring.generations.iter().map(|g| g.id).collect()
            } else {
                Vec::new()
            }
        };
        self.write().lost.extend(lost_ring);
        for g in generations {
            match self.call(self.provider.unwrap(&g.wrapped)).await {
                Ok(key) => {
                    self.audit(self.event(
                        "unwrap",
                        Ok(Some(g.wrapped.kek_version.clone())),
                        Some(g.id),
                    ));
                    self.write().keys.insert(g.id, Arc::new(key));
                }
                Err(e) => {
                    self.audit(self.event("unwrap", Err(&e), Some(g.id)));
                    if matches!(e, ProviderError::Denied(_)) {
                        self.write().lost.insert(g.id);
                    }
                }
            }
        }
        self.check().await;
    }

    fn check_interval(&self) -> Duration {
        self.timings.lock().unwrap_or_else(|e| e.into_inner()).check
    }

    /// One check: the KEK's version; a generation key unwrapped again (proves the KEK still
    /// decrypts); a new generation when due or when the KEK version changed, older ones
    /// re-wrapped under the new version. Denied => revoke; unreachable => grace, then revoke.
    pub async fn check(&self) {
        let _one_at_a_time = self.checking.lock().await;
        self.check_once().await;
    }

    async fn check_once(&self) {
        self.checks.fetch_add(1, Ordering::Relaxed);
        self.merge_from_disk().await;
        let version = match self.call(self.provider.status()).await {
            Ok(v) => v,
            Err(e) => return self.setback(e),
        };
        // A new KEK version: every generation is wrapped again under it first (the old
        // version may be gone already, as with a swapped key file).
        let stale = self
            .read()
            .ring
            .current()
            .is_some_and(|g| g.wrapped.kek_version != version);
        if stale {
            self.rewrap_all(&version).await;
        }
        let probe = self.read().ring.current().cloned();
        let current_ok = match &probe {
            Some(g) if !self.read().lost.contains(&g.id) => {
                match self.call(self.provider.unwrap(&g.wrapped)).await {
                    Ok(key) => {
                        self.write().keys.insert(g.id, Arc::new(key));
                        true
                    }
                    Err(e) => {
                        self.audit(self.event("check", Err(&e), Some(g.id)));
                        return self.setback(e);
                    }
                }
            }
            _ => false,
        };
        let was = self.read().health;
        if was != Health::Ok {
            self.write().health = Health::Ok;
            self.audit(self.event(
                "restored",
                Ok(Some(version.clone())),
                probe.as_ref().map(|g| g.id),
            ));
        }
        let rotate = self
            .timings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .rotate;
        let due = stale
            || probe
                .as_ref()
                .is_none_or(|g| now_secs().saturating_sub(g.created) >= rotate.as_secs());
        if !current_ok || due || self.rotate_now.swap(false, Ordering::Relaxed) {
            self.new_generation().await;
        }
    }

    /// Generations another pullgate on this cache (during a binary upgrade) wrote to the
    /// keyring: taken in and unwrapped, so the files it seals open here too.
    async fn merge_from_disk(&self) {
        let Ok(disk) = Keyring::load(&self.dir) else {
            return;
        };
        if disk.provider != self.provider.identity() {
            return;
        }
        let new: Vec<Generation> = {
            let state = self.read();
            disk.generations
                .iter()
                .filter(|g| state.ring.generation(g.id).is_none() && !state.lost.contains(&g.id))
                .cloned()
                .collect()
        };
        for g in new {
            let unwrapped = self.call(self.provider.unwrap(&g.wrapped)).await;
            self.audit(
                self.event(
                    "unwrap",
                    unwrapped
                        .as_ref()
                        .map(|_| Some(g.wrapped.kek_version.clone())),
                    Some(g.id),
                ),
            );
            let mut state = self.write();
            if let Ok(key) = unwrapped {
                state.keys.insert(g.id, Arc::new(key));
            }
            if disk.current == Some(g.id) && state.ring.current.is_none_or(|c| c < g.id) {
                state.ring.current = Some(g.id);
            }
            state.ring.provider = disk.provider.clone();
            state.ring.generations.push(g);
        }
    }

    /// Every unwrapped generation wrapped again under KEK `version` (the provider's rewrap
    /// where it has one), so old generations stay readable after the KEK rotates.
    async fn rewrap_all(&self, version: &str) {
        let todo: Vec<Generation> = {
            let state = self.read();
            state
                .ring
                .generations
                .iter()
                .filter(|g| g.wrapped.kek_version != version && state.keys.contains_key(&g.id))
                .cloned()
                .collect()
        };
        for g in todo {
            let result = match self.call(self.provider.rewrap(&g.wrapped)).await {
                Ok(Some(w)) => Ok(w),
                Ok(None) => {
                    let key = self.read().keys.get(&g.id).cloned();
                    match key {
                        Some(key) => self.call(self.provider.wrap(&key)).await,
                        None => continue,
                    }
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(wrapped) => {
                    self.audit(self.event(
                        "rewrap",
                        Ok(Some(wrapped.kek_version.clone())),
                        Some(g.id),
                    ));
                    let mut state = self.write();
                    if let Some(slot) = state.ring.generations.iter_mut().find(|x| x.id == g.id) {
                        slot.wrapped = wrapped;
                    }
                    self.save(&state.ring);
                }
                Err(e) => self.audit(self.event("rewrap", Err(&e), Some(g.id))),
            }
        }
    }

    async fn new_generation(&self) {
        let key = match SecretKey::random() {
            Ok(k) => k,
            Err(_) => return,
        };
        match self.call(self.provider.wrap(&key)).await {
            Ok(wrapped) => {
                let mut state = self.write();
                if state.ring.provider != self.provider.identity() {
                    state.ring = Keyring {
                        format: 1,
                        provider: self.provider.identity(),
                        current: None,
                        generations: Vec::new(),
                    };
                }
                let id = state
                    .ring
                    .next_id()
                    .max(state.lost.iter().max().map_or(1, |m| m + 1));
                let version = wrapped.kek_version.clone();
                state.ring.generations.push(Generation {
                    id,
                    created: now_secs(),
                    wrapped,
                });
                state.ring.current = Some(id);
                state.keys.insert(id, Arc::new(key));
                self.save(&state.ring);
                drop(state);
                self.audit(self.event("rotate", Ok(Some(version)), Some(id)));
            }
            Err(e) => {
                self.audit(self.event("wrap", Err(&e), None));
                self.setback(e);
            }
        }
    }

    fn save(&self, ring: &Keyring) {
        if let Err(e) = ring.save(&self.dir) {
            tracing::error!(dir = %self.dir.display(), error = %e, "cannot write the keyring");
        }
    }

    fn setback(&self, e: ProviderError) {
        match e {
            ProviderError::Denied(_) => self.revoke(&e),
            ProviderError::Unavailable(_) => {
                let grace = self.timings.lock().unwrap_or_else(|e| e.into_inner()).grace;
                let health = self.read().health;
                match health {
                    Health::Ok => {
                        self.write().health = Health::Unavailable {
                            since: Instant::now(),
                        };
                        self.audit(self.event("unavailable", Err(&e), None));
                    }
                    Health::Unavailable { since } if since.elapsed() >= grace => {
                        self.revoke(&e);
                    }
                    _ => {}
                }
            }
        }
    }

    /// Forget every unwrapped key; the stores delete the files and stop caching.
    fn revoke(&self, e: &ProviderError) {
        {
            let mut state = self.write();
            if state.health == Health::Denied {
                return;
            }
            state.health = Health::Denied;
            let ids: Vec<u32> = state.ring.generations.iter().map(|g| g.id).collect();
            state.lost.extend(ids);
            state.keys.clear();
            state.shared.clear();
        }
        self.audit(self.event("revoked", Err(e), None));
        if let Some(hook) = self
            .on_revoked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            hook();
        }
    }
}

impl KeyService {
    /// Keys may be handed out: not revoked, and not unreachable past the grace.
    fn usable(&self, state: &State) -> Result<(), KeyMissing> {
        let grace = self.timings.lock().unwrap_or_else(|e| e.into_inner()).grace;
        match state.health {
            Health::Denied => Err(KeyMissing::Revoked),
            Health::Unavailable { since } if since.elapsed() >= grace => Err(KeyMissing::Revoked),
            _ => Ok(()),
        }
    }

    /// On the key thread: one provider call for another replica's generation key.
    async fn unwrap_shared(&self, wrapped: &Wrapped) -> Result<Arc<SecretKey>, KeyMissing> {
        if let Some(key) = self.read().shared.get(&wrapped.ciphertext) {
            // A duplicate that queued behind the first.
            return Ok(Arc::clone(key));
        }
        let result = self.call(self.provider.unwrap(wrapped)).await;
        let version = Some(wrapped.kek_version.clone());
        self.audit(self.event("unwrap_shared", result.as_ref().map(|_| version), None));
        match result {
            Ok(key) => {
                let key = Arc::new(key);
                let mut state = self.write();
                if state.health == Health::Denied {
                    return Err(KeyMissing::Revoked);
                }
                if state.shared.len() >= SHARED_KEYS {
                    state.shared.clear();
                }
                state
                    .shared
                    .insert(wrapped.ciphertext.clone(), Arc::clone(&key));
                Ok(key)
            }
            Err(ProviderError::Denied(_)) => Err(KeyMissing::Revoked),
            Err(ProviderError::Unavailable(_)) => Err(KeyMissing::Unavailable),
        }
    }
}

impl Drop for KeyService {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Keys for KeyService {
    fn sealing_key(&self) -> Result<(u32, Arc<SecretKey>), KeyMissing> {
        let state = self.read();
        self.usable(&state)?;
        let id = state.ring.current.ok_or(KeyMissing::Unavailable)?;
        let key = state.keys.get(&id).ok_or(KeyMissing::Unavailable)?;
        Ok((id, Arc::clone(key)))
    }

    fn opening_key(&self, id: u32) -> Result<Arc<SecretKey>, KeyMissing> {
        let state = self.read();
        if state.health == Health::Denied || state.lost.contains(&id) {
            return Err(KeyMissing::Revoked);
        }
        if let Some(key) = state.keys.get(&id) {
            return Ok(Arc::clone(key));
        }
        match state.ring.generation(id) {
            Some(_) => Err(KeyMissing::Unavailable),
            None => Err(KeyMissing::Unknown),
        }
    }

    fn wrapped_key(&self, id: u32) -> Option<Vec<u8>> {
        let state = self.read();
        let shared = SharedKey {
            provider: self.provider.identity(),
            wrapped: state.ring.generation(id)?.wrapped.clone(),
        };
        serde_json::to_vec(&shared).ok()
    }

    fn unwrap_key(
        self: Arc<Self>,
        wrapped: Vec<u8>,
    ) -> futures_util::future::BoxFuture<'static, Result<Arc<SecretKey>, KeyMissing>> {
        Box::pin(async move {
            let shared: SharedKey =
                serde_json::from_slice(&wrapped).map_err(|_| KeyMissing::Unknown)?;
            if shared.provider != self.provider.identity() {
                // Another operator's key: this replica cannot open it, ever.
                return Err(KeyMissing::Unknown);
            }
            {
                let state = self.read();
                self.usable(&state)?;
                if let Some(own) = state
                    .ring
                    .generations
                    .iter()
                    .find(|g| g.wrapped == shared.wrapped)
                {
                    return state
                        .keys
                        .get(&own.id)
                        .cloned()
                        .ok_or(KeyMissing::Unavailable);
                }
                if let Some(key) = state.shared.get(&shared.wrapped.ciphertext) {
                    return Ok(Arc::clone(key));
                }
            }
            let (reply, answer) = tokio::sync::oneshot::channel();
            self.unwraps
                .send((shared.wrapped, reply))
                .map_err(|_| KeyMissing::Unavailable)?;
            match tokio::time::timeout(Duration::from_secs(15), answer).await {
                Ok(Ok(result)) => result,
                _ => Err(KeyMissing::Unavailable),
            }
        })
    }
}
