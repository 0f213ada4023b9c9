//! The binder's allowlist (`kernel_ext::binder::check`) on hostile instruction streams.
//!
//! The first input byte picks a mode (bit 0); the rest is:
//! - 0: instructions (8 bytes each, little-endian);
//! - 1: edits to the code `extract` took from a built-in example object (byte 1 picks
//!   it, then (u16 index, u8 byte of the instruction, xor byte) triples), so that most
//!   inputs are nearly valid programs.
//!
//! Asserted: nothing panics; every refusal says why (a message naming the instruction's
//! index inside the code, the opcode it names is that instruction's, and a reason); and
//! whatever the binder accepts passes `escapes` (common/binder_checks.rs), an independent
//! decoder written from the BPF instruction set, not from the binder's helpers: no helper
//! call but bpf_loop, no kfunc call, no map or kernel-object reference (ld_imm64 with a
//! src_reg other than 0 or a function of the code itself), no user- or kernel-memory read
//! (legacy packet loads, load modes other than BPF_MEM / BPF_MEMSX), no tail call (a
//! helper), and no jump, call or function reference whose target lies outside the
//! accepted code. The objects themselves are the `binder_elf` target's.
#![no_main]

#[path = "common/binder_checks.rs"]
mod binder_checks;

use binder_checks::{assert_explained, escapes};
use kernel_ext::binder;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

/// The linked code of each built-in example, extracted once.
fn example_code() -> &'static Vec<Vec<u64>> {
    static CODE: OnceLock<Vec<Vec<u64>>> = OnceLock::new();
    CODE.get_or_init(|| {
        [
            kernel_ext::examples::BTREE,
            kernel_ext::examples::BTREE_C,
            kernel_ext::examples::HASH_CHAIN,
            kernel_ext::examples::LINKED_LIST,
        ]
        .iter()
        .map(|elf| binder::extract(elf).expect("the examples bind"))
        .collect()
    })
}

fn check_code(insns: &[u64]) {
    match binder::check(insns) {
        Ok(()) => {
            if let Some(escape) = escapes(insns) {
                panic!("the binder accepted code that escapes: instruction {escape}");
            }
        }
        Err(error) => assert_explained(&error, Some(insns)),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        let insns: Vec<u64> = rest
            .chunks_exact(8)
            .map(|chunk| u64::from_le_bytes(chunk.try_into().expect("8 bytes")))
            .collect();
        check_code(&insns);
    } else {
        let Some((&which, edits)) = rest.split_first() else {
            return;
        };
        let code = example_code();
        let mut insns = code[usize::from(which) % code.len()].clone();
        for edit in edits.chunks_exact(4) {
            let index = usize::from(u16::from_le_bytes([edit[0], edit[1]])) % insns.len();
            let shift = u32::from(edit[2] % 8) * 8;
            insns[index] ^= u64::from(edit[3]) << shift;
        }
        check_code(&insns);
    }
});
