//! Calls to kernel functions (kfuncs) in an object, and their resolution.
//!
//! clang (an `extern` function, `__ksym` or not) and bpf-linker (a Rust `extern "C"`
//! declaration) both compile a call to a function the object does not define into
//! `call -1` with src_reg 1 (a BPF-to-BPF call) and an R_BPF_64_32 relocation against an
//! undefined symbol of type NOTYPE. aya-obj 0.3 knows nothing of kfuncs and refuses such
//! a call ("unknown function"). [`resolve`] rewrites each one, in the copy of the object
//! the loader hands aya-obj, into what the kernel expects: src_reg
//! BPF_PSEUDO_KFUNC_CALL (2), offset 0 (vmlinux, no module BTF), immediate the BTF id of
//! the function in /sys/kernel/btf/vmlinux. aya-obj then sees no BPF-to-BPF call there
//! and leaves it alone; the verifier checks the call against the kernel's prototype and
//! flags (acquire, release, may return NULL).

use super::{le_u32, le_u64, ElfObject, SymbolTable};
use crate::loader::LoadError;

const CALL: u8 = 0x85;
const PSEUDO_CALL: u8 = 1;
const PSEUDO_KFUNC_CALL: u8 = 2;
const STT_NOTYPE: u8 = 0;
const INSN_SIZE: usize = 8;

/// A call to a function the object does not define.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExternCall {
    /// Where the call instruction is in the file.
    pub(crate) file_offset: usize,
    /// The function's name.
    pub(crate) name: String,
}

/// The calls of `object`'s code to functions it does not define (see the module header).
pub(crate) fn extern_calls(object: &ElfObject<'_>) -> Result<Vec<ExternCall>, LoadError> {
    let Some(table) = super::check_symbols(object)? else {
        return Ok(Vec::new());
    };
    let names = symbol_names(object, &table)?;
    let mut calls = Vec::new();
    for (index, target, entry_size) in super::code_relocations(object, &table) {
        let relocations = object.section_bytes(index)?;
        let code_offset = super::to_usize(object.sections[target].offset)?;
        let code = object.section_bytes(target)?;
        for entry in relocations.chunks_exact(entry_size) {
            let offset = super::to_usize(le_u64(entry, 0)?)?;
            let symbol_index = (le_u64(entry, 8)? >> 32) as usize;
            let Some(symbol) = table.symbols.get(symbol_index) else {
                continue;
            };
            if symbol.is_defined() || symbol.kind != STT_NOTYPE {
                continue;
            }
            let Some(insn) = offset
                .checked_add(INSN_SIZE)
                .and_then(|end| code.get(offset..end))
            else {
                continue;
            };
            let name = names.get(symbol_index).cloned().unwrap_or_default();
            if insn[0] != CALL || insn[1] >> 4 != PSEUDO_CALL {
                return Err(LoadError::Kfunc {
                    name,
                    why: "the object refers to it other than by a call (an extern variable?)"
                        .to_owned(),
                });
            }
            calls.push(ExternCall {
                file_offset: code_offset + offset,
                name,
            });
        }
    }
    Ok(calls)
}

/// Each symbol's name, by index (from the string table the symbol table links to).
fn symbol_names(object: &ElfObject<'_>, table: &SymbolTable) -> Result<Vec<String>, LoadError> {
    let link = object.sections[table.index].link as usize;
    if link >= object.sections.len() {
        return Err(super::malformed(
            &object.sections[table.index].display_name(),
            format!("the symbol table's string table is section {link}, which does not exist"),
        ));
    }
    let strings = object.section_bytes(link)?;
    let symbols = object.section_bytes(table.index)?;
    symbols
        .chunks_exact(super::SYMBOL_SIZE)
        .map(|symbol| {
            let at = le_u32(symbol, 0)? as usize;
            Ok(strings
                .get(at..)
                .and_then(|rest| std::ffi::CStr::from_bytes_until_nul(rest).ok())
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default())
        })
        .collect()
}

/// Rewrites every call of `calls` in `elf` (a copy of the object) into a kfunc call, with
/// the function's BTF id from `id_of` (the running kernel's BTF).
pub(crate) fn resolve(
    elf: &mut [u8],
    calls: &[ExternCall],
    id_of: &dyn Fn(&str) -> Result<u32, String>,
) -> Result<(), LoadError> {
    for call in calls {
        let id = id_of(&call.name).map_err(|why| LoadError::Kfunc {
            name: call.name.clone(),
            why,
        })?;
        let insn = call
            .file_offset
            .checked_add(INSN_SIZE)
            .and_then(|end| elf.get_mut(call.file_offset..end))
            .ok_or_else(|| LoadError::Elf("a call past the end of the file".to_owned()))?;
        insn[1] = PSEUDO_KFUNC_CALL << 4;
        insn[2..4].copy_from_slice(&0u16.to_le_bytes());
        insn[4..8].copy_from_slice(&id.to_le_bytes());
    }
    Ok(())
}
