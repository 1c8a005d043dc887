//! Hostile and malformed requests get OCI errors before anything touches the upstream.

use crate::harness::{get, raw_get, registry, request, Gateway};
use crate::support::{Upstream, UpstreamOptions};

#[test]
fn invalid_names_digests_and_paths_get_oci_errors() {
    let up = Upstream::start(UpstreamOptions::default());
    let gw = Gateway::start(&registry("hub", &up, "default = true"));
    let before = up.requests().len();
    let long = format!("/v2/{}/manifests/latest", "a".repeat(300));
    let cases: &[(&str, u16, &str)] = &[
        ("/v2/../etc/passwd/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/team/%2e%2e/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/team/..%2f/blobs/sha256:00", 400, "NAME_INVALID"),
        ("/v2/Team/App/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/team\\app/manifests/latest", 400, "NAME_INVALID"),
        (&long, 400, "NAME_INVALID"),
        ("/v2/team/app/blobs/sha256:xyz", 400, "DIGEST_INVALID"),
        (
            "/v2/team/app/blobs/md5:d41d8cd98f00b204e9800998ecf8427e",
            400,
            "DIGEST_INVALID",
        ),
        ("/v2/team/app/manifests/-bad-tag", 400, "TAG_INVALID"),
        ("/etc/passwd", 404, "UNSUPPORTED"),
    ];
    for (path, status, code) in cases {
        let answer = raw_get(&gw.addr(), path);
        assert_eq!(
            answer.status,
            *status,
            "{path}: {}",
            String::from_utf8_lossy(&answer.body)
        );
        assert_eq!(answer.oci_code().as_deref(), Some(*code), "{path}");
        assert_eq!(
            answer.header("content-type").as_deref(),
            Some("application/json")
        );
    }
    assert_eq!(
        up.requests().len(),
        before,
        "no invalid request reached the upstream"
    );
}

#[test]
fn base_endpoint_answers_locally_and_push_is_refused() {
    let up = Upstream::start(UpstreamOptions::default());
    let gw = Gateway::start(&registry("hub", &up, "default = true"));
    let before = up.requests().len();
    let base = get(&gw.url("/v2/"));
    assert_eq!(base.status, 200);
    assert_eq!(
        base.header("docker-distribution-api-version").as_deref(),
        Some("registry/2.0")
    );
    let push = request("POST", &gw.url("/v2/team/app/blobs/uploads/"), &[]);
    assert_eq!(push.status, 403);
    assert_eq!(push.oci_code().as_deref(), Some("DENIED"));
    let put = request("PUT", &gw.url("/v2/team/app/manifests/v1"), &[]);
    assert_eq!(put.oci_code().as_deref(), Some("DENIED"));
    let catalog = get(&gw.url("/v2/_catalog"));
    assert_eq!(catalog.oci_code().as_deref(), Some("UNSUPPORTED"));
    assert_eq!(up.requests().len(), before, "nothing reached the upstream");
}

#[test]
fn oversized_request_heads_are_refused_and_the_gateway_keeps_serving() {
    use std::io::{Read, Write};
    let up = Upstream::start(UpstreamOptions::default());
    let gw = Gateway::start(&registry("hub", &up, "default = true"));
    let before = up.requests().len();
    for size in [64 * 1024, 2 * 1024 * 1024] {
        let mut stream = std::net::TcpStream::connect(gw.addr()).expect("connect");
        let head = format!(
            "GET /v2/team/app/manifests/v1 HTTP/1.1\r\nHost: x\r\nX-Filler: {}\r\nConnection: close\r\n\r\n",
            "a".repeat(size)
        );
        // The gateway may close before reading it all: a write error is an answer too.
        let _ = stream.write_all(head.as_bytes());
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        let text = String::from_utf8_lossy(&answer);
        assert!(
            answer.is_empty() || text.starts_with("HTTP/1.1 4"),
            "{size} byte header accepted: {}",
            &text[..text.len().min(200)]
        );
        if size < 1024 * 1024 {
            assert!(
                text.starts_with("HTTP/1.1 431"),
                "{}",
                &text[..text.len().min(200)]
            );
        }
    }
    assert_eq!(up.requests().len(), before, "nothing reached the upstream");
    assert_eq!(get(&gw.url("/v2/")).status, 200, "still serving");
}

/// Slow-loris clients (a request head one byte per second) and silent connections do not keep
/// the gateway from serving others. Pingora closes a connection whose request head gets no byte
/// for 60 s (a timeout per read, not per head), longer than this test runs: it checks only that
/// everyone else is served, promptly, all along.
#[test]
fn slow_loris_and_silent_connections_do_not_starve_other_clients() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let closed = crate::support::free_port();
    let gw = Gateway::start(&format!(
        "[[registry]]\nname = \"hub\"\nupstream = \"http://127.0.0.1:{closed}\"\ndefault = true\n"
    ));
    let addr = gw.addr();
    // 64 connections that send nothing, held open for the whole test.
    let silent: Vec<std::net::TcpStream> = (0..64)
        .map(|_| std::net::TcpStream::connect(&addr).expect("connect"))
        .collect();
    // 8 slow-loris clients: one byte of a request head per second, for 4 seconds.
    let head = b"GET /v2/ HTTP/1.1\r\nHost: loris\r\n\r\n";
    let lorises: Vec<_> = (0..8)
        .map(|_| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut stream = std::net::TcpStream::connect(&addr).expect("connect");
                for byte in &head[..4] {
                    stream.write_all(&[*byte]).expect("a slow byte");
                    std::thread::sleep(Duration::from_secs(1));
                }
                stream
            })
        })
        .collect();
    // Meanwhile, others are served, each quickly.
    let started = Instant::now();
    let mut served = 0;
    let mut slowest = Duration::ZERO;
    while started.elapsed() < Duration::from_secs(4) {
        let t = Instant::now();
        let answer = raw_get(&addr, "/v2/");
        slowest = slowest.max(t.elapsed());
        assert_eq!(answer.status, 200, "served while lorises hold connections");
        served += 1;
        // A steady client, not a flood: the machine is shared.
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        slowest < Duration::from_secs(1),
        "slowest answer {slowest:?}"
    );
    // Every loris connection is still open (its head half sent), and the silent ones too: the
    // gateway answered the others without waiting for them.
    let half_sent: Vec<std::net::TcpStream> = lorises
        .into_iter()
        .map(|t| t.join().expect("loris"))
        .collect();
    for stream in half_sent.iter().chain(&silent) {
        stream
            .set_read_timeout(Some(Duration::from_millis(20)))
            .expect("timeout");
        let mut buf = [0u8; 1];
        match (&*stream).read(&mut buf) {
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            other => panic!("a half-sent connection was answered or closed early: {other:?}"),
        }
    }
    println!("slow loris: {served} requests served in 4 s beside 8 lorises and 64 silent connections, slowest {slowest:?}");
    drop(silent);
    assert_eq!(get(&gw.url("/v2/")).status, 200);
}
