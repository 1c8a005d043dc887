//! Running warm jobs: HTTP requests to pullgate's own plain listener over loopback (the
//! clients' path, see the module doc of `warm`), bounded by `cache.warm_concurrency` and the
//! bandwidth cap, with progress a job's watchers can read, refresh loops for `[[warm]]`
//! entries and the pins they hold.
//!
//! Jobs run on the runtime of the warm background service (`listen/`), which attaches it with
//! [`Warmer::attach`]; a reconcile before that is kept and applied then.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::header;
use serde::Serialize;
use tokio::sync::Semaphore;

use super::pace::Pace;
use super::plan::{self, Descriptor, Target};
use super::{WarmKey, ACCOUNT_HEADER, KEY_HEADER};
use crate::config::model::{Config, WarmEntry};
use crate::metrics::Metrics;
use crate::oci::{Digest, MANIFEST_ACCEPT};
use crate::route::RouteTable;
use crate::store::{BlobStore, PinError};

/// Finished jobs kept for `GET /warm`.
const KEPT_JOBS: usize = 100;
/// A manifest answer larger than this is not a manifest pullgate would serve either.
const MAX_MANIFEST: usize = 64 << 20;
/// One warm request gets no byte for this long: it fails (the fill it started goes on).
const READ_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a job waits for pullgate's own listener to accept (at start).
const LISTENER_WAIT: Duration = Duration::from_secs(30);

/// What a job is, as `GET /warm/<id>` shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct JobView {
    pub id: String,
    /// `config` (a `[[warm]]` entry) or `api` (`POST /warm`).
    pub source: &'static str,
    pub images: Vec<String>,
    /// `running`, `done` or `failed` (done, with errors).
    pub state: &'static str,
    pub manifests_done: u64,
    pub manifests_total: u64,
    pub blobs_done: u64,
    pub blobs_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// The digest each image resolved to (the tag's target, or the digest asked for).
    pub resolved: Vec<Resolved>,
    pub errors: Vec<String>,
    /// Unix seconds.
    pub started: u64,
    pub elapsed_ms: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Resolved {
    pub image: String,
    pub digest: String,
}

struct Job {
    view: Mutex<JobView>,
    started: Instant,
}

impl Job {
    fn update(&self, f: impl FnOnce(&mut JobView)) {
        let mut v = self.view.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut v);
    }

    fn error(&self, message: String) {
        self.update(|v| v.errors.push(message));
    }

    fn view(&self) -> JobView {
        let mut v = self.view.lock().unwrap_or_else(|e| e.into_inner()).clone();
        v.elapsed_ms = self.started.elapsed().as_millis() as u64;
        v
    }
}

/// A request to warm images now (`POST /warm`).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmRequest {
    #[serde(default)]
    pub images: Vec<String>,
    #[serde(default)]
    pub platforms: Vec<String>,
    #[serde(default)]
    pub referrers: bool,
}

/// The warm engine of one process. Cheap to clone.
#[derive(Clone)]
pub struct Warmer {
    inner: Arc<Inner>,
}

struct Inner {
    key: WarmKey,
    /// The bandwidth cap, shared with the gateway's warm fills.
    pace: Pace,
    store: BlobStore,
    metrics: Arc<Metrics>,
    http: reqwest::Client,
    runtime: Mutex<Option<tokio::runtime::Handle>>,
    state: Mutex<State>,
}

struct State {
    config: Option<Arc<Config>>,
    /// `http://<loopback>:<port>` of the first plain listener.
    base: Option<String>,
    limits: Limits,
    next_id: u64,
    jobs: VecDeque<(String, Arc<Job>)>,
    /// Running `[[warm]]` entries by [`Target::identity`].
    entries: HashMap<String, tokio::task::JoinHandle<()>>,
    /// The blobs each entry holds pinned (by identity).
    pins: HashMap<String, HashSet<Digest>>,
    /// Blobs pinned by runs not over yet (a count per digest): held too.
    in_flight_pins: HashMap<Digest, usize>,
    /// The pinning entries of the first config whose first run is not over, and whether all
    /// that ended completed. When the last one does, pins no entry holds (left by an earlier
    /// config, before a restart) are let go. `None` once that happened or was given up.
    first_runs: Option<(HashSet<String>, bool)>,
    started: bool,
    /// A reconcile that came before the runtime did.
    pending: bool,
}

#[derive(Clone)]
struct Limits {
    fetches: Arc<Semaphore>,
}

impl Warmer {
    pub fn new(key: WarmKey, pace: Pace, store: BlobStore, metrics: Arc<Metrics>) -> Warmer {
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .read_timeout(READ_TIMEOUT)
            .connect_timeout(Duration::from_secs(10))
            .build()
            .expect("a plain HTTP client builds");
        Warmer {
            inner: Arc::new(Inner {
                key,
                pace,
                store,
                metrics,
                http,
                runtime: Mutex::new(None),
                state: Mutex::new(State {
                    config: None,
                    base: None,
                    limits: Limits {
                        fetches: Arc::new(Semaphore::new(1)),
                    },
                    next_id: 1,
                    jobs: VecDeque::new(),
                    entries: HashMap::new(),
                    pins: HashMap::new(),
                    in_flight_pins: HashMap::new(),
                    first_runs: None,
                    started: false,
                    pending: false,
                }),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn runtime(&self) -> Option<tokio::runtime::Handle> {
        self.inner
            .runtime
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The runtime jobs run on (the warm service's); applies a reconcile made before it.
    pub fn attach(&self, runtime: tokio::runtime::Handle) {
        *self.inner.runtime.lock().unwrap_or_else(|e| e.into_inner()) = Some(runtime);
        let pending = std::mem::take(&mut self.state().pending);
        if pending {
            let config = self.state().config.clone();
            if let Some(config) = config {
                self.reconcile(config);
            }
        }
    }

    /// Stops every refresh loop (shutdown). Pins stay as they are on disk.
    pub fn stop(&self) {
        for (_, task) in self.state().entries.drain() {
            task.abort();
        }
    }

    /// Brings the engine to `config` (at start and after every reload): its limits, and its
    /// `[[warm]]` entries: an unchanged entry keeps its loop and pins, a new one starts now, a
    /// removed one stops and lets go of the pins no other entry holds.
    pub fn reconcile(&self, config: Arc<Config>) {
        let targets = match plan::resolve_config(&config) {
            Ok(t) => t,
            Err(problems) => {
                // `check` refuses such configs; a config value in a test could still get here.
                for (key, message) in problems {
                    tracing::error!(key = %key, "{message}");
                }
                Vec::new()
            }
        };
        let runtime = self.runtime();
        let mut state = self.state();
        let cache = &config.cache;
        state.limits = Limits {
            fetches: Arc::new(Semaphore::new(cache.warm_concurrency.max(1))),
        };
        self.inner.pace.set(cache.warm_bandwidth);
        state.base = config.server.listen.first().map(|a| base_url(*a));
        state.config = Some(Arc::clone(&config));
        let Some(runtime) = runtime else {
            state.pending = true;
            return;
        };
        let wanted: HashMap<String, Target> =
            targets.into_iter().map(|t| (t.identity(), t)).collect();
        let gone: Vec<String> = state
            .entries
            .keys()
            .filter(|id| !wanted.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            if let Some(task) = state.entries.remove(&id) {
                task.abort();
            }
            let held = state.pins.remove(&id).unwrap_or_default();
            state.release(&self.inner.store, held);
            if let Some((waiting, _)) = &mut state.first_runs {
                waiting.remove(&id);
            }
        }
        if !std::mem::replace(&mut state.started, true) {
            let waiting = wanted
                .iter()
                .filter(|(_, t)| t.pin)
                .map(|(id, _)| id.clone())
                .collect();
            state.first_runs = Some((waiting, true));
        }
        self.sweep_if_first_runs_over(&mut state);
        for (id, target) in wanted {
            if state.entries.contains_key(&id) {
                continue;
            }
            let this = self.clone();
            let loop_id = id.clone();
            let task = runtime.spawn(async move { this.entry_loop(loop_id, target).await });
            state.entries.insert(id, task);
        }
    }

    /// One `[[warm]]` entry: warm now, then again every `refresh`.
    async fn entry_loop(self, id: String, target: Target) {
        loop {
            let job = self.new_job("config", vec![target.image.clone()]);
            let held = self.run(&job, std::slice::from_ref(&target)).await;
            if target.pin {
                self.repin(&id, &target, held);
            }
            self.finish(&job);
            match target.refresh {
                Some(every) => tokio::time::sleep(every).await,
                None => return,
            }
        }
    }

    /// After a run of a pinning entry: the blobs of what it resolved to now are pinned (each
    /// was pinned as it arrived); the ones it held before and no longer needs are let go, but
    /// only once the new set is complete (a failed run keeps the old set).
    fn repin(&self, id: &str, target: &Target, held: Option<HashSet<Digest>>) {
        let mut state = self.state();
        if let Some((waiting, all_ok)) = &mut state.first_runs {
            if waiting.remove(id) {
                *all_ok &= held.is_some();
            }
        }
        let Some(new) = held else {
            tracing::warn!(key = %target.key, image = %target.image, "warm run incomplete: the previous content stays pinned");
            self.sweep_if_first_runs_over(&mut state);
            return;
        };
        state.end_in_flight(&new);
        let old = state
            .pins
            .insert(id.to_owned(), new.clone())
            .unwrap_or_default();
        let stale: HashSet<Digest> = old.difference(&new).cloned().collect();
        if !stale.is_empty() {
            tracing::info!(key = %target.key, image = %target.image, unpinned = stale.len(), "warm refresh: the previous content is no longer pinned");
        }
        state.release(&self.inner.store, stale);
        self.sweep_if_first_runs_over(&mut state);
    }

    /// Once every pinning entry of the first config completed its first run: pins that no
    /// entry holds were left by an earlier config (removed entries, tags that moved while
    /// pullgate was down) and are let go. If a first run failed, nothing is: what that entry
    /// held before the restart is unknown.
    fn sweep_if_first_runs_over(&self, state: &mut State) {
        let Some((waiting, all_ok)) = &state.first_runs else {
            return;
        };
        if !waiting.is_empty() {
            return;
        }
        let all_ok = *all_ok;
        state.first_runs = None;
        if !all_ok {
            tracing::warn!("a pinning [[warm]] entry did not complete its first run: pins left by an earlier config stay until the next restart");
            return;
        }
        let orphans: HashSet<Digest> = self
            .inner
            .store
            .pinned_digests()
            .into_iter()
            .filter(|d| !state.holds(d))
            .collect();
        if !orphans.is_empty() {
            tracing::info!(
                unpinned = orphans.len(),
                "pins no [[warm]] entry holds any more are let go"
            );
        }
        state.release(&self.inner.store, orphans);
    }

    /// Starts a job for `POST /warm`; every problem names its key (`images[0]`,
    /// `platforms[1]`) and nothing starts when there is one.
    pub fn submit(&self, request: &WarmRequest) -> Result<JobView, Vec<(String, String)>> {
        let (config, runtime) = (self.state().config.clone(), self.runtime());
        let (Some(config), Some(runtime)) = (config, runtime) else {
            return Err(vec![(
                "warm".into(),
                "the warm engine is not running yet".into(),
            )]);
        };
        if request.images.is_empty() {
            return Err(vec![("images".into(), "give at least one image".into())]);
        }
        if config.server.listen.is_empty() {
            return Err(vec![(
                "server.listen".into(),
                "warm jobs pull through a plain HTTP listener over loopback: this config has none"
                    .into(),
            )]);
        }
        let routes = RouteTable::new(&config.registries);
        let mut targets = Vec::new();
        let mut problems = Vec::new();
        for (j, raw) in request.platforms.iter().enumerate() {
            if let Err(e) = plan::Platform::parse(raw) {
                problems.push((format!("platforms[{j}]"), e));
            }
        }
        for (i, image) in request.images.iter().enumerate() {
            let entry = WarmEntry {
                key: format!("images[{i}]"),
                image: image.clone(),
                platforms: request.platforms.clone(),
                referrers: request.referrers,
                refresh: None,
                pin: false,
                account: None,
            };
            match plan::resolve_entry(&routes, &entry) {
                Ok(t) => targets.push(t),
                // Platform problems are reported once, above, not per image.
                Err(p) => {
                    problems.extend(p.into_iter().filter(|(k, _)| !k.contains(".platforms[")))
                }
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let job = self.new_job("api", request.images.clone());
        let view = job.view();
        let this = self.clone();
        runtime.spawn(async move {
            this.run(&job, &targets).await;
            this.finish(&job);
        });
        Ok(view)
    }

    /// A job by id.
    pub fn job(&self, id: &str) -> Option<JobView> {
        self.state()
            .jobs
            .iter()
            .find(|(i, _)| i == id)
            .map(|(_, j)| j.view())
    }

    /// Every job kept, oldest first.
    pub fn jobs(&self) -> Vec<JobView> {
        self.state().jobs.iter().map(|(_, j)| j.view()).collect()
    }

    fn new_job(&self, source: &'static str, images: Vec<String>) -> Arc<Job> {
        let mut state = self.state();
        let id = state.next_id.to_string();
        state.next_id += 1;
        let job = Arc::new(Job {
            view: Mutex::new(JobView {
                id: id.clone(),
                source,
                images,
                state: "running",
                manifests_done: 0,
                manifests_total: 0,
                blobs_done: 0,
                blobs_total: 0,
                bytes_done: 0,
                bytes_total: 0,
                resolved: Vec::new(),
                errors: Vec::new(),
                started: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                elapsed_ms: 0,
            }),
            started: Instant::now(),
        });
        state.jobs.push_back((id, Arc::clone(&job)));
        while state.jobs.len() > KEPT_JOBS {
            state.jobs.pop_front();
        }
        self.inner.metrics.warm_running.inc();
        job
    }

    fn finish(&self, job: &Job) {
        let view = job.view();
        let outcome = if view.errors.is_empty() {
            "ok"
        } else {
            "failed"
        };
        job.update(|v| v.state = if outcome == "ok" { "done" } else { "failed" });
        let m = &self.inner.metrics;
        m.warm_running.dec();
        m.warm_jobs.with_label_values(&[view.source, outcome]).inc();
        for error in &view.errors {
            tracing::warn!(job = %view.id, "warm: {error}");
        }
        tracing::info!(
            job = %view.id,
            source = view.source,
            images = %view.images.join(" "),
            manifests = view.manifests_done,
            blobs = view.blobs_done,
            bytes = view.bytes_done,
            errors = view.errors.len(),
            elapsed_ms = view.elapsed_ms,
            "warm job {}",
            if outcome == "ok" { "done" } else { "failed" }
        );
    }

    /// Runs the targets of one job. For pinning targets: the blobs pinned, or `None` when
    /// something was not warmed (its errors are in the job).
    async fn run(&self, job: &Job, targets: &[Target]) -> Option<HashSet<Digest>> {
        let (base, limits) = {
            let s = self.state();
            (s.base.clone(), s.limits.clone())
        };
        let Some(base) = base else {
            job.error(
                "warm jobs pull through a plain HTTP listener (server.listen): there is none"
                    .into(),
            );
            return None;
        };
        // At start the engine may be up before the listener accepts.
        let addr = base.trim_start_matches("http://").to_owned();
        let deadline = Instant::now() + LISTENER_WAIT;
        while tokio::net::TcpStream::connect(&addr).await.is_err() {
            if Instant::now() > deadline {
                job.error(format!(
                    "pullgate's own listener {addr} does not accept connections"
                ));
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let run = Run {
            warmer: self,
            job,
            base: &base,
            limits: &limits,
        };
        let mut pinned = HashSet::new();
        let mut complete = true;
        for target in targets {
            match run.target(target).await {
                Ok(set) => pinned.extend(set),
                Err(e) => {
                    job.error(format!("{}: {e}", target.image));
                    complete = false;
                }
            }
        }
        if !complete {
            // An incomplete run holds nothing: what it pinned goes unless something else holds it.
            let mut state = self.state();
            state.end_in_flight(&pinned);
            state.release(&self.inner.store, pinned);
            return None;
        }
        Some(pinned)
    }
}

impl State {
    /// Whether an entry, or a run not over yet, holds `d` pinned.
    fn holds(&self, d: &Digest) -> bool {
        self.in_flight_pins.contains_key(d) || self.pins.values().any(|held| held.contains(d))
    }

    /// Unpins the `digests` nothing holds.
    fn release(&self, store: &BlobStore, digests: HashSet<Digest>) {
        for d in digests {
            if !self.holds(&d) {
                store.unpin(&d);
            }
        }
    }

    fn begin_in_flight(&mut self, d: &Digest) {
        *self.in_flight_pins.entry(d.clone()).or_default() += 1;
    }

    /// The run that pinned `digests` is over (its set is now an entry's, or let go).
    fn end_in_flight(&mut self, digests: &HashSet<Digest>) {
        for d in digests {
            if let Some(n) = self.in_flight_pins.get_mut(d) {
                *n -= 1;
                if *n == 0 {
                    self.in_flight_pins.remove(d);
                }
            }
        }
    }
}

/// `http://` to a listener from this host: an unspecified address is reached on loopback.
fn base_url(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(v4) if v4.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(v6) if v6.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

/// One job's run: where to send, what limits apply.
struct Run<'a> {
    warmer: &'a Warmer,
    job: &'a Job,
    base: &'a str,
    limits: &'a Limits,
}

impl Run<'_> {
    fn request(&self, target: &Target, tail: &str) -> reqwest::RequestBuilder {
        let mut url = format!("{}/v2/{}/{tail}", self.base, target.name);
        if let Some(ns) = &target.ns {
            url.push_str("?ns=");
            url.push_str(&url::form_urlencoded::byte_serialize(ns.as_bytes()).collect::<String>());
        }
        let mut req = self
            .warmer
            .inner
            .http
            .get(url)
            .header(KEY_HEADER, self.warmer.inner.key.header_value())
            .header(
                header::USER_AGENT,
                concat!("pullgate-warm/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(host) = &target.host {
            req = req.header(header::HOST, host);
        }
        if let Some(account) = &target.account {
            req = req.header(ACCOUNT_HEADER, account);
        }
        req
    }

    /// Warms one image; the blobs pinned (when the target pins).
    async fn target(&self, target: &Target) -> Result<HashSet<Digest>, String> {
        self.job.update(|v| v.manifests_total += 1);
        let top = self.manifest(target, target.reference.to_string()).await?;
        self.job.update(|v| {
            v.resolved.push(Resolved {
                image: target.image.clone(),
                digest: top.digest.to_string(),
            })
        });
        let mut images = Vec::new();
        let mut subjects = vec![top.digest.clone()];
        if plan::is_index(&top.media_type, &top.body) {
            let children = plan::select_manifests(&top.body, &target.platforms)?;
            self.job
                .update(|v| v.manifests_total += children.len() as u64);
            let fetched = futures_util::future::join_all(
                children
                    .iter()
                    .map(|c| self.manifest(target, c.digest.to_string())),
            )
            .await;
            for m in fetched {
                let m = m?;
                subjects.push(m.digest.clone());
                images.push(m);
            }
        } else {
            images.push(top);
        }
        let mut blobs: Vec<Descriptor> = images
            .iter()
            .flat_map(|m| plan::blobs_of(&m.body))
            .collect();
        if target.referrers {
            for subject in &subjects {
                for r in self.referrers(target, subject).await? {
                    self.job.update(|v| v.manifests_total += 1);
                    let m = self.manifest(target, r.digest.to_string()).await?;
                    blobs.extend(plan::blobs_of(&m.body));
                }
            }
        }
        let mut seen = HashSet::new();
        blobs.retain(|b| seen.insert(b.digest.clone()));
        self.job.update(|v| {
            v.blobs_total += blobs.len() as u64;
            v.bytes_total += blobs.iter().map(|b| b.size).sum::<u64>();
        });
        let results =
            futures_util::future::join_all(blobs.iter().map(|b| self.blob(target, b))).await;
        let mut pinned = HashSet::new();
        let mut first_error = None;
        for (b, r) in blobs.iter().zip(results) {
            match r {
                Ok(()) if target.pin => match self.pin(&b.digest).await {
                    Ok(()) => {
                        pinned.insert(b.digest.clone());
                    }
                    Err(e @ PinError::OverBudget { .. }) => {
                        tracing::error!(key = %target.key, image = %target.image, "warm: {e}");
                        first_error
                            .get_or_insert(format!("{}: cannot pin {}: {e}", target.key, b.digest));
                    }
                    Err(e) => {
                        first_error.get_or_insert(format!("cannot pin {}: {e}", b.digest));
                    }
                },
                Ok(()) => {}
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => {
                // A failed run leaves nothing pinned that no entry holds.
                let mut state = self.warmer.state();
                state.end_in_flight(&pinned);
                state.release(&self.warmer.inner.store, pinned);
                Err(e)
            }
            None => Ok(pinned),
        }
    }

    async fn pin(&self, digest: &Digest) -> Result<(), PinError> {
        let store = &self.warmer.inner.store;
        store.settled(digest).await;
        let mut state = self.warmer.state();
        store.pin(digest)?;
        state.begin_in_flight(digest);
        Ok(())
    }

    async fn manifest(&self, target: &Target, reference: String) -> Result<Manifest, String> {
        let _permit = self
            .limits
            .fetches
            .acquire()
            .await
            .map_err(|e| e.to_string())?;
        let resp = self
            .request(target, &format!("manifests/{reference}"))
            .header(header::ACCEPT, MANIFEST_ACCEPT)
            .send()
            .await
            .map_err(|e| format!("manifest {reference}: {e}"))?;
        let status = resp.status();
        let media_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|d| Digest::parse(d).ok());
        let body = read_capped(resp, MAX_MANIFEST).await?;
        if !status.is_success() {
            return Err(format!(
                "manifest {reference}: {}",
                answer_error(status, &body)
            ));
        }
        let digest =
            digest.ok_or_else(|| format!("manifest {reference}: no Docker-Content-Digest"))?;
        self.bandwidth(body.len() as u64).await;
        let m = &self.warmer.inner.metrics;
        m.warm_manifests.inc();
        self.job.update(|v| v.manifests_done += 1);
        Ok(Manifest {
            digest,
            media_type,
            body,
        })
    }

    async fn referrers(
        &self,
        target: &Target,
        subject: &Digest,
    ) -> Result<Vec<Descriptor>, String> {
        let _permit = self
            .limits
            .fetches
            .acquire()
            .await
            .map_err(|e| e.to_string())?;
        let resp = self
            .request(target, &format!("referrers/{subject}"))
            .header(header::ACCEPT, "application/vnd.oci.image.index.v1+json")
            .send()
            .await
            .map_err(|e| format!("referrers of {subject}: {e}"))?;
        let status = resp.status();
        let body = read_capped(resp, MAX_MANIFEST).await?;
        if !status.is_success() {
            return Err(format!(
                "referrers of {subject}: {}",
                answer_error(status, &body)
            ));
        }
        Ok(plan::referrers_of(&body))
    }

    async fn blob(&self, target: &Target, blob: &Descriptor) -> Result<(), String> {
        // Not paid here: a fill this request starts reads its upstream through the same
        // bucket (`gateway::blob`), so paying again would halve the cap.
        let _permit = self
            .limits
            .fetches
            .acquire()
            .await
            .map_err(|e| e.to_string())?;
        let mut resp = self
            .request(target, &format!("blobs/{}", blob.digest))
            .send()
            .await
            .map_err(|e| format!("blob {}: {e}", blob.digest))?;
        let status = resp.status();
        if !status.is_success() {
            let body = read_capped(resp, 64 << 10).await.unwrap_or_default();
            return Err(format!(
                "blob {}: {}",
                blob.digest,
                answer_error(status, &body)
            ));
        }
        let mut got = 0u64;
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| format!("blob {}: {e}", blob.digest))?
        {
            let n = chunk.len() as u64;
            got += n;
            self.warmer.inner.metrics.warm_bytes.inc_by(n);
            self.job.update(|v| v.bytes_done += n);
        }
        if blob.size != 0 && got != blob.size {
            return Err(format!(
                "blob {}: got {got} of {} bytes",
                blob.digest, blob.size
            ));
        }
        self.warmer.inner.metrics.warm_blobs.inc();
        self.job.update(|v| v.blobs_done += 1);
        Ok(())
    }

    async fn bandwidth(&self, bytes: u64) {
        if let Some(bucket) = self.warmer.inner.pace.bucket() {
            bucket.pay(bytes).await;
        }
    }
}

struct Manifest {
    digest: Digest,
    media_type: String,
    body: Vec<u8>,
}

async fn read_capped(mut resp: reqwest::Response, cap: usize) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > cap {
            return Err(format!("answer larger than {cap} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The status and the OCI error message pullgate answered with.
fn answer_error(status: reqwest::StatusCode, body: &[u8]) -> String {
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            let e = &v["errors"][0];
            Some(format!(
                "{}: {}",
                e["code"].as_str()?,
                e["message"].as_str().unwrap_or("")
            ))
        });
    match message {
        Some(m) => format!("{} {m}", status.as_u16()),
        None => format!("status {}", status.as_u16()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_on_any_address_are_reached_on_loopback() {
        assert_eq!(
            base_url("0.0.0.0:5000".parse().unwrap()),
            "http://127.0.0.1:5000"
        );
        assert_eq!(base_url("[::]:5000".parse().unwrap()), "http://[::1]:5000");
        assert_eq!(
            base_url("127.0.0.2:80".parse().unwrap()),
            "http://127.0.0.2:80"
        );
    }
}
