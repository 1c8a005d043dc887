//! What operators see: `/metrics` after known traffic (accepted by `promtool`), `/readyz`
//! across start and graceful shutdown, JSON logs, and no secret in any log line or response.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::{get, registry, request, Gateway, MANIFEST_ACCEPT};
use crate::support::{
    free_port, skopeo_copy_to_oci, wait_until, ChildGuard, ClientTls, TestImage, Upstream,
    UpstreamOptions,
};

const BIN: &str = env!("CARGO_BIN_EXE_pullgate");

/// The value of the sample whose line starts with `series` (name and labels exactly as
/// rendered), 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn a_scrape_after_known_traffic_shows_it_and_promtool_accepts_it() {
    let up = Upstream::start(UpstreamOptions::default());
    let img = TestImage::small("metrics");
    up.push(&img, "team/app:v1");
    let gw = Gateway::start(&registry("hub", &up, "default = true"));
    let layer = img.layer_digests()[0].clone();
    let size = img.blob_bytes(&layer).len() as f64;

    let blob = gw.url(&format!("/v2/team/app/blobs/{layer}"));
    assert_eq!(get(&blob).status, 200);
    wait_until(Duration::from_secs(5), "the fill to commit", || {
        get(&gw.admin_url("/metrics"))
            .body
            .windows(38)
            .any(|w| w == b"pullgate_cache_fills_committed_total 1")
    })
    .expect("committed");
    assert_eq!(get(&blob).status, 200);
    let manifest = gw.url("/v2/team/app/manifests/v1");
    assert_eq!(
        request("GET", &manifest, &[("Accept", MANIFEST_ACCEPT)]).status,
        200
    );
    assert_eq!(get(&gw.url("/v2/team/app/manifests/nope")).status, 404);

    let scrape = get(&gw.admin_url("/metrics"));
    assert_eq!(scrape.status, 200);
    let text = String::from_utf8(scrape.body).expect("utf-8");
    let series = |labels: &str| format!("pullgate_requests_total{{{labels}}}");
    for (labels, want) in [
        (
            r#"cache="fill",kind="blob",method="GET",registry="hub",status="2xx""#,
            1.0,
        ),
        (
            r#"cache="hit",kind="blob",method="GET",registry="hub",status="2xx""#,
            1.0,
        ),
        (
            r#"cache="miss",kind="manifest",method="GET",registry="hub",status="2xx""#,
            1.0,
        ),
        (
            r#"cache="-",kind="manifest",method="GET",registry="hub",status="4xx""#,
            1.0,
        ),
    ] {
        assert_eq!(sample(&text, &series(labels)), want, "{labels}\n{text}");
    }
    assert_eq!(
        sample(
            &text,
            r#"pullgate_served_bytes_total{registry="hub",source="cache"}"#
        ),
        size
    );
    assert_eq!(sample(&text, "pullgate_cache_fills_started_total"), 1.0);
    assert_eq!(sample(&text, "pullgate_cache_fills_committed_total"), 1.0);
    assert_eq!(sample(&text, "pullgate_cache_entries"), 1.0);
    assert!(
        sample(
            &text,
            r#"pullgate_token_fetches_total{outcome="ok",registry="hub"}"#
        ) >= 1.0
    );
    assert!(
        sample(
            &text,
            r#"pullgate_upstream_requests_total{method="GET",registry="hub",status="2xx"}"#
        ) >= 2.0
    );
    assert!(!text.contains("team/app"), "no repository names as labels");

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus)");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = promtool.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(get(&gw.admin_url("/healthz")).status, 200);

    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/alerts.yml");
    let out = Command::new("promtool")
        .args(["check", "rules", rules])
        .output()
        .expect("promtool");
    assert!(
        out.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The admin status of `/readyz`, or 0 when nothing answers.
fn readyz(port: u16) -> u16 {
    let url = format!("http://127.0.0.1:{port}/readyz");
    crate::support::block_on(async move {
        match crate::support::http_client(None).get(&url).send().await {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        }
    })
}

#[test]
fn readyz_turns_200_once_listening_and_503_during_graceful_shutdown_and_logs_are_json() {
    let up = Upstream::start(UpstreamOptions::default());
    let img = TestImage::small("readyz");
    up.push(&img, "team/app:v1");
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, admin) = (free_port(), free_port());
    let password = up.password().to_string();
    let password_file = dir.path().join("password");
    std::fs::write(&password_file, &password).expect("password file");
    let config = dir.path().join("pullgate.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\nadmin_listen = \"127.0.0.1:{admin}\"\nlog_format = \"json\"\n\
             [cache]\ndir = \"cache\"\n[[registry]]\nname = \"hub\"\nupstream = \"{}\"\nca = \"{}\"\ndefault = true\n\
             credentials = {{ username = \"{}\", password_file = \"{}\" }}\n",
            up.url(),
            up.pki().ca_path().display(),
            up.user(),
            password_file.display()
        ),
    )
    .expect("config");
    let mut child = Command::new(BIN)
        .args(["serve", "-c"])
        .arg(&config)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pullgate");
    let pid = child.id();
    // Drained on threads so a chatty log never fills the pipe and blocks pullgate.
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stderr = drain(Box::new(child.stderr.take().expect("stderr")));
    let stdout = drain(Box::new(child.stdout.take().expect("stdout")));
    let mut guard = ChildGuard::new(child);

    let mut seen = Vec::new();
    wait_until(Duration::from_secs(10), "/readyz 200", || {
        let s = readyz(admin);
        seen.push(s);
        s == 200
    })
    .expect("ready");
    assert!(seen.iter().all(|s| [0, 503, 200].contains(s)), "{seen:?}");

    // A full pull with injected credentials, so the logs have every chance to leak them.
    let pulled = skopeo_copy_to_oci(
        &format!("127.0.0.1:{port}/team/app:v1"),
        ClientTls::Plain,
        None,
        false,
    )
    .expect("pull");
    assert_eq!(pulled.manifest_digest, img.manifest_digest());

    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill -TERM");
    wait_until(Duration::from_secs(5), "/readyz 503 while draining", || {
        readyz(admin) == 503
    })
    .expect("not ready during the grace period");
    wait_until(Duration::from_secs(20), "pullgate to exit", || {
        !guard.is_running()
    })
    .expect("exits after the grace period");

    let logs = stderr.join().expect("stderr") + &stdout.join().expect("stdout");
    let mut access = 0;
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        let json: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if json["target"] == "pullgate::access" {
            access += 1;
            assert!(json["request_id"].as_str().is_some_and(|id| id.len() == 16));
        }
    }
    assert!(access >= 3, "one access line per request");
    assert!(
        !logs.contains(&password),
        "the upstream password never appears in a log"
    );
    assert!(
        !logs.contains("eyJ"),
        "no bearer token (JWT) appears in a log"
    );
}
