//! Single-flight fills: one upstream fetch per digest, written to a temp file that readers
//! follow as it grows, verified, then committed.
//!
//! Owns: the fill task (fetch, resume with `open(received)`, hash, verify, commit or clean up),
//! the progress channel, the live chunks for readers at the front, and the readers of a growing
//! file. The task runs on its own tokio task and belongs to no client: a reader going away
//! never cancels it (invariant 4).
//! Must never: commit bytes whose length or SHA-256 differ from the digest (invariant 3), let a
//! reader report the end of its range before the fill is verified, or buffer more than one
//! chunk per reader (invariant 7).

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use tokio::sync::broadcast::{self, error::TryRecvError};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::disk::{Blob, ChunkReader, Extent, SealedFile, MAX_CHUNK};
use super::{BlobSource, Origin, Shared, SourceBody, SourceError};
use crate::crypt::{FileKey, Sealer};
use crate::oci::{Digest, DigestHasher, ErrorCode, OciError};

/// Room left free on the cache's file system beyond a blob being filled.
const SPACE_RESERVE: u64 = 1 << 20;

/// Most bytes the writer takes before it tells readers.
const WRITE_BATCH: usize = 1 << 20;

/// Received chunks a fill keeps for readers that have not taken them yet (see [`Live`]).
const LIVE_CHUNKS: usize = 16;

/// Larger chunks are not kept for readers (they read them from the file), so what a fill keeps
/// is at most `LIVE_CHUNKS` × this (4 MiB) however large its source's chunks (invariant 7).
const LIVE_CHUNK_MAX: usize = 256 << 10;

/// A received chunk and its offset in the blob.
type Live = (u64, Bytes);

/// Timing of a fill's resume logic.
#[derive(Debug, Clone)]
pub struct FillPolicy {
    /// No chunk for this long counts as a broken transfer (then resumed).
    pub stall_timeout: Duration,
    /// Wait before each resume attempt; its length is the number of resumes allowed.
    pub backoff: Vec<Duration>,
    /// The longest `Retry-After` a fill waits out; a source asking for more fails the fill at
    /// once with its answer (e.g. 429 and its `Retry-After`) rather than hold clients that long.
    pub max_retry_after: Duration,
}

impl Default for FillPolicy {
    fn default() -> FillPolicy {
        FillPolicy {
            stall_timeout: Duration::from_secs(60),
            backoff: vec![
                Duration::from_millis(100),
                Duration::from_millis(400),
                Duration::from_secs(1),
            ],
            max_retry_after: Duration::from_secs(5),
        }
    }
}

/// Why a fill ended without a committed blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FillFailure {
    /// The source refused for good (e.g. upstream 404/403): tell the client as is.
    Refused(OciError),
    /// Transport problems outlasted every resume attempt.
    Broken(String),
    /// The source kept answering "not now" (429, 5xx), or asked for a longer wait than a fill
    /// holds clients: its answer, for the client (e.g. `TOOMANYREQUESTS` with `Retry-After`).
    Busy(OciError),
    /// The bytes are not the blob: wrong length or wrong SHA-256 (invariant 3).
    Invalid(String),
    /// Local disk trouble, or a digest the store cannot hold.
    Storage(String),
}

impl FillFailure {
    /// The error a client gets when nothing was sent yet: refusals as the source gave them,
    /// everything else `UNAVAILABLE` (502) saying why.
    pub fn to_oci_error(&self) -> OciError {
        match self {
            FillFailure::Refused(e) | FillFailure::Busy(e) => e.clone(),
            // Local paths stay out of client answers.
            FillFailure::Storage(_) => OciError::from_code(ErrorCode::Unavailable),
            other => OciError::new(ErrorCode::Unavailable, other.to_string()),
        }
    }
}

impl fmt::Display for FillFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FillFailure::Refused(e) => write!(f, "refused by source: {e}"),
            FillFailure::Broken(m) => write!(f, "transfer broken: {m}"),
            FillFailure::Busy(e) => write!(f, "source busy: {e}"),
            FillFailure::Invalid(m) => write!(f, "verification failed: {m}"),
            FillFailure::Storage(m) => write!(f, "storage error: {m}"),
        }
    }
}

impl std::error::Error for FillFailure {}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FillState {
    Running,
    /// Every byte is in the temp file and matched the digest; the durable commit (fsync,
    /// rename) is still running. Readers may finish: their bytes are verified, and the open
    /// file stays readable whatever happens to its name.
    Verified,
    /// Verified and committed: the blob is in the index.
    Done,
    Failed(FillFailure),
}

impl FillState {
    /// The bytes in the file are the blob (invariant 3): readers may deliver the last one.
    fn is_verified(&self) -> bool {
        matches!(self, FillState::Verified | FillState::Done)
    }
}

/// What a fill has done so far; published after every write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// Bytes written to the temp file, from offset 0 without gaps.
    pub written: u64,
    /// The blob's length as the source announced it, once known.
    pub total_len: Option<u64>,
    pub state: FillState,
    /// The file's bytes were verified, even if the commit failed afterwards: readers already
    /// streaming may finish from their open file.
    pub verified: bool,
    /// Where the bytes came from, once verified (the audit's `filled_by`).
    pub origin: Option<Origin>,
}

/// A running (or finished) fill that any number of readers follow.
#[derive(Debug)]
pub struct Fill {
    id: u64,
    digest: Digest,
    /// The temp file (or, for an already committed blob, the blob file). `None` only for a fill
    /// that failed before it had a file.
    file: Option<Arc<File>>,
    /// How to open the file when it is sealed.
    sealed: Option<Arc<SealedFile>>,
    rx: watch::Receiver<Progress>,
    /// The chunks of a running fill as they arrive, for readers at the front: they get the
    /// bytes without waiting for the write and without reading them back (or decrypting them)
    /// from the file. A reader that falls more than [`LIVE_CHUNKS`] behind reads the file.
    live: Option<broadcast::Sender<Live>>,
}

impl Fill {
    /// A fill that failed before it started (unsupported digest, no temp file, no runtime).
    pub(crate) fn failed(digest: &Digest, failure: FillFailure) -> Arc<Fill> {
        let progress = Progress {
            written: 0,
            total_len: None,
            state: FillState::Failed(failure),
            verified: false,
            origin: None,
        };
        Fill::finished(digest, None, None, progress)
    }

    /// A blob already committed, presented as a finished fill.
    pub(crate) fn committed(digest: &Digest, blob: Blob) -> Arc<Fill> {
        let progress = Progress {
            written: blob.len,
            total_len: Some(blob.len),
            state: FillState::Done,
            verified: true,
            origin: None,
        };
        Fill::finished(digest, Some(blob.file), blob.sealed, progress)
    }

    fn finished(
        digest: &Digest,
        file: Option<Arc<File>>,
        sealed: Option<Arc<SealedFile>>,
        progress: Progress,
    ) -> Arc<Fill> {
        let (_tx, rx) = watch::channel(progress);
        Arc::new(Fill {
            id: 0,
            digest: digest.clone(),
            file,
            sealed,
            rx,
            live: None,
        })
    }

    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// A snapshot of the progress.
    pub fn progress(&self) -> Progress {
        self.rx.borrow().clone()
    }

    /// Resolves once the source opened with a known total length (the value returned), or when
    /// the fill is done if the source gave none (then the final length); or with the failure.
    /// Answer the client's status line only after this: a refusal becomes a proper error.
    pub async fn wait_started(&self) -> Result<u64, FillFailure> {
        self.wait_for(|p| p.total_len.or(p.state.is_verified().then_some(p.written)))
            .await
    }

    /// Resolves with the length once the blob is verified and committed, or with the failure.
    pub async fn wait_done(&self) -> Result<u64, FillFailure> {
        self.wait_for(|p| (p.state == FillState::Done).then_some(p.written))
            .await
    }

    async fn wait_for(&self, ready: impl Fn(&Progress) -> Option<u64>) -> Result<u64, FillFailure> {
        let mut rx = self.rx.clone();
        loop {
            {
                let p = rx.borrow_and_update();
                if let FillState::Failed(f) = &p.state {
                    return Err(f.clone());
                }
                if let Some(v) = ready(&p) {
                    return Ok(v);
                }
            }
            if rx.changed().await.is_err() {
                // The task is gone; its last word was already seen above.
                return Err(ended_without_result());
            }
        }
    }

    /// Streams bytes `[start, end)` as they are written, from any point of the fill's life.
    ///
    /// Invariant 3: the reader returns `Ok(None)` only when the whole range was delivered AND
    /// the fill is verified; if the fill fails it returns `Err` — the gateway must then abort
    /// the response mid-body, never end it. Dropping the reader does not affect the fill.
    pub fn reader(self: &Arc<Self>, start: u64, end: u64) -> FillReader {
        FillReader {
            _fill: Arc::clone(self),
            rx: self.rx.clone(),
            live: self.live.as_ref().map(broadcast::Sender::subscribe),
            held: None,
            chunks: self
                .file
                .as_ref()
                .map(|f| ChunkReader::new(Arc::clone(f), start, end, self.sealed.clone())),
            closed: false,
        }
    }
}

fn ended_without_result() -> FillFailure {
    FillFailure::Broken("fill task ended without a result".into())
}

/// A reader following a fill; see [`Fill::reader`].
#[derive(Debug)]
pub struct FillReader {
    _fill: Arc<Fill>,
    rx: watch::Receiver<Progress>,
    live: Option<broadcast::Receiver<Live>>,
    /// The live chunk taken but not (all) handed out yet: at most one per reader (invariant 7).
    held: Option<Live>,
    chunks: Option<ChunkReader>,
    closed: bool,
}

impl FillReader {
    /// The next chunk (at most 1 MiB), waiting for the fill when caught up.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, FillFailure> {
        loop {
            let (written, verified, total) = {
                let p = self.rx.borrow_and_update();
                match &p.state {
                    // A commit that failed after verification leaves the bytes good.
                    FillState::Failed(f) if !p.verified => return Err(f.clone()),
                    _ => (p.written, p.verified, p.total_len),
                }
            };
            let Some(chunks) = self.chunks.as_mut() else {
                return Err(FillFailure::Storage("fill has no file".into()));
            };
            // Live chunks may be ahead of the file; invariant 3 (below) holds for them too.
            let limit = match verified {
                true => chunks.end(),
                false => chunks
                    .end()
                    .min(total.unwrap_or(u64::MAX))
                    .saturating_sub(1),
            };
            if let Some(bytes) = take_live(&mut self.live, &mut self.held, chunks.pos(), limit) {
                chunks.skip(bytes.len() as u64);
                return Ok(Some(bytes));
            }
            // Invariant 3: the last byte of the range goes out only once the whole blob is
            // verified. With Content-Length framing a client holding every byte of its range
            // has a complete body, so handing out all of an unverified range (the whole blob
            // or a Range inside it) would defeat the mid-body abort. A Range client therefore
            // waits for the end of the fill for its last byte.
            let readable = if verified {
                written
            } else {
                let end = chunks.end().min(total.unwrap_or(u64::MAX));
                written.min(end.saturating_sub(1))
            };
            if !chunks.is_done() && readable > chunks.pos() {
                // Sealed chunks reach the disk whole: `written` is a chunk boundary until the
                // last one, which was sealed as the last once `written` is the whole blob.
                let extent = Extent {
                    written,
                    complete: verified || total == Some(written),
                };
                return match chunks.read(readable, extent).await {
                    Ok(bytes) => Ok(Some(bytes)),
                    Err(e) => Err(FillFailure::Storage(format!("reading fill: {e}"))),
                };
            }
            if verified {
                // Invariant 3: the end is reported only for a verified blob.
                return match chunks.is_done() {
                    true => Ok(None),
                    false => Err(FillFailure::Invalid(format!(
                        "range end {} is past the blob's end {written}",
                        chunks.end()
                    ))),
                };
            }
            if self.closed {
                return Err(ended_without_result());
            }
            // Woken by the fill's progress, or by a chunk when none is held.
            let live = self.live.as_mut().filter(|_| self.held.is_none());
            tokio::select! {
                changed = self.rx.changed() => {
                    if changed.is_err() {
                        // The task is gone: look at its last word once more, then give up.
                        self.closed = true;
                    }
                }
                received = async { live?.recv().await.ok() }, if live.is_some() => {
                    // A lagged receiver gets nothing here: the file has what it missed.
                    self.held = received;
                }
            }
        }
    }
}

/// Bytes of a live chunk from `pos` (up to `limit`, at most [`MAX_CHUNK`]), when one covers
/// `pos`. Chunks behind `pos` are dropped; one ahead of it is held until the file has caught
/// the reader up to it.
fn take_live(
    live: &mut Option<broadcast::Receiver<Live>>,
    held: &mut Option<Live>,
    pos: u64,
    limit: u64,
) -> Option<Bytes> {
    loop {
        if let Some((offset, bytes)) = held {
            let end = *offset + bytes.len() as u64;
            if end <= pos {
                *held = None;
            } else if *offset > pos {
                return None;
            } else {
                let from = usize::try_from(pos - *offset).ok()?;
                let to = usize::try_from(end.min(limit).saturating_sub(*offset))
                    .ok()?
                    .min(from.saturating_add(MAX_CHUNK));
                if to <= from {
                    // The rest waits for the verification.
                    return None;
                }
                let out = bytes.slice(from..to);
                if to == bytes.len() {
                    *held = None;
                }
                return Some(out);
            }
        }
        match live.as_mut()?.try_recv() {
            Ok(chunk) => *held = Some(chunk),
            // Older chunks were dropped for this reader: the file has them.
            Err(TryRecvError::Lagged(_)) => {}
            // (Never closed while the fill lives: it keeps a sender for new readers.)
            Err(TryRecvError::Empty | TryRecvError::Closed) => return None,
        }
    }
}

/// Why copying a body stopped.
enum Stop {
    /// Worth a resume: `open(received)`.
    Broken(String),
    /// Final.
    Fatal(FillFailure),
}

/// Why the last attempt to get bytes failed, in a way worth another attempt.
enum Setback {
    Broken(String),
    Busy {
        error: OciError,
        retry_after: Option<Duration>,
    },
}

impl Setback {
    /// The failure to report when no attempt is left.
    fn into_failure(self, attempts: usize) -> FillFailure {
        match self {
            Setback::Broken(why) => {
                FillFailure::Broken(format!("{why} (gave up after {attempts} resume attempts)"))
            }
            Setback::Busy { error, .. } => FillFailure::Busy(error),
        }
    }
}

/// A source error as a setback worth another attempt, or the final failure.
fn setback(e: SourceError) -> Result<Setback, FillFailure> {
    match e {
        SourceError::Refused(e) => Err(FillFailure::Refused(e)),
        SourceError::Broken(why) => Ok(Setback::Broken(why)),
        SourceError::Busy { error, retry_after } => Ok(Setback::Busy { error, retry_after }),
    }
}

/// Everything a fill task needs; consumed by [`FillTask::run`].
pub(crate) struct FillTask {
    shared: Arc<Shared>,
    digest: Digest,
    id: u64,
    source: Arc<dyn BlobSource>,
    file: Arc<File>,
    temp: PathBuf,
    tx: Arc<watch::Sender<Progress>>,
    /// Every chunk handed to the pipeline, for the readers at the front.
    live: broadcast::Sender<Live>,
    /// The write-and-hash stage, started by `run`; `None` before that and once finished.
    pipeline: Option<Pipeline>,
    /// Bytes handed to the pipeline: where a resume starts.
    received: u64,
    total_len: Option<u64>,
    resumes: usize,
    /// The file's key when the cache is encrypted: the stage seals what it writes.
    seal: Option<FileKey>,
}

/// Builds the shared handle and the task of a new fill. The caller registers the handle in the
/// in-flight map, then spawns `task.run()`.
pub(crate) fn new_fill(
    shared: &Arc<Shared>,
    id: u64,
    digest: &Digest,
    source: Arc<dyn BlobSource>,
    file: File,
    temp: PathBuf,
    seal: Option<FileKey>,
) -> (Arc<Fill>, FillTask) {
    let file = Arc::new(file);
    let (live, _) = broadcast::channel(LIVE_CHUNKS);
    let (tx, rx) = watch::channel(Progress {
        written: 0,
        total_len: None,
        state: FillState::Running,
        verified: false,
        origin: None,
    });
    let fill = Arc::new(Fill {
        id,
        digest: digest.clone(),
        file: Some(Arc::clone(&file)),
        sealed: seal.clone().map(|key| {
            Arc::new(SealedFile {
                key,
                keys: shared.keys(),
                on_failure: None,
                pieces: None,
            })
        }),
        rx,
        live: Some(live.clone()),
    });
    let tx = Arc::new(tx);
    let task = FillTask {
        shared: Arc::clone(shared),
        digest: digest.clone(),
        id,
        source,
        pipeline: None,
        file,
        temp,
        tx,
        live,
        received: 0,
        total_len: None,
        resumes: 0,
        seal,
    };
    (fill, task)
}

impl Fill {
    pub(crate) fn id(&self) -> u64 {
        self.id
    }
}

/// Takes the fill out of the in-flight map even if the task panics or is dropped, so later
/// requests never join a dead fill.
struct InflightGuard {
    shared: Arc<Shared>,
    hex: String,
    id: u64,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.shared.leave_inflight(&self.hex, self.id);
    }
}

impl FillTask {
    /// The whole life of a fill. Runs detached from every client (invariant 4).
    pub(crate) async fn run(mut self) {
        let guard = InflightGuard {
            shared: Arc::clone(&self.shared),
            hex: self.digest.hex().to_owned(),
            id: self.id,
        };
        self.pipeline = Some(Pipeline::start(
            Arc::clone(&self.file),
            self.digest.hasher(),
            Arc::clone(&self.tx),
            self.seal.clone().map(Sealer::new),
        ));
        let result = match self.fetch().await {
            Ok(()) => match self.verify().await {
                Ok(()) => {
                    // Waiting clients get their last bytes now; the fsync and rename of a
                    // large blob take a while and need not hold them up.
                    let origin = self.source.origin();
                    self.tx.send_modify(|p| {
                        p.state = FillState::Verified;
                        p.verified = true;
                        p.origin = Some(origin);
                    });
                    self.commit().await
                }
                Err(f) => Err(f),
            },
            Err(f) => Err(f),
        };
        match result {
            Ok(len) => {
                self.shared.counters.committed.inc();
                // The index already holds the blob: leaving the map now opens no window in
                // which a request finds neither (invariant 4).
                self.tx.send_modify(|p| p.state = FillState::Done);
                drop(guard);
                tracing::debug!(digest = %self.digest, len, "fill committed");
                self.hand_to_l2();
            }
            Err(failure) => {
                if let Err(e) = tokio::fs::remove_file(&self.temp).await {
                    tracing::warn!(path = %self.temp.display(), error = %e, "could not delete temp file");
                }
                self.shared.counters.failed(&failure);
                if let (FillFailure::Invalid(_), Some(l2)) = (&failure, self.shared.l2.get()) {
                    if self.source.origin() == Origin::L2 {
                        l2.forget(&self.digest);
                    }
                }
                // Leave the map first so the next request starts a fresh fill.
                drop(guard);
                tracing::warn!(digest = %self.digest, error = %failure, "fill failed");
                self.tx
                    .send_modify(|p| p.state = FillState::Failed(failure));
            }
        }
    }

    /// A blob this fill fetched from the upstream goes to the object store too, read back from
    /// the verified file just committed.
    fn hand_to_l2(&self) {
        let Some(l2) = self.shared.l2.get() else {
            return;
        };
        if self.source.origin() != Origin::Upstream {
            return;
        }
        let store = super::BlobStore {
            shared: Arc::clone(&self.shared),
        };
        if let Some(blob) = store.open_committed(&self.digest) {
            l2.upload(&self.digest, blob);
        }
    }

    /// Copies the source into the temp file, resuming on breaks, until it is complete.
    async fn fetch(&mut self) -> Result<(), FillFailure> {
        let mut body = match self.source.open(0).await {
            Ok(body) => self.accept(body)?,
            Err(e) => self.resume(setback(e)?).await?,
        };
        loop {
            match self.copy(&mut body).await {
                Ok(()) => return Ok(()),
                Err(Stop::Fatal(f)) => return Err(f),
                Err(Stop::Broken(why)) => body = self.resume(Setback::Broken(why)).await?,
            }
        }
    }

    /// Opens the source again at `received` after a backoff (or the source's `Retry-After`, up
    /// to `max_retry_after`), for as long as attempts remain.
    async fn resume(
        &mut self,
        mut last: Setback,
    ) -> Result<BoxStream<'static, ChunkResult>, FillFailure> {
        let policy = &self.shared.policy;
        loop {
            let Some(mut delay) = policy.backoff.get(self.resumes).copied() else {
                return Err(last.into_failure(self.resumes));
            };
            let why = match &last {
                Setback::Broken(why) => why.clone(),
                Setback::Busy { error, retry_after } => {
                    if let Some(wait) = *retry_after {
                        if wait > policy.max_retry_after {
                            // Holding clients that long helps nobody: they get the answer
                            // (429 and its Retry-After) and can come back, and until then
                            // the store answers the same without asking again.
                            self.shared.remember_busy(self.digest.hex(), error, wait);
                            return Err(last.into_failure(self.resumes));
                        }
                        delay = delay.max(wait);
                    }
                    error.to_string()
                }
            };
            self.resumes += 1;
            tracing::info!(digest = %self.digest, offset = self.received, error = %why, ?delay, "resuming fill");
            tokio::time::sleep(delay).await;
            match self.source.open(self.received).await {
                Ok(body) => return self.accept(body),
                Err(e) => last = setback(e)?,
            }
        }
    }

    /// Takes a freshly opened body: checks that its total length agrees with what we know.
    fn accept(&mut self, body: SourceBody) -> Result<BoxStream<'static, ChunkResult>, FillFailure> {
        match (self.total_len, body.total_len) {
            (Some(known), Some(now)) if known != now => {
                return Err(FillFailure::Invalid(format!(
                    "source changed the blob length from {known} to {now} on resume"
                )));
            }
            (None, Some(now)) => {
                // A blob that cannot fit is refused before any reader commits to this fill:
                // the gateway then serves it without caching.
                if let Some(free) = self.shared.layout.available() {
                    if free < now.saturating_add(SPACE_RESERVE) {
                        return Err(FillFailure::Storage(format!(
                            "the cache disk has {free} bytes free; this blob needs {now}"
                        )));
                    }
                }
                self.total_len = Some(now);
                self.tx.send_modify(|p| p.total_len = Some(now));
            }
            _ => {}
        }
        Ok(body.chunks)
    }

    /// Hands chunks to the pipeline until the body ends or breaks.
    async fn copy(&mut self, body: &mut BoxStream<'static, ChunkResult>) -> Result<(), Stop> {
        let stall = Duration::from_millis(self.shared.stall_timeout_ms.load(Ordering::Relaxed));
        loop {
            match tokio::time::timeout(stall, body.next()).await {
                Err(_) => return Err(Stop::Broken(format!("no data for {stall:?}"))),
                Ok(Some(Ok(chunk))) => self.push(chunk).await.map_err(Stop::Fatal)?,
                Ok(Some(Err(why))) => return Err(Stop::Broken(why)),
                Ok(None) => return self.check_end(),
            }
        }
    }

    fn check_end(&self) -> Result<(), Stop> {
        match self.total_len {
            Some(total) if self.received < total => Err(Stop::Broken(format!(
                "body ended at byte {} of {total}",
                self.received
            ))),
            _ => Ok(()),
        }
    }

    /// Queues one chunk for the writer and the hasher; waits while they are behind.
    async fn push(&mut self, chunk: Bytes) -> Result<(), FillFailure> {
        if chunk.is_empty() {
            return Ok(());
        }
        let end = self.received + chunk.len() as u64;
        if let Some(total) = self.total_len.filter(|t| end > *t) {
            return Err(FillFailure::Invalid(format!(
                "source sent more than the announced {total} bytes"
            )));
        }
        let pipeline = self.pipeline.as_ref().ok_or_else(lost_pipeline)?;
        if pipeline.push(chunk.clone()).await.is_err() {
            // A stage ended early: the writer's error says why.
            let pipeline = self.pipeline.take().ok_or_else(lost_pipeline)?;
            pipeline.finish().await?;
            return Err(FillFailure::Storage("the writer stopped early".into()));
        }
        if chunk.len() <= LIVE_CHUNK_MAX {
            // No reader at the front is no error.
            let _ = self.live.send((self.received, chunk));
        }
        self.received = end;
        Ok(())
    }

    /// Invariant 3: the length and SHA-256 match the digest.
    async fn verify(&mut self) -> Result<(), FillFailure> {
        let pipeline = self.pipeline.take().ok_or_else(lost_pipeline)?;
        let (len, hasher) = pipeline.finish().await?;
        if len != self.received {
            return Err(FillFailure::Storage(format!(
                "wrote {len} of {} bytes received",
                self.received
            )));
        }
        if let Some(total) = self.total_len.filter(|t| *t != len) {
            return Err(FillFailure::Invalid(format!("got {len} of {total} bytes")));
        }
        let actual = hasher.finish();
        if actual != self.digest {
            return Err(FillFailure::Invalid(format!(
                "content hashes to {actual}, not {}",
                self.digest
            )));
        }
        Ok(())
    }

    /// A verified file made durable: fsync, rename, fsync the dir, and only then index the
    /// blob. Returns the length.
    async fn commit(&mut self) -> Result<u64, FillFailure> {
        let len = self.received;
        let layout = self.shared.layout.clone();
        let file = Arc::clone(&self.file);
        let temp = self.temp.clone();
        let hex = self.digest.hex().to_owned();
        tokio::task::spawn_blocking(move || layout.commit(&file, &temp, &hex))
            .await
            .map_err(|e| FillFailure::Storage(format!("commit task: {e}")))?
            .map_err(|e| FillFailure::Storage(format!("committing blob: {e}")))?;
        // The index weighs what the disk holds: a sealed file is longer than its blob.
        let on_disk = match self.seal {
            Some(_) => crate::crypt::Geometry::new(len).file_len(),
            None => len,
        };
        self.shared
            .index
            .commit(self.digest.hex().to_owned(), on_disk);
        Ok(len)
    }
}

type ChunkResult = Result<Bytes, String>;

fn lost_pipeline() -> FillFailure {
    FillFailure::Storage("fill pipeline already finished".into())
}

/// Bytes a fill holds between the network read and its stage; the read waits beyond
/// that (back-pressure: memory per fill stays bounded whatever the blob size, invariant 7).
const IN_FLIGHT_BYTES: usize = 4 << 20;

/// A received chunk on its way to the stage; its share of [`IN_FLIGHT_BYTES`] is given back
/// when it is dropped, once written and hashed.
struct Piece {
    bytes: Bytes,
    _budget: OwnedSemaphorePermit,
}

/// The blocking stage every received chunk goes through, on a thread of its own so the network
/// read never waits for the disk: it appends each chunk to the temp file, publishes `written`
/// (readers follow it) and feeds the SHA-256. Only the blob's end waits for the hash.
struct Pipeline {
    budget: Arc<Semaphore>,
    to_stage: mpsc::UnboundedSender<Piece>,
    stage: JoinHandle<io::Result<(u64, DigestHasher)>>,
}

impl Pipeline {
    fn start(
        file: Arc<File>,
        mut hasher: DigestHasher,
        progress: Arc<watch::Sender<Progress>>,
        sealer: Option<Sealer>,
    ) -> Pipeline {
        let (to_stage, mut pieces) = mpsc::unbounded_channel::<Piece>();
        let stage = tokio::task::spawn_blocking(move || {
            // SHA-256 runs on a thread of its own, beside the write (and the sealing): on a
            // cold pull the stage's thread was the one busy core, hashing and writing in turn.
            let (to_hasher, from_stage) = std::sync::mpsc::channel::<Piece>();
            let hashing = std::thread::Builder::new()
                .name("pullgate-hash".into())
                .spawn(move || {
                    for piece in from_stage {
                        hasher.update(&piece.bytes);
                    }
                    hasher
                })?;
            let mut out = Output::new(&file, sealer)?;
            while let Some(piece) = pieces.blocking_recv() {
                let mut next = Some(piece);
                // Publish once per burst (up to WRITE_BATCH), not per network read.
                let mut burst = 0;
                while let Some(piece) = next.take() {
                    out.write(&piece.bytes)?;
                    burst += piece.bytes.len();
                    to_hasher
                        .send(piece)
                        .map_err(|_| io::Error::other("the hasher thread stopped"))?;
                    if burst < WRITE_BATCH {
                        next = pieces.try_recv().ok();
                    }
                }
                let published = out.readable();
                progress.send_modify(|p| p.written = published);
            }
            let total = out.finish()?;
            drop(to_hasher);
            let hasher = hashing
                .join()
                .map_err(|_| io::Error::other("the hasher thread panicked"))?;
            progress.send_modify(|p| p.written = total);
            Ok((total, hasher))
        });
        Pipeline {
            budget: Arc::new(Semaphore::new(IN_FLIGHT_BYTES)),
            to_stage,
            stage,
        }
    }

    /// `Err` when the stage is gone (a write failed).
    async fn push(&self, chunk: Bytes) -> Result<(), ()> {
        let want = u32::try_from(chunk.len().min(IN_FLIGHT_BYTES)).unwrap_or(u32::MAX);
        let budget = Arc::clone(&self.budget)
            .acquire_many_owned(want)
            .await
            .map_err(drop)?;
        let piece = Piece {
            bytes: chunk,
            _budget: budget,
        };
        self.to_stage.send(piece).map_err(drop)
    }

    /// Closes the queue and waits for the stage: the bytes written and the hasher.
    async fn finish(self) -> Result<(u64, DigestHasher), FillFailure> {
        drop(self.to_stage);
        self.stage
            .await
            .map_err(|e| FillFailure::Storage(format!("write task: {e}")))?
            .map_err(|e| FillFailure::Storage(format!("writing temp file: {e}")))
    }
}

/// `io::Error` from a fill failure, for callers that speak `std::io`.
impl From<FillFailure> for io::Error {
    fn from(f: FillFailure) -> io::Error {
        io::Error::other(f)
    }
}

/// Where the stage's bytes go: straight into the temp file, or through a [`Sealer`] whose
/// sealed chunks are written from its own buffer as each completes (gathering them into larger
/// writes cost one more copy of every byte: the encrypted cold pull took 12 % longer).
struct Output<'a> {
    file: &'a File,
    /// Plaintext bytes taken.
    taken: u64,
    sealer: Option<Sealer>,
}

impl<'a> Output<'a> {
    fn new(file: &'a File, sealer: Option<Sealer>) -> io::Result<Output<'a>> {
        if let Some(sealer) = &sealer {
            file.write_all_at(sealer.header_bytes(), 0)?;
        }
        Ok(Output {
            file,
            taken: 0,
            sealer,
        })
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        let Some(sealer) = self.sealer.as_mut() else {
            self.file.write_all_at(bytes, self.taken)?;
            self.taken += bytes.len() as u64;
            return Ok(());
        };
        self.taken += bytes.len() as u64;
        let file = self.file;
        sealer.push(bytes, |offset, sealed| file.write_all_at(sealed, offset))
    }

    /// The plaintext bytes readers may read now (for a sealed file: those of whole sealed
    /// chunks).
    fn readable(&self) -> u64 {
        match &self.sealer {
            Some(sealer) => sealer.sealed_plaintext(),
            None => self.taken,
        }
    }

    /// Seals the last chunk and writes it: returns the plaintext length.
    fn finish(mut self) -> io::Result<u64> {
        if let Some(sealer) = self.sealer.take() {
            let file = self.file;
            sealer.finish(|offset, sealed| file.write_all_at(sealed, offset))?;
        }
        Ok(self.taken)
    }
}
