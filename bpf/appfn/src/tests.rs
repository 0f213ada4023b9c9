//! The helpers on the host, against straightforward references.

use super::*;
use exofs_abi::chain::HopState;

/// A hop state whose data is `bytes`.
fn state_with(bytes: &[u8]) -> Box<HopState> {
    // SAFETY: HopState is plain integers and arrays: all zeros is a valid value.
    let mut state: Box<HopState> = Box::new(unsafe { core::mem::zeroed() });
    state.data[..bytes.len()].copy_from_slice(bytes);
    state.data_len = bytes.len() as u32;
    state
}

/// SQLite's varint encoding, written out the long way (the crate's encoder is tested
/// against it too).
fn sqlite_encode(value: u64) -> Vec<u8> {
    if value >> 56 != 0 {
        let mut out = vec![0u8; 9];
        out[8] = value as u8;
        let mut v = value >> 8;
        for i in (0..8).rev() {
            out[i] = (v & 0x7f) as u8 | 0x80;
            v >>= 7;
        }
        return out;
    }
    let mut groups = Vec::new();
    let mut v = value;
    loop {
        groups.push((v & 0x7f) as u8);
        v >>= 7;
        if v == 0 {
            break;
        }
    }
    groups.reverse();
    let last = groups.len() - 1;
    for g in &mut groups[..last] {
        *g |= 0x80;
    }
    groups
}

fn leb128_encode(mut value: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

#[test]
fn the_encoders_agree_with_the_long_way() {
    for value in samples() {
        let (bytes, len) = encode::sqlite_varint(value);
        assert_eq!(bytes[..len], sqlite_encode(value)[..], "{value}");
        let (bytes, len) = encode::leb128(value);
        assert_eq!(bytes[..len], leb128_encode(value)[..], "{value}");
    }
}

/// Values around every length boundary of both encodings.
fn samples() -> Vec<u64> {
    let mut values = vec![0, 1, 127, 128, 240, 2287, 67823, u64::MAX];
    for shift in 1..64 {
        let edge = 1u64 << shift;
        values.extend([edge - 1, edge, edge + 1]);
    }
    values
}

#[test]
fn varints_decode_what_the_reference_encoders_wrote_at_any_offset() {
    for value in samples() {
        for (encoded, decode) in [
            (
                sqlite_encode(value),
                sqlite_varint as fn(&mut HopState, usize) -> Option<(u64, usize)>,
            ),
            (leb128_encode(value), leb128),
        ] {
            for at in [0usize, 1, 4093 - encoded.len()] {
                let mut bytes = vec![0xAAu8; at];
                bytes.extend_from_slice(&encoded);
                let mut state = state_with(&bytes);
                assert_eq!(
                    decode(&mut state, at),
                    Some((value, encoded.len())),
                    "{value} at {at}"
                );
                // Cut one byte short: the varint runs past the data.
                state.data_len -= 1;
                assert_eq!(decode(&mut state, at), None, "{value} cut short");
            }
        }
    }
}

#[test]
fn a_leb128_past_64_bits_is_refused() {
    let mut state = state_with(&[0xff; 10]);
    assert_eq!(leb128(&mut state, 0), None);
    let mut state = state_with(&[0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x02]);
    assert_eq!(leb128(&mut state, 0), None);
}

#[test]
fn integers_read_both_ways_and_never_past_the_data() {
    let bytes: Vec<u8> = (1..=16).collect();
    let state = state_with(&bytes);
    assert_eq!(be16(&state, 0), Some(0x0102));
    assert_eq!(le16(&state, 0), Some(0x0201));
    assert_eq!(be32(&state, 1), Some(0x0203_0405));
    assert_eq!(le32(&state, 1), Some(0x0504_0302));
    assert_eq!(be64(&state, 8), Some(0x090a_0b0c_0d0e_0f10));
    assert_eq!(le64(&state, 8), Some(0x100f_0e0d_0c0b_0a09));
    assert_eq!(be_var(&state, 2, 3), Some(0x03_0405));
    assert_eq!(be_var(&state, 2, 0), Some(0));
    assert_eq!(be64(&state, 9), None, "one byte past data_len");
    assert_eq!(be_var(&state, 0, 9), None, "more than 8 bytes");
    assert_eq!(byte(&state, 15), Some(16));
    assert_eq!(byte(&state, 16), None);
    assert_eq!(byte(&state, usize::MAX), None);
    // Positions near the block's end and past it.
    let state = state_with(&[7u8; BLOCK_SIZE]);
    assert_eq!(be16(&state, BLOCK_SIZE - 2), Some(0x0707));
    assert_eq!(be16(&state, BLOCK_SIZE - 1), None);
    assert_eq!(le64(&state, usize::MAX - 3), None);
}

#[test]
fn partition_point_agrees_with_the_slices_at_every_size() {
    for count in [0usize, 1, 2, 3, 7, 8, 255, 681, 2048, 4095, 4096] {
        // Keys 0, 2, 4, ... as big-endian u16 entries is too small for 4096 entries of
        // a 4 KiB block: the keys are computed from the index instead, as a caller's
        // closure may.
        let keys: Vec<u64> = (0..count as u64).map(|i| i * 2).collect();
        for sought in [0u64, 1, 2, 5, count as u64, 2 * count as u64, u64::MAX] {
            let mut state = state_with(&[]);
            let found = partition_point(&mut state, count as u32, |_, i| {
                Some(keys[i as usize] < sought)
            });
            assert_eq!(
                found,
                Some(keys.partition_point(|&k| k < sought) as u32),
                "{sought} among {count}"
            );
        }
    }
    let mut state = state_with(&[]);
    assert_eq!(partition_point(&mut state, 4097, |_, _| Some(true)), None);
    assert_eq!(
        partition_point(&mut state, 10, |_, i| (i < 5).then_some(true)),
        None
    );
}

#[test]
fn repeat_stops_when_the_body_says_so() {
    let mut state = state_with(&[]);
    let mut seen = Vec::new();
    let ran = repeat(&mut state, 10, &mut |_, i| {
        seen.push(i);
        i < 3
    });
    assert_eq!((ran, seen), (4, vec![0, 1, 2, 3]));
    assert_eq!(opaque(&mut state, 42), 42);
}
