//! Raw bpf(2): the one module of kernel-ext that talks to the BPF syscall.
//!
//! Layer: kernel-ext, bottom. Everything above (loader, registry, chain runner) goes through
//! these functions; nothing else in the crate calls `SYS_bpf`.
//!
//! Interface: one function per command used — BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM,
//! BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM, BPF_MAP_GET_NEXT_KEY, BPF_PROG_LOAD,
//! BPF_PROG_TEST_RUN, BPF_OBJ_PIN, BPF_OBJ_GET, BPF_BTF_LOAD — each with
//! its own `#[repr(C)]` attribute struct laid out as the kernel's `union bpf_attr` member
//! (a prefix of it: the kernel zero-extends a shorter attr, and we pass our struct's size).
//! File descriptors come back as [`OwnedFd`], so every fd is closed on drop.
//!
//! Invariants:
//! - aya 0.14 cannot load or test-run BPF_PROG_TYPE_SYSCALL programs, hence this module.
//! - A syscall program must be loaded with [`BPF_F_SLEEPABLE`] (the kernel refuses it
//!   otherwise, and `bpf_copy_from_user` is offered to sleepable programs only).
//! - BPF_PROG_TEST_RUN of a syscall program takes ONLY `ctx_in`/`ctx_size_in`
//!   (< 64 KiB): the kernel copies the context in, runs, and writes it back to `ctx_in`.
//!   Setting `ctx_out`, `data_*`, `repeat`, `flags`, `cpu` or `batch_size` is EINVAL.
//! - Errors name the command and the errno; a refused BPF_PROG_LOAD carries the verifier
//!   log (the load is retried once with logging on, as libbpf does).

use std::{
    ffi::{CStr, CString},
    fmt, io,
    mem::size_of,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

// Instructions are passed as host-endian `struct bpf_insn`; the u64 encoding used here
// (code | dst << 8 | src << 12 | off << 16 | imm << 32) is that struct on little-endian hosts.
#[cfg(not(target_endian = "little"))]
compile_error!("kernel-ext's bpf(2) layer assumes a little-endian host");

/// `BPF_PROG_TYPE_SYSCALL`.
pub const BPF_PROG_TYPE_SYSCALL: u32 = 31;
/// `BPF_F_SLEEPABLE` (prog_flags).
pub const BPF_F_SLEEPABLE: u32 = 1 << 4;
/// `BPF_ANY` (map update flags): create or replace.
pub const BPF_ANY: u64 = 0;
/// `BPF_F_MMAPABLE` (map_flags): an array map whose values can be mmap-ed.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// `BPF_MAP_TYPE_ARRAY`.
pub const BPF_MAP_TYPE_ARRAY: u32 = 2;
/// `BPF_EXIST` (map update flags): replace only.
pub const BPF_EXIST: u64 = 2;
/// Largest context BPF_PROG_TEST_RUN accepts for a syscall program (`U16_MAX`).
pub const MAX_SYSCALL_CTX: usize = u16::MAX as usize;
/// `BPF_OBJ_NAME_LEN`: object names are at most 15 bytes plus NUL.
pub const BPF_OBJ_NAME_LEN: usize = 16;

/// Size of the verifier log buffer for a refused load. The kernel keeps the tail of the
/// log when it does not fit (rotating log, Linux >= 6.4), which is the part that explains
/// the refusal.
const VERIFIER_LOG_SIZE: usize = 1 << 20;
/// `log_level` 1: the verifier's instruction-by-instruction log.
const LOG_LEVEL_VERBOSE: u32 = 1;
/// libbpf retries BPF_PROG_LOAD this many times on EAGAIN.
const PROG_LOAD_ATTEMPTS: usize = 5;
/// Lines of the verifier log shown by [`SysError`]'s `Display` (all of it is kept).
const LOG_LINES_SHOWN: usize = 100;

/// The bpf(2) commands this module issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmd {
    /// BPF_MAP_CREATE
    MapCreate,
    /// BPF_MAP_LOOKUP_ELEM
    MapLookupElem,
    /// BPF_MAP_UPDATE_ELEM
    MapUpdateElem,
    /// BPF_MAP_DELETE_ELEM
    MapDeleteElem,
    /// BPF_MAP_GET_NEXT_KEY
    MapGetNextKey,
    /// BPF_PROG_LOAD
    ProgLoad,
    /// BPF_OBJ_PIN
    ObjPin,
    /// BPF_OBJ_GET
    ObjGet,
    /// BPF_PROG_TEST_RUN
    ProgTestRun,
    /// BPF_BTF_LOAD
    BtfLoad,
    /// BPF_OBJ_GET_INFO_BY_FD
    ObjGetInfoByFd,
}

impl Cmd {
    /// The command number (`enum bpf_cmd`).
    pub const fn number(self) -> libc::c_long {
        match self {
            Self::MapCreate => 0,
            Self::MapLookupElem => 1,
            Self::MapUpdateElem => 2,
            Self::MapDeleteElem => 3,
            Self::MapGetNextKey => 4,
            Self::ProgLoad => 5,
            Self::ObjPin => 6,
            Self::ObjGet => 7,
            Self::ProgTestRun => 10,
            Self::ObjGetInfoByFd => 15,
            Self::BtfLoad => 18,
        }
    }

    /// The kernel's name for the command.
    pub const fn name(self) -> &'static str {
        match self {
            Self::MapCreate => "BPF_MAP_CREATE",
            Self::MapLookupElem => "BPF_MAP_LOOKUP_ELEM",
            Self::MapUpdateElem => "BPF_MAP_UPDATE_ELEM",
            Self::MapDeleteElem => "BPF_MAP_DELETE_ELEM",
            Self::MapGetNextKey => "BPF_MAP_GET_NEXT_KEY",
            Self::ProgLoad => "BPF_PROG_LOAD",
            Self::ObjPin => "BPF_OBJ_PIN",
            Self::ObjGet => "BPF_OBJ_GET",
            Self::ProgTestRun => "BPF_PROG_TEST_RUN",
            Self::BtfLoad => "BPF_BTF_LOAD",
            Self::ObjGetInfoByFd => "BPF_OBJ_GET_INFO_BY_FD",
        }
    }
}

impl fmt::Display for Cmd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A failed bpf(2) call.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    /// The kernel returned an error.
    #[error("bpf({cmd}) failed: {source}")]
    Call {
        /// The command.
        cmd: Cmd,
        /// The errno, as an `io::Error` (its text includes the number).
        #[source]
        source: io::Error,
    },
    /// BPF_PROG_LOAD (or BPF_BTF_LOAD) was refused; `log` is the kernel's log of the
    /// refused load (the verifier's, for a program).
    #[error("bpf({cmd}) of `{name}` failed: {source}\n{}", shown_log(.log))]
    Verifier {
        /// The command that was refused.
        cmd: Cmd,
        /// The program's name.
        name: String,
        /// The errno of the first attempt.
        #[source]
        source: io::Error,
        /// The verifier log (its tail, if it was longer than the buffer).
        log: String,
    },
    /// An argument was refused before any call was made.
    #[error("bpf({cmd}): {what}")]
    Invalid {
        /// The command.
        cmd: Cmd,
        /// What was wrong.
        what: String,
    },
}

impl SysError {
    /// The errno, if the kernel returned one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Call { source, .. } | Self::Verifier { source, .. } => source.raw_os_error(),
            Self::Invalid { .. } => None,
        }
    }

    /// True for EPERM: the caller lacks the privilege (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN)
    /// for the command. (EACCES is not this: it is how the verifier refuses a program.)
    pub fn is_permission_denied(&self) -> bool {
        self.errno() == Some(libc::EPERM)
    }

    /// The verifier log of a refused load.
    pub fn verifier_log(&self) -> Option<&str> {
        match self {
            Self::Verifier { log, .. } => Some(log),
            Self::Call { .. } | Self::Invalid { .. } => None,
        }
    }
}

/// The last [`LOG_LINES_SHOWN`] lines of a verifier log, with a header.
fn shown_log(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    let skip = lines.len().saturating_sub(LOG_LINES_SHOWN);
    let mut shown = String::from("--- verifier log ---\n");
    if skip > 0 {
        shown.push_str(&format!(
            "[{skip} earlier lines omitted; SysError::verifier_log() has all of them]\n"
        ));
    }
    for line in &lines[skip..] {
        shown.push_str(line);
        shown.push('\n');
    }
    shown.push_str("--- end of verifier log ---");
    shown
}

/// Issues one bpf(2) call.
///
/// # Safety
///
/// `attr` must be the attribute struct of `cmd`, and every pointer it carries must be
/// valid, for the duration of the call, for the reads and writes the kernel makes for
/// that command (including buffer lengths given in the same struct).
unsafe fn bpf<T>(cmd: Cmd, attr: &mut T) -> Result<libc::c_long, io::Error> {
    // SAFETY: the syscall reads `size_of::<T>()` bytes at `attr` (a live, exclusive
    // reference) and may write results back into it; the pointers inside are the caller's
    // responsibility (see above).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd.number(),
            std::ptr::from_mut(attr),
            size_of::<T>() as libc::c_long,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Wraps a file descriptor the kernel just returned.
fn owned_fd(cmd: Cmd, ret: libc::c_long) -> Result<OwnedFd, SysError> {
    let fd = RawFd::try_from(ret).map_err(|_| SysError::Invalid {
        cmd,
        what: format!("kernel returned {ret}, not a file descriptor"),
    })?;
    // SAFETY: a successful BPF_MAP_CREATE / BPF_PROG_LOAD / BPF_OBJ_GET returns a new file
    // descriptor that nothing else in this process owns; we take ownership exactly once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An object name as the kernel accepts it: at most 15 bytes of `[A-Za-z0-9_.]` (other
/// bytes become `_`), NUL-padded.
pub fn obj_name(name: &str) -> [u8; BPF_OBJ_NAME_LEN] {
    let mut out = [0u8; BPF_OBJ_NAME_LEN];
    for (slot, byte) in out[..BPF_OBJ_NAME_LEN - 1].iter_mut().zip(name.bytes()) {
        *slot = if byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'.' {
            byte
        } else {
            b'_'
        };
    }
    out
}

/// `union bpf_attr` for BPF_MAP_CREATE (prefix up to `btf_value_type_id`).
#[repr(C)]
#[derive(Debug, Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; BPF_OBJ_NAME_LEN],
    map_ifindex: u32,
    btf_fd: u32,
    btf_key_type_id: u32,
    btf_value_type_id: u32,
}

/// `union bpf_attr` for BPF_MAP_*_ELEM.
#[repr(C)]
#[derive(Debug, Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr` for BPF_PROG_LOAD (prefix up to `log_true_size`, Linux >= 6.4; older
/// kernels accept it as long as the fields they do not know are zero, and they are).
#[repr(C)]
#[derive(Debug, Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; BPF_OBJ_NAME_LEN],
    prog_ifindex: u32,
    expected_attach_type: u32,
    prog_btf_fd: u32,
    func_info_rec_size: u32,
    func_info: u64,
    func_info_cnt: u32,
    line_info_rec_size: u32,
    line_info: u64,
    line_info_cnt: u32,
    attach_btf_id: u32,
    attach_prog_fd: u32,
    core_relo_cnt: u32,
    fd_array: u64,
    core_relos: u64,
    core_relo_rec_size: u32,
    log_true_size: u32,
}

/// `union bpf_attr` for BPF_OBJ_PIN / BPF_OBJ_GET (prefix up to `file_flags`).
#[repr(C)]
#[derive(Debug, Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

/// `union bpf_attr` for BPF_OBJ_GET_INFO_BY_FD (the `info` member).
#[repr(C)]
#[derive(Debug, Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The start of `struct bpf_map_info`: what [`map_info`] reads (the kernel fills no more
/// than `info_len` bytes).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct MapInfoHead {
    map_type: u32,
    id: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// `union bpf_attr` for BPF_PROG_TEST_RUN (the `test` member).
#[repr(C)]
#[derive(Debug, Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

// The layouts above must match the kernel's (include/uapi/linux/bpf.h).
const _: () = {
    assert!(size_of::<MapCreateAttr>() == 60);
    assert!(size_of::<MapElemAttr>() == 32);
    assert!(std::mem::offset_of!(ProgLoadAttr, prog_name) == 48);
    assert!(std::mem::offset_of!(ProgLoadAttr, fd_array) == 120);
    assert!(size_of::<ProgLoadAttr>() == 144);
    assert!(size_of::<ObjAttr>() == 16);
    assert!(std::mem::offset_of!(TestRunAttr, ctx_in) == 48);
    assert!(size_of::<TestRunAttr>() == 80);
    assert!(size_of::<BtfLoadAttr>() == 32);
    assert!(size_of::<FuncInfo>() == 8);
};

fn fd_u32(fd: BorrowedFd<'_>) -> u32 {
    // A live descriptor is never negative.
    fd.as_raw_fd() as u32
}

/// Parameters of a map to create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapSpec {
    /// `enum bpf_map_type`.
    pub map_type: u32,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes.
    pub value_size: u32,
    /// Number of entries.
    pub max_entries: u32,
    /// `BPF_F_*` map flags.
    pub map_flags: u32,
}

/// The BTF of a map's key and value: required for some map types (task storage).
#[derive(Debug, Clone, Copy)]
pub struct MapBtf<'a> {
    /// The loaded BTF (BPF_BTF_LOAD).
    pub btf: BorrowedFd<'a>,
    /// Type id of the key.
    pub key_type_id: u32,
    /// Type id of the value.
    pub value_type_id: u32,
}

/// BPF_MAP_CREATE. `name` is shortened and sanitized with [`obj_name`].
pub fn map_create(
    spec: &MapSpec,
    name: &str,
    btf: Option<MapBtf<'_>>,
) -> Result<OwnedFd, SysError> {
    let (btf_fd, btf_key_type_id, btf_value_type_id) = btf.map_or((0, 0, 0), |b| {
        (fd_u32(b.btf), b.key_type_id, b.value_type_id)
    });
    let mut attr = MapCreateAttr {
        btf_fd,
        btf_key_type_id,
        btf_value_type_id,
        map_type: spec.map_type,
        key_size: spec.key_size,
        value_size: spec.value_size,
        max_entries: spec.max_entries,
        map_flags: spec.map_flags,
        map_name: obj_name(name),
        ..MapCreateAttr::default()
    };
    // SAFETY: MapCreateAttr is BPF_MAP_CREATE's attr and carries no pointers.
    let ret = unsafe { bpf(Cmd::MapCreate, &mut attr) }.map_err(|source| SysError::Call {
        cmd: Cmd::MapCreate,
        source,
    })?;
    owned_fd(Cmd::MapCreate, ret)
}

/// BPF_MAP_LOOKUP_ELEM: copies the value at `key` into `value`. `Ok(false)` if there is no
/// such key (ENOENT).
///
/// # Safety
///
/// `map` must be a BPF map whose key size is `key.len()` and whose value size, as the
/// kernel copies it out (value size × possible CPUs for per-CPU maps), is `value.len()`:
/// the kernel reads and writes exactly those sizes.
pub unsafe fn map_lookup_elem(
    map: BorrowedFd<'_>,
    key: &[u8],
    value: &mut [u8],
) -> Result<bool, SysError> {
    let mut attr = MapElemAttr {
        map_fd: fd_u32(map),
        key: key.as_ptr() as u64,
        value: value.as_mut_ptr() as u64,
        ..MapElemAttr::default()
    };
    // SAFETY: the key and value buffers are live for the call and have the map's sizes
    // (the caller's contract), so the kernel's read of the key and write of the value stay
    // inside them.
    match unsafe { bpf(Cmd::MapLookupElem, &mut attr) } {
        Ok(_) => Ok(true),
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(source) => Err(SysError::Call {
            cmd: Cmd::MapLookupElem,
            source,
        }),
    }
}

/// BPF_MAP_UPDATE_ELEM with `flags` (`BPF_ANY`, `BPF_NOEXIST`, `BPF_EXIST`, `BPF_F_LOCK`).
///
/// # Safety
///
/// As for [`map_lookup_elem`]: `key.len()` and `value.len()` must be the sizes the kernel
/// reads for this map.
pub unsafe fn map_update_elem(
    map: BorrowedFd<'_>,
    key: &[u8],
    value: &[u8],
    flags: u64,
) -> Result<(), SysError> {
    let mut attr = MapElemAttr {
        map_fd: fd_u32(map),
        key: key.as_ptr() as u64,
        value: value.as_ptr() as u64,
        flags,
        ..MapElemAttr::default()
    };
    // SAFETY: the kernel only reads the key and value, which are live and of the map's
    // sizes (the caller's contract).
    unsafe { bpf(Cmd::MapUpdateElem, &mut attr) }.map_err(|source| SysError::Call {
        cmd: Cmd::MapUpdateElem,
        source,
    })?;
    Ok(())
}

/// `struct bpf_func_info`: the BTF `FUNC` type of the subprogram starting at `insn_off`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FuncInfo {
    /// First instruction of the subprogram.
    pub insn_off: u32,
    /// Its `BTF_KIND_FUNC` type id in the program's BTF.
    pub type_id: u32,
}

/// A program to load with BPF_PROG_LOAD.
#[derive(Debug, Clone, Copy)]
pub struct ProgLoad<'a> {
    /// `enum bpf_prog_type`.
    pub prog_type: u32,
    /// Name (shortened and sanitized with [`obj_name`]).
    pub name: &'a str,
    /// Host-endian `struct bpf_insn`s (see the note at the top of this module).
    pub insns: &'a [u64],
    /// License string (GPL-compatible for GPL-only helpers).
    pub license: &'a CStr,
    /// `BPF_F_*` program flags.
    pub prog_flags: u32,
    /// The program's BTF and one [`FuncInfo`] per subprogram, in instruction order. The
    /// kernel requires them when the program passes a function to a helper (`bpf_loop`).
    pub btf: Option<(BorrowedFd<'a>, &'a [FuncInfo])>,
}

/// One BPF_PROG_LOAD attempt. `log` is a buffer to collect the verifier log in.
fn prog_load_once(prog: &ProgLoad<'_>, log: Option<&mut [u8]>) -> Result<libc::c_long, io::Error> {
    let too_big = |_| io::Error::from_raw_os_error(libc::E2BIG);
    let mut attr = ProgLoadAttr {
        prog_type: prog.prog_type,
        insn_cnt: u32::try_from(prog.insns.len()).map_err(too_big)?,
        insns: prog.insns.as_ptr() as u64,
        license: prog.license.as_ptr() as u64,
        prog_flags: prog.prog_flags,
        prog_name: obj_name(prog.name),
        ..ProgLoadAttr::default()
    };
    if let Some((btf_fd, func_info)) = prog.btf {
        attr.prog_btf_fd = fd_u32(btf_fd);
        attr.func_info_rec_size = size_of::<FuncInfo>() as u32;
        attr.func_info = func_info.as_ptr() as u64;
        attr.func_info_cnt = u32::try_from(func_info.len()).map_err(too_big)?;
    }
    if let Some(buf) = log {
        attr.log_level = LOG_LEVEL_VERBOSE;
        attr.log_size = u32::try_from(buf.len()).unwrap_or(u32::MAX);
        attr.log_buf = buf.as_mut_ptr() as u64;
    }
    let mut ret = Err(io::Error::from_raw_os_error(libc::EAGAIN));
    for _ in 0..PROG_LOAD_ATTEMPTS {
        // SAFETY: ProgLoadAttr is BPF_PROG_LOAD's attr; `insns` (insn_cnt * 8 bytes), the
        // NUL-terminated `license` and the `func_info` records (func_info_cnt of
        // func_info_rec_size bytes) are live for the call and only read; the log buffer,
        // if any, is live, exclusive and `log_size` bytes long, and the kernel writes at
        // most that many bytes into it. All other pointers are null.
        ret = unsafe { bpf(Cmd::ProgLoad, &mut attr) };
        match &ret {
            Err(err) if err.raw_os_error() == Some(libc::EAGAIN) => continue,
            _ => break,
        }
    }
    ret
}

/// The NUL-terminated text the kernel wrote into a log buffer.
fn log_text(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// BPF_PROG_LOAD. If the kernel refuses the program, the load is repeated with the
/// verifier log on, and the error carries the log.
pub fn prog_load(prog: &ProgLoad<'_>) -> Result<OwnedFd, SysError> {
    load_with_log(Cmd::ProgLoad, prog.name, |log| prog_load_once(prog, log))
}

/// A load (program or BTF) that the kernel may refuse with a log: tried once without the
/// log, and on a refusal tried again with it, so that the error carries the log. EPERM is
/// not retried (no privilege: the checks never ran); E2BIG is (the verifier returns it when
/// it gives up after 1M processed instructions). A load that succeeds on the second
/// attempt (a transient failure) is kept.
fn load_with_log(
    cmd: Cmd,
    name: &str,
    load: impl Fn(Option<&mut [u8]>) -> Result<libc::c_long, io::Error>,
) -> Result<OwnedFd, SysError> {
    match load(None) {
        Ok(ret) => owned_fd(cmd, ret),
        Err(source) if source.raw_os_error() == Some(libc::EPERM) => {
            Err(SysError::Call { cmd, source })
        }
        Err(source) => {
            let mut buf = vec![0u8; VERIFIER_LOG_SIZE];
            match load(Some(&mut buf)) {
                Ok(ret) => owned_fd(cmd, ret),
                Err(_) => Err(SysError::Verifier {
                    cmd,
                    name: name.to_owned(),
                    source,
                    log: log_text(&buf),
                }),
            }
        }
    }
}

/// `union bpf_attr` for BPF_BTF_LOAD (prefix up to `btf_log_true_size`).
#[repr(C)]
#[derive(Debug, Default)]
struct BtfLoadAttr {
    btf: u64,
    btf_log_buf: u64,
    btf_size: u32,
    btf_log_size: u32,
    btf_log_level: u32,
    btf_log_true_size: u32,
}

fn btf_load_once(btf: &[u8], log: Option<&mut [u8]>) -> Result<libc::c_long, io::Error> {
    let mut attr = BtfLoadAttr {
        btf: btf.as_ptr() as u64,
        btf_size: u32::try_from(btf.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?,
        ..BtfLoadAttr::default()
    };
    if let Some(buf) = log {
        attr.btf_log_level = LOG_LEVEL_VERBOSE;
        attr.btf_log_size = u32::try_from(buf.len()).unwrap_or(u32::MAX);
        attr.btf_log_buf = buf.as_mut_ptr() as u64;
    }
    // SAFETY: BtfLoadAttr is BPF_BTF_LOAD's attr; `btf` (btf_size bytes) is live and only
    // read; the log buffer, if any, is live, exclusive and btf_log_size bytes long.
    unsafe { bpf(Cmd::BtfLoad, &mut attr) }
}

/// BPF_BTF_LOAD of a raw BTF blob (header, types, strings). A refusal is retried with the
/// log on, and the error carries the kernel's BTF log as [`SysError::Verifier`].
pub fn btf_load(btf: &[u8]) -> Result<OwnedFd, SysError> {
    load_with_log(Cmd::BtfLoad, "BTF", |log| btf_load_once(btf, log))
}

/// BPF_MAP_DELETE_ELEM: removes `key`. `Ok(false)` if there was no such key (ENOENT).
///
/// # Safety
///
/// `key.len()` must be the map's key size: the kernel reads exactly that many bytes.
pub unsafe fn map_delete_elem(map: BorrowedFd<'_>, key: &[u8]) -> Result<bool, SysError> {
    let mut attr = MapElemAttr {
        map_fd: fd_u32(map),
        key: key.as_ptr() as u64,
        ..MapElemAttr::default()
    };
    // SAFETY: the kernel only reads the key, which is live and of the map's key size.
    match unsafe { bpf(Cmd::MapDeleteElem, &mut attr) } {
        Ok(_) => Ok(true),
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(source) => Err(SysError::Call {
            cmd: Cmd::MapDeleteElem,
            source,
        }),
    }
}

/// BPF_MAP_GET_NEXT_KEY: writes the key after `key` (the first key if `key` is `None` or
/// not in the map) into `next`. `Ok(false)` at the end of the map.
///
/// # Safety
///
/// `key` (if any) and `next` must be the map's key size.
pub unsafe fn map_get_next_key(
    map: BorrowedFd<'_>,
    key: Option<&[u8]>,
    next: &mut [u8],
) -> Result<bool, SysError> {
    let mut attr = MapElemAttr {
        map_fd: fd_u32(map),
        key: key.map_or(0, |key| key.as_ptr() as u64),
        // `next_key` shares the slot of `value` in the kernel's union member.
        value: next.as_mut_ptr() as u64,
        ..MapElemAttr::default()
    };
    // SAFETY: the kernel reads the key (if given) and writes one key into `next`; both are
    // live and of the map's key size (the caller's contract).
    match unsafe { bpf(Cmd::MapGetNextKey, &mut attr) } {
        Ok(_) => Ok(true),
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(source) => Err(SysError::Call {
            cmd: Cmd::MapGetNextKey,
            source,
        }),
    }
}

/// BPF_PROG_TEST_RUN of a BPF_PROG_TYPE_SYSCALL program: the kernel copies `ctx` in, runs
/// the program once on the calling thread (so `bpf_copy_from_user` reads THIS process's
/// memory), and writes the context back into `ctx`. Returns the program's return value.
pub fn prog_test_run_syscall(prog: BorrowedFd<'_>, ctx: &mut [u8]) -> Result<u32, SysError> {
    if ctx.len() > MAX_SYSCALL_CTX {
        return Err(SysError::Invalid {
            cmd: Cmd::ProgTestRun,
            what: format!(
                "context of {} bytes; a syscall program's is at most {MAX_SYSCALL_CTX}",
                ctx.len()
            ),
        });
    }
    let mut attr = TestRunAttr {
        prog_fd: fd_u32(prog),
        ctx_size_in: ctx.len() as u32,
        ctx_in: if ctx.is_empty() {
            0
        } else {
            ctx.as_mut_ptr() as u64
        },
        ..TestRunAttr::default()
    };
    // SAFETY: TestRunAttr is BPF_PROG_TEST_RUN's attr; for a syscall program the kernel
    // reads `ctx_size_in` bytes from `ctx_in` and writes the same number back there, and
    // `ctx` is a live, exclusive buffer of exactly that length. No other pointer is set.
    unsafe { bpf(Cmd::ProgTestRun, &mut attr) }.map_err(|source| SysError::Call {
        cmd: Cmd::ProgTestRun,
        source,
    })?;
    Ok(attr.retval)
}

fn path_cstring(cmd: Cmd, path: &Path) -> Result<CString, SysError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| SysError::Invalid {
        cmd,
        what: format!("path {} contains a NUL byte", path.display()),
    })
}

/// BPF_OBJ_PIN: pins the map or program `fd` at `path` (on a bpffs mount).
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> Result<(), SysError> {
    let path = path_cstring(Cmd::ObjPin, path)?;
    let mut attr = ObjAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: fd_u32(fd),
        ..ObjAttr::default()
    };
    // SAFETY: ObjAttr is BPF_OBJ_PIN's attr; `pathname` is a live NUL-terminated string
    // the kernel only reads.
    unsafe { bpf(Cmd::ObjPin, &mut attr) }.map_err(|source| SysError::Call {
        cmd: Cmd::ObjPin,
        source,
    })?;
    Ok(())
}

/// BPF_OBJ_GET_INFO_BY_FD on a map: its geometry as the kernel holds it.
pub fn map_info(map: BorrowedFd<'_>) -> Result<MapSpec, SysError> {
    let mut info = MapInfoHead::default();
    let mut attr = InfoAttr {
        bpf_fd: fd_u32(map),
        info_len: std::mem::size_of::<MapInfoHead>() as u32,
        info: &mut info as *mut MapInfoHead as u64,
    };
    // SAFETY: InfoAttr is BPF_OBJ_GET_INFO_BY_FD's attr; `info` points at a live buffer of
    // `info_len` bytes that the kernel writes.
    unsafe { bpf(Cmd::ObjGetInfoByFd, &mut attr) }.map_err(|source| SysError::Call {
        cmd: Cmd::ObjGetInfoByFd,
        source,
    })?;
    Ok(MapSpec {
        map_type: info.map_type,
        key_size: info.key_size,
        value_size: info.value_size,
        max_entries: info.max_entries,
        map_flags: info.map_flags,
    })
}

/// BPF_OBJ_GET: opens the map or program pinned at `path`.
pub fn obj_get(path: &Path) -> Result<OwnedFd, SysError> {
    let path = path_cstring(Cmd::ObjGet, path)?;
    let mut attr = ObjAttr {
        pathname: path.as_ptr() as u64,
        ..ObjAttr::default()
    };
    // SAFETY: ObjAttr is BPF_OBJ_GET's attr; `pathname` is a live NUL-terminated string
    // the kernel only reads.
    let ret = unsafe { bpf(Cmd::ObjGet, &mut attr) }.map_err(|source| SysError::Call {
        cmd: Cmd::ObjGet,
        source,
    })?;
    owned_fd(Cmd::ObjGet, ret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn obj_names_are_short_and_clean() {
        assert_eq!(&obj_name("EXOFS_PROBE_STATS")[..], b"EXOFS_PROBE_STA\0");
        assert_eq!(&obj_name("a-b c")[..6], b"a_b_c\0");
        assert_eq!(&obj_name(".rodata")[..8], b".rodata\0");
    }

    #[test]
    fn long_logs_show_their_tail() {
        let log: String = (0..250).map(|i| format!("line {i}\n")).collect();
        let shown = shown_log(&log);
        assert!(shown.contains("150 earlier lines omitted"));
        assert!(shown.contains("line 249\n"));
        assert!(!shown.contains("line 149\n"));
    }
}
