//! Log and audit lines written in batches by a thread of their own.
//!
//! Owns: the buffer lines wait in and the thread that writes it out. Used by the access log
//! (stderr) and the audit log (`audit.rs`). Depends on nothing else in the crate.
//! Must never: drop or reorder a line, split one line across two writes, or let a request wait
//! on the disk while the buffer has room.
//!
//! Why not a channel with one message per line (tracing-appender): under load every line woke
//! the writer thread, and the profile of W3 (bench/README.md) showed those two threads' wake-ups
//! and one `write` per line as about a tenth of the process's time. Here a request appends its
//! line to a shared buffer under a short lock; the thread wakes every [`FLUSH_EVERY`] (or as
//! soon as [`WAKE_AT`] bytes are waiting) and writes everything in one go. The buffer is
//! bounded: past [`MAX_WAITING`] bytes a request waits for the thread, so under a disk that
//! cannot keep up lines slow requests down rather than being lost.
//!
//! What a crash can lose: the lines of the last [`FLUSH_EVERY`] (and whatever the kernel had
//! not written). A clean stop (dropping the [`FlushOnDrop`] guard) writes every line.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long a line may wait before the thread writes it.
pub const FLUSH_EVERY: Duration = Duration::from_millis(20);
/// Waiting bytes that wake the thread before [`FLUSH_EVERY`].
pub const WAKE_AT: usize = 256 * 1024;
/// Waiting bytes past which a request waits for the thread (the bound).
pub const MAX_WAITING: usize = 8 * 1024 * 1024;

#[derive(Default)]
struct Waiting {
    bytes: Vec<u8>,
    stopping: bool,
}

#[derive(Default)]
struct Shared {
    waiting: Mutex<Waiting>,
    /// Signals the thread (bytes to write, or stop).
    wake: Condvar,
    /// Signals waiting requests (the buffer was taken).
    drained: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Waiting> {
        // A poisoned lock only means a writer panicked mid-append; the bytes are still lines.
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Appends lines; cheap to clone, one per writer. Each `write` call must hold whole lines
/// (tracing's formatter and the audit log both write one line per call).
#[derive(Clone)]
pub struct LineWriter {
    shared: Arc<Shared>,
}

/// Stops the thread and writes what is left when dropped.
pub struct FlushOnDrop {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// A writer whose lines `out` receives from a thread named `name`.
pub fn spawn(
    name: &str,
    out: impl Write + Send + 'static,
) -> io::Result<(LineWriter, FlushOnDrop)> {
    let shared = Arc::new(Shared::default());
    let thread = std::thread::Builder::new().name(name.to_owned()).spawn({
        let shared = Arc::clone(&shared);
        move || write_out(&shared, out)
    })?;
    Ok((
        LineWriter {
            shared: Arc::clone(&shared),
        },
        FlushOnDrop {
            shared,
            thread: Some(thread),
        },
    ))
}

fn write_out(shared: &Shared, mut out: impl Write) {
    let mut spare = Vec::new();
    loop {
        let stopping = {
            let mut waiting = shared.lock();
            if !waiting.stopping && waiting.bytes.len() < WAKE_AT {
                // Let lines gather: one write per interval, not one per line.
                waiting = shared
                    .wake
                    .wait_timeout(waiting, FLUSH_EVERY)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            std::mem::swap(&mut waiting.bytes, &mut spare);
            shared.drained.notify_all();
            waiting.stopping
        };
        if !spare.is_empty() {
            // Nowhere to report a failing log sink but the sink itself: the lines are dropped,
            // the requests go on.
            let _ = out.write_all(&spare).and_then(|()| out.flush());
            spare.clear();
            // A burst (a disk that stalled) may have grown the buffer to the bound; keep only
            // what a normal interval needs, so the burst's memory is given back.
            spare.shrink_to(2 * WAKE_AT);
        }
        if stopping && shared.lock().bytes.is_empty() {
            return;
        }
    }
}

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut waiting = self.shared.lock();
        while waiting.bytes.len() >= MAX_WAITING && !waiting.stopping {
            self.shared.wake.notify_one();
            waiting = self
                .shared
                .drained
                .wait(waiting)
                .unwrap_or_else(|e| e.into_inner());
        }
        waiting.bytes.extend_from_slice(buf);
        if waiting.bytes.len() >= WAKE_AT {
            self.shared.wake.notify_one();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for FlushOnDrop {
    fn drop(&mut self) {
        self.shared.lock().stopping = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_arrives_in_order_and_in_few_writes() {
        let out = Recorder::default();
        let (writer, guard) = spawn("test-lines", out.clone()).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let mut w = writer.clone();
                std::thread::spawn(move || {
                    for i in 0..5_000 {
                        w.write_all(format!("{t} {i}\n").as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);
        let writes = out.0.lock().unwrap();
        let all: Vec<u8> = writes.concat();
        let text = String::from_utf8(all).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 20_000, "no line lost");
        for t in 0..4 {
            let mine: Vec<usize> = lines
                .iter()
                .filter_map(|l| l.strip_prefix(&format!("{t} ")))
                .map(|i| i.parse().unwrap())
                .collect();
            assert_eq!(mine, (0..5_000).collect::<Vec<_>>(), "writer {t} in order");
        }
        assert!(
            writes.iter().all(|w| w.ends_with(b"\n")),
            "writes end on a line boundary"
        );
        assert!(
            writes.len() < 2_000,
            "batched: {} writes for 20000 lines",
            writes.len()
        );
    }

    #[test]
    fn a_line_is_written_without_a_flush_or_more_lines() {
        let out = Recorder::default();
        let (mut writer, _guard) = spawn("test-lines", out.clone()).unwrap();
        writer.write_all(b"alone\n").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while out.0.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "line never written");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(out.0.lock().unwrap().concat(), b"alone\n");
    }
}
