//! deploy/systemd/pullgate.service and the example /etc/pullgate/config.toml beside it.

use std::collections::BTreeMap;
use std::process::Command;

use std::time::Duration;

use crate::{
    drain_seconds, free_port, http_status, parse_toml, poll, pullgate_check, read, repo, show,
    warnings, Running, BIN,
};

const UNIT: &str = "deploy/systemd/pullgate.service";
const CONFIG: &str = "deploy/systemd/config.toml";
/// Where the unit installs the binary and where it reads the config.
const INSTALLED_BIN: &str = "/usr/local/bin/pullgate";
const INSTALLED_CONFIG: &str = "/etc/pullgate/config.toml";

/// `section -> key -> values` (a key may repeat), comments and blank lines dropped.
fn parse_unit(text: &str) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let mut sections: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut current = String::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name.to_owned();
            continue;
        }
        assert!(
            !current.is_empty(),
            "{UNIT}:{}: key outside a section",
            n + 1
        );
        assert!(!line.ends_with('\\'), "{UNIT}:{}: keep lines whole", n + 1);
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{UNIT}:{}: not key=value: {line}", n + 1));
        sections
            .entry(current.clone())
            .or_default()
            .entry(key.trim().to_owned())
            .or_default()
            .push(value.trim().to_owned());
    }
    sections
}

/// systemd's time span in seconds ("30s", "1min", "90").
fn seconds(span: &str) -> u64 {
    let span = span.trim();
    if let Some(s) = span.strip_suffix("min") {
        return s.trim().parse::<u64>().expect("minutes") * 60;
    }
    span.trim_end_matches('s')
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("time span {span:?}"))
}

#[test]
fn the_unit_has_the_hardening_and_lifecycle_directives() {
    let unit = parse_unit(&read(&repo(UNIT)));
    let service = &unit["Service"];
    let one = |key: &str| -> &str {
        let values = service
            .get(key)
            .unwrap_or_else(|| panic!("{UNIT}: [Service] {key}= missing"));
        assert_eq!(values.len(), 1, "{UNIT}: one {key}=");
        &values[0]
    };
    for (key, want) in [
        ("DynamicUser", "yes"),
        ("CacheDirectory", "pullgate"),
        ("StateDirectory", "pullgate"),
        ("ConfigurationDirectory", "pullgate"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("NoNewPrivileges", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
        ("UMask", "0077"),
        // The only capability, for binding :443; nothing else in the bounding set.
        ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
        ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
        ("Restart", "on-failure"),
        ("KillSignal", "SIGTERM"),
        ("Type", "exec"),
    ] {
        assert_eq!(one(key), want, "{UNIT}: {key}=");
    }
    assert_eq!(
        one("ExecStart"),
        format!("{INSTALLED_BIN} serve -c {INSTALLED_CONFIG}")
    );
    // SIGHUP re-reads the TLS certificates (src/listen/tls.rs); `kill` must name the main PID.
    assert_eq!(one("ExecReload"), "/bin/kill -HUP $MAINPID");
    // systemd's SIGKILL must not cut the drain short: pullgate needs drain_seconds() at most.
    let stop = seconds(one("TimeoutStopSec"));
    assert!(
        stop >= drain_seconds() + 10,
        "TimeoutStopSec={stop}s leaves too little after the {}s drain",
        drain_seconds()
    );
    assert!(
        service["SystemCallFilter"].contains(&"@system-service".to_owned()),
        "SystemCallFilter=@system-service"
    );
    let families = one("RestrictAddressFamilies");
    for family in families.split_whitespace() {
        assert!(
            ["AF_INET", "AF_INET6", "AF_UNIX"].contains(&family),
            "{family}"
        );
    }
    assert_eq!(unit["Install"]["WantedBy"], ["multi-user.target"]);
    assert!(unit["Unit"]["After"][0].contains("network-online.target"));

    // The config the unit runs writes only where the unit lets it: the cache directory.
    let config = parse_toml(&read(&repo(CONFIG)));
    assert_eq!(
        config["cache"]["dir"].as_str(),
        Some(format!("/var/cache/{}", one("CacheDirectory")).as_str()),
        "cache.dir is the unit's CacheDirectory"
    );
    assert!(INSTALLED_CONFIG.starts_with(&format!("/etc/{}/", one("ConfigurationDirectory"))));
}

#[test]
fn pullgate_check_accepts_the_example_config_strictly() {
    let out = pullgate_check(&repo(CONFIG), true, &[]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(warnings(&out).is_empty(), "{}", show(&out));
}

/// `systemd-analyze verify` on the unit (its ExecStart pointed at the binary under test, which
/// verify requires to exist) reports nothing, and `systemd-analyze security` rates it OK.
#[test]
fn systemd_analyze_verifies_the_unit_and_rates_it_ok() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        // The unit is still parsed and checked by the test above.
        eprintln!(
            "systemd-analyze not installed: skipping verify and security (Debian package systemd)"
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = dir.path().join("pullgate.service");
    let text = read(&repo(UNIT)).replace(INSTALLED_BIN, BIN);
    std::fs::write(&unit, text).expect("write unit");

    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("systemd-analyze verify");
    assert!(out.status.success(), "{}", show(&out));
    // verify exits 0 on unknown keys and bad values too; it reports them on stderr.
    assert!(
        out.stderr.is_empty() && out.stdout.is_empty(),
        "{}",
        show(&out)
    );

    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
        .expect("systemd-analyze security");
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for pullgate.service:")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no exposure level:\n{}", show(&out)));
    assert!(score <= 2.0, "exposure {score} (want OK, <= 2.0):\n{text}");
}

/// Whether the process has a handler for SIGHUP (bit 0 of SigCgt in /proc/PID/status).
fn catches_sighup(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            let hex = status.lines().find_map(|l| l.strip_prefix("SigCgt:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .is_some_and(|mask| mask & 1 == 1)
}

/// The example config, run as the unit runs it (addresses moved to free loopback ports, the
/// cache to a temp dir): the unit's own ExecReload command leaves it serving, and SIGTERM
/// ends it within the drain, well before TimeoutStopSec.
#[test]
fn reload_keeps_the_service_running_and_stop_ends_it_within_the_drain() {
    let unit = parse_unit(&read(&repo(UNIT)));
    let dir = tempfile::tempdir().expect("tempdir");
    let config = parse_toml(&read(&repo(CONFIG)));
    let mut text = read(&repo(CONFIG)).replace(
        &format!(
            "\"{}\"",
            config["cache"]["dir"].as_str().expect("cache.dir")
        ),
        &format!("\"{}\"", dir.path().join("cache").display()),
    );
    let admin: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let listen = config["server"]["listen"].as_array().expect("listen");
    for old in listen.iter().chain([&config["server"]["admin_listen"]]) {
        let old = old.as_str().expect("address");
        let new = if *old == *config["server"]["admin_listen"].as_str().expect("admin") {
            admin.to_string()
        } else {
            format!("127.0.0.1:{}", free_port())
        };
        text = text.replace(&format!("\"{old}\""), &format!("\"{new}\""));
    }
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).expect("config");

    let mut running = Running::serve(&path, &[]);
    assert!(
        poll(Duration::from_secs(20), || http_status(admin, "/readyz")
            == Some(200)),
        "/readyz 200"
    );
    let pid = running.pid();
    assert!(
        poll(Duration::from_secs(10), || catches_sighup(pid)),
        "pullgate handles SIGHUP"
    );
    let reload = unit["Service"]["ExecReload"][0].replace("$MAINPID", &pid.to_string());
    let words: Vec<&str> = reload.split_whitespace().collect();
    let status = std::process::Command::new(words[0])
        .args(&words[1..])
        .status()
        .expect("ExecReload");
    assert!(status.success(), "{reload}");
    assert!(
        !poll(Duration::from_millis(500), || running.exited()),
        "pullgate survives `systemctl reload`"
    );
    assert_eq!(http_status(admin, "/readyz"), Some(200));

    let took = running
        .terminate(Duration::from_secs(drain_seconds() + 10))
        .expect("exits after SIGTERM");
    let stop = seconds(&unit["Service"]["TimeoutStopSec"][0]);
    assert!(took < Duration::from_secs(stop), "exit took {took:?}");
    assert!(
        took <= Duration::from_secs(drain_seconds() + 3),
        "exit took {took:?}"
    );
}
