//! Host names for real clients without touching the machine's /etc/hosts: the client runs in a
//! private mount namespace (`unshare --mount`) where a temp file is bind-mounted over
//! /etc/hosts. Only that process (and its children) sees the names; nothing is left behind when
//! it exits. Go clients (skopeo, ctr) read /etc/hosts, and do not map `*.localhost` to loopback
//! on their own. Needs root (CAP_SYS_ADMIN), as the containerd tests do.

use std::path::Path;
use std::process::Command;

/// A hosts file naming every host 127.0.0.1.
pub struct PrivateHosts {
    file: tempfile::NamedTempFile,
    names: Vec<String>,
}

impl PrivateHosts {
    pub fn new(names: &[&str]) -> PrivateHosts {
        use std::io::Write;
        let mut file = tempfile::Builder::new()
            .prefix("hosts-")
            .tempfile()
            .expect("temp hosts file");
        writeln!(file, "127.0.0.1 localhost").expect("write hosts");
        for name in names {
            writeln!(file, "127.0.0.1 {name}").expect("write hosts");
        }
        file.flush().expect("flush hosts");
        PrivateHosts {
            file,
            names: names.iter().map(|n| n.to_string()).collect(),
        }
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// `cmd` (program, arguments, environment, working dir) run with these names. The names
    /// are added to `NO_PROXY` inside the namespace, after `isolate_env` has pointed every proxy
    /// variable at a closed port, so they are reached directly and nothing else is.
    pub fn wrap(&self, cmd: &Command) -> Command {
        let names = self.names.join(",");
        let script = format!(
            "mount --bind \"$0\" /etc/hosts && NO_PROXY=\"$NO_PROXY,{names}\" no_proxy=\"$no_proxy,{names}\" exec \"$@\""
        );
        let mut wrapped = Command::new("unshare");
        wrapped
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(script)
            .arg(self.path())
            .arg(cmd.get_program())
            .args(cmd.get_args());
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
