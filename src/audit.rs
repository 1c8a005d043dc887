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
use std::net::IpAddr;
use std::time::SystemTime;

use serde::{Serialize, Serializer};

use crate::access_log::{json_str, push_ip, timestamp_millis};

use crate::config::AuditSink;
use crate::lines::{self, FlushOnDrop, LineWriter};

/// One audited request.
#[derive(Debug, Serialize)]
pub struct AuditRecord<'a> {
    /// Written as RFC 3339 in UTC with milliseconds.
    #[serde(serialize_with = "rfc3339_millis")]
    pub time: SystemTime,
    pub request_id: &'a str,
    /// The client address policy used (behind trusted proxies: the forwarded one).
    pub client: Option<IpAddr>,
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

/// The time of a key operation's line (the same text as a request's `time`).
pub fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn rfc3339_millis<S: Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*time))
}

impl AuditRecord<'_> {
    /// The record as serde_json writes it (a test holds the two to the same bytes), by hand:
    /// serde's per-field machinery was a third of the line's cost on a warm HEAD.
    fn write_json(&self, out: &mut String) {
        out.push_str("{\"time\":\"");
        timestamp_millis(out, self.time);
        out.push_str("\",\"request_id\":");
        json_str(out, self.request_id);
        out.push_str(",\"client\":");
        match self.client {
            Some(ip) => {
                out.push('"');
                push_ip(out, ip);
                out.push('"');
            }
            None => out.push_str("null"),
        }
        let text = |out: &mut String, name: &str, value: Option<&str>| {
            out.push_str(",\"");
            out.push_str(name);
            out.push_str("\":");
            match value {
                Some(v) => json_str(out, v),
                None => out.push_str("null"),
            }
        };
        text(out, "zone", self.zone);
        text(out, "identity", self.identity);
        text(out, "registry", self.registry);
        text(out, "repository", self.repository);
        text(out, "reference", self.reference);
        text(out, "action", Some(self.action));
        text(out, "decision", Some(self.decision));
        text(out, "reason", self.reason);
        text(out, "message", self.message);
        out.push_str(",\"status\":");
        crate::access_log::push_u64(out, self.status.into());
        out.push_str(",\"bytes\":");
        crate::access_log::push_u64(out, self.bytes);
        text(out, "cache", Some(self.cache));
        text(out, "credential", self.credential);
        if self.filled_by.is_some() {
            text(out, "filled_by", self.filled_by);
        }
        if self.served_by.is_some() {
            text(out, "served_by", self.served_by);
        }
        out.push('}');
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
        thread_local! {
            /// Reused for every request line this thread writes.
            static LINE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
        }
        LINE.with(|line| {
            let mut line = line.borrow_mut();
            line.clear();
            record.write_json(&mut line);
            line.push('\n');
            self.write_line(line.as_bytes());
            if line.capacity() > 64 * 1024 {
                *line = String::new();
            }
        });
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
            self.write_line(&line);
            if line.capacity() > 64 * 1024 {
                *line = Vec::new();
            }
        });
    }

    /// One call per line: lines are never split or interleaved.
    fn write_line(&self, line: &[u8]) {
        if let Err(e) = self.out.clone().write_all(line) {
            tracing::warn!(error = %e, "cannot write the audit log");
        }
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
                time: SystemTime::now(),
                request_id: "0123456789abcdef",
                client: Some("127.0.0.2".parse().unwrap()),
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

    #[test]
    fn hand_written_json_is_serde_json_byte_for_byte() {
        let base = AuditRecord {
            time: SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_796_000_123_456),
            request_id: "0123456789abcdef",
            client: None,
            zone: None,
            identity: None,
            registry: None,
            repository: None,
            reference: None,
            action: "pull",
            decision: "none",
            reason: None,
            message: None,
            status: 404,
            bytes: 0,
            cache: "none",
            credential: None,
            filled_by: None,
            served_by: None,
        };
        let records = [
            AuditRecord { ..base },
            AuditRecord {
                client: Some("fd00::1:2".parse().unwrap()),
                zone: Some("vpc \"a\""),
                identity: Some("ci\\bot"),
                registry: Some("hub"),
                repository: Some("team/app"),
                reference: Some("sha256:ab"),
                reason: Some("repository"),
                message: Some("line\nbreak\ttab\u{1}\u{7f} é ✓"),
                status: 403,
                bytes: u64::MAX,
                filled_by: Some("10.0.0.2:8443"),
                ..base
            },
            AuditRecord {
                client: Some("127.0.0.2".parse().unwrap()),
                served_by: Some("self"),
                ..base
            },
        ];
        for record in &records {
            let mut mine = String::new();
            record.write_json(&mut mine);
            assert_eq!(mine, serde_json::to_string(record).unwrap());
        }
    }
}
