//! Config reload while clients pull: a new registry, new credentials, a narrowed zone and a new
//! identity, each applied by a file edit (polling), `POST /-/reload` and SIGHUP, with a pull
//! loop running throughout that must never fail; an invalid or refused edit changes nothing;
//! a pull in flight finishes on the config it started with.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;

use crate::harness::{client_from, get, registry, request, request_with, Gateway, MANIFEST_ACCEPT};
use crate::support::{block_on, sha256_hex, wait_until, TestImage, Upstream, UpstreamOptions};

const MIB: usize = 1024 * 1024;
const NEW_PASSWORD: &str = "reloaded-identity-9c1";

/// Clients pulling a manifest and a blob in a loop until stopped; counts answers and failures
/// (any status but 200, or bytes that do not hash to the digest asked for).
struct PullLoop {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl PullLoop {
    fn start(clients: usize, manifest_url: String, blob_url: String, blob_digest: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let tasks = (0..clients)
            .map(|_| {
                let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
                let (manifest_url, blob_url, digest) =
                    (manifest_url.clone(), blob_url.clone(), blob_digest.clone());
                crate::support::rt().spawn(async move {
                    let client = reqwest::Client::builder()
                        .no_proxy()
                        .build()
                        .expect("client");
                    while !stop.load(Ordering::SeqCst) {
                        let manifest = client
                            .get(&manifest_url)
                            .header("Accept", MANIFEST_ACCEPT)
                            .send()
                            .await;
                        let blob = client.get(&blob_url).send().await;
                        for (what, answer, want) in
                            [("manifest", manifest, None), ("blob", blob, Some(&digest))]
                        {
                            let outcome = match answer {
                                Err(e) => Err(format!("{what}: {e}")),
                                Ok(r) if r.status() != 200 => {
                                    Err(format!("{what}: status {}", r.status()))
                                }
                                Ok(r) => match r.bytes().await {
                                    Err(e) => Err(format!("{what}: body: {e}")),
                                    Ok(body) => match want {
                                        Some(d)
                                            if format!("sha256:{}", sha256_hex(&body)) != *d =>
                                        {
                                            Err(format!("{what}: bytes do not match {d}"))
                                        }
                                        _ => Ok(()),
                                    },
                                },
                            };
                            match outcome {
                                Ok(()) => {
                                    ok.fetch_add(1, Ordering::SeqCst);
                                }
                                Err(e) => failures.lock().unwrap().push(e),
                            }
                        }
                    }
                })
            })
            .collect();
        PullLoop {
            stop,
            ok,
            failures,
            tasks,
        }
    }

    /// Waits until the loop has answered `n` more requests (so it runs across the next step).
    fn wait_progress(&self, n: u64) {
        let target = self.ok.load(Ordering::SeqCst) + n;
        wait_until(
            Duration::from_secs(30),
            "the pull loop to make progress",
            || self.ok.load(Ordering::SeqCst) >= target,
        )
        .expect("pull loop progresses");
    }

    /// Stops the loop; returns (answers, failures).
    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        for task in self.tasks {
            let _ = block_on(task);
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.ok.load(Ordering::SeqCst), failures)
    }
}

fn basic(user: &str, password: &str) -> String {
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {token}")
}

/// The registries of the test, before any edit: `loop` (pulled throughout), `zoned` (only from
/// the `vpc` zone) and `locked` (identities only).
fn base_config(up: &Upstream) -> String {
    let table = |name: &str, extra: &str| {
        registry(
            name,
            up,
            &format!("prefix = \"{name}\"\nhosts = [\"{name}.example\"]\n{extra}"),
        )
    };
    format!(
        "[zones]\nvpc = [\"127.0.0.2/32\", \"127.0.0.3/32\"]\n\n{}{}{}",
        table("loop", ""),
        table("zoned", "network_access = \"selected\"\nzones = [\"vpc\"]"),
        table("locked", "network_access = \"disabled\""),
    )
}

/// Rewrites the gateway's config file (atomically, as an editor or a ConfigMap swap would).
fn write_config(gw: &Gateway, text: &str) {
    let path = gw.config_path();
    let tmp = path.with_extension("toml.new");
    std::fs::write(&tmp, text).expect("write config");
    std::fs::rename(&tmp, &path).expect("rename config");
}

fn config_text(gw: &Gateway) -> String {
    std::fs::read_to_string(gw.config_path()).expect("read config")
}

fn generation(gw: &Gateway) -> u64 {
    let answer = get(&gw.admin_url("/-/config"));
    assert_eq!(answer.status, 200);
    let json: serde_json::Value = serde_json::from_slice(&answer.body).expect("json");
    json["generation"].as_u64().expect("generation")
}

fn post_reload(gw: &Gateway) -> (u16, serde_json::Value) {
    let answer = request("POST", &gw.admin_url("/-/reload"), &[]);
    let json = serde_json::from_slice(&answer.body).unwrap_or(serde_json::Value::Null);
    (answer.status, json)
}

fn metric(gw: &Gateway, line_start: &str) -> Option<f64> {
    let text = String::from_utf8(get(&gw.admin_url("/metrics")).body).expect("utf-8");
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn edits_apply_to_new_requests_while_a_pull_loop_never_fails() {
    let up = Upstream::start(UpstreamOptions::default());
    let img = TestImage::small("reload-loop");
    up.push(&img, "team/app:v1");
    up.push(&img, "team/app:v2");
    let gw = Gateway::start(&base_config(&up));
    let base = config_text(&gw);
    let layer = img.layer_digests()[0].clone();
    let pulls = PullLoop::start(
        4,
        gw.url("/v2/loop/team/app/manifests/v1"),
        gw.url(&format!("/v2/loop/team/app/blobs/{layer}")),
        layer.clone(),
    );
    pulls.wait_progress(20);
    let manifest_of = |from: &str, prefix: &str, tag: &str, auth: Option<&str>| {
        let url = gw.url(&format!("/v2/{prefix}/team/app/manifests/{tag}"));
        let mut headers = vec![("Accept", MANIFEST_ACCEPT)];
        if let Some(a) = auth {
            headers.push(("Authorization", a));
        }
        request_with(client_from(from), "GET", &url, &headers)
    };
    let manifest =
        |from: &str, prefix: &str, auth: Option<&str>| manifest_of(from, prefix, "v1", auth);
    assert_eq!(
        manifest("127.0.0.1", "added", None).oci_code().as_deref(),
        Some("NAME_UNKNOWN")
    );
    assert_eq!(manifest("127.0.0.3", "zoned", None).status, 200);
    let ci = basic("ci", NEW_PASSWORD);
    let before = manifest("127.0.0.1", "locked", Some(&ci)).status;
    assert!(
        matches!(before, 401 | 403),
        "no such identity yet: {before}"
    );

    // 1. A new registry, by editing the file: picked up by polling.
    let with_added = format!(
        "{base}{}",
        registry(
            "added",
            &up,
            "prefix = \"added\"\nhosts = [\"added.example\"]\n"
        )
    );
    write_config(&gw, &with_added);
    wait_until(Duration::from_secs(10), "the new registry to route", || {
        manifest("127.0.0.1", "added", None).status == 200
    })
    .expect("file edit applied");
    assert_eq!(generation(&gw), 2);
    pulls.wait_progress(20);

    // 2. New (wrong) credentials for it, by POST /-/reload: the next upstream request uses them
    // (what the cache already holds keeps serving: it was fetched by this registry's account).
    let wrong = replace_credentials(
        &with_added,
        "added",
        &format!(
            "credentials = {{ username = \"{}\", password = \"not-the-password\" }}",
            up.user()
        ),
    );
    write_config(&gw, &wrong);
    let (status, json) = post_reload(&gw);
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["outcome"], "ok");
    let denied = manifest_of("127.0.0.1", "added", "v2", None);
    assert_eq!(
        denied.oci_code().as_deref(),
        Some("DENIED"),
        "{}",
        String::from_utf8_lossy(&denied.body)
    );
    pulls.wait_progress(20);

    // 3. A narrowed zone and a new identity in one edit.
    let narrowed = with_added.replace(
        "vpc = [\"127.0.0.2/32\", \"127.0.0.3/32\"]",
        "vpc = [\"127.0.0.2/32\"]",
    ) + &format!(
        "\n[[identity]]\nname = \"ci\"\nusername = \"ci\"\npassword_sha256 = \"{}\"\nroles = [\"pull\"]\n",
        sha256_hex(NEW_PASSWORD.as_bytes())
    );
    write_config(&gw, &narrowed);
    let (status, json) = post_reload(&gw);
    assert_eq!(status, 200, "{json}");
    assert_eq!(
        manifest_of("127.0.0.1", "added", "v2", None).status,
        200,
        "right credentials again"
    );
    // Outside the zone now; an identity exists, so logging in could help: 401.
    assert_eq!(
        manifest("127.0.0.3", "zoned", None).oci_code().as_deref(),
        Some("UNAUTHORIZED")
    );
    assert_eq!(manifest("127.0.0.2", "zoned", None).status, 200);
    assert_eq!(manifest("127.0.0.1", "locked", Some(&ci)).status, 200);
    pulls.wait_progress(20);

    let (answers, failures) = pulls.finish();
    assert!(
        failures.is_empty(),
        "{} of {answers} failed: {failures:?}",
        failures.len()
    );
    assert_eq!(
        metric(&gw, "pullgate_config_reloads_total{outcome=\"ok\"}"),
        Some(3.0)
    );
    assert_eq!(metric(&gw, "pullgate_config_generation"), Some(4.0));
    let sha = sha256_hex(config_text(&gw).as_bytes());
    assert!(
        metric(&gw, &format!("pullgate_config_info{{sha256=\"{sha}\"}}")).is_some(),
        "the hash of the file in use is exported"
    );
}

/// `text` with the `credentials = ...` line of registry `name` replaced by `line`.
fn replace_credentials(text: &str, name: &str, line: &str) -> String {
    let start = text
        .find(&format!("name = \"{name}\""))
        .expect("registry in config");
    let cred = start
        + text[start..]
            .find("credentials = ")
            .expect("registry has credentials");
    let end = cred + text[cred..].find('\n').expect("line end");
    format!("{}{line}{}", &text[..cred], &text[end..])
}

#[test]
fn an_invalid_or_refused_edit_changes_nothing() {
    let up = Upstream::start(UpstreamOptions::default());
    let img = TestImage::small("reload-invalid");
    up.push(&img, "team/app:v1");
    let gw = Gateway::start(&registry("hub", &up, "default = true"));
    let good = config_text(&gw);
    let pull = || {
        request(
            "GET",
            &gw.url("/v2/team/app/manifests/v1"),
            &[("Accept", MANIFEST_ACCEPT)],
        )
        .status
    };
    assert_eq!(pull(), 200);

    // An invalid value: seen by polling and counted; named in the answer of a POST; nothing
    // changes, and the gateway stays ready.
    write_config(
        &gw,
        &format!("{good}\n[zones]\nvpc = [\"not-a-network\"]\n"),
    );
    wait_until(
        Duration::from_secs(10),
        "the poll to count the invalid file",
        || metric(&gw, "pullgate_config_reloads_total{outcome=\"invalid\"}") == Some(1.0),
    )
    .expect("poll sees the invalid file");
    let (status, json) = post_reload(&gw);
    assert_eq!(status, 422, "{json}");
    assert_eq!(json["outcome"], "invalid");
    assert!(json["errors"].to_string().contains("zones.vpc"), "{json}");
    assert_eq!(pull(), 200);
    assert_eq!(get(&gw.admin_url("/readyz")).status, 200);
    assert_eq!(generation(&gw), 1);

    // A key that cannot change live: refused, naming it.
    let moved = good.replace(&format!("127.0.0.1:{}", gw.port), "127.0.0.1:1");
    write_config(&gw, &moved);
    let (status, json) = post_reload(&gw);
    assert_eq!(status, 409, "{json}");
    assert_eq!(json["outcome"], "refused");
    assert!(
        json["errors"].to_string().contains("server.listen"),
        "{json}"
    );
    assert_eq!(pull(), 200);
    assert_eq!(generation(&gw), 1);

    // Back to a good file: applied.
    write_config(&gw, &format!("{good}\n# touched\n"));
    let (status, json) = post_reload(&gw);
    assert_eq!(status, 200, "{json}");
    assert_eq!(generation(&gw), 2);
    assert!(metric(&gw, "pullgate_config_reloads_total{outcome=\"refused\"}") >= Some(1.0));
}

#[test]
fn a_pull_in_flight_finishes_on_the_config_it_started_with() {
    let up = Upstream::start(UpstreamOptions::default());
    let img = TestImage::with_layer_size("reload-in-flight", 32 * MIB);
    up.push(&img, "team/big:v1");
    let gw = Gateway::start(&registry("hub", &up, "prefix = \"hub\""));
    let layer = img.layer_digests()[0].clone();
    let url = gw.url(&format!("/v2/hub/team/big/blobs/{layer}"));
    // Fill the cache first, so the slow read below is served from disk.
    assert_eq!(get(&url).status, 200);

    let (head_tx, head_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let download = {
        let url = url.clone();
        crate::support::rt().spawn(async move {
            let client = reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("client");
            let mut resp = client.get(&url).send().await.expect("send");
            let status = resp.status().as_u16();
            let mut body = Vec::new();
            let first = resp.chunk().await.expect("first chunk").unwrap_or_default();
            body.extend_from_slice(&first);
            let _ = head_tx.send(status);
            let _ = go_rx.await;
            while let Some(chunk) = resp.chunk().await.expect("chunk") {
                body.extend_from_slice(&chunk);
            }
            (status, format!("sha256:{}", sha256_hex(&body)))
        })
    };
    assert_eq!(head_rx.recv().expect("head"), 200);

    // The registry's name changes: new requests no longer route, the one in flight goes on.
    let without = config_text(&gw).replace("prefix = \"hub\"", "prefix = \"gone\"");
    write_config(&gw, &without);
    let (status, json) = post_reload(&gw);
    assert_eq!(status, 200, "{json}");
    assert_eq!(get(&url).oci_code().as_deref(), Some("NAME_UNKNOWN"));
    let _ = go_tx.send(());
    let (status, digest) = block_on(download).expect("download task");
    assert_eq!(status, 200);
    assert_eq!(digest, layer, "the whole verified blob, on the old config");
}

#[test]
fn sighup_and_a_configmap_style_symlink_swap_reload_the_binary() {
    use std::process::Command;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = crate::support::free_port();
    let admin = crate::support::free_port();
    let config = |extra: &str| {
        format!(
            "[server]\nlisten = [\"127.0.0.1:{port}\"]\nadmin_listen = \"127.0.0.1:{admin}\"\naudit_log = \"{}\"\n[cache]\ndir = \"{}\"\n[[registry]]\nname = \"hub\"\nupstream = \"https://registry.invalid\"\ndefault = true\n{extra}",
            dir.path().join("audit.log").display(),
            dir.path().join("cache").display()
        )
    };
    // The Kubernetes ConfigMap layout: config.toml -> ..data/config.toml, ..data -> ..v1.
    let v1 = dir.path().join("..v1");
    std::fs::create_dir(&v1).unwrap();
    std::fs::write(v1.join("config.toml"), config("")).unwrap();
    std::os::unix::fs::symlink("..v1", dir.path().join("..data")).unwrap();
    let path = dir.path().join("config.toml");
    std::os::unix::fs::symlink("..data/config.toml", &path).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_pullgate"))
        .arg("serve")
        .arg("-c")
        .arg(&path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let mut guard = crate::support::ChildGuard::new(child);
    let admin_url = |p: &str| format!("http://127.0.0.1:{admin}{p}");
    let generation = || {
        let answer = get(&admin_url("/-/config"));
        serde_json::from_slice::<serde_json::Value>(&answer.body)
            .ok()
            .and_then(|j| j["generation"].as_u64())
    };
    let admin_addr = format!("127.0.0.1:{admin}").parse().unwrap();
    wait_until(Duration::from_secs(10), "pullgate ready", || {
        crate::support::can_connect(admin_addr) && get(&admin_url("/readyz")).status == 200
    })
    .expect("ready");
    assert_eq!(generation(), Some(1));

    // SIGHUP, nothing changed on disk: the config is read again all the same.
    let pid = rustix::process::Pid::from_raw(guard.id().unwrap() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).expect("SIGHUP");
    wait_until(Duration::from_secs(10), "SIGHUP to reload", || {
        generation() == Some(2)
    })
    .expect("SIGHUP reloads");
    assert!(guard.is_running(), "SIGHUP does not end pullgate");

    // The ConfigMap update: a new ..v2 directory and an atomic swap of the ..data symlink.
    let v2 = dir.path().join("..v2");
    std::fs::create_dir(&v2).unwrap();
    std::fs::write(
        v2.join("config.toml"),
        config("\n[[registry]]\nname = \"ghcr\"\nupstream = \"https://ghcr.invalid\"\nprefix = \"ghcr.io\"\n"),
    )
    .unwrap();
    std::os::unix::fs::symlink("..v2", dir.path().join("..data_tmp")).unwrap();
    std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
    wait_until(
        Duration::from_secs(10),
        "the symlink swap to reload",
        || generation() == Some(3),
    )
    .expect("symlink swap reloads");
    let sha = sha256_hex(&std::fs::read(&path).unwrap());
    let in_use = get(&admin_url("/-/config"));
    assert!(
        String::from_utf8_lossy(&in_use.body).contains(&sha),
        "the hash of the new file is the one in use"
    );
    guard.kill();
}

/// Reload latency with 200 registries and 10,000 zone prefixes, for README. A measurement,
/// not a timed assertion: `cargo test --release --test e2e -- --ignored --nocapture
/// reload_latency`.
#[test]
#[ignore]
fn reload_latency_with_200_registries_and_10000_zone_prefixes() {
    let prefixes: Vec<String> = (0..10_000u32)
        .map(|i| format!("\"10.{}.{}.0/24\"", i / 256, i % 256))
        .collect();
    let registries = |password: &str| -> String {
        (0..200)
            .map(|i| {
                format!(
                    "[[registry]]\nname = \"r{i}\"\nupstream = \"https://r{i}.invalid\"\nhosts = [\"r{i}.internal\"]\nprefix = \"r{i}\"\nnetwork_access = \"selected\"\nzones = [\"vpc\"]\ncredentials = {{ username = \"u\", password = \"{password}\" }}\n"
                )
            })
            .collect()
    };
    let rest = |password: &str| {
        format!(
            "[zones]\nvpc = [{}]\n\n{}",
            prefixes.join(", "),
            registries(password)
        )
    };
    let gw = Gateway::start(&rest("one"));
    let base = config_text(&gw);
    let time = |text: &str| {
        write_config(&gw, text);
        let started = std::time::Instant::now();
        let (status, json) = post_reload(&gw);
        assert_eq!(status, 200, "{json}");
        started.elapsed()
    };
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let policy: Vec<Duration> = (0..5)
        .map(|i| time(&format!("{base}\n# edit {i}\n")))
        .collect();
    let rotated: Vec<Duration> = (0..5)
        .map(|i| time(&base.replace("password = \"one\"", &format!("password = \"p{i}\""))))
        .collect();
    eprintln!(
        "reload, 200 registries and 10,000 zone prefixes: {:?} median with every upstream client carried over, {:?} with all 200 rebuilt",
        median(policy),
        median(rotated)
    );
}
