//! Each malformation the checks refuse, made by corrupting one field of a real example
//! object (the C B-tree, as clang builds it), must come back from the binder as an error
//! naming the section and what is wrong, never as a panic in aya-obj.
//!
//! The fields are found by a small reader of section headers written here, not by the
//! code under test.

use crate::binder::{self, BindError};
use crate::loader::LoadError;

const SHT_NOBITS: u32 = 8;

/// One section header of the example, as this test reads it.
#[derive(Debug, Clone, Copy)]
struct Section {
    index: usize,
    header: usize,
    offset: usize,
    size: usize,
}

fn u16_at(elf: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([elf[at], elf[at + 1]])
}

fn u32_at(elf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(elf[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(elf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(elf[at..at + 8].try_into().expect("8 bytes"))
}

fn put_u32(elf: &mut [u8], at: usize, value: u32) {
    elf[at..at + 4].copy_from_slice(&value.to_le_bytes());
}

fn put_u64(elf: &mut [u8], at: usize, value: u64) {
    elf[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

fn example() -> Vec<u8> {
    crate::examples::BTREE_C.to_vec()
}

fn section(elf: &[u8], name: &str) -> Section {
    section_where(elf, name, |found| found == name.as_bytes())
}

/// The first section whose name passes `wanted` (`what` names it in the panic message).
fn section_where(elf: &[u8], what: &str, wanted: impl Fn(&[u8]) -> bool) -> Section {
    let name = what;
    let headers = u64_at(elf, 0x28) as usize;
    let count = usize::from(u16_at(elf, 0x3c));
    let names_header = headers + usize::from(u16_at(elf, 0x3e)) * 64;
    let names = u64_at(elf, names_header + 24) as usize;
    (0..count)
        .map(|index| (index, headers + index * 64))
        .find(|&(_, header)| {
            let at = names + u32_at(elf, header) as usize;
            elf[at..].split(|&b| b == 0).next().is_some_and(&wanted)
        })
        .map(|(index, header)| Section {
            index,
            header,
            offset: u64_at(elf, header + 24) as usize,
            size: u64_at(elf, header + 32) as usize,
        })
        .unwrap_or_else(|| panic!("the example has no section {name}"))
}

/// Renames section `index` by appending a copy of the section-name table, with `name`
/// added, at the end of the file.
fn rename(elf: &mut Vec<u8>, index: usize, name: &str) {
    let headers = u64_at(elf, 0x28) as usize;
    let names_header = headers + usize::from(u16_at(elf, 0x3e)) * 64;
    let (offset, size) = (
        u64_at(elf, names_header + 24) as usize,
        u64_at(elf, names_header + 32) as usize,
    );
    let copy = elf[offset..offset + size].to_vec();
    let new_offset = elf.len();
    elf.extend_from_slice(&copy);
    elf.extend_from_slice(name.as_bytes());
    elf.push(0);
    put_u64(elf, names_header + 24, new_offset as u64);
    put_u64(elf, names_header + 32, (size + name.len() + 1) as u64);
    put_u32(elf, headers + index * 64, size as u32);
}

/// Asserts that the binder refuses `elf` as malformed in `section`, with a message
/// containing `expected`.
fn refused(elf: &[u8], section: &str, expected: &str) {
    match binder::extract(elf) {
        Err(BindError::Object(LoadError::Malformed {
            section: refused_section,
            what,
        })) => {
            assert_eq!(refused_section, section, "{what}");
            assert!(what.contains(expected), "`{what}` lacks `{expected}`");
            let message = BindError::Object(LoadError::Malformed {
                section: refused_section,
                what,
            })
            .to_string();
            assert!(message.contains(section), "{message}");
        }
        other => panic!("expected {section} to be refused ({expected}), got {other:?}"),
    }
}

/// `.BTF.ext` offsets in the example: its header, then func_info (record size, one
/// section: name, count, records), then line_info.
struct BtfExt {
    start: usize,
    func_info: usize,
    line_info: usize,
}

fn btf_ext(elf: &[u8]) -> BtfExt {
    let ext = section(elf, ".BTF.ext");
    let header_len = u32_at(elf, ext.offset + 4) as usize;
    let data = ext.offset + header_len;
    BtfExt {
        start: ext.offset,
        func_info: data + u32_at(elf, ext.offset + 8) as usize,
        line_info: data + u32_at(elf, ext.offset + 16) as usize,
    }
}

/// `.BTF` offsets in the example: header, types, strings (and the strings' length).
struct Btf {
    start: usize,
    types: usize,
    types_len: usize,
    strings_len: usize,
    strings_end: usize,
}

fn btf(elf: &[u8]) -> Btf {
    let btf = section(elf, ".BTF");
    let header_len = u32_at(elf, btf.offset + 4) as usize;
    let strings = btf.offset + header_len + u32_at(elf, btf.offset + 16) as usize;
    let strings_len = u32_at(elf, btf.offset + 20) as usize;
    Btf {
        start: btf.offset,
        types: btf.offset + header_len + u32_at(elf, btf.offset + 8) as usize,
        types_len: u32_at(elf, btf.offset + 12) as usize,
        strings_len,
        strings_end: strings + strings_len,
    }
}

/// Offsets (in the file) and kinds of the example's BTF type records, by id - 1.
fn btf_types(elf: &[u8]) -> Vec<(usize, u32)> {
    let layout = btf(elf);
    let mut types = Vec::new();
    let mut at = layout.types;
    while at < layout.types + layout.types_len {
        let info = u32_at(elf, at + 4);
        let (kind, count) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
        types.push((at, kind));
        at += 12
            + match kind {
                1 | 14 | 17 => 4,
                3 => 12,
                4 | 5 | 15 | 19 => 12 * count,
                6 | 13 => 8 * count,
                _ => 0,
            };
    }
    types
}

#[test]
fn the_examples_and_the_driver_pass() {
    for elf in [
        crate::examples::BTREE,
        crate::examples::BTREE_C,
        crate::examples::HASH_CHAIN,
        crate::examples::LINKED_LIST,
        crate::DRIVER_ELF,
    ] {
        let object = super::ElfObject::parse(elf).expect("an ELF object");
        super::check(&object).expect("a well-formed object");
    }
    binder::extract(&example()).expect("the C example binds");
}

#[test]
fn btf_ext_records_past_their_subsection_are_refused() {
    let mut elf = example();
    let at = btf_ext(&elf).func_info;
    put_u32(&mut elf, at + 8, 12);
    refused(
        &elf,
        ".BTF.ext",
        "func_info record 0: 12 records of 8 bytes run past the section",
    );
    put_u32(&mut elf, at + 8, u32::MAX);
    refused(&elf, ".BTF.ext", "4294967295 records of 8 bytes");
}

#[test]
fn btf_ext_section_names_outside_the_strings_are_refused() {
    let mut elf = example();
    let at = btf_ext(&elf).line_info;
    put_u32(&mut elf, at + 4, 0xffff_fff0);
    refused(
        &elf,
        ".BTF.ext",
        "line_info record 0: section name offset 4294967280 is outside the .BTF string section",
    );
    // Inside aya-obj's bound (the header's lengths added up), outside the strings.
    let mut elf = example();
    let strings_len = btf(&elf).strings_len as u32;
    let at = btf_ext(&elf).func_info + 4;
    put_u32(&mut elf, at, strings_len + 4);
    refused(&elf, ".BTF.ext", "func_info record 0: section name offset");
}

#[test]
fn btf_ext_record_sizes_below_a_record_are_refused() {
    for (size, expected) in [
        (0, "func_info subsection: record size 0"),
        (4, "record size 4"),
        (10, "record size 10"),
    ] {
        let mut elf = example();
        let at = btf_ext(&elf).func_info;
        put_u32(&mut elf, at, size);
        refused(&elf, ".BTF.ext", expected);
    }
    let mut elf = example();
    let at = btf_ext(&elf).line_info;
    put_u32(&mut elf, at, 8);
    refused(&elf, ".BTF.ext", "line_info subsection: record size 8");
}

#[test]
fn btf_ext_subsections_past_the_section_are_refused() {
    let mut elf = example();
    let start = btf_ext(&elf).start;
    put_u32(&mut elf, start + 20, 0xffff_0000);
    refused(
        &elf,
        ".BTF.ext",
        "line_info subsection: 4294901760 bytes at offset",
    );
    let mut elf = example();
    put_u32(&mut elf, start + 8, u32::MAX);
    refused(&elf, ".BTF.ext", "func_info subsection");
    let mut elf = example();
    put_u32(&mut elf, start + 12, 2);
    refused(&elf, ".BTF.ext", "too short for its record size");
}

#[test]
fn btf_ext_headers_are_checked() {
    let mut elf = example();
    let start = btf_ext(&elf).start;
    put_u32(&mut elf, start + 4, 0x10_0000);
    refused(&elf, ".BTF.ext", "header length 1048576");
    let mut elf = example();
    elf[start] = 0;
    refused(&elf, ".BTF.ext", "magic");
}

#[test]
fn btf_ext_trailing_bytes_and_empty_sections_are_refused() {
    let mut elf = example();
    let start = btf_ext(&elf).start;
    // func_info's length grows by 4: a section header cut short follows its record.
    let len = u32_at(&elf, start + 12);
    put_u32(&mut elf, start + 12, len + 4);
    refused(&elf, ".BTF.ext", "func_info record 1: 4 bytes left");
    let mut elf = example();
    let at = btf_ext(&elf).func_info + 8;
    put_u32(&mut elf, at, 0);
    refused(&elf, ".BTF.ext", "func_info record 0: no records");
}

#[test]
fn unsorted_line_info_is_refused() {
    let mut elf = example();
    let records = btf_ext(&elf).line_info + 12;
    // The second line record starts before the first.
    let first = u32_at(&elf, records);
    put_u32(&mut elf, records, first + 64);
    refused(
        &elf,
        ".BTF.ext",
        "line_info record 0: instruction offsets out of order",
    );
}

#[test]
fn btf_headers_and_sections_are_checked() {
    let mut elf = example();
    let layout = btf(&elf);
    put_u32(&mut elf, layout.start + 20, 0xffff_ff00);
    refused(&elf, ".BTF", "string section: 4294967040 bytes at offset");
    let mut elf = example();
    put_u32(&mut elf, layout.start + 8, u32::MAX);
    refused(&elf, ".BTF", "type section");
    let mut elf = example();
    put_u32(&mut elf, layout.start + 4, 8);
    refused(&elf, ".BTF", "header length 8");
    let mut elf = example();
    elf[layout.start + 1] = 0;
    refused(&elf, ".BTF", "magic");
}

#[test]
fn btf_strings_must_be_terminated() {
    let mut elf = example();
    let end = btf(&elf).strings_end;
    elf[end - 1] = b'x';
    refused(&elf, ".BTF", "does not start and end with a NUL");
}

#[test]
fn btf_names_outside_the_strings_are_refused() {
    let mut elf = example();
    let strings_len = btf(&elf).strings_len as u32;
    let (first, _) = btf_types(&elf)[0];
    put_u32(&mut elf, first, strings_len + 3);
    refused(&elf, ".BTF", "type 1: name offset");
    // A member's name.
    let mut elf = example();
    let (structure, _) = btf_types(&elf)
        .into_iter()
        .find(|&(at, kind)| kind == 4 && u32_at(&elf, at + 4) & 0xffff > 0)
        .expect("a struct with members");
    put_u32(&mut elf, structure + 12, u32::MAX);
    refused(&elf, ".BTF", "entry 0: name offset 4294967295");
}

#[test]
fn btf_types_cut_short_or_of_unknown_kinds_are_refused() {
    let mut elf = example();
    let (first, _) = btf_types(&elf)[0];
    elf[first + 7] = 25;
    refused(&elf, ".BTF", "type 1: unknown kind 25");
    let mut elf = example();
    let start = btf(&elf).start;
    let len = u32_at(&elf, start + 12);
    put_u32(&mut elf, start + 12, len - 2);
    refused(&elf, ".BTF", "past the type section");
}

#[test]
fn btf_arrays_whose_size_overflows_are_refused() {
    let mut elf = example();
    let types = btf_types(&elf);
    let (array, _) = types
        .iter()
        .copied()
        .find(|&(_, kind)| kind == 3)
        .expect("an array");
    // An int of at least 2 bytes, by id.
    let int = types
        .iter()
        .position(|&(at, kind)| kind == 1 && u32_at(&elf, at + 8) >= 2)
        .expect("an int")
        + 1;
    put_u32(&mut elf, array + 12, int as u32);
    put_u32(&mut elf, array + 20, u32::MAX);
    refused(&elf, ".BTF", "4294967295 elements of");
}

#[test]
fn two_btf_sections_are_refused() {
    let mut elf = example();
    let debug = section(&elf, ".debug_frame");
    rename(&mut elf, debug.index, ".BTF");
    refused(&elf, ".BTF", "more than one section");
}

#[test]
fn symbols_outside_their_section_are_refused() {
    let mut elf = example();
    let symtab = section(&elf, ".symtab");
    // The last symbol is `next`; its size runs past .text.
    let next = symtab.offset + symtab.size - 24;
    put_u64(&mut elf, next + 16, 1 << 40);
    match binder::extract(&elf) {
        Err(BindError::Object(LoadError::Elf(what))) => {
            assert!(what.contains("lies outside its section"), "{what}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let mut elf = example();
    elf[next + 6..next + 8].copy_from_slice(&0xffffu16.to_le_bytes());
    refused(&elf, ".symtab", "extended section index");
}

#[test]
fn legacy_maps_without_bytes_and_huge_bss_are_refused() {
    let mut elf = example();
    let debug = section(&elf, ".debug_frame");
    rename(&mut elf, debug.index, "maps");
    put_u32(&mut elf, debug.header + 4, SHT_NOBITS);
    refused(&elf, "maps", "without bytes in the file");
    let mut elf = example();
    rename(&mut elf, debug.index, ".bss");
    put_u32(&mut elf, debug.header + 4, SHT_NOBITS);
    put_u64(&mut elf, debug.header + 32, 1 << 40);
    refused(&elf, ".bss", "1099511627776 bytes");
}

#[test]
fn compact_relocations_are_refused() {
    let mut elf = example();
    let relocations = section(&elf, ".rel.debug_info");
    put_u32(&mut elf, relocations.header + 4, 0x4000_0014);
    refused(&elf, ".rel.debug_info", "SHT_CREL");
}

#[test]
fn calls_with_the_largest_immediate_are_refused() {
    let mut elf = example();
    let text = section(&elf, ".text");
    elf[text.offset] = 0x85;
    elf[text.offset + 1] = 0x10;
    put_u32(&mut elf, text.offset + 4, i32::MAX as u32);
    refused(
        &elf,
        ".text",
        "instruction 0: a call with immediate 2147483647",
    );
}

/// The example's `.rel.BTF.ext` made to apply to `.text` (all its entries name the
/// `.text` section symbol), so that aya-obj links calls with them; its first entry (at
/// byte 44, not an instruction, which aya-obj refuses before it links calls) moved to
/// instruction 0. Without the checks, each test below panics inside aya-obj.
fn relocated_text() -> (Vec<u8>, Section, Section) {
    let mut elf = example();
    let text = section(&elf, ".text");
    let relocations = section(&elf, ".rel.BTF.ext");
    put_u32(&mut elf, relocations.header + 44, text.index as u32);
    put_u64(&mut elf, relocations.offset, 0);
    (elf, text, relocations)
}

#[test]
fn relocations_into_code_of_other_types_are_refused() {
    let (elf, _, _) = relocated_text();
    refused(
        &elf,
        ".rel.BTF.ext",
        "relocation 0 (symbol 2): type 4 against a section symbol",
    );
}

#[test]
fn relocations_to_symbols_in_code_that_are_not_functions_are_refused() {
    let (mut elf, _, _) = relocated_text();
    let symtab = section(&elf, ".symtab");
    // Symbol 2, `.text`'s section symbol, becomes an object.
    elf[symtab.offset + 2 * 24 + 4] = 1;
    refused(&elf, ".rel.BTF.ext", "a symbol of type 1 in code");
}

#[test]
fn relocations_to_functions_without_a_section_are_refused() {
    let (mut elf, _, relocations) = relocated_text();
    let symtab = section(&elf, ".symtab");
    // Symbol 1 (the file name, absolute) becomes a function; relocation 0 names it.
    elf[symtab.offset + 24 + 4] = 2;
    put_u64(&mut elf, relocations.offset + 8, (1 << 32) | 10);
    refused(
        &elf,
        ".rel.BTF.ext",
        "relocation 0 (symbol 1): a function symbol with no section",
    );
}

#[test]
fn relocated_calls_whose_callee_address_overflows_are_refused() {
    let (mut elf, text, relocations) = relocated_text();
    // Relocation 0: R_BPF_64_32 at instruction 0, whose immediate is -5.
    put_u64(&mut elf, relocations.offset + 8, (2 << 32) | 10);
    put_u32(&mut elf, text.offset + 4, (-5i32) as u32);
    refused(
        &elf,
        ".rel.BTF.ext",
        "relocation 0 (symbol 2): immediate -5",
    );
}

/// The driver (whose programs reference maps and `.rodata`), corrupted by `corrupt`, must
/// be refused by the loader before any map is created (so without root). Without the
/// checks, as root, each of these panics in aya-obj's `relocate_maps`.
fn driver_refused(corrupt: impl FnOnce(&mut Vec<u8>), section: &str, expected: &str) {
    let mut elf = crate::DRIVER_ELF.to_vec();
    corrupt(&mut elf);
    match crate::loader::Object::load(&elf) {
        Err(LoadError::Malformed {
            section: refused_section,
            what,
        }) => {
            assert_eq!(refused_section, section, "{what}");
            assert!(what.contains(expected), "`{what}` lacks `{expected}`");
        }
        other => panic!("expected {section} to be refused ({expected}), got {other:?}"),
    }
}

/// The driver's first relocation of `.rel.text` against `.rodata` (a data map, whose
/// references aya-obj resolves by writing the ld_imm64's second half and adding the
/// symbol's value): (its file offset, its r_offset, its symbol's file offset).
fn rodata_relocation(elf: &[u8]) -> (usize, u64, usize) {
    let relocations = section(elf, ".rel.text");
    let symtab = section(elf, ".symtab");
    // `.rodata`, or a constant pool such as `.rodata.cst32`.
    let rodata = section_where(elf, ".rodata*", |name| name.starts_with(b".rodata")).index as u16;
    (relocations.offset..relocations.offset + relocations.size)
        .step_by(16)
        .map(|at| {
            let symbol = symtab.offset + (u64_at(elf, at + 8) >> 32) as usize * 24;
            (at, u64_at(elf, at), symbol)
        })
        .find(|&(_, _, symbol)| u16_at(elf, symbol + 6) == rodata)
        .expect("a reference to .rodata in .text")
}

#[test]
fn data_references_cut_short_by_their_function_are_refused() {
    driver_refused(
        |elf| {
            let (relocation, offset, _) = rodata_relocation(elf);
            let symtab = section(elf, ".symtab");
            let text = section(elf, ".text").index as u16;
            // The relocation moves to the last instruction of the function holding it.
            let function = (symtab.offset..symtab.offset + symtab.size)
                .step_by(24)
                .find(|&at| {
                    let (value, size) = (u64_at(elf, at + 8), u64_at(elf, at + 16));
                    elf[at + 4] & 0xf == 2
                        && u16_at(elf, at + 6) == text
                        && value <= offset
                        && offset < value + size
                })
                .expect("a function holding the first relocation");
            let end = u64_at(elf, function + 8) + u64_at(elf, function + 16);
            put_u64(elf, relocation, end - 8);
        },
        ".rel.text",
        "the last instruction of its function",
    );
}

#[test]
fn data_references_whose_offset_overflows_are_refused() {
    driver_refused(
        |elf| {
            let (_, offset, symbol) = rodata_relocation(elf);
            let text = section(elf, ".text");
            put_u32(elf, text.offset + offset as usize + 4, i32::MAX as u32);
            // The section symbol of .rodata, at 0, moves to 1 (still inside .rodata).
            put_u64(elf, symbol + 8, 1);
        },
        ".rel.text",
        "overflows",
    );
}
