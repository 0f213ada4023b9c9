//! The hot-block table (`exofs_abi::hot`): copies of device blocks that the mount daemon
//! keeps in map values, so that a direct hop reads its block in place instead of through
//! the daemon's page tables (`bpf_copy_from_user_task`).
//!
//! A slot is trusted only under its sequence lock: an even `seq` before the copy, the same
//! `seq` after it, and the translated block in `block`. The daemon writes slots only while
//! it holds the file system (it is the only writer of the device, and it empties a block's
//! slot after every write to that block), so a slot is as current as the device while the
//! daemon lives. Whether it still lives is checked once at the end of each call that used
//! a slot (`daemon::alive`): a call whose daemon died gets NO_DAEMON and no data.

use core::ffi::c_void;
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    bindings::bpf_dynptr,
    helpers::generated::{bpf_dynptr_from_mem, bpf_dynptr_read},
    macros::map,
    maps::{Array, HashMap},
};
use exofs_abi::chain::BLOCK_SIZE;
use exofs_abi::hot::{HotBlock, MAX_HOT_SLOTS, WANTED_SLOTS};

/// `BPF_F_MMAPABLE`: the daemon writes these arrays through a mapping.
const BPF_F_MMAPABLE: u32 = 1 << 10;
/// As in `chain`.
const BPF_F_NO_PREALLOC: u32 = 1;

/// The slots. One entry here; the daemon creates the map with as many as it serves.
#[map]
static EXOFS_HOT: Array<HotBlock> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Device block -> slot (a hint: the slot says which block it holds).
#[map]
static EXOFS_HOT_INDEX: HashMap<u64, u32> =
    HashMap::with_max_entries(MAX_HOT_SLOTS, BPF_F_NO_PREALLOC);

/// Blocks direct hops wanted and found in no slot: `block + 1` at `block % WANTED_SLOTS`.
#[map]
static EXOFS_HOT_WANTED: Array<u64> = Array::with_max_entries(WANTED_SLOTS, BPF_F_MMAPABLE);

/// Slots a table needs for TABLE_ONLY to be honoured: below that (`-o hot=0` makes one
/// slot) a lookup would stop at nearly every hop of any working set.
const SERVED_SLOTS: u32 = 64;

/// Whether the daemon serves a table worth stopping for (see [`SERVED_SLOTS`]).
#[inline(always)]
pub fn served() -> bool {
    EXOFS_HOT.get_ptr(SERVED_SLOTS - 1).is_some()
}

/// Copies `len` bytes at `within` of device block `block` into `dst` from the block's
/// slot. False if no slot holds it (the block is then noted as wanted) or the daemon was
/// writing the slot.
///
/// Safety: `dst` is valid for `len` bytes, and `within + len <= BLOCK_SIZE`.
#[inline(always)]
pub unsafe fn read(dst: *mut c_void, block: u64, within: u64, len: u32) -> bool {
    if let Some(slot) = EXOFS_HOT_INDEX.get(&block) {
        if let Some(entry) = EXOFS_HOT.get_ptr_mut(*slot) {
            let seq = read_volatile(addr_of!((*entry).seq));
            if seq & 1 == 0 && read_volatile(addr_of!((*entry).block)) == block + 1 {
                // Through a dynptr over the slot's bytes: `bpf_dynptr_read` is a memmove,
                // where `bpf_probe_read_kernel` copies word by word (its 4 KiB copy was 16%
                // of a warm direct lookup, measured with perf).
                let mut bytes = core::mem::MaybeUninit::<bpf_dynptr>::uninit();
                let data = addr_of_mut!((*entry).data).cast::<c_void>();
                let copied =
                    if bpf_dynptr_from_mem(data, BLOCK_SIZE as u32, 0, bytes.as_mut_ptr()) == 0 {
                        bpf_dynptr_read(
                            dst,
                            len,
                            bytes.as_ptr(),
                            (within as u32) & (BLOCK_SIZE as u32 - 1),
                            0,
                        )
                    } else {
                        -1
                    };
                // The copy is a helper call: the loads after it are not moved before it,
                // and x86 does not reorder loads with loads.
                if copied == 0 && read_volatile(addr_of!((*entry).seq)) == seq {
                    if read_volatile(addr_of!((*entry).used)) == 0 {
                        write_volatile(addr_of_mut!((*entry).used), 1);
                    }
                    return true;
                }
            }
        }
    }
    if let Some(word) = EXOFS_HOT_WANTED.get_ptr_mut((block % WANTED_SLOTS as u64) as u32) {
        if read_volatile(word) != block + 1 {
            write_volatile(word, block + 1);
        }
    }
    false
}
