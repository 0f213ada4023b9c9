//! The chain ioctls' requests (`exofs_abi::ioctl`) decoded and checked: the part of the
//! daemon's chain service that needs neither the policy nor the kernel binding.
//!
//! Layer: mount-tool library, below the daemon's chain service (`chains.rs`), which calls
//! [`decode_chain`] / [`decode_batch`] on the bytes FUSE hands it before it consults the
//! policy; the `ioctl` fuzz target calls them on arbitrary bytes.
//!
//! Invariants: a decoded request has exactly the struct's size, a program name of 1-63
//! characters of `[A-Za-z0-9_-]` (NUL-terminated in its 64-byte field), a hop limit in
//! 0..=MAX_HOPS (0: as many as the caller's grant allows), a read length in
//! 1..=BLOCK_SIZE and, for a batch, a count in 1..=MAX_BATCH. Anything else is a
//! [`Refusal`] with EINVAL whose reason names the field.

use exofs_abi::chain::{BLOCK_SIZE, MAX_BATCH, MAX_HOPS};
use exofs_abi::ioctl::{self, BatchIoctl, ChainIoctl, DirectIoctl};

/// A refused request: the errno for the caller and what to log.
#[derive(Debug)]
pub struct Refusal {
    pub errno: i32,
    pub reason: String,
}

impl Refusal {
    /// A refusal with `errno` for the caller and `reason` for the log.
    pub fn new(errno: i32, reason: impl Into<String>) -> Self {
        Self {
            errno,
            reason: reason.into(),
        }
    }
}

/// An `IOC_CHAIN` request that passed [`decode_chain`].
#[derive(Debug, Clone)]
pub struct ChainCall {
    /// The request as sent (answered by writing status, hops and scratch into it).
    pub request: ChainIoctl,
    /// Its program name.
    pub program: String,
}

/// An `IOC_CHAIN_BATCH` request that passed [`decode_batch`].
#[derive(Debug, Clone)]
pub struct BatchCall {
    /// The request as sent.
    pub request: BatchIoctl,
    /// Its program name.
    pub program: String,
    /// Lookups in `request.lookups` (1..=MAX_BATCH).
    pub count: usize,
}

/// Decodes and checks an `IOC_DIRECT` request: the struct and its program name.
pub fn decode_direct(input: &[u8]) -> Result<(DirectIoctl, String), Refusal> {
    let request: DirectIoctl = read_struct(input)?;
    let program = program_of(&request.program)?;
    Ok((request, program))
}

/// Decodes and checks an `IOC_CHAIN` request.
pub fn decode_chain(input: &[u8]) -> Result<ChainCall, Refusal> {
    let request: ChainIoctl = read_struct(input)?;
    let program = program_of(&request.program)?;
    check_limits(request.hop_limit, request.read_len)?;
    Ok(ChainCall { request, program })
}

/// Decodes and checks an `IOC_CHAIN_BATCH` request.
pub fn decode_batch(input: &[u8]) -> Result<BatchCall, Refusal> {
    let request: BatchIoctl = read_struct(input)?;
    let program = program_of(&request.program)?;
    check_limits(request.hop_limit, request.read_len)?;
    let count = request.count as usize;
    if count == 0 || count > MAX_BATCH {
        return Err(Refusal::new(
            libc::EINVAL,
            format!("a batch of {count} lookups; send 1..={MAX_BATCH}"),
        ));
    }
    Ok(BatchCall {
        request,
        program,
        count,
    })
}

fn check_limits(hop_limit: u32, read_len: u32) -> Result<(), Refusal> {
    if hop_limit > MAX_HOPS {
        return Err(Refusal::new(
            libc::EINVAL,
            format!("hop_limit {hop_limit}; use 1..={MAX_HOPS}, or 0 for the grant's"),
        ));
    }
    if !(1..=BLOCK_SIZE as u32).contains(&read_len) {
        return Err(Refusal::new(
            libc::EINVAL,
            format!("read_len {read_len}; use 1..={BLOCK_SIZE}"),
        ));
    }
    Ok(())
}

fn program_of(field: &[u8; ioctl::PROGRAM_NAME_SIZE]) -> Result<String, Refusal> {
    let name = ioctl::program_name(field).ok_or_else(|| {
        Refusal::new(libc::EINVAL, "the program name is not NUL-terminated UTF-8")
    })?;
    if !ioctl::is_valid_program_name(name) {
        return Err(Refusal::new(
            libc::EINVAL,
            format!("the program name `{name}` is not 1-63 characters of [A-Za-z0-9_-]"),
        ));
    }
    Ok(name.to_owned())
}

/// A request struct from the ioctl's input, which FUSE sized from the ioctl number.
fn read_struct<T: aya::Pod>(input: &[u8]) -> Result<T, Refusal> {
    exofs_abi::bytes::read(input).ok_or_else(|| {
        Refusal::new(
            libc::EINVAL,
            format!(
                "{} bytes of request; expected {}",
                input.len(),
                std::mem::size_of::<T>()
            ),
        )
    })
}

/// The bytes of a request struct.
pub fn struct_bytes<T: aya::Pod>(value: &T) -> Vec<u8> {
    exofs_abi::bytes::of(value).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain_bytes(name: &str, hop_limit: u32, read_len: u32) -> Vec<u8> {
        let request = ChainIoctl {
            program: ioctl::program_field(name).expect("fits"),
            hop_limit,
            read_len,
            ..ChainIoctl::default()
        };
        struct_bytes(&request)
    }

    fn refusal(result: Result<ChainCall, Refusal>) -> Refusal {
        match result {
            Ok(call) => panic!("expected a refusal, got {call:?}"),
            Err(refusal) => refusal,
        }
    }

    #[test]
    fn good_requests_decode() {
        let call = decode_chain(&chain_bytes("btree", 0, 4096)).expect("valid");
        assert_eq!(call.program, "btree");
        let request = BatchIoctl {
            program: ioctl::program_field("hash_chain").expect("fits"),
            hop_limit: 64,
            read_len: 1,
            count: 32,
            ..BatchIoctl::default()
        };
        let call = decode_batch(&struct_bytes(&request)).expect("valid");
        assert_eq!((call.program.as_str(), call.count), ("hash_chain", 32));
    }

    #[test]
    fn malformed_requests_name_the_field() {
        for (bytes, field) in [
            (vec![0u8; 3], "bytes of request"),
            (chain_bytes("", 1, 1), "name ``"),
            (chain_bytes("a b", 1, 1), "`a b`"),
            (chain_bytes("btree", 65, 1), "hop_limit 65"),
            (chain_bytes("btree", 1, 0), "read_len 0"),
            (chain_bytes("btree", 1, 4097), "read_len 4097"),
        ] {
            let refusal = refusal(decode_chain(&bytes));
            assert_eq!(refusal.errno, libc::EINVAL);
            assert!(
                refusal.reason.contains(field),
                "{field}: {}",
                refusal.reason
            );
        }
        let unterminated = ChainIoctl {
            program: [b'a'; ioctl::PROGRAM_NAME_SIZE],
            read_len: 1,
            ..ChainIoctl::default()
        };
        let refusal = refusal(decode_chain(&struct_bytes(&unterminated)));
        assert!(refusal.reason.contains("NUL"), "{}", refusal.reason);
        let empty_batch = BatchIoctl {
            program: ioctl::program_field("btree").expect("fits"),
            read_len: 1,
            ..BatchIoctl::default()
        };
        let refusal = decode_batch(&struct_bytes(&empty_batch)).expect_err("count 0");
        assert!(
            refusal.reason.contains("a batch of 0"),
            "{}",
            refusal.reason
        );
    }
}
