//! `[cluster]` tests: members (a list or a DNS name), `advertise` among them, the key file.

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
            "not both",
        ),
        (
            "peers_dns = \"peers.svc\"\nadvertise = \"10.0.0.1:5000\"\nkey_file = \"cluster.key\""
                .to_owned(),
            "cluster.peers_dns",
            "name:port",
        ),
        (
            "peers_dns = \"peers.svc:5000\"\npeers_dns_refresh = \"10ms\"\nadvertise = \"10.0.0.1:5000\"\nkey_file = \"cluster.key\""
                .to_owned(),
            "cluster.peers_dns_refresh",
            "between 100ms and 5m",
        ),
        (
            "peers_dns = \"peers.svc:5000\"\nadvertise_env = \"PULLGATE_NO_SUCH_VARIABLE\"\nkey_file = \"cluster.key\""
                .to_owned(),
            "cluster.advertise_env",
            "is not set",
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

#[test]
fn members_from_dns_with_the_advertised_address_from_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("cluster.key"), "k".repeat(48)).expect("key");
    // A variable every test environment has, holding no address, and one that cannot hold one:
    // the variable's value is checked, so use a literal address through `advertise` here and
    // the environment form's errors above.
    let text = format!(
        "{HUB}[cluster]\npeers_dns = \"pullgate-peers.pullgate.svc.cluster.local:5000\"\n\
         peers_dns_refresh = \"2s\"\nadvertise = \"10.1.2.3:5000\"\nkey_file = \"cluster.key\"\n"
    );
    let cluster = load_str(&text, dir.path())
        .unwrap_or_else(|e| panic!("{e}"))
        .cluster
        .expect("cluster");
    let dns = cluster.peers_dns.expect("peers_dns");
    assert_eq!(
        (dns.name.as_str(), dns.port, dns.refresh),
        (
            "pullgate-peers.pullgate.svc.cluster.local",
            5000,
            std::time::Duration::from_secs(2)
        )
    );
    assert!(cluster.peers.is_empty());
    // With DNS the advertised address need not be listed anywhere (the answer changes).
    assert_eq!(
        cluster.advertise,
        "10.1.2.3:5000".parse::<std::net::SocketAddr>().unwrap()
    );
}
