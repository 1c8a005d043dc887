//! Cluster forwarding (issue 16, first step): three pullgate processes on 127.0.0.11-13 that
//! share a cluster key fetch a blob once for all of them; a forged peer request is refused; with
//! the owner killed (between fills or in the middle of one) the others still serve, from the
//! upstream.

use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::time::Duration;

use futures_util::StreamExt;

use crate::api::push_blob_upstream;
use crate::harness::{get, registry, registry_at};
use crate::support::s3;
use crate::support::{
    block_on, can_connect, digest_of, http_client, sha256_hex, wait_until, ChildGuard, Fault,
    Relay, Upstream, UpstreamOptions,
};

const BIN: &str = env!("CARGO_BIN_EXE_pullgate");
const MIB: usize = 1024 * 1024;

/// A free port on `ip` (a loopback alias).
pub(super) fn free_port_on(ip: [u8; 4]) -> SocketAddr {
    TcpListener::bind((std::net::Ipv4Addr::from(ip), 0))
        .and_then(|l| l.local_addr())
        .expect("bind a loopback alias")
}

/// Bytes that do not compress and differ per `seed` (xorshift).
pub(super) fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub(super) struct Replica {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub child: ChildGuard,
}

pub(super) fn start(
    dir: &std::path::Path,
    i: usize,
    addr: SocketAddr,
    admin: SocketAddr,
    shared: &str,
) -> Replica {
    start_with(dir, i, addr, admin, shared, None, &[])
}

/// [`start`], with `/etc/hosts` replaced by `hosts` for this replica alone (a mount namespace
/// of its own, `unshare -m`; the replica is the process the PID names) and extra variables.
pub(super) fn start_with(
    dir: &std::path::Path,
    i: usize,
    addr: SocketAddr,
    admin: SocketAddr,
    shared: &str,
    hosts: Option<&std::path::Path>,
    env: &[(&str, String)],
) -> Replica {
    let config = dir.join(format!("r{i}.toml"));
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = [\"{addr}\"]\nadmin_listen = \"{admin}\"\naudit_log = \"{}\"\n\
             [cache]\ndir = \"{}\"\n{shared}",
            dir.join(format!("audit{i}.log")).display(),
            dir.join(format!("cache{i}")).display(),
        ),
    )
    .expect("config");
    let mut command = match hosts {
        None => Command::new(BIN),
        Some(hosts) => {
            let mut c = Command::new("unshare");
            c.args([
                "-m",
                "sh",
                "-c",
                "mount --bind \"$0\" /etc/hosts && exec \"$@\"",
            ])
            .arg(hosts)
            .arg(BIN);
            c
        }
    };
    let child = command
        .args(["serve", "-c"])
        .arg(&config)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RUST_LOG", "warn")
        .env(s3::ACCESS_KEY_ENV, s3::ACCESS_KEY)
        .spawn()
        .expect("spawn pullgate");
    Replica {
        addr,
        admin,
        child: ChildGuard::new(child),
    }
}

/// Three replicas on 127.0.0.11-13 with `registry`, sharing a cluster key; returns once all
/// three accept connections.
pub(super) fn start_cluster(
    dir: &std::path::Path,
    registry: &str,
) -> (Vec<SocketAddr>, Vec<SocketAddr>, Vec<Replica>) {
    std::fs::write(dir.join("cluster.key"), format!("{}\n", "k".repeat(48))).expect("key");
    let addrs: Vec<SocketAddr> = (11..=13).map(|n| free_port_on([127, 0, 0, n])).collect();
    let admins: Vec<SocketAddr> = (11..=13).map(|n| free_port_on([127, 0, 0, n])).collect();
    let peers = addrs
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let replicas: Vec<Replica> = (0..3)
        .map(|i| {
            let shared = format!(
                "{registry}\n[cluster]\npeers = [{peers}]\nadvertise = \"{}\"\nkey_file = \"{}\"\n",
                addrs[i],
                dir.join("cluster.key").display()
            );
            start(dir, i, addrs[i], admins[i], &shared)
        })
        .collect();
    for r in &replicas {
        wait_until(Duration::from_secs(20), "replica listening", || {
            can_connect(r.addr)
        })
        .expect("replica starts");
    }
    (addrs, admins, replicas)
}

/// Upstream GETs this replica sent that got a 2xx (`pullgate_upstream_requests_total`).
fn upstream_gets_ok(admin: SocketAddr) -> u64 {
    let text = get(&format!("http://{admin}/metrics")).body;
    String::from_utf8_lossy(&text)
        .lines()
        .filter(|l| {
            l.starts_with("pullgate_upstream_requests_total{")
                && l.contains("method=\"GET\"")
                && l.contains("status=\"2xx\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

pub(super) fn metric(admin: SocketAddr, name: &str) -> u64 {
    let text = get(&format!("http://{admin}/metrics")).body;
    String::from_utf8_lossy(&text)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

#[test]
fn three_replicas_fetch_a_blob_once_and_survive_the_owner() {
    let up = Upstream::start(UpstreamOptions::default());
    let body = noise(50 * MIB, 16);
    let digest = digest_of(&body);
    push_blob_upstream(&up, "team/big", &digest, &body);

    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("cluster.key"),
        format!("{}\n", "k".repeat(48)),
    )
    .expect("key");
    let (addrs, admins, mut replicas) =
        start_cluster(dir.path(), &registry("hub", &up, "default = true"));
    // 30 clients, round robin over the replicas, all at once.
    let urls: Vec<String> = (0..30)
        .map(|i| format!("http://{}/v2/team/big/blobs/{digest}", addrs[i % 3]))
        .collect();
    let client = http_client(None);
    let results: Vec<(u16, String, usize)> = block_on(async move {
        let pulls = urls.into_iter().map(|url| {
            let client = client.clone();
            async move {
                let answer = client.get(&url).send().await.expect("GET");
                let status = answer.status().as_u16();
                let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
                let mut len = 0;
                let mut chunks = answer.bytes_stream();
                while let Some(chunk) = chunks.next().await {
                    let chunk = chunk.expect("body");
                    len += chunk.len();
                    sha2::Digest::update(&mut hasher, &chunk);
                }
                (status, hex::encode(sha2::Digest::finalize(hasher)), len)
            }
        });
        futures_util::future::join_all(pulls).await
    });
    for (i, (status, hex, len)) in results.iter().enumerate() {
        assert_eq!(*status, 200, "client {i}");
        assert_eq!(
            (format!("sha256:{hex}"), *len),
            (digest.clone(), 50 * MIB),
            "client {i}"
        );
    }
    let blob_path = format!("/blobs/{digest}");
    let fetched = up
        .requests()
        .iter()
        .filter(|r| {
            r.method == "GET" && r.uri.contains(&blob_path) && (200..300).contains(&r.status)
        })
        .count();
    assert_eq!(fetched, 1, "one upstream fetch for the cluster");
    let owner = pullgate::cluster::owner_among(addrs.iter().copied(), &digest).expect("owner");
    let o = addrs
        .iter()
        .position(|a| *a == owner)
        .expect("owner is a replica");
    assert!(metric(admins[o], "pullgate_cluster_forwards_served_total") >= 1);
    let sent: u64 = (0..3)
        .filter(|i| *i != o)
        .map(|i| metric(admins[i], "pullgate_cluster_forwards_sent_total"))
        .sum();
    assert!(sent >= 2, "both non-owners forwarded: {sent}");
    assert_eq!(metric(admins[o], "pullgate_cluster_forwards_sent_total"), 0);
    // The audit line of a client on a non-owner names it as the replica that served and the
    // owner as the one that filled.
    let non_owner = (o + 1) % 3;
    let audit = dir.path().join(format!("audit{non_owner}.log"));
    let served_here = addrs[non_owner].to_string();
    let filled_by = |line: &str| -> Option<String> {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        let ours = v["reference"] == digest.as_str() && v["served_by"] == served_here.as_str();
        ours.then(|| v["filled_by"].as_str().map(str::to_owned))?
    };
    wait_until(Duration::from_secs(5), "10 audit lines", || {
        let text = std::fs::read_to_string(&audit).unwrap_or_default();
        text.lines().filter_map(filled_by).count() == 10
    })
    .expect("audit lines");
    let text = std::fs::read_to_string(&audit).expect("audit");
    assert!(
        text.lines()
            .filter_map(filled_by)
            .all(|f| f == owner.to_string()),
        "{text}"
    );

    // Forged and unsigned peer requests: refused with an OCI error, nothing fetched.
    let other = (o + 1) % 3;
    let peer_url = |query: &str| {
        format!(
            "http://{}/_pullgate/peer/blob?registry=hub&repository=team/big&digest={digest}{query}",
            addrs[other]
        )
    };
    for query in [
        "",
        "&expires=99999999999&signature=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ] {
        let answer = get(&peer_url(query));
        assert_eq!(answer.status, 403, "{query}");
        assert_eq!(answer.oci_code().as_deref(), Some("DENIED"), "{query}");
    }

    // The owner killed: the survivors' health probes find out within seconds (before any
    // client's fill has to), they still serve what they hold, and a cold blob the dead owner
    // would own comes from the upstream (once) through a survivor, with no failed forward.
    replicas[o].child.kill();
    let survivors: Vec<SocketAddr> = (0..3).filter(|i| *i != o).map(|i| admins[i]).collect();
    wait_until(
        Duration::from_secs(10),
        "the survivors skip the dead owner",
        || {
            survivors
                .iter()
                .all(|a| metric(*a, "pullgate_cluster_members_down") == 1)
        },
    )
    .expect("health probes");
    let cold = (1..)
        .map(|seed| noise(MIB, 1000 + seed))
        .find(|b| {
            pullgate::cluster::owner_among(addrs.iter().copied(), &digest_of(b)) == Some(owner)
        })
        .expect("a blob the dead owner owns");
    let cold_digest = digest_of(&cold);
    push_blob_upstream(&up, "team/big", &cold_digest, &cold);
    let survivor = &replicas[other];
    let answer = get(&format!(
        "http://{}/v2/team/big/blobs/{cold_digest}",
        survivor.addr
    ));
    assert_eq!(answer.status, 200);
    assert_eq!(format!("sha256:{}", sha256_hex(&answer.body)), cold_digest);
    assert_eq!(
        metric(
            survivor.admin,
            "pullgate_cluster_forwards_failed_over_total"
        ),
        0,
        "the probes took the dead owner out of the hashing first"
    );
    let cold_path = format!("/blobs/{cold_digest}");
    assert_eq!(up.count_requests("GET", &cold_path), 1);
    let again = get(&format!(
        "http://{}/v2/team/big/blobs/{digest}",
        survivor.addr
    ));
    assert_eq!(again.status, 200);
    assert_eq!(digest_of(&again.body), digest);
    for r in &mut replicas {
        r.child.kill();
    }
}

#[test]
fn an_owner_killed_mid_fill_leaves_a_complete_blob_or_an_aborted_body() {
    let up = Upstream::start(UpstreamOptions::default());
    let body = noise(16 * MIB, 77);
    let digest = digest_of(&body);
    push_blob_upstream(&up, "team/big", &digest, &body);
    // A slow upstream (about 1.3 s for the blob) so the kill lands inside the owner's fill.
    let relay = Relay::start(up.port());
    relay.set(Fault::Slow { pause_ms: 5 });
    let dir = tempfile::tempdir().expect("tempdir");
    let hub = registry_at("hub", &up, &relay.url(), "default = true");
    let (addrs, admins, mut replicas) = start_cluster(dir.path(), &hub);
    let owner = pullgate::cluster::owner_among(addrs.iter().copied(), &digest).expect("owner");
    let o = addrs
        .iter()
        .position(|a| *a == owner)
        .expect("owner is a replica");
    // A client on each of the other two replicas, both following the owner's fill.
    let others: Vec<usize> = (0..3).filter(|i| *i != o).collect();
    let clients: Vec<_> = others
        .iter()
        .map(|i| {
            let url = format!("http://{}/v2/team/big/blobs/{digest}", addrs[*i]);
            std::thread::spawn(move || get(&url))
        })
        .collect();
    let owner_tmp = dir.path().join(format!("cache{o}/tmp"));
    wait_until(Duration::from_secs(20), "the owner's fill to start", || {
        std::fs::read_dir(&owner_tmp).is_ok_and(|mut d| d.next().is_some())
    })
    .expect("owner fill started");
    replicas[o].child.kill();
    for client in clients {
        let answer = client.join().expect("client thread");
        // Never a short body that looks complete: the whole verified blob or an error.
        if answer.status == 200 && answer.body.len() == body.len() {
            assert_eq!(digest_of(&answer.body), digest);
        } else {
            assert!(answer.body.len() < body.len(), "status {}", answer.status);
        }
    }
    // Both resumed from the same next owner: a second pull on each survivor gets the whole
    // blob, and the cluster fetched it at most once more.
    for i in &others {
        let again = get(&format!("http://{}/v2/team/big/blobs/{digest}", addrs[*i]));
        assert_eq!(again.status, 200);
        assert_eq!(digest_of(&again.body), digest);
        assert!(metric(admins[*i], "pullgate_cluster_forwards_failed_over_total") >= 1);
    }
    let blob_path = format!("/blobs/{digest}");
    let gets = up
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.uri.contains(&blob_path) && r.status != 401)
        .count();
    // The owner's (cut by the kill) and the next owner's; 401s are the token flow.
    assert!(gets <= 2, "{gets} upstream GETs: {:?}", up.requests());
    // Counted where they were sent: of the two survivors, only the next owner went to the
    // upstream (the other resumed from it).
    let survivor_gets: u64 = others.iter().map(|i| upstream_gets_ok(admins[*i])).sum();
    assert_eq!(survivor_gets, 1, "one extra upstream fetch for the cluster");
    for r in &mut replicas {
        r.child.kill();
    }
}

#[test]
fn replicas_that_disagree_about_the_members_cost_at_most_a_duplicate_fetch() {
    let up = Upstream::start(UpstreamOptions::default());
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("cluster.key"),
        format!("{}\n", "k".repeat(48)),
    )
    .expect("key");
    let addrs: Vec<SocketAddr> = (11..=13).map(|n| free_port_on([127, 0, 0, n])).collect();
    // Replicas 1 and 2 list all three; replica 0 does not know replica 1 yet (a list it has
    // not reloaded). The blob: owned by 1, whom replica 0 does not know. Forwards only ever go
    // to a member with a higher score for the digest, so views that differ cannot make two
    // members wait on each other; they can only make a member fill on its own.
    let body = (1..)
        .map(|seed| noise(4 * MIB, 5000 + 2 * seed))
        .find(|b| {
            pullgate::cluster::owner_among(addrs.iter().copied(), &digest_of(b)) == Some(addrs[1])
        })
        .expect("a blob replica 1 owns");
    let digest = digest_of(&body);
    push_blob_upstream(&up, "team/app", &digest, &body);
    let lists = [vec![addrs[0], addrs[2]], addrs.clone(), addrs.clone()];
    let mut replicas: Vec<Replica> = (0..3)
        .map(|i| {
            let peers = lists[i]
                .iter()
                .map(|a| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(", ");
            let shared = format!(
                "{}\n[cluster]\npeers = [{peers}]\nadvertise = \"{}\"\nkey_file = \"{}\"\n",
                registry("hub", &up, "default = true"),
                addrs[i],
                dir.path().join("cluster.key").display()
            );
            let admin = free_port_on([127, 0, 0, 11 + i as u8]);
            start(dir.path(), i, addrs[i], admin, &shared)
        })
        .collect();
    for r in &replicas {
        wait_until(Duration::from_secs(20), "replica listening", || {
            can_connect(r.addr)
        })
        .expect("replica starts");
    }
    // Three clients on each replica at once: 2 forwards to 1, and 0 fills itself or forwards
    // to 2 (whichever of the two it takes for the owner).
    let clients: Vec<_> = (0..9)
        .map(|i| {
            let url = format!("http://{}/v2/team/app/blobs/{digest}", addrs[i % 3]);
            std::thread::spawn(move || get(&url))
        })
        .collect();
    for client in clients {
        let answer = client.join().expect("client");
        assert_eq!(answer.status, 200);
        assert_eq!(digest_of(&answer.body), digest);
    }
    let fetched = crate::l2::upstream_fetches(&up, &digest);
    assert!(
        (1..=2).contains(&fetched),
        "{fetched} upstream GETs: at most one duplicate"
    );
    for r in &mut replicas {
        r.child.kill();
    }
}
