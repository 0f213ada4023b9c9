//! The mount daemon, as the kernel knows it: its task and its mapping of the device.
//!
//! `exofs_register` (run by the daemon, the only holder of that program's fd) stores a
//! reference to the calling process's task in EXOFS_DAEMON with `bpf_kptr_xchg`, and the
//! address and length of its read-only device mapping. From then on:
//! - the daemon is the policy's speaker: [`is_daemon`] compares the caller's process with
//!   the stored task. The map holds a reference, so the task cannot be freed and its
//!   address reused while the map lives; a process that later gets the daemon's pid is a
//!   different task and is not the speaker;
//! - direct chains read blocks through that mapping with `bpf_copy_from_user_task`
//!   ([`copy_from_daemon`]) at addresses the driver computes from translated extents.
//!   Once the daemon has exited its task has no memory map, the copy fails, and the chain
//!   ends NO_DAEMON with no data.
//!
//! Registrations are numbered (`seq`, odd while one is being written). A chain reads the
//! mapping once ([`mapping`]) and every hop checks, under the same RCU section as its
//! look at the task, that the number has not moved: a chain that straddles a new
//! registration (a new daemon after the old one died) never reads the new daemon's
//! memory at the old mapping's addresses. A registration with length 0 removes the daemon
//! (the daemon does so before it unmaps the device).
//!
//! The map is read-only to system calls (BPF_F_RDONLY): only `exofs_register` writes it.
//!
//! Memory order: the registration protocol relies on the loads and stores below being
//! seen in program order across CPUs, which x86 (TSO, the machines this runs on)
//! guarantees, and `bpf_kptr_xchg` is a full barrier everywhere. A weakly ordered
//! architecture would need the numbers read with a fetching atomic.
//!
//! The kfuncs are declared here and resolved by kernel-ext's loader against the running
//! kernel's BTF (`elf_check::externs`). The map's value BTF (a `kptr`-tagged pointer to
//! `task_struct` at offset 0) is made by the loader too (`btf::task_kptr_map_btf`).

use core::ffi::c_void;

use aya_ebpf::{
    helpers::generated::{bpf_copy_from_user_task, bpf_get_current_pid_tgid, bpf_kptr_xchg},
    macros::map,
    maps::Array,
};
use exofs_abi::chain::{status, RegisterCtx};

/// The kernel's `struct task_struct`, opaque.
#[repr(C)]
pub struct TaskStruct {
    _opaque: [u8; 0],
}

extern "C" {
    fn bpf_task_from_pid(pid: i32) -> *mut TaskStruct;
    fn bpf_task_acquire(task: *mut TaskStruct) -> *mut TaskStruct;
    fn bpf_task_release(task: *mut TaskStruct);
    fn bpf_rcu_read_lock();
    fn bpf_rcu_read_unlock();
}

/// The value of EXOFS_DAEMON.
#[repr(C)]
pub struct Daemon {
    /// A referenced kptr (`*mut TaskStruct`; an integer here so that the map value is
    /// `Sync`): written only with `bpf_kptr_xchg`, read under RCU.
    task: u64,
    map_addr: u64,
    /// 0 while no daemon is registered.
    map_len: u64,
    /// The registration's number: odd while one is being written.
    seq: u64,
}

/// `BPF_F_RDONLY`: system calls may not write the map.
const BPF_F_RDONLY: u32 = 1 << 3;

/// The daemon (one entry), pinned with the other maps so that every process that binds
/// programs links them to the same one.
#[map]
static EXOFS_DAEMON: Array<Daemon> = Array::with_max_entries(1, BPF_F_RDONLY);

/// The daemon's mapping as a chain sees it for its whole walk.
#[derive(Clone, Copy)]
pub struct Mapping {
    pub addr: u64,
    /// 0: no daemon (or a registration in progress).
    pub len: u64,
    pub seq: u64,
}

/// The registration program (see the module documentation). Status INVALID if the map or
/// the task cannot be had.
#[no_mangle]
#[link_section = "syscall"]
pub extern "C" fn exofs_register(ctx: *mut c_void) -> i32 {
    let ctx = ctx.cast::<RegisterCtx>();
    // SAFETY: the kernel passes a context of at least size_of::<RegisterCtx>() bytes.
    let (map_addr, map_len) = unsafe { ((*ctx).map_addr, (*ctx).map_len) };
    // SAFETY: the map value is a live `Daemon`; the kfuncs get a pid and the task they
    // returned; the old task the exchange hands back is released.
    let result = unsafe { register(map_addr, map_len) };
    // SAFETY: as above.
    unsafe { (*ctx).status = result };
    result
}

unsafe fn register(map_addr: u64, map_len: u64) -> i32 {
    let Some(daemon) = EXOFS_DAEMON.get_ptr_mut(0) else {
        return status::INVALID;
    };
    // The process (thread group leader), not the calling thread: threads of the daemon
    // come and go, the process's memory map is what chains read. None to unregister,
    // which only the registered daemon may do (a daemon that exits must never remove a
    // newer one's registration).
    let task = if map_len == 0 {
        if !is_daemon() {
            return status::DONE;
        }
        core::ptr::null_mut()
    } else {
        let tgid = (bpf_get_current_pid_tgid() >> 32) as i32;
        let task = bpf_task_from_pid(tgid);
        if task.is_null() {
            return status::INVALID;
        }
        task
    };
    // Odd: chains that start now see no daemon; chains running see the number move.
    let seq = core::ptr::read_volatile(core::ptr::addr_of!((*daemon).seq));
    core::ptr::write_volatile(core::ptr::addr_of_mut!((*daemon).seq), (seq | 1) + 2);
    (*daemon).map_len = 0;
    (*daemon).map_addr = map_addr;
    let old = bpf_kptr_xchg(core::ptr::addr_of_mut!((*daemon).task).cast(), task.cast());
    if !old.is_null() {
        bpf_task_release(old.cast());
    }
    (*daemon).map_len = map_len;
    core::ptr::write_volatile(core::ptr::addr_of_mut!((*daemon).seq), (seq | 1) + 3);
    status::DONE
}

/// The daemon's mapping as it is registered now (length 0: none, or a registration in
/// progress).
#[inline(always)]
pub fn mapping() -> Mapping {
    let none = Mapping {
        addr: 0,
        len: 0,
        seq: 0,
    };
    let Some(daemon) = EXOFS_DAEMON.get_ptr(0) else {
        return none;
    };
    // SAFETY: a live map value; the fields are read one by one, the number around them.
    unsafe {
        let seq = core::ptr::read_volatile(core::ptr::addr_of!((*daemon).seq));
        let addr = core::ptr::read_volatile(core::ptr::addr_of!((*daemon).map_addr));
        let len = core::ptr::read_volatile(core::ptr::addr_of!((*daemon).map_len));
        let again = core::ptr::read_volatile(core::ptr::addr_of!((*daemon).seq));
        if seq & 1 != 0 || seq != again {
            return none;
        }
        Mapping { addr, len, seq }
    }
}

/// A new reference to the daemon's task, or null if none is registered or the
/// registration is no longer number `seq` (u64::MAX: any).
#[inline(always)]
unsafe fn acquire(seq: u64) -> *mut TaskStruct {
    let Some(daemon) = EXOFS_DAEMON.get_ptr_mut(0) else {
        return core::ptr::null_mut();
    };
    bpf_rcu_read_lock();
    let task = core::ptr::read_volatile(core::ptr::addr_of!((*daemon).task)) as *mut TaskStruct;
    // Read after the task: a task written by a newer registration comes with its number
    // already moved (the exchange is a full barrier, and it follows the first move).
    let now = core::ptr::read_volatile(core::ptr::addr_of!((*daemon).seq));
    let acquired = if task.is_null() || (seq != u64::MAX && now != seq) {
        core::ptr::null_mut()
    } else {
        bpf_task_acquire(task)
    };
    bpf_rcu_read_unlock();
    acquired
}

/// Whether the calling process is the registered daemon.
#[inline(always)]
pub fn is_daemon() -> bool {
    // SAFETY: the kfuncs get a pid and references they returned, each released once.
    unsafe {
        let daemon = acquire(u64::MAX);
        if daemon.is_null() {
            return false;
        }
        let tgid = (bpf_get_current_pid_tgid() >> 32) as i32;
        let current = bpf_task_from_pid(tgid);
        let same = !current.is_null() && current == daemon;
        if !current.is_null() {
            bpf_task_release(current);
        }
        bpf_task_release(daemon);
        same
    }
}

/// Whether registration `seq`'s daemon still has its memory: one byte of its mapping at
/// `addr` is copied. After it exits (or is killed) its task has no memory map and the copy
/// fails; a newer registration fails `seq`.
///
/// Safety: `addr` is inside the mapping of registration `seq`.
#[inline(never)]
pub unsafe fn alive(seq: u64, addr: u64) -> bool {
    let mut byte = 0u64;
    copy_from_daemon(core::ptr::addr_of_mut!(byte).cast(), 1, addr, seq) == 0
}

/// Copies `len` bytes at `addr` in the daemon's memory to `dst` (may sleep on a fault).
/// 0, or a negative value if there is no daemon, it is no longer registration `seq`, or
/// the copy failed.
///
/// Safety: `dst` is valid for `len` bytes; `addr` is inside the mapping of registration
/// `seq` (the caller checks it against [`mapping`]).
#[inline(always)]
pub unsafe fn copy_from_daemon(dst: *mut c_void, len: u32, addr: u64, seq: u64) -> i64 {
    let task = acquire(seq);
    if task.is_null() {
        return -1;
    }
    let ret = bpf_copy_from_user_task(dst, len, addr as *const c_void, task.cast(), 0);
    bpf_task_release(task);
    ret
}
