//! The BTF a program needs to be loaded: one `FUNC` per subprogram.
//!
//! Layer: kernel-ext, between [`crate::sys`] and [`crate::loader`].
//!
//! Interface: [`FuncBtf::for_program`] finds the subprograms of linked instructions (the
//! way the verifier does: instruction 0, every BPF-to-BPF call target and every function
//! address loaded for a helper) and builds a BTF blob with a `FUNC` type for each, plus the
//! `bpf_func_info` records that tie them to their first instruction.
//!
//! Why it is synthesized instead of taken from the object: the verifier insists on
//! func_info as soon as a program passes a function to a helper (`bpf_loop`: "missing btf
//! func_info"), and the binder links code from two objects (the driver and an
//! application), whose BTF type ids do not share a space. The kernel checks only that each
//! record names a `FUNC` and that the records start exactly the subprograms; it verifies
//! static functions through their callers' registers, not their prototypes. So every
//! subprogram gets the prototype `int (void)` and static linkage, the form `bpf_loop`
//! requires of its callback; instruction 0 is the program's entry, named after it.
//!
//! Invariants: records are sorted by instruction, the first is at 0, and their count is
//! the number of subprograms; type ids are 3.. in the same order.

use crate::sys::FuncInfo;

/// `BPF_JMP | BPF_CALL`.
const OP_CALL: u8 = 0x85;
/// `BPF_LD | BPF_IMM | BPF_DW` (the first half of a 16-byte instruction).
const OP_LD_IMM64: u8 = 0x18;
/// `src_reg` of a call to a BPF function (not a helper).
const BPF_PSEUDO_CALL: u8 = 1;
/// `src_reg` of a 64-bit load of a BPF function's address.
const BPF_PSEUDO_FUNC: u8 = 4;

const BTF_MAGIC: u16 = 0xeb9f;
const BTF_HEADER_LEN: u32 = 24;
const BTF_KIND_INT: u32 = 1;
const BTF_KIND_FUNC: u32 = 12;
const BTF_KIND_FUNC_PROTO: u32 = 13;
/// `BTF_INT_SIGNED` in the int encoding's top byte, 32 bits wide.
const BTF_INT_SIGNED_32: u32 = (1 << 24) | 32;
const BTF_FUNC_STATIC: u32 = 0;
/// Type id of the `int` type, and of the `int (void)` prototype.
const INT_TYPE: u32 = 1;
const PROTO_TYPE: u32 = 2;

/// A BTF blob and the func_info records of one program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FuncBtf {
    /// Raw BTF, ready for BPF_BTF_LOAD.
    pub btf: Vec<u8>,
    /// One record per subprogram, by first instruction.
    pub func_info: Vec<FuncInfo>,
}

impl FuncBtf {
    /// The BTF of the program `name` with instructions `insns` (see [`crate::sys`] for the
    /// u64 encoding).
    pub fn for_program(name: &str, insns: &[u64]) -> Self {
        let starts = subprogram_starts(insns);
        let mut strings = vec![0u8];
        let mut add_string = |text: &str| {
            let offset = strings.len() as u32;
            strings.extend_from_slice(text.as_bytes());
            strings.push(0);
            offset
        };
        let mut types: Vec<u32> = Vec::new();
        // [1] int
        types.extend([add_string("int"), BTF_KIND_INT << 24, 4, BTF_INT_SIGNED_32]);
        // [2] int (void)
        types.extend([0, BTF_KIND_FUNC_PROTO << 24, INT_TYPE]);
        let mut func_info = Vec::with_capacity(starts.len());
        for (index, &start) in starts.iter().enumerate() {
            let func_name = if start == 0 {
                identifier(name)
            } else {
                format!("sub_{start}")
            };
            let name_off = add_string(&func_name);
            types.extend([
                name_off,
                (BTF_KIND_FUNC << 24) | BTF_FUNC_STATIC,
                PROTO_TYPE,
            ]);
            func_info.push(FuncInfo {
                insn_off: start,
                type_id: PROTO_TYPE + 1 + index as u32,
            });
        }
        Self {
            btf: blob(&types, &strings),
            func_info,
        }
    }
}

/// BTF describing a map's key as a 32-bit `int` (type 1) and its value as an array of
/// `value_size` bytes (type 3): what a local-storage map (task storage) must be created
/// with. The kernel checks only that the key is a 32-bit int and that the value type has
/// the value's size.
pub fn map_btf(value_size: u32) -> (Vec<u8>, u32, u32) {
    const BTF_KIND_ARRAY: u32 = 3;
    let strings = b"\0int\0u8\0";
    let types: [u32; 13] = [
        // [1] int
        1,
        BTF_KIND_INT << 24,
        4,
        BTF_INT_SIGNED_32,
        // [2] u8
        5,
        BTF_KIND_INT << 24,
        1,
        8,
        // [3] u8[value_size], indexed by int
        0,
        BTF_KIND_ARRAY << 24,
        0,
        2,
        1,
    ];
    let mut types = types.to_vec();
    types.push(value_size);
    (blob(&types, strings), INT_TYPE, 3)
}

/// BTF for an array map (`int` key, type 1) whose value of `value_size` bytes starts with
/// a referenced kptr to the kernel's `task_struct` (type 7: `{ task: PTR -> TYPE_TAG
/// "kptr" -> STRUCT task_struct; rest: u8[value_size - 8] }`). The kernel finds the field
/// by its type tag and resolves `task_struct` by name in its own BTF, so the struct here
/// is empty. `value_size` must exceed 8.
pub fn task_kptr_map_btf(value_size: u32) -> (Vec<u8>, u32, u32) {
    const BTF_KIND_PTR: u32 = 2;
    const BTF_KIND_ARRAY: u32 = 3;
    const BTF_KIND_STRUCT: u32 = 4;
    const BTF_KIND_TYPE_TAG: u32 = 18;
    let strings = b"\0int\0u8\0task_struct\0kptr\0exofs_task_value\0task\0rest\0";
    let name = |text: &str| -> u32 {
        let needle = [&[0u8][..], text.as_bytes(), &[0u8][..]].concat();
        strings
            .windows(needle.len())
            .position(|window| window == needle)
            .map_or(0, |at| at as u32 + 1)
    };
    let types: Vec<u32> = vec![
        // [1] int
        name("int"),
        BTF_KIND_INT << 24,
        4,
        BTF_INT_SIGNED_32,
        // [2] u8
        name("u8"),
        BTF_KIND_INT << 24,
        1,
        8,
        // [3] struct task_struct {}
        name("task_struct"),
        BTF_KIND_STRUCT << 24,
        0,
        // [4] task_struct __kptr
        name("kptr"),
        BTF_KIND_TYPE_TAG << 24,
        3,
        // [5] pointer to [4]
        0,
        BTF_KIND_PTR << 24,
        4,
        // [6] u8[value_size - 8]
        0,
        BTF_KIND_ARRAY << 24,
        0,
        2,
        1,
        value_size.saturating_sub(8),
        // [7] struct exofs_task_value { task; rest }
        name("exofs_task_value"),
        (BTF_KIND_STRUCT << 24) | 2,
        value_size,
        name("task"),
        5,
        0,
        name("rest"),
        6,
        64,
    ];
    (blob(&types, strings), INT_TYPE, 7)
}

/// A raw BTF blob: header, then `types`, then `strings`.
fn blob(types: &[u32], strings: &[u8]) -> Vec<u8> {
    let type_len = (types.len() * 4) as u32;
    let mut btf = Vec::with_capacity(BTF_HEADER_LEN as usize + type_len as usize + strings.len());
    btf.extend_from_slice(&BTF_MAGIC.to_le_bytes());
    btf.extend_from_slice(&[1, 0]); // version 1, no flags
    for word in [BTF_HEADER_LEN, 0, type_len, type_len, strings.len() as u32] {
        btf.extend_from_slice(&word.to_le_bytes());
    }
    for word in types {
        btf.extend_from_slice(&word.to_le_bytes());
    }
    btf.extend_from_slice(strings);
    btf
}

/// First instructions of the subprograms of `insns`, sorted: 0 and every target of a
/// BPF-to-BPF call or of a function-address load. Targets outside the program are left
/// out (the verifier reports them).
pub fn subprogram_starts(insns: &[u64]) -> Vec<u32> {
    let mut starts = vec![0u32];
    let mut index = 0usize;
    while index < insns.len() {
        let insn = insns[index];
        let code = insn as u8;
        let src = ((insn >> 12) & 0xf) as u8;
        let imm = (insn >> 32) as u32 as i32;
        let width = if code == OP_LD_IMM64 { 2 } else { 1 };
        if (code == OP_CALL && src == BPF_PSEUDO_CALL)
            || (code == OP_LD_IMM64 && src == BPF_PSEUDO_FUNC)
        {
            let target = index as i64 + 1 + i64::from(imm);
            if let Ok(target) = u32::try_from(target) {
                if (target as usize) < insns.len() {
                    starts.push(target);
                }
            }
        }
        index += width;
    }
    starts.sort_unstable();
    starts.dedup();
    starts
}

/// `name` as a BTF identifier (`[A-Za-z_][A-Za-z0-9_]*`).
fn identifier(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if !out.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
        out.insert(0, '_');
    }
    out
}

/// The BTF id of the kernel function `name` in the running kernel's BTF
/// (/sys/kernel/btf/vmlinux, read once): what a kfunc call's immediate holds.
pub fn vmlinux_func_id(name: &str) -> Result<u32, String> {
    static VMLINUX: std::sync::OnceLock<Result<aya_obj::btf::Btf, String>> =
        std::sync::OnceLock::new();
    let btf = VMLINUX
        .get_or_init(|| {
            aya_obj::btf::Btf::from_sys_fs()
                .map_err(|err| format!("reading /sys/kernel/btf/vmlinux: {err}"))
        })
        .as_ref()
        .map_err(Clone::clone)?;
    btf.id_by_type_name_kind(name, aya_obj::btf::BtfKind::Func)
        .map_err(|_| format!("the running kernel's BTF has no function `{name}`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insn(code: u8, src: u8, imm: i32) -> u64 {
        u64::from(code) | u64::from(src) << 12 | u64::from(imm as u32) << 32
    }

    const EXIT: u64 = 0x95;

    #[test]
    fn finds_call_and_callback_targets() {
        let insns = [
            insn(OP_CALL, BPF_PSEUDO_CALL, 3),     // 0 -> 4
            insn(OP_LD_IMM64, BPF_PSEUDO_FUNC, 4), // 1 -> 6
            0,
            insn(OP_CALL, 0, 181), // helper call: not a subprogram
            EXIT,                  // 4
            EXIT,
            EXIT, // 6
        ];
        assert_eq!(subprogram_starts(&insns), vec![0, 4, 6]);
    }

    #[test]
    fn blob_has_one_func_per_subprogram() {
        let insns = [insn(OP_CALL, BPF_PSEUDO_CALL, 1), EXIT, EXIT];
        let btf = FuncBtf::for_program("exofs-chain", &insns);
        assert_eq!(
            btf.func_info,
            vec![
                FuncInfo {
                    insn_off: 0,
                    type_id: 3
                },
                FuncInfo {
                    insn_off: 2,
                    type_id: 4
                }
            ]
        );
        assert_eq!(&btf.btf[..2], &BTF_MAGIC.to_le_bytes());
        assert!(btf.btf.ends_with(b"\0int\0exofs_chain\0sub_2\0"));
        // header + int (16 bytes) + proto (12) + 2 funcs (12 each) + 23 bytes of strings
        assert_eq!(btf.btf.len(), 24 + 16 + 12 + 24 + 23);
    }

    #[test]
    fn identifiers_are_valid() {
        assert_eq!(identifier("9lives-x"), "_9lives_x");
        assert_eq!(identifier("ok_name"), "ok_name");
    }
}
