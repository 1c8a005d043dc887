use proptest::prelude::*;

use super::*;

const C: usize = CHUNK_SIZE;

fn key(byte: u8) -> SecretKey {
    SecretKey::from_bytes([byte; KEY_LEN])
}

/// Deterministic, non-repeating-looking bytes.
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn digest_of(bytes: &[u8]) -> [u8; DIGEST_LEN] {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).into()
}

fn file_key(generation_key: &SecretKey, plaintext: &[u8]) -> FileKey {
    let header = Header::new(Kind::Blob, 7, digest_of(plaintext)).unwrap();
    FileKey::derive(generation_key, &header)
}

/// Opens a sealed file the way the store does: parse the header, derive the key.
fn open(generation_key: &SecretKey, sealed: &[u8]) -> Result<Vec<u8>, FormatError> {
    let header = Header::parse(sealed)?;
    open_all(&FileKey::derive(generation_key, &header), sealed)
}

/// The plaintext bytes `[start, end)`, decrypting only the chunks they touch; also returns
/// how many chunks were opened.
fn read_range(
    generation_key: &SecretKey,
    sealed: &[u8],
    start: u64,
    end: u64,
) -> Result<(Vec<u8>, u64), FormatError> {
    let header = Header::parse(sealed)?;
    let key = FileKey::derive(generation_key, &header);
    let geometry = Geometry::of_file(sealed.len() as u64)?;
    let mut out = Vec::new();
    let mut opened = 0;
    if start >= end {
        return Ok((out, 0));
    }
    for index in Geometry::chunk_of(start)..=Geometry::chunk_of(end - 1) {
        let offset = Geometry::file_offset(index) as usize;
        let mut buf = sealed[offset..offset + geometry.chunk_len(index) + TAG_LEN].to_vec();
        let plain = key.open_chunk(index, geometry.is_last(index), &mut buf)?;
        opened += 1;
        let chunk_start = Geometry::plaintext_start(index);
        let from = start.saturating_sub(chunk_start) as usize;
        let to = (end - chunk_start).min(plain.len() as u64) as usize;
        out.extend_from_slice(&plain[from..to]);
    }
    Ok((out, opened))
}

#[test]
fn round_trips_at_the_chunk_edges_and_beyond() {
    let gk = key(1);
    for len in [0, 1, C - 1, C, C + 1, 2 * C, 3 * C + 5, (5 << 20) + 3] {
        let plain = data(len, len as u64);
        let fk = file_key(&gk, &plain);
        let sealed = seal_all(&fk, &plain);
        let geometry = Geometry::new(len as u64);
        assert_eq!(sealed.len() as u64, geometry.file_len(), "len {len}");
        assert_eq!(Geometry::of_file(sealed.len() as u64), Ok(geometry));
        assert_eq!(open(&gk, &sealed).unwrap(), plain, "len {len}");
        let header = Header::parse(&sealed).unwrap();
        assert_eq!(header.digest, digest_of(&plain));
        assert_eq!(header.generation, 7);
        assert_eq!(header.kind, Kind::Blob);
    }
}

#[test]
fn the_file_length_says_the_plaintext_length() {
    assert_eq!(Geometry::new(0).file_len(), (HEADER_LEN + TAG_LEN) as u64);
    assert_eq!(Geometry::new(C as u64).chunks(), 1);
    assert_eq!(Geometry::new(C as u64 + 1).chunks(), 2);
    for bad in [0, HEADER_LEN as u64, HEADER_LEN as u64 + 15] {
        assert_eq!(Geometry::of_file(bad), Err(FormatError::Length(bad)));
    }
    // A full chunk followed by an empty one is never written.
    let bad = (HEADER_LEN + SEALED_CHUNK + TAG_LEN) as u64;
    assert_eq!(Geometry::of_file(bad), Err(FormatError::Length(bad)));
}

#[test]
fn a_range_opens_only_the_chunks_it_touches() {
    let gk = key(2);
    let plain = data(10 * C + 123, 3);
    let sealed = seal_all(&file_key(&gk, &plain), &plain);
    let cases = [
        (0, 1, 1),
        (C as u64 - 1, C as u64 + 1, 2),
        (5 * C as u64 + 10, 5 * C as u64 + 20, 1),
        (10 * C as u64, plain.len() as u64, 1),
        (0, plain.len() as u64, 11),
    ];
    for (start, end, chunks) in cases {
        let (got, opened) = read_range(&gk, &sealed, start, end).unwrap();
        assert_eq!(got, plain[start as usize..end as usize]);
        assert_eq!(opened, chunks, "[{start}, {end})");
    }
}

#[test]
fn a_flipped_bit_anywhere_fails() {
    let gk = key(3);
    let plain = data(2 * C + 100, 4);
    let sealed = seal_all(&file_key(&gk, &plain), &plain);
    // In the header (the salt, the digest, the generation), in a chunk, in a tag.
    for pos in [
        12,
        20,
        HEADER_LEN - 1,
        HEADER_LEN,
        HEADER_LEN + C + 3,
        sealed.len() - 1,
    ] {
        let mut bad = sealed.clone();
        bad[pos] ^= 0x10;
        assert!(open(&gk, &bad).is_err(), "bit flipped at {pos}");
    }
    // Version, cipher, chunk size and kind are refused by name.
    for (pos, expect) in [
        (8, FormatError::Version(VERSION ^ 0x10)),
        (9, FormatError::Cipher(CIPHER_AES_256_GCM ^ 0x10)),
        (10, FormatError::ChunkSize(CHUNK_LOG2 ^ 0x10)),
        (11, FormatError::Kind(Kind::Blob as u8 ^ 0x10)),
    ] {
        let mut bad = sealed.clone();
        bad[pos] ^= 0x10;
        assert_eq!(Header::parse(&bad), Err(expect));
    }
    let mut bad = sealed.clone();
    bad[0] ^= 1;
    assert_eq!(open(&gk, &bad), Err(FormatError::BadMagic));
}

#[test]
fn swapped_chunks_fail() {
    let gk = key(4);
    let plain = data(3 * C, 5);
    let sealed = seal_all(&file_key(&gk, &plain), &plain);
    let mut bad = sealed.clone();
    let (a, b) = (
        Geometry::file_offset(0) as usize,
        Geometry::file_offset(1) as usize,
    );
    let (first, second) = (sealed[a..b].to_vec(), sealed[b..b + SEALED_CHUNK].to_vec());
    bad[a..b].copy_from_slice(&second);
    bad[b..b + SEALED_CHUNK].copy_from_slice(&first);
    assert_eq!(open(&gk, &bad), Err(FormatError::Authentication(0)));
    // Moving the last chunk forward (same length) fails too.
    let plain = data(2 * C, 6);
    let sealed = seal_all(&file_key(&gk, &plain), &plain);
    let mut bad = sealed.clone();
    bad[a..b].copy_from_slice(&sealed[b..]);
    bad[b..].copy_from_slice(&sealed[a..b]);
    assert!(open(&gk, &bad).is_err());
}

#[test]
fn truncation_fails_even_at_a_chunk_boundary() {
    let gk = key(5);
    let plain = data(3 * C + 77, 7);
    let sealed = seal_all(&file_key(&gk, &plain), &plain);
    // Dropping the whole last chunk leaves a valid-looking file of three full chunks whose
    // final chunk was sealed as "not last".
    let boundary = Geometry::file_offset(3) as usize;
    assert_eq!(
        Geometry::of_file(boundary as u64).map(|g| g.plaintext_len),
        Ok(3 * C as u64)
    );
    assert_eq!(
        open(&gk, &sealed[..boundary]),
        Err(FormatError::Authentication(2))
    );
    // Also when the plaintext was an exact number of chunks.
    let plain = data(2 * C, 8);
    let sealed = seal_all(&file_key(&gk, &plain), &plain);
    let boundary = Geometry::file_offset(1) as usize;
    assert_eq!(
        open(&gk, &sealed[..boundary]),
        Err(FormatError::Authentication(0))
    );
    // Inside a chunk, inside a tag, down to the header, and to nothing.
    for len in [
        sealed.len() - 1,
        sealed.len() - TAG_LEN,
        boundary + 20,
        HEADER_LEN,
        10,
        0,
    ] {
        assert!(open(&gk, &sealed[..len]).is_err(), "cut to {len}");
    }
    // Appending a chunk fails: the former last chunk is opened as "not last".
    let mut longer = sealed.clone();
    longer.extend_from_slice(&sealed[Geometry::file_offset(1) as usize..]);
    assert!(open(&gk, &longer).is_err());
}

#[test]
fn a_header_copied_from_another_blob_fails() {
    let gk = key(6);
    let a = data(C + 10, 9);
    let b = data(C + 10, 10);
    let sealed_a = seal_all(&file_key(&gk, &a), &a);
    let sealed_b = seal_all(&file_key(&gk, &b), &b);
    let mut forged = sealed_a.clone();
    forged[..HEADER_LEN].copy_from_slice(&sealed_b[..HEADER_LEN]);
    assert_eq!(open(&gk, &forged), Err(FormatError::Authentication(0)));
    // Even re-using a's salt under b's digest: the digest is associated data.
    let mut header = Header::parse(&sealed_a).unwrap();
    header.digest = digest_of(&b);
    forged[..HEADER_LEN].copy_from_slice(&header.encode());
    assert_eq!(open(&gk, &forged), Err(FormatError::Authentication(0)));
    // A manifest file cannot pass for the blob of the same digest.
    let mut header = Header::parse(&sealed_a).unwrap();
    header.kind = Kind::Manifest;
    forged[..HEADER_LEN].copy_from_slice(&header.encode());
    assert_eq!(open(&gk, &forged), Err(FormatError::Authentication(0)));
}

#[test]
fn the_wrong_generation_key_fails() {
    let plain = data(C + 1, 11);
    let sealed = seal_all(&file_key(&key(7), &plain), &plain);
    assert_eq!(open(&key(8), &sealed), Err(FormatError::Authentication(0)));
    // Another generation id in the header (with the right key) fails as well.
    let mut bad = sealed.clone();
    bad[15] ^= 1;
    assert!(open(&key(7), &bad).is_err());
}

#[test]
fn the_sealer_streams_what_seal_all_writes() {
    let gk = key(9);
    for len in [0, 5, C, C + 1, 4 * C] {
        let plain = data(len, 12);
        let fk = file_key(&gk, &plain);
        let whole = seal_all(&fk, &plain);
        let mut file = vec![0u8; Geometry::new(len as u64).file_len() as usize];
        let mut sealer = Sealer::new(fk.clone());
        file[..HEADER_LEN].copy_from_slice(sealer.header_bytes());
        let mut write = |offset: u64, bytes: &[u8]| {
            let at = offset as usize;
            file[at..at + bytes.len()].copy_from_slice(bytes);
            Ok::<(), ()>(())
        };
        // Uneven pieces, as a network delivers them.
        for piece in plain.chunks(7001) {
            sealer.push(piece, &mut write).unwrap();
        }
        // A full chunk is held back until a byte beyond it shows it is not the last.
        assert_eq!(
            sealer.sealed_plaintext(),
            (len.saturating_sub(1) / C * C) as u64
        );
        assert_eq!(sealer.finish(&mut write), Ok(len as u64));
        assert_eq!(file, whole, "len {len}");
    }
}

#[test]
fn keys_never_show_in_debug_output() {
    let gk = key(0xab);
    assert_eq!(format!("{gk:?}"), "SecretKey(<redacted>)");
    let fk = file_key(&gk, b"x");
    assert!(!format!("{fk:?}").contains("ab"));
}

#[test]
fn key_files_hold_raw_or_base64_bytes() {
    use base64::Engine as _;
    let raw = [7u8; KEY_LEN];
    assert_eq!(parse_key_material(&raw).unwrap().expose(), &raw);
    let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
    for text in [
        format!("{b64}\n"),
        format!("  {}\n", b64.trim_end_matches('=')),
    ] {
        assert_eq!(parse_key_material(text.as_bytes()).unwrap().expose(), &raw);
    }
    for bad in [&b"short"[..], &[7u8; 33][..], b"AAAA\n", b""] {
        assert!(parse_key_material(bad).is_err());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Any plaintext round-trips, any range reads back its bytes, and any single corrupted
    /// byte of the file makes the read that covers it fail.
    #[test]
    fn sealed_files_round_trip_and_reject_corruption(
        len in 0usize..(4 * C + 9),
        seed in any::<u64>(),
        a in any::<u64>(),
        b in any::<u64>(),
        at in any::<usize>(),
        flip in 1u8..=255,
    ) {
        let gk = key(seed as u8);
        let plain = data(len, seed);
        let sealed = seal_all(&file_key(&gk, &plain), &plain);
        prop_assert_eq!(open(&gk, &sealed).unwrap(), plain.clone());

        let (start, end) = if len == 0 { (0, 0) } else {
            let (x, y) = (a % len as u64, b % len as u64);
            (x.min(y), x.max(y) + 1)
        };
        let (got, _) = read_range(&gk, &sealed, start, end).unwrap();
        prop_assert_eq!(&got[..], &plain[start as usize..end as usize]);

        let pos = at % sealed.len();
        let mut bad = sealed.clone();
        bad[pos] ^= flip;
        prop_assert!(open(&gk, &bad).is_err());
        // A range read fails when it covers the damaged chunk (or the damage is in the header).
        if len > 0 && pos >= HEADER_LEN {
            let chunk = ((pos - HEADER_LEN) / SEALED_CHUNK) as u64;
            let from = Geometry::plaintext_start(chunk);
            prop_assert!(read_range(&gk, &bad, from, from + 1).is_err());
        }
    }
}

#[test]
fn a_stream_opens_chunk_by_chunk_in_any_pieces_and_refuses_damage() {
    let gk = key(3);
    for len in [0, 1, C - 1, C, C + 1, 3 * C + 17] {
        let plain = data(len, len as u64);
        let fk = file_key(&gk, &plain);
        let sealed = seal_all(&fk, &plain);
        let geometry = Geometry::of_file(sealed.len() as u64).unwrap();
        for piece in [1, 7, 4096, SEALED_CHUNK + 3, sealed.len()] {
            let mut opener = Opener::new(fk.clone(), geometry);
            let mut out = Vec::new();
            for part in sealed[HEADER_LEN..].chunks(piece) {
                opener.push(part, &mut out).unwrap();
            }
            assert!(opener.done(), "len {len}, pieces of {piece}");
            assert_eq!(out, plain, "len {len}, pieces of {piece}");
        }
        // A flipped bit fails the chunk it lands in; nothing of that chunk comes out.
        let mut bad = sealed.clone();
        let at = bad.len() - 1;
        bad[at] ^= 1;
        let mut opener = Opener::new(fk.clone(), geometry);
        let mut out = Vec::new();
        assert!(opener.push(&bad[HEADER_LEN..], &mut out).is_err());
        assert!(!opener.done());
        assert!(out.len() < plain.len() || plain.is_empty());
        // Bytes past the end are refused.
        let mut opener = Opener::new(fk, geometry);
        let mut longer = sealed[HEADER_LEN..].to_vec();
        longer.push(0);
        assert!(opener.push(&longer, &mut Vec::new()).is_err());
    }
}

#[test]
fn a_chunk_opens_to_the_front_of_its_buffer_and_fails_like_in_place() {
    let gk = key(4);
    let plain = data(2 * C + 5, 4);
    let fk = file_key(&gk, &plain);
    let sealed = seal_all(&fk, &plain);
    let geometry = Geometry::of_file(sealed.len() as u64).unwrap();
    for index in 0..geometry.chunks() {
        let start = Geometry::file_offset(index) as usize;
        let end = start + geometry.chunk_len(index) + TAG_LEN;
        for shift in [0, 16, 1000] {
            let mut buf = vec![0u8; shift];
            buf.extend_from_slice(&sealed[start..end]);
            let n = fk
                .open_chunk_to_front(index, geometry.is_last(index), &mut buf, shift)
                .unwrap();
            let from = Geometry::plaintext_start(index) as usize;
            assert_eq!(&buf[..n], &plain[from..from + n]);
            // The wrong position or last flag fails, as in place.
            let mut again = vec![0u8; shift];
            again.extend_from_slice(&sealed[start..end]);
            assert!(fk
                .open_chunk_to_front(index + 1, geometry.is_last(index), &mut again, shift)
                .is_err());
        }
    }
}
