//! `bench`: pullgate side by side with distribution's proxy mode and nginx `proxy_cache` in
//! front of the same real upstream (distribution 2.8, bearer tokens, TLS), next to the limits
//! of the machine. Workloads W1–W6 of issue 9 (and the benchmark of issue 3).
//!
//! Run with `make bench` or `bench/run [--quick]`; see bench/README.md. Everything listens on
//! 127.0.0.1, every server is a separate process stopped by PID, everything temporary lives in
//! one folder that is removed at the end (and on Ctrl-C).

#[path = "../tests/support/mod.rs"]
mod support;

mod chart;
mod client;
mod cluster;
mod contestants;
mod load;
mod pingora_static;
mod quiet;
mod report;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::json;

use client::{fetch, fetch_many, BodyMode, Target};
use contestants::{Env, Kind, Server};
use quiet::CpuSnapshot;
use report::{fmt, Results};
use support::{Pki, TestImage, Upstream, UpstreamOptions};

const MIB: u64 = 1024 * 1024;
const GB: f64 = 1e9;
const BIG: u64 = 500 * MIB;
const MEDIUM: u64 = 50 * MIB;
/// What registry clients send for manifests.
/// What tag pollers (crane, regctl, Renovate, Trivy) send: the one type they want.
const ONE_TYPE_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json";
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

struct Opts {
    quick: bool,
    reps: usize,
    load_secs: u64,
    big16: bool,
    only: Option<Vec<String>>,
    /// The workloads of a proxy round to run (default all): w1..w5, w7.
    workloads: Option<Vec<String>>,
    out: PathBuf,
    pullgate: PathBuf,
    /// Record every pullgate process with `perf record` into this folder.
    perf: Option<PathBuf>,
    /// Run the bench and every server at this nice level (when allowed).
    nice: Option<i32>,
    /// Before each round, wait up to this long for the machine to be idle.
    wait_idle: Duration,
    /// Measure a disturbed round again up to this many times.
    redo: usize,
}

fn usage(code: i32) -> ! {
    eprintln!(
        "usage: bench [--quick] [--reps N] [--load-secs S] [--no-big16] [--only pullgate,pullgate-signed,pullgate-enc,pullgate-cluster,distribution,nginx-cache,limits] [--workloads w1,w2,w3,w4,w5,w7] [--out DIR] [--pullgate PATH] [--perf DIR] [--no-nice] [--wait-idle S] [--redo N]\n\
         --quick      one repetition, 1 s load runs, no 16 × 500 MiB run (a smoke test, ~1 min)\n\
         --reps N     repetitions of every measurement (default 3)\n\
         --load-secs  duration of each W3 load run (default 3)\n\
         --no-big16   skip the 16 clients × 500 MiB warm run (issue 3's peak-RSS case)\n\
         --only       contestants to run (default all); 'limits' = nginx static, Pingora static (W3), dd, loopback\n\
         --workloads  the workloads of each contestant's round (default all; W6 comes with W2 and W4)\n\
         --out DIR    where results.json and results.md go (default: bench/)\n\
         --pullgate   the pullgate binary (default: target/release/pullgate next to this one)\n\
         --perf DIR   record each pullgate process with perf (DWARF call graphs) into DIR/[<kind>-]<phase>-<rep>.data\n\
         --no-nice    do not raise the priority of the bench and its servers (nice -10 by default, as root)\n\
         --wait-idle S  before each round wait up to S s for other processes to leave the CPU (default 60; 0: no)\n\
         --redo N     measure a round again when other processes took over 10 % of the CPU, up to N times (default 2)"
    );
    std::process::exit(code)
}

fn parse_args() -> Opts {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/examples/bench -> target/<profile>/pullgate
    let default_pg = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("pullgate"))
        .unwrap_or_else(|| PathBuf::from("pullgate"));
    let mut o = Opts {
        quick: false,
        reps: 3,
        load_secs: 3,
        big16: true,
        only: None,
        workloads: None,
        out: Path::new(env!("CARGO_MANIFEST_DIR")).join("bench"),
        pullgate: default_pg,
        perf: None,
        nice: Some(-10),
        wait_idle: Duration::from_secs(60),
        redo: 2,
    };
    let mut args = std::env::args().skip(1);
    let mut reps_set = false;
    let mut secs_set = false;
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage(64));
        match a.as_str() {
            "--quick" => o.quick = true,
            "--reps" => {
                o.reps = val().parse().unwrap_or_else(|_| usage(64));
                reps_set = true;
            }
            "--load-secs" => {
                o.load_secs = val().parse().unwrap_or_else(|_| usage(64));
                secs_set = true;
            }
            "--no-big16" => o.big16 = false,
            "--only" => o.only = Some(val().split(',').map(str::to_string).collect()),
            "--workloads" => o.workloads = Some(val().split(',').map(str::to_lowercase).collect()),
            "--out" => o.out = PathBuf::from(val()),
            "--pullgate" => o.pullgate = PathBuf::from(val()),
            "--perf" => o.perf = Some(PathBuf::from(val())),
            "--no-nice" => o.nice = None,
            "--wait-idle" => {
                o.wait_idle = Duration::from_secs(val().parse().unwrap_or_else(|_| usage(64)))
            }
            "--redo" => o.redo = val().parse().unwrap_or_else(|_| usage(64)),
            "--help" | "-h" => usage(0),
            _ => usage(64),
        }
    }
    if o.quick {
        if !reps_set {
            o.reps = 1;
        }
        if !secs_set {
            o.load_secs = 1;
        }
        o.big16 = false;
    }
    o.reps = o.reps.max(1);
    o
}

impl Opts {
    fn runs(&self, what: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|l| l.iter().any(|x| x == what))
    }

    /// Whether a proxy round runs workload `w` ("w1" .. "w7").
    fn does(&self, w: &str) -> bool {
        self.workloads
            .as_ref()
            .is_none_or(|l| l.iter().any(|x| x == w))
    }
}

/// A blob pushed to the upstream, and its file in the local image layout.
struct Blob {
    repo: String,
    /// The URL path a client GETs.
    path: String,
    digest: String,
    size: u64,
    file: PathBuf,
}

impl Blob {
    fn from_image(img: &TestImage, repo: &str) -> Blob {
        let digest = img.layer_digests()[0].clone();
        let size = img
            .blobs()
            .iter()
            .find(|(d, _)| *d == digest)
            .map(|(_, s)| *s)
            .expect("layer size");
        let file = img
            .layout_dir()
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"));
        Blob {
            repo: repo.to_string(),
            path: format!("/v2/{repo}/blobs/{digest}"),
            digest,
            size,
            file,
        }
    }

    /// The same bytes at another URL path (nginx-static and the loopback sender serve by name).
    fn at(&self, path: &str) -> Blob {
        Blob {
            repo: path.to_string(),
            path: path.to_string(),
            digest: self.digest.clone(),
            size: self.size,
            file: self.file.clone(),
        }
    }
}

/// The test bed shared by every measurement.
struct Bed {
    opts: Opts,
    up: Upstream,
    env: Env,
    big: Blob,
    medium: Blob,
    small: Blob,
    small_manifest_digest: String,
    run: PathBuf,
    _images: Vec<TestImage>,
    /// Holds the public key file `pullgate-signed` reads.
    _signer: support::CosignKey,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(pingora_static::FLAG) {
        // This binary as the `pingora-static` limit (started by `contestants`).
        pingora_static::run(Path::new(&args[2]), &args[3]);
    }
    let opts = parse_args();
    // Before any thread exists, so every thread and child inherits it: other work on the
    // machine (a build) then disturbs the figures less. The CPU others used is reported.
    let niced = opts.nice.is_some_and(quiet::renice);
    let cpu_start = CpuSnapshot::take();
    let started = Instant::now();
    // Everything temporary (ours and the test support's) goes under one folder.
    let root = tempfile::Builder::new()
        .prefix("pullgate-bench-")
        .tempdir()
        .expect("temp dir");
    std::env::set_var("TMPDIR", root.path());
    let stopping = install_signal_handler(root.path().to_path_buf());
    check_tools(&opts);

    let bed = setup(opts, root.path());
    let mut results = Results::default();
    let mut rounds = Vec::new();
    for rep in 0..bed.opts.reps {
        println!(
            "== repetition {}/{} ({:.0} s in)",
            rep + 1,
            bed.opts.reps,
            started.elapsed().as_secs_f64()
        );
        let mut order = vec![
            Round::Proxy(Kind::Pullgate),
            Round::Proxy(Kind::PullgateSigned),
            Round::Proxy(Kind::PullgateEncrypted),
            Round::Proxy(Kind::Distribution),
            Round::Proxy(Kind::NginxCache),
        ];
        let n = order.len();
        order.rotate_left(rep % n);
        // Every other repetition runs the other way round: figures drift over a run (W4 gets
        // faster for every contestant), and a rotation alone put some rounds early in most
        // repetitions and others late.
        if rep % 2 == 1 {
            order.reverse();
        }
        order.push(Round::Cluster);
        order.push(Round::Limits);
        for round in order {
            if bed.opts.runs(round.id()) && !stopping.load(Ordering::SeqCst) {
                rounds.push(run_round(&bed, round, rep, &mut results));
            }
        }
    }
    let total = started.elapsed();
    let others = cpu_start.others_since();
    finish(&bed, &results, total, niced, others, &rounds);
    drop(bed);
    drop(root);
}

/// One contestant's measurements of a repetition, or the limits'.
#[derive(Clone, Copy)]
enum Round {
    Proxy(Kind),
    /// Three pullgate replicas in one cluster with a shared object store (`cluster.rs`).
    Cluster,
    Limits,
}

impl Round {
    fn id(self) -> &'static str {
        match self {
            Round::Proxy(k) => k.id(),
            Round::Cluster => cluster::ID,
            Round::Limits => "limits",
        }
    }
}

/// How a round went: others' CPU share in the kept attempt, and how many attempts it took.
struct RoundLog {
    rep: usize,
    round: &'static str,
    others: f64,
    attempts: usize,
}

/// Runs a round on a quiet machine; a round that other processes disturbed (over
/// [`quiet::DISTURBED`] of the CPU) is measured again, up to `--redo` times, and only the last
/// attempt's samples are kept.
fn run_round(bed: &Bed, round: Round, rep: usize, results: &mut Results) -> RoundLog {
    let mut attempts = 0;
    loop {
        attempts += 1;
        quiet::wait_idle(bed.opts.wait_idle);
        let snap = CpuSnapshot::take();
        let mut r = Results::default();
        match round {
            Round::Proxy(kind) => proxy_round(bed, kind, rep, &mut r),
            Round::Cluster => {
                settle();
                if let Err(e) = cluster::round(bed, rep, &mut r) {
                    r.fail(format!("{} rep {}: {e}", cluster::ID, rep + 1));
                }
            }
            Round::Limits => limits_round(bed, rep, &mut r),
        }
        let (others, _) = snap.others_since();
        if others <= quiet::DISTURBED || attempts > bed.opts.redo {
            if others > quiet::DISTURBED {
                println!(
                    "  ({}: other processes used {:.0} % of the CPU; kept anyway)",
                    round.id(),
                    others * 100.0
                );
            }
            results.merge(r);
            return RoundLog {
                rep,
                round: round.id(),
                others,
                attempts,
            };
        }
        println!(
            "  ({}: other processes used {:.0} % of the CPU; measuring the round again)",
            round.id(),
            others * 100.0
        );
        results.failures.extend(r.failures);
    }
}

/// Fails early, with the fix, when a needed program is missing.
fn check_tools(opts: &Opts) {
    let mut missing = Vec::new();
    for (tool, pkg) in [
        (support::upstream::REGISTRY_BIN, "docker-registry"),
        ("skopeo", "skopeo"),
        ("nginx", "nginx"),
        ("wrk", "wrk"),
        ("dd", "coreutils"),
    ] {
        let found = if tool.starts_with('/') {
            Path::new(tool).exists()
        } else {
            Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {tool}"))
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !found {
            missing.push(pkg);
        }
    }
    if !missing.is_empty() {
        eprintln!(
            "bench: missing programs; install with: apt-get install -y {}",
            missing.join(" ")
        );
        std::process::exit(69);
    }
    if !opts.pullgate.exists() {
        eprintln!(
            "bench: no pullgate binary at {} (build it: cargo build --release --bin pullgate, or pass --pullgate)",
            opts.pullgate.display()
        );
        std::process::exit(69);
    }
}

/// On SIGINT/SIGTERM: stop every child by PID, remove the temp folder, exit 130.
fn install_signal_handler(root: PathBuf) -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    support::rt().spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return;
        };
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        f.store(true, Ordering::SeqCst);
        eprintln!(
            "\nbench: interrupted; stopping servers and removing {}",
            root.display()
        );
        let me = std::process::id();
        let tree = contestants::descendants(me);
        for pid in tree.iter().skip(1) {
            contestants::signal(*pid, "TERM");
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline
            && tree
                .iter()
                .skip(1)
                .any(|p| Path::new(&format!("/proc/{p}")).exists())
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for pid in contestants::descendants(me).iter().skip(1) {
            contestants::signal(*pid, "KILL");
        }
        let _ = std::fs::remove_dir_all(&root);
        std::process::exit(130);
    });
    flag
}

fn setup(opts: Opts, root: &Path) -> Bed {
    let t = Instant::now();
    let pki = Arc::new(Pki::new());
    let up = Upstream::start(UpstreamOptions {
        pki: Some(pki.clone()),
        ..UpstreamOptions::default()
    });
    println!(
        "upstream: distribution 2.8 with token auth at {} ({:.1} s)",
        up.url(),
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    let big_img = TestImage::with_layer_size("pullgate-bench-big", BIG as usize);
    let medium_img = TestImage::with_layer_size("pullgate-bench-medium", MEDIUM as usize);
    let small_img = TestImage::small("pullgate-bench-small");
    println!("images generated ({:.1} s)", t.elapsed().as_secs_f64());
    let t = Instant::now();
    up.push(&big_img, "bench/big:v1");
    up.push(&medium_img, "bench/medium:v1");
    let small_manifest_digest = up.push(&small_img, "bench/small:v1");
    // pullgate-signed trusts this key; the small image's manifest (W3's) is signed with it.
    let signer = support::CosignKey::generate();
    support::signing::sign(&up, "bench/small", &small_manifest_digest, &signer);
    println!(
        "images pushed with skopeo ({:.1} s)",
        t.elapsed().as_secs_f64()
    );

    let big = Blob::from_image(&big_img, "bench/big");
    let medium = Blob::from_image(&medium_img, "bench/medium");
    let small = Blob::from_image(&small_img, "bench/small");

    // nginx-static's folder: the same bytes as plain files.
    let www = root.join("www");
    std::fs::create_dir_all(&www).expect("mkdir www");
    for (name, file) in [
        ("big", big.file.clone()),
        ("medium", medium.file.clone()),
        ("small", small.file.clone()),
        (
            "manifest",
            small_img
                .layout_dir()
                .join("blobs/sha256")
                .join(small_manifest_digest.trim_start_matches("sha256:")),
        ),
    ] {
        if std::fs::hard_link(&file, www.join(name)).is_err() {
            std::fs::copy(&file, www.join(name)).expect("copy into www");
        }
    }

    // nginx has no token client: it gets one long-lived token for the benchmark repositories.
    let access = json!(["bench/big", "bench/medium", "bench/small"]
        .iter()
        .map(|r| json!({"type": "repository", "name": r, "actions": ["pull"]}))
        .collect::<Vec<_>>());
    let nginx_token =
        up.issuer()
            .mint_aged(up.user(), support::upstream::SERVICE, access, 0, 7 * 86400);

    let env = Env {
        pullgate_bin: opts.pullgate.clone(),
        upstream_url: up.url(),
        upstream_port: up.port(),
        ca_path: pki.ca_path(),
        user: up.user().to_string(),
        password: up.password().to_string(),
        nginx_token,
        www,
        signature_key: signer.public_path(),
    };
    let run = root.join("run");
    std::fs::create_dir_all(&run).expect("mkdir run");
    Bed {
        opts,
        up,
        env,
        big,
        medium,
        small,
        small_manifest_digest,
        run,
        _images: vec![big_img, medium_img, small_img],
        _signer: signer,
    }
}

/// W4's denominator: a client pulling the 500 MiB blob straight from the upstream, with the
/// bearer-token dance a registry client does (challenge, token, GET), over TLS. The faster of
/// two pulls: one direct pull alone came out either ~0.4 s or ~0.7 s on the same machine
/// minutes apart, which moved a contestant's ratio more than the contestant did.
fn direct_pull(bed: &Bed, results: &mut Results) -> Option<f64> {
    let r = pull_direct(bed).and_then(|first| Ok(first.min(pull_direct(bed)?)));
    match r {
        Ok(secs) => {
            println!("  direct pull from the upstream (faster of two): {secs:.2} s");
            results.add("w4_secs", "direct", secs);
            Some(secs)
        }
        Err(e) => {
            results.fail(format!("direct pull: {e}"));
            None
        }
    }
}

/// One direct pull of the 500 MiB blob; its seconds.
fn pull_direct(bed: &Bed) -> Result<f64, String> {
    let ca = bed.up.pki().ca_pem().to_string();
    let registry = Target::tls(bed.up.port(), &ca);
    let issuer = Target::tls(bed.up.issuer().port(), &ca);
    let t0 = Instant::now();
    let challenge = fetch(&registry, "GET", &bed.big.path, &[], BodyMode::Discard)?;
    if challenge.status != 401 {
        return Err(format!(
            "expected a 401 challenge, got {}",
            challenge.status
        ));
    }
    let basic = base64::engine::general_purpose::STANDARD
        .encode(format!("{}:{}", bed.env.user, bed.env.password));
    let tok = fetch(
        &issuer,
        "GET",
        &format!(
            "/token?service={}&scope=repository:{}:pull",
            support::upstream::SERVICE,
            bed.big.repo
        ),
        &[("Authorization", &format!("Basic {basic}"))],
        BodyMode::Keep,
    )?;
    let token: serde_json::Value = serde_json::from_slice(&tok.body).map_err(|e| e.to_string())?;
    let token = token["token"].as_str().ok_or("no token in the answer")?;
    let got = fetch(
        &registry,
        "GET",
        &bed.big.path,
        &[("Authorization", &format!("Bearer {token}"))],
        BodyMode::Discard,
    )?;
    if got.status != 200 || got.bytes != bed.big.size {
        return Err(format!("status {} with {} bytes", got.status, got.bytes));
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// Every measurement of one proxy contestant for one repetition. Each phase that needs a cold
/// cache or a fresh peak-RSS figure starts a new process.
fn proxy_round(bed: &Bed, kind: Kind, rep: usize, results: &mut Results) {
    let id = kind.id();
    let state = bed.run.join(format!("state-{id}-{rep}"));
    let step = |results: &mut Results, what: &str, r: Result<(), String>| {
        if let Err(e) = r {
            results.fail(format!("{id} rep {} {what}: {e}", rep + 1));
        }
    };
    if kind == Kind::PullgateSigned {
        if !bed.opts.does("w3") {
            return;
        }
        // Only W3: what a signature policy costs a warm tag poller.
        settle();
        let r = with_server(bed, kind, &state, &format!("w3-{rep}"), |srv| {
            w3(bed, srv, &bed.small.path, &manifest_path(), id, results)
        });
        step(results, "W3", r);
        let _ = std::fs::remove_dir_all(&state);
        return;
    }

    let does = |w: &str| bed.opts.does(w);
    // W5: 20 clients at once on a cold 50 MiB blob (empty cache, new process).
    if does("w5") {
        settle();
        let r = with_server(bed, kind, &state, &format!("w5-{rep}"), |srv| {
            w5(bed, srv, results)
        });
        step(results, "W5", r);
    }

    // W4 (+ W6 during W4): a cold 500 MiB pull on a new process, right after a direct pull
    // from the upstream (the pair gives one ratio).
    if does("w4") {
        settle();
        let direct = direct_pull(bed, results);
        let r = with_server(bed, kind, &state, &format!("w4-{rep}"), |srv| {
            w4(bed, srv, rep, direct, results)
        });
        step(results, "W4", r);
        if kind == Kind::PullgateEncrypted {
            settle();
            let r = w4_side_by_side(bed, rep, results);
            step(results, "W4 side by side", r);
        }
    }

    // W2 (+ W6 during W2): a new process on the warm cache.
    if does("w2") {
        settle();
        let r = with_server(bed, kind, &state, &format!("w2-{rep}"), |srv| {
            warm_up(bed, srv, &[&bed.medium])?;
            let mut line = Vec::new();
            for _ in 0..W2_RUNS {
                let (gbps, _) = many(srv.target(), &bed.medium, 16)?;
                results.add("w2_gbps", id, gbps);
                line.push(format!("{gbps:.2}"));
            }
            let rss = srv.peak_rss() as f64 / MIB as f64;
            results.add("w6_rss_w2", id, rss);
            if let Some(admin) = srv.admin_port {
                // Key provider calls per 1,000 warm pulls of the small blob (want: 0).
                let before = kms_calls(admin)?;
                for _ in 0..1000 {
                    fetch(
                        &srv.target(),
                        "GET",
                        &bed.small.path,
                        &[],
                        BodyMode::Discard,
                    )?;
                }
                let per_1000 = kms_calls(admin)? - before;
                results.add("kms_per_1000", id, per_1000);
                println!("  {id}: {per_1000} KMS calls per 1,000 pulls");
            }
            println!(
                "  {id}: W2 16 × 50 MiB warm {} GB/s, peak RSS {rss:.1} MiB",
                line.join(" ")
            );
            Ok(())
        });
        step(results, "W2", r);
    }

    // 16 × 500 MiB (issue 3's peak RSS case), then W1 and W3, on another new process.
    if does("w1") || does("w3") {
        settle();
        let r = with_server(bed, kind, &state, &format!("w1w3-{rep}"), |srv| {
            // A W3-only run leaves the 500 MiB blob cold (a profiler would take minutes on it).
            let big: &[&Blob] = if does("w1") { &[&bed.big] } else { &[] };
            warm_up(bed, srv, big)?;
            if bed.opts.big16 && does("w1") {
                let (gbps, _) = many(srv.target(), &bed.big, 16)?;
                let rss = srv.peak_rss() as f64 / MIB as f64;
                println!("  {id}: 16 × 500 MiB warm {gbps:.2} GB/s, peak RSS {rss:.1} MiB");
                results.add("x_16x500_gbps", id, gbps);
                results.add("x_rss_16x500", id, rss);
            }
            if does("w1") {
                let w1 = w1_runs(srv.target(), &bed.big, id, results)?;
                println!("  {id}: W1 1 × 500 MiB warm {w1} GB/s");
            }
            if !does("w3") {
                return Ok(());
            }
            w3(bed, srv, &bed.small.path, &manifest_path(), id, results)
        });
        step(results, "W1/W3", r);
    }
    let _ = std::fs::remove_dir_all(&state);

    // W7 (pullgate only): the clients' p99 on a warm blob, without and then with a warm job
    // filling the cold 500 MiB image (a new process on an empty cache), under the bandwidth
    // cap an operator who minds the clients would set.
    if kind == Kind::Pullgate && does("w7") {
        settle();
        let w7_state = bed.run.join(format!("state-w7-{rep}"));
        let cap = format!("warm_bandwidth = \"{W7_WARM_BANDWIDTH}\"\n");
        let r = with_server_cache(bed, kind, &w7_state, &format!("w7-{rep}"), &cap, |srv| {
            w7(bed, srv, results)
        });
        step(results, "W7", r);
        let _ = std::fs::remove_dir_all(&w7_state);
    }
}

/// W7's `cache.warm_bandwidth`: 500 MiB take about 25 s at it.
const W7_WARM_BANDWIDTH: &str = "20MiB/s";

/// W7: `wrk` on the small blob (64 connections), idle, then while `POST /warm` fills
/// `bench/big` through the same process (at [`W7_WARM_BANDWIDTH`]); the share of the second
/// run the job was running.
fn w7(bed: &Bed, srv: &Server, results: &mut Results) -> Result<(), String> {
    let id = srv.kind.id();
    let get = fetch(&srv.target(), "GET", &bed.small.path, &[], BodyMode::Hash)?;
    if get.status != 200 || get.digest.as_deref() != Some(bed.small.digest.as_str()) {
        return Err(format!("GET small blob: status {}", get.status));
    }
    let admin = srv.admin_port.ok_or("pullgate has no admin listener")?;
    let d = Duration::from_secs(bed.opts.load_secs);
    let url = format!("http://127.0.0.1:{}{}", srv.port, bed.small.path);
    let idle = load::wrk(&url, &[], 64, d)?;
    let body = serde_json::json!({"images": [format!("127.0.0.1:{}/bench/big:v1", srv.port)]});
    let posted = Instant::now();
    let (status, started) = admin_request(admin, "POST", "/warm", &body.to_string())?;
    if status != 202 {
        return Err(format!("POST /warm answered {status}: {started}"));
    }
    let job = started["id"].as_str().unwrap_or_default().to_string();
    // The load starts once the fill runs (the job's first blob bytes arrived).
    let flowing = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, v) = admin_request(admin, "GET", &format!("/warm/{job}"), "")?;
        if v["bytes_done"].as_u64().unwrap_or(0) > 0 || v["state"] != "running" {
            break;
        }
        if Instant::now() > flowing {
            return Err("the warm job fetched nothing for 60 s".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let load_started = Instant::now();
    let during = load::wrk(&url, &[], 64, d)?;
    let deadline = Instant::now() + Duration::from_secs(300);
    let done = loop {
        let (_, v) = admin_request(admin, "GET", &format!("/warm/{job}"), "")?;
        if v["state"] != "running" {
            break v;
        }
        if Instant::now() > deadline {
            return Err("the warm job did not end within 300 s".into());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    if done["state"] != "done" {
        return Err(format!("warm job: {done}"));
    }
    let job_secs = done["elapsed_ms"].as_f64().unwrap_or(0.0) / 1000.0;
    // The job ended `job_secs` after it was posted; the share of the load run before that.
    let ran_during = job_secs - (load_started - posted).as_secs_f64();
    let overlap = (ran_during / d.as_secs_f64()).clamp(0.0, 1.0);
    let ratio = during.p99_ms / idle.p99_ms.max(0.001);
    println!(
        "  {id}: W7 GET small blob p99 {:.2} ms idle, {:.2} ms during a warm job capped at {W7_WARM_BANDWIDTH} ({ratio:.2}×; the 500 MiB job took {job_secs:.1} s and ran for {:.0} % of the load run); {:.0} / {:.0} req/s",
        idle.p99_ms,
        during.p99_ms,
        overlap * 100.0,
        idle.rps,
        during.rps
    );
    if idle.errors + during.errors > (idle.requests + during.requests) / 100 {
        results.fail(format!(
            "{id} W7: {} errors in {} requests",
            idle.errors + during.errors,
            idle.requests + during.requests
        ));
    }
    results.add("w7_p99_idle", id, idle.p99_ms);
    results.add("w7_p99_warm", id, during.p99_ms);
    results.add("w7_p99_ratio", id, ratio);
    results.add("w7_overlap", id, overlap);
    Ok(())
}

/// One request to pullgate's admin listener; the status and the JSON body.
fn admin_request(
    port: u16,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, serde_json::Value), String> {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port))
        .map_err(|e| format!("admin listener: {e}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(
        tcp,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((
        status,
        serde_json::from_str(rest.trim()).unwrap_or_default(),
    ))
}

/// `pullgate_kms_calls_total` from the admin listener.
fn kms_calls(admin: u16) -> Result<f64, String> {
    let got = fetch(
        &Target::plain(admin),
        "GET",
        "/metrics",
        &[],
        BodyMode::Keep,
    )?;
    let text = String::from_utf8_lossy(&got.body);
    Ok(text
        .lines()
        .filter(|l| l.starts_with("pullgate_kms_calls_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

fn manifest_path() -> String {
    "/v2/bench/small/manifests/v1".to_string()
}

/// Starts `kind` on `state`, runs `f`, stops it (also when `f` fails).
fn with_server(
    bed: &Bed,
    kind: Kind,
    state: &Path,
    label: &str,
    f: impl FnOnce(&Server) -> Result<(), String>,
) -> Result<(), String> {
    with_server_cache(bed, kind, state, label, "", f)
}

/// [`with_server`] with `cache_extra` added to pullgate's `[cache]` table.
fn with_server_cache(
    bed: &Bed,
    kind: Kind,
    state: &Path,
    label: &str,
    cache_extra: &str,
    f: impl FnOnce(&Server) -> Result<(), String>,
) -> Result<(), String> {
    let srv = Server::start(kind, &bed.env, state, &bed.run, cache_extra)?;
    let perf = match (&bed.opts.perf, kind) {
        (Some(dir), Kind::Pullgate) => Some(perf_record(dir, label, srv.pid())?),
        (Some(dir), Kind::PullgateSigned | Kind::PullgateEncrypted) => Some(perf_record(
            dir,
            &format!("{}-{label}", kind.id()),
            srv.pid(),
        )?),
        _ => None,
    };
    let r = f(&srv);
    if let Some(mut p) = perf {
        contestants::signal(p.id(), "INT");
        let _ = p.wait();
    }
    let log = srv.log_path().to_path_buf();
    srv.stop();
    r.map_err(|e| {
        format!(
            "{e}\n  (server log: {})",
            support::tail(&support::read_lossy(&log), 5)
        )
    })
}

/// `perf record` attached to `pid`, once it has started writing.
fn perf_record(dir: &Path, label: &str, pid: u32) -> Result<std::process::Child, String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let out = dir.join(format!("{label}.data"));
    let _ = std::fs::remove_file(&out);
    let child = Command::new("perf")
        .args([
            "record",
            "-F",
            "499",
            "--call-graph",
            "dwarf,16384",
            "-p",
            &pid.to_string(),
            "-o",
        ])
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("perf: {e}"))?;
    support::wait_until(Duration::from_secs(5), "perf record", || out.exists())?;
    Ok(child)
}

/// The first request of `blobs`, the small blob and the manifest on a new process (1-byte
/// ranges), so warm measurements see the steady state (pullgate re-confirms repositories
/// after a restart).
fn warm_up(bed: &Bed, srv: &Server, blobs: &[&Blob]) -> Result<(), String> {
    let t = srv.target();
    for b in blobs.iter().chain([&&bed.small]) {
        let r = fetch(
            &t,
            "GET",
            &b.path,
            &[("Range", "bytes=0-0")],
            BodyMode::Discard,
        )?;
        if !(r.status == 200 || r.status == 206) {
            return Err(format!("warm-up of {} answered {}", b.repo, r.status));
        }
    }
    let r = fetch(
        &t,
        "HEAD",
        &manifest_path(),
        &[("Accept", MANIFEST_ACCEPT)],
        BodyMode::Discard,
    )?;
    if r.status != 200 {
        return Err(format!("warm-up HEAD manifest answered {}", r.status));
    }
    Ok(())
}

/// Samples of W1 per process (and of W2): they are short, and this machine is noisy.
const W1_RUNS: usize = 3;
const W2_RUNS: usize = 2;

/// W1 samples on one server; the figures as text.
fn w1_runs(target: Target, blob: &Blob, id: &str, results: &mut Results) -> Result<String, String> {
    let mut line = Vec::new();
    for _ in 0..W1_RUNS {
        let g = one(target.clone(), blob)?;
        results.add("w1_gbps", id, g);
        line.push(format!("{g:.2}"));
    }
    Ok(line.join(" "))
}

fn list(v: &[f64]) -> String {
    v.iter()
        .map(|g| format!("{g:.2}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Flushes dirty pages (new cache files, pushed blobs) so that write-back does not land in
/// the middle of the next measurement.
fn settle() {
    let _ = Command::new("sync").status();
}

/// One client, whole blob; GB/s.
fn one(target: Target, blob: &Blob) -> Result<f64, String> {
    let r = fetch(&target, "GET", &blob.path, &[], BodyMode::Discard)?;
    if r.status != 200 || r.bytes != blob.size {
        return Err(format!(
            "GET {}: status {} with {} of {} bytes",
            blob.repo, r.status, r.bytes, blob.size
        ));
    }
    Ok(blob.size as f64 / r.elapsed.as_secs_f64() / GB)
}

/// `n` clients at once, whole blob; aggregate GB/s and the slowest client's seconds.
fn many(target: Target, blob: &Blob, n: usize) -> Result<(f64, f64), String> {
    many_over(&[target], blob, n)
}

/// [`many`] with client `i` on `targets[i % len]`.
fn many_over(targets: &[Target], blob: &Blob, n: usize) -> Result<(f64, f64), String> {
    let (answers, wall) = fetch_many(n, targets, &blob.path, &[]);
    let mut slowest: f64 = 0.0;
    for a in answers {
        let a = a?;
        if a.status != 200 || a.bytes != blob.size {
            return Err(format!(
                "GET {}: status {} with {} of {} bytes",
                blob.repo, a.status, a.bytes, blob.size
            ));
        }
        slowest = slowest.max(a.elapsed.as_secs_f64());
    }
    Ok((
        n as f64 * blob.size as f64 / wall.as_secs_f64() / GB,
        slowest,
    ))
}

/// GETs a blob whole and checks its SHA-256.
fn verify(target: &Target, blob: &Blob) -> Result<(), String> {
    let r = fetch(target, "GET", &blob.path, &[], BodyMode::Hash)?;
    match r.digest {
        Some(d) if r.status == 200 && d == blob.digest => Ok(()),
        d => Err(format!(
            "{} came back as status {} digest {d:?}",
            blob.repo, r.status
        )),
    }
}

fn w5(bed: &Bed, srv: &Server, results: &mut Results) -> Result<(), String> {
    w5_over(bed, srv.kind.id(), &[srv.target()], results)
}

/// W5 with client `i` on `targets[i % len]` (every target cold), recorded under `id`.
fn w5_over(bed: &Bed, id: &str, targets: &[Target], results: &mut Results) -> Result<(), String> {
    let mark = bed.up.log_text().len();
    let (_, slowest) = many_over(targets, &bed.medium, 20)?;
    let (fetches, bytes) = settled_upstream_bytes(bed, mark, &bed.medium);
    let ratio = bytes as f64 / bed.medium.size as f64;
    let over = match targets.len() {
        1 => String::new(),
        n => format!(" over {n} replicas"),
    };
    println!(
        "  {id}: W5 20 × cold 50 MiB{over}: slowest client {slowest:.2} s, upstream served {ratio:.2} × the blob ({fetches} GETs)"
    );
    results.add("w5_upstream", id, ratio);
    results.add("w5_slowest", id, slowest);
    targets.iter().try_for_each(|t| verify(t, &bed.medium))
}

/// W4 encrypted ÷ plaintext measured side by side: plaintext, encrypted, encrypted, plaintext
/// (the other way round in odd repetitions), each a cold pull on a new process with an empty
/// cache, one right after the other; the ratio of the two sums. The contestants' own W4 rounds
/// run minutes apart, and on this 2-core VM the same direct pull moved between 0.36 and 0.66 s
/// over a run: that drift, not the cache, decided their ratio.
fn w4_side_by_side(bed: &Bed, rep: usize, results: &mut Results) -> Result<(), String> {
    let (a, b) = if rep % 2 == 1 {
        (Kind::PullgateEncrypted, Kind::Pullgate)
    } else {
        (Kind::Pullgate, Kind::PullgateEncrypted)
    };
    let (mut plain, mut encrypted) = (0.0, 0.0);
    for (i, kind) in [a, b, b, a].into_iter().enumerate() {
        let state = bed.run.join(format!("state-w4-side-{i}-{rep}"));
        let label = format!("w4-side-{i}-{rep}");
        let mut secs = 0.0;
        let r = with_server(bed, kind, &state, &label, |srv| {
            secs = cold_pull(bed, srv)?.0;
            Ok(())
        });
        let _ = std::fs::remove_dir_all(&state);
        r?;
        if kind == Kind::Pullgate {
            plain += secs;
        } else {
            encrypted += secs;
        }
    }
    let ratio = encrypted / plain;
    results.add("w4_side_by_side", Kind::PullgateEncrypted.id(), ratio);
    println!(
        "  W4 side by side: plaintext {plain:.2} s, encrypted {encrypted:.2} s for two cold pulls each (÷ {ratio:.3})"
    );
    Ok(())
}

/// A cold GET of the 500 MiB blob: its seconds and the server's peak RSS (MiB).
fn cold_pull(bed: &Bed, srv: &Server) -> Result<(f64, f64), String> {
    let r = fetch(&srv.target(), "GET", &bed.big.path, &[], BodyMode::Discard)?;
    if r.status != 200 || r.bytes != bed.big.size {
        return Err(format!(
            "cold GET: status {} with {} of {} bytes",
            r.status, r.bytes, bed.big.size
        ));
    }
    Ok((r.elapsed.as_secs_f64(), srv.peak_rss() as f64 / MIB as f64))
}

fn w4(
    bed: &Bed,
    srv: &Server,
    rep: usize,
    direct: Option<f64>,
    results: &mut Results,
) -> Result<(), String> {
    let id = srv.kind.id();
    let (secs, rss) = cold_pull(bed, srv)?;
    results.add("w4_secs", id, secs);
    results.add("w6_rss_w4", id, rss);
    let ratio = direct.map(|d| secs / d);
    if let Some(ratio) = ratio {
        results.add("w4_ratio", id, ratio);
    }
    println!(
        "  {id}: W4 cold 500 MiB {secs:.2} s (÷ direct {}), peak RSS {rss:.1} MiB",
        ratio.map(fmt).unwrap_or_else(|| "–".into())
    );
    if rep == 0 {
        verify(&srv.target(), &bed.big)?;
    }
    Ok(())
}

/// W3 on one server: HEAD manifest by tag (hammer), GET small blob (wrk).
fn w3(
    bed: &Bed,
    srv: &Server,
    blob_path: &str,
    manifest: &str,
    id: &str,
    results: &mut Results,
) -> Result<(), String> {
    let port = srv.port;
    let t = Target::plain(port);
    let head = fetch(
        &t,
        "HEAD",
        manifest,
        &[("Accept", MANIFEST_ACCEPT)],
        BodyMode::Discard,
    )?;
    if head.status != 200 {
        return Err(format!("HEAD manifest answered {}", head.status));
    }
    if id != "nginx-static"
        && head.header("docker-content-digest") != Some(bed.small_manifest_digest.as_str())
    {
        return Err(format!(
            "HEAD manifest digest {:?}",
            head.header("docker-content-digest")
        ));
    }
    let get = fetch(&t, "GET", blob_path, &[], BodyMode::Hash)?;
    if get.status != 200 || get.digest.as_deref() != Some(bed.small.digest.as_str()) {
        return Err(format!(
            "GET small blob: status {} digest {:?}",
            get.status, get.digest
        ));
    }
    let d = Duration::from_secs(bed.opts.load_secs);
    // The server's CPU time per request of each run: steadier than req/s, which also
    // depends on how the load generator and the server share the cores.
    let cpu_per_request = |run: &dyn Fn() -> Result<load::LoadResult, String>| {
        let cpu = srv.cpu_seconds();
        let r = run()?;
        let us = (srv.cpu_seconds() - cpu) * 1e6 / r.requests.max(1) as f64;
        Ok::<_, String>((r, us))
    };
    let head = |accept: &str| {
        cpu_per_request(&|| {
            Ok(load::hammer(
                port,
                "HEAD",
                manifest,
                &[("Accept", accept)],
                64,
                d,
            ))
        })
    };
    let before = bed.up.requests().len();
    let (h, h_cpu) = head(MANIFEST_ACCEPT)?;
    let mid_full = bed.up.requests().len();
    let (h1, h1_cpu) = head(ONE_TYPE_ACCEPT)?;
    let mid_head1 = bed.up.requests().len();
    let (m, m_cpu) = cpu_per_request(&|| {
        load::wrk(
            &format!("http://127.0.0.1:{port}{manifest}"),
            &[("Accept", MANIFEST_ACCEPT)],
            64,
            d,
        )
    })?;
    let mid = bed.up.requests().len();
    let (g, g_cpu) =
        cpu_per_request(&|| load::wrk(&format!("http://127.0.0.1:{port}{blob_path}"), &[], 64, d))?;
    let after = bed.up.requests().len();
    // How often each kind of request reached the upstream (1.0: every time).
    let per = |n: usize, r: &load::LoadResult| n as f64 / r.requests.max(1) as f64;
    println!(
        "  {id}: W3 HEAD manifest {:.0} req/s p99 {:.2} ms {h_cpu:.1} µs CPU/req ({} errors, {}, upstream {:.2}/req); one-type Accept {:.0} req/s p99 {:.2} ms {h1_cpu:.1} µs CPU/req ({} errors, upstream {:.2}/req); GET small blob {:.0} req/s p99 {:.2} ms {g_cpu:.1} µs CPU/req ({} errors, {}, upstream {:.2}/req)",
        h.rps, h.p99_ms, h.errors, h.tool, per(mid_full - before, &h),
        h1.rps, h1.p99_ms, h1.errors, per(mid_head1 - mid_full, &h1),
        g.rps, g.p99_ms, g.errors, g.tool, per(after - mid, &g)
    );
    println!(
        "  {id}: W3 GET manifest by tag {:.0} req/s p99 {:.2} ms {m_cpu:.1} µs CPU/req ({} errors, {}, upstream {:.2}/req)",
        m.rps, m.p99_ms, m.errors, m.tool, per(mid - mid_head1, &m)
    );
    for (cpu, metric) in [
        (h_cpu, "w3_head_cpu"),
        (h1_cpu, "w3_head1_cpu"),
        (m_cpu, "w3_mget_cpu"),
        (g_cpu, "w3_get_cpu"),
    ] {
        results.add(metric, id, cpu);
    }
    for (r, rps, p99) in [
        (&h, "w3_head_rps", "w3_head_p99"),
        (&h1, "w3_head1_rps", "w3_head1_p99"),
        (&m, "w3_mget_rps", "w3_mget_p99"),
        (&g, "w3_get_rps", "w3_get_p99"),
    ] {
        if r.errors > r.requests / 100 {
            results.fail(format!(
                "{id} W3 {rps}: {} errors in {} requests",
                r.errors, r.requests
            ));
        }
        results.add(rps, id, r.rps);
        results.add(p99, id, r.p99_ms);
    }
    Ok(())
}

/// (completed upstream GETs of the blob, bytes they sent) in the upstream's access log after
/// `mark`, once the figures stop moving (the log line is written as each response ends).
fn settled_upstream_bytes(bed: &Bed, mark: usize, blob: &Blob) -> (usize, u64) {
    let read = || {
        let log = bed.up.log_text();
        upstream_blob_bytes(log.get(mark..).unwrap_or(""), &blob.digest)
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = read();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = read();
        if (now == last && now.1 >= blob.size) || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// Sums the GET lines of distribution's access log for `digest`:
/// `127.0.0.1 - - [date] "GET /v2/r/blobs/sha256:... HTTP/2.0" 200 52430336 "" "ua"`.
fn upstream_blob_bytes(log: &str, digest: &str) -> (usize, u64) {
    let mut n = 0;
    let mut bytes = 0;
    for line in log.lines() {
        let Some(req) = support::upstream::parse_access_line(line) else {
            continue;
        };
        if req.method != "GET" || !req.uri.contains(digest) || !(200..300).contains(&req.status) {
            continue;
        }
        // The size follows the status after the quoted request line.
        let after = line.find("] \"").and_then(|i| {
            let rest = &line[i + 3..];
            rest.find('"').map(|j| &rest[j + 1..])
        });
        let size = after
            .and_then(|r| r.split_whitespace().nth(1))
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
        n += 1;
        bytes += size;
    }
    (n, bytes)
}

/// The machine's limits: nginx serving the files, Pingora answering them from memory (W3),
/// reading them from the page cache, and loopback TCP.
fn limits_round(bed: &Bed, rep: usize, results: &mut Results) {
    settle();
    let state = bed.run.join(format!("state-static-{rep}"));
    let r = with_server(bed, Kind::NginxStatic, &state, "static", |srv| {
        let mut w2 = Vec::new();
        for _ in 0..W2_RUNS {
            let (gbps, _) = many(srv.target(), &bed.medium.at("/medium"), 16)?;
            results.add("w2_gbps", "nginx-static", gbps);
            w2.push(format!("{gbps:.2}"));
        }
        let big = bed.big.at("/big");
        if bed.opts.big16 {
            let (g16, _) = many(srv.target(), &big, 16)?;
            results.add("x_16x500_gbps", "nginx-static", g16);
        }
        let w1 = w1_runs(srv.target(), &big, "nginx-static", results)?;
        println!("  nginx-static: W1 {w1} GB/s, W2 {} GB/s", w2.join(" "));
        w3(bed, srv, "/small", "/manifest", "nginx-static", results)
    });
    if let Err(e) = r {
        results.fail(format!("nginx-static rep {}: {e}", rep + 1));
    }
    let _ = std::fs::remove_dir_all(&state);
    // Pingora's own floor for W3's small answers (`pingora_static.rs`).
    let r = with_server(bed, Kind::PingoraStatic, &state, "pingora-static", |srv| {
        w3(bed, srv, "/small", "/manifest", "pingora-static", results)
    });
    if let Err(e) = r {
        results.fail(format!("pingora-static rep {}: {e}", rep + 1));
    }
    let _ = std::fs::remove_dir_all(&state);

    match page_cache(bed) {
        Ok((g1, g16)) => {
            println!(
                "  page cache (dd): W1 {} GB/s, W2 {} GB/s",
                list(&g1),
                list(&g16)
            );
            g1.iter()
                .for_each(|g| results.add("w1_gbps", "page-cache", *g));
            g16.iter()
                .for_each(|g| results.add("w2_gbps", "page-cache", *g));
        }
        Err(e) => results.fail(format!("page-cache rep {}: {e}", rep + 1)),
    }

    match loopback(bed) {
        Ok((g1, g16)) => {
            println!(
                "  loopback TCP: W1 {} GB/s, W2 {} GB/s",
                list(&g1),
                list(&g16)
            );
            g1.iter()
                .for_each(|g| results.add("w1_gbps", "loopback", *g));
            g16.iter()
                .for_each(|g| results.add("w2_gbps", "loopback", *g));
        }
        Err(e) => results.fail(format!("loopback rep {}: {e}", rep + 1)),
    }
}

/// `dd` of the page-cached files: one 500 MiB read, and 16 concurrent 50 MiB reads.
fn page_cache(bed: &Bed) -> Result<(Vec<f64>, Vec<f64>), String> {
    let dd = |file: &Path| {
        Command::new("dd")
            .arg(format!("if={}", file.display()))
            .args(["of=/dev/null", "bs=1M", "status=none"])
            .spawn()
            .map_err(|e| format!("dd: {e}"))
    };
    // Make sure both are cached.
    for f in [&bed.big.file, &bed.medium.file] {
        dd(f)?.wait().map_err(|e| e.to_string())?;
    }
    let mut all_ok = true;
    let mut g1 = Vec::new();
    for _ in 0..W1_RUNS {
        let t = Instant::now();
        all_ok &= dd(&bed.big.file)?
            .wait()
            .map_err(|e| e.to_string())?
            .success();
        g1.push(bed.big.size as f64 / t.elapsed().as_secs_f64() / GB);
    }
    let mut g16 = Vec::new();
    for _ in 0..W2_RUNS {
        let t = Instant::now();
        let kids: Vec<_> = (0..16)
            .map(|_| dd(&bed.medium.file))
            .collect::<Result<_, _>>()?;
        for mut k in kids {
            all_ok &= k.wait().map_err(|e| e.to_string())?.success();
        }
        g16.push(16.0 * bed.medium.size as f64 / t.elapsed().as_secs_f64() / GB);
    }
    if !all_ok {
        return Err("dd failed".into());
    }
    Ok((g1, g16))
}

/// An in-process sender writing N bytes from memory per connection, read by the same client
/// as every server: the ceiling of loopback TCP for this client.
fn loopback(bed: &Bed) -> Result<(Vec<f64>, Vec<f64>), String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let acceptor = std::thread::spawn(move || {
        for conn in listener.incoming() {
            if st.load(Ordering::SeqCst) {
                break;
            }
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 4096];
                let mut head = Vec::new();
                while client::find(&head, b"\r\n\r\n").is_none() {
                    match std::io::Read::read(&mut conn, &mut buf) {
                        Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let text = String::from_utf8_lossy(&head);
                let n: u64 = text
                    .split_whitespace()
                    .nth(1)
                    .and_then(|p| p.trim_start_matches('/').parse().ok())
                    .unwrap_or(0);
                let data = vec![0x5au8; MIB as usize];
                let _ = conn.set_nodelay(true);
                if write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"
                )
                .is_err()
                {
                    return;
                }
                let mut left = n;
                while left > 0 {
                    let k = left.min(data.len() as u64) as usize;
                    if std::io::Write::write_all(&mut conn, &data[..k]).is_err() {
                        return;
                    }
                    left -= k as u64;
                }
            });
        }
    });
    let target = Target::plain(port);
    let r = (|| {
        let mut g1 = Vec::new();
        for _ in 0..W1_RUNS {
            g1.push(one(
                target.clone(),
                &bed.big.at(&format!("/{}", bed.big.size)),
            )?);
        }
        let mut g16 = Vec::new();
        for _ in 0..W2_RUNS {
            g16.push(
                many(
                    target.clone(),
                    &bed.medium.at(&format!("/{}", bed.medium.size)),
                    16,
                )?
                .0,
            );
        }
        Ok((g1, g16))
    })();
    stop.store(true, Ordering::SeqCst);
    let _ = std::net::TcpStream::connect(("127.0.0.1", port));
    let _ = acceptor.join();
    r
}

/// Prints the table and writes results.json and results.md.
fn finish(
    bed: &Bed,
    results: &Results,
    total: Duration,
    niced: bool,
    others: (f64, f64),
    rounds: &[RoundLog],
) {
    let mut meta = machine(bed, total);
    meta["nice"] = json!(if niced { bed.opts.nice } else { None });
    meta["cpu_used_by_other_processes"] = json!(others.0);
    meta["cpu_stolen_by_host"] = json!(others.1);
    meta["rounds"] = json!(rounds
        .iter()
        .map(|r| json!({"repetition": r.rep + 1, "round": r.round, "others_cpu": r.others, "attempts": r.attempts}))
        .collect::<Vec<_>>());
    let redone = rounds.iter().filter(|r| r.attempts > 1).count();
    let stayed: Vec<String> = rounds
        .iter()
        .filter(|r| r.others > quiet::DISTURBED)
        .map(|r| {
            format!(
                "{} in repetition {} ({:.0} %)",
                r.round,
                r.rep + 1,
                r.others * 100.0
            )
        })
        .collect();
    let disturbed = format!(
        "Other processes used {:.1} % of the machine's CPU time during the run (host steal {:.1} %); {} of {} rounds were measured again because others took over {:.0} % of the CPU; {}.",
        others.0 * 100.0,
        others.1 * 100.0,
        redone,
        rounds.len(),
        quiet::DISTURBED * 100.0,
        if stayed.is_empty() {
            "every kept round ran on a quiet machine".to_string()
        } else {
            format!("still disturbed: {} — run again on an idle machine", stayed.join(", "))
        }
    );
    let table = results.table();
    let targets = results.targets_markdown();
    println!("\n{table}\n{targets}");
    if !results.failures.is_empty() {
        println!("failures:");
        for f in &results.failures {
            println!("- {f}");
        }
    }
    println!("{disturbed}");
    println!("total run time: {:.0} s", total.as_secs_f64());

    let mut md = format!(
        "# pullgate benchmark results\n\n{} — {}, {} cores, {} GiB RAM, {}; {} repetition(s), medians with min–max; `× pg` is the contestant's median divided by pullgate's. Command: `{}`. Total run time {:.0} s.\n\n",
        meta["date"].as_str().unwrap_or(""),
        meta["machine"]["cpu"].as_str().unwrap_or(""),
        meta["machine"]["cores"],
        meta["machine"]["mem_gib"],
        meta["machine"]["os"].as_str().unwrap_or(""),
        bed.opts.reps,
        meta["command"].as_str().unwrap_or(""),
        total.as_secs_f64(),
    );
    md += &format!("{disturbed}\n\n");
    md += &table;
    md += "\n![W1–W3 medians with min–max](results.svg)\n";
    md += "\n## Targets (issues 3 and 9)\n\n";
    md += &targets;
    md += "\n## Versions\n\n";
    if let Some(v) = meta["versions"].as_object() {
        for (k, v) in v {
            md += &format!("- {k}: {}\n", v.as_str().unwrap_or(""));
        }
    }
    if !results.failures.is_empty() {
        md += "\n## Failures\n\n";
        for f in &results.failures {
            md += &format!("- {}\n", f.replace('\n', " "));
        }
    }
    let json = results.json(meta);
    let _ = std::fs::create_dir_all(&bed.opts.out);
    let jp = bed.opts.out.join("results.json");
    let mp = bed.opts.out.join("results.md");
    let sp = bed.opts.out.join("results.svg");
    match std::fs::write(&jp, serde_json::to_string_pretty(&json).unwrap_or_default())
        .and_then(|_| std::fs::write(&mp, md))
        .and_then(|_| std::fs::write(&sp, chart::svg(results)))
    {
        Ok(()) => println!(
            "wrote {}, {} and {}",
            jp.display(),
            mp.display(),
            sp.display()
        ),
        Err(e) => eprintln!(
            "bench: cannot write results to {}: {e}",
            bed.opts.out.display()
        ),
    }
}

fn machine(bed: &Bed, total: Duration) -> serde_json::Value {
    let cmd_out = |prog: &str, args: &[&str]| -> String {
        Command::new(prog)
            .args(args)
            .output()
            .map(|o| {
                let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
                s += &String::from_utf8_lossy(&o.stderr);
                s.lines().next().unwrap_or("").trim().to_string()
            })
            .unwrap_or_default()
    };
    let file_field = |path: &str, key: &str| -> String {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_once([':', '=']))
            .map(|(_, v)| v.trim().trim_matches('"').to_string())
            .unwrap_or_default()
    };
    let mem_kib: f64 = file_field("/proc/meminfo", "MemTotal")
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let pg = bed.opts.pullgate.display().to_string();
    json!({
        "date": cmd_out("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        "command": format!("bench{}", std::env::args().skip(1).map(|a| format!(" {a}")).collect::<String>()),
        "total_secs": total.as_secs_f64(),
        "repetitions": bed.opts.reps,
        "load_secs": bed.opts.load_secs,
        "blob_bytes": {"big": bed.big.size, "medium": bed.medium.size, "small": bed.small.size},
        "machine": {
            "cpu": file_field("/proc/cpuinfo", "model name"),
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "mem_gib": (mem_kib / 1024.0 / 1024.0).round(),
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            "os": file_field("/etc/os-release", "PRETTY_NAME"),
        },
        "versions": {
            "pullgate": cmd_out(&pg, &["--version"]),
            "distribution": cmd_out(support::upstream::REGISTRY_BIN, &["--version"]),
            "nginx": cmd_out("nginx", &["-v"]),
            "wrk": cmd_out("wrk", &["-v"]),
        },
        "notes": [
            "GB/s = 10^9 bytes per second; MiB = 2^20 bytes",
            "W3 GET runs under wrk -t2 -c64; W3 HEAD under the bench's own keep-alive loop (64 connections, 2 threads) because wrk 4.1 waits for a body after HEAD",
            "nginx proxy_cache caches manifests by tag for 5 minutes (pullgate's default tag_ttl); distribution asks the upstream for every tag",
            "W4 direct pull: challenge + token + GET over TLS (HTTP/1.1) from the same client",
            "peak RSS: VmHWM of a process started for that measurement, summed over its process tree (nginx master and workers)",
        ],
    })
}
