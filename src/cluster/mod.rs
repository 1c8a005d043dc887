//! Cluster membership and the owner of each blob digest and tag.
//!
//! Owns: the member list of `[cluster]` (fixed, or replaced when DNS answers differently),
//! which member owns a digest, and which peers are in back-off after a failed forward or
//! health probe. Pure Rust: no HTTP, no Pingora, no clock of its own (callers
//! pass `Instant`s), so every rule here is unit-tested without a server.
//!
//! Must never: name this replica's own address as a peer to forward to (callers get
//! [`Owner::Me`]), or give two replicas with the same member list and the same view of
//! health different owners for one digest.
//!
//! Why rendezvous (highest random weight) hashing: each member scores every digest with a hash
//! of (member, digest) and the highest score owns it. A member that leaves (or is in back-off)
//! moves only the digests it owned, each to its runner-up; every other digest keeps its owner,
//! so caches stay warm. `hash % N` would move almost everything on any change, and a ring
//! (Ketama) needs virtual nodes to spread evenly where rendezvous spreads evenly by itself and
//! is a dozen lines for the handful of members a cluster has.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

/// How long a peer that failed a forward is skipped.
pub const DEFAULT_BACKOFF: Duration = Duration::from_secs(10);

/// Who fetches a digest from the upstream for the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// This replica: fill from the upstream.
    Me,
    /// Another member: fill from it.
    Peer(SocketAddr),
}

/// Member list changes in this process (`pullgate_cluster_member_changes_total`); process-wide
/// so that a reload, which builds a new [`Membership`], does not reset the counter.
static MEMBER_CHANGES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many times a member list changed in this process.
pub fn member_changes() -> u64 {
    MEMBER_CHANGES.load(std::sync::atomic::Ordering::Relaxed)
}

/// The members and their health as this replica sees them.
#[derive(Debug)]
pub struct Membership {
    me: SocketAddr,
    /// Every member, this replica included, sorted and without duplicates. Replaced whole
    /// when DNS answers differently ([`Membership::set_members`]).
    members: RwLock<Vec<SocketAddr>>,
    backoff: Duration,
    /// Peer -> until when it is skipped.
    down: Mutex<HashMap<SocketAddr, Instant>>,
}

impl Membership {
    /// `me` is counted as a member even when `peers` leaves it out.
    pub fn new(me: SocketAddr, peers: &[SocketAddr], backoff: Duration) -> Membership {
        Membership {
            me,
            members: RwLock::new(with_me(me, peers)),
            backoff,
            down: Mutex::new(HashMap::new()),
        }
    }

    /// This replica's address (`cluster.advertise`).
    pub fn me(&self) -> SocketAddr {
        self.me
    }

    pub fn members(&self) -> Vec<SocketAddr> {
        self.members
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A new member list (from DNS); `me` stays a member whether or not it is listed (a
    /// replica not yet published still fills what it owns). Returns whether it changed.
    pub fn set_members(&self, found: &[SocketAddr]) -> bool {
        let next = with_me(self.me, found);
        let mut members = self.members.write().unwrap_or_else(|e| e.into_inner());
        if *members == next {
            return false;
        }
        *members = next;
        MEMBER_CHANGES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        true
    }

    /// The owner of `digest` among the members not in back-off at `now`.
    pub fn owner(&self, digest: &str, now: Instant) -> Owner {
        let down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        let members = self.members.read().unwrap_or_else(|e| e.into_inner());
        let live = members
            .iter()
            .copied()
            .filter(|m| *m == self.me || down.get(m).is_none_or(|until| *until <= now));
        match owner_among(live, digest) {
            Some(m) if m != self.me => Owner::Peer(m),
            _ => Owner::Me,
        }
    }

    /// Members in back-off at `now` (`pullgate_cluster_members_down`).
    pub fn down_count(&self, now: Instant) -> usize {
        let down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        let members = self.members.read().unwrap_or_else(|e| e.into_inner());
        members
            .iter()
            .filter(|m| down.get(m).is_some_and(|until| *until > now))
            .count()
    }

    /// The other members, to probe.
    pub fn peers(&self) -> Vec<SocketAddr> {
        let mut members = self.members();
        members.retain(|m| *m != self.me);
        members
    }

    /// `peer` failed a forward or a health probe at `now`: skip it for the back-off.
    pub fn failed(&self, peer: SocketAddr, now: Instant) {
        if peer == self.me {
            return;
        }
        let mut down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        down.insert(peer, now + self.backoff);
    }
}

fn with_me(me: SocketAddr, peers: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut members: Vec<SocketAddr> = peers.to_vec();
    members.push(me);
    members.sort();
    members.dedup();
    members
}

/// The member with the highest score for `digest`; ties (never seen with SHA-256) go to the
/// lower address, so the choice does not depend on the order of the list.
pub fn owner_among(
    members: impl IntoIterator<Item = SocketAddr>,
    digest: &str,
) -> Option<SocketAddr> {
    members
        .into_iter()
        .map(|m| (score(m, digest), std::cmp::Reverse(m)))
        .max()
        .map(|(_, std::cmp::Reverse(m))| m)
}

/// The weight of `member` for `digest`: the first 8 bytes of SHA-256 over both, so every
/// replica (any build, any platform) computes the same number.
fn score(member: SocketAddr, digest: &str) -> u64 {
    let mut h = Sha256::new();
    let member = member.to_string();
    h.update((member.len() as u64).to_be_bytes());
    h.update(member.as_bytes());
    h.update(digest.as_bytes());
    let out = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&out[..8]);
    u64::from_be_bytes(first)
}

pub mod dns;

#[cfg(test)]
mod tests;
