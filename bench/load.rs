//! Small-request load (W3): many keep-alive connections sending one request in a loop, for a
//! fixed time; requests/s and latency percentiles.
//!
//! GETs run under `wrk`. wrk 4.1 (Debian 12) waits for a body after a `HEAD` answer that carries
//! `Content-Length`, so it never completes a HEAD against a registry; HEADs run under
//! [`hammer`], a loop of the same shape (N connections, 2 threads, no pipelining) written here.

use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What one load run measured.
#[derive(Debug, Clone, Default)]
pub struct LoadResult {
    pub requests: u64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Connection errors, timeouts and non-2xx answers.
    pub errors: u64,
    pub tool: &'static str,
}

/// `conns` keep-alive connections send `method path` back to back for `duration`.
pub fn hammer(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    conns: usize,
    duration: Duration,
) -> LoadResult {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: pullgate-bench\r\n"
    );
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += "\r\n";
    let is_head = method.eq_ignore_ascii_case("HEAD");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bench-load")
        .enable_all()
        .build()
        .expect("load runtime");
    let req = std::sync::Arc::new(req.into_bytes());
    let (lat, errors, elapsed) = rt.block_on(async move {
        let start = Instant::now();
        let deadline = start + duration;
        let tasks: Vec<_> = (0..conns)
            .map(|_| {
                let req = req.clone();
                tokio::spawn(async move { one_connection(port, &req, is_head, deadline).await })
            })
            .collect();
        let mut lat: Vec<u32> = Vec::new();
        let mut errors = 0;
        for t in tasks {
            if let Ok((l, e)) = t.await {
                lat.extend(l);
                errors += e;
            }
        }
        (lat, errors, start.elapsed())
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    summarize(lat, errors, elapsed)
}

fn summarize(mut lat: Vec<u32>, errors: u64, elapsed: Duration) -> LoadResult {
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i] as f64 / 1000.0
    };
    LoadResult {
        requests: lat.len() as u64,
        rps: lat.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        errors,
        tool: "bench hammer",
    }
}

/// One connection's loop; returns latencies (µs) of good answers and the error count.
async fn one_connection(
    port: u16,
    req: &[u8],
    is_head: bool,
    deadline: Instant,
) -> (Vec<u32>, u64) {
    let mut lat = Vec::with_capacity(16 * 1024);
    let mut errors = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    'conn: while Instant::now() < deadline {
        let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
            errors += 1;
            continue;
        };
        s.set_nodelay(true).ok();
        let mut have = 0usize;
        loop {
            let t0 = Instant::now();
            if t0 >= deadline {
                break 'conn;
            }
            if s.write_all(req).await.is_err() {
                errors += 1;
                continue 'conn;
            }
            // Head.
            let head_end = loop {
                if let Some(i) = crate::client::find(&buf[..have], b"\r\n\r\n") {
                    break i + 4;
                }
                if have == buf.len() {
                    errors += 1;
                    continue 'conn;
                }
                match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf[have..])).await
                {
                    Ok(Ok(n)) if n > 0 => have += n,
                    _ => {
                        errors += 1;
                        continue 'conn;
                    }
                }
            };
            let Ok((status, headers)) = crate::client::parse_head(&buf[..head_end]) else {
                errors += 1;
                continue 'conn;
            };
            let header = |n: &str| {
                headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(n))
                    .map(|(_, v)| v.clone())
            };
            let body_len: u64 = if is_head {
                0
            } else {
                match header("content-length").and_then(|v| v.parse().ok()) {
                    Some(n) => n,
                    None => {
                        errors += 1;
                        continue 'conn;
                    }
                }
            };
            // Body: what is already buffered, then the rest from the socket.
            let in_buf = (have - head_end).min(body_len as usize);
            let mut left = body_len - in_buf as u64;
            let consumed = head_end + in_buf;
            buf.copy_within(consumed..have, 0);
            have -= consumed;
            while left > 0 {
                match s.read(&mut buf[have..]).await {
                    Ok(n) if n > 0 => {
                        let take = (n as u64).min(left) as usize;
                        left -= take as u64;
                        // Keep bytes past the body (none are expected without pipelining).
                        buf.copy_within(have + take..have + n, have);
                        have += n - take;
                    }
                    _ => {
                        errors += 1;
                        continue 'conn;
                    }
                }
            }
            if (200..300).contains(&status) {
                lat.push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
            } else {
                errors += 1;
            }
            if header("connection").is_some_and(|c| c.eq_ignore_ascii_case("close")) {
                continue 'conn;
            }
        }
    }
    (lat, errors)
}

/// `wrk -t2 -cCONNS -dSECS --latency` against `url` with extra headers.
pub fn wrk(
    url: &str,
    headers: &[(&str, &str)],
    conns: usize,
    duration: Duration,
) -> Result<LoadResult, String> {
    let secs = duration.as_secs().max(1);
    let mut cmd = Command::new("wrk");
    cmd.args([
        "-t2",
        &format!("-c{conns}"),
        &format!("-d{secs}s"),
        "--latency",
        "--timeout",
        "10s",
    ]);
    for (k, v) in headers {
        cmd.arg("-H").arg(format!("{k}: {v}"));
    }
    cmd.arg(url);
    let out = cmd.output().map_err(|e| format!("wrk: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "wrk failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    parse_wrk(&text)
}

/// Reads requests/s, percentiles and errors from wrk's report.
pub fn parse_wrk(text: &str) -> Result<LoadResult, String> {
    let mut r = LoadResult {
        tool: "wrk",
        p50_ms: f64::NAN,
        p99_ms: f64::NAN,
        ..LoadResult::default()
    };
    for line in text.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("Requests/sec:"), Some(v)) => r.rps = v.parse().unwrap_or(f64::NAN),
            (Some("50%"), Some(v)) => r.p50_ms = wrk_time_ms(v),
            (Some("99%"), Some(v)) => r.p99_ms = wrk_time_ms(v),
            (Some(n), Some("requests")) => r.requests = n.parse().unwrap_or(0),
            _ => {}
        }
        if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.errors += rest.trim().parse::<u64>().unwrap_or(0);
        }
        if let Some(rest) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            r.errors += rest
                .split(',')
                .filter_map(|p| p.split_whitespace().nth(1))
                .filter_map(|n| n.parse::<u64>().ok())
                .sum::<u64>();
        }
    }
    if r.rps.is_nan() || r.rps == 0.0 {
        return Err(format!("wrk reported no requests:\n{text}"));
    }
    Ok(r)
}

/// "1.23ms" / "850.00us" / "2.00s" -> milliseconds.
fn wrk_time_ms(v: &str) -> f64 {
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('m') {
        (n, 60_000.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else {
        (v, 1.0)
    };
    num.parse::<f64>().map(|n| n * scale).unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_a_wrk_report() {
        let text = "Running 1s test @ http://127.0.0.1:1/x\n  2 threads and 64 connections\n  Latency Distribution\n     50%  412.00us\n     75%    1.10ms\n     99%    3.50ms\n  12345 requests in 1.00s, 1.00MB read\n  Non-2xx or 3xx responses: 3\nRequests/sec:  12300.50\n";
        let r = super::parse_wrk(text).unwrap();
        assert_eq!(r.requests, 12345);
        assert!((r.p50_ms - 0.412).abs() < 1e-9);
        assert!((r.p99_ms - 3.5).abs() < 1e-9);
        assert_eq!(r.errors, 3);
        assert!((r.rps - 12300.5).abs() < 1e-9);
    }
}
