//! `.BTF` and `.BTF.ext` checks: what aya-obj 0.3 (btf/btf.rs, btf/info.rs, obj.rs) takes
//! on trust when it parses them.
//!
//! `.BTF` (a header, then types and strings at offsets after it): aya-obj bounds the type
//! and string sections, but then looks strings up with offsets it checks against the
//! header's `hdr_len + str_off + str_len` (in u32, which overflows) rather than against
//! the string section it slices (which panics), and unwraps section names from
//! `.BTF.ext`; it multiplies an array's length by its element's size in u32. So: the
//! header fits in u32 arithmetic and in the section; every type record is whole; every
//! name offset of a type, member, enumerator or parameter lies in the string section,
//! which starts and ends with NUL (so every name is terminated), as the kernel requires;
//! no array's size, computed as aya-obj computes it, overflows u32.
//!
//! `.BTF.ext` (a header, then func_info, line_info and core_relo subsections, each a
//! record size and then, per program section, a name offset, a record count and the
//! records): aya-obj slices each subsection's records with the count it reads, unwraps
//! the name, cuts records into `rec_size` chunks (zero panics) and reads a whole record
//! from each, and, linking line info, subtracts the first line's instruction offset from
//! the others. So, as libbpf requires: the header lies in the section; each subsection lies
//! in the section; its record size is a multiple of 4 and at least the record's size
//! (8, 16, 16 bytes); every section's records lie in the subsection; its name is a string
//! of `.BTF`; the line_info records of a section are sorted by instruction offset.

use super::{le_u16, le_u32, malformed, ElfObject};
use crate::loader::LoadError;

const BTF_MAGIC: u16 = 0xeb9f;
const BTF_HEADER_SIZE: u32 = 24;
/// The `.BTF.ext` header up to `line_info_len`, the least libbpf accepts.
const EXT_HEADER_MIN: u32 = 24;
/// The `.BTF.ext` header with `core_relo_off` / `core_relo_len`, all aya-obj reads.
const EXT_HEADER_CORE: u32 = 32;
const TYPE_HEADER_SIZE: usize = 12;
/// Resolution depth of aya-obj's `type_size` (`MAX_RESOLVE_DEPTH`).
const MAX_RESOLVE_DEPTH: usize = 32;

/// Checks the object's `.BTF` and, against its strings, its `.BTF.ext`. An object with
/// no `.BTF` has its `.BTF.ext` ignored by aya-obj, and here.
pub(super) fn check(object: &ElfObject<'_>) -> Result<(), LoadError> {
    let Some(btf) = only_section(object, b".BTF")? else {
        return Ok(());
    };
    let strings = check_btf(object.section_bytes(btf)?)?;
    if let Some(ext) = only_section(object, b".BTF.ext")? {
        check_btf_ext(object.section_bytes(ext)?, strings)?;
    }
    Ok(())
}

/// The index of the section called `name`, refusing two (aya-obj would parse the first,
/// and every check here would have to agree on which).
fn only_section(object: &ElfObject<'_>, name: &[u8]) -> Result<Option<usize>, LoadError> {
    let mut found = object
        .sections
        .iter()
        .enumerate()
        .filter(|(_, section)| section.name == name)
        .map(|(index, _)| index);
    match (found.next(), found.next()) {
        (first, None) => Ok(first),
        (_, Some(_)) => Err(malformed(
            &String::from_utf8_lossy(name),
            "more than one section of that name",
        )),
    }
}

/// What aya-obj's `type_size` needs of one type.
#[derive(Debug, Clone, Copy)]
enum TypeShape {
    /// A size of its own (int, float, enum, struct, union, datasec, and pointers, 8).
    Sized(u32),
    /// Refers to another type (modifiers, typedef, func_proto, var, tags).
    Refers(u32),
    /// An array: element type and length.
    Array { element: u32, length: u32 },
    /// Neither (void, fwd, func): aya-obj's `type_size` fails with an error.
    Other,
}

/// Checks `.BTF` (see the module header) and returns its string section.
fn check_btf(data: &[u8]) -> Result<&[u8], LoadError> {
    let fail = |what: String| malformed(".BTF", what);
    if data.len() < BTF_HEADER_SIZE as usize {
        return Err(fail(format!(
            "{} bytes, shorter than the {BTF_HEADER_SIZE}-byte header",
            data.len()
        )));
    }
    let magic = le_u16(data, 0)?;
    if magic != BTF_MAGIC {
        return Err(fail(format!("magic {magic:#06x}, not {BTF_MAGIC:#06x}")));
    }
    let header_len = le_u32(data, 4)?;
    if header_len < BTF_HEADER_SIZE || header_len as usize > data.len() {
        return Err(fail(format!(
            "header length {header_len} (at least {BTF_HEADER_SIZE}, at most the section's {})",
            data.len()
        )));
    }
    let part = |what: &str, at: usize| -> Result<&[u8], LoadError> {
        let (offset, len) = (le_u32(data, at)?, le_u32(data, at + 4)?);
        header_len
            .checked_add(offset)
            .and_then(|start| Some((start, start.checked_add(len)?)))
            .and_then(|(start, end)| data.get(start as usize..end as usize))
            .ok_or_else(|| {
                fail(format!(
                    "{what}: {len} bytes at offset {offset} after the {header_len}-byte header \
                     run past the section ({} bytes)",
                    data.len()
                ))
            })
    };
    let types = part("type section", 8)?;
    let strings = part("string section", 16)?;
    if strings.first() != Some(&0) || strings.last() != Some(&0) {
        return Err(fail(
            "the string section does not start and end with a NUL".to_owned(),
        ));
    }
    let shapes = check_types(types, strings)?;
    check_type_sizes(&shapes)?;
    Ok(strings)
}

/// Walks the type records as aya-obj reads them; checks every name offset. Returns each
/// type's shape, by id (id 0 is void).
fn check_types(types: &[u8], strings: &[u8]) -> Result<Vec<TypeShape>, LoadError> {
    let mut shapes = vec![TypeShape::Other];
    let mut at = 0;
    while at < types.len() {
        let id = shapes.len();
        let fail = |what: String| malformed(".BTF", format!("type {id}: {what}"));
        let header = types.get(at..at + TYPE_HEADER_SIZE).ok_or_else(|| {
            fail(format!(
                "its {TYPE_HEADER_SIZE}-byte header at byte {at} runs past the type section \
                 ({} bytes)",
                types.len()
            ))
        })?;
        let (name, info, size_or_type) =
            (le_u32(header, 0)?, le_u32(header, 4)?, le_u32(header, 8)?);
        let kind = (info >> 24) & 0x1f;
        let count = (info & 0xffff) as usize;
        // Bytes after the header, and the size of each named entry among them.
        let (extra, named_entry) = match kind {
            0 | 2 | 7..=12 | 16 | 18 => (0, None),
            1 | 14 | 17 => (4, None),
            3 => (12, None),
            4 | 5 | 19 => (12 * count, Some(12)),
            6 => (8 * count, Some(8)),
            13 => (8 * count, Some(8)),
            15 => (12 * count, None),
            _ => return Err(fail(format!("unknown kind {kind}"))),
        };
        let body_start = at + TYPE_HEADER_SIZE;
        let body = types.get(body_start..body_start + extra).ok_or_else(|| {
            fail(format!(
                "kind {kind} with {count} entries: {} bytes at byte {at} run past the type \
                 section ({} bytes)",
                TYPE_HEADER_SIZE + extra,
                types.len()
            ))
        })?;
        check_name(strings, name, || format!("type {id}"))?;
        if let Some(entry_size) = named_entry {
            for (entry, bytes) in body.chunks_exact(entry_size).enumerate() {
                check_name(strings, le_u32(bytes, 0)?, || {
                    format!("type {id}, entry {entry}")
                })?;
            }
        }
        shapes.push(match kind {
            1 | 4 | 5 | 6 | 15 | 16 | 19 => TypeShape::Sized(size_or_type),
            2 => TypeShape::Sized(8),
            3 => TypeShape::Array {
                element: le_u32(body, 0)?,
                length: le_u32(body, 8)?,
            },
            8..=11 | 13 | 14 | 17 | 18 => TypeShape::Refers(size_or_type),
            _ => TypeShape::Other,
        });
        at = body_start + extra;
    }
    Ok(shapes)
}

/// A name offset must lie in the string section (which ends with a NUL, so the name is
/// terminated).
fn check_name(
    strings: &[u8],
    offset: u32,
    whose: impl FnOnce() -> String,
) -> Result<(), LoadError> {
    if (offset as usize) < strings.len() {
        return Ok(());
    }
    Err(malformed(
        ".BTF",
        format!(
            "{}: name offset {offset} is outside the string section ({} bytes)",
            whose(),
            strings.len()
        ),
    ))
}

/// Runs aya-obj's `type_size` on every type, refusing where its `size * n_elems` (u32)
/// would overflow; the kernel refuses such arrays too.
fn check_type_sizes(shapes: &[TypeShape]) -> Result<(), LoadError> {
    for root in 1..shapes.len() {
        let mut id = root;
        let mut elements = 1u32;
        for _ in 0..MAX_RESOLVE_DEPTH {
            let Some(shape) = shapes.get(id) else {
                break;
            };
            match *shape {
                TypeShape::Array { element, length } => {
                    elements = length;
                    id = element as usize;
                }
                TypeShape::Refers(next) => id = next as usize,
                TypeShape::Sized(size) => {
                    if size.checked_mul(elements).is_none() {
                        return Err(malformed(
                            ".BTF",
                            format!(
                                "type {root}: {elements} elements of {size} bytes overflow \
                                 a 32-bit size"
                            ),
                        ));
                    }
                    break;
                }
                TypeShape::Other => break,
            }
        }
    }
    Ok(())
}

/// One `.BTF.ext` subsection: its name, where its offset and length are in the header,
/// and the least record size.
struct Subsection {
    name: &'static str,
    header_at: usize,
    min_record: u32,
    /// Whether its records start with an instruction offset that must not decrease.
    sorted: bool,
}

const SUBSECTIONS: [Subsection; 3] = [
    Subsection {
        name: "func_info",
        header_at: 8,
        min_record: 8,
        sorted: false,
    },
    Subsection {
        name: "line_info",
        header_at: 16,
        min_record: 16,
        sorted: true,
    },
    Subsection {
        name: "core_relo",
        header_at: 24,
        min_record: 16,
        sorted: false,
    },
];

/// Checks `.BTF.ext` (see the module header) against the string section of `.BTF`.
fn check_btf_ext(data: &[u8], strings: &[u8]) -> Result<(), LoadError> {
    let fail = |what: String| malformed(".BTF.ext", what);
    if data.len() < EXT_HEADER_MIN as usize {
        return Err(fail(format!(
            "{} bytes, shorter than the {EXT_HEADER_MIN}-byte header",
            data.len()
        )));
    }
    let magic = le_u16(data, 0)?;
    if magic != BTF_MAGIC {
        return Err(fail(format!("magic {magic:#06x}, not {BTF_MAGIC:#06x}")));
    }
    let header_len = le_u32(data, 4)?;
    if header_len < EXT_HEADER_MIN || header_len as usize > data.len() {
        return Err(fail(format!(
            "header length {header_len} (at least {EXT_HEADER_MIN}, at most the section's {})",
            data.len()
        )));
    }
    // aya-obj copies the header's first `hdr_len` bytes (at most 32) over zeros.
    let mut header = [0u8; EXT_HEADER_CORE as usize];
    let copied = header_len.min(EXT_HEADER_CORE) as usize;
    header[..copied].copy_from_slice(&data[..copied]);
    for subsection in &SUBSECTIONS {
        let offset = le_u32(&header, subsection.header_at)?;
        let len = le_u32(&header, subsection.header_at + 4)?;
        check_subsection(data, strings, header_len, subsection, offset, len)?;
    }
    Ok(())
}

fn check_subsection(
    data: &[u8],
    strings: &[u8],
    header_len: u32,
    subsection: &Subsection,
    offset: u32,
    len: u32,
) -> Result<(), LoadError> {
    let name = subsection.name;
    let fail = |what: String| malformed(".BTF.ext", format!("{name} {what}"));
    if len == 0 {
        return Ok(());
    }
    // aya-obj adds these in u32 (`hdr_len + offset`), then in usize.
    let (start, end) = header_len
        .checked_add(offset)
        .and_then(|start| Some((start as usize, start.checked_add(len)? as usize)))
        .filter(|&(_, end)| end <= data.len())
        .ok_or_else(|| {
            fail(format!(
                "subsection: {len} bytes at offset {offset} after the {header_len}-byte header \
                 run past the section ({} bytes)",
                data.len()
            ))
        })?;
    if len < 4 {
        return Err(fail(format!(
            "subsection: {len} bytes, too short for its record size"
        )));
    }
    let record_size = le_u32(data, start)?;
    if record_size < subsection.min_record || record_size % 4 != 0 {
        return Err(fail(format!(
            "subsection: record size {record_size}, not a multiple of 4 of at least {}",
            subsection.min_record
        )));
    }
    let mut at = start + 4;
    let mut index = 0;
    while at < end {
        let what = |what: String| fail(format!("record {index}: {what}"));
        if end - at < 8 {
            return Err(what(format!(
                "{} bytes left, too few for a section name and a record count",
                end - at
            )));
        }
        let (section_name, count) = (le_u32(data, at)?, le_u32(data, at + 4)?);
        if section_name as usize >= strings.len() {
            return Err(what(format!(
                "section name offset {section_name} is outside the .BTF string section \
                 ({} bytes)",
                strings.len()
            )));
        }
        if count == 0 {
            return Err(what("no records".to_owned()));
        }
        let records_start = at + 8;
        let records_end = u64::from(record_size)
            .checked_mul(u64::from(count))
            .and_then(|bytes| (records_start as u64).checked_add(bytes))
            .filter(|&records_end| records_end <= end as u64)
            .ok_or_else(|| {
                what(format!(
                    "{count} records of {record_size} bytes run past the section (offset \
                     {records_start}, length {})",
                    data.len()
                ))
            })? as usize;
        if subsection.sorted {
            let mut previous = 0;
            for record in data[records_start..records_end].chunks_exact(record_size as usize) {
                let insn_offset = le_u32(record, 0)?;
                if insn_offset < previous {
                    return Err(what(format!(
                        "instruction offsets out of order ({previous} then {insn_offset})"
                    )));
                }
                previous = insn_offset;
            }
        }
        at = records_end;
        index += 1;
    }
    Ok(())
}
