//! `[cluster]`: the members (a static list or a DNS name), this replica's own address, and the
//! key that authenticates peer requests. Owns that a static list names every member by
//! `ip:port` with `advertise` among them, that a DNS name has a port, and that the key file
//! holds a usable key.

use std::net::SocketAddr;
use std::time::Duration;

use super::values::parse_socket_addr;
use super::{check_duration, Ctx};
use crate::config::file::ClusterFile;
use crate::config::model::{Cluster, PeersDns, Server};

pub(super) fn check_cluster(ctx: &mut Ctx<'_>, file: &ClusterFile) -> Option<Cluster> {
    let peers_dns = file.peers_dns.as_deref().and_then(|raw| {
        let refresh = check_duration(
            ctx,
            "cluster.peers_dns_refresh",
            file.peers_dns_refresh.as_deref(),
        )
        .unwrap_or(DEFAULT_DNS_REFRESH);
        if refresh < Duration::from_millis(100) || refresh > Duration::from_secs(300) {
            ctx.err(
                "cluster.peers_dns_refresh",
                format!(
                    "must be between 100ms and 5m, got {}",
                    humantime::format_duration(refresh)
                ),
            );
        }
        let parsed = parse_name_port(raw).map(|(name, port)| PeersDns {
            name,
            port,
            refresh,
        });
        ctx.ok("cluster.peers_dns", parsed)
    });
    if file.peers_dns_refresh.is_some() && file.peers_dns.is_none() {
        ctx.err(
            "cluster.peers_dns_refresh",
            "applies only with cluster.peers_dns",
        );
    }
    match (file.peers.is_empty(), file.peers_dns.is_some()) {
        (false, true) => ctx.err(
            "cluster.peers_dns",
            "set cluster.peers (a fixed list) or cluster.peers_dns (a name), not both",
        ),
        (true, false) => ctx.err(
            "cluster.peers",
            "missing: list every replica (this one included) as \"ip:port\" of its plain \
             listener, or name them in cluster.peers_dns",
        ),
        _ => {}
    }
    let peers: Vec<SocketAddr> = file
        .peers
        .iter()
        .enumerate()
        .filter_map(|(i, raw)| ctx.ok(&format!("cluster.peers[{i}]"), parse_socket_addr(raw)))
        .collect();
    let advertise = match (file.advertise.as_deref(), file.advertise_env.as_deref()) {
        (Some(_), Some(_)) => {
            ctx.err(
                "cluster.advertise_env",
                "set cluster.advertise or cluster.advertise_env, not both",
            );
            None
        }
        (None | Some(""), None) => {
            ctx.err(
                "cluster.advertise",
                "missing: how the other replicas reach this one (\"ip:port\", one of the \
                 members), or cluster.advertise_env naming a variable that holds it",
            );
            None
        }
        (Some(raw), None) => ctx.ok("cluster.advertise", parse_socket_addr(raw)),
        (None, Some(var)) => {
            let port = file
                .peers_dns
                .as_deref()
                .and_then(|raw| parse_name_port(raw).ok())
                .map(|(_, port)| port);
            ctx.ok("cluster.advertise_env", advertise_from_env(var, port))
        }
    };
    if let (Some(me), None) = (advertise, &peers_dns) {
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
        peers_dns,
        advertise: advertise?,
        key_file: key_file?,
    })
}

const DEFAULT_DNS_REFRESH: Duration = Duration::from_secs(10);

/// `"name:port"`: a DNS name (letters, digits, `-`, `.`) and the members' port.
fn parse_name_port(raw: &str) -> Result<(String, u16), String> {
    let (name, port) = raw
        .rsplit_once(':')
        .ok_or_else(|| format!("must be \"name:port\", got {raw:?}"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{port:?} is not a port"))?;
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'));
    if !valid {
        return Err(format!("{name:?} is not a DNS name"));
    }
    Ok((name.to_owned(), port))
}

/// `cluster.advertise_env`: the variable holds `ip:port`, or just the IP when the port comes
/// from `peers_dns` (Kubernetes' downward API gives `status.podIP`).
fn advertise_from_env(var: &str, port: Option<u16>) -> Result<SocketAddr, String> {
    let value =
        std::env::var(var).map_err(|_| format!("the environment variable {var} is not set"))?;
    let value = value.trim();
    if let Ok(addr) = parse_socket_addr(value) {
        return Ok(addr);
    }
    match (value.parse::<std::net::IpAddr>(), port) {
        (Ok(ip), Some(port)) => Ok(SocketAddr::new(ip, port)),
        (Ok(_), None) => Err(format!(
            "{var} holds an IP without a port; with cluster.peers it must be \"ip:port\""
        )),
        (Err(_), _) => Err(format!("{var} holds {value:?}, not an IP or \"ip:port\"")),
    }
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
