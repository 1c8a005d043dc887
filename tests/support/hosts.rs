//! Host names for real clients without touching the machine's /etc/hosts: the client runs in a
//! private mount namespace (`unshare --mount`) where a temp file is bind-mounted over
//! /etc/hosts. Only that process (and its children) sees the names; nothing is left behind when
//! it exits. Go clients (skopeo, ctr) read /etc/hosts, and do not map `*.localhost` to loopback
//! on their own. Needs root (CAP_SYS_ADMIN), as the containerd tests do.
//!
//! The same namespace can carry more bind mounts ([`PrivateHosts::bind`]): a temp dir over a
//! fixed directory a client reads its configuration from (dockerd's /etc/docker/certs.d). The
//! mount point must exist already; it is never created, so the machine is left as it was.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A hosts file naming every host one loopback address (127.0.0.1 unless [`PrivateHosts::at`]),
/// and the extra bind mounts of the namespace.
pub struct PrivateHosts {
    file: tempfile::NamedTempFile,
    names: Vec<String>,
    /// (source, mount point) pairs, mounted in this order after /etc/hosts.
    binds: Vec<(PathBuf, PathBuf)>,
}

impl PrivateHosts {
    pub fn new(names: &[&str]) -> PrivateHosts {
        PrivateHosts::at("127.0.0.1", names)
    }

    /// Every name resolves to `addr` (`localhost` stays 127.0.0.1).
    pub fn at(addr: &str, names: &[&str]) -> PrivateHosts {
        use std::io::Write;
        let mut file = tempfile::Builder::new()
            .prefix("hosts-")
            .tempfile()
            .expect("temp hosts file");
        writeln!(file, "127.0.0.1 localhost").expect("write hosts");
        for name in names {
            writeln!(file, "{addr} {name}").expect("write hosts");
        }
        file.flush().expect("flush hosts");
        PrivateHosts {
            file,
            names: names.iter().map(|n| n.to_string()).collect(),
            binds: Vec::new(),
        }
    }

    /// Also bind-mounts `source` over `target` inside the namespace. `target` must exist on the
    /// machine (panics otherwise: creating it would change the machine).
    pub fn bind(mut self, source: &Path, target: &Path) -> PrivateHosts {
        assert!(
            target.exists(),
            "{} does not exist: the test does not create mount points on the machine",
            target.display()
        );
        self.binds
            .push((source.to_path_buf(), target.to_path_buf()));
        self
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// `cmd` (program, arguments, environment, working dir) run with these names. The names
    /// are added to `NO_PROXY` inside the namespace, after `isolate_env` has pointed every proxy
    /// variable at a closed port, so they are reached directly and nothing else is. `unshare`
    /// and `sh` exec the program: the child's PID is the program's. Stdio is not carried over
    /// (a `Command` does not tell it): set it on the returned command.
    pub fn wrap(&self, cmd: &Command) -> Command {
        let names = self.names.join(",");
        let binds = "mount --bind \"$1\" \"$2\" && shift 2 && ".repeat(self.binds.len());
        let script = format!(
            "mount --bind \"$0\" /etc/hosts && {binds}NO_PROXY=\"$NO_PROXY,{names}\" no_proxy=\"$no_proxy,{names}\" exec \"$@\""
        );
        let mut wrapped = Command::new("unshare");
        wrapped
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(script)
            .arg(self.path());
        for (source, target) in &self.binds {
            wrapped.arg(source).arg(target);
        }
        wrapped.arg(cmd.get_program()).args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => wrapped.env(k, v),
                None => wrapped.env_remove(k),
            };
        }
        if let Some(dir) = cmd.get_current_dir() {
            wrapped.current_dir(dir);
        }
        wrapped
    }
}
