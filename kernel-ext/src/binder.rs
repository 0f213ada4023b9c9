//! The binder: links an application's `next` into a fresh copy of the trusted driver.
//!
//! Layer: kernel-ext, above [`crate::loader`]; used by [`crate::binding`] to load programs.
//!
//! Interface: [`extract`] takes an application object (Rust through bpf-linker, or C through
//! clang) and returns its `next` linked with its callees, after [`check`] passed every
//! instruction; [`splice`] puts that code in place of the driver's placeholder
//! `exofs_next`.
//!
//! Why: syscall programs compose only through static BPF-to-BPF calls (no freplace, no tail
//! calls from sleepable programs here), so the application's code must become part of the
//! driver's program. The verifier then proves the whole program safe; the allowlist keeps
//! the application to pure computation over what the driver hands it (its HopState and
//! its stack), so that every block it sees came through the driver's checks.
//!
//! Invariants:
//! - Application code may contain: ALU and jump instructions, loads and stores (BPF_MEM,
//!   and sign-extending loads), 64-bit constants, calls to its own functions, references to
//!   its own functions (for `bpf_loop` callbacks), calls to the helpers in
//!   [`ALLOWED_HELPERS`], and exits. Everything else is refused, with the instruction's
//!   index in the linked `next`, its opcode and why: map and kernel-object references,
//!   other helpers (tail calls, `bpf_probe_read_*`, `bpf_copy_from_user`, ...), kfuncs,
//!   atomics, legacy packet loads, jumps or calls out of its own code.
//! - The application object may define no maps or global data (`.data`, `.rodata`,
//!   `.bss`): the application sees nothing the driver did not give it.
//! - Splicing moves code only between subprograms: jumps never cross a subprogram, so only
//!   calls and function references that cross the cut are re-aimed.

use crate::loader::{Kfuncs, Linker, LoadError};

/// The application function's symbol.
pub const APP_FUNCTION: &str = "next";
/// Section an application may put `next` in instead of `.text` (and the alias aya-obj
/// parses it under).
pub const APP_SECTION: &str = "exofs/next";
const APP_SECTION_ALIAS: &str = "kprobe/exofs.next";
/// The driver's placeholder that `next` replaces.
pub const PLACEHOLDER: &str = "exofs_next";

/// Helpers an application may call, by number.
pub const ALLOWED_HELPERS: &[(i32, &str)] = &[(181, "bpf_loop")];

/// Names of helpers for error messages (the ones an application is most likely to try).
const HELPER_NAMES: &[(i32, &str)] = &[
    (1, "bpf_map_lookup_elem"),
    (2, "bpf_map_update_elem"),
    (3, "bpf_map_delete_elem"),
    (4, "bpf_probe_read"),
    (5, "bpf_ktime_get_ns"),
    (6, "bpf_trace_printk"),
    (12, "bpf_tail_call"),
    (14, "bpf_get_current_pid_tgid"),
    (15, "bpf_get_current_uid_gid"),
    (16, "bpf_get_current_comm"),
    (35, "bpf_get_current_task"),
    (112, "bpf_probe_read_user"),
    (113, "bpf_probe_read_kernel"),
    (114, "bpf_probe_read_user_str"),
    (115, "bpf_probe_read_kernel_str"),
    (148, "bpf_copy_from_user"),
    (158, "bpf_get_current_task_btf"),
    (166, "bpf_sys_bpf"),
];

/// Why an application object cannot be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The object could not be parsed or linked.
    #[error("application object: {0}")]
    Object(#[source] LoadError),
    /// No function called `next`.
    #[error(
        "the application object has no function `{APP_FUNCTION}` (a global function in \
         `.text` or in a section named `{APP_SECTION}`)"
    )]
    NoNext,
    /// The object defines maps or global data.
    #[error(
        "the application object defines `{name}` (a map or global data: .data, .rodata, \
         .bss); application functions may use only their HopState argument and their stack"
    )]
    Data {
        /// The map or section's name.
        name: String,
    },
    /// An instruction is not on the allowlist.
    #[error("instruction {index} of `{APP_FUNCTION}` (linked with its callees), opcode {opcode:#04x}: {reason}")]
    Refused {
        /// Index in the linked application code.
        index: usize,
        /// The instruction's opcode byte.
        opcode: u8,
        /// Why it is refused.
        reason: String,
    },
    /// The driver could not be linked (a build problem, not the application's).
    #[error("the driver: {0}")]
    Driver(#[source] LoadError),
}

/// `next` and its callees from an application object, checked against the allowlist.
pub fn extract(app_elf: &[u8]) -> Result<Vec<u64>, BindError> {
    let mut linker = Linker::parse(app_elf, &[(APP_SECTION, APP_SECTION_ALIAS)], Kfuncs::Refuse)
        .map_err(BindError::Object)?;
    if let Some((name, _)) = linker.take_maps().into_iter().next() {
        return Err(BindError::Data { name });
    }
    if !linker
        .program_names()
        .iter()
        .any(|name| name == APP_FUNCTION)
        && !linker.adopt_function(APP_FUNCTION)
    {
        return Err(BindError::NoNext);
    }
    linker
        .relocate(std::iter::empty())
        .map_err(BindError::Object)?;
    let insns = linker
        .linked(APP_FUNCTION)
        .map_err(BindError::Object)?
        .insns;
    check(&insns)?;
    Ok(insns)
}

/// Fields of one instruction (see [`crate::sys`] for the u64 encoding).
#[derive(Debug, Clone, Copy)]
struct Insn {
    code: u8,
    src: u8,
    off: i16,
    imm: i32,
}

fn decode(insn: u64) -> Insn {
    Insn {
        code: insn as u8,
        src: ((insn >> 12) & 0xf) as u8,
        off: (insn >> 16) as u16 as i16,
        imm: (insn >> 32) as u32 as i32,
    }
}

const CLASS_LD: u8 = 0x00;
const CLASS_LDX: u8 = 0x01;
const CLASS_ST: u8 = 0x02;
const CLASS_STX: u8 = 0x03;
const CLASS_ALU: u8 = 0x04;
const CLASS_JMP: u8 = 0x05;
const CLASS_JMP32: u8 = 0x06;
const CLASS_ALU64: u8 = 0x07;
const MODE_MEM: u8 = 0x60;
const MODE_MEMSX: u8 = 0x80;
const MODE_ATOMIC: u8 = 0xc0;
const OP_LD_IMM64: u8 = 0x18;
const JMP_CALL: u8 = 0x80;
const JMP_EXIT: u8 = 0x90;
const JMP_JA: u8 = 0x00;
const PSEUDO_CALL: u8 = 1;
const PSEUDO_KFUNC_CALL: u8 = 2;
const PSEUDO_FUNC: u8 = 4;

/// Checks every instruction of linked application code against the allowlist.
pub fn check(insns: &[u64]) -> Result<(), BindError> {
    let refuse = |index: usize, code: u8, reason: String| BindError::Refused {
        index,
        opcode: code,
        reason,
    };
    let inside = |index: usize, delta: i64| {
        let target = index as i64 + 1 + delta;
        (0..insns.len() as i64).contains(&target)
    };
    let mut index = 0;
    while index < insns.len() {
        let insn = decode(insns[index]);
        let class = insn.code & 0x07;
        let mode = insn.code & 0xe0;
        match class {
            CLASS_LD if insn.code == OP_LD_IMM64 => {
                match insn.src {
                    0 => {}
                    PSEUDO_FUNC if inside(index, i64::from(insn.imm)) => {}
                    PSEUDO_FUNC => {
                        return Err(refuse(
                            index,
                            insn.code,
                            "takes the address of a function outside the application's code".into(),
                        ))
                    }
                    src => {
                        return Err(refuse(
                            index,
                            insn.code,
                            format!(
                                "loads a map, global data or kernel object (ld_imm64 with \
                                 src_reg {src}); application functions may not reference maps"
                            ),
                        ))
                    }
                }
                if index + 1 >= insns.len() || decode(insns[index + 1]).code != 0 {
                    return Err(refuse(index, insn.code, "truncated 16-byte load".into()));
                }
                index += 2;
                continue;
            }
            CLASS_LD => {
                return Err(refuse(
                    index,
                    insn.code,
                    "legacy packet access (LD_ABS/LD_IND)".into(),
                ))
            }
            CLASS_LDX if mode == MODE_MEM || mode == MODE_MEMSX => {}
            CLASS_ST | CLASS_STX if mode == MODE_MEM => {}
            CLASS_STX if mode == MODE_ATOMIC => {
                return Err(refuse(
                    index,
                    insn.code,
                    "atomic operation (application state is private to one chain)".into(),
                ))
            }
            CLASS_LDX | CLASS_ST | CLASS_STX => {
                return Err(refuse(
                    index,
                    insn.code,
                    format!("memory access mode {mode:#04x}"),
                ))
            }
            CLASS_ALU | CLASS_ALU64 => {}
            CLASS_JMP | CLASS_JMP32 => {
                let op = insn.code & 0xf0;
                match op {
                    JMP_CALL if class == CLASS_JMP => match insn.src {
                        0 => {
                            if !ALLOWED_HELPERS.iter().any(|(id, _)| *id == insn.imm) {
                                let name = HELPER_NAMES
                                    .iter()
                                    .find(|(id, _)| *id == insn.imm)
                                    .map_or("a helper", |(_, name)| name);
                                let allowed: Vec<&str> =
                                    ALLOWED_HELPERS.iter().map(|(_, name)| *name).collect();
                                return Err(refuse(
                                    index,
                                    insn.code,
                                    format!(
                                        "calls helper {} ({name}); application functions may \
                                         call only {}",
                                        insn.imm,
                                        allowed.join(", ")
                                    ),
                                ));
                            }
                        }
                        PSEUDO_CALL if inside(index, i64::from(insn.imm)) => {}
                        PSEUDO_CALL => {
                            return Err(refuse(
                                index,
                                insn.code,
                                "calls a function outside the application's code".into(),
                            ))
                        }
                        PSEUDO_KFUNC_CALL => {
                            return Err(refuse(
                                index,
                                insn.code,
                                "calls a kernel function (kfunc)".into(),
                            ))
                        }
                        src => {
                            return Err(refuse(
                                index,
                                insn.code,
                                format!("call with src_reg {src}"),
                            ))
                        }
                    },
                    JMP_EXIT if class == CLASS_JMP => {}
                    JMP_CALL | JMP_EXIT => {
                        return Err(refuse(index, insn.code, "32-bit call or exit".into()))
                    }
                    _ => {
                        // `gotol` (JMP32 | JA) carries its offset in imm.
                        let delta = if class == CLASS_JMP32 && op == JMP_JA {
                            i64::from(insn.imm)
                        } else {
                            i64::from(insn.off)
                        };
                        if !inside(index, delta) {
                            return Err(refuse(
                                index,
                                insn.code,
                                "jumps outside the application's code".into(),
                            ));
                        }
                    }
                }
            }
            _ => unreachable!("the class is three bits"),
        }
        index += 1;
    }
    Ok(())
}

/// The driver's linked instructions with `[start, end)` (the placeholder) replaced by
/// `app`. Calls and function references outside the replaced range are re-aimed; a call
/// to the placeholder now lands on the first instruction of `app`.
pub fn splice(driver: &[u64], start: usize, end: usize, app: &[u64]) -> Vec<u64> {
    let delta = app.len() as i64 - (end - start) as i64;
    let moved = |index: usize| -> i64 {
        if index < start {
            index as i64
        } else {
            index as i64 + delta
        }
    };
    let mut out = Vec::with_capacity(driver.len() + app.len());
    let fix = |index: usize, insn: u64| -> u64 {
        let fields = decode(insn);
        let is_call = fields.code == (CLASS_JMP | JMP_CALL) && fields.src == PSEUDO_CALL;
        let is_func = fields.code == OP_LD_IMM64 && fields.src == PSEUDO_FUNC;
        if !(is_call || is_func) {
            return insn;
        }
        let target = index as i64 + 1 + i64::from(fields.imm);
        let new_target = if target >= start as i64 && target < end as i64 {
            // Into the placeholder: only its entry can be a target.
            start as i64
        } else {
            moved(target as usize)
        };
        let imm = (new_target - moved(index) - 1) as i32;
        (insn & 0x0000_0000_ffff_ffff) | (u64::from(imm as u32) << 32)
    };
    for (index, insn) in driver[..start].iter().enumerate() {
        out.push(fix(index, *insn));
    }
    out.extend_from_slice(app);
    for (offset, insn) in driver[end..].iter().enumerate() {
        out.push(fix(end + offset, *insn));
    }
    out
}

/// The driver program `program` (of a driver object already relocated against its maps)
/// linked with the application code `app` in place of the placeholder.
pub(crate) fn link_into_driver(
    driver: &Linker,
    program: &str,
    app: &[u64],
) -> Result<Vec<u64>, BindError> {
    let linked = driver.linked(program).map_err(BindError::Driver)?;
    let start = driver
        .callee_start(program, PLACEHOLDER)
        .map_err(BindError::Driver)? as usize;
    let starts = crate::btf::subprogram_starts(&linked.insns);
    let end = starts
        .iter()
        .map(|s| *s as usize)
        .find(|s| *s > start)
        .unwrap_or(linked.insns.len());
    Ok(splice(&linked.insns, start, end, app))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
        u64::from(code)
            | u64::from(dst) << 8
            | u64::from(src) << 12
            | u64::from(off as u16) << 16
            | u64::from(imm as u32) << 32
    }

    const EXIT: u64 = 0x95;

    fn call(src: u8, imm: i32) -> u64 {
        insn(CLASS_JMP | JMP_CALL, 0, src, 0, imm)
    }

    fn refused(insns: &[u64]) -> (usize, String) {
        match check(insns) {
            Err(BindError::Refused { index, reason, .. }) => (index, reason),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn plain_code_passes() {
        let insns = [
            insn(0xb7, 0, 0, 0, 1), // r0 = 1
            insn(0x79, 2, 1, 8, 0), // r2 = *(u64 *)(r1 + 8)
            insn(0x15, 2, 0, 1, 0), // if r2 == 0 goto +1
            call(PSEUDO_CALL, 1),   // call +1
            EXIT,
            insn(0xb7, 0, 0, 0, 0),
            EXIT,
        ];
        check(&insns).expect("allowed");
    }

    #[test]
    fn helpers_maps_kfuncs_and_escapes_are_refused() {
        let (index, reason) = refused(&[insn(0xb7, 0, 0, 0, 0), call(0, 113), EXIT]);
        assert_eq!(index, 1);
        assert!(reason.contains("bpf_probe_read_kernel"), "{reason}");
        let (_, reason) = refused(&[insn(OP_LD_IMM64, 1, 1, 0, 7), 0, EXIT]);
        assert!(reason.contains("map"), "{reason}");
        let (_, reason) = refused(&[call(PSEUDO_KFUNC_CALL, 5), EXIT]);
        assert!(reason.contains("kfunc"), "{reason}");
        let (_, reason) = refused(&[call(PSEUDO_CALL, -5), EXIT]);
        assert!(reason.contains("outside"), "{reason}");
        let (_, reason) = refused(&[insn(0x05, 0, 0, 10, 0), EXIT]);
        assert!(reason.contains("jumps outside"), "{reason}");
        let (_, reason) = refused(&[insn(0xdb, 1, 2, 0, 0), EXIT]); // atomic add
        assert!(reason.contains("atomic"), "{reason}");
        check(&[call(0, 181), EXIT]).expect("bpf_loop is allowed");
    }

    #[test]
    fn splice_reaims_calls_across_the_cut() {
        // 0: call +2 (-> 3, the placeholder)   1: call +3 (-> 5)   2: exit
        // 3..5: placeholder (2 insns)          5: callee: exit
        let driver = [
            call(PSEUDO_CALL, 2),
            call(PSEUDO_CALL, 3),
            EXIT,
            EXIT,
            EXIT,
            EXIT,
        ];
        let app = [
            insn(0xb7, 0, 0, 0, 9),
            insn(0xb7, 1, 0, 0, 9),
            insn(0xb7, 2, 0, 0, 9),
            EXIT,
        ];
        let out = splice(&driver, 3, 5, &app);
        assert_eq!(out.len(), 6 - 2 + 4);
        assert_eq!(
            decode(out[0]).imm,
            2,
            "still lands on the first app instruction"
        );
        assert_eq!(decode(out[1]).imm, 5, "the callee moved by two");
        assert_eq!(&out[3..7], &app);
    }
}
