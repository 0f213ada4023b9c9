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
    pub map_addr: u64,
    /// 0 until a daemon registered.
    pub map_len: u64,
}

/// The daemon (one entry). Not pinned: only the programs of one store reach it.
#[map]
static EXOFS_DAEMON: Array<Daemon> = Array::with_max_entries(1, 0);

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
    // come and go, the process's memory map is what chains read.
    let tgid = (bpf_get_current_pid_tgid() >> 32) as i32;
    let task = bpf_task_from_pid(tgid);
    if task.is_null() {
        return status::INVALID;
    }
    // No chain may see the new task with the old mapping's length.
    (*daemon).map_len = 0;
    (*daemon).map_addr = map_addr;
    let old = bpf_kptr_xchg(core::ptr::addr_of_mut!((*daemon).task).cast(), task.cast());
    if !old.is_null() {
        bpf_task_release(old.cast());
    }
    (*daemon).map_len = map_len;
    status::DONE
}

/// The daemon's mapping (address, length); length 0 if no daemon registered.
#[inline(always)]
pub fn mapping() -> (u64, u64) {
    match EXOFS_DAEMON.get(0) {
        Some(daemon) => (daemon.map_addr, daemon.map_len),
        None => (0, 0),
    }
}

/// A new reference to the daemon's task, or null if none registered.
#[inline(always)]
unsafe fn acquire() -> *mut TaskStruct {
    let Some(daemon) = EXOFS_DAEMON.get_ptr_mut(0) else {
        return core::ptr::null_mut();
    };
    bpf_rcu_read_lock();
    let task = core::ptr::read_volatile(core::ptr::addr_of!((*daemon).task)) as *mut TaskStruct;
    let acquired = if task.is_null() {
        task
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
        let daemon = acquire();
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

/// Copies `len` bytes at `addr` in the daemon's memory to `dst` (may sleep on a fault).
/// 0, or a negative value if there is no daemon or the copy failed.
///
/// Safety: `dst` is valid for `len` bytes; `addr` is inside the daemon's device mapping
/// (the caller checks it against [`mapping`]).
#[inline(always)]
pub unsafe fn copy_from_daemon(dst: *mut c_void, len: u32, addr: u64) -> i64 {
    let task = acquire();
    if task.is_null() {
        return -1;
    }
    let ret = bpf_copy_from_user_task(dst, len, addr as *const c_void, task.cast(), 0);
    bpf_task_release(task);
    ret
}
