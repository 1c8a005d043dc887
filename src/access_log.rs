//! The access line: one per request, in the same text or JSON shape `tracing`'s formatter
//! gives every other line of the log, written straight into the log's line buffer.
//!
//! Owns: the line's fields and their formatting. Depends on `lines` (the buffer) only.
//! Must never: split a line, or write one `RUST_LOG` filters out (the line is `INFO` with the
//! target `pullgate::access`).
//!
//! Why not `tracing::info!`: for a warm HEAD, formatting the access line through
//! `tracing-subscriber` (a visitor per field, `Debug` for every string, styles even with
//! colours off) cost about a fifth of the instructions the whole request took (callgrind,
//! bench/README.md). Here it is one pass into a reused buffer. When logging was not set up
//! by [`install`] (tests that log through their own subscriber), the same fields go through
//! `tracing` as one event's message. One field list ([`AccessLine::fields`]) feeds every
//! shape.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::sync::OnceLock;
use std::time::SystemTime;

use crate::lines::LineWriter;

/// The `tracing` target of access lines (what `RUST_LOG=pullgate::access=off` names).
pub const TARGET: &str = "pullgate::access";

/// Where access lines go once [`install`] ran.
struct Sink {
    writer: LineWriter,
    json: bool,
}

static SINK: OnceLock<Sink> = OnceLock::new();

/// Send access lines to `writer` in the log's format. The first call wins.
pub fn install(writer: LineWriter, json: bool) {
    let _ = SINK.set(Sink { writer, json });
}

/// One request's access line.
pub struct AccessLine<'a> {
    pub request_id: &'a str,
    pub method: &'a str,
    /// Already escaped (`ctx::loggable_path`).
    pub path: &'a str,
    pub status: u16,
    pub registry: &'a str,
    pub kind: &'a str,
    pub upstream_status: u16,
    pub cache: &'a str,
    pub stale: bool,
    pub client: Option<IpAddr>,
    pub zone: &'a str,
    pub identity: &'a str,
    pub decision: &'a str,
    pub bytes: u64,
    pub duration_ms: u64,
    pub error: &'a str,
}

impl AccessLine<'_> {
    /// Writes the line (when `INFO` for [`TARGET`] is enabled).
    pub fn log(&self) {
        if !tracing::enabled!(target: TARGET, tracing::Level::INFO) {
            return;
        }
        let Some(sink) = SINK.get() else {
            self.log_through_tracing();
            return;
        };
        thread_local! {
            static BUF: RefCell<String> = const { RefCell::new(String::new()) };
        }
        BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.clear();
            if sink.json {
                self.json(&mut buf, SystemTime::now());
            } else {
                self.text(&mut buf, SystemTime::now());
            }
            let _ = sink.writer.clone().write_all(buf.as_bytes());
            if buf.capacity() > 16 * 1024 {
                // A very long error message: do not keep its buffer for every later line.
                *buf = String::new();
            }
        });
    }

    /// The fields in their order, each with how it is written.
    fn fields(&self) -> [(&'static str, Value<'_>); 16] {
        [
            ("request_id", Value::Bare(self.request_id)),
            ("method", Value::Bare(self.method)),
            ("path", Value::Bare(self.path)),
            ("status", Value::Number(self.status.into())),
            ("registry", Value::Text(self.registry)),
            ("kind", Value::Text(self.kind)),
            (
                "upstream_status",
                Value::Number(self.upstream_status.into()),
            ),
            ("cache", Value::Text(self.cache)),
            ("stale", Value::Bool(self.stale)),
            ("client", Value::Ip(self.client)),
            ("zone", Value::Text(self.zone)),
            ("identity", Value::Text(self.identity)),
            ("decision", Value::Text(self.decision)),
            ("bytes", Value::Number(self.bytes)),
            ("duration_ms", Value::Number(self.duration_ms)),
            ("error", Value::Text(self.error)),
        ]
    }

    /// Through a subscriber installed by someone else (the e2e harness captures lines per
    /// test): the text fields as the event's message.
    fn log_through_tracing(&self) {
        let mut fields = String::new();
        self.text_fields(&mut fields);
        tracing::info!(target: "pullgate::access", "{fields}");
    }

    /// `tracing`'s text shape: `<time>  INFO pullgate::access: request k=v ...`.
    fn text(&self, out: &mut String, now: SystemTime) {
        timestamp(out, now);
        out.push_str("  INFO pullgate::access: ");
        self.text_fields(out);
        out.push('\n');
    }

    /// `request k=v ...`: strings quoted and escaped as `Debug` does (what `tracing` writes
    /// for a `&str` field), the request id, method, path and client bare.
    fn text_fields(&self, out: &mut String) {
        out.push_str("request");
        for (name, value) in self.fields() {
            out.push(' ');
            out.push_str(name);
            out.push('=');
            match value {
                Value::Bare(v) => out.push_str(v),
                Value::Text(v) => debug_str(out, v),
                Value::Number(n) => push_u64(out, n),
                Value::Bool(b) => out.push_str(if b { "true" } else { "false" }),
                Value::Ip(ip) => {
                    if let Some(ip) = ip {
                        push_ip(out, ip);
                    }
                }
            }
        }
    }

    /// `tracing`'s JSON shape with flattened fields.
    fn json(&self, out: &mut String, now: SystemTime) {
        out.push_str("{\"timestamp\":\"");
        timestamp(out, now);
        out.push_str("\",\"level\":\"INFO\",\"message\":\"request\"");
        for (name, value) in self.fields() {
            out.push_str(",\"");
            out.push_str(name);
            out.push_str("\":");
            match value {
                Value::Bare(v) | Value::Text(v) => json_str(out, v),
                Value::Number(n) => push_u64(out, n),
                Value::Bool(b) => out.push_str(if b { "true" } else { "false" }),
                Value::Ip(ip) => {
                    // An address needs no JSON escaping.
                    out.push('"');
                    if let Some(ip) = ip {
                        push_ip(out, ip);
                    }
                    out.push('"');
                }
            }
        }
        out.push_str(",\"target\":\"pullgate::access\"}\n");
    }
}

/// How a field of the line is written.
enum Value<'a> {
    /// As it is (already safe: an id, a method, an escaped path).
    Bare(&'a str),
    /// Quoted and escaped.
    Text(&'a str),
    Number(u64),
    Bool(bool),
    /// An address, or nothing.
    Ip(Option<IpAddr>),
}

/// `ip` as `Display` writes it; IPv4 (nearly every client) without the formatter, which
/// costs more than the rest of the line's numbers together.
pub fn push_ip(out: &mut String, ip: IpAddr) {
    let IpAddr::V4(v4) = ip else {
        let _ = write!(out, "{ip}");
        return;
    };
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        if octet >= 100 {
            out.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            out.push(char::from(b'0' + octet / 10 % 10));
        }
        out.push(char::from(b'0' + octet % 10));
    }
}

/// `n` in decimal, without the formatter.
pub(crate) fn push_u64(out: &mut String, n: u64) {
    out.push_str(itoa::Buffer::new().format(n));
}

/// `value` quoted as `Debug` writes a `&str`; what needs no escape is copied as it is.
fn debug_str(out: &mut String, value: &str) {
    if value
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        out.push('"');
        out.push_str(value);
        out.push('"');
    } else {
        let _ = write!(out, "{value:?}");
    }
}

/// `value` as a JSON string.
pub(crate) fn json_str(out: &mut String, value: &str) {
    let plain = value
        .bytes()
        .all(|b| b >= 0x20 && b != b'"' && b != b'\\' && b != 0x7f);
    if plain {
        out.push('"');
        out.push_str(value);
        out.push('"');
    } else if let Ok(s) = serde_json::to_string(value) {
        out.push_str(&s);
    }
}

/// RFC 3339 in UTC with microseconds, as `tracing-subscriber` writes it:
/// `2026-12-04T21:38:21.782830Z`.
fn timestamp(out: &mut String, now: SystemTime) {
    let micros = rfc3339_seconds(out, now).subsec_micros();
    // Six digits with leading zeros: the digits of 1_000_000 + micros after the first.
    out.push('.');
    out.push_str(&itoa::Buffer::new().format(1_000_000 + micros)[1..]);
    out.push('Z');
}

/// RFC 3339 in UTC with milliseconds, as `humantime::format_rfc3339_millis` writes it:
/// `2026-12-04T21:38:21.782Z`.
pub(crate) fn timestamp_millis(out: &mut String, now: SystemTime) {
    let millis = rfc3339_seconds(out, now).subsec_millis();
    out.push('.');
    out.push_str(&itoa::Buffer::new().format(1_000 + millis)[1..]);
    out.push('Z');
}

/// Writes `now` up to its seconds (`2026-12-04T21:38:21`, formatted once a second per thread)
/// and returns its time since the epoch.
fn rfc3339_seconds(out: &mut String, now: SystemTime) -> std::time::Duration {
    thread_local! {
        /// The second last formatted on this thread, and its text up to the seconds.
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let since = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    SECOND.with(|second| {
        let mut second = second.borrow_mut();
        if second.0 != since.as_secs() {
            let t = time::OffsetDateTime::from(now);
            second.1.clear();
            let _ = write!(
                second.1,
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second(),
            );
            second.0 = since.as_secs();
        }
        out.push_str(&second.1);
    });
    since
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn line<'a>(error: &'a str, path: &'a str) -> AccessLine<'a> {
        AccessLine {
            request_id: "56e86dbd67a456ab",
            method: "GET",
            path,
            status: 200,
            registry: "up",
            kind: "base",
            upstream_status: 0,
            cache: "-",
            stale: false,
            client: Some("127.0.0.1".parse().unwrap()),
            zone: "",
            identity: "",
            decision: "allow",
            bytes: 2,
            duration_ms: 0,
            error,
        }
    }

    /// 2026-12-04T21:38:21.782830Z
    fn at() -> SystemTime {
        UNIX_EPOCH + Duration::from_micros(1_796_420_301_782_830)
    }

    #[test]
    fn addresses_are_written_as_display_does() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.100.255",
            "192.168.9.99",
            "::1",
            "2001:db8::5",
            "::ffff:10.0.0.1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut out = String::new();
            push_ip(&mut out, ip);
            assert_eq!(out, ip.to_string());
        }
    }

    #[test]
    fn timestamps_are_rfc3339_in_utc_with_microseconds() {
        for (micros, text) in [
            (1_796_420_301_782_830, "2026-12-04T21:38:21.782830Z"),
            (1_796_420_301_000_001, "2026-12-04T21:38:21.000001Z"),
            (1_796_420_302_500_000, "2026-12-04T21:38:22.500000Z"),
            (951_782_400_000_000, "2000-02-29T00:00:00.000000Z"),
        ] {
            let mut out = String::new();
            timestamp(&mut out, UNIX_EPOCH + Duration::from_micros(micros));
            assert_eq!(out, text);
        }
    }

    #[test]
    fn text_is_the_shape_tracing_wrote() {
        let mut out = String::new();
        line("", "/v2/").text(&mut out, at());
        assert_eq!(
            out,
            "2026-12-04T21:38:21.782830Z  INFO pullgate::access: request request_id=56e86dbd67a456ab method=GET path=/v2/ status=200 registry=\"up\" kind=\"base\" upstream_status=0 cache=\"-\" stale=false client=127.0.0.1 zone=\"\" identity=\"\" decision=\"allow\" bytes=2 duration_ms=0 error=\"\"\n"
        );
        let mut out = String::new();
        let mut l = line("UNAVAILABLE: \"up\" said\nno", "/v2/");
        l.client = None;
        l.text(&mut out, at());
        assert!(
            out.contains(" client= zone=\"\"")
                && out.ends_with(" error=\"UNAVAILABLE: \\\"up\\\" said\\nno\"\n"),
            "{out}"
        );
    }

    #[test]
    fn json_is_the_shape_tracing_wrote_and_parses() {
        let mut out = String::new();
        line("", "/v2/").json(&mut out, at());
        assert_eq!(
            out,
            "{\"timestamp\":\"2026-12-04T21:38:21.782830Z\",\"level\":\"INFO\",\"message\":\"request\",\"request_id\":\"56e86dbd67a456ab\",\"method\":\"GET\",\"path\":\"/v2/\",\"status\":200,\"registry\":\"up\",\"kind\":\"base\",\"upstream_status\":0,\"cache\":\"-\",\"stale\":false,\"client\":\"127.0.0.1\",\"zone\":\"\",\"identity\":\"\",\"decision\":\"allow\",\"bytes\":2,\"duration_ms\":0,\"error\":\"\",\"target\":\"pullgate::access\"}\n"
        );
        let mut out = String::new();
        let error = "upstream \"up\" said\n\u{7f}\\ no";
        line(error, "/v2/a\\u{1b}b/manifests/x").json(&mut out, at());
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["error"], error);
        assert_eq!(v["path"], "/v2/a\\u{1b}b/manifests/x");
        assert_eq!(v["target"], TARGET);
    }
}
