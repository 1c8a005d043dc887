//! Config reload: a new config validated exactly as `pullgate check` does, turned into the next
//! gateway snapshot, and swapped in whole.
//!
//! Owns: the triggers (SIGHUP, a change of the config file seen by polling, `POST /-/reload` on
//! the admin listener), the generation counter and the SHA-256 of the text in use, and the
//! outcome metric. Must never: apply part of a config (a bad or refused one changes nothing and
//! the old snapshot keeps serving), or run two reloads at once.
//!
//! Why polling and not inotify: a Kubernetes ConfigMap volume swaps a `..data` symlink, and
//! editors save by rename; `stat` through the path (device, inode, size, mtime) sees both, and
//! one `stat` a second costs nothing.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use sha2::{Digest as _, Sha256};

use super::tls::{self, CertReloader};
use crate::config::{self, Config};
use crate::gateway::Gateway;
use crate::metrics::Metrics;

/// How often the config file is looked at.
pub const CONFIG_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Where the running config came from, so a reload knows what to read again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// A file: reloads read it again (SIGHUP, `POST /-/reload`, a change seen by polling).
    File(PathBuf),
    /// The embedded default (`pullgate serve` without `-c`): reloads read it again, unchanged.
    Embedded,
    /// A config value built in code (tests): there is nothing to read again.
    Value,
}

impl ConfigSource {
    fn path(&self) -> Option<&Path> {
        match self {
            ConfigSource::File(p) => Some(p),
            ConfigSource::Embedded | ConfigSource::Value => None,
        }
    }

    fn describe(&self) -> String {
        match self {
            ConfigSource::File(p) => p.display().to_string(),
            ConfigSource::Embedded => "the embedded default".into(),
            ConfigSource::Value => "a config value (not reloadable)".into(),
        }
    }
}

/// A config as `pullgate check` accepts it, with the text it came from.
pub struct Checked {
    pub config: Config,
    /// SHA-256 (hex) of the config text; of the embedded default when there is no file.
    pub sha256: String,
}

/// Loads and validates the config of `source` the way `pullgate check` does: the schema and
/// values, then every certificate and client CA file as serving would read them. Every
/// problem is one line naming its key.
pub fn load_checked(source: &ConfigSource) -> Result<Checked, Vec<String>> {
    let (config, text) = match source {
        ConfigSource::Embedded => (config::embedded_default(), config::DEFAULT_TOML.to_owned()),
        ConfigSource::File(p) => config::load_with_text(p).map_err(|errors| {
            errors
                .to_string()
                .lines()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })?,
        ConfigSource::Value => {
            return Err(vec![
            "config: this gateway was started from a config value, not a file: nothing to reload"
                .into(),
        ])
        }
    };
    let mut errors = tls::check_files(&config.server.tls);
    // `[[warm]]` images, routed as clients route them (which `config/` cannot do itself).
    errors.extend(crate::warm::check_config(&config));
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Checked {
        config,
        sha256: hex::encode(Sha256::digest(text.as_bytes())),
    })
}

/// What started a reload (logged, and shown by `POST /-/reload`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Signal,
    FileChange,
    Admin,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "SIGHUP",
            Trigger::FileChange => "file change",
            Trigger::Admin => "POST /-/reload",
        }
    }
}

/// How a reload ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The new snapshot serves every request that starts from now on.
    Applied { generation: u64, sha256: String },
    /// The file's text is the one in use (a touch, or a rename of the same content).
    Unchanged { generation: u64 },
    /// The new config does not validate; each line names a key.
    Invalid(Vec<String>),
    /// The new config changes keys that need a restart (named), or could not be built.
    Refused(Vec<String>),
}

impl Outcome {
    /// The `outcome` label of `pullgate_config_reloads_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Applied { .. } | Outcome::Unchanged { .. } => "ok",
            Outcome::Invalid(_) => "invalid",
            Outcome::Refused(_) => "refused",
        }
    }

    /// The answer of `POST /-/reload`.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Outcome::Applied { generation, sha256 } => serde_json::json!({
                "outcome": "ok", "generation": generation, "sha256": sha256,
            }),
            Outcome::Unchanged { generation } => serde_json::json!({
                "outcome": "ok", "generation": generation, "unchanged": true,
            }),
            Outcome::Invalid(errors) => serde_json::json!({
                "outcome": "invalid", "errors": errors,
            }),
            Outcome::Refused(keys) => serde_json::json!({
                "outcome": "refused", "errors": keys,
            }),
        }
    }
}

/// The config in use: what the admin listener shows at `/-/config`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InUse {
    pub generation: u64,
    pub sha256: String,
    /// The config file, the embedded default, or a value.
    pub source: String,
}

/// Device, inode, size and mtime of the config file, through symlinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
}

impl FileStamp {
    fn of(path: &Path) -> Option<FileStamp> {
        let m = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
        })
    }
}

/// Reloads the config of one running gateway.
pub struct Reloader {
    source: ConfigSource,
    current: Arc<ArcSwap<Gateway>>,
    metrics: Arc<Metrics>,
    /// Held for the whole of a reload: one at a time, in order.
    state: Mutex<State>,
    /// Brought to every applied config (`[[warm]]` entries, limits).
    warmer: crate::warm::Warmer,
}

struct State {
    generation: u64,
    sha256: String,
    stamp: Option<FileStamp>,
}

impl Reloader {
    /// For the gateway `current` started from `source` (whose text hashed to `sha256`).
    pub fn new(
        source: ConfigSource,
        current: Arc<ArcSwap<Gateway>>,
        metrics: Arc<Metrics>,
        sha256: String,
        warmer: crate::warm::Warmer,
    ) -> Reloader {
        let stamp = source.path().and_then(FileStamp::of);
        metrics.config_in_use(1, &sha256);
        Reloader {
            source,
            current,
            metrics,
            state: Mutex::new(State {
                generation: 1,
                sha256,
                stamp,
            }),
            warmer,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The snapshot serving now.
    pub fn current(&self) -> Arc<Gateway> {
        self.current.load_full()
    }

    pub fn in_use(&self) -> InUse {
        let state = self.state();
        InUse {
            generation: state.generation,
            sha256: state.sha256.clone(),
            source: self.source.describe(),
        }
    }

    /// True when the config file looks different from the last time it was read.
    pub fn file_changed(&self) -> bool {
        let Some(path) = self.source.path() else {
            return false;
        };
        let now = FileStamp::of(path);
        // A file that vanished (mid-swap) is not a change yet: wait for the new one.
        now.is_some() && now != self.state().stamp
    }

    /// Reads, validates and applies the config. Blocking (file reads, CA files, the audit
    /// file): run it off the async workers.
    pub fn reload(&self, trigger: Trigger) -> Outcome {
        let started = Instant::now();
        let mut state = self.state();
        // Stamped before reading: a write landing during the read is seen by the next poll.
        state.stamp = self.source.path().and_then(FileStamp::of);
        let outcome = self.reload_locked(&mut state, trigger);
        self.metrics
            .config_reloads
            .with_label_values(&[outcome.label()])
            .inc();
        let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
        match &outcome {
            Outcome::Applied { generation, sha256 } => tracing::info!(
                trigger = trigger.as_str(),
                generation,
                sha256 = %sha256,
                elapsed_ms,
                "config reloaded"
            ),
            Outcome::Unchanged { generation } => tracing::debug!(
                trigger = trigger.as_str(),
                generation,
                "config file touched, text unchanged"
            ),
            Outcome::Invalid(errors) | Outcome::Refused(errors) => {
                for error in errors {
                    tracing::error!(
                        trigger = trigger.as_str(),
                        outcome = outcome.label(),
                        "{error}"
                    );
                }
                tracing::error!(
                    trigger = trigger.as_str(),
                    outcome = outcome.label(),
                    generation = state.generation,
                    "config not reloaded; the config in use keeps serving"
                );
            }
        }
        outcome
    }

    fn reload_locked(&self, state: &mut State, trigger: Trigger) -> Outcome {
        let checked = match load_checked(&self.source) {
            Ok(c) => c,
            Err(errors) if self.source == ConfigSource::Value => return Outcome::Refused(errors),
            Err(errors) => return Outcome::Invalid(errors),
        };
        if trigger == Trigger::FileChange && checked.sha256 == state.sha256 {
            return Outcome::Unchanged {
                generation: state.generation,
            };
        }
        let old = self.current.load_full();
        let fixed = config::live::fixed_keys_changed(old.config(), &checked.config);
        if !fixed.is_empty() {
            return Outcome::Refused(
                fixed
                    .into_iter()
                    .map(|key| format!("{key}: cannot change while serving; restart or upgrade (pullgate serve --upgrade) to apply it"))
                    .collect(),
            );
        }
        let next = match old.next(Arc::new(checked.config)) {
            Ok(next) => Arc::new(next),
            Err(e) => return Outcome::Refused(vec![e]),
        };
        self.current.store(Arc::clone(&next));
        next.apply_cache_limits();
        self.warmer.reconcile(Arc::clone(next.config()));
        crate::log_warnings(next.config());
        state.generation += 1;
        state.sha256 = checked.sha256;
        self.metrics.config_in_use(state.generation, &state.sha256);
        Outcome::Applied {
            generation: state.generation,
            sha256: state.sha256.clone(),
        }
    }
}

/// The background service that owns SIGHUP (re-read every certificate and the config) and
/// SIGUSR2 (start the binary again with `--upgrade`, see `upgrade.rs`).
/// Between signals it polls the config file ([`CONFIG_POLL_INTERVAL`]) and the certificate
/// files ([`tls::POLL_INTERVAL`]).
pub struct ReloadService {
    pub certs: CertReloader,
    pub config: Arc<Reloader>,
    /// The binary this process was started from (SIGUSR2 starts it with `--upgrade`).
    pub exe: Option<PathBuf>,
}

impl ReloadService {
    async fn reload(&self, trigger: Trigger) {
        let reloader = Arc::clone(&self.config);
        let _ = tokio::task::spawn_blocking(move || reloader.reload(trigger)).await;
    }
}

#[async_trait]
impl BackgroundService for ReloadService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("SIGHUP will not reload the config or certificates: {e}");
                None
            }
        };
        let mut usr2 = match signal(SignalKind::user_defined2()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("SIGUSR2 will not start an upgrade: {e}");
                None
            }
        };
        tracing::info!(
            config = %self.config.source.describe(),
            tls_listeners = self.certs.listeners(),
            sighup = hangup.is_some(),
            "reloader started"
        );
        let mut config_tick = tokio::time::interval(CONFIG_POLL_INTERVAL);
        config_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut cert_tick = tokio::time::interval(tls::POLL_INTERVAL);
        cert_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let hup = async {
                match hangup.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            let upgrade = async {
                match usr2.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = cert_tick.tick() => self.certs.refresh_all(false),
                _ = config_tick.tick() => {
                    if self.config.file_changed() {
                        self.reload(Trigger::FileChange).await;
                    }
                }
                Some(()) = hup => {
                    tracing::info!("SIGHUP: re-reading every certificate and the config");
                    self.certs.refresh_all(true);
                    self.reload(Trigger::Signal).await;
                }
                Some(()) = upgrade => match &self.exe {
                    Some(exe) => super::upgrade::spawn_successor(exe, self.config.source.path()),
                    None => tracing::error!("SIGUSR2: the path of this binary is unknown; run `pullgate serve --upgrade` by hand"),
                },
            }
        }
    }
}
