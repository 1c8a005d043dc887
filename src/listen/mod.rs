//! Turning the listener config into a running Pingora server.
//!
//! `build_server` is what `pullgate serve` runs and what tests start in-process;
//! `RunningGateway` runs it on a background thread and stops it on demand, so tests need no
//! signals, fixed ports or sleeps.

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};

use crate::config::Config;
use crate::gateway::{Edge, Gateway};
use crate::metrics::Metrics;
pub use reload::{Checked, ConfigSource};

mod admin;
pub mod dev_certs;
pub mod proxy_protocol;
pub mod reload;
pub mod tls;
pub mod upgrade;
mod warm;

/// Seconds in-flight requests get after SIGTERM before the runtime is shut down. Pingora sleeps
/// this long unconditionally (its default is 300), so keep it short and below orchestrators'
/// kill timeouts.
const GRACE_PERIOD_SECS: u64 = 5;
const SHUTDOWN_TIMEOUT_SECS: u64 = 5;

/// What `pullgate serve` starts: a checked config, where it came from, and whether to take
/// the listening sockets over from a running process (`--upgrade`).
pub struct Launch {
    pub checked: Checked,
    pub source: ConfigSource,
    pub upgrade: bool,
}

impl Launch {
    /// Loads and checks `source` as `pullgate check` would.
    pub fn load(source: ConfigSource) -> Result<Launch, Vec<String>> {
        Ok(Launch {
            checked: reload::load_checked(&source)?,
            source,
            upgrade: false,
        })
    }
}

/// Build the Pingora server for a config: one gateway service on every plain and TLS listener
/// (with the PROXY protocol hook when a TLS listener has `proxy_protocol`), the reload service
/// (always: it owns SIGHUP), and the admin listener. Certificate problems are errors naming
/// their key (`server.tls[i].certs[j]`).
pub fn build_server(launch: Launch) -> Result<Server, String> {
    build(launch).map(|(server, _)| server)
}

/// [`build_server`], and the handle to the snapshot in use.
fn build(launch: Launch) -> Result<(Server, Arc<ArcSwap<Gateway>>), String> {
    let Launch {
        checked,
        source,
        upgrade,
    } = launch;
    let config = Arc::new(checked.config);
    let metrics = Arc::new(Metrics::new(config.cache.max_size));
    let tls = config
        .server
        .tls
        .iter()
        .enumerate()
        .map(|(i, listener)| tls::prepare(i, listener, metrics.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let run = upgrade::RunDir::create(&config.cache.dir)?;
    let conf = ServerConf {
        threads: config.server.threads,
        grace_period_seconds: Some(GRACE_PERIOD_SECS),
        graceful_shutdown_timeout_seconds: Some(SHUTDOWN_TIMEOUT_SECS),
        upgrade_sock: run.upgrade_sock().display().to_string(),
        pid_file: run.pid_file().display().to_string(),
        // Pingora polls for the old process once a second; room for a loaded machine.
        upgrade_sock_connect_accept_max_retries: Some(10),
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(opt), conf);
    if upgrade {
        upgrade::signal_old_process(&run)?;
    }
    // With --upgrade: blocks until the old process sent its listening sockets (or exits).
    server.bootstrap();
    if upgrade {
        upgrade::notify_main_pid();
    }
    let gateway = Arc::new(ArcSwap::from_pointee(Gateway::open(
        config.clone(),
        metrics.clone(),
    )?));
    run.write_pid();
    let (handing_over, handing_over_rx) = tokio::sync::watch::channel(false);
    server.add_service(pingora::services::background::background_service(
        "hand-over",
        upgrade::HandOver {
            phases: std::sync::Mutex::new(Some(server.watch_execution_phase())),
            store: gateway.load().store(),
            handing_over,
        },
    ));
    let warmer = crate::warm::Warmer::new(
        gateway.load().warm_key(),
        gateway.load().warm_pace(),
        gateway.load().store(),
        metrics.clone(),
    );
    // Applied once the warm service's runtime runs (`Warmer::attach`).
    warmer.reconcile(config.clone());
    server.add_service(pingora::services::background::background_service(
        "warm",
        warm::WarmService {
            warmer: warmer.clone(),
        },
    ));
    server.add_service(pingora::services::background::background_service(
        "keys",
        StopKeys(gateway.clone()),
    ));
    server.add_service(pingora::services::background::background_service(
        "cluster-probe",
        ProbePeers(gateway.clone()),
    ));
    let reloader = Arc::new(reload::Reloader::new(
        source,
        gateway.clone(),
        metrics.clone(),
        checked.sha256,
        warmer.clone(),
    ));
    if let Some(addr) = config.server.admin_listen {
        let every_listener = config
            .server
            .listen
            .iter()
            .copied()
            .chain(config.server.tls.iter().map(|t| t.listen))
            .collect();
        let parts = admin::Parts {
            metrics: metrics.clone(),
            store: gateway.load().store(),
            gateway_listeners: every_listener,
            reloader: reloader.clone(),
            handing_over: handing_over_rx,
            warmer,
        };
        let admin = admin::Admin::bind(addr, upgrade, parts)?;
        server.add_service(pingora::services::background::background_service(
            "admin", admin,
        ));
    }
    let hook = proxy_protocol::ProxyProtocol::for_config(&config, metrics.clone(), gateway.clone());
    let mut service =
        pingora::proxy::http_proxy_service(&server.configuration, Edge::new(gateway.clone()));
    for addr in &config.server.listen {
        service.add_listener(ListenerConfig::tcp(addr.to_string()).l4_buffer(write_buffer()));
    }
    if let Some(hook) = hook {
        // One hook for the whole service: Pingora keeps it per `Listeners`; it looks up the
        // listener of each connection (see `proxy_protocol`).
        service.endpoints().set_pre_tls_callback(Arc::new(hook));
    }
    let mut resolvers = Vec::new();
    for (listener, prepared) in config.server.tls.iter().zip(tls) {
        let endpoint = ListenerConfig::tcp(listener.listen.to_string())
            .tls(prepared.settings)
            .l4_buffer(write_buffer());
        service.add_listener(endpoint);
        resolvers.push(prepared.resolver);
    }
    server.add_service(service);
    // Even with no TLS listener: SIGHUP's default action ends the process, and `systemctl
    // reload` (deploy/systemd/pullgate.service ExecReload) sends it whatever the config is.
    server.add_service(pingora::services::background::background_service(
        "reloader",
        reload::ReloadService {
            certs: tls::CertReloader::new(resolvers),
            config: reloader,
            // Only the pullgate binary restarts itself (not a test binary serving in-process).
            exe: std::env::current_exe().ok().filter(|exe| {
                exe.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("pullgate"))
            }),
        },
    ));
    Ok((server, gateway))
}

/// Bytes a connection gathers before a send. Pingora's default (1460, one segment) sends a
/// response head on its own whenever a body follows, so a small blob or manifest took two
/// sends (and two wake-ups of the client); with room for the head and a small body they leave
/// together when the response ends. Larger bodies are written straight through as before. The
/// buffer is allocated per connection: 16 KiB x 1,000 keep-alive clients = 16 MiB.
pub const WRITE_BUFFER: usize = 16 * 1024;

fn write_buffer() -> L4BufferSettings {
    L4BufferSettings::default().write(WRITE_BUFFER)
}

/// A gateway running on a background thread of this process.
pub struct RunningGateway {
    gateway: Arc<ArcSwap<Gateway>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub listen: Vec<SocketAddr>,
}

struct StopChannel(tokio::sync::Mutex<Option<tokio::sync::oneshot::Receiver<()>>>);

#[async_trait]
impl ShutdownSignalWatch for StopChannel {
    async fn recv(&self) -> ShutdownSignal {
        if let Some(rx) = self.0.lock().await.take() {
            let _ = rx.await;
        }
        ShutdownSignal::FastShutdown
    }
}

impl RunningGateway {
    /// Start the config file at `path` in this process, as `pullgate serve -c` would (so it
    /// reloads too), and wait until every listener accepts connections.
    pub fn start_file(path: &std::path::Path) -> Result<RunningGateway, String> {
        let launch = Launch::load(ConfigSource::File(path.to_owned()))
            .map_err(|errors| errors.join("\n"))?;
        let config = launch.checked.config.clone();
        RunningGateway::run(build(launch)?, &config)
    }

    /// Start `config` in this process and wait (polling, at most 10 s) until every listener
    /// accepts connections. It has no file to reload from (reloads are refused); use
    /// [`RunningGateway::start_file`] for that.
    pub fn start(config: Arc<Config>) -> Result<RunningGateway, String> {
        let launch = Launch {
            checked: Checked {
                config: (*config).clone(),
                sha256: String::new(),
            },
            source: ConfigSource::Value,
            upgrade: false,
        };
        RunningGateway::run(build(launch)?, &config)
    }

    fn run(
        (server, gateway): (Server, Arc<ArcSwap<Gateway>>),
        config: &Config,
    ) -> Result<RunningGateway, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let watch = StopChannel(tokio::sync::Mutex::new(Some(rx)));
        let thread = std::thread::spawn(move || {
            server.run(RunArgs {
                shutdown_signal: Box::new(watch),
            })
        });
        let running = RunningGateway {
            gateway,
            stop: Some(tx),
            thread: Some(thread),
            listen: config
                .server
                .listen
                .iter()
                .chain(config.server.tls.iter().map(|t| &t.listen))
                .chain(config.server.admin_listen.iter())
                .copied()
                .collect(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        for addr in &running.listen {
            while TcpStream::connect_timeout(addr, Duration::from_millis(200)).is_err() {
                if Instant::now() > deadline {
                    return Err(format!("gateway did not start listening on {addr}"));
                }
                std::thread::yield_now();
            }
        }
        Ok(running)
    }

    /// Stop the server and wait for its thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Pingora may keep the services (and so the snapshot) alive past its run.
        if let Some(keys) = self.gateway.load().keys() {
            keys.stop();
        }
    }
}

/// Stops the key service's checks when shutdown starts (or this process hands the cache to
/// a new one), so only one process at a time rotates and re-wraps the keyring.
struct StopKeys(Arc<ArcSwap<Gateway>>);

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for StopKeys {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let _ = shutdown.changed().await;
        if let Some(keys) = self.0.load().keys() {
            keys.stop();
        }
    }
}

/// Probes the cluster's other members every [`PROBE_INTERVAL`] with the gateway in use (a
/// reload may add or remove `[cluster]`), until shutdown.
///
/// [`PROBE_INTERVAL`]: crate::gateway::PROBE_INTERVAL
struct ProbePeers(Arc<ArcSwap<Gateway>>);

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for ProbePeers {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(crate::gateway::PROBE_INTERVAL) => {}
                _ = shutdown.changed() => return,
            }
            let gateway = self.0.load_full();
            gateway.probe_peers().await;
        }
    }
}

impl Drop for RunningGateway {
    fn drop(&mut self) {
        self.shutdown();
    }
}
