//! One upstream question at a time per manifest or tag: when many clients ask for a tag or a
//! manifest pullgate does not hold (a rollout of a new tag, a tag whose `tag_ttl` just ran
//! out), the first asks the upstream and the others wait for it, then answer from what it
//! cached. Docker Hub counts every manifest GET as a pull, so 64 nodes asking at once must
//! cost one.
//!
//! A follower waits for one leader only and then re-reads the cache; if the leader left
//! nothing usable (the upstream failed, the client went away, another media type) the follower
//! asks the upstream itself, so a failure costs what it cost without the flight and never
//! queues the followers behind one another.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::watch;

/// The flights in progress, by key: the reference's key of remembered 404s (`manifest.rs`),
/// which already names the account, the repository, the reference and the client's types.
#[derive(Default)]
pub struct Flights {
    // A leader holds the sender; dropping it (done, failed or cancelled) wakes the followers.
    in_flight: Mutex<HashMap<String, watch::Receiver<()>>>,
}

/// What [`Flights::join`] made of the caller.
pub enum Turn<'a> {
    /// Ask the upstream; the others wait until this is dropped.
    Lead(Leader<'a>),
    /// Another request just asked: read the cache again.
    Followed,
}

/// Held by the request that asks the upstream.
pub struct Leader<'a> {
    flights: &'a Flights,
    key: String,
    _done: watch::Sender<()>,
}

impl Flights {
    pub async fn join(&self, key: String) -> Turn<'_> {
        let mut waiting = {
            let mut map = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            match map.get(&key) {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel(());
                    map.insert(key.clone(), rx);
                    return Turn::Lead(Leader {
                        flights: self,
                        key,
                        _done: tx,
                    });
                }
            }
        };
        // Err once the leader's sender is gone: the only way this channel ends.
        let _ = waiting.changed().await;
        Turn::Followed
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.in_flight.lock().unwrap().len()
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        let mut map = self
            .flights
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        map.remove(&self.key);
        // `_done` drops after this, waking the followers.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test(flavor = "current_thread")]
    async fn followers_wait_for_the_leader_and_then_read_again() {
        let flights = Arc::new(Flights::default());
        let leader = match flights.join("k".into()).await {
            Turn::Lead(l) => l,
            Turn::Followed => panic!("the first caller leads"),
        };
        let woke = Arc::new(AtomicUsize::new(0));
        let followers: Vec<_> = (0..8)
            .map(|_| {
                let (flights, woke) = (Arc::clone(&flights), Arc::clone(&woke));
                tokio::spawn(async move {
                    assert!(matches!(flights.join("k".into()).await, Turn::Followed));
                    woke.fetch_add(1, Ordering::SeqCst);
                })
            })
            .collect();
        // Another key is its own flight.
        assert!(matches!(flights.join("other".into()).await, Turn::Lead(_)));
        tokio::task::yield_now().await;
        assert_eq!(
            woke.load(Ordering::SeqCst),
            0,
            "followers wait for the leader"
        );
        drop(leader);
        for f in followers {
            f.await.unwrap();
        }
        assert_eq!(woke.load(Ordering::SeqCst), 8);
        assert_eq!(flights.len(), 0, "a finished flight leaves nothing behind");
        assert!(
            matches!(flights.join("k".into()).await, Turn::Lead(_)),
            "the next caller leads a new flight"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_cancelled_leader_releases_its_followers() {
        let flights = Arc::new(Flights::default());
        let lead = {
            let flights = Arc::clone(&flights);
            tokio::spawn(async move {
                let _turn = flights.join("k".into()).await;
                std::future::pending::<()>().await;
            })
        };
        tokio::task::yield_now().await;
        let follower = {
            let flights = Arc::clone(&flights);
            tokio::spawn(async move { matches!(flights.join("k".into()).await, Turn::Followed) })
        };
        tokio::task::yield_now().await;
        lead.abort();
        assert!(follower.await.unwrap());
        assert_eq!(flights.len(), 0);
    }
}
