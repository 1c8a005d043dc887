//! `[cluster]` tests: members, `advertise` among them, the key file, DNS refused for now.

use std::net::SocketAddr;

use super::*;

#[test]
fn a_cluster_and_its_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("cluster.key"),
        "0123456789abcdef0123456789abcdef01\n",
    )
    .expect("write");
    std::fs::write(dir.path().join("short.key"), "hunter2-but-short\n").expect("write");
    let with = |cluster: &str| load_str(&format!("{HUB}[cluster]\n{cluster}\n"), dir.path());
    let good = "peers = [\"127.0.0.11:5000\", \"127.0.0.12:5000\"]\nadvertise = \
                \"127.0.0.12:5000\"\nkey_file = \"cluster.key\"";
    let config = with(good).expect("ok");
    let cluster = config.cluster.clone().expect("cluster");
    let addr = |s: &str| s.parse::<SocketAddr>().expect("addr");
    assert_eq!(
        cluster.peers,
        vec![addr("127.0.0.11:5000"), addr("127.0.0.12:5000")]
    );
    assert_eq!(cluster.advertise, addr("127.0.0.12:5000"));
    assert_eq!(cluster.key_file, dir.path().join("cluster.key"));
    assert!(load_str(HUB, dir.path()).expect("ok").cluster.is_none());
    // Not a listener of this config: a warning (a port mapping may make it right).
    assert!(config
        .warnings
        .iter()
        .any(|w| w.key == "cluster.advertise" && w.message.contains("not one of server.listen")));
    let listening = load_str(
        &format!("[server]\nlisten = [\"0.0.0.0:5000\"]\n{HUB}[cluster]\n{good}\n"),
        dir.path(),
    )
    .expect("ok");
    assert!(listening
        .warnings
        .iter()
        .all(|w| w.key != "cluster.advertise"));

    let cases = [
        (
            good.replace("127.0.0.12:5000\"\n", "127.0.0.13:5000\"\n"),
            "cluster.advertise",
            "not one of cluster.peers",
        ),
        (
            good.replace("advertise", "# advertise"),
            "cluster.advertise",
            "missing",
        ),
        (
            good.replace("\"127.0.0.11:5000\"", "\"peer-a:5000\""),
            "cluster.peers[0]",
            "invalid address",
        ),
        (
            good.replace("cluster.key", "short.key"),
            "cluster.key_file",
            "at least 32 bytes",
        ),
        (
            good.replace("cluster.key", "absent.key"),
            "cluster.key_file",
            "",
        ),
        (
            good.replace("key_file", "# key_file"),
            "cluster.key_file",
            "missing",
        ),
        (
            format!("{good}\npeers_dns = \"peers.svc:5000\""),
            "cluster.peers_dns",
            "not built yet",
        ),
        (
            "advertise = \"127.0.0.11:5000\"\nkey_file = \"cluster.key\"".to_owned(),
            "cluster.peers",
            "missing",
        ),
    ];
    for (text, key, fragment) in cases {
        let errs = with(&text).expect_err(&text);
        assert_error(&errs, key, fragment);
        assert!(!errs.to_string().contains("hunter2"), "{errs}");
    }
}
