//! The chain ioctls' request decoding (`mount_tool::request`, what the mount daemon runs on
//! every IOC_CHAIN / IOC_CHAIN_BATCH before it consults the policy) on arbitrary bytes.
//!
//! The first input byte picks the request (bit 0: batch) and whether the rest is cut or
//! zero-padded to the struct's exact size (bit 1), so that most inputs get past the size.
//!
//! Asserted: nothing panics; the verdict agrees with an independent reading of the bytes
//! at the ABI's documented offsets (size, NUL-terminated name of 1-63 characters of
//! `[A-Za-z0-9_-]`, hop limit 0..=MAX_HOPS, read length 1..=BLOCK_SIZE, batch count
//! 1..=MAX_BATCH); a refusal is EINVAL with a reason that names one of the fields found
//! wrong; an accepted request satisfies every limit and carries exactly the bytes sent.
#![no_main]

use exofs_abi::chain::{BLOCK_SIZE, MAX_BATCH, MAX_HOPS};
use exofs_abi::ioctl::{BatchIoctl, ChainIoctl};
use libfuzzer_sys::fuzz_target;
use mount_tool::request::{decode_batch, decode_chain, struct_bytes, Refusal};

const NAME_FIELD: usize = 64;

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// What is wrong with `bytes` as a request of `size` bytes whose hop limit, read length
/// and (for a batch) count are at the given offsets: the words a refusal's reason may
/// use to name each fault.
fn faults(
    bytes: &[u8],
    size: usize,
    hop_at: usize,
    read_at: usize,
    count_at: Option<usize>,
) -> Vec<&'static str> {
    if bytes.len() != size {
        return vec!["bytes of request"];
    }
    let mut faults = Vec::new();
    match bytes[..NAME_FIELD].iter().position(|&byte| byte == 0) {
        None => faults.push("program name"),
        Some(end) => {
            let name = &bytes[..end];
            let valid = !name.is_empty()
                && name
                    .iter()
                    .all(|byte| byte.is_ascii_alphanumeric() || *byte == b'_' || *byte == b'-');
            if !valid {
                faults.push("program name");
            }
        }
    }
    if u32_at(bytes, hop_at) > MAX_HOPS {
        faults.push("hop_limit");
    }
    if !(1..=BLOCK_SIZE as u32).contains(&u32_at(bytes, read_at)) {
        faults.push("read_len");
    }
    if let Some(at) = count_at {
        if !(1..=MAX_BATCH as u32).contains(&u32_at(bytes, at)) {
            faults.push("a batch of");
        }
    }
    faults
}

fn assert_refusal(refusal: &Refusal, faults: &[&str], bytes: &[u8]) {
    assert_eq!(refusal.errno, libc::EINVAL, "{refusal:?}");
    assert!(
        !refusal.reason.trim().is_empty(),
        "a refusal without a reason"
    );
    assert!(
        !faults.is_empty(),
        "refused a valid request ({refusal:?}): {bytes:?}"
    );
    assert!(
        faults.iter().any(|fault| refusal.reason.contains(fault)),
        "the reason `{}` names none of {faults:?}",
        refusal.reason
    );
}

fn assert_name(program: &str, field: &[u8]) {
    assert!(
        (1..NAME_FIELD).contains(&program.len())
            && program
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-'),
        "accepted program name {program:?}"
    );
    assert_eq!(program.as_bytes(), &field[..program.len()]);
    assert_eq!(field[program.len()], 0);
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let batch = mode & 1 == 1;
    let size = if batch {
        std::mem::size_of::<BatchIoctl>()
    } else {
        std::mem::size_of::<ChainIoctl>()
    };
    let mut bytes = rest.to_vec();
    if mode & 2 == 2 {
        bytes.resize(size, 0);
    }
    if batch {
        // program[64], hop_limit u32 @64, read_len u32 @68, count u32 @72.
        let faults = faults(&bytes, size, 64, 68, Some(72));
        match decode_batch(&bytes) {
            Ok(call) => {
                assert!(faults.is_empty(), "accepted a request with {faults:?}");
                assert!(
                    (1..=MAX_BATCH).contains(&call.count),
                    "count {}",
                    call.count
                );
                assert_eq!(call.count, call.request.count as usize);
                assert!(call.request.hop_limit <= MAX_HOPS);
                assert!((1..=BLOCK_SIZE as u32).contains(&call.request.read_len));
                assert_name(&call.program, &call.request.program);
                assert_eq!(
                    struct_bytes(&call.request),
                    bytes,
                    "the request is the bytes sent"
                );
            }
            Err(refusal) => assert_refusal(&refusal, &faults, &bytes),
        }
    } else {
        // program[64], start u64 @64, hop_limit u32 @72, read_len u32 @76.
        let faults = faults(&bytes, size, 72, 76, None);
        match decode_chain(&bytes) {
            Ok(call) => {
                assert!(faults.is_empty(), "accepted a request with {faults:?}");
                assert!(call.request.hop_limit <= MAX_HOPS);
                assert!((1..=BLOCK_SIZE as u32).contains(&call.request.read_len));
                assert_name(&call.program, &call.request.program);
                assert_eq!(
                    struct_bytes(&call.request),
                    bytes,
                    "the request is the bytes sent"
                );
            }
            Err(refusal) => assert_refusal(&refusal, &faults, &bytes),
        }
    }
});
