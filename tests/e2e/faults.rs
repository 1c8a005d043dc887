//! HTTP-level faults between pullgate and the real upstream (issue 10, item 1): corrupted bytes,
//! truncated bodies, stalls, slow drips, 503 and 429 bursts. For each, concurrent clients get
//! the verified bytes or a clear error / aborted body (never a complete-looking wrong body), the
//! cache holds nothing unverified, and the next pull succeeds once the fault stops.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::harness::{get, registry_at, Gateway};
use crate::support::{
    block_on, http_client, sha256_hex, wait_until, FaultRelay, HttpFault, TestImage, Upstream,
    UpstreamOptions,
};

const MIB: usize = 1024 * 1024;
/// Concurrent clients per pull.
const CLIENTS: usize = 4;

/// What one client got (the texts are read through `Debug` in failure messages).
#[derive(Debug)]
#[allow(dead_code)]
enum Outcome {
    /// A complete body with the right SHA-256 (or, for a Range, the right bytes).
    Verified,
    /// An error answer before any body byte.
    Refused {
        status: u16,
        code: String,
        message: String,
        retry_after: Option<String>,
    },
    /// The body broke off: the client knows it has not got the blob.
    Aborted(String),
    /// A complete-looking body with wrong bytes: what must never happen.
    Wrong { corrupt_bytes: u64 },
}

/// One upstream with one blob pushed, the fault relay in front of it.
struct Bed {
    up: Upstream,
    relay: FaultRelay,
    layer: String,
    bytes: Arc<Vec<u8>>,
}

impl Bed {
    fn new(seed: &str, size: usize) -> Bed {
        let up = Upstream::start(UpstreamOptions::default());
        let img = TestImage::with_layer_size(seed, size);
        up.push(&img, "team/faulty:v1");
        let relay = FaultRelay::start(up.pki(), &up.url());
        let layer = img.layer_digests()[0].clone();
        let bytes = Arc::new(img.blob_bytes(&layer));
        Bed {
            up,
            relay,
            layer,
            bytes,
        }
    }

    /// A gateway on a new cache in `cache`, its registry "hub" behind the relay.
    fn gateway(&self, cache: &Path, cache_keys: &str) -> Gateway {
        Gateway::start_configured(
            &registry_at("hub", &self.up, &self.relay.url(), "default = true"),
            Some(cache),
            cache_keys,
        )
    }

    fn path(&self) -> String {
        format!("/v2/team/faulty/blobs/{}", self.layer)
    }

    /// `CLIENTS` concurrent GETs of the whole blob, plus one Range client for `range` when given.
    fn pull(&self, gw: &Gateway, range: Option<(usize, usize)>) -> Vec<Outcome> {
        let url = gw.url(&self.path());
        let (digest, bytes) = (self.layer.clone(), Arc::clone(&self.bytes));
        block_on(async move {
            let client = http_client(None);
            let mut tasks = Vec::new();
            let ranges = (0..CLIENTS)
                .map(|_| None)
                .chain(range.map(Some))
                .collect::<Vec<_>>();
            for range in ranges {
                let (client, url, digest, bytes) = (
                    client.clone(),
                    url.clone(),
                    digest.clone(),
                    Arc::clone(&bytes),
                );
                tasks.push(tokio::spawn(async move {
                    fetch(&client, &url, range, &digest, &bytes).await
                }));
            }
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.expect("client task"));
            }
            out
        })
    }
}

async fn fetch(
    client: &reqwest::Client,
    url: &str,
    range: Option<(usize, usize)>,
    digest: &str,
    bytes: &[u8],
) -> Outcome {
    let mut req = client.get(url);
    if let Some((a, b)) = range {
        req = req.header("Range", format!("bytes={a}-{}", b - 1));
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => return Outcome::Aborted(format!("no answer: {e}")),
    };
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = match resp.bytes().await {
        Ok(b) => b,
        Err(e) => return Outcome::Aborted(format!("{status}, body broke off: {e}")),
    };
    if status >= 300 {
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        return Outcome::Refused {
            status,
            code: json["errors"][0]["code"].as_str().unwrap_or("").to_string(),
            message: json["errors"][0]["message"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            retry_after,
        };
    }
    let want = match range {
        Some((a, b)) => &bytes[a..b],
        None => bytes,
    };
    if (range.is_none() && format!("sha256:{}", sha256_hex(&body)) == digest) || body == want {
        return Outcome::Verified;
    }
    let differing = body.iter().zip(want).filter(|(x, y)| x != y).count().max(1) as u64;
    Outcome::Wrong {
        corrupt_bytes: differing,
    }
}

/// Bytes of complete-looking bodies that were wrong; each test asserts 0.
fn corrupt_bytes_served(outcomes: &[Outcome]) -> u64 {
    outcomes
        .iter()
        .map(|o| match o {
            Outcome::Wrong { corrupt_bytes } => *corrupt_bytes,
            _ => 0,
        })
        .sum()
}

fn summary(test: &str, relay: &FaultRelay, all: &[&[Outcome]]) {
    let served: u64 = all.iter().map(|o| corrupt_bytes_served(o)).sum();
    println!(
        "{test}: faults injected: {}, corrupt bytes injected: {}, corrupt bytes served: {served}",
        relay.injected(),
        relay.corrupted_bytes()
    );
    assert_eq!(served, 0, "corrupt bytes served: {all:?}");
}

fn assert_all_verified(outcomes: &[Outcome], what: &str) {
    for o in outcomes {
        assert!(matches!(o, Outcome::Verified), "{what}: {outcomes:?}");
    }
}

/// No client got the blob, and none got a complete-looking wrong body.
fn assert_all_failed_cleanly(outcomes: &[Outcome], what: &str) {
    for o in outcomes {
        assert!(
            matches!(o, Outcome::Aborted(_) | Outcome::Refused { .. }),
            "{what}: {outcomes:?}"
        );
    }
}

/// Every committed blob hashes to its name; once the fill is over the temp dir is empty.
/// Returns the committed digests.
fn assert_cache_verified(cache: &Path) -> Vec<String> {
    wait_until(Duration::from_secs(10), "the fill to clean up", || {
        std::fs::read_dir(cache.join("tmp"))
            .map(|d| d.count() == 0)
            .unwrap_or(false)
    })
    .expect("temp files removed");
    let mut committed = Vec::new();
    let root = cache.join("blobs/sha256");
    for shard in std::fs::read_dir(&root).expect("blobs dir").flatten() {
        for blob in std::fs::read_dir(shard.path()).expect("shard").flatten() {
            let name = blob.file_name().to_string_lossy().into_owned();
            let data = std::fs::read(blob.path()).expect("read blob");
            assert_eq!(sha256_hex(&data), name, "a committed blob is its digest");
            committed.push(format!("sha256:{name}"));
        }
    }
    committed
}

/// The offsets of the Range requests (`bytes=N-`) the relay saw: the fill's resumes.
fn resume_offsets(relay: &FaultRelay) -> Vec<u64> {
    relay
        .blob_gets()
        .iter()
        .flatten()
        .filter_map(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok())
        .collect()
}

fn metric(gw: &Gateway, line_prefix: &str) -> String {
    let text = String::from_utf8(get(&gw.admin_url("/metrics")).body).expect("metrics");
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .map(|l| l.rsplit(' ').next().unwrap_or("").to_string())
        .unwrap_or_default()
}

/// After the fault stops, the next pull through a gateway gets the verified blob and commits it.
fn assert_next_pull_succeeds(bed: &Bed, gw: &Gateway, cache: &Path) -> Vec<Outcome> {
    bed.relay.heal();
    let after = bed.pull(gw, None);
    assert_all_verified(&after, "after the fault stopped");
    assert_eq!(assert_cache_verified(cache), vec![bed.layer.clone()]);
    after
}

#[test]
fn a_corrupted_byte_fails_verification_and_nothing_is_committed() {
    let bed = Bed::new("fault-corrupt", 8 * MIB);
    let cache = tempfile::tempdir().expect("tempdir");
    let gw = bed.gateway(cache.path(), "");
    let at = 3 * MIB as u64 + 7;
    bed.relay.inject(HttpFault::Corrupt { at }, 1);

    // Four whole-blob clients and one Range client whose range holds the corrupted byte.
    let range = (3 * MIB, 4 * MIB);
    let during = bed.pull(&gw, Some(range));
    assert_all_failed_cleanly(&during, "a corrupted fill");
    assert_eq!(bed.relay.corrupted_bytes(), 1);
    assert_failed_verification_left_nothing(&gw, cache.path());

    let after = assert_next_pull_succeeds(&bed, &gw, cache.path());
    summary("corrupt", &bed.relay, &[&during, &after]);
}

#[test]
fn a_corrupted_byte_before_a_cut_is_not_papered_over_by_the_resume() {
    let bed = Bed::new("fault-corrupt-cut", 8 * MIB);
    let cache = tempfile::tempdir().expect("tempdir");
    let gw = bed.gateway(cache.path(), "");
    bed.relay.inject(
        HttpFault::CorruptThenTruncate {
            at: MIB as u64,
            after: 5 * MIB as u64,
        },
        1,
    );
    let during = bed.pull(&gw, None);
    assert_all_failed_cleanly(&during, "a corrupted fill resumed with clean bytes");
    // pullgate resumes at the bytes it has: past the corrupted one, which is already in the
    // temp file (the relay's last buffered bytes may be lost in the cut, hence the wide gap).
    let resumed = resume_offsets(&bed.relay);
    assert!(
        resumed.len() == 1 && resumed[0] > MIB as u64 && resumed[0] <= 5 * MIB as u64,
        "one resume past the corrupted byte: {:?}",
        bed.relay.blob_gets()
    );
    assert_failed_verification_left_nothing(&gw, cache.path());
    let after = assert_next_pull_succeeds(&bed, &gw, cache.path());
    summary("corrupt+cut", &bed.relay, &[&during, &after]);
}

#[test]
fn truncated_bodies_are_resumed_or_fail_cleanly() {
    let bed = Bed::new("fault-truncate", 8 * MIB);

    // Once: the fill resumes with Range; every client gets the verified blob.
    let cache = tempfile::tempdir().expect("tempdir");
    let gw = bed.gateway(cache.path(), "");
    bed.relay.inject(
        HttpFault::Truncate {
            after: 2 * MIB as u64 + 5,
        },
        1,
    );
    let once = bed.pull(&gw, None);
    assert_all_verified(&once, "one truncation");
    let resumed = resume_offsets(&bed.relay);
    assert!(
        resumed.len() == 1 && resumed[0] > 0 && resumed[0] <= 2 * MIB as u64 + 5,
        "resumed with Range at most at the cut: {:?}",
        bed.relay.blob_gets()
    );
    assert_eq!(assert_cache_verified(cache.path()), vec![bed.layer.clone()]);
    drop(gw);

    // Every time: the resumes run out; clients see aborted bodies; nothing is committed.
    let cache = tempfile::tempdir().expect("tempdir");
    let gw = bed.gateway(cache.path(), "");
    bed.relay
        .inject(HttpFault::Truncate { after: MIB as u64 }, usize::MAX);
    let always = bed.pull(&gw, None);
    assert_all_failed_cleanly(&always, "truncated on every attempt");
    assert!(
        assert_cache_verified(cache.path()).is_empty(),
        "nothing committed"
    );
    let after = assert_next_pull_succeeds(&bed, &gw, cache.path());
    drop(gw);

    // A short body that looks complete on the wire (no Content-Length, chunked, ended
    // cleanly): with no length to follow, clients are answered only once the blob is
    // verified, so they get a 502 saying why, and nothing is committed.
    let cache = tempfile::tempdir().expect("tempdir");
    let gw = bed.gateway(cache.path(), "");
    bed.relay.inject(
        HttpFault::CleanShort {
            after: 3 * MIB as u64,
        },
        1,
    );
    let short = bed.pull(&gw, None);
    for o in &short {
        assert!(
            matches!(o, Outcome::Refused { status: 502, message, .. }
                if message.contains("verification failed")),
            "{short:?}"
        );
    }
    assert!(
        assert_cache_verified(cache.path()).is_empty(),
        "nothing committed"
    );
    let healed = assert_next_pull_succeeds(&bed, &gw, cache.path());
    summary(
        "truncate",
        &bed.relay,
        &[&once, &always, &after, &short, &healed],
    );
}

#[test]
fn a_stalled_body_is_resumed_after_the_stall_timeout_and_a_slow_drip_is_not_a_stall() {
    let bed = Bed::new("fault-stall", 4 * MIB);
    let keys = "fill_stall_timeout = \"1s\"";

    let cache = tempfile::tempdir().expect("tempdir");
    let gw = bed.gateway(cache.path(), keys);
    bed.relay.inject(HttpFault::Stall { after: MIB as u64 }, 1);
    let started = Instant::now();
    let stalled = bed.pull(&gw, None);
    let stall_took = started.elapsed();
    assert_all_verified(&stalled, "one stall");
    assert!(
        stall_took >= Duration::from_secs(1),
        "waited out the stall: {stall_took:?}"
    );
    let resumed = resume_offsets(&bed.relay);
    assert!(
        resumed.len() == 1 && resumed[0] > 0 && resumed[0] <= MIB as u64,
        "resumed with Range at most where the body stalled: {:?}",
        bed.relay.blob_gets()
    );
    assert_eq!(assert_cache_verified(cache.path()), vec![bed.layer.clone()]);
    drop(gw);

    // 256 KiB every 300 ms: slower than the stall timeout in total, never silent that long.
    let cache = tempfile::tempdir().expect("tempdir");
    let gw = bed.gateway(cache.path(), keys);
    let before = bed.relay.blob_gets().len();
    bed.relay.inject(
        HttpFault::Drip {
            chunk: 256 * 1024,
            pause: Duration::from_millis(300),
        },
        1,
    );
    let started = Instant::now();
    let dripped = bed.pull(&gw, None);
    let took = started.elapsed();
    assert_all_verified(&dripped, "a slow drip");
    assert!(took >= Duration::from_secs(4), "{took:?}");
    let gets = bed.relay.blob_gets();
    assert!(
        gets[before..].iter().all(|r| r.is_none()),
        "no resume for a slow but steady body: {gets:?}"
    );
    assert_eq!(assert_cache_verified(cache.path()), vec![bed.layer.clone()]);
    println!("stall: resumed, pull took {stall_took:?}; drip: {took:?}, no resume");
    summary("stall+drip", &bed.relay, &[&stalled, &dripped]);
}

/// A short burst of `code` is ridden out by the fill's backoff; a long one gives the clients a
/// clear error (`expect` checks it); the next pull succeeds. Returns the outcomes.
fn burst(
    bed: &Bed,
    code: u16,
    retry_after: Option<u32>,
    expect: impl Fn(&Outcome) -> bool,
) -> Vec<Vec<Outcome>> {
    let cache = tempfile::tempdir().expect("tempdir");
    let gw = bed.gateway(cache.path(), "");
    let injected = bed.relay.injected();
    bed.relay.inject(HttpFault::Status { code, retry_after }, 2);
    let short = bed.pull(&gw, None);
    assert_all_verified(&short, "a short burst");
    assert_eq!(bed.relay.injected() - injected, 2);
    assert_eq!(assert_cache_verified(cache.path()), vec![bed.layer.clone()]);
    drop(gw);

    let cache = tempfile::tempdir().expect("tempdir");
    let gw = bed.gateway(cache.path(), "");
    bed.relay
        .inject(HttpFault::Status { code, retry_after }, usize::MAX);
    let long = bed.pull(&gw, None);
    for o in &long {
        assert!(
            expect(o),
            "a long burst of {code} gives a clear error: {long:?}"
        );
    }
    assert!(
        assert_cache_verified(cache.path()).is_empty(),
        "nothing committed"
    );
    let after = assert_next_pull_succeeds(bed, &gw, cache.path());
    vec![short, long, after]
}

#[test]
fn bursts_of_503_are_ridden_out_or_reported_as_502_naming_the_registry() {
    let bed = Bed::new("fault-503", 4 * MIB);
    let all = burst(&bed, 503, None, |o| {
        matches!(o, Outcome::Refused { status: 502, code, message, .. }
            if code == "UNAVAILABLE" && message.contains("\"hub\"") && message.contains("503"))
    });
    summary("503 burst", &bed.relay, &[&all[0], &all[1], &all[2]]);
}

#[test]
fn bursts_of_429_are_ridden_out_after_retry_after_or_passed_on() {
    let bed = Bed::new("fault-429", 4 * MIB);
    // Retry-After: 1 is waited out (each of the 3 resumes waits 1 s), then passed on.
    let started = Instant::now();
    let all = burst(&bed, 429, Some(1), |o| {
        matches!(o, Outcome::Refused { status: 429, code, message, retry_after: Some(r) }
            if code == "TOOMANYREQUESTS" && r == "1" && message.contains("\"hub\""))
    });
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "Retry-After honoured"
    );

    // A Retry-After longer than a fill holds clients (5 s): passed on at once, without asking
    // the rate-limited upstream again.
    let cache = tempfile::tempdir().expect("tempdir");
    let gw = bed.gateway(cache.path(), "");
    let asked = bed.relay.blob_gets().len();
    bed.relay.inject(
        HttpFault::Status {
            code: 429,
            retry_after: Some(120),
        },
        usize::MAX,
    );
    let started = Instant::now();
    let long_wait = bed.pull(&gw, None);
    for o in &long_wait {
        assert!(
            matches!(o, Outcome::Refused { status: 429, retry_after: Some(r), .. } if r == "120"),
            "{long_wait:?}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(assert_cache_verified(cache.path()).is_empty());
    // Clients that come back before the wait is over get the same answer with the time left,
    // and the upstream is not asked again either (even though it would answer now).
    bed.relay.heal();
    let early = bed.pull(&gw, None);
    for o in &early {
        assert!(
            matches!(o, Outcome::Refused { status: 429, retry_after: Some(r), .. }
                if r.parse::<u64>().is_ok_and(|s| (100..=120).contains(&s))),
            "{early:?}"
        );
    }
    assert_eq!(bed.relay.blob_gets().len() - asked, 1, "asked once");
    // The wait is remembered by the process: a restarted gateway asks again.
    drop(gw);
    let gw = bed.gateway(cache.path(), "");
    let after = assert_next_pull_succeeds(&bed, &gw, cache.path());
    summary(
        "429 burst",
        &bed.relay,
        &[&all[0], &all[1], &all[2], &long_wait, &early, &after],
    );
}

/// A fill that failed verification committed nothing and was counted as `invalid`.
fn assert_failed_verification_left_nothing(gw: &Gateway, cache: &Path) {
    assert!(assert_cache_verified(cache).is_empty(), "nothing committed");
    assert_eq!(
        metric(
            gw,
            r#"pullgate_cache_fill_failures_total{reason="invalid"}"#
        ),
        "1"
    );
}
