//! `ZoneTable`: source address -> network zones, by longest-prefix match (issue 5, item 1).
//!
//! Owns: classifying an address into the `[zones]` of the config. Must never: do I/O, or treat
//! an IPv4-mapped IPv6 source (`::ffff:192.0.2.7`, what a dual-stack socket reports for an IPv4
//! client) differently from the IPv4 address it carries.
//!
//! # Structure: disjoint ranges, found by binary search
//!
//! Every prefix is an interval of the address space. At build time the intervals of all zones
//! are swept once into a sorted list of *disjoint* ranges (one list for IPv4 keyed by `u32`, one
//! for IPv6 keyed by `u128`), and each range is labelled with what is true everywhere inside it:
//! the set of zones that contain it and the zone of the longest prefix covering it. A lookup is
//! one `partition_point` (binary search) over the range starts plus an index into the labels:
//! O(log n), about 15 comparisons at 10,000 prefixes, no hashing and no allocation.
//!
//! Why not per-prefix-length hash maps: a source can be in several zones (overlapping zones of
//! different names), and [`ZoneTable::lookup`] must report *all* of them, not only the longest
//! match. With hash maps that means one masked probe for every prefix length present (up to 33
//! for IPv4, 129 for IPv6) on every lookup; with the sweep the answer is precomputed per range.
//! The cost moves to build time (a sort of 2n events), which happens once per config load.
//! At most 2n + 1 ranges exist for n prefixes; adjacent ranges with equal labels are merged.
//!
//! # Overlapping zones
//!
//! A source belongs to every zone that has a prefix containing it. A registry with
//! `network_access = "selected"` accepts the source if *any* of those zones is listed in its
//! `zones` ([`ZoneMatch::any_of`]). [`ZoneMatch::best`] names the zone of the longest matching
//! prefix, for log lines and bounded metric labels; when two zones hold the same longest prefix,
//! the one listed first in `&[Zone]` wins (the validated config lists zones sorted by name).
//!
//! IPv6 prefixes inside `::ffff:0:0/96` with a length of at least 96 are IPv4 prefixes written
//! the mapped way and are stored as IPv4. Shorter IPv6 prefixes (`::/0`, `::/8`, ...) do not
//! cover IPv4 sources: IPv4 and IPv6 are classified separately.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net};

use crate::config::Zone;

/// Label index meaning "no zone contains this range".
const NO_LABEL: u32 = u32::MAX;

/// Source address -> zones, built once from the validated `[zones]`.
pub struct ZoneTable {
    /// Zone names by id, in the order first seen in `&[Zone]`.
    names: Vec<String>,
    /// Zone-id sets of all labels, back to back; each label owns a slice.
    members: Vec<u32>,
    labels: Vec<Label>,
    v4: Ranges<u32>,
    v6: Ranges<u128>,
    prefixes: usize,
}

/// What holds everywhere inside one range.
struct Label {
    /// Zone of the longest covering prefix.
    best: u32,
    /// `members[start..start + len]`: every zone covering the range, ascending ids.
    start: u32,
    len: u32,
}

/// Disjoint ranges: range `i` is `starts[i]..starts[i + 1]` (the last one runs to the end of
/// the address space). `starts[0]` is always 0, so every address falls in exactly one range.
struct Ranges<K> {
    starts: Vec<K>,
    labels: Vec<u32>,
}

impl<K: Copy + Ord> Ranges<K> {
    fn find(&self, key: K) -> u32 {
        // starts[0] == 0 <= key, so the partition point is at least 1.
        let i = self.starts.partition_point(|&s| s <= key);
        self.labels[i - 1]
    }
}

/// One prefix as an inclusive interval, for the build sweep.
struct Interval {
    first: u128,
    last: u128,
    len: u8,
    zone: u32,
}

impl ZoneTable {
    /// Builds the table. Duplicate zone names are merged into one zone.
    pub fn new(zones: &[Zone]) -> ZoneTable {
        let mut names: Vec<String> = Vec::new();
        let mut ids: HashMap<&str, u32> = HashMap::new();
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        let mut prefixes = 0;
        for zone in zones {
            let id = *ids.entry(zone.name.as_str()).or_insert_with(|| {
                names.push(zone.name.clone());
                (names.len() - 1) as u32
            });
            for net in &zone.nets {
                prefixes += 1;
                match canonical_net(*net) {
                    IpNet::V4(n) => v4.push(Interval {
                        first: u32::from(n.network()).into(),
                        last: u32::from(n.broadcast()).into(),
                        len: n.prefix_len(),
                        zone: id,
                    }),
                    IpNet::V6(n) => v6.push(Interval {
                        first: u128::from(n.network()),
                        last: u128::from(n.broadcast()),
                        len: n.prefix_len(),
                        zone: id,
                    }),
                }
            }
        }
        let mut labels = Labeller::default();
        let (starts, v4_labels) = sweep(v4, u32::MAX.into(), &mut labels);
        let v4 = Ranges {
            // Every start came from a u32 (or is 0), so the conversion cannot fail.
            starts: starts.into_iter().map(|s| s as u32).collect(),
            labels: v4_labels,
        };
        let (starts, v6_labels) = sweep(v6, u128::MAX, &mut labels);
        let v6 = Ranges {
            starts,
            labels: v6_labels,
        };
        ZoneTable {
            names,
            members: labels.members,
            labels: labels.labels,
            v4,
            v6,
            prefixes,
        }
    }

    /// Every zone containing `ip`, and the longest match.
    pub fn lookup(&self, ip: IpAddr) -> ZoneMatch<'_> {
        let label = match ip.to_canonical() {
            IpAddr::V4(a) => self.v4.find(u32::from(a)),
            IpAddr::V6(a) => self.v6.find(u128::from(a)),
        };
        if label == NO_LABEL {
            return ZoneMatch::NONE;
        }
        let label = &self.labels[label as usize];
        let start = label.start as usize;
        ZoneMatch {
            names: &self.names,
            ids: &self.members[start..start + label.len as usize],
            best: Some(label.best),
        }
    }

    /// The names of every zone containing `ip`, ascending by zone order in the config.
    pub fn zones_of(&self, ip: IpAddr) -> impl Iterator<Item = &str> + '_ {
        self.lookup(ip).iter()
    }

    /// The zone of the longest prefix containing `ip`: for logs and metric labels.
    pub fn best(&self, ip: IpAddr) -> Option<&str> {
        self.lookup(ip).best()
    }

    /// Number of prefixes the table was built from.
    pub fn prefix_count(&self) -> usize {
        self.prefixes
    }

    /// Number of disjoint ranges (IPv4 + IPv6) the lookups search.
    pub fn range_count(&self) -> usize {
        self.v4.starts.len() + self.v6.starts.len()
    }
}

impl fmt::Debug for ZoneTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZoneTable")
            .field("zones", &self.names)
            .field("prefixes", &self.prefixes)
            .field("ranges", &self.range_count())
            .finish()
    }
}

/// Interns labels so that ranges with the same zones share one.
#[derive(Default)]
struct Labeller {
    members: Vec<u32>,
    labels: Vec<Label>,
    /// `[best, zone ids...]` -> label.
    index: HashMap<Vec<u32>, u32>,
    scratch: Vec<u32>,
}

impl Labeller {
    /// The label of what is active at a point.
    fn label(&mut self, active: &Active) -> u32 {
        // Longest prefix first; among equal lengths the smallest zone id (listed first).
        let Some(&(_, Reverse(best))) = active.prefixes.keys().next_back() else {
            return NO_LABEL;
        };
        self.scratch.clear();
        self.scratch.push(best);
        self.scratch.extend(active.zones.keys());
        if let Some(&id) = self.index.get(self.scratch.as_slice()) {
            return id;
        }
        let id = self.labels.len() as u32;
        self.labels.push(Label {
            best,
            start: self.members.len() as u32,
            len: active.zones.len() as u32,
        });
        self.members.extend_from_slice(&self.scratch[1..]);
        self.index.insert(self.scratch.clone(), id);
        id
    }
}

/// The prefixes covering the current sweep point, counted, and the zones they belong to.
#[derive(Default)]
struct Active {
    /// (length, reversed zone id) -> how many identical prefixes.
    prefixes: BTreeMap<(u8, Reverse<u32>), u32>,
    /// zone id -> how many covering prefixes (ascending ids: the label's member set).
    zones: BTreeMap<u32, u32>,
}

impl Active {
    fn open(&mut self, len: u8, zone: u32) {
        *self.prefixes.entry((len, Reverse(zone))).or_insert(0) += 1;
        *self.zones.entry(zone).or_insert(0) += 1;
    }

    fn close(&mut self, len: u8, zone: u32) {
        decrement(&mut self.prefixes, (len, Reverse(zone)));
        decrement(&mut self.zones, zone);
    }
}

fn decrement<K: Ord>(map: &mut BTreeMap<K, u32>, key: K) {
    if let Some(count) = map.get_mut(&key) {
        *count -= 1;
        if *count == 0 {
            map.remove(&key);
        }
    }
}

/// Sweeps the intervals of one family into disjoint labelled ranges. `max` is the last address
/// of the family, so that an interval ending there opens no range beyond it.
fn sweep(intervals: Vec<Interval>, max: u128, labeller: &mut Labeller) -> (Vec<u128>, Vec<u32>) {
    // (point, -1 closes / +1 opens, length, zone). All events of a point are applied before
    // the point's label is taken, so their order within a point does not matter.
    let mut events: Vec<(u128, i8, u8, u32)> = Vec::with_capacity(intervals.len() * 2);
    for iv in intervals {
        events.push((iv.first, 1, iv.len, iv.zone));
        if iv.last < max {
            events.push((iv.last + 1, -1, iv.len, iv.zone));
        }
    }
    events.sort_unstable();

    let mut starts = vec![0u128];
    let mut labels = vec![NO_LABEL];
    let mut active = Active::default();
    let mut i = 0;
    while i < events.len() {
        let point = events[i].0;
        while let Some(&(p, delta, len, zone)) = events.get(i) {
            if p != point {
                break;
            }
            if delta > 0 {
                active.open(len, zone);
            } else {
                active.close(len, zone);
            }
            i += 1;
        }
        let label = labeller.label(&active);
        if point == 0 {
            labels[0] = label;
        } else if labels.last() != Some(&label) {
            starts.push(point);
            labels.push(label);
        }
    }
    (starts, labels)
}

/// An IPv6 prefix of at least 96 bits inside `::ffff:0:0/96` is an IPv4 prefix written the
/// mapped way: return it as IPv4. Host bits are cleared either way.
pub(super) fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V4(n) => IpNet::V4(n.trunc()),
        IpNet::V6(n) => {
            let n = n.trunc();
            match n.network().to_ipv4_mapped() {
                Some(v4) if n.prefix_len() >= 96 => {
                    // Lengths 96..=128 map to 0..=32, always valid.
                    Ipv4Net::new(v4, n.prefix_len() - 96)
                        .map(IpNet::V4)
                        .unwrap_or(IpNet::V6(n))
                }
                _ => IpNet::V6(n),
            }
        }
    }
}

/// The zones a source is in. Cheap to copy; borrows the table.
#[derive(Clone, Copy)]
pub struct ZoneMatch<'a> {
    names: &'a [String],
    ids: &'a [u32],
    best: Option<u32>,
}

impl<'a> ZoneMatch<'a> {
    /// A source in no zone.
    pub const NONE: ZoneMatch<'static> = ZoneMatch {
        names: &[],
        ids: &[],
        best: None,
    };

    /// The zone of the longest matching prefix.
    pub fn best(&self) -> Option<&'a str> {
        self.best.map(|id| self.names[id as usize].as_str())
    }

    /// Every zone containing the source.
    pub fn iter(&self) -> impl Iterator<Item = &'a str> + 'a {
        let names = self.names;
        self.ids.iter().map(move |&id| names[id as usize].as_str())
    }

    pub fn contains(&self, zone: &str) -> bool {
        self.iter().any(|z| z == zone)
    }

    /// The first zone of `allowed` that contains the source: the `selected` check.
    pub fn any_of<'b>(&self, allowed: &'b [String]) -> Option<&'b str> {
        allowed
            .iter()
            .map(String::as_str)
            .find(|z| self.contains(z))
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }
}

impl fmt::Debug for ZoneMatch<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZoneMatch")
            .field("best", &self.best())
            .field("zones", &self.iter().collect::<Vec<_>>())
            .finish()
    }
}

impl fmt::Display for ZoneMatch<'_> {
    /// `zone vpc`, `zones vpc, build` or `no zone`, for reasons and logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ids.len() {
            0 => f.write_str("no zone"),
            1 => write!(f, "zone {}", self.names[self.ids[0] as usize]),
            _ => {
                f.write_str("zones ")?;
                for (i, z) in self.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    f.write_str(z)?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests;
