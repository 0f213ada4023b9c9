//! ELF checks: refuses, with a reason, every malformed BPF object aya-obj would panic on.
//!
//! Layer: kernel-ext, under [`crate::loader`] (which calls [`ElfObject::parse`] and
//! [`check`] before aya-obj sees an object); reads bytes only, calls nothing.
//!
//! Why: aya-obj 0.3 trusts the object it parses. It slices section data with symbol values
//! and sizes, slices `.BTF.ext` with the offsets, lengths, record sizes and record counts
//! the section states, unwraps the `.BTF` strings those records name, multiplies BTF array
//! lengths in u32, and, when it links calls, computes callee addresses from immediates and
//! `todo!()`s on relocations it does not expect. Any of these panics on a hostile or
//! corrupted object; the loader must answer with an error naming what is wrong instead.
//! Each rule below guards one such use (see the function that checks it), and refuses
//! only what the kernel or libbpf would refuse too, so that objects from clang and
//! bpf-linker pass.
//!
//! Interface: [`ElfObject::parse`] reads the ELF and section headers (64-bit little-endian
//! EM_BPF only) and the section names; [`check`] checks, in order: section kinds, symbols,
//! `.BTF` and `.BTF.ext` ([`btf`]), then code and its relocations. Every refusal is a
//! [`LoadError::Malformed`] naming the section and what is wrong (or [`LoadError::Elf`]
//! when the ELF structure itself is broken).
//!
//! Invariants: every offset read from the object is bounds-checked with checked
//! arithmetic; nothing here panics on any input (fuzz target `binder_elf`).

mod btf;
pub(crate) mod externs;
#[cfg(test)]
mod tests;

use std::ffi::CStr;

use crate::loader::LoadError;

const ELF_HEADER_SIZE: usize = 64;
/// Size of one section header (`Elf64_Shdr`).
pub(crate) const SECTION_HEADER_SIZE: usize = 64;
const SYMBOL_SIZE: usize = 24;
const EM_BPF: u16 = 247;

const SHT_RELA: u32 = 4;
const SHT_NOBITS: u32 = 8;
const SHT_REL: u32 = 9;
const SHT_SYMTAB: u32 = 2;
const SHT_CREL: u32 = 0x4000_0014;
const SHF_EXECINSTR: u64 = 0x4;

/// `st_shndx` values: undefined, the start of the reserved range, and "look in
/// SHT_SYMTAB_SHNDX".
const SHN_UNDEF: u16 = 0;
const SHN_LORESERVE: u16 = 0xff00;
const SHN_XINDEX: u16 = 0xffff;

const STT_FUNC: u8 = 2;
const STT_SECTION: u8 = 3;
const STT_GNU_IFUNC: u8 = 10;

const R_BPF_64_64: u32 = 1;
const R_BPF_64_32: u32 = 10;

/// Largest `.bss` section accepted (aya-obj allocates its size in zeros): four times the
/// largest array map value the kernel creates (KMALLOC_MAX_SIZE, 4 MiB on x86-64), so no
/// loadable object is refused.
const MAX_BSS_BYTES: u64 = 16 << 20;

/// One section header, as read from the file (nothing in it is trusted yet).
#[derive(Debug, Clone)]
pub(crate) struct SectionHeader<'a> {
    /// The section's name (without its NUL).
    pub(crate) name: &'a [u8],
    /// `sh_type`.
    pub(crate) kind: u32,
    flags: u64,
    address: u64,
    offset: u64,
    size: u64,
    link: u32,
    info: u32,
}

impl SectionHeader<'_> {
    fn display_name(&self) -> String {
        String::from_utf8_lossy(self.name).into_owned()
    }
}

/// An object's ELF header and section headers, checked to lie inside the file.
#[derive(Debug)]
pub(crate) struct ElfObject<'a> {
    /// The whole file.
    pub(crate) bytes: &'a [u8],
    /// Where the section header table starts.
    pub(crate) headers_offset: usize,
    /// Index of the section-name string table.
    pub(crate) names_index: usize,
    /// The section-name string table's bytes.
    pub(crate) names: &'a [u8],
    /// Every section header, by index.
    pub(crate) sections: Vec<SectionHeader<'a>>,
}

impl<'a> ElfObject<'a> {
    /// Reads the headers of a 64-bit little-endian EM_BPF relocatable object.
    pub(crate) fn parse(elf: &'a [u8]) -> Result<Self, LoadError> {
        if elf.len() < ELF_HEADER_SIZE || elf[..4] != *b"\x7fELF" {
            return Err(LoadError::Elf("no ELF header".to_owned()));
        }
        if elf[4] != 2 || elf[5] != 1 || le_u16(elf, 18)? != EM_BPF {
            return Err(LoadError::Elf(
                "not a 64-bit little-endian BPF object (EM_BPF)".to_owned(),
            ));
        }
        let headers_offset = to_usize(le_u64(elf, 0x28)?)?;
        let header_size = usize::from(le_u16(elf, 0x3a)?);
        // e_shnum 0 and e_shstrndx SHN_XINDEX (extended numbering, where the real values
        // are in section 0) are refused here: no BPF object has 0xff00 sections.
        let count = usize::from(le_u16(elf, 0x3c)?);
        let names_index = usize::from(le_u16(elf, 0x3e)?);
        if header_size != SECTION_HEADER_SIZE || names_index >= count {
            return Err(LoadError::Elf(
                "unexpected section header table (size or string table index)".to_owned(),
            ));
        }
        let table = count
            .checked_mul(SECTION_HEADER_SIZE)
            .and_then(|len| bytes_at(elf, headers_offset, len).ok())
            .ok_or_else(|| LoadError::Elf("section header table out of bounds".to_owned()))?;
        let mut raw = Vec::with_capacity(count);
        for header in table.chunks_exact(SECTION_HEADER_SIZE) {
            raw.push((
                le_u32(header, 0)?,
                SectionHeader {
                    name: &[],
                    kind: le_u32(header, 4)?,
                    flags: le_u64(header, 8)?,
                    address: le_u64(header, 16)?,
                    offset: le_u64(header, 24)?,
                    size: le_u64(header, 32)?,
                    link: le_u32(header, 40)?,
                    info: le_u32(header, 44)?,
                },
            ));
        }
        let names_header = &raw[names_index].1;
        let names = bytes_at(
            elf,
            to_usize(names_header.offset)?,
            to_usize(names_header.size)?,
        )
        .map_err(|_| LoadError::Elf("section name table out of bounds".to_owned()))?;
        let mut sections = Vec::with_capacity(count);
        for (index, (name_offset, mut header)) in raw.into_iter().enumerate() {
            header.name = names
                .get(name_offset as usize..)
                .and_then(|rest| CStr::from_bytes_until_nul(rest).ok())
                .ok_or_else(|| LoadError::Elf(format!("section {index} has no name")))?
                .to_bytes();
            sections.push(header);
        }
        Ok(Self {
            bytes: elf,
            headers_offset,
            names_index,
            names,
            sections,
        })
    }

    /// Where section `index`'s header starts in the file (`index` < the section count).
    pub(crate) fn header_offset(&self, index: usize) -> usize {
        self.headers_offset + index * SECTION_HEADER_SIZE
    }

    /// The bytes of section `index` in the file: none for SHT_NOBITS, as for aya-obj
    /// (through the `object` crate).
    fn section_bytes(&self, index: usize) -> Result<&'a [u8], LoadError> {
        let section = &self.sections[index];
        if section.kind == SHT_NOBITS {
            return Ok(&[]);
        }
        let (offset, size) = (to_usize(section.offset)?, to_usize(section.size)?);
        bytes_at(self.bytes, offset, size).map_err(|_| {
            malformed(
                &section.display_name(),
                format!("{size} bytes at file offset {offset} run past the file"),
            )
        })
    }

    /// Whether aya-obj may cut functions from section `index`: `.text*` sections and
    /// executable ones (program sections), a superset of aya-obj's own set.
    fn is_code(&self, index: usize) -> bool {
        self.sections.get(index).is_some_and(|section| {
            section.name.starts_with(b".text") || section.flags & SHF_EXECINSTR != 0
        })
    }
}

/// Refuses `elf` if aya-obj could panic on it (see the module header).
pub(crate) fn check(object: &ElfObject<'_>) -> Result<(), LoadError> {
    check_sections(object)?;
    let symbols = check_symbols(object)?;
    btf::check(object)?;
    check_code(object, &symbols)
}

/// A [`LoadError::Malformed`] for `section`.
fn malformed(section: &str, what: impl Into<String>) -> LoadError {
    LoadError::Malformed {
        section: section.to_owned(),
        what: what.into(),
    }
}

/// Section kinds aya-obj would misuse: a legacy `maps` section it slices map definitions
/// from must have bytes in the file (aya-obj reads SHT_NOBITS data as empty but still
/// slices it with the symbols); a `.bss` section is allocated at its stated size; and
/// compact relocations (SHT_CREL), which the checks of code below do not read, are
/// refused (no BPF toolchain emits them by default).
fn check_sections(object: &ElfObject<'_>) -> Result<(), LoadError> {
    for section in &object.sections {
        let nobits = section.kind == SHT_NOBITS;
        if nobits && section.name.starts_with(b"maps") {
            return Err(malformed(
                &section.display_name(),
                "a legacy map section without bytes in the file (SHT_NOBITS)",
            ));
        }
        if nobits && section.name.starts_with(b".bss") && section.size > MAX_BSS_BYTES {
            return Err(malformed(
                &section.display_name(),
                format!(
                    "{} bytes, more than the {MAX_BSS_BYTES} a global data map may have",
                    section.size
                ),
            ));
        }
        if section.kind == SHT_CREL {
            return Err(malformed(
                &section.display_name(),
                "compact relocations (SHT_CREL) are not supported",
            ));
        }
    }
    Ok(())
}

/// One entry of the symbol table aya-obj uses (the first SHT_SYMTAB).
#[derive(Debug, Clone, Copy)]
struct Symbol {
    kind: u8,
    section: u16,
    value: u64,
    size: u64,
}

impl Symbol {
    fn is_function(&self) -> bool {
        self.kind == STT_FUNC || self.kind == STT_GNU_IFUNC
    }

    /// Defined in a section (not undefined, absolute or common).
    fn is_defined(&self) -> bool {
        self.section != SHN_UNDEF && self.section < SHN_LORESERVE
    }
}

/// The symbol table aya-obj reads (the first SHT_SYMTAB) and its index.
struct SymbolTable {
    index: usize,
    symbols: Vec<Symbol>,
}

/// Refuses symbols that aya-obj would trust to slice their section with (it panics on a
/// symbol whose value and size run past its section, or that lies below a section
/// address): every symbol of a section of the file must lie inside it, and such a
/// section must have address 0, as in every relocatable object. Extended section indices
/// (SHN_XINDEX) are refused: they would name sections this check does not see. Returns
/// the first symbol table, the one aya-obj uses.
fn check_symbols(object: &ElfObject<'_>) -> Result<Option<SymbolTable>, LoadError> {
    let mut first = None;
    for (table_index, table) in object.sections.iter().enumerate() {
        if table.kind != SHT_SYMTAB {
            continue;
        }
        let bytes = object
            .section_bytes(table_index)
            .map_err(|_| LoadError::Elf("symbol table out of bounds".to_owned()))?;
        let mut symbols = Vec::with_capacity(bytes.len() / SYMBOL_SIZE);
        for (index, symbol) in bytes.chunks_exact(SYMBOL_SIZE).enumerate() {
            let kind = symbol[4] & 0xf;
            let section = le_u16(symbol, 6)?;
            let (value, length) = (le_u64(symbol, 8)?, le_u64(symbol, 16)?);
            symbols.push(Symbol {
                kind,
                section,
                value,
                size: length,
            });
            if section == SHN_XINDEX {
                return Err(malformed(
                    &table.display_name(),
                    format!("symbol {index} has an extended section index (SHN_XINDEX)"),
                ));
            }
            let Some(header) = object.sections.get(usize::from(section)) else {
                continue;
            };
            // 0 is undefined; from 0xff00 on, special (absolute, common).
            if section == SHN_UNDEF || section >= SHN_LORESERVE {
                continue;
            }
            let section_size = if header.kind == SHT_NOBITS {
                u64::MAX
            } else {
                header.size
            };
            let inside = header.address == 0
                && value
                    .checked_add(length)
                    .is_some_and(|end| end <= section_size);
            if !inside {
                return Err(LoadError::Elf(format!(
                    "symbol {index} ({length} bytes at {value}) lies outside its section {section}"
                )));
            }
        }
        if first.is_none() {
            first = Some(SymbolTable {
                index: table_index,
                symbols,
            });
        }
    }
    Ok(first)
}

/// Code and its relocations, as aya-obj links calls (`relocate_calls`): it computes a
/// callee's address from a call's immediate (`imm + 1` in i32, then times 8 in u64 for a
/// relocation against a section symbol, or plus the immediate for a 64-bit one), unwraps
/// the section of a function symbol, and `todo!()`s on a relocation into code whose symbol
/// is neither a function nor a section, or whose size is neither 32 nor 64 bits. So:
/// - no BPF-to-BPF call (`call` with src_reg 1) has immediate i32::MAX;
/// - a relocation of a code section whose symbol is a function, or lies in a code
///   section, names a defined function or a section symbol; against a section symbol it
///   is R_BPF_64_32 or R_BPF_64_64 (the two `object` gives a size), and the callee
///   address it yields does not overflow;
/// - a relocation naming a map or global data is not on the last instruction of a
///   function, and its immediate plus the symbol's value fits in i32 (see
///   [`check_data_reference`]).
fn check_code(object: &ElfObject<'_>, symbols: &Option<SymbolTable>) -> Result<(), LoadError> {
    const INSN_SIZE: usize = 8;
    const CALL: u8 = 0x85;
    const PSEUDO_CALL: u8 = 1;
    for (index, section) in object.sections.iter().enumerate() {
        if !object.is_code(index) {
            continue;
        }
        let code = object.section_bytes(index)?;
        for (number, insn) in code.chunks_exact(INSN_SIZE).enumerate() {
            let imm = le_i32(insn, 4)?;
            if insn[0] == CALL && insn[1] >> 4 == PSEUDO_CALL && imm == i32::MAX {
                return Err(malformed(
                    &section.display_name(),
                    format!("instruction {number}: a call with immediate {imm} leaves the code"),
                ));
            }
        }
    }
    let Some(table) = symbols else {
        return Ok(());
    };
    for (index, target, entry_size) in code_relocations(object, table) {
        let name = object.sections[index].display_name();
        let relocations = object.section_bytes(index)?;
        let code = object.section_bytes(target)?;
        for (number, entry) in relocations.chunks_exact(entry_size).enumerate() {
            let offset = le_u64(entry, 0)?;
            let info = le_u64(entry, 8)?;
            let (symbol_index, kind) = ((info >> 32) as usize, info as u32);
            let Some(symbol) = table.symbols.get(symbol_index) else {
                continue;
            };
            let relocation = Relocation {
                offset,
                kind,
                symbol,
                target,
                code,
            };
            check_relocation(object, table, &relocation).map_err(|why| {
                malformed(
                    &name,
                    format!("relocation {number} (symbol {symbol_index}): {why}"),
                )
            })?;
        }
    }
    Ok(())
}

/// The relocation sections aya-obj applies to code, as (relocation section, code section
/// it applies to, entry size): `object` hands aya-obj the relocations of sections linked
/// to its symbol table and applying to another section.
fn code_relocations<'o>(
    object: &'o ElfObject<'_>,
    table: &'o SymbolTable,
) -> impl Iterator<Item = (usize, usize, usize)> + 'o {
    object
        .sections
        .iter()
        .enumerate()
        .filter_map(move |(index, section)| {
            let entry_size = match section.kind {
                SHT_REL => 16,
                SHT_RELA => 24,
                _ => return None,
            };
            let target = section.info as usize;
            let applies =
                section.link as usize == table.index && target != 0 && object.is_code(target);
            applies.then_some((index, target, entry_size))
        })
}

/// One relocation of a code section.
struct Relocation<'a> {
    offset: u64,
    kind: u32,
    symbol: &'a Symbol,
    /// The index and bytes of the section it applies to.
    target: usize,
    code: &'a [u8],
}

/// See [`check_code`]; returns why `relocation` is refused.
fn check_relocation(
    object: &ElfObject<'_>,
    table: &SymbolTable,
    relocation: &Relocation<'_>,
) -> Result<(), String> {
    const INSN_SIZE: usize = 8;
    let symbol = relocation.symbol;
    let into_code = symbol.is_defined() && object.is_code(usize::from(symbol.section));
    // aya-obj only looks at relocations at an instruction of a function.
    let imm = usize::try_from(relocation.offset)
        .ok()
        .and_then(|at| bytes_at(relocation.code, at, INSN_SIZE).ok())
        .and_then(|insn| le_i32(insn, 4).ok());
    if !symbol.is_function() && !into_code {
        if symbol.is_defined() {
            return check_data_reference(table, relocation, imm);
        }
        return Ok(());
    }
    if symbol.is_function() {
        if !symbol.is_defined() {
            return Err("a function symbol with no section".to_owned());
        }
        return Ok(());
    }
    if symbol.kind != STT_SECTION {
        return Err(format!(
            "a symbol of type {} in code; only functions and sections may be named",
            symbol.kind
        ));
    }
    let kind = relocation.kind;
    if kind != R_BPF_64_32 && kind != R_BPF_64_64 {
        return Err(format!(
            "type {kind} against a section symbol (only R_BPF_64_32 and R_BPF_64_64)"
        ));
    }
    let Some(imm) = imm else {
        return Ok(());
    };
    let callee = if kind == R_BPF_64_32 {
        imm.checked_add(1)
            .and_then(|next| (next as u64).checked_mul(INSN_SIZE as u64))
            .and_then(|bytes| symbol.value.checked_add(bytes))
    } else {
        symbol.value.checked_add(imm as u64)
    };
    match callee {
        Some(_) => Ok(()),
        None => Err(format!(
            "immediate {imm} of the instruction at byte {} points before the section or past \
             any address",
            relocation.offset
        )),
    }
}

/// A reference to a map or global data, as aya-obj's `relocate_maps` resolves it: it
/// writes the instruction after the one relocated (the second half of an `ld_imm64`) and
/// adds the symbol's value to the immediate in i32. So the next instruction must belong to
/// every function the relocated one belongs to, and the sum must not overflow.
fn check_data_reference(
    table: &SymbolTable,
    relocation: &Relocation<'_>,
    imm: Option<i32>,
) -> Result<(), String> {
    let offset = relocation.offset;
    let cut_short = table.symbols.iter().any(|function| {
        function.is_function()
            && usize::from(function.section) == relocation.target
            && function.value <= offset
            && offset < function.value.saturating_add(function.size)
            && offset.saturating_add(16) > function.value.saturating_add(function.size)
    });
    if cut_short {
        return Err(format!(
            "a map or data reference at byte {offset}, the last instruction of its function \
             (a 16-byte ld_imm64 is expected)"
        ));
    }
    match imm {
        Some(imm) if imm.checked_add(relocation.symbol.value as i32).is_none() => Err(format!(
            "immediate {imm} plus the symbol's value {} overflows",
            relocation.symbol.value
        )),
        _ => Ok(()),
    }
}

/// The `len` bytes at `at`, or an error naming the offset (which may be any number the
/// file claims).
pub(crate) fn bytes_at(elf: &[u8], at: usize, len: usize) -> Result<&[u8], LoadError> {
    at.checked_add(len)
        .and_then(|end| elf.get(at..end))
        .ok_or_else(|| LoadError::Elf(format!("truncated at byte {at}")))
}

fn le_u16(bytes: &[u8], at: usize) -> Result<u16, LoadError> {
    bytes_at(bytes, at, 2).map(|b| u16::from_le_bytes([b[0], b[1]]))
}

fn le_u32(bytes: &[u8], at: usize) -> Result<u32, LoadError> {
    bytes_at(bytes, at, 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn le_i32(bytes: &[u8], at: usize) -> Result<i32, LoadError> {
    le_u32(bytes, at).map(|word| word as i32)
}

fn le_u64(bytes: &[u8], at: usize) -> Result<u64, LoadError> {
    let b = bytes_at(bytes, at, 8)?;
    let mut word = [0u8; 8];
    word.copy_from_slice(b);
    Ok(u64::from_le_bytes(word))
}

fn to_usize(value: u64) -> Result<usize, LoadError> {
    usize::try_from(value).map_err(|_| LoadError::Elf(format!("offset {value} too large")))
}
