use super::*;

fn addr(last: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, last], 5000))
}

fn digests(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("sha256:{:064x}", i as u128 * 0x9e37_79b9_7f4a_7c15))
        .collect()
}

#[test]
fn every_member_agrees_whatever_the_order_of_its_list() {
    let peers = [addr(11), addr(12), addr(13)];
    let a = Membership::new(addr(11), &peers, DEFAULT_BACKOFF);
    let b = Membership::new(addr(12), &[addr(13), addr(11), addr(12)], DEFAULT_BACKOFF);
    let c = Membership::new(addr(13), &[addr(12), addr(11)], DEFAULT_BACKOFF);
    let now = Instant::now();
    for d in digests(300) {
        let chosen = owner_among(peers, &d).expect("members");
        for m in [&a, &b, &c] {
            let expect = if chosen == m.me() {
                Owner::Me
            } else {
                Owner::Peer(chosen)
            };
            assert_eq!(m.owner(&d, now), expect, "{d}");
        }
    }
}

#[test]
fn ownership_is_stable_and_spread() {
    let peers = [addr(11), addr(12), addr(13)];
    let mut share: HashMap<SocketAddr, usize> = HashMap::new();
    for d in digests(3000) {
        let first = owner_among(peers, &d);
        assert_eq!(first, owner_among(peers, &d));
        *share.entry(first.expect("members")).or_default() += 1;
    }
    for m in peers {
        // 1000 expected each; a skewed hash would leave one far off.
        let n = share[&m];
        assert!((800..1200).contains(&n), "{m}: {n}");
    }
}

#[test]
fn a_member_leaving_moves_only_its_own_digests() {
    let all = [addr(11), addr(12), addr(13), addr(14)];
    let without = [addr(11), addr(12), addr(14)];
    let mut moved = 0;
    for d in digests(2000) {
        let before = owner_among(all, &d).expect("members");
        let after = owner_among(without, &d).expect("members");
        if before == addr(13) {
            moved += 1;
            assert_ne!(after, addr(13));
        } else {
            assert_eq!(before, after, "{d} moved though its owner stayed");
        }
    }
    assert!(moved > 0);
}

#[test]
fn a_failed_peer_is_skipped_for_the_backoff_only() {
    let peers = [addr(11), addr(12), addr(13)];
    let me = Membership::new(addr(11), &peers, Duration::from_secs(10));
    let now = Instant::now();
    let d = digests(500)
        .into_iter()
        .find(|d| owner_among(peers, d) == Some(addr(12)))
        .expect("a digest owned by .12");
    assert_eq!(me.owner(&d, now), Owner::Peer(addr(12)));
    me.failed(addr(12), now);
    let next = owner_among([addr(11), addr(13)], &d).expect("members");
    let expect = if next == addr(11) {
        Owner::Me
    } else {
        Owner::Peer(next)
    };
    assert_eq!(me.owner(&d, now + Duration::from_secs(9)), expect);
    assert_eq!(me.down_count(now + Duration::from_secs(9)), 1);
    assert_eq!(
        me.owner(&d, now + Duration::from_secs(10)),
        Owner::Peer(addr(12))
    );
    assert_eq!(me.down_count(now + Duration::from_secs(10)), 0);
    assert_eq!(me.peers(), vec![addr(12), addr(13)], "the others, to probe");
}

#[test]
fn never_its_own_peer() {
    let me = Membership::new(addr(11), &[addr(11)], DEFAULT_BACKOFF);
    me.failed(addr(11), Instant::now());
    for d in digests(50) {
        assert_eq!(me.owner(&d, Instant::now()), Owner::Me);
    }
    assert_eq!(me.members(), vec![addr(11)]);
}

#[test]
fn a_new_member_list_from_dns_keeps_me_and_moves_only_what_changed_owner() {
    let m = Membership::new(addr(11), &[], DEFAULT_BACKOFF);
    assert_eq!(m.members(), vec![addr(11)], "alone until DNS answers");
    assert!(m.set_members(&[addr(12), addr(11), addr(13)]));
    assert!(
        !m.set_members(&[addr(13), addr(12), addr(11)]),
        "same set, any order"
    );
    let before: Vec<Owner> = digests(300)
        .iter()
        .map(|d| m.owner(d, Instant::now()))
        .collect();
    // A fourth replica joins: it takes only digests, it moves none between the others.
    assert!(m.set_members(&[addr(11), addr(12), addr(13), addr(14)]));
    let mut moved = 0;
    for (d, old) in digests(300).iter().zip(&before) {
        let now = m.owner(d, Instant::now());
        if now != *old {
            assert_eq!(now, Owner::Peer(addr(14)), "{d} moved to the newcomer only");
            moved += 1;
        }
    }
    assert!(
        (40..=110).contains(&moved),
        "about a quarter moved: {moved}"
    );
    // DNS that no longer lists this replica (not ready yet) leaves it a member.
    assert!(m.set_members(&[addr(12)]));
    assert_eq!(m.members(), vec![addr(11), addr(12)]);
}
