//! Binary upgrade without a dropped connection, on Pingora's graceful upgrade.
//!
//! `pullgate serve --upgrade` starts next to the running pullgate of the same cache directory,
//! waits for the listening sockets on a Unix socket in `<cache.dir>/run/` (mode 0700: Pingora
//! makes the socket itself world-writable, so the directory is what keeps others out), and
//! sends the running process SIGQUIT once it is ready to receive them. The old process hands
//! the sockets over, accepts alongside the new one for Pingora's 5 s, then stops accepting,
//! finishes its requests and fills within the grace period, and exits.
//!
//! Two processes share the cache during the hand-over. What keeps that safe: the old process
//! stops deleting blob files once it hands over (its evictions could remove a file the new
//! process indexed); temp files of live fills carry their process id and the new process
//! leaves those of a living process alone; and a blob the old process commits after the new
//! one started is found on disk by the new one instead of fetched again (`store`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::{ExecutionPhase, ShutdownWatch};
use pingora::services::background::BackgroundService;
use tokio::sync::{broadcast, watch};

use crate::store::BlobStore;

/// How long `--upgrade` waits for its upgrade socket before giving up on signalling.
const SIGNAL_WAIT: Duration = Duration::from_secs(10);

/// The private run directory of a cache: the upgrade socket and the pid file.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub dir: PathBuf,
}

impl RunDir {
    /// `<cache.dir>/run`, created with mode 0700. Unix socket paths are limited to 107 bytes,
    /// so a very deep `cache.dir` is an error naming the key.
    pub fn create(cache_dir: &Path) -> Result<RunDir, String> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let dir = cache_dir.join("run");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .and_then(|()| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)))
            .map_err(|e| format!("cache.dir: cannot create {}: {e}", dir.display()))?;
        let run = RunDir { dir };
        let sock = run.upgrade_sock();
        if sock.as_os_str().len() > 107 {
            return Err(format!(
                "cache.dir: {} is too long for a Unix socket path (107 bytes); choose a shorter cache.dir",
                sock.display()
            ));
        }
        Ok(run)
    }

    pub fn upgrade_sock(&self) -> PathBuf {
        self.dir.join("upgrade.sock")
    }

    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("pullgate.pid")
    }

    /// Records this process as the one serving the cache (read by the next `--upgrade`).
    pub fn write_pid(&self) {
        let path = self.pid_file();
        let tmp = self.dir.join("pullgate.pid.tmp");
        let written = std::fs::write(&tmp, format!("{}\n", std::process::id()))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the pid file; a later --upgrade will not find this process");
        }
    }

    /// The pid of the pullgate serving this cache now, if it is alive and is pullgate.
    fn running_pid(&self) -> Result<i32, String> {
        let path = self.pid_file();
        let text = std::fs::read_to_string(&path).map_err(|e| {
            format!(
                "no pullgate to take over: cannot read {}: {e}",
                path.display()
            )
        })?;
        let pid: i32 = text
            .trim()
            .parse()
            .map_err(|_| format!("{} does not hold a process id", path.display()))?;
        if pid == std::process::id() as i32 {
            return Err("the pid file names this process".into());
        }
        // Guards against a stale file whose pid now belongs to something else.
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if !comm.trim_end().starts_with("pullgate") {
            return Err(format!(
                "no pullgate to take over: process {pid} from {} is not running pullgate",
                path.display()
            ));
        }
        Ok(pid)
    }
}

/// For `--upgrade`: checks now that there is a process to take over, then (on a thread, while
/// Pingora's bootstrap waits for the sockets) sends it SIGQUIT as soon as the upgrade socket
/// listens. Pingora's bootstrap unlinks and re-creates the socket, so one that exists after
/// `stale` was removed here is the new one.
pub fn signal_old_process(run: &RunDir) -> Result<(), String> {
    let pid = run.running_pid()?;
    let sock = run.upgrade_sock();
    let _ = std::fs::remove_file(&sock);
    std::thread::spawn(move || {
        use std::os::unix::fs::FileTypeExt;
        let deadline = Instant::now() + SIGNAL_WAIT;
        while !std::fs::metadata(&sock).is_ok_and(|m| m.file_type().is_socket()) {
            if Instant::now() > deadline {
                tracing::error!(socket = %sock.display(), "upgrade socket never appeared; not signalling the old process");
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let Some(target) = rustix::process::Pid::from_raw(pid) else {
            return;
        };
        match rustix::process::kill_process(target, rustix::process::Signal::QUIT) {
            Ok(()) => tracing::info!(
                pid,
                "asked the running pullgate to hand its sockets over (SIGQUIT)"
            ),
            Err(e) => tracing::error!(pid, error = %e, "cannot signal the running pullgate"),
        }
    });
    Ok(())
}

/// SIGUSR2: start `exe serve --upgrade` as a child of this process, so it runs in the same
/// service (systemd cgroup) and takes the sockets over; this process then drains and exits.
/// `exe` is the path this process was started from, read at start: a binary replaced on disk
/// since then is the one that runs.
pub fn spawn_successor(exe: &Path, config: Option<&Path>) {
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("serve").arg("--upgrade");
    if let Some(path) = config {
        cmd.arg("-c").arg(path);
    }
    match cmd.spawn() {
        Ok(child) => {
            tracing::info!(pid = child.id(), exe = %exe.display(), "SIGUSR2: started the new process to hand over to")
        }
        Err(e) => {
            tracing::error!(exe = %exe.display(), error = %e, "SIGUSR2: cannot start the new process; still serving")
        }
    }
}

/// Tells systemd this process is now the service's main process (`MAINPID=`), when it runs
/// under a unit with `NotifyAccess=all` (which sets `NOTIFY_SOCKET`). Without it systemd would
/// count the old process's exit as the service's end.
pub fn notify_main_pid() {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let message = format!("MAINPID={}\nREADY=1\n", std::process::id());
    let sent = std::os::unix::net::UnixDatagram::unbound().and_then(|sock| {
        let bytes = socket.as_encoded_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(message.as_bytes(), &addr)
        } else {
            sock.send_to(message.as_bytes(), &socket)
        }
    });
    match sent {
        Ok(_) => tracing::info!("told systemd this process is the service's main process now"),
        Err(e) => tracing::warn!(error = %e, "cannot notify systemd of the new main process"),
    }
}

/// Watches Pingora's execution phase: when this process starts handing its sockets to a new
/// one, it stops deleting blob files and lets go of the admin port (so the new process can
/// bind it).
pub struct HandOver {
    pub phases: std::sync::Mutex<Option<broadcast::Receiver<ExecutionPhase>>>,
    pub store: BlobStore,
    /// Set to true at the hand-over; the admin listener closes on it.
    pub handing_over: watch::Sender<bool>,
}

#[async_trait]
impl BackgroundService for HandOver {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(mut phases) = self.phases.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return;
        };
        // Pingora announces the upgrade phase before it broadcasts the shutdown.
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                phase = phases.recv() => match phase {
                    Ok(ExecutionPhase::GracefulUpgradeTransferringFds) => {
                        tracing::info!("handing over to a new process: blob files are no longer deleted here");
                        self.store.hand_over();
                        let _ = self.handing_over.send(true);
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }
}
