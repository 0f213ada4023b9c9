//! SQLite rowid lookup (`exofs_abi::formats::sqlite`): one hop per page of a table B-tree,
//! from the table's root page down to the leaf that holds the rowid, then one per
//! overflow page while the column's bytes lie there. Written with exofs-appfn: every
//! read is a bounded one, and both searches in a page (the binary search over cells, the
//! walk over the record's serial types) run in bpf_loop, so the verifier checks each body
//! once whatever the page holds.
//!
//! The stack is the scarce thing: an application function shares 512 bytes with the
//! driver's frames below it (under 200 bytes). So the lookup's state is read and written in
//! place in the scratch, the walk over the serial types keeps its cursor there too, and
//! each part is a function of its own (frames add up along a call path, not across it).
//!
//! Refused (ABORTED): index pages (index B-trees and WITHOUT ROWID tables), page sizes
//! over 4096, a record whose header does not fit on its leaf page, reserved serial types,
//! a column more than 49 overflow pages into its record, and anything out of place (a
//! cell pointer outside the cell area, a child page 0, an overflow chain that ends early
//! or visits a page twice). A cycle in the tree ends at the chain's hop limit
//! (HOP_LIMIT); a page past the end of the file is OUT_OF_FILE.
//!
//! It reads the record's columns in storage order and returns what the record holds: the
//! caller maps declared columns to stored ones and turns the record's value into SQLite's
//! (the rowid for an INTEGER PRIMARY KEY column, a real for a whole number in a REAL
//! column): exofs_client::sqlite::Table.
#![no_std]
#![no_main]

use exofs_abi::chain::{HopState, NEXT_ABORT, NEXT_CONTINUE, NEXT_DONE, SCRATCH_SIZE};
use exofs_abi::formats::sqlite::{
    kind, phase, Lookup, BYTES_OFFSET, HEADER_SIZE, MAX_BYTES, MAX_PAGE_SIZE, MIN_USABLE,
    PAGE_INTERIOR_TABLE, PAGE_LEAF_TABLE,
};
use exofs_appfn::{
    be16, be32, byte, partition_point, repeat, scratch_word, set_scratch_word, sqlite_varint,
    HELPER_AREA,
};

/// Scratch word of the walk over a record's header, within one hop: the cursor (low 32
/// bits) and the payload offset of the next column's bytes (high 32 bits). After the
/// lookup's bytes, before the helpers'.
const WALK: usize = core::mem::size_of::<Lookup>();
const _: () = assert!(WALK % 8 == 0 && WALK + 8 <= HELPER_AREA);
/// The walk's cursor when it failed (a malformed header), and when it found the column
/// (whose serial type is then in the lookup's value, free until the lookup ends).
const FAILED: u32 = u32::MAX;
const FOUND: u32 = u32::MAX - 1;

/// The lookup in the scratch.
fn lookup(state: &mut HopState) -> &mut Lookup {
    // SAFETY: the scratch is 8-aligned in HopState and longer than a Lookup, which is
    // plain data (any bytes are a valid Lookup).
    unsafe { &mut *state.scratch.as_mut_ptr().cast::<Lookup>() }
}

#[no_mangle]
pub extern "C" fn next(state: *mut HopState) -> i32 {
    // SAFETY: the driver calls `next` with its live hop state.
    let state = unsafe { &mut *state };
    walk(state).unwrap_or(NEXT_ABORT)
}

fn walk(state: &mut HopState) -> Option<i32> {
    let data_len = state.data_len as usize;
    let l = lookup(state);
    let (page_size, usable) = (l.page_size as usize, l.usable as usize);
    if !page_size.is_power_of_two()
        || !(512..=MAX_PAGE_SIZE).contains(&page_size)
        || usable < MIN_USABLE
        || usable > page_size
        || data_len < usable
    {
        return None;
    }
    match l.phase & !phase::LENGTH_ONLY {
        phase::DESCEND => descend(state, usable),
        phase::SKIP | phase::GATHER => overflow(state, usable),
        _ => None,
    }
}

/// Continues at page `page` (pages count from 1).
fn go_to_page(state: &mut HopState, page: u32) -> Option<i32> {
    if page == 0 {
        return None;
    }
    let page_size = u64::from(lookup(state).page_size);
    state.next_count = 1;
    state.next_file[0] = state.file;
    state.next_offset[0] = u64::from(page - 1) * page_size;
    Some(NEXT_CONTINUE)
}

/// Offset in the page of cell `index`, from the cell pointer array at `pointers`, which
/// holds `cells` pointers: a cell lies after the array and before the usable end.
#[inline(always)]
fn cell_at(
    state: &HopState,
    pointers: usize,
    cells: u32,
    index: u32,
    usable: usize,
) -> Option<usize> {
    let cell = be16(state, pointers + 2 * index as usize)? as usize;
    if cell < pointers + 2 * cells as usize || cell >= usable {
        return None;
    }
    Some(cell)
}

/// Sets the walk's phase, keeping the caller's flag.
fn set_phase(l: &mut Lookup, to: u8) {
    l.phase = (l.phase & phase::LENGTH_ONLY) | to;
}

/// A table leaf cell's rowid, payload size and payload offset.
#[inline(never)]
fn leaf_cell(state: &mut HopState, cell: usize) -> Option<(i64, u64, usize)> {
    let (payload, n1) = sqlite_varint(state, cell)?;
    let (rowid, n2) = sqlite_varint(state, cell + n1)?;
    Some((rowid as i64, payload, cell + n1 + n2))
}

/// A B-tree page: down to the child that covers the rowid, or the rowid's record.
#[inline(never)]
fn descend(state: &mut HopState, usable: usize) -> Option<i32> {
    // Page 1 starts with the database header.
    let at = if state.offset == 0 { HEADER_SIZE } else { 0 };
    let page_type = byte(state, at)?;
    let cells = u32::from(be16(state, at + 3)?);
    let rowid = lookup(state).rowid;
    match page_type {
        PAGE_INTERIOR_TABLE => {
            let pointers = at + 12;
            if pointers + 2 * cells as usize > usable {
                return None;
            }
            // Cells are (left child, key): the child holds the rowids <= key. The first
            // cell whose key is >= rowid, else the right-most child.
            let index = partition_point(state, cells, move |s, i| {
                let cell = cell_at(s, pointers, cells, i, usable)?;
                let (key, _) = sqlite_varint(s, cell + 4)?;
                Some((key as i64) < rowid)
            })?;
            let child = if index == cells {
                be32(state, at + 8)?
            } else {
                be32(state, cell_at(state, pointers, cells, index, usable)?)?
            };
            go_to_page(state, child)
        }
        PAGE_LEAF_TABLE => {
            let pointers = at + 8;
            if pointers + 2 * cells as usize > usable {
                return None;
            }
            let index = partition_point(state, cells, move |s, i| {
                let cell = cell_at(s, pointers, cells, i, usable)?;
                let (key, _, _) = leaf_cell(s, cell)?;
                Some(key < rowid)
            })?;
            if index == cells {
                return Some(found(state, kind::NOT_FOUND));
            }
            let cell = cell_at(state, pointers, cells, index, usable)?;
            let (key, payload, start) = leaf_cell(state, cell)?;
            if key != rowid {
                return Some(found(state, kind::NOT_FOUND));
            }
            record(state, usable, payload, start)
        }
        // Index pages (index B-trees, WITHOUT ROWID tables) and anything else.
        _ => None,
    }
}

/// Ends the lookup with `what` (the value, if any, already in place).
fn found(state: &mut HopState, what: u8) -> i32 {
    lookup(state).kind = what;
    NEXT_DONE
}

/// Bytes of a payload of `payload` bytes kept on its leaf page, the rest going to
/// overflow pages (SQLite's rule for table leaves).
fn local_size(payload: u64, usable: usize) -> u64 {
    let usable = usable as u64;
    let max_local = usable - 35;
    if payload <= max_local {
        return payload;
    }
    let min_local = (usable - 12) * 32 / 255 - 23;
    // (usable is at least MIN_USABLE: the max only spares the verifier a division by 0.)
    let local = min_local + (payload - min_local) % (usable - 4).max(1);
    if local <= max_local {
        local
    } else {
        min_local
    }
}

/// Kind and byte length of serial type `serial`; None for the reserved 10 and 11.
fn serial(serial: u64) -> Option<(u8, u64)> {
    Some(match serial {
        0 => (kind::NULL, 0),
        1..=4 => (kind::INTEGER, serial),
        5 => (kind::INTEGER, 6),
        6 => (kind::INTEGER, 8),
        7 => (kind::REAL, 8),
        8 | 9 => (kind::INTEGER, 0),
        10 | 11 => return None,
        _ if serial % 2 == 0 => (kind::BLOB, (serial - 12) / 2),
        _ => (kind::TEXT, (serial - 13) / 2),
    })
}

/// The walk over a record's header, from `cursor` (a page offset) to `header_end`, with
/// column 0's bytes at payload offset `body`: the serial type of the lookup's column and
/// the payload offset of its bytes. None: a malformed header; Some(None): the record has
/// fewer columns.
#[inline(never)]
fn column_of(
    state: &mut HopState,
    cursor: usize,
    header_end: usize,
    body: u32,
) -> Option<Option<(u64, u32)>> {
    let column = u32::from(lookup(state).column);
    let word = |cursor: u32, body: u32| u64::from(body) << 32 | u64::from(cursor);
    set_scratch_word(state, WALK, word(cursor as u32, body));
    let mut step = move |s: &mut HopState, i: u32| {
        let walk = scratch_word(s, WALK);
        let (cursor, body) = (walk as u32, (walk >> 32) as u32);
        if cursor as usize >= header_end {
            return false;
        }
        let Some((serial_type, len)) = sqlite_varint(s, cursor as usize) else {
            set_scratch_word(s, WALK, word(FAILED, 0));
            return false;
        };
        if cursor as usize + len > header_end {
            // A serial type running past the header's end: corrupt, as SQLite says.
            set_scratch_word(s, WALK, word(FAILED, 0));
            return false;
        }
        if i == column {
            lookup(s).value = serial_type;
            set_scratch_word(s, WALK, word(FOUND, body));
            return false;
        }
        let Some((_, size)) = serial(serial_type) else {
            set_scratch_word(s, WALK, word(FAILED, 0));
            return false;
        };
        let body = u64::from(body) + size;
        if body > u64::from(u32::MAX) {
            set_scratch_word(s, WALK, word(FAILED, 0));
            return false;
        }
        set_scratch_word(s, WALK, word(cursor + len as u32, body as u32));
        true
    };
    repeat(state, column + 1, &mut step);
    let walk = scratch_word(state, WALK);
    match walk as u32 {
        FAILED => None,
        FOUND => Some(Some((lookup(state).value, (walk >> 32) as u32))),
        _ => Some(None),
    }
}

/// The record of the row, whose payload of `payload` bytes starts at `start` in the
/// page: returns the column's value, or goes on to the first overflow page for it.
/// Inlined into `descend`: a BPF call path has at most 8 frames, and the driver's hop
/// and the walk over the header's serial types (a bpf_loop callback calling the varint
/// reader) take 6 of them below it.
#[inline(always)]
fn record(state: &mut HopState, usable: usize, payload: u64, start: usize) -> Option<i32> {
    let local = local_size(payload, usable);
    if start as u64 + local > usable as u64 {
        return None;
    }
    let local = local as usize;
    let (header_size, n) = sqlite_varint(state, start)?;
    if header_size > local as u64 || (header_size as usize) < n {
        return None;
    }
    let Some((serial_type, body)) = column_of(
        state,
        start + n,
        start + header_size as usize,
        header_size as u32,
    )?
    else {
        return Some(found(state, kind::ABSENT));
    };
    let (what, size) = serial(serial_type)?;
    // (A payload is at most 2^31 bytes in SQLite; a larger size is a corrupt header.)
    if u64::from(body) + size > payload || size > u64::from(i32::MAX as u32) {
        return None;
    }
    let l = lookup(state);
    l.kind = what;
    l.length = size as u32;
    l.value = u64::from(serial_type == 9);
    l.progress = 0;
    let wanted = wanted(l);
    if wanted == 0 {
        return Some(NEXT_DONE);
    }
    let body = body as usize;
    let leaf = page_of(state);
    if body >= local {
        // Every byte of the value is on overflow pages: skip to it, keeping the pages
        // walked (the leaf first) to catch a cycle.
        set_visited(state, 0, leaf);
        let l = lookup(state);
        set_phase(l, phase::SKIP);
        l.progress = (body - local) as u32;
        l.value = u64::from(leaf) << 32 | 1;
    } else {
        // It starts here, and ends here or on the first overflow page (see `overflow`).
        let here = ((local - body) as u32).min(wanted);
        gather(state, start + body, here);
        if lookup(state).progress >= wanted {
            return Some(finish(state));
        }
        set_phase(lookup(state), phase::GATHER);
    }
    if start + local + 4 > usable {
        return None;
    }
    let first_overflow = be32(state, start + local)?;
    if first_overflow == leaf {
        return None;
    }
    go_to_page(state, first_overflow)
}

/// Bytes of the value the lookup returns: all of a number, the first MAX_BYTES of a text
/// or blob.
fn wanted(l: &Lookup) -> u32 {
    match l.kind {
        kind::TEXT | kind::BLOB if l.phase & phase::LENGTH_ONLY != 0 => 0,
        kind::TEXT | kind::BLOB => l.length.min(MAX_BYTES as u32),
        _ => l.length,
    }
}

/// Takes `count` bytes of the value from page offset `from`: into `value` for a number,
/// into the scratch's bytes for a text or blob.
#[inline(never)]
fn gather(state: &mut HopState, from: usize, count: u32) {
    let mut step = move |s: &mut HopState, i: u32| {
        let at = from + i as usize;
        let Some(b) = byte(s, at) else {
            return false;
        };
        let l = lookup(s);
        if matches!(l.kind, kind::TEXT | kind::BLOB) {
            let k = l.progress as usize;
            if k >= MAX_BYTES {
                return false;
            }
            // (The mask keeps the write in the scratch whatever the compiler does to the
            // check above; the check keeps it in the bytes.)
            s.scratch[(BYTES_OFFSET + k) & (SCRATCH_SIZE - 1)] = b;
        } else {
            l.value = l.value << 8 | u64::from(b);
        }
        lookup(s).progress += 1;
        true
    };
    repeat(state, count, &mut step);
}

/// Ends the lookup once every wanted byte is in: sign-extends an integer.
fn finish(state: &mut HopState) -> i32 {
    let l = lookup(state);
    if l.kind == kind::INTEGER && (1..8).contains(&l.length) {
        let shift = 64 - 8 * l.length;
        l.value = ((l.value << shift) as i64 >> shift) as u64;
    }
    l.progress = 0;
    set_phase(l, phase::DESCEND);
    NEXT_DONE
}

/// Most overflow pages a lookup walks to reach its column's bytes. The pages walked are
/// kept, to catch a cycle in the chain, in the scratch's bytes (where a text or blob is
/// returned later): 4 bytes each.
const MAX_VISITED: u32 = (MAX_BYTES / 4) as u32;

/// The page the hop read (pages count from 1).
fn page_of(state: &mut HopState) -> u32 {
    let page_size = u64::from(lookup(state).page_size).max(1);
    (state.offset / page_size) as u32 + 1
}

/// Scratch offset of visited page `i` (i < MAX_VISITED).
fn visited_offset(i: u32) -> usize {
    // (The mask keeps it in the scratch whatever the compiler does; i < MAX_VISITED keeps
    // it in the bytes.)
    (BYTES_OFFSET + 4 * i as usize) & (SCRATCH_SIZE - 4)
}

fn visited(state: &HopState, i: u32) -> u32 {
    let at = visited_offset(i);
    let s = &state.scratch;
    u32::from_le_bytes([
        s[at],
        s[(at + 1) & 255],
        s[(at + 2) & 255],
        s[(at + 3) & 255],
    ])
}

fn set_visited(state: &mut HopState, i: u32, page: u32) {
    let at = visited_offset(i);
    for (k, b) in page.to_le_bytes().into_iter().enumerate() {
        state.scratch[(at + k) & (SCRATCH_SIZE - 1)] = b;
    }
}

/// Whether `page` is among the first `count` pages visited.
#[inline(never)]
fn was_visited(state: &mut HopState, count: u32, page: u32) -> bool {
    set_scratch_word(state, WALK, 0);
    let mut step = move |s: &mut HopState, i: u32| {
        if visited(s, i) == page {
            set_scratch_word(s, WALK, 1);
            return false;
        }
        true
    };
    repeat(state, count.min(MAX_VISITED), &mut step);
    scratch_word(state, WALK) == 1
}

/// An overflow page: the next page's number, then usable - 4 bytes of the payload.
///
/// While skipping, `value` holds the leaf's page number (high half) and how many pages
/// were visited (low half), the leaf first; a page visited twice is a cycle (ABORTED). A
/// batched lookup resumed after a miss gets its first 32 bytes back and the rest zeroed:
/// the list is gone, so the walk starts again at the leaf, from the rowid and column it
/// still has.
#[inline(never)]
fn overflow(state: &mut HopState, usable: usize) -> Option<i32> {
    let next_page = be32(state, 0)?;
    let content = (usable - 4) as u32;
    let page = page_of(state);
    let mut from = 4usize;
    // Whether the value starts on this page (else this page ends it).
    let starts_here = lookup(state).phase & !phase::LENGTH_ONLY == phase::SKIP;
    let l = lookup(state);
    if starts_here {
        let (leaf, count) = ((l.value >> 32) as u32, l.value as u32);
        if count == 0 || count > MAX_VISITED {
            return None;
        }
        if visited(state, count - 1) == 0 {
            let l = lookup(state);
            set_phase(l, phase::DESCEND);
            l.value = 0;
            l.progress = 0;
            return go_to_page(state, leaf);
        }
        if count == MAX_VISITED || was_visited(state, count, page) {
            return None;
        }
        set_visited(state, count, page);
        let l = lookup(state);
        l.value = u64::from(leaf) << 32 | u64::from(count + 1);
        if l.progress >= content {
            l.progress -= content;
            return go_to_page(state, next_page);
        }
        // The value starts on this page. If it goes on to the next, that page must not be
        // one already walked (the last check: the bytes now fill with the value).
        from += l.progress as usize;
        let continues = wanted(l) > (usable - from) as u32;
        if continues && was_visited(state, count + 1, next_page) {
            return None;
        }
        let l = lookup(state);
        l.progress = 0;
        l.value = 0;
        set_phase(l, phase::GATHER);
    } else if l.progress == 0 {
        // GATHER arrives here with some bytes taken already.
        return None;
    }
    let l = lookup(state);
    let wanted = wanted(l);
    let here = (usable - from) as u32;
    let count = here.min(wanted.saturating_sub(l.progress));
    gather(state, from, count);
    if lookup(state).progress >= wanted {
        return Some(finish(state));
    }
    // A value takes two pages at most (at most 200 bytes; a page holds at least 476), and
    // the second was checked above: it may not send the walk further.
    if !starts_here {
        return None;
    }
    go_to_page(state, next_page)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
