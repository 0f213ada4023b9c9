//! Shared by the binder targets: the independent decoder that says whether code escapes
//! the driver's sandbox, and the check that a refusal says why.

use kernel_ext::binder::BindError;

/// The one helper an application may call (BPF_FUNC_loop).
const BPF_FUNC_LOOP: i32 = 181;

/// Why `insns` would let application code escape the driver's sandbox, if it would.
///
/// Written from the instruction set (Linux Documentation/bpf/standardization/
/// instruction-set.rst), independently of the binder's code.
pub fn escapes(insns: &[u64]) -> Option<String> {
    let inside = |at: usize, delta: i64| -> bool {
        let target = at as i64 + 1 + delta;
        target >= 0 && target < insns.len() as i64
    };
    let mut at = 0;
    while at < insns.len() {
        let raw = insns[at];
        let opcode = (raw & 0xff) as u8;
        let src_reg = ((raw >> 12) & 0x0f) as u8;
        let offset = i64::from((raw >> 16) as u16 as i16);
        let imm = i64::from((raw >> 32) as u32 as i32);
        let class = opcode & 0x07;
        let mode = opcode & 0xe0;
        let operation = opcode & 0xf0;
        match class {
            // BPF_LD: only the 16-byte immediate load (BPF_IMM | BPF_DW) is not a packet read.
            0x00 => {
                if opcode != 0x18 {
                    return Some(format!("{at}: legacy packet load {opcode:#04x}"));
                }
                match src_reg {
                    0 => {}
                    // BPF_PSEUDO_FUNC: the address of a function, which must be ours.
                    4 if inside(at, imm) => {}
                    4 => return Some(format!("{at}: address of a function outside the code")),
                    other => {
                        return Some(format!(
                            "{at}: ld_imm64 with src_reg {other} (a map or kernel object)"
                        ))
                    }
                }
                at += 2;
                continue;
            }
            // BPF_LDX: reads through a pointer the verifier checks, in the BPF_MEM and
            // BPF_MEMSX modes only.
            0x01 if mode != 0x60 && mode != 0x80 => {
                return Some(format!("{at}: load mode {mode:#04x}"));
            }
            // BPF_JMP and BPF_JMP32.
            0x05 | 0x06 => match operation {
                0x80 => match (class, src_reg) {
                    (0x05, 0) if imm == i64::from(BPF_FUNC_LOOP) => {}
                    (0x05, 0) => return Some(format!("{at}: calls helper {imm}")),
                    (0x05, 1) if inside(at, imm) => {}
                    (0x05, 1) => return Some(format!("{at}: calls outside the code")),
                    (0x05, 2) => return Some(format!("{at}: calls a kfunc")),
                    _ => return Some(format!("{at}: call of kind {src_reg} (class {class})")),
                },
                0x90 => {}
                _ => {
                    // BPF_JMP32 | BPF_JA (gotol) keeps its offset in imm.
                    let delta = if class == 0x06 && operation == 0x00 {
                        imm
                    } else {
                        offset
                    };
                    if !inside(at, delta) {
                        return Some(format!("{at}: jumps outside the code"));
                    }
                }
            },
            _ => {}
        }
        at += 1;
    }
    None
}

/// Asserts that `error` says why, and for `insns` (when known) that it points inside them.
pub fn assert_explained(error: &BindError, insns: Option<&[u64]>) {
    let message = error.to_string();
    assert!(
        !message.trim().is_empty(),
        "a refusal without a message: {error:?}"
    );
    match error {
        BindError::Refused {
            index,
            opcode,
            reason,
        } => {
            assert!(
                !reason.trim().is_empty(),
                "a refusal without a reason: {error:?}"
            );
            assert!(
                message.contains(&format!("instruction {index}")),
                "the message does not name the instruction: {message}"
            );
            if let Some(insns) = insns {
                assert!(
                    *index < insns.len(),
                    "index {index} past {} instructions",
                    insns.len()
                );
                assert_eq!(
                    *opcode, insns[*index] as u8,
                    "the opcode named is not the instruction's"
                );
            }
        }
        BindError::Object(source) | BindError::Driver(source) => {
            assert!(
                !source.to_string().trim().is_empty(),
                "an object error without a message: {error:?}"
            );
        }
        BindError::Data { name } => {
            assert!(
                message.contains(name.as_str()),
                "the message does not name `{name}`: {message}"
            );
        }
        BindError::NoNext => {}
    }
}
