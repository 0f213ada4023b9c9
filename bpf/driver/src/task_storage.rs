//! BPF_MAP_TYPE_TASK_STORAGE, which aya-ebpf 0.2.1 lacks: one value per task, created on
//! first use and freed when the task exits.
//!
//! Why the chain needs it: a syscall program is sleepable, so it runs with migration
//! disabled but NOT with preemption disabled, and `bpf_copy_from_user` sleeps on a page
//! fault. A per-CPU value would be shared by every chain that runs on that CPU while
//! another one sleeps: one caller's blocks could reach another caller's `next`. A task's
//! value is only ever touched by that task (a test run executes on the calling thread).
//!
//! The map is a legacy `maps` definition; kernel-ext's loader gives it the BTF the kernel
//! requires for local-storage maps (an `int` key, a byte array the size of the value).

use core::{cell::UnsafeCell, marker::PhantomData, ptr::null_mut};

use aya_ebpf::{
    bindings::bpf_map_def,
    helpers::generated::{bpf_get_current_task_btf, bpf_task_storage_get},
};

/// `BPF_MAP_TYPE_TASK_STORAGE`.
const BPF_MAP_TYPE_TASK_STORAGE: u32 = 29;
/// `BPF_F_NO_PREALLOC`: required for local-storage maps.
const BPF_F_NO_PREALLOC: u32 = 1;
/// `BPF_LOCAL_STORAGE_GET_F_CREATE`: create a zeroed value if the task has none.
const GET_F_CREATE: u64 = 1;

/// A task-storage map whose values are `T`.
#[repr(transparent)]
pub struct TaskStorage<T> {
    def: UnsafeCell<bpf_map_def>,
    _value: PhantomData<T>,
}

// SAFETY: the definition is only read by the loader and passed by address to helpers; the
// kernel serializes access to the map itself.
unsafe impl<T> Sync for TaskStorage<T> {}

impl<T> TaskStorage<T> {
    /// The map definition (key: a task, as an fd in user space; value: `T`).
    pub const fn new() -> Self {
        Self {
            def: UnsafeCell::new(bpf_map_def {
                type_: BPF_MAP_TYPE_TASK_STORAGE,
                key_size: 4,
                value_size: core::mem::size_of::<T>() as u32,
                max_entries: 0,
                map_flags: BPF_F_NO_PREALLOC,
                id: 0,
                pinning: 0,
            }),
            _value: PhantomData,
        }
    }

    /// The current task's value, created zeroed on first use; `None` if the kernel could
    /// not allocate it.
    #[inline(always)]
    pub fn current(&self) -> Option<*mut T> {
        // SAFETY: both helpers take no pointer from us except the map's definition, which
        // the loader relocates to the map; the task pointer comes straight from the kernel.
        let value = unsafe {
            bpf_task_storage_get(
                self.def.get().cast(),
                bpf_get_current_task_btf(),
                null_mut(),
                GET_F_CREATE,
            )
        };
        if value.is_null() {
            None
        } else {
            Some(value.cast())
        }
    }
}
