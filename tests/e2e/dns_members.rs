//! Members from DNS (`cluster.peers_dns`), as a Kubernetes headless Service gives them: each
//! replica resolves `pullgate-peers` through its own `/etc/hosts` (a mount namespace per
//! replica, so the machine's file is never touched), which the test edits to add and remove
//! members. A member joining or leaving costs no upstream fetch of a blob the object store has.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::time::Duration;

use crate::api::push_blob_upstream;
use crate::cluster::{free_port_on, metric, noise, start_with, Replica};
use crate::harness::registry;
use crate::l2::{pull, upstream_fetches};
use crate::support::{can_connect, digest_of, wait_until, S3Server, Upstream, UpstreamOptions};

const NAME: &str = "pullgate-peers";

/// One port free on 127.0.0.11-14 alike: the members of a DNS name share the port.
fn common_port() -> u16 {
    loop {
        let port = free_port_on([127, 0, 0, 11]).port();
        let free_everywhere =
            (12..=14).all(|n| TcpListener::bind((Ipv4Addr::new(127, 0, 0, n), port)).is_ok());
        if free_everywhere {
            return port;
        }
    }
}

/// The machine's hosts file plus `NAME` on each of `members` (the last octet), rewritten in
/// place: the replicas see the file through a bind mount of this inode.
fn write_hosts(path: &Path, members: &[u8]) {
    let mut text = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    for n in members {
        text.push_str(&format!("\n127.0.0.{n} {NAME}"));
    }
    text.push('\n');
    std::fs::write(path, text).expect("hosts file");
}

fn replica(dir: &Path, n: u8, port: u16, shared: &str) -> Replica {
    let addr = SocketAddr::from(([127, 0, 0, n], port));
    let admin = free_port_on([127, 0, 0, n]);
    let r = start_with(
        dir,
        n as usize,
        addr,
        admin,
        shared,
        Some(&dir.join("hosts")),
        &[("POD_IP", format!("127.0.0.{n}"))],
    );
    wait_until(Duration::from_secs(20), "replica listening", || {
        can_connect(r.addr)
    })
    .expect("replica starts");
    r
}

fn wait_members(replicas: &[&Replica], n: u64) {
    wait_until(
        Duration::from_secs(20),
        "every replica sees the members",
        || {
            replicas
                .iter()
                .all(|r| metric(r.admin, "pullgate_cluster_members") == n)
        },
    )
    .unwrap_or_else(|_| panic!("every replica sees {n} members"));
}

#[test]
fn members_from_dns_join_and_leave_without_fetching_again() {
    let up = Upstream::start(UpstreamOptions::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let s3 = S3Server::start(dir.path());
    let blobs: Vec<Vec<u8>> = (0..8).map(|i| noise(MIB, 70 + 2 * i)).collect();
    let digests: Vec<String> = blobs.iter().map(|b| digest_of(b)).collect();
    for (b, d) in blobs.iter().zip(&digests) {
        push_blob_upstream(&up, "team/app", d, b);
    }
    std::fs::write(
        dir.path().join("cluster.key"),
        format!("{}\n", "k".repeat(48)),
    )
    .expect("key");
    let port = common_port();
    let shared = format!(
        "{}\n{}\n[cluster]\npeers_dns = \"{NAME}:{port}\"\npeers_dns_refresh = \"200ms\"\n\
         advertise_env = \"POD_IP\"\nkey_file = \"{}\"\n",
        registry("hub", &up, "default = true"),
        s3.l2_table(dir.path()),
        dir.path().join("cluster.key").display(),
    );
    let hosts = dir.path().join("hosts");
    write_hosts(&hosts, &[11, 12, 13]);
    let mut replicas: Vec<Replica> = (11..=13)
        .map(|n| replica(dir.path(), n, port, &shared))
        .collect();
    wait_members(&replicas.iter().collect::<Vec<_>>(), 3);

    // Every blob pulled through the first replica: the ones the others own are forwarded to
    // them (the members came from DNS), and each is fetched from the upstream once.
    for d in &digests {
        assert_eq!(pull(&replicas[0], "team/app", d), (200, Some(d.clone())));
        assert_eq!(upstream_fetches(&up, d), 1, "{d}");
    }
    assert!(
        metric(replicas[0].admin, "pullgate_cluster_forwards_sent_total") > 0,
        "some of 8 digests are owned by the other two members"
    );
    wait_until(
        Duration::from_secs(20),
        "every blob in the object store",
        || {
            replicas
                .iter()
                .map(|r| metric(r.admin, "pullgate_l2_uploads_total"))
                .sum::<u64>()
                == digests.len() as u64
        },
    )
    .expect("uploads");

    // A fourth replica joins (the Deployment scaled up): after the next refresh every member
    // counts four, and the newcomer reads what it lacks from the object store (which every
    // replica asks before an owner), so none is fetched from the upstream again.
    write_hosts(&hosts, &[11, 12, 13, 14]);
    replicas.push(replica(dir.path(), 14, port, &shared));
    wait_members(&replicas.iter().collect::<Vec<_>>(), 4);
    assert!(metric(replicas[0].admin, "pullgate_cluster_member_changes_total") >= 1);
    for r in &replicas {
        for d in &digests {
            assert_eq!(pull(r, "team/app", d), (200, Some(d.clone())));
        }
    }
    assert_eq!(
        metric(replicas[3].admin, "pullgate_l2_hits_total"),
        digests.len() as u64,
        "the newcomer starts warm: every blob from the object store, none from the upstream"
    );

    // One leaves (scaled down): gone from DNS and stopped; the rest still serve everything.
    write_hosts(&hosts, &[11, 13, 14]);
    replicas.remove(1).child.kill();
    wait_members(&replicas.iter().collect::<Vec<_>>(), 3);
    for r in &replicas {
        for d in &digests {
            assert_eq!(pull(r, "team/app", d), (200, Some(d.clone())));
        }
    }
    for d in &digests {
        assert_eq!(upstream_fetches(&up, d), 1, "{d}: fetched once in all");
    }
    assert_eq!(
        replicas
            .iter()
            .map(|r| metric(r.admin, "pullgate_cluster_forwards_failed_over_total"))
            .sum::<u64>(),
        0,
        "no forward went to the member that left"
    );
    for r in &mut replicas {
        r.child.kill();
    }
}

const MIB: usize = 1024 * 1024;
