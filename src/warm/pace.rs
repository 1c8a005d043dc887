//! The warm bandwidth cap (`cache.warm_bandwidth`): one byte budget per process that the warm
//! engine and the fills warm requests start both draw from.
//!
//! Owns: the [`Bucket`], the [`Pace`] handle the gateway and the engine share across reloads,
//! and the paced byte stream a warm fill reads its upstream through.
//! Must never: pace a fill a client started (only fills a warm request started are paced), or
//! hold a lock across an await.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{BoxStream, StreamExt};

/// Bytes the bandwidth cap lets through at once after an idle spell.
const BURST: Duration = Duration::from_millis(100);

/// The cap in force, shared by the gateway (which paces the fills warm requests start) and the
/// warm engine (which sets it on every reconcile). One per process, carried across reloads.
#[derive(Clone, Default)]
pub struct Pace(Arc<Mutex<Option<Arc<Bucket>>>>);

impl Pace {
    /// Brings the cap to `rate` bytes a second (`None`: no cap). An unchanged rate keeps the
    /// bucket, and with it the debt of the bytes already let through.
    pub fn set(&self, rate: Option<u64>) {
        let mut current = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if current.as_ref().map(|b| b.rate) != rate.map(|r| r.max(1)) {
            *current = rate.map(|r| Arc::new(Bucket::new(r)));
        }
    }

    /// The bucket in force, if there is a cap.
    pub fn bucket(&self) -> Option<Arc<Bucket>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Bytes are let through at `rate` per second, with a burst of [`BURST`]'s worth after an idle
/// spell.
pub struct Bucket {
    rate: u64,
    /// When the bytes taken so far will have gone through at `rate`.
    next: Mutex<Option<Instant>>,
}

impl Bucket {
    pub fn new(rate: u64) -> Bucket {
        Bucket {
            rate: rate.max(1),
            next: Mutex::new(None),
        }
    }

    /// Takes `bytes` at `now`; how long to wait before using them.
    pub fn take(&self, bytes: u64, now: Instant) -> Duration {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        // Idle time earns at most BURST of credit.
        let floor = now.checked_sub(BURST).unwrap_or(now);
        let start = next.map_or(floor, |t| t.max(floor));
        let done = start + Duration::from_secs_f64(bytes as f64 / self.rate as f64);
        *next = Some(done);
        done.saturating_duration_since(now)
    }

    /// Waits until `bytes` may be used.
    pub async fn pay(&self, bytes: u64) {
        let wait = self.take(bytes, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// `chunks`, each handed on only once the bucket lets its bytes through: the reader of the
/// stream (a fill) reads, hashes and writes at the cap, and the upstream connection's flow
/// control holds the rest back.
pub fn paced(
    chunks: BoxStream<'static, Result<Bytes, String>>,
    bucket: Arc<Bucket>,
) -> BoxStream<'static, Result<Bytes, String>> {
    chunks
        .then(move |chunk| {
            let bucket = Arc::clone(&bucket);
            async move {
                if let Ok(bytes) = &chunk {
                    bucket.pay(bytes.len() as u64).await;
                }
                chunk
            }
        })
        .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    #[test]
    fn the_bucket_lets_a_burst_through_then_holds_to_the_rate() {
        let b = Bucket::new(1_000_000);
        let t0 = Instant::now() + Duration::from_secs(10);
        // 100 ms of burst: 100 kB now costs nothing.
        assert_eq!(b.take(100_000, t0), Duration::ZERO);
        // The next 500 kB take half a second.
        let wait = b.take(500_000, t0);
        assert!(
            wait >= Duration::from_millis(490) && wait <= Duration::from_millis(510),
            "{wait:?}"
        );
        // After a long idle spell the debt is forgotten, but the burst does not grow.
        let later = t0 + Duration::from_secs(60);
        assert_eq!(b.take(100_000, later), Duration::ZERO);
        assert!(b.take(200_000, later) >= Duration::from_millis(190));
    }

    #[tokio::test]
    async fn a_paced_stream_yields_the_burst_then_waits_and_charges_the_shared_bucket() {
        // 1000 B/s: a burst of 100 bytes. Two 40-byte chunks fit in it; the third (10 kB) is
        // ten seconds of budget, so the stream holds it back instead of yielding it.
        let bucket = Arc::new(Bucket::new(1000));
        let chunks = vec![
            Ok(Bytes::from(vec![0u8; 40])),
            Ok(Bytes::from(vec![0u8; 40])),
            Ok(Bytes::from(vec![0u8; 10_000])),
        ];
        let mut stream = paced(
            futures_util::stream::iter(chunks).boxed(),
            Arc::clone(&bucket),
        );
        let mut yielded = 0;
        while let Some(Some(chunk)) = stream.next().now_or_never() {
            yielded += chunk.unwrap().len();
        }
        assert_eq!(yielded, 80, "only the burst's bytes come through at once");
        // The same bucket now owes the held-back bytes: anyone else drawing from it (the warm
        // engine, another warm fill) waits for them too.
        let owed = bucket.take(0, Instant::now());
        assert!(owed >= Duration::from_secs(9), "{owed:?}");
    }

    #[test]
    fn an_unchanged_rate_keeps_the_bucket_and_its_debt() {
        let pace = Pace::default();
        assert!(pace.bucket().is_none());
        pace.set(Some(1000));
        let first = pace.bucket().unwrap();
        pace.set(Some(1000));
        assert!(Arc::ptr_eq(&first, &pace.bucket().unwrap()));
        pace.set(Some(2000));
        assert!(!Arc::ptr_eq(&first, &pace.bucket().unwrap()));
        pace.set(None);
        assert!(pace.bucket().is_none());
    }
}
