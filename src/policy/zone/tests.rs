use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use ipnet::IpNet;

use super::*;

fn zone(name: &str, nets: &[&str]) -> Zone {
    Zone {
        name: name.to_owned(),
        nets: nets.iter().map(|n| n.parse().unwrap()).collect(),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn zones_of(table: &ZoneTable, addr: &str) -> Vec<String> {
    table.zones_of(ip(addr)).map(str::to_owned).collect()
}

#[test]
fn longest_prefix_and_overlapping_zones() {
    let table = ZoneTable::new(&[
        zone("build", &["10.1.2.0/24"]),
        zone("office", &["192.0.2.0/24"]),
        zone("vpc", &["10.0.0.0/8"]),
    ]);
    assert_eq!(table.best(ip("10.1.2.3")), Some("build"));
    assert_eq!(zones_of(&table, "10.1.2.3"), ["build", "vpc"]);
    assert_eq!(table.best(ip("10.9.9.9")), Some("vpc"));
    assert_eq!(zones_of(&table, "10.9.9.9"), ["vpc"]);
    assert_eq!(table.best(ip("192.0.2.255")), Some("office"));
    assert_eq!(table.best(ip("192.0.3.0")), None);
    assert!(table.lookup(ip("11.0.0.0")).is_empty());
    // Edges of a range.
    assert_eq!(table.best(ip("10.1.1.255")), Some("vpc"));
    assert_eq!(table.best(ip("10.1.3.0")), Some("vpc"));
    assert_eq!(table.best(ip("9.255.255.255")), None);
    assert_eq!(table.best(ip("11.0.0.0")), None);
    assert_eq!(table.prefix_count(), 3);
}

#[test]
fn nested_prefixes_of_one_zone() {
    let table = ZoneTable::new(&[
        zone("a", &["10.0.0.0/8", "10.5.0.0/16"]),
        zone("b", &["10.5.5.0/24"]),
    ]);
    let m = table.lookup(ip("10.5.5.5"));
    assert_eq!(m.best(), Some("b"));
    assert_eq!(m.iter().collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(m.len(), 2);
    assert_eq!(table.best(ip("10.5.6.0")), Some("a"));
    assert_eq!(table.best(ip("10.6.0.0")), Some("a"));
}

#[test]
fn ipv6_longest_prefix() {
    let table = ZoneTable::new(&[
        zone("ula", &["fd00::/8"]),
        zone("lab", &["fd00:1::/32", "2001:db8::5/128"]),
    ]);
    assert_eq!(table.best(ip("fd00:1::7")), Some("lab"));
    assert_eq!(zones_of(&table, "fd00:1::7"), ["ula", "lab"]);
    assert_eq!(table.best(ip("fd00:2::7")), Some("ula"));
    assert_eq!(table.best(ip("2001:db8::5")), Some("lab"));
    assert_eq!(table.best(ip("2001:db8::6")), None);
    assert_eq!(table.best(ip("fe00::")), None);
    // Families do not leak into each other.
    assert_eq!(table.best(ip("10.0.0.1")), None);
}

#[test]
fn ipv4_mapped_sources_are_ipv4() {
    let table = ZoneTable::new(&[zone("vpc", &["10.0.0.0/8"]), zone("v6", &["::/0"])]);
    let mapped = IpAddr::V6(Ipv4Addr::new(10, 1, 2, 3).to_ipv6_mapped());
    assert_eq!(table.best(mapped), Some("vpc"));
    assert_eq!(table.zones_of(mapped).collect::<Vec<_>>(), ["vpc"]);
    // A short IPv6 prefix does not cover IPv4, mapped or not.
    let outside = IpAddr::V6(Ipv4Addr::new(11, 0, 0, 1).to_ipv6_mapped());
    assert_eq!(table.best(outside), None);
    assert_eq!(table.best(ip("2001:db8::1")), Some("v6"));
}

#[test]
fn mapped_prefixes_are_stored_as_ipv4() {
    let table = ZoneTable::new(&[zone("m", &["::ffff:10.0.0.0/104", "::ffff:192.0.2.9/128"])]);
    assert_eq!(table.best(ip("10.200.0.1")), Some("m"));
    assert_eq!(table.best(ip("::ffff:10.200.0.1")), Some("m"));
    assert_eq!(table.best(ip("192.0.2.9")), Some("m"));
    assert_eq!(table.best(ip("192.0.2.10")), None);
    assert_eq!(
        canonical_net("::ffff:0:0/96".parse().unwrap()),
        "0.0.0.0/0".parse::<IpNet>().unwrap()
    );
    assert_eq!(
        canonical_net("::ffff:0:0/95".parse().unwrap()),
        "::fffe:0:0/95".parse::<IpNet>().unwrap()
    );
}

#[test]
fn host_bits_are_ignored() {
    let table = ZoneTable::new(&[zone("z", &["10.1.2.3/8"])]);
    assert_eq!(table.best(ip("10.255.0.0")), Some("z"));
    assert_eq!(table.best(ip("11.0.0.0")), None);
}

#[test]
fn whole_address_spaces_and_extremes() {
    let table = ZoneTable::new(&[
        zone("all4", &["0.0.0.0/0"]),
        zone("all6", &["::/0"]),
        zone(
            "top",
            &[
                "255.255.255.255/32",
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128",
            ],
        ),
        zone("bottom", &["0.0.0.0/32", "::/128"]),
    ]);
    assert_eq!(table.best(ip("255.255.255.255")), Some("top"));
    assert_eq!(table.best(ip("255.255.255.254")), Some("all4"));
    assert_eq!(table.best(ip("0.0.0.0")), Some("bottom"));
    assert_eq!(table.best(ip("0.0.0.1")), Some("all4"));
    assert_eq!(
        table.best(IpAddr::V6(Ipv6Addr::from(u128::MAX))),
        Some("top")
    );
    assert_eq!(table.best(ip("::")), Some("bottom"));
    assert_eq!(table.best(ip("::1")), Some("all6"));
    assert_eq!(zones_of(&table, "255.255.255.255"), ["all4", "top"]);
}

#[test]
fn equal_prefixes_in_two_zones_best_is_listed_first() {
    let table = ZoneTable::new(&[
        zone("alpha", &["10.0.0.0/8"]),
        zone("beta", &["10.0.0.0/8"]),
    ]);
    let m = table.lookup(ip("10.0.0.1"));
    assert_eq!(m.best(), Some("alpha"));
    assert_eq!(m.iter().collect::<Vec<_>>(), ["alpha", "beta"]);
    let reversed = ZoneTable::new(&[
        zone("beta", &["10.0.0.0/8"]),
        zone("alpha", &["10.0.0.0/8"]),
    ]);
    assert_eq!(reversed.best(ip("10.0.0.1")), Some("beta"));
}

#[test]
fn duplicate_prefix_and_duplicate_zone_names_merge() {
    let table = ZoneTable::new(&[
        zone("a", &["10.0.0.0/8", "10.0.0.0/8"]),
        zone("a", &["192.0.2.0/24"]),
    ]);
    assert_eq!(zones_of(&table, "10.0.0.1"), ["a"]);
    assert_eq!(zones_of(&table, "192.0.2.1"), ["a"]);
}

#[test]
fn empty_table() {
    let table = ZoneTable::new(&[]);
    assert!(table.lookup(ip("10.0.0.1")).is_empty());
    assert_eq!(table.best(ip("::1")), None);
    assert_eq!(table.range_count(), 2);
}

#[test]
fn zone_match_helpers() {
    let table = ZoneTable::new(&[
        zone("build", &["10.1.0.0/16"]),
        zone("vpc", &["10.0.0.0/8"]),
    ]);
    let m = table.lookup(ip("10.1.0.1"));
    assert!(m.contains("vpc") && m.contains("build") && !m.contains("office"));
    let allowed = ["office".to_owned(), "vpc".to_owned()];
    assert_eq!(m.any_of(&allowed), Some("vpc"));
    assert_eq!(m.any_of(&["office".to_owned()]), None);
    assert_eq!(m.to_string(), "zones build, vpc");
    assert_eq!(table.lookup(ip("10.2.0.1")).to_string(), "zone vpc");
    assert_eq!(ZoneMatch::NONE.to_string(), "no zone");
    assert_eq!(ZoneMatch::NONE.any_of(&allowed), None);
    assert!(format!("{m:?}").contains("build"));
    assert!(format!("{table:?}").contains("prefixes: 2"));
}

/// Deterministic xorshift, so the randomised tests need no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn random_zones(rng: &mut Rng, zones: usize, prefixes: usize) -> Vec<Zone> {
    let mut out: Vec<Zone> = (0..zones)
        .map(|i| Zone {
            name: format!("z{i:04}"),
            nets: Vec::new(),
        })
        .collect();
    for i in 0..prefixes {
        let r = rng.next();
        let net: IpNet = if i % 4 == 3 {
            let len = (r % 129) as u8;
            let addr = Ipv6Addr::from(((r as u128) << 64) | rng.next() as u128);
            IpNet::new(IpAddr::V6(addr), len).unwrap().trunc()
        } else {
            // Mostly inside 10/8 so that prefixes nest and overlap.
            let len = 8 + (r % 25) as u8;
            let addr = Ipv4Addr::from(0x0a00_0000 | (rng.next() as u32 & 0x00ff_ffff));
            IpNet::new(IpAddr::V4(addr), len).unwrap().trunc()
        };
        let z = (rng.next() % zones as u64) as usize;
        out[z].nets.push(net);
    }
    out
}

/// The obvious answer: scan every prefix.
fn brute(zones: &[Zone], addr: IpAddr) -> (Option<String>, Vec<String>) {
    let mut best: Option<(u8, &str)> = None;
    let mut all = Vec::new();
    for z in zones {
        for n in &z.nets {
            if n.contains(&addr) {
                if !all.contains(&z.name) {
                    all.push(z.name.clone());
                }
                if best.is_none_or(|(len, _)| n.prefix_len() > len) {
                    best = Some((n.prefix_len(), &z.name));
                }
            }
        }
    }
    all.sort();
    (best.map(|(_, n)| n.to_owned()), all)
}

#[test]
fn agrees_with_a_linear_scan() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let zones = random_zones(&mut rng, 7, 400);
    let table = ZoneTable::new(&zones);
    let v6_samples: Vec<Ipv6Addr> = zones
        .iter()
        .flat_map(|z| &z.nets)
        .filter_map(|n| match n {
            IpNet::V6(n) => Some(n.network()),
            IpNet::V4(_) => None,
        })
        .collect();
    for i in 0..20_000u64 {
        let addr = match i % 3 {
            0 => IpAddr::V4(Ipv4Addr::from(rng.next() as u32)),
            1 => IpAddr::V4(Ipv4Addr::from(
                0x0a00_0000 | (rng.next() as u32 & 0x00ff_ffff),
            )),
            _ => {
                let base = u128::from(v6_samples[(rng.next() as usize) % v6_samples.len()]);
                IpAddr::V6(Ipv6Addr::from(
                    base ^ (rng.next() as u128 >> (rng.next() % 64)),
                ))
            }
        };
        let (best, all) = brute(&zones, addr);
        let m = table.lookup(addr);
        assert_eq!(m.best().map(str::to_owned), best, "{addr}");
        // Zone names sort the same way as zone ids here (z0000, z0001, ...).
        assert_eq!(
            m.iter().map(str::to_owned).collect::<Vec<_>>(),
            all,
            "{addr}"
        );
    }
}

/// 10,000 disjoint /24s over 20 zones, like a cloud provider's published address list.
fn disjoint_zones(rng: &mut Rng, prefixes: usize) -> Vec<Zone> {
    let mut out: Vec<Zone> = (0..20)
        .map(|i| Zone {
            name: format!("region-{i:02}"),
            nets: Vec::new(),
        })
        .collect();
    for i in 0..prefixes {
        let addr = Ipv4Addr::from(((i as u32) * 97 % (1 << 24)) << 8);
        let z = (rng.next() % 20) as usize;
        out[z].nets.push(IpNet::new(IpAddr::V4(addr), 24).unwrap());
    }
    out
}

/// Lookup cost at 10 and 10,000 prefixes. Prints ns/lookup; asserts nothing about time.
/// `cargo test --release -- --ignored --nocapture --test-threads=1 zone_lookup_benchmark`
#[test]
#[ignore]
fn zone_lookup_benchmark() {
    let cases = [
        ("nested", 10, false),
        ("nested", 10_000, false),
        ("disjoint", 10_000, true),
    ];
    for (kind, prefixes, disjoint) in cases {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let zones = if disjoint {
            disjoint_zones(&mut rng, prefixes)
        } else {
            random_zones(&mut rng, (prefixes / 20).max(2), prefixes)
        };
        let started = Instant::now();
        let table = ZoneTable::new(&zones);
        let build = started.elapsed();
        let addrs: Vec<IpAddr> = (0..4096)
            .map(|i| {
                if disjoint {
                    IpAddr::V4(Ipv4Addr::from(rng.next() as u32))
                } else if i % 4 == 3 {
                    IpAddr::V6(Ipv6Addr::from(
                        ((rng.next() as u128) << 64) | rng.next() as u128,
                    ))
                } else {
                    IpAddr::V4(Ipv4Addr::from(
                        0x0a00_0000 | (rng.next() as u32 & 0x00ff_ffff),
                    ))
                }
            })
            .collect();
        let rounds = 500;
        let mut hits = 0usize;
        let started = Instant::now();
        for _ in 0..rounds {
            for &a in &addrs {
                let m = std::hint::black_box(&table).lookup(std::hint::black_box(a));
                hits += m.len();
            }
        }
        let per = started.elapsed().as_nanos() as f64 / (rounds * addrs.len()) as f64;
        println!(
            "zone lookup, {kind:>8}: {prefixes:>6} prefixes, {:>6} ranges, build {build:?}, {per:.1} ns/lookup ({hits} zone hits)",
            table.range_count()
        );
    }
}
