//! The audit log (`server.audit_log`): one JSON line per registry request saying who asked for
//! what from where, what policy decided and why, and how it ended.
//!
//! Owns: the record's fields and the sink (stdout, or a file opened for appending at start and
//! on every reload). Must never: hold a secret. Every field is a name from the config (registry,
//! zone, identity, credential), an address, or a grammar-checked OCI name; the credential is
//! named, never shown.
//!
//! Lines are written in batches by a thread of their own (`lines.rs`), so a request never
//! waits on the disk or a slow journal while the bounded buffer has room; when it is full the
//! request waits, so an audit line is never lost under load. Lines still waiting are written
//! when the sink is dropped (a reload's old sink, or the end of `serve`); a crash or SIGKILL
//! loses the lines of the last 20 ms.

use std::fs::OpenOptions;
use std::io::Write;
use std::time::SystemTime;

use serde::Serialize;

use crate::config::AuditSink;
use crate::lines::{self, FlushOnDrop, LineWriter};

/// One audited request.
#[derive(Debug, Serialize)]
pub struct AuditRecord<'a> {
    /// RFC 3339, UTC.
    pub time: String,
    pub request_id: &'a str,
    /// The client address policy used (behind trusted proxies: the forwarded one).
    pub client: Option<String>,
    pub zone: Option<&'a str>,
    pub identity: Option<&'a str>,
    pub registry: Option<&'a str>,
    pub repository: Option<&'a str>,
    /// Tag or digest, for manifests and blobs.
    pub reference: Option<&'a str>,
    /// `pull` or `push`.
    pub action: &'a str,
    /// `allow`, `deny`, or `none` (refused before policy, e.g. an unknown registry).
    pub decision: &'a str,
    /// The denial's reason label and message.
    pub reason: Option<&'a str>,
    pub message: Option<&'a str>,
    pub status: u16,
    pub bytes: u64,
    pub cache: &'a str,
    /// The name of the upstream credential used (`registry.<name>.credentials`), never its value.
    pub credential: Option<&'a str>,
    /// For a blob fill: the cluster member that fetched it from the upstream (`advertise`;
    /// `self` outside a cluster), or `l2` when the object store had it; for a manifest, `l2`
    /// when it came from the object store, and for a tag the member that owns it when that
    /// member answered. Absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filled_by: Option<&'a str>,
    /// In a cluster: this replica (`cluster.advertise`), the one the client reached. Absent
    /// outside a cluster.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub served_by: Option<&'a str>,
}

impl AuditRecord<'_> {
    pub fn now() -> String {
        humantime::format_rfc3339_millis(SystemTime::now()).to_string()
    }
}

/// Where audit lines go.
pub struct Audit {
    out: LineWriter,
    /// Writes what is waiting and stops the thread when the sink is dropped.
    _flush_on_drop: FlushOnDrop,
}

impl Audit {
    pub fn open(sink: &AuditSink) -> Result<Audit, String> {
        let out: Box<dyn Write + Send> = match sink {
            AuditSink::Stdout => Box::new(std::io::stdout()),
            AuditSink::File(path) => Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| {
                        format!("server.audit_log: cannot open {}: {e}", path.display())
                    })?,
            ),
        };
        Audit::to_writer(out)
    }

    /// An audit log writing to `out` from its own thread.
    pub fn to_writer(out: Box<dyn Write + Send>) -> Result<Audit, String> {
        let (out, flush_on_drop) = lines::spawn("pullgate-audit", out)
            .map_err(|e| format!("server.audit_log: cannot start its writer thread: {e}"))?;
        Ok(Audit {
            out,
            _flush_on_drop: flush_on_drop,
        })
    }

    pub fn record(&self, record: &AuditRecord<'_>) {
        self.record_value(record);
    }

    /// Any other audited event (key operations) as one JSON line of its own shape.
    pub fn record_value<T: Serialize>(&self, record: &T) {
        thread_local! {
            /// Reused for every line this thread writes (one request's line at a time).
            static LINE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        LINE.with(|line| {
            let mut line = line.borrow_mut();
            line.clear();
            if serde_json::to_writer(&mut *line, record).is_err() {
                return;
            }
            line.push(b'\n');
            // One call per line: lines are never split or interleaved.
            if let Err(e) = self.out.clone().write_all(&line) {
                tracing::warn!(error = %e, "cannot write the audit log");
            }
            if line.capacity() > 64 * 1024 {
                *line = Vec::new();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn one_json_line_per_record() {
        let buf = Shared::default();
        let audit = Audit::to_writer(Box::new(buf.clone())).unwrap();
        for decision in ["allow", "deny"] {
            audit.record(&AuditRecord {
                time: AuditRecord::now(),
                request_id: "0123456789abcdef",
                client: Some("127.0.0.2".into()),
                zone: Some("vpc"),
                identity: None,
                registry: Some("hub"),
                repository: Some("team/app"),
                reference: Some("v1"),
                action: "pull",
                decision,
                reason: None,
                message: None,
                status: 200,
                bytes: 10,
                cache: "hit",
                filled_by: None,
                served_by: None,
                credential: Some("registry.hub.credentials"),
            });
        }
        drop(audit); // writes what is queued
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["decision"], "deny");
        assert_eq!(lines[0]["zone"], "vpc");
        assert!(lines[0]["time"].as_str().unwrap().ends_with('Z'));
    }
}
