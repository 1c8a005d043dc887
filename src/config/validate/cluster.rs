//! `[cluster]`: the static member list, this replica's own address among it, and the key that
//! authenticates peer requests. Owns that a cluster config names every member by `ip:port`,
//! that `advertise` is one of them, and that the key file holds a usable key.

use std::net::SocketAddr;

use super::values::parse_socket_addr;
use super::Ctx;
use crate::config::file::ClusterFile;
use crate::config::model::{Cluster, Server};

pub(super) fn check_cluster(ctx: &mut Ctx<'_>, file: &ClusterFile) -> Option<Cluster> {
    if file.peers_dns.is_some() {
        ctx.err(
            "cluster.peers_dns",
            "membership from DNS is not built yet: list the members in cluster.peers",
        );
    }
    if file.peers.is_empty() {
        ctx.err(
            "cluster.peers",
            "missing: list every replica (this one included) as \"ip:port\" of its plain \
             listener",
        );
    }
    let peers: Vec<SocketAddr> = file
        .peers
        .iter()
        .enumerate()
        .filter_map(|(i, raw)| ctx.ok(&format!("cluster.peers[{i}]"), parse_socket_addr(raw)))
        .collect();
    let advertise = match file.advertise.as_deref() {
        None | Some("") => {
            ctx.err(
                "cluster.advertise",
                "missing: how the other replicas reach this one, one of cluster.peers",
            );
            None
        }
        Some(raw) => ctx.ok("cluster.advertise", parse_socket_addr(raw)),
    };
    if let Some(me) = advertise {
        if !peers.is_empty() && !peers.contains(&me) {
            ctx.err(
                "cluster.advertise",
                format!(
                    "{me} is not one of cluster.peers: every replica must list the same \
                     members, itself included, or they disagree about who owns a blob"
                ),
            );
        }
    }
    let key_file = match file.key_file.as_deref() {
        None => {
            ctx.err(
                "cluster.key_file",
                "missing: the key (at least 32 bytes, the same on every replica) that \
                 authenticates requests between replicas",
            );
            None
        }
        Some(raw) => {
            let key = "cluster.key_file";
            ctx.existing_file(key, raw).and_then(|path| {
                let loaded = crate::sign::RedirectKey::load(&path).map(|_| path);
                ctx.ok(key, loaded)
            })
        }
    };
    Some(Cluster {
        peers,
        advertise: advertise?,
        key_file: key_file?,
    })
}

/// Peers forward over plain HTTP to `advertise`: warn when no plain listener could be it (a
/// port mapped by a container runtime or a NAT can still make it right, so not an error).
pub(super) fn check_advertised_listener(ctx: &mut Ctx<'_>, cluster: &Cluster, server: &Server) {
    let me = cluster.advertise;
    let listened = server
        .listen
        .iter()
        .any(|l| l.port() == me.port() && (l.ip() == me.ip() || l.ip().is_unspecified()));
    if !listened {
        ctx.warn(
            "cluster.advertise",
            format!(
                "{me} is not one of server.listen: peers send their requests there over plain \
                 HTTP, so unless a port mapping leads it to a plain listener every forward \
                 will fail over to the upstream"
            ),
        );
    }
}
