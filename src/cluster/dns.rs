//! Members from DNS (`cluster.peers_dns`): every address a name resolves to, with the members'
//! port, re-resolved at most every `peers_dns_refresh`. A Kubernetes headless Service answers
//! with one A record per pod, so replicas added or removed by the Deployment are members after
//! the next refresh with no gossip, no consensus and no config change.
//!
//! Owns: when a refresh is due and one refresh at a time. Resolution goes through the system
//! resolver (`getaddrinfo`, so `/etc/hosts` and the cluster's DNS both work). A failed or empty
//! answer keeps the last member list: a DNS hiccup must not make every replica think it is
//! alone, which would cost a fetch per replica.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Membership;

#[derive(Debug)]
pub struct DnsMembers {
    name: String,
    port: u16,
    refresh: Duration,
    /// When the next refresh is due.
    next: Mutex<Instant>,
    resolving: AtomicBool,
}

impl DnsMembers {
    pub fn new(name: &str, port: u16, refresh: Duration) -> DnsMembers {
        DnsMembers {
            name: name.to_owned(),
            port,
            refresh,
            next: Mutex::new(Instant::now()),
            resolving: AtomicBool::new(false),
        }
    }

    /// Whether a refresh should start at `now`; when it says yes, the next one is due a
    /// refresh interval later and no other caller gets a yes until this one [`finished`].
    ///
    /// [`finished`]: DnsMembers::finished
    pub fn start_refresh(&self, now: Instant) -> bool {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        if now < *next || self.resolving.swap(true, Ordering::AcqRel) {
            return false;
        }
        *next = now + self.refresh;
        true
    }

    pub fn finished(&self) {
        self.resolving.store(false, Ordering::Release);
    }

    /// Every address of the name, with the members' port.
    pub async fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        let found = tokio::net::lookup_host((self.name.as_str(), self.port)).await?;
        Ok(found.collect())
    }

    /// The same, blocking: for the first member list, before any runtime runs.
    pub fn resolve_blocking(&self) -> std::io::Result<Vec<SocketAddr>> {
        use std::net::ToSocketAddrs;
        Ok((self.name.as_str(), self.port).to_socket_addrs()?.collect())
    }

    /// Applies an answer to `membership`: a failed or empty one keeps what it had.
    pub fn apply(&self, answer: std::io::Result<Vec<SocketAddr>>, membership: &Membership) {
        match answer {
            Ok(found) if !found.is_empty() => {
                if membership.set_members(&found) {
                    tracing::info!(name = %self.name, members = ?membership.members(), "cluster members changed (cluster.peers_dns)");
                }
            }
            Ok(_) => {
                tracing::warn!(name = %self.name, "cluster.peers_dns resolved to no address; keeping the last member list");
            }
            Err(e) => {
                tracing::warn!(name = %self.name, error = %e, "cannot resolve cluster.peers_dns; keeping the last member list");
            }
        }
    }
}
