//! The binder (`kernel_ext::binder::extract`) on hostile application objects.
//!
//! aya-obj 0.3, which parses the objects, panics on malformed ones (it trusts symbols,
//! `.BTF`, `.BTF.ext` and call relocations); kernel-ext's `elf_check` refuses those before
//! aya-obj sees them. This target is how that was found and how it stays true. See
//! docs/FUZZ.md.
//!
//! The first input byte picks a mode (bit 0); the rest is:
//! - 0: an ELF object, as is (scripts/fuzz.sh seeds the corpus with the example objects);
//! - 1: edits to a built-in example object (byte 1 picks it, then (u32 offset, xor byte)
//!   pairs), so that most inputs are nearly valid objects.
//!
//! Asserted: nothing panics; every refusal says why (a non-empty message, and the object
//! error behind it has one); and the code `extract` returns passes the independent
//! decoder of the `binder` target (common/binder_checks.rs).
#![no_main]

#[path = "common/binder_checks.rs"]
mod binder_checks;

use binder_checks::{assert_explained, escapes};
use kernel_ext::binder;
use libfuzzer_sys::fuzz_target;

fn check_object(elf: &[u8]) {
    match binder::extract(elf) {
        Ok(insns) => {
            if let Some(escape) = escapes(&insns) {
                panic!("the binder extracted code that escapes: instruction {escape}");
            }
        }
        Err(error) => assert_explained(&error, None),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        check_object(rest);
        return;
    }
    let Some((&which, edits)) = rest.split_first() else {
        return;
    };
    let examples = [
        kernel_ext::examples::BTREE,
        kernel_ext::examples::BTREE_C,
        kernel_ext::examples::HASH_CHAIN,
        kernel_ext::examples::LINKED_LIST,
    ];
    let mut elf = examples[usize::from(which) % examples.len()].to_vec();
    for edit in edits.chunks_exact(5) {
        let at = u32::from_le_bytes([edit[0], edit[1], edit[2], edit[3]]) as usize % elf.len();
        elf[at] ^= edit[4];
    }
    check_object(&elf);
});
