//! kernel-ext: the exofs kernel binding — BPF maps for registered extents, the program
//! binder, and the chain runner.
//!
//! Layer: between mount-tool / linked applications (above) and the kernel's BPF subsystem
//! (below); libfs notifies it of extent changes. Modules, bottom up:
//! - [`sys`]: the one module of raw bpf(2) calls (maps, BTF, program load with the
//!   verifier log, test run, pin/get);
//! - [`btf`]: the BTF (func_info, map key/value types) the kernel requires, synthesized;
//! - `elf_check`: refuse, with a reason, the malformed objects aya-obj would panic on
//!   (symbols, `.BTF`, `.BTF.ext`, call relocations), before the loader hands them over;
//! - [`loader`]: parse a BPF ELF with aya-obj, create and relocate its maps, link and load
//!   its `syscall` programs as sleepable BPF_PROG_TYPE_SYSCALL programs, run them;
//! - [`extent_map`]: a file's extents cut into the chunks of the `extents` map, and the
//!   driver's translation done in user space (reference);
//! - [`binder`]: an application's `next` extracted, checked against the allowlist and
//!   spliced into the driver;
//! - [`store`]: one file system's maps, pins, bound programs and policy, without the
//!   file system (what `exofs prog` uses on a mounted image);
//! - [`binding`]: a store plus the file system: registered files and the chain runner
//!   (single chains and batches);
//! - [`index`]: the example formats built and walked in user space;
//! - [`DRIVER_ELF`] and [`examples`]: the trusted driver (`bpf/driver`) and the example
//!   application objects (`bpf/examples`), built by build.rs and embedded.
//!
//! Interface: [`binding::Binding::open`] -> `bind` -> `run` / `run_batch`. Loading needs
//! CAP_BPF + CAP_PERFMON (in practice root); callers check
//! [`sys::SysError::is_permission_denied`].
//!
//! Invariants: every kernel object is owned by an `OwnedFd` in a handle; nothing is
//! pinned unless asked; `unsafe` lives in `sys`, in the byte views of `loader`, and in the
//! device mapping of `binding`.

pub mod binder;
pub mod binding;
pub mod btf;
mod elf_check;
pub mod extent_map;
pub mod hot;
pub mod index;
pub mod loader;
pub mod ring;
pub mod store;

/// The example application objects (bpf/examples), built by build.rs.
pub mod examples {
    /// B-tree search (Rust), `exofs_abi::formats::btree`.
    pub static BTREE: &[u8] = include_bytes!(env!("EXOFS_EXAMPLE_BTREE_ELF"));
    /// The same B-tree search in C (clang).
    pub static BTREE_C: &[u8] = include_bytes!(env!("EXOFS_EXAMPLE_BTREE_C_ELF"));
    /// Hash-chain walk (Rust), `exofs_abi::formats::hash`.
    pub static HASH_CHAIN: &[u8] = include_bytes!(env!("EXOFS_EXAMPLE_HASH_CHAIN_ELF"));
    /// Linked-list walk (Rust), `exofs_abi::formats::list`.
    pub static LINKED_LIST: &[u8] = include_bytes!(env!("EXOFS_EXAMPLE_LINKED_LIST_ELF"));
    /// SQLite rowid lookup in a table B-tree (`exofs_abi::formats::sqlite`).
    pub static SQLITE_ROWID: &[u8] = include_bytes!(env!("EXOFS_EXAMPLE_SQLITE_ROWID_ELF"));
}
pub mod sys;

pub use loader::{LoadError, MapHandle, Object, SyscallProgram};
pub use sys::SysError;

/// The trusted driver: the ELF object built from `bpf/driver` by build.rs.
pub static DRIVER_ELF: &[u8] = include_bytes!(env!("EXOFS_DRIVER_ELF"));

/// Name of the toolchain probe program in [`DRIVER_ELF`] (context
/// [`exofs_abi::probe::ProbeCtx`]).
pub const PROBE_PROGRAM: &str = "exofs_probe";
/// Name of the probe's statistics map in [`DRIVER_ELF`]: ARRAY, key u32 0, value u64 runs.
pub const PROBE_STATS_MAP: &str = "EXOFS_PROBE_STATS";
