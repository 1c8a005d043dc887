//! The `Range` header of a blob GET, for answers pullgate writes itself (cache hits and fills).
//!
//! One range only (registries and their clients use one); anything else gets the whole blob, as
//! RFC 9110 allows. Pure functions, tested without a server.

/// What to send for a `Range` header against a blob of `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAnswer {
    /// 200 with the whole blob.
    Full,
    /// 206 with bytes `[start, end)`.
    Partial { start: u64, end: u64 },
    /// 416 with `Content-Range: bytes */len`.
    Unsatisfiable,
}

/// Decide the answer for `header` (the raw `Range` value, if any). Malformed or multi-range
/// headers are ignored (whole blob), as RFC 9110 permits.
pub fn answer(header: Option<&str>, len: u64) -> RangeAnswer {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return RangeAnswer::Full;
    };
    if spec.contains(',') {
        return RangeAnswer::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeAnswer::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    let parse = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (first.is_empty(), parse(first), parse(last)) {
        // bytes=-N: the last N bytes.
        (true, _, Some(n)) => {
            if n == 0 || len == 0 {
                RangeAnswer::Unsatisfiable
            } else {
                RangeAnswer::Partial {
                    start: len.saturating_sub(n),
                    end: len,
                }
            }
        }
        (false, Some(start), last_pos) if last.is_empty() || last_pos.is_some() => {
            if start >= len {
                return RangeAnswer::Unsatisfiable;
            }
            let end = match last_pos {
                Some(l) if l < start => return RangeAnswer::Full,
                Some(l) => l.saturating_add(1).min(len),
                None => len,
            };
            RangeAnswer::Partial { start, end }
        }
        _ => RangeAnswer::Full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RangeAnswer::*;

    #[test]
    fn single_ranges() {
        let cases: &[(Option<&str>, u64, RangeAnswer)] = &[
            (None, 10, Full),
            (Some("bytes=0-4"), 10, Partial { start: 0, end: 5 }),
            (Some("bytes=6-"), 10, Partial { start: 6, end: 10 }),
            (Some("bytes=-3"), 10, Partial { start: 7, end: 10 }),
            (Some("bytes=-30"), 10, Partial { start: 0, end: 10 }),
            (Some("bytes=5-100"), 10, Partial { start: 5, end: 10 }),
            (Some("bytes=9-9"), 10, Partial { start: 9, end: 10 }),
            (Some("bytes=10-"), 10, Unsatisfiable),
            (Some("bytes=100-200"), 10, Unsatisfiable),
            (Some("bytes=-0"), 10, Unsatisfiable),
            (Some("bytes=0-"), 0, Unsatisfiable),
        ];
        for (header, len, want) in cases {
            assert_eq!(answer(*header, *len), *want, "{header:?} of {len}");
        }
    }

    #[test]
    fn malformed_and_multi_ranges_get_the_whole_blob() {
        for h in [
            "bytes=0-1,3-4",
            "items=0-1",
            "bytes=abc",
            "bytes=5-2",
            "bytes=-",
            "bytes=1-2-3",
            "bytes= +1-2",
            "bytes=18446744073709551616-",
            "",
        ] {
            assert_eq!(answer(Some(h), 10), Full, "{h:?}");
        }
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 4096, failure_persistence: None, ..ProptestConfig::default() })]

        /// Any header, any length: no panic, and a partial answer lies inside the blob.
        #[test]
        fn answers_stay_inside_the_blob(
            header in prop_oneof![
                "\\PC{0,40}",
                "bytes=[0-9]{0,21}-[0-9]{0,21}",
                "bytes= ?-?[0-9]{0,20} ?- ?[0-9]{0,20}(,[0-9]{1,3}-[0-9]{0,3})?",
            ],
            len in prop_oneof![Just(0u64), 0u64..1_000_000, Just(u64::MAX)],
        ) {
            if let RangeAnswer::Partial { start, end } = answer(Some(&header), len) {
                prop_assert!(start < end && end <= len, "{header:?} on {len}: {start}..{end}");
            }
        }
    }
}
