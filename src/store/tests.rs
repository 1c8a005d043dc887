//! Conformance suite for the blob store, on a store in a temp dir, with in-process
//! `BlobSource` fakes for what no real part can do: fault injection at an exact byte.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, Semaphore};

use super::*;
use crate::oci::{Algorithm, ErrorCode};

// ---------------------------------------------------------------------------------------------
// Fakes

/// What one `open` call does. The default serves the blob from the offset, in `chunk` pieces.
#[derive(Clone, Default)]
struct Plan {
    /// `open` itself fails.
    error: Option<SourceError>,
    /// After this many bytes (counted from the offset) the stream yields an `Err`.
    break_after: Option<usize>,
    /// After this many bytes the stream ends cleanly (a short body).
    end_after: Option<usize>,
    /// Reported total length; `None` = the real length.
    total_len: Option<Option<u64>>,
    /// Never send anything more after this many bytes (a stalled upstream).
    stall_after: Option<usize>,
}

struct FakeSource {
    data: Bytes,
    chunk: usize,
    plans: Mutex<VecDeque<Plan>>,
    /// Every offset `open` was called with.
    opens: Mutex<Vec<u64>>,
    /// Bytes from this absolute offset on wait for one permit of `gate`.
    gate_at: Option<u64>,
    gate: Arc<Semaphore>,
}

impl FakeSource {
    fn new(data: &Bytes) -> FakeSource {
        FakeSource {
            data: data.clone(),
            chunk: 64 * 1024 + 7,
            plans: Mutex::new(VecDeque::new()),
            opens: Mutex::new(Vec::new()),
            gate_at: None,
            gate: Arc::new(Semaphore::new(0)),
        }
    }

    fn with_plans(mut self, plans: Vec<Plan>) -> FakeSource {
        self.plans = Mutex::new(plans.into());
        self
    }

    fn gated_at(mut self, offset: u64) -> FakeSource {
        self.gate_at = Some(offset);
        self
    }

    fn opens(&self) -> Vec<u64> {
        self.opens.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl BlobSource for FakeSource {
    async fn open(&self, offset: u64) -> Result<SourceBody, SourceError> {
        self.opens.lock().unwrap().push(offset);
        let plan = self.plans.lock().unwrap().pop_front().unwrap_or_default();
        if let Some(e) = plan.error {
            return Err(e);
        }
        let (tx, rx) = mpsc::channel::<Result<Bytes, String>>(4);
        let rest = self.data.slice(offset as usize..);
        let (chunk, gate_at, gate) = (self.chunk, self.gate_at, Arc::clone(&self.gate));
        tokio::spawn(async move {
            let mut sent = 0;
            let mut gated = gate_at.is_some();
            while sent < rest.len() {
                if plan.break_after.is_some_and(|n| sent >= n) {
                    let _ = tx.send(Err("connection reset".into())).await;
                    return;
                }
                if plan.end_after.is_some_and(|n| sent >= n) {
                    return;
                }
                if plan.stall_after.is_some_and(|n| sent >= n) {
                    tx.closed().await;
                    return;
                }
                if gated && gate_at.is_some_and(|g| offset + sent as u64 >= g) {
                    gate.acquire().await.unwrap().forget();
                    gated = false;
                }
                let limit = [plan.break_after, plan.end_after, plan.stall_after]
                    .into_iter()
                    .flatten()
                    .fold(rest.len(), usize::min);
                let n = chunk.min(limit.max(sent + 1) - sent);
                if tx.send(Ok(rest.slice(sent..sent + n))).await.is_err() {
                    return;
                }
                sent += n;
            }
        });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        Ok(SourceBody {
            total_len: plan.total_len.unwrap_or(Some(self.data.len() as u64)),
            chunks: stream.boxed(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// Deterministic, non-repeating-looking bytes; sizes cross the 1 MiB chunk boundary.
fn blob_bytes(len: usize, seed: u32) -> Bytes {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

fn digest_of(data: &[u8]) -> Digest {
    Digest::compute(Algorithm::Sha256, data)
}

fn fast_policy() -> FillPolicy {
    FillPolicy {
        stall_timeout: Duration::from_secs(20),
        backoff: vec![Duration::from_millis(5); 3],
        max_retry_after: Duration::from_secs(5),
    }
}

fn new_store(dir: &Path, max_size: u64) -> BlobStore {
    BlobStore::open_with(dir, max_size, fast_policy())
        .unwrap()
        .0
}

/// Reads a fill reader to its end; `Err` carries the bytes seen before the failure.
async fn drain(mut reader: FillReader) -> Result<Vec<u8>, (Vec<u8>, FillFailure)> {
    let mut out = Vec::new();
    loop {
        match reader.next_chunk().await {
            Ok(Some(chunk)) => {
                assert!(chunk.len() <= MAX_CHUNK);
                out.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(out),
            Err(e) => return Err((out, e)),
        }
    }
}

async fn drain_blob(mut reader: BlobReader) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(chunk) = reader.next_chunk().await? {
        assert!(chunk.len() <= MAX_CHUNK);
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().unwrap().is_dir() {
                out.extend(files_under(&e.path()));
            } else {
                out.push(e.path().display().to_string());
            }
        }
    }
    out
}

/// Asserts that a failed fill left nothing behind.
fn assert_nothing_committed(store: &BlobStore, dir: &Path, digest: &Digest) {
    assert!(store.lookup(digest).is_none());
    assert_eq!(files_under(&dir.join("blobs")), Vec::<String>::new());
    assert_eq!(files_under(&dir.join("tmp")), Vec::<String>::new());
    assert_eq!(store.stats().fills_in_flight, 0);
}

// ---------------------------------------------------------------------------------------------
// Conformance cases

#[tokio::test]
async fn fill_then_lookup() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 1 << 30);
    let data = blob_bytes(2 * MAX_CHUNK + 12_345, 1);
    let digest = digest_of(&data);
    assert!(store.lookup(&digest).is_none());

    let fill = store.fill_or_join(&digest, Arc::new(FakeSource::new(&data)));
    assert_eq!(fill.wait_started().await.unwrap(), data.len() as u64);
    let got = drain(fill.reader(0, data.len() as u64)).await.unwrap();
    assert!(got == data);
    // Readers finish once the bytes are verified; the durable commit follows.
    fill.wait_done().await.unwrap();

    let blob = store.lookup(&digest).expect("committed");
    assert_eq!(blob.len, data.len() as u64);
    assert!(drain_blob(blob.reader(0, blob.len)).await.unwrap() == data);
    let hex = digest.hex();
    let path = dir.path().join("blobs/sha256").join(&hex[..2]).join(hex);
    assert!(std::fs::read(path).unwrap() == data);
    let stats = store.stats();
    assert_eq!((stats.entries, stats.bytes), (1, data.len() as u64));
    assert_eq!((stats.fills_committed, stats.fills_in_flight), (1, 0));

    // A committed blob is handed out as a finished fill, without touching the source.
    let source = Arc::new(FakeSource::new(&data));
    let again = store.fill_or_join(&digest, source.clone());
    assert_eq!(drain(again.reader(0, 10)).await.unwrap(), &data[..10]);
    assert!(source.opens().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_requests_fetch_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 1 << 30);
    let data = blob_bytes(3 * MAX_CHUNK + 999, 2);
    let half = data.len() as u64 / 2;
    let digest = digest_of(&data);
    let source = Arc::new(FakeSource::new(&data).gated_at(half));

    let spawn_reader = |store: BlobStore| {
        let (digest, source) = (digest.clone(), source.clone());
        tokio::spawn(async move {
            let fill = store.fill_or_join(&digest, source);
            drain(fill.reader(0, fill.wait_started().await.unwrap())).await
        })
    };
    let mut readers: Vec<_> = (0..10).map(|_| spawn_reader(store.clone())).collect();
    // Wait until half the blob is written (the source is gated there).
    let first = store.fill_or_join(&digest, source.clone());
    let mut r = first.reader(0, half);
    let mut seen = 0;
    while seen < half - 1 {
        seen += r.next_chunk().await.unwrap().unwrap().len() as u64;
    }
    // The range's last byte, and its end, go out only once the blob is verified (invariant 3).
    let pending = tokio::time::timeout(Duration::from_millis(50), r.next_chunk()).await;
    assert!(pending.is_err(), "no last byte before the fill is verified");
    assert!(first.progress().written >= half);
    // Late joiners: the fill is still running and they get everything from byte 0.
    readers.extend((0..10).map(|_| spawn_reader(store.clone())));
    assert!(Arc::ptr_eq(
        &first,
        &store.fill_or_join(&digest, source.clone())
    ));
    assert_eq!(store.stats().fills_in_flight, 1);
    source.gate.add_permits(1);

    for reader in readers {
        assert!(reader.await.unwrap().unwrap() == data);
    }
    assert_eq!(source.opens(), vec![0]);
    first.wait_done().await.unwrap();
    let stats = store.stats();
    assert_eq!((stats.fills_started, stats.fills_committed), (1, 1));
    assert!(store.lookup(&digest).is_some());
}

#[tokio::test]
async fn range_readers_during_fill_and_on_committed_blob() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 1 << 30);
    let data = blob_bytes(MAX_CHUNK + 70_000, 3);
    let digest = digest_of(&data);
    let source = Arc::new(FakeSource::new(&data).gated_at(1000));

    let fill = store.fill_or_join(&digest, source.clone());
    let (start, end) = (500u64, MAX_CHUNK as u64 + 60_000);
    let during = tokio::spawn(drain(fill.reader(start, end)));
    let tail = tokio::spawn(drain(fill.reader(end, data.len() as u64)));
    source.gate.add_permits(1);
    assert!(during.await.unwrap().unwrap() == data[start as usize..end as usize]);
    assert!(tail.await.unwrap().unwrap() == data[end as usize..]);
    fill.wait_done().await.unwrap();

    let blob = store.lookup(&digest).unwrap();
    let got = drain_blob(blob.reader(start, end)).await.unwrap();
    assert!(got == data[start as usize..end as usize]);
    assert!(drain_blob(blob.reader(0, blob.len + 1)).await.is_err());
    let past = drain(fill.reader(0, data.len() as u64 + 1)).await;
    assert!(
        past.is_err(),
        "a range past the end is an error, not a short body"
    );
}

#[tokio::test]
async fn dropped_reader_does_not_stop_fill() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 1 << 30);
    let data = blob_bytes(2 * MAX_CHUNK, 4);
    let digest = digest_of(&data);
    let source = Arc::new(FakeSource::new(&data).gated_at(MAX_CHUNK as u64));

    let fill = store.fill_or_join(&digest, source.clone());
    let mut reader = fill.reader(0, data.len() as u64);
    assert!(reader.next_chunk().await.unwrap().is_some());
    drop(reader);
    drop(fill);
    source.gate.add_permits(1);
    wait_committed(&store, &digest).await;
    assert_eq!(source.opens(), vec![0]);
}

async fn wait_committed(store: &BlobStore, digest: &Digest) {
    for _ in 0..500 {
        if store.lookup(digest).is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("blob never committed");
}

#[tokio::test]
async fn broken_source_resumes_at_written_offset() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 1 << 30);
    let data = blob_bytes(MAX_CHUNK + 4321, 5);
    let digest = digest_of(&data);
    let plans = vec![
        Plan {
            break_after: Some(100_000),
            ..Plan::default()
        },
        Plan {
            error: Some(SourceError::Broken("connect refused".into())),
            ..Plan::default()
        },
        Plan {
            end_after: Some(50_000),
            ..Plan::default()
        },
    ];
    let source = Arc::new(FakeSource::new(&data).with_plans(plans));
    let fill = store.fill_or_join(&digest, source.clone());
    let got = drain(fill.reader(0, data.len() as u64)).await.unwrap();
    assert!(got == data);
    assert_eq!(source.opens(), vec![0, 100_000, 100_000, 150_000]);
    fill.wait_done().await.unwrap();
    assert!(store.lookup(&digest).is_some());
}

#[tokio::test]
async fn source_breaking_too_often_fails_cleanly_and_next_fill_starts_fresh() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 1 << 30);
    let data = blob_bytes(300_000, 6);
    let digest = digest_of(&data);
    let breaking = Plan {
        break_after: Some(1000),
        ..Plan::default()
    };
    let source = Arc::new(FakeSource::new(&data).with_plans(vec![breaking; 4]));
    let fill = store.fill_or_join(&digest, source.clone());
    let (seen, err) = drain(fill.reader(0, data.len() as u64)).await.unwrap_err();
    assert!(matches!(err, FillFailure::Broken(_)), "{err}");
    assert!(
        data[..4000].starts_with(&seen),
        "only bytes of the blob, then Err"
    );
    assert_eq!(source.opens(), vec![0, 1000, 2000, 3000]);
    assert_eq!(fill.wait_done().await, Err(err));
    assert_nothing_committed(&store, dir.path(), &digest);
    assert_eq!(store.stats().fills_failed, 1);

    let fresh = store.fill_or_join(&digest, Arc::new(FakeSource::new(&data)));
    assert!(!Arc::ptr_eq(&fill, &fresh));
    assert!(drain(fresh.reader(0, 300_000)).await.unwrap() == data);
    fresh.wait_done().await.unwrap();
    assert!(store.lookup(&digest).is_some());
}

#[tokio::test]
async fn stalled_source_counts_as_broken() {
    let dir = tempfile::tempdir().unwrap();
    let policy = FillPolicy {
        stall_timeout: Duration::from_millis(200),
        ..fast_policy()
    };
    let store = BlobStore::open_with(dir.path(), 1 << 30, policy).unwrap().0;
    let data = blob_bytes(200_000, 7);
    let digest = digest_of(&data);
    let stall = Plan {
        stall_after: Some(70_000),
        ..Plan::default()
    };
    let source = Arc::new(FakeSource::new(&data).with_plans(vec![stall]));
    let fill = store.fill_or_join(&digest, source.clone());
    assert!(drain(fill.reader(0, 200_000)).await.unwrap() == data);
    assert_eq!(source.opens(), vec![0, 70_000]);
}

#[tokio::test]
async fn wrong_bytes_are_never_committed() {
    let data = blob_bytes(150_000, 8);
    let digest = digest_of(&data);
    let mut corrupt = data.to_vec();
    corrupt[77_777] ^= 1;
    let corrupt = Bytes::from(corrupt);
    let unknown_len = Plan {
        total_len: Some(None),
        end_after: Some(100_000),
        ..Plan::default()
    };
    let no_range = Plan {
        error: Some(SourceError::Broken("416 range not satisfiable".into())),
        ..Plan::default()
    };
    let short_known_len = vec![
        Plan {
            end_after: Some(100_000),
            ..Plan::default()
        },
        no_range.clone(),
        no_range.clone(),
        no_range,
    ];
    let longer = Plan {
        total_len: Some(Some(1000)),
        ..Plan::default()
    };
    let cases: Vec<(&str, FakeSource)> = vec![
        ("hash mismatch", FakeSource::new(&corrupt)),
        (
            "short body, no length",
            FakeSource::new(&data).with_plans(vec![unknown_len]),
        ),
        (
            "short body, no Range support",
            FakeSource::new(&data).with_plans(short_known_len),
        ),
        (
            "longer than announced",
            FakeSource::new(&data).with_plans(vec![longer]),
        ),
    ];
    for (name, source) in cases {
        let dir = tempfile::tempdir().unwrap();
        let store = new_store(dir.path(), 1 << 30);
        let fill = store.fill_or_join(&digest, Arc::new(source));
        let result = drain(fill.reader(0, data.len() as u64)).await;
        let Err((delivered, _)) = result else {
            panic!("{name}: reader must end in Err");
        };
        assert!(
            delivered.len() < data.len(),
            "{name}: a client never receives the whole length of unverified bytes"
        );
        assert!(fill.wait_done().await.is_err(), "{name}");
        assert_nothing_committed(&store, dir.path(), &digest);
    }
}

/// A Range inside the blob is a complete body once its last byte is out: that byte waits for
/// the whole blob's verification, or a corrupted range would reach a client looking complete.
#[tokio::test]
async fn a_range_inside_a_corrupted_blob_never_completes() {
    let data = blob_bytes(3 * MAX_CHUNK, 11);
    let digest = digest_of(&data);
    let mut corrupt = data.to_vec();
    corrupt[MAX_CHUNK + 5] ^= 0xff;
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 1 << 30);
    let source = FakeSource::new(&Bytes::from(corrupt));
    let fill = store.fill_or_join(&digest, Arc::new(source));
    let (start, end) = (MAX_CHUNK as u64, 2 * MAX_CHUNK as u64);
    let result = drain(fill.reader(start, end)).await;
    let Err((delivered, FillFailure::Invalid(_))) = result else {
        panic!("a range of an unverified blob ends in Err, not {result:?}");
    };
    assert!(
        (delivered.len() as u64) < end - start,
        "the range's last byte is held until the blob is verified"
    );
    assert_nothing_committed(&store, dir.path(), &digest);

    // The same range of a good blob is delivered whole, once the blob is verified.
    let good_dir = tempfile::tempdir().unwrap();
    let good = new_store(good_dir.path(), 1 << 30);
    let fill = good.fill_or_join(&digest, Arc::new(FakeSource::new(&data)));
    let got = drain(fill.reader(start, end)).await.unwrap();
    assert!(got == data[start as usize..end as usize]);
    assert!(fill.progress().verified);
}

/// "Not now" answers (429, 5xx): a short burst is ridden out, waiting at least what the source
/// asked; a longer wait than `max_retry_after` fails the fill at once with the source's answer;
/// a burst that outlasts every attempt fails with the last answer.
#[tokio::test]
async fn busy_sources_are_retried_after_their_retry_after_or_reported() {
    let data = blob_bytes(100_000, 12);
    let digest = digest_of(&data);
    let busy = |secs: Option<u64>| Plan {
        error: Some(SourceError::Busy {
            error: OciError::new(ErrorCode::TooManyRequests, "slow down").with_retry_after("1"),
            retry_after: secs.map(Duration::from_millis),
        }),
        ..Plan::default()
    };
    let policy = FillPolicy {
        max_retry_after: Duration::from_millis(300),
        ..fast_policy()
    };

    // Two answers asking for 200 ms each, then the bytes.
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open_with(dir.path(), 1 << 30, policy.clone())
        .unwrap()
        .0;
    let source =
        Arc::new(FakeSource::new(&data).with_plans(vec![busy(Some(200)), busy(Some(200))]));
    let started = std::time::Instant::now();
    let fill = store.fill_or_join(&digest, source.clone());
    assert_eq!(fill.wait_done().await.unwrap(), data.len() as u64);
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "waited as asked"
    );
    assert_eq!(source.opens(), vec![0, 0, 0]);

    // Asked to wait longer than max_retry_after: no second request, the answer goes to clients.
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open_with(dir.path(), 1 << 30, policy.clone())
        .unwrap()
        .0;
    let source = Arc::new(FakeSource::new(&data).with_plans(vec![busy(Some(60_000))]));
    let fill = store.fill_or_join(&digest, source.clone());
    let Err(FillFailure::Busy(e)) = fill.wait_started().await else {
        panic!("a long Retry-After fails the fill with the source's answer");
    };
    assert_eq!(e.code, ErrorCode::TooManyRequests);
    assert_eq!(e.retry_after.as_deref(), Some("1"));
    assert_eq!(source.opens(), vec![0]);
    assert_nothing_committed(&store, dir.path(), &digest);
    // A client after that fill ended gets the same answer, with the wait that is left, and the
    // source is not asked again until then.
    let late = store.fill_or_join(&digest, source.clone());
    let Err(FillFailure::Busy(e)) = late.wait_started().await else {
        panic!("the source's wait is remembered");
    };
    assert_eq!(e.code, ErrorCode::TooManyRequests);
    let left: u64 = e.retry_after.as_deref().unwrap().parse().unwrap();
    assert!((59..=60).contains(&left), "{left}");
    assert_eq!(source.opens(), vec![0]);

    // Busy on every attempt: the last answer, after 1 + 3 attempts.
    let dir = tempfile::tempdir().unwrap();
    let store = BlobStore::open_with(dir.path(), 1 << 30, policy).unwrap().0;
    let source = Arc::new(FakeSource::new(&data).with_plans(vec![busy(None); 4]));
    let fill = store.fill_or_join(&digest, source.clone());
    let failure = fill.wait_started().await.unwrap_err();
    assert_eq!(failure.to_oci_error().code, ErrorCode::TooManyRequests);
    assert_eq!(source.opens().len(), 4);
    assert_eq!(store.stats().fills_broken, 1);
}

#[tokio::test]
async fn refused_source_is_reported_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 1 << 30);
    let data = blob_bytes(1000, 9);
    let digest = digest_of(&data);
    let not_found = OciError::from_code(ErrorCode::BlobUnknown);
    let refuse = Plan {
        error: Some(SourceError::Refused(not_found.clone())),
        ..Plan::default()
    };
    let source = Arc::new(FakeSource::new(&data).with_plans(vec![refuse]));
    let fill = store.fill_or_join(&digest, source.clone());
    let err = fill.wait_started().await.unwrap_err();
    assert_eq!(err, FillFailure::Refused(not_found.clone()));
    assert_eq!(err.to_oci_error(), not_found);
    assert_eq!(source.opens(), vec![0], "a refusal is not retried");
    assert!(drain(fill.reader(0, 1000)).await.is_err());
    assert_nothing_committed(&store, dir.path(), &digest);
}

#[tokio::test]
async fn sha512_blobs_are_verified_with_sha512_and_kept_apart() {
    let dir = tempfile::tempdir().unwrap();
    let data = blob_bytes(MAX_CHUNK + 4_321, 12);
    let digest = Digest::compute(Algorithm::Sha512, &data);
    {
        let store = new_store(dir.path(), 1 << 30);
        let fill = store.fill_or_join(&digest, Arc::new(FakeSource::new(&data)));
        assert!(drain(fill.reader(0, data.len() as u64)).await.unwrap() == data);
        fill.wait_done().await.unwrap();
        let hex = digest.hex();
        let path = dir.path().join("blobs/sha512").join(&hex[..2]).join(hex);
        assert!(std::fs::read(path).unwrap() == data);
        // The SHA-256 of the same bytes is another blob.
        assert!(store.lookup(&digest_of(&data)).is_none());

        // Bytes that are not the sha512 digest's are never committed.
        let mut corrupt = data.to_vec();
        corrupt[1000] ^= 1;
        let other = Digest::compute(Algorithm::Sha512, b"something else");
        let bad = store.fill_or_join(&other, Arc::new(FakeSource::new(&Bytes::from(corrupt))));
        assert!(drain(bad.reader(0, data.len() as u64)).await.is_err());
        assert!(store.lookup(&other).is_none());
    }
    let reopened = new_store(dir.path(), 1 << 30);
    let blob = reopened.lookup(&digest).expect("indexed again at start");
    assert!(drain_blob(blob.reader(0, blob.len)).await.unwrap() == data);
}

#[tokio::test]
async fn open_cleans_tmp_and_reindexes_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = [blob_bytes(10_000, 10), blob_bytes(20_000, 11)];
    {
        let store = new_store(dir.path(), 1 << 30);
        for data in &blobs {
            let fill = store.fill_or_join(&digest_of(data), Arc::new(FakeSource::new(data)));
            fill.wait_done().await.unwrap();
        }
    }
    std::fs::write(dir.path().join("tmp/abc.1-1"), b"cut by a crash").unwrap();
    std::fs::create_dir_all(dir.path().join("blobs/sha256/ab")).unwrap();
    std::fs::write(dir.path().join("blobs/sha256/ab/not-a-digest"), b"junk").unwrap();
    std::fs::write(dir.path().join("blobs/sha256/README"), b"junk").unwrap();
    let (store, stats) = BlobStore::open(dir.path(), 1 << 30).unwrap();
    assert_eq!(stats.entries, 2);
    assert_eq!(stats.bytes, 30_000);
    assert_eq!(stats.temp_files_removed, 1);
    assert!(files_under(&dir.path().join("tmp")).is_empty());
    for data in &blobs {
        let blob = store.lookup(&digest_of(data)).unwrap();
        assert!(drain_blob(blob.reader(0, blob.len)).await.unwrap() == *data);
    }
}

#[tokio::test]
async fn small_blobs_are_served_from_memory_until_they_leave_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 100 * 1024);
    let data = blob_bytes(10_000, 30);
    let digest = digest_of(&data);
    let fill = store.fill_or_join(&digest, Arc::new(FakeSource::new(&data)));
    fill.wait_done().await.unwrap();
    assert!(store.small(&digest).is_none(), "kept once read");
    assert!(store.lookup(&digest).is_some());
    assert!(store.small(&digest).unwrap() == data);
    // Served without touching the file.
    let path = blob_path(dir.path(), &digest);
    let raw = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert!(store.small(&digest).unwrap() == data);
    // Evicted from the index: gone from memory too.
    for i in 0..4 {
        let other = blob_bytes(30 * 1024, 40 + i);
        let fill = store.fill_or_join(&digest_of(&other), Arc::new(FakeSource::new(&other)));
        fill.wait_done().await.unwrap();
        store.run_pending_tasks();
    }
    assert!(store.small(&digest).is_none());

    // A damaged small file is found on its first read, before anything is kept or served.
    let fill = store.fill_or_join(&digest, Arc::new(FakeSource::new(&data)));
    fill.wait_done().await.unwrap();
    let mut flipped = raw;
    flipped[77] ^= 1;
    std::fs::write(&path, &flipped).unwrap();
    assert!(store.lookup(&digest).is_none());
    assert!(store.small(&digest).is_none());
    assert!(!path.exists(), "quarantined");
    assert_eq!(store.stats().integrity_failures, 1);

    // Larger blobs are never kept in memory.
    let big = blob_bytes(64 * 1024 + 1, 31);
    let fill = store.fill_or_join(&digest_of(&big), Arc::new(FakeSource::new(&big)));
    fill.wait_done().await.unwrap();
    assert!(store.lookup(&digest_of(&big)).is_some());
    assert!(store.small(&digest_of(&big)).is_none());
}

#[tokio::test]
async fn filling_beyond_max_size_evicts_oldest() {
    let dir = tempfile::tempdir().unwrap();
    let max_size = 100 * 1024;
    let store = new_store(dir.path(), max_size);
    let blobs: Vec<Bytes> = (0..5).map(|i| blob_bytes(30 * 1024, 20 + i)).collect();
    for data in &blobs {
        let fill = store.fill_or_join(&digest_of(data), Arc::new(FakeSource::new(data)));
        fill.wait_done().await.unwrap();
        store.run_pending_tasks();
    }
    let stats = store.stats();
    assert!(stats.bytes <= max_size, "{stats:?}");
    assert_eq!(stats.entries, 3);
    assert_eq!(stats.evictions, 2);
    assert_eq!(files_under(&dir.path().join("blobs")).len(), 3);
    assert!(store.lookup(&digest_of(&blobs[0])).is_none());
    assert!(store.lookup(&digest_of(&blobs[1])).is_none());
    assert!(store.lookup(&digest_of(&blobs[4])).is_some());

    // Reopening with a smaller budget evicts at start-up.
    drop(store);
    let (store, stats) = BlobStore::open(dir.path(), 40 * 1024).unwrap();
    assert_eq!((stats.entries, stats.bytes), (1, 30 * 1024));
    assert_eq!(files_under(&dir.path().join("blobs")).len(), 1);
    assert_eq!(store.stats().entries, 1);
}

#[tokio::test]
async fn a_smaller_max_size_on_a_running_store_evicts_the_oldest_now() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 1 << 30);
    let blobs: Vec<Bytes> = (0..4).map(|i| blob_bytes(30 * 1024, 40 + i)).collect();
    for (i, data) in blobs.iter().enumerate() {
        let fill = store.fill_or_join(&digest_of(data), Arc::new(FakeSource::new(data)));
        fill.wait_done().await.unwrap();
        // Distinct write times: the resize keeps the newest files.
        let path = dir
            .path()
            .join("blobs/sha256")
            .join(&digest_of(data).hex()[..2])
            .join(digest_of(data).hex());
        let mtime = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + i as u64);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
    }
    store.set_max_size(70 * 1024);
    let stats = store.stats();
    assert_eq!((stats.entries, stats.bytes), (2, 60 * 1024), "{stats:?}");
    assert_eq!(stats.evictions, 2);
    assert_eq!(files_under(&dir.path().join("blobs")).len(), 2);
    assert!(store.lookup(&digest_of(&blobs[0])).is_none());
    assert!(store.lookup(&digest_of(&blobs[3])).is_some());

    // Growing again evicts nothing, and new fills count against the new bound.
    store.set_max_size(1 << 30);
    let extra = blob_bytes(30 * 1024, 99);
    let fill = store.fill_or_join(&digest_of(&extra), Arc::new(FakeSource::new(&extra)));
    fill.wait_done().await.unwrap();
    assert_eq!(store.stats().entries, 3);
}

#[tokio::test]
async fn after_a_hand_over_evictions_keep_the_files() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 40 * 1024);
    store.hand_over();
    for i in 0..3 {
        let data = blob_bytes(30 * 1024, 60 + i);
        let fill = store.fill_or_join(&digest_of(&data), Arc::new(FakeSource::new(&data)));
        fill.wait_done().await.unwrap();
        store.run_pending_tasks();
    }
    assert_eq!(
        store.stats().entries,
        1,
        "the index still keeps to its bound"
    );
    assert_eq!(
        files_under(&dir.path().join("blobs")).len(),
        3,
        "but the new process may have indexed the files: none deleted"
    );
}

#[tokio::test]
async fn a_blob_another_process_committed_is_taken_from_disk_after_checking_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 1 << 30);
    let data = blob_bytes(50_000, 70);
    let digest = digest_of(&data);
    // As the old process of an upgrade would leave it: committed after this store's scan.
    let shard = dir.path().join("blobs/sha256").join(&digest.hex()[..2]);
    std::fs::create_dir_all(&shard).unwrap();
    std::fs::write(shard.join(digest.hex()), &data).unwrap();
    let source = Arc::new(FakeSource::new(&data));
    let fill = store.fill_or_join(&digest, source.clone());
    fill.wait_done().await.unwrap();
    assert!(source.opens().is_empty(), "not fetched again");
    let blob = store.lookup(&digest).unwrap();
    assert!(drain_blob(blob.reader(0, blob.len)).await.unwrap() == data);

    // A file under the digest's name that is not the digest's bytes is not used.
    let other = blob_bytes(50_000, 71);
    let digest = digest_of(&other);
    let shard = dir.path().join("blobs/sha256").join(&digest.hex()[..2]);
    std::fs::create_dir_all(&shard).unwrap();
    std::fs::write(shard.join(digest.hex()), b"not these bytes").unwrap();
    let source = Arc::new(FakeSource::new(&other));
    let fill = store.fill_or_join(&digest, source.clone());
    fill.wait_done().await.unwrap();
    assert_eq!(source.opens().len(), 1, "fetched from the source instead");
    let blob = store.lookup(&digest).unwrap();
    assert!(drain_blob(blob.reader(0, blob.len)).await.unwrap() == other);
}

#[tokio::test]
async fn pinned_blobs_survive_every_eviction_and_a_restart_within_their_own_budget() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 100 * 1024);
    async fn fill(store: &BlobStore, data: Bytes) {
        let fill = store.fill_or_join(&digest_of(&data), Arc::new(FakeSource::new(&data)));
        fill.wait_done().await.unwrap();
        store.run_pending_tasks();
    }
    let pinned = blob_bytes(30 * 1024, 80);
    fill(&store, pinned.clone()).await;
    assert_eq!(
        store.pin(&digest_of(&pinned)),
        Err(PinError::OverBudget {
            needed: 30 * 1024,
            pinned: 0,
            max: 0
        }),
        "no budget, no pin"
    );
    store.set_pinned_max_size(40 * 1024);
    store.pin(&digest_of(&pinned)).unwrap();
    let missing = digest_of(&blob_bytes(10, 81));
    assert_eq!(store.pin(&missing), Err(PinError::NotCached));
    let second = blob_bytes(30 * 1024, 82);
    fill(&store, second.clone()).await;
    assert!(matches!(
        store.pin(&digest_of(&second)),
        Err(PinError::OverBudget { .. })
    ));

    // Cache pressure: many more blobs than fit; the pinned one is never evicted.
    for i in 0..8 {
        fill(&store, blob_bytes(30 * 1024, 90 + i)).await;
    }
    assert!(store.lookup(&digest_of(&pinned)).is_some());
    let stats = store.stats();
    assert_eq!((stats.pinned_entries, stats.pinned_bytes), (1, 30 * 1024));
    assert!(stats.evictions >= 6, "{stats:?}");

    // A restart with a tiny max_size: the start-up eviction spares it too.
    drop(store);
    let (store, _) = BlobStore::open(dir.path(), 10 * 1024).unwrap();
    assert!(store.lookup(&digest_of(&pinned)).is_some());
    assert_eq!(store.stats().pinned_entries, 1);

    // Unpinned: back in the LRU, evicted by the next pressure, never deleted by the unpin.
    store.unpin(&digest_of(&pinned));
    assert_eq!(store.stats().pinned_entries, 0);
    fill(&store, blob_bytes(30 * 1024, 120)).await;
    assert!(store.lookup(&digest_of(&pinned)).is_none());
}

/// Start-up index rebuild time. Run with
/// `cargo test --release -- --ignored --nocapture open_time_100k`.
#[test]
#[ignore]
fn open_time_100k_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let count = 100_000u32;
    for i in 0..count {
        let hex = hex::encode(sha2::Sha256::digest(i.to_le_bytes()));
        let shard = dir.path().join("blobs/sha256").join(&hex[..2]);
        std::fs::create_dir_all(&shard).unwrap();
        std::fs::write(shard.join(&hex), i.to_le_bytes()).unwrap();
    }
    let (store, stats) = BlobStore::open(dir.path(), 1 << 40).unwrap();
    println!("open with {count} blobs: {:?} ({stats:?})", stats.elapsed);
    assert_eq!(store.stats().entries, u64::from(count));
}

use sha2::Digest as _;

// ---------------------------------------------------------------------------------------------
// Encryption at rest

/// Generation keys held in memory; `revoked` plays a revoked KEK.
struct TestKeys {
    current: u32,
    keys: HashMap<u32, Arc<crate::crypt::SecretKey>>,
    revoked: std::sync::atomic::AtomicBool,
}

impl TestKeys {
    fn new(generations: &[u32]) -> Arc<TestKeys> {
        Arc::new(TestKeys {
            current: *generations.last().unwrap(),
            keys: generations
                .iter()
                .map(|g| (*g, Arc::new(crate::crypt::SecretKey::random().unwrap())))
                .collect(),
            revoked: Default::default(),
        })
    }
}

impl Keys for TestKeys {
    fn sealing_key(&self) -> Result<(u32, Arc<crate::crypt::SecretKey>), KeyMissing> {
        if self.revoked.load(Ordering::Relaxed) {
            return Err(KeyMissing::Revoked);
        }
        Ok((self.current, Arc::clone(&self.keys[&self.current])))
    }

    fn opening_key(&self, id: u32) -> Result<Arc<crate::crypt::SecretKey>, KeyMissing> {
        if self.revoked.load(Ordering::Relaxed) {
            return Err(KeyMissing::Revoked);
        }
        self.keys.get(&id).cloned().ok_or(KeyMissing::Unknown)
    }

    /// Test only: the "wrapped" key is the key itself in hex, which any `TestKeys` opens
    /// (as replicas under one operator's key do).
    fn wrapped_key(&self, id: u32) -> Option<Vec<u8>> {
        Some(hex::encode(self.keys.get(&id)?.expose()).into_bytes())
    }

    fn unwrap_key(
        self: Arc<Self>,
        wrapped: Vec<u8>,
    ) -> futures_util::future::BoxFuture<'static, Result<Arc<crate::crypt::SecretKey>, KeyMissing>>
    {
        Box::pin(async move {
            let mut raw = [0u8; 32];
            hex::decode_to_slice(&wrapped, &mut raw).map_err(|_| KeyMissing::Unknown)?;
            Ok(Arc::new(crate::crypt::SecretKey::from_bytes(raw)))
        })
    }
}

fn sealed_store(dir: &Path, keys: &Arc<TestKeys>) -> BlobStore {
    let store = new_store(dir, 1 << 30);
    store.set_keys(Some(Arc::clone(keys) as Arc<dyn Keys>));
    store
}

fn blob_path(dir: &Path, digest: &Digest) -> std::path::PathBuf {
    let hex = digest.hex();
    let algo = digest.algorithm().as_str();
    dir.join("blobs").join(algo).join(&hex[..2]).join(hex)
}

/// Whether any file under `dir` holds `needle`.
fn plaintext_anywhere(dir: &Path, needle: &[u8]) -> bool {
    files_under(dir).iter().any(|f| {
        std::fs::read(f).is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle))
    })
}

async fn fill_sealed(store: &BlobStore, data: &Bytes) -> Digest {
    let digest = digest_of(data);
    let fill = store.fill_or_join(&digest, Arc::new(FakeSource::new(data)));
    let got = drain(fill.reader(0, data.len() as u64)).await.unwrap();
    assert!(got == *data, "a follower of the fill gets the plaintext");
    fill.wait_done().await.unwrap();
    digest
}

#[tokio::test]
async fn sealed_fills_store_no_plaintext_and_read_back_whole_and_by_range() {
    let dir = tempfile::tempdir().unwrap();
    let keys = TestKeys::new(&[7]);
    let store = sealed_store(dir.path(), &keys);
    for len in [0, 1, crate::crypt::CHUNK_SIZE, 3 * MAX_CHUNK + 777] {
        let data = blob_bytes(len, len as u32 + 3);
        let digest = fill_sealed(&store, &data).await;
        let raw = std::fs::read(blob_path(dir.path(), &digest)).unwrap();
        assert!(crate::crypt::is_sealed(&raw));
        assert_eq!(
            raw.len() as u64,
            crate::crypt::Geometry::new(len as u64).file_len()
        );
        let blob = store.lookup(&digest).expect("committed");
        assert_eq!(blob.len, len as u64);
        assert!(drain_blob(blob.reader(0, blob.len)).await.unwrap() == data);
        if len > 200_000 {
            for (a, b) in [
                (1, 2),
                (65_535, 65_537),
                (100_000, 1_500_000),
                (0, len as u64),
            ] {
                let got = drain_blob(blob.reader(a, b)).await.unwrap();
                assert!(got == data[a as usize..b as usize], "range {a}..{b}");
            }
            // A finished fill of the committed blob reads sealed too.
            let fill = store.fill_or_join(&digest, Arc::new(FakeSource::new(&data)));
            assert!(drain(fill.reader(10, 70_000)).await.unwrap() == data[10..70_000]);
        }
    }
    let probe = blob_bytes(3 * MAX_CHUNK + 777, 3 * MAX_CHUNK as u32 + 780);
    assert!(!plaintext_anywhere(dir.path(), &probe[500_000..500_064]));
    // The index weighs the sealed files.
    let on_disk: u64 = files_under(&dir.path().join("blobs"))
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    assert_eq!(store.stats().bytes, on_disk);
}

#[tokio::test]
async fn range_followers_of_a_sealed_fill_get_their_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let keys = TestKeys::new(&[1]);
    let store = sealed_store(dir.path(), &keys);
    let data = blob_bytes(2 * MAX_CHUNK + 5, 9);
    let digest = digest_of(&data);
    let source = Arc::new(FakeSource::new(&data).gated_at(MAX_CHUNK as u64 + 3));
    let fill = store.fill_or_join(&digest, source.clone());
    fill.wait_started().await.unwrap();
    let early = drain(fill.reader(100, 200_000));
    let whole = drain(fill.reader(0, data.len() as u64));
    // join! polls the readers first: both wait at the gate before it opens.
    let opener = async {
        source.gate.add_permits(1);
    };
    let (early, whole, ()) = tokio::join!(early, whole, opener);
    assert!(early.unwrap() == data[100..200_000]);
    assert!(whole.unwrap() == data);
}

/// Readers at the front of a fill take its chunks as they arrive; one that falls behind the
/// live window (here: not polled until the fill is verified) reads what it missed from the
/// file, as every reader does for chunks too large to keep. All get every byte in order,
/// plaintext or sealed, whole or by range.
#[tokio::test]
async fn readers_at_the_front_and_behind_the_live_chunks_get_every_byte() {
    for (sealed, chunk) in [
        (false, 64 * 1024 + 7),
        (true, 64 * 1024 + 7),
        (false, 300_001),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let keys = TestKeys::new(&[1]);
        let store = match sealed {
            true => sealed_store(dir.path(), &keys),
            false => new_store(dir.path(), 1 << 30),
        };
        // About 50 chunks of 64 KiB + 7 (more than a fill keeps for readers), or chunks too
        // large to keep.
        let data = blob_bytes(3 * MAX_CHUNK + 11, 12);
        let digest = digest_of(&data);
        let mut source = FakeSource::new(&data).gated_at(0);
        source.chunk = chunk;
        let source = Arc::new(source);
        let fill = store.fill_or_join(&digest, source.clone());
        fill.wait_started().await.unwrap();
        let late = fill.reader(0, data.len() as u64);
        let late_range = fill.reader(MAX_CHUNK as u64 - 3, 2 * MAX_CHUNK as u64 + 9);
        let front = drain(fill.reader(0, data.len() as u64));
        let opener = async {
            source.gate.add_permits(1);
        };
        let (front, ()) = tokio::join!(front, opener);
        assert!(front.unwrap() == data, "sealed: {sealed}");
        fill.wait_done().await.unwrap();
        assert!(drain(late).await.unwrap() == data, "sealed: {sealed}");
        let range = drain(late_range).await.unwrap();
        assert!(
            range == data[MAX_CHUNK - 3..2 * MAX_CHUNK + 9],
            "sealed: {sealed}"
        );
    }
}

/// Writes `change` into the committed file, then reads the blob: the read fails (never a
/// wrong byte), the file is gone and counted, and the next fill fetches it again.
async fn damaged(change: impl FnOnce(&mut Vec<u8>), reopen_fails: bool) {
    let dir = tempfile::tempdir().unwrap();
    let keys = TestKeys::new(&[1]);
    let store = sealed_store(dir.path(), &keys);
    let data = blob_bytes(MAX_CHUNK + 70_000, 11);
    let digest = fill_sealed(&store, &data).await;
    let path = blob_path(dir.path(), &digest);
    let mut raw = std::fs::read(&path).unwrap();
    change(&mut raw);
    std::fs::write(&path, &raw).unwrap();
    let before = store.stats().integrity_failures;
    match store.lookup(&digest) {
        None => assert!(reopen_fails, "the header check refused the file"),
        Some(blob) => {
            let len = blob.len;
            let result = drain_blob(blob.reader(0, len)).await;
            match result {
                Ok(got) => panic!("damaged file served {} bytes as complete", got.len()),
                Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::InvalidData),
            }
        }
    }
    assert_eq!(store.stats().integrity_failures, before + 1);
    assert!(!path.exists(), "quarantined file removed");
    assert!(store.lookup(&digest).is_none());
    let source = Arc::new(FakeSource::new(&data));
    let fill = store.fill_or_join(&digest, source.clone());
    assert!(drain(fill.reader(0, data.len() as u64)).await.unwrap() == data);
    fill.wait_done().await.unwrap();
    assert_eq!(
        source.opens(),
        vec![0],
        "refilled from the source, not the damaged file"
    );
    let blob = store.lookup(&digest).unwrap();
    assert!(drain_blob(blob.reader(0, blob.len)).await.unwrap() == data);
}

#[tokio::test]
async fn a_flipped_bit_is_quarantined_and_refilled() {
    damaged(|raw| raw[crate::crypt::HEADER_LEN + 70_000] ^= 0x20, false).await;
}

#[tokio::test]
async fn swapped_chunks_are_quarantined_and_refilled() {
    use crate::crypt::{Geometry, SEALED_CHUNK};
    damaged(
        |raw| {
            let (a, b) = (
                Geometry::file_offset(0) as usize,
                Geometry::file_offset(1) as usize,
            );
            let first: Vec<u8> = raw[a..a + SEALED_CHUNK].to_vec();
            let second: Vec<u8> = raw[b..b + SEALED_CHUNK].to_vec();
            raw[a..a + SEALED_CHUNK].copy_from_slice(&second);
            raw[b..b + SEALED_CHUNK].copy_from_slice(&first);
        },
        false,
    )
    .await;
}

#[tokio::test]
async fn a_truncated_file_is_quarantined_and_refilled() {
    // Cut at a chunk boundary: the file still has a valid geometry, but not the indexed size.
    damaged(
        |raw| raw.truncate(crate::crypt::Geometry::file_offset(16) as usize),
        true,
    )
    .await;
    // Cut while the store was down: the restart indexes the short file, whose new last chunk
    // was not sealed as the last.
    let dir = tempfile::tempdir().unwrap();
    let keys = TestKeys::new(&[1]);
    let data = blob_bytes(MAX_CHUNK + 70_000, 12);
    let digest = fill_sealed(&sealed_store(dir.path(), &keys), &data).await;
    let path = blob_path(dir.path(), &digest);
    let raw = std::fs::read(&path).unwrap();
    std::fs::write(
        &path,
        &raw[..crate::crypt::Geometry::file_offset(16) as usize],
    )
    .unwrap();
    let store = sealed_store(dir.path(), &keys);
    let blob = store.lookup(&digest).expect("a geometry that fits");
    assert_eq!(blob.len, MAX_CHUNK as u64);
    let err = drain_blob(blob.reader(0, blob.len)).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert_eq!(store.stats().integrity_failures, 1);
    assert!(!path.exists());
}

#[tokio::test]
async fn a_foreign_header_or_generation_is_refused_before_a_byte_is_served() {
    // Another digest in the header.
    damaged(|raw| raw[crate::crypt::HEADER_LEN - 1] ^= 1, true).await;
    // A generation the keyring never had.
    damaged(|raw| raw[15] = 99, true).await;
}

#[tokio::test]
async fn turning_encryption_on_and_off_evicts_what_does_not_fit_and_refills() {
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 1 << 30);
    let data = blob_bytes(200_000, 5);
    let digest = fill_sealed(&store, &data).await;
    assert!(!crate::crypt::is_sealed(
        &std::fs::read(blob_path(dir.path(), &digest)).unwrap()
    ));
    let keys = TestKeys::new(&[1]);
    store.set_keys(Some(Arc::clone(&keys) as Arc<dyn Keys>));
    store.sweep_now();
    // Plaintext is never served once encryption is on.
    assert!(store.lookup(&digest).is_none());
    assert!(!blob_path(dir.path(), &digest).exists());
    fill_sealed(&store, &data).await;
    assert!(crate::crypt::is_sealed(
        &std::fs::read(blob_path(dir.path(), &digest)).unwrap()
    ));
    store.set_keys(None);
    store.sweep_now();
    assert!(store.lookup(&digest).is_none());
    assert!(!blob_path(dir.path(), &digest).exists());
    assert_eq!(store.stats().integrity_failures, 0);
}

#[tokio::test]
async fn a_revoked_key_aborts_open_readers_deletes_files_and_caches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let keys = TestKeys::new(&[1]);
    let store = sealed_store(dir.path(), &keys);
    let data = blob_bytes(3 * MAX_CHUNK, 8);
    let digest = fill_sealed(&store, &data).await;
    let small = fill_sealed(&store, &blob_bytes(5_000, 9)).await;
    assert!(store.lookup(&small).is_some());
    assert!(store.small(&small).is_some());
    let blob = store.lookup(&digest).unwrap();
    let mut reader = blob.reader(0, blob.len);
    assert!(reader.next_chunk().await.unwrap().is_some());
    keys.revoked.store(true, Ordering::Relaxed);
    assert!(
        reader.next_chunk().await.is_err(),
        "the open stream aborts at its next chunk"
    );
    store.sweep_now();
    assert!(!blob_path(dir.path(), &digest).exists());
    assert!(
        store.small(&small).is_none(),
        "nothing a revoked key opened stays in memory"
    );
    let fill = store.fill_or_join(&digest, Arc::new(FakeSource::new(&data)));
    assert!(matches!(
        fill.wait_started().await,
        Err(FillFailure::Storage(_))
    ));
    assert_eq!(store.stats().integrity_failures, 0);
}

#[tokio::test]
async fn readers_of_one_sealed_blob_share_its_opened_pieces_while_its_key_lasts() {
    let dir = tempfile::tempdir().unwrap();
    let keys = TestKeys::new(&[4]);
    let store = sealed_store(dir.path(), &keys);
    let data = blob_bytes(6 * MAX_CHUNK + 777, 21);
    let digest = fill_sealed(&store, &data).await;
    let blob = store.lookup(&digest).unwrap();
    let mut first = blob.reader(0, blob.len);
    let mut second = store.lookup(&digest).unwrap().reader(0, blob.len);
    let a = first.next_chunk().await.unwrap().unwrap();
    let b = second.next_chunk().await.unwrap().unwrap();
    assert_eq!(a.as_ptr(), b.as_ptr(), "the piece was opened once for both");
    for (head, reader) in [(a, first), (b, second)] {
        let mut got = head.to_vec();
        got.extend(drain_blob(reader).await.unwrap());
        assert!(got == data, "every reader gets every byte");
    }
    let kept = store.shared.opened.kept();
    assert!((1..=4).contains(&kept), "{kept} pieces kept (invariant 7)");
    // A range that starts inside a piece opens its own bytes, and they are right too.
    let (from, to) = (1_000, 2 * MAX_CHUNK as u64 + 5);
    let got = drain_blob(blob.reader(from, to)).await.unwrap();
    assert!(got == data[from as usize..to as usize]);
    // A kept piece is not handed out once its key is revoked.
    let (mut third, _fourth) = (blob.reader(0, blob.len), blob.reader(0, blob.len));
    keys.revoked.store(true, Ordering::Relaxed);
    assert!(third.next_chunk().await.is_err());
    store.sweep_now();
    assert!(store.lookup(&digest).is_none());
}

#[tokio::test]
async fn sha512_blobs_are_sealed_with_a_header_naming_their_digest() {
    let dir = tempfile::tempdir().unwrap();
    let keys = TestKeys::new(&[1]);
    let store = sealed_store(dir.path(), &keys);
    let data = blob_bytes(100_000, 4);
    let digest = Digest::compute(Algorithm::Sha512, &data);
    let fill = store.fill_or_join(&digest, Arc::new(FakeSource::new(&data)));
    assert!(drain(fill.reader(0, data.len() as u64)).await.unwrap() == data);
    fill.wait_done().await.unwrap();
    let raw = std::fs::read(blob_path(dir.path(), &digest)).unwrap();
    let header = crate::crypt::Header::parse(&raw).unwrap();
    assert_eq!(header.digest, header_digest(&digest));
    let blob = store.lookup(&digest).unwrap();
    assert!(drain_blob(blob.reader(0, blob.len)).await.unwrap() == data);
}

#[tokio::test]
async fn a_sealed_blob_another_process_committed_is_opened_checked_and_taken() {
    let dir = tempfile::tempdir().unwrap();
    let keys = TestKeys::new(&[1]);
    let store = sealed_store(dir.path(), &keys);
    // The other process (same keyring) commits after this store indexed the directory.
    let data = blob_bytes(200_000, 72);
    let other = sealed_store(dir.path(), &keys);
    let digest = fill_sealed(&other, &data).await;
    let source = Arc::new(FakeSource::new(&data));
    let fill = store.fill_or_join(&digest, source.clone());
    assert!(drain(fill.reader(0, data.len() as u64)).await.unwrap() == data);
    fill.wait_done().await.unwrap();
    assert!(source.opens().is_empty(), "not fetched again");
    let blob = store.lookup(&digest).unwrap();
    assert!(drain_blob(blob.reader(0, blob.len)).await.unwrap() == data);
    assert!(crate::crypt::is_sealed(
        &std::fs::read(blob_path(dir.path(), &digest)).unwrap()
    ));
}

// ---------------------------------------------------------------------------------------------
// The object store tier (L2), on object_store's in-memory store

/// A source that says its bytes came from another replica.
struct FromPeer(FakeSource);

#[async_trait::async_trait]
impl BlobSource for FromPeer {
    async fn open(&self, offset: u64) -> Result<SourceBody, SourceError> {
        self.0.open(offset).await
    }
    fn origin(&self) -> Origin {
        Origin::Peer
    }
}

async fn wait_uploads(l2: &L2, n: u64) {
    for _ in 0..500 {
        if l2.stats().uploads >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{n} uploads expected, stats {:?}", l2.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_fetched_upstream_goes_to_l2_and_a_store_with_an_empty_disk_fills_from_it() {
    let objects = Arc::new(object_store::memory::InMemory::new());
    let l2 = Arc::new(L2::new(objects.clone(), "/cache/"));
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = new_store(dir_a.path(), 1 << 30);
    a.set_l2(Arc::clone(&l2));
    // Small enough for one PUT, and large enough for a multipart upload.
    let blobs = [blob_bytes(100_000, 7), blob_bytes(9 * MAX_CHUNK + 3, 8)];
    for data in &blobs {
        let fill = a.fill_or_join(&digest_of(data), Arc::new(FakeSource::new(data)));
        fill.wait_done().await.unwrap();
    }
    wait_uploads(&l2, 2).await;
    assert_eq!(l2.stats().misses, 2);
    let path = object_store::path::Path::from(format!(
        "cache/blobs/sha256/{}",
        digest_of(&blobs[1]).hex()
    ));
    let object = object_store::ObjectStoreExt::get(objects.as_ref(), &path)
        .await
        .expect("the object is named by its digest")
        .bytes()
        .await
        .unwrap();
    assert!(object == blobs[1]);

    let b = new_store(dir_b.path(), 1 << 30);
    b.set_l2(Arc::clone(&l2));
    for data in &blobs {
        let refused = Plan {
            error: Some(SourceError::Refused(OciError::new(
                ErrorCode::BlobUnknown,
                "must not be asked",
            ))),
            ..Plan::default()
        };
        let source = Arc::new(FakeSource::new(data).with_plans(vec![refused]));
        let fill = b.fill_or_join(&digest_of(data), source.clone());
        assert!(drain(fill.reader(0, data.len() as u64)).await.unwrap() == *data);
        fill.wait_done().await.unwrap();
        assert!(source.opens().is_empty(), "the next source was not asked");
    }
    let stats = l2.stats();
    assert_eq!(
        (stats.hits, stats.uploads),
        (2, 2),
        "nothing uploaded twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l2_uploads_only_what_came_from_the_upstream_and_deletes_what_does_not_verify() {
    let objects = Arc::new(object_store::memory::InMemory::new());
    let l2 = Arc::new(L2::new(objects.clone(), ""));
    let dir = tempfile::tempdir().unwrap();
    let store = new_store(dir.path(), 1 << 30);
    store.set_l2(Arc::clone(&l2));
    let data = blob_bytes(300_000, 9);
    let digest = digest_of(&data);
    let fill = store.fill_or_join(&digest, Arc::new(FromPeer(FakeSource::new(&data))));
    fill.wait_done().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(l2.stats().uploads, 0, "the peer that fetched it uploads it");

    // A damaged object: the fill fails verification (nothing committed) and the object goes.
    let other = blob_bytes(200_000, 10);
    let other_digest = digest_of(&other);
    let path = object_store::path::Path::from(format!("blobs/sha256/{}", other_digest.hex()));
    let mut damaged = other.to_vec();
    damaged[1000] ^= 1;
    object_store::ObjectStoreExt::put(objects.as_ref(), &path, damaged.into())
        .await
        .unwrap();
    let source = Arc::new(FakeSource::new(&other));
    let fill = store.fill_or_join(&other_digest, source.clone());
    assert!(matches!(
        fill.wait_done().await,
        Err(FillFailure::Invalid(_))
    ));
    assert!(store.lookup(&other_digest).is_none(), "nothing committed");
    assert!(source.opens().is_empty());
    for _ in 0..500 {
        if object_store::ObjectStoreExt::head(objects.as_ref(), &path)
            .await
            .is_err()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(object_store::ObjectStoreExt::head(objects.as_ref(), &path)
        .await
        .is_err());
    // The next fill asks the upstream and puts the good copy up.
    let fill = store.fill_or_join(&other_digest, source.clone());
    fill.wait_done().await.unwrap();
    assert_eq!(source.opens(), vec![0]);
    wait_uploads(&l2, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_objects_open_on_another_keyring_and_a_damaged_one_is_replaced_from_the_next_source()
{
    let objects = Arc::new(object_store::memory::InMemory::new());
    let data = blob_bytes(300_000, 21);
    let digest = digest_of(&data);
    let sealed_store = |keys: &Arc<TestKeys>| {
        let dir = tempfile::tempdir().unwrap();
        let store = sealed_store(dir.path(), keys);
        let l2 = Arc::new(L2::new(objects.clone(), ""));
        store.set_l2(Arc::clone(&l2));
        (dir, store, l2)
    };
    let (_a, first, l2) = sealed_store(&TestKeys::new(&[1]));
    let fill = first.fill_or_join(&digest, Arc::new(FakeSource::new(&data)));
    fill.wait_done().await.unwrap();
    wait_uploads(&l2, 1).await;
    let path = object_store::path::Path::from(format!("blobs/sha256/{}", digest.hex()));
    let object = object_store::ObjectStoreExt::get(objects.as_ref(), &path)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(object.starts_with(b"PGL2ENV1"), "sealed");
    assert!(
        !object.windows(64).any(|w| w == &data[1000..1064]),
        "no plaintext"
    );

    // Another store, its own generations: opened from the object store, the source unasked.
    let (_b, second, _) = sealed_store(&TestKeys::new(&[1, 2]));
    let source = Arc::new(FakeSource::new(&data));
    let fill = second.fill_or_join(&digest, source.clone());
    fill.wait_done().await.unwrap();
    assert!(source.opens().is_empty());
    let blob = second.lookup(&digest).unwrap();
    assert_eq!(drain_blob(blob.reader(0, blob.len)).await.unwrap(), data);

    // A flipped bit in a late chunk: the fill takes what is missing from the next source,
    // verifies, and the damaged object is deleted.
    let mut damaged = object.to_vec();
    let at = damaged.len() - 100;
    damaged[at] ^= 1;
    object_store::ObjectStoreExt::put(objects.as_ref(), &path, damaged.clone().into())
        .await
        .unwrap();
    let (_c, third, _) = sealed_store(&TestKeys::new(&[3]));
    let source = Arc::new(FakeSource::new(&data));
    let fill = third.fill_or_join(&digest, source.clone());
    fill.wait_done().await.unwrap();
    assert_eq!(source.opens().len(), 1, "the next source, once");
    let blob = third.lookup(&digest).unwrap();
    assert_eq!(drain_blob(blob.reader(0, blob.len)).await.unwrap(), data);
    // Deleted, or already replaced by this store's good copy.
    for _ in 0..500 {
        let now = match object_store::ObjectStoreExt::get(objects.as_ref(), &path).await {
            Ok(got) => got.bytes().await.unwrap().to_vec(),
            Err(_) => return,
        };
        if now != damaged {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the damaged object is still there");
}

/// What opening a sealed 1 MiB read costs, decrypting each chunk to its place (what reads do)
/// against opening in place and then moving the plaintext over the tags (what they did):
/// `cargo test --release --lib -- --ignored --nocapture sealed_read_throughput`. Prints, asserts
/// nothing about speed.
#[test]
#[ignore]
fn sealed_read_throughput() {
    use crate::crypt::{self, FileKey, Geometry, Header, Kind, CHUNK_SIZE, TAG_LEN};
    let plain = blob_bytes(1 << 20, 3);
    let header = Header::new(Kind::Blob, 1, [7; 32]).unwrap();
    let key = FileKey::derive(&crate::crypt::SecretKey::random().unwrap(), &header);
    let sealed = crypt::seal_all(&key, &plain);
    let body = &sealed[crypt::HEADER_LEN..];
    let len = plain.len() as u64;
    let rounds = 2000;
    let mut buf = vec![0u8; body.len()];
    let time = |f: &mut dyn FnMut(&mut [u8]) -> usize, buf: &mut Vec<u8>| {
        let started = std::time::Instant::now();
        for _ in 0..rounds {
            buf.copy_from_slice(body);
            assert_eq!(f(buf), plain.len());
        }
        (rounds as f64 * len as f64) / started.elapsed().as_secs_f64() / 1e9
    };
    for _ in 0..3 {
        let to_place = time(
            &mut |b| super::seal::open_span_in_place(&key, b, 0, len, true, 0..len).unwrap(),
            &mut buf,
        );
        let in_place_then_move = time(
            &mut |b| {
                let (mut at, mut out) = (0, 0);
                for index in 0..Geometry::new(len).chunks() {
                    let n =
                        (len - Geometry::plaintext_start(index)).min(CHUNK_SIZE as u64) as usize;
                    let last = Geometry::new(len).is_last(index);
                    let end = at + n + TAG_LEN;
                    key.open_chunk(index, last, &mut b[at..end]).unwrap();
                    b.copy_within(at..at + n, out);
                    out += n;
                    at = end;
                }
                out
            },
            &mut buf,
        );
        println!(
            "sealed 1 MiB reads: to place {to_place:.2} GB/s, in place then moved {in_place_then_move:.2} GB/s ({:.2}x)",
            to_place / in_place_then_move
        );
    }
}
