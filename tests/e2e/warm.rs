//! Warm jobs (`[[warm]]`, `POST /warm`, `pullgate warm`): what they fetch from the real
//! upstream, that real clients then pull all of it from the cache, pins against eviction,
//! refresh of a moved tag, and bad requests.

use std::process::Command;
use std::time::Duration;

use crate::harness::{get, registry, registry_at, request_with_body, Gateway};
use crate::support::{
    http_client, skopeo_copy_to_oci, wait_until, ClientTls, Containerd, Fault, PullOpts, Relay,
    TestImage, Upstream, UpstreamOptions,
};

const BIN: &str = env!("CARGO_BIN_EXE_pullgate");

/// The config and layer digests of one manifest of `image`.
fn blobs_of(image: &TestImage, manifest: &str) -> Vec<String> {
    let doc: serde_json::Value =
        serde_json::from_slice(&image.blob_bytes(manifest)).expect("manifest JSON");
    let mut out = vec![doc["config"]["digest"].as_str().unwrap().to_string()];
    for l in doc["layers"].as_array().unwrap() {
        out.push(l["digest"].as_str().unwrap().to_string());
    }
    out
}

fn platform(image: &TestImage, name: &str) -> String {
    image
        .platform_manifests()
        .into_iter()
        .find(|(p, _)| p == name)
        .map(|(_, d)| d)
        .expect("platform in the index")
}

fn jobs(gw: &Gateway) -> Vec<serde_json::Value> {
    let answer = get(&gw.admin_url("/warm"));
    assert_eq!(answer.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&answer.body).expect("JSON");
    v["jobs"].as_array().cloned().unwrap_or_default()
}

/// Polls until `n` jobs are over; returns them.
fn wait_jobs_over(gw: &Gateway, n: usize) -> Vec<serde_json::Value> {
    let mut last = Vec::new();
    wait_until(Duration::from_secs(60), "warm jobs to end", || {
        last = jobs(gw);
        last.iter().filter(|j| j["state"] != "running").count() >= n
    })
    .unwrap_or_else(|e| panic!("{e}: {last:?}"));
    last
}

/// The sum of `pullgate_upstream_requests_total` on the admin listener.
fn upstream_requests(gw: &Gateway) -> u64 {
    let text = String::from_utf8(get(&gw.admin_url("/metrics")).body).unwrap();
    text.lines()
        .filter(|l| l.starts_with("pullgate_upstream_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn pins(gw: &Gateway) -> Vec<String> {
    std::fs::read_to_string(gw.cache_dir().join("pins"))
        .unwrap_or_default()
        .lines()
        .map(|h| format!("sha256:{h}"))
        .collect()
}

#[test]
fn warming_one_platform_fetches_only_its_blobs_and_clients_then_pull_it_all_from_the_cache() {
    let mut up = Upstream::start(UpstreamOptions::default());
    let index = TestImage::two_platform_index("warm-one-platform");
    up.push(&index, "team/app:v1");
    // Warmed by its Host form; the clients below reach the same registry as the default.
    let rest = registry("hub", &up, "default = true\nhosts = [\"warm.test\"]")
        + "[[warm]]\nimage = \"warm.test/team/app:v1\"\nplatforms = [\"linux/amd64\"]\npin = true\n";
    let gw = Gateway::start_configured(&rest, None, "pinned_max_size = \"64MiB\"");
    let done = wait_jobs_over(&gw, 1);
    assert_eq!(done[0]["state"], "done", "{done:?}");
    assert_eq!(done[0]["source"], "config");
    assert_eq!(done[0]["resolved"][0]["digest"], index.manifest_digest());
    assert_eq!(
        done[0]["manifests_done"], 2,
        "the index and one platform's manifest"
    );

    let amd = platform(&index, "linux/amd64");
    let arm = platform(&index, "linux/arm64");
    let amd_blobs = blobs_of(&index, &amd);
    assert_eq!(done[0]["blobs_done"], amd_blobs.len());
    for d in &amd_blobs {
        assert_eq!(
            up.count_requests("GET", &format!("/blobs/{d}")),
            1,
            "{d} fetched once"
        );
    }
    for d in blobs_of(&index, &arm).iter().chain([&arm]) {
        assert_eq!(
            up.count_requests("GET", d),
            0,
            "the other platform stays upstream: {d}"
        );
    }
    let mut pinned = pins(&gw);
    pinned.sort();
    let mut want = amd_blobs.clone();
    want.sort();
    assert_eq!(pinned, want, "pin = true pins what was warmed");
    let audit = gw.audit_lines();
    assert!(
        audit
            .iter()
            .any(|l| l["action"] == "warm" && l["decision"] == "allow"),
        "warm requests are audited as such: {audit:?}"
    );
    let metrics = String::from_utf8(get(&gw.admin_url("/metrics")).body).unwrap();
    assert!(
        metrics.contains("pullgate_warm_jobs_total{outcome=\"ok\",source=\"config\"} 1"),
        "{metrics}"
    );

    // Now nobody upstream: the clients' pulls (their own Accept lists) are all hits.
    up.stop();
    let before = upstream_requests(&gw);
    let got = skopeo_copy_to_oci(
        &format!("{}/team/app:v1", gw.addr()),
        ClientTls::Plain,
        None,
        false,
    )
    .expect("skopeo pulls the warmed platform with the upstream down");
    assert_eq!(got.manifest_digest, amd);
    for d in &amd_blobs {
        assert!(got.has_blob(d), "{d} (skopeo verified its bytes)");
    }
    let ctr = Containerd::start();
    let digest = ctr
        .pull_with(
            &format!("{}/team/app:v1", gw.addr()),
            &PullOpts {
                plain_http: true,
                platform: Some("linux/amd64".into()),
                ..Default::default()
            },
        )
        .expect("ctr pulls the warmed platform with the upstream down");
    assert_eq!(digest, index.manifest_digest());
    let content = ctr.content_digests().expect("ctr content");
    for d in &amd_blobs {
        assert!(content.contains(d), "ctr holds {d}");
    }
    assert_eq!(upstream_requests(&gw), before, "no request went upstream");
}

#[test]
fn the_admin_api_and_the_cli_start_jobs_and_refuse_bad_requests_starting_nothing() {
    let up = Upstream::start(UpstreamOptions::default());
    let image = TestImage::small("warm-api");
    up.push(&image, "team/api:v1");
    let gw = Gateway::start(&registry(
        "hub",
        &up,
        "default = true\nhosts = [\"warm.test\"]\ndeny_repositories = [\"secret/**\"]",
    ));
    let post = |body: &str| {
        request_with_body(
            http_client(None),
            "POST",
            &gw.admin_url("/warm"),
            &[("Content-Type", "application/json")],
            body.as_bytes().to_vec(),
        )
    };
    let error_keys = |a: &crate::harness::Answer| -> Vec<String> {
        let v: serde_json::Value = serde_json::from_slice(&a.body).expect("JSON error");
        v["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                assert!(!e["message"].as_str().unwrap().is_empty());
                e["key"].as_str().unwrap().to_string()
            })
            .collect()
    };
    for (body, keys) in [
        ("not json", vec!["body"]),
        ("{\"images\": []}", vec!["images"]),
        ("{\"imagez\": [\"warm.test/team/api:v1\"]}", vec!["body"]),
        (
            "{\"images\": [\"warm.test/team/api:v1\", \"nohost\"], \"platforms\": [\"linux/amd64\", \"linux\"]}",
            vec!["platforms[1]", "images[1].image"],
        ),
    ] {
        let a = post(body);
        assert_eq!(a.status, 400, "{body}");
        assert_eq!(error_keys(&a), keys, "{body}");
    }
    assert!(jobs(&gw).is_empty(), "a bad request starts nothing");
    let missing = get(&gw.admin_url("/warm/99"));
    assert_eq!(missing.status, 404);

    let a = post("{\"images\": [\"warm.test/team/api:v1\"]}");
    assert_eq!(a.status, 202);
    let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    let id = v["id"].as_str().unwrap().to_string();
    wait_until(Duration::from_secs(30), "the job to end", || {
        let a = get(&gw.admin_url(&format!("/warm/{id}")));
        serde_json::from_slice::<serde_json::Value>(&a.body).unwrap()["state"] != "running"
    })
    .unwrap();
    let a = get(&gw.admin_url(&format!("/warm/{id}")));
    let job: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
    assert_eq!(job["state"], "done", "{job}");
    assert_eq!(job["source"], "api");
    assert_eq!(job["blobs_done"], job["blobs_total"]);
    assert_eq!(job["bytes_done"], job["bytes_total"]);
    assert!(job["bytes_total"].as_u64().unwrap() > 10 * 1024);

    // Policy holds for warm jobs too: a denied repository is not fetched.
    let a = post("{\"images\": [\"warm.test/secret/app:v1\"]}");
    assert_eq!(a.status, 202);
    let id = serde_json::from_slice::<serde_json::Value>(&a.body).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut job = serde_json::Value::Null;
    wait_until(Duration::from_secs(30), "the denied job to end", || {
        job = serde_json::from_slice(&get(&gw.admin_url(&format!("/warm/{id}"))).body).unwrap();
        job["state"] != "running"
    })
    .unwrap();
    assert_eq!(job["state"], "failed");
    assert!(
        job["errors"][0].as_str().unwrap().contains("DENIED"),
        "{job}"
    );
    assert_eq!(up.count_requests("GET", "/secret/"), 0);

    // The CLI: plain lines when not on a terminal, exit 0 when done.
    let admin = format!("127.0.0.1:{}", gw.admin_port);
    let out = Command::new(BIN)
        .args(["warm", "--admin", &admin, "--wait", "warm.test/team/api:v1"])
        .output()
        .expect("run pullgate warm");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("started") && stdout.contains(" done"),
        "{stdout}"
    );
    assert!(stdout.contains(image.manifest_digest()), "{stdout}");
    assert!(
        stdout.lines().any(|l| l.starts_with("manifests 1/1")),
        "{stdout}"
    );
    // A bad platform: exit 64 and the key named.
    let jobs_before = jobs(&gw).len();
    let out = Command::new(BIN)
        .args([
            "warm",
            "--admin",
            &admin,
            "--platform",
            "linux/x86_64",
            "warm.test/team/api:v1",
        ])
        .output()
        .expect("run pullgate warm");
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("platforms[0]") && stderr.contains("x86_64"),
        "{stderr}"
    );
    assert_eq!(jobs(&gw).len(), jobs_before, "nothing started");
}

#[test]
fn check_names_the_key_of_a_bad_warm_entry() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = [\"127.0.0.1:5000\"]\n[[registry]]\nname = \"hub\"\nupstream = \"https://r.example\"\n\
         [[warm]]\nimage = \"private.r.example/a:1\"\n\
         [[warm]]\nimage = \"elsewhere.example/a:1\"\nplatforms = [\"linux/amd64\", \"linux/amd65\"]\n",
    )
    .unwrap();
    let out = Command::new(BIN).arg("check").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("warm[1].platforms[1]"), "{stderr}");
    assert!(stderr.contains("warm[1].image"), "{stderr}");
    assert!(!stderr.contains("warm[0]"), "{stderr}");
}

#[test]
fn pinned_content_survives_cache_pressure_that_evicts_everything_else() {
    let up = Upstream::start(UpstreamOptions::default());
    let keep = TestImage::with_layer_size("warm-keep", 300 * 1024);
    up.push(&keep, "team/keep:v1");
    let others: Vec<TestImage> = (0..6)
        .map(|i| TestImage::with_layer_size(&format!("warm-pressure-{i}"), 300 * 1024))
        .collect();
    for (i, o) in others.iter().enumerate() {
        up.push(o, &format!("team/other{i}:v1"));
    }
    let rest = registry("hub", &up, "default = true\nhosts = [\"warm.test\"]")
        + "[[warm]]\nimage = \"warm.test/team/keep:v1\"\npin = true\n";
    let gw = Gateway::start_configured(
        &rest,
        None,
        "max_size = \"1MiB\"\npinned_max_size = \"1MiB\"",
    );
    let done = wait_jobs_over(&gw, 1);
    assert_eq!(done[0]["state"], "done", "{done:?}");
    for (i, o) in others.iter().enumerate() {
        skopeo_copy_to_oci(
            &format!("{}/team/other{i}:v1", gw.addr()),
            ClientTls::Plain,
            None,
            false,
        )
        .expect("pull under pressure");
        let _ = o;
    }
    let blob_file = |d: &str| {
        let hex = d.trim_start_matches("sha256:");
        gw.cache_dir()
            .join("blobs/sha256")
            .join(&hex[..2])
            .join(hex)
    };
    // Six 300 KiB layers through a 1 MiB cache: the first ones are gone...
    let first_layer = &others[0].layer_digests()[0];
    wait_until(Duration::from_secs(10), "pressure to evict", || {
        !blob_file(first_layer).exists()
    })
    .expect("unpinned layers are evicted");
    // ...and the pinned image is whole.
    for (d, size) in keep.blobs() {
        let meta = std::fs::metadata(blob_file(&d)).unwrap_or_else(|e| panic!("{d}: {e}"));
        assert_eq!(meta.len(), size);
    }
    let metrics = String::from_utf8(get(&gw.admin_url("/metrics")).body).unwrap();
    assert!(
        metrics.contains(&format!(
            "pullgate_cache_pinned_entries {}",
            keep.blobs().len()
        )),
        "{metrics}"
    );
}

#[test]
fn a_moved_tag_is_warmed_on_refresh_and_the_old_content_unpinned_only_once_the_new_is_complete() {
    let up = Upstream::start(UpstreamOptions::default());
    let v1 = TestImage::small("warm-refresh-1");
    let v2 = TestImage::small("warm-refresh-2");
    up.push(&v1, "team/moving:v");
    let rest = registry("hub", &up, "default = true\nhosts = [\"warm.test\"]")
        + "[[warm]]\nimage = \"warm.test/team/moving:v\"\npin = true\nrefresh = \"1s\"\n";
    // Room for one version pinned, not for two.
    let gw = Gateway::start_configured(&rest, None, "pinned_max_size = \"16KiB\"");
    let done = wait_jobs_over(&gw, 1);
    assert_eq!(done[0]["state"], "done", "{done:?}");
    assert_eq!(done[0]["resolved"][0]["digest"], v1.manifest_digest());
    let digests = |i: &TestImage| {
        let mut d: Vec<String> = i.blobs().into_iter().map(|(d, _)| d).collect();
        d.sort();
        d
    };
    let sorted_pins = || {
        let mut p = pins(&gw);
        p.sort();
        p
    };
    assert_eq!(sorted_pins(), digests(&v1));

    // The tag moves. The new content cannot be pinned while the old still is (the budget):
    // the refresh fails, says why, and the old content stays pinned.
    up.push(&v2, "team/moving:v");
    let mut seen = Vec::new();
    wait_until(
        Duration::from_secs(30),
        "a refresh of the moved tag",
        || {
            seen = jobs(&gw);
            seen.iter().any(|j| {
                j["state"] == "failed" && j["resolved"][0]["digest"] == v2.manifest_digest()
            })
        },
    )
    .unwrap_or_else(|e| panic!("{e}: {seen:?}"));
    let failed = seen
        .iter()
        .find(|j| j["state"] == "failed")
        .expect("the failed run");
    assert!(
        failed["errors"][0]
            .as_str()
            .unwrap()
            .contains("cache.pinned_max_size"),
        "{failed}"
    );
    assert_eq!(
        sorted_pins(),
        digests(&v1),
        "an incomplete refresh keeps the old pins"
    );

    // A reload with room: the next refresh completes, pins the new content and only then lets
    // the old go (not deleted).
    let text = std::fs::read_to_string(gw.config_path()).unwrap();
    std::fs::write(
        gw.config_path(),
        text.replace("pinned_max_size = \"16KiB\"", "pinned_max_size = \"64KiB\""),
    )
    .unwrap();
    let reload = request_with_body(
        http_client(None),
        "POST",
        &gw.admin_url("/-/reload"),
        &[],
        Vec::new(),
    );
    assert_eq!(
        reload.status,
        200,
        "{}",
        String::from_utf8_lossy(&reload.body)
    );
    wait_until(Duration::from_secs(30), "the new content pinned", || {
        sorted_pins() == digests(&v2)
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", pins(&gw)));
    for (d, _) in v1.blobs() {
        let hex = d.trim_start_matches("sha256:");
        assert!(
            gw.cache_dir()
                .join("blobs/sha256")
                .join(&hex[..2])
                .join(hex)
                .exists(),
            "unpinned, not deleted: {d}"
        );
    }
}

#[test]
fn after_a_restart_pins_no_entry_holds_any_more_are_let_go() {
    let up = Upstream::start(UpstreamOptions::default());
    let kept = TestImage::small("warm-restart-kept");
    let dropped = TestImage::small("warm-restart-dropped");
    up.push(&kept, "team/kept:v1");
    up.push(&dropped, "team/dropped:v1");
    let cache = tempfile::tempdir().unwrap();
    let table = registry("hub", &up, "default = true\nhosts = [\"warm.test\"]");
    let entry =
        |name: &str| format!("[[warm]]\nimage = \"warm.test/team/{name}:v1\"\npin = true\n");
    let keys = "pinned_max_size = \"64MiB\"";
    let mut gw = Gateway::start_configured(
        &format!("{table}{}{}", entry("kept"), entry("dropped")),
        Some(cache.path()),
        keys,
    );
    wait_jobs_over(&gw, 2);
    let pinned = |dir: &std::path::Path| {
        let mut p: Vec<String> = std::fs::read_to_string(dir.join("pins"))
            .unwrap_or_default()
            .lines()
            .map(|h| format!("sha256:{h}"))
            .collect();
        p.sort();
        p
    };
    let mut both: Vec<String> = kept
        .blobs()
        .into_iter()
        .chain(dropped.blobs())
        .map(|(d, _)| d)
        .collect();
    both.sort();
    assert_eq!(pinned(cache.path()), both);
    gw.stop();

    // The entry is gone from the config while pullgate was down: once the remaining entry's
    // first run is complete, its content alone stays pinned.
    let gw = Gateway::start_configured(
        &format!("{table}{}", entry("kept")),
        Some(cache.path()),
        keys,
    );
    let mut only: Vec<String> = kept.blobs().into_iter().map(|(d, _)| d).collect();
    only.sort();
    wait_until(Duration::from_secs(30), "the orphaned pins let go", || {
        pinned(cache.path()) == only
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", pinned(cache.path())));
    assert_eq!(jobs(&gw)[0]["state"], "done");
}

#[test]
fn referrers_are_warmed_when_asked_and_served_with_the_upstream_down() {
    let mut up = Upstream::start(UpstreamOptions::default());
    let subject = TestImage::small("warm-referrers");
    up.push(&subject, "team/signed:v1");
    let s = subject.manifest_digest().to_string();
    let size = subject.manifest_bytes().len();
    // Signed through a pushing gateway (distribution 2.8: the referrers tag schema).
    let pusher = Gateway::start(&registry("hub", &up, "default = true\npush = true"));
    let sig = crate::referrers::push_artifact(
        &pusher,
        "team/signed",
        "application/vnd.example.signature.v1",
        (&s, size),
        b"warm signature",
    );
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [sig.clone()],
    });
    let tag = format!("sha256-{}", &s["sha256:".len()..]);
    let put = crate::referrers::put_manifest(
        &pusher,
        "team/signed",
        &tag,
        "application/vnd.oci.image.index.v1+json",
        &serde_json::to_vec(&index).unwrap(),
    );
    assert_eq!(put.status, 201);
    drop(pusher);

    let rest = registry("hub", &up, "default = true\nhosts = [\"warm.test\"]")
        + "[[warm]]\nimage = \"warm.test/team/signed:v1\"\nreferrers = true\n";
    let gw = Gateway::start(&rest);
    let done = wait_jobs_over(&gw, 1);
    assert_eq!(done[0]["state"], "done", "{done:?}");
    assert_eq!(done[0]["manifests_done"], 2, "the image and its signature");
    let sig_digest = sig["digest"].as_str().unwrap();
    let sig_manifest: serde_json::Value = serde_json::from_slice(
        &get(&gw.url(&format!("/v2/team/signed/manifests/{sig_digest}"))).body,
    )
    .unwrap();
    let payload = sig_manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(up.count_requests("GET", &format!("/blobs/{payload}")), 1);

    up.stop();
    let referrers = get(&gw.url(&format!("/v2/team/signed/referrers/{s}")));
    assert_eq!(referrers.status, 200);
    let doc: serde_json::Value = serde_json::from_slice(&referrers.body).unwrap();
    assert_eq!(doc["manifests"][0]["digest"], sig_digest);
    let blob = get(&gw.url(&format!("/v2/team/signed/blobs/{payload}")));
    assert_eq!(blob.status, 200);
    assert_eq!(blob.body, b"warm signature");
}

#[test]
fn a_warm_entry_fills_the_view_of_the_account_it_names() {
    let up = Upstream::start(UpstreamOptions::default());
    let image = TestImage::small("warm-account");
    up.push(&image, "team/app:v1");
    let password = up.storage_dir().join("build-password");
    std::fs::write(&password, format!("{}\n", up.password())).unwrap();
    let scoped = format!(
        "default = true\nhosts = [\"warm.test\"]\n\
         [[registry.scoped_credentials]]\nname = \"build\"\nrepositories = [\"team/**\"]\n\
         credentials = {{ username = \"{}\", password_file = \"{}\" }}\n",
        up.user(),
        password.display()
    );
    let rest = registry("hub", &up, &scoped)
        + "[[warm]]\nimage = \"warm.test/team/app:v1\"\naccount = \"build\"\n";
    let gw = Gateway::start(&rest);
    let done = wait_jobs_over(&gw, 1);
    assert_eq!(done[0]["state"], "done", "{done:?}");
    let audit = gw.audit_lines();
    let warm: Vec<_> = audit.iter().filter(|l| l["action"] == "warm").collect();
    assert!(!warm.is_empty());
    for line in &warm {
        assert_eq!(
            line["credential"], "registry.hub.scoped_credentials.build",
            "{line}"
        );
    }
    // A client the rule selects reads that view: its tag and blobs are hits.
    let manifests = up.count_requests("GET", "/manifests/");
    let got = skopeo_copy_to_oci(
        &format!("{}/team/app:v1", gw.addr()),
        ClientTls::Plain,
        None,
        false,
    )
    .expect("pull");
    assert_eq!(got.manifest_digest, image.manifest_digest());
    assert_eq!(up.count_requests("GET", "/manifests/"), manifests);
    for (d, _) in image.blobs() {
        assert_eq!(up.count_requests("GET", &format!("/blobs/{d}")), 1, "{d}");
    }
    let client_lines: Vec<_> = gw
        .audit_lines()
        .into_iter()
        .filter(|l| l["action"] == "pull" && l["repository"] == "team/app")
        .collect();
    assert!(!client_lines.is_empty());
    for line in &client_lines {
        assert_eq!(line["credential"], "registry.hub.scoped_credentials.build");
        assert_eq!(line["cache"], "hit", "{line}");
    }
}

/// A gauge or counter of the admin listener's `/metrics`.
fn metric(gw: &Gateway, name: &str) -> f64 {
    let text = String::from_utf8(get(&gw.admin_url("/metrics")).body).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn a_client_pulling_during_a_warm_up_joins_its_fill() {
    let up = Upstream::start(UpstreamOptions::default());
    let relay = Relay::start(up.port());
    let image = TestImage::with_layer_size("warm-join", 2 * 1024 * 1024);
    up.push(&image, "team/join:v1");
    let gw = Gateway::start(&registry_at(
        "hub",
        &up,
        &relay.url(),
        "default = true\nhosts = [\"warm.test\"]",
    ));
    // A slow upstream (about 2 s for the layer), so the client comes while the fill runs.
    relay.set(Fault::Slow { pause_ms: 50 });
    let a = request_with_body(
        http_client(None),
        "POST",
        &gw.admin_url("/warm"),
        &[("Content-Type", "application/json")],
        b"{\"images\": [\"warm.test/team/join:v1\"]}".to_vec(),
    );
    assert_eq!(a.status, 202);
    let layer = image.layer_digests()[0].clone();
    // The warm job is reading the layer's fill (more than the config's bytes arrived).
    wait_until(Duration::from_secs(30), "the warm job's layer fill", || {
        metric(&gw, "pullgate_cache_fills_in_flight") >= 1.0
            && jobs(&gw)[0]["bytes_done"].as_u64().unwrap_or(0) > 64 * 1024
    })
    .unwrap();
    let got = skopeo_copy_to_oci(
        &format!("{}/team/join:v1", gw.addr()),
        ClientTls::Plain,
        None,
        false,
    )
    .expect("the client pulls during the warm-up");
    assert!(got.has_blob(&layer));
    let done = wait_jobs_over(&gw, 1);
    assert_eq!(done[0]["state"], "done", "{done:?}");
    assert_eq!(
        up.count_requests("GET", &format!("/blobs/{layer}")),
        1,
        "one fetch"
    );
    assert!(metric(&gw, "pullgate_cache_fill_waiters_total") >= 1.0);
}
