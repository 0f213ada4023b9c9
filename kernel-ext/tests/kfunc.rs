//! Calls to kernel functions (kfuncs) in objects the loader loads: a C syscall program
//! that takes a task with `bpf_task_from_pid`, copies from that task's memory with
//! `bpf_copy_from_user_task` and releases the task with `bpf_task_release` loads and runs
//! (the loader resolves both kfuncs against /sys/kernel/btf/vmlinux); a call to a
//! function the kernel does not have is refused by name; and an application's code may
//! call none (the binder refuses it before anything is resolved).
//!
//! Needs root (CAP_BPF + CAP_PERFMON); without it each test prints a SKIPPED line.

mod common;

use common::compile_c;
use kernel_ext::loader::{LoadError, Object};

/// The program: reads 16 bytes at `addr` in the memory of the task `pid`.
const READER: &str = r#"
struct task_struct;
extern struct task_struct *bpf_task_from_pid(int pid) __attribute__((section(".ksyms")));
extern void bpf_task_release(struct task_struct *task) __attribute__((section(".ksyms")));
static long (*copy_from_user_task)(void *dst, __u32 size, const void *user_ptr,
                                   struct task_struct *task, __u64 flags) = (void *)191;

struct reader_ctx {
    __s32 pid;
    __s32 ret;
    __u64 addr;
    __u8 out[16];
};

__attribute__((section("syscall"), used))
int reader(struct reader_ctx *ctx)
{
    struct task_struct *task = bpf_task_from_pid(ctx->pid);
    if (!task) {
        ctx->ret = -3;
        return 0;
    }
    __u8 out[16] = {};
    ctx->ret = copy_from_user_task(out, sizeof(out), (const void *)ctx->addr, task, 0);
    bpf_task_release(task);
    __builtin_memcpy(ctx->out, out, sizeof(out));
    return 0;
}

char _license[] __attribute__((section("license"), used)) = "GPL";
"#;

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct ReaderCtx {
    pid: i32,
    ret: i32,
    addr: u64,
    out: [u8; 16],
}

fn as_bytes(ctx: &mut ReaderCtx) -> &mut [u8] {
    // SAFETY: a repr(C) struct of integers with no padding (4 + 4 + 8 + 16 bytes).
    unsafe {
        std::slice::from_raw_parts_mut(
            (ctx as *mut ReaderCtx).cast::<u8>(),
            std::mem::size_of::<ReaderCtx>(),
        )
    }
}

fn root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        common::skip(test, "not running as root (CAP_BPF + CAP_PERFMON)");
        return false;
    }
    true
}

#[test]
fn a_program_calls_kernel_functions_the_loader_resolved() {
    if !root("a_program_calls_kernel_functions_the_loader_resolved") {
        return;
    }
    let object = Object::load(&compile_c("kfunc_reader", READER)).expect("load");
    let program = object.program("reader").expect("the reader program");
    let secret: [u8; 16] = *b"read by a kfunc!";
    let mut ctx = ReaderCtx {
        pid: std::process::id() as i32,
        addr: secret.as_ptr() as u64,
        ..ReaderCtx::default()
    };
    program.test_run(as_bytes(&mut ctx)).expect("test run");
    assert_eq!(ctx.ret, 0, "{ctx:?}");
    assert_eq!(&ctx.out, &secret);
    // No such task: bpf_task_from_pid gives NULL and the program says so.
    let mut missing = ReaderCtx {
        pid: i32::MAX,
        ..ReaderCtx::default()
    };
    program.test_run(as_bytes(&mut missing)).expect("test run");
    assert_eq!(missing.ret, -3);
}

#[test]
fn a_kernel_function_the_kernel_lacks_is_refused_by_name() {
    if !root("a_kernel_function_the_kernel_lacks_is_refused_by_name") {
        return;
    }
    let source = READER.replace("bpf_task_release", "exofs_no_such_kfunc");
    match Object::load(&compile_c("kfunc_missing", &source)) {
        Err(LoadError::Kfunc { name, why }) => {
            assert_eq!(name, "exofs_no_such_kfunc");
            assert!(why.contains("no function"), "{why}");
        }
        other => panic!("expected a kfunc error, got {other:?}"),
    }
}

#[test]
fn an_application_may_call_no_kernel_function() {
    let source = r#"
struct task_struct;
extern struct task_struct *bpf_task_from_pid(int pid) __attribute__((section(".ksyms")));

__attribute__((section("exofs/next"), used))
int next(struct exofs_hop_state *state)
{
    return bpf_task_from_pid((int)state->hop) ? EXOFS_NEXT_DONE : EXOFS_NEXT_ABORT;
}
"#;
    let refused = kernel_ext::binder::extract(&compile_c("kfunc_app", source));
    let why = format!("{:?}", refused.expect_err("an app calling a kfunc"));
    assert!(why.contains("bpf_task_from_pid"), "{why}");
}

#[test]
fn an_extern_variable_is_refused_by_name() {
    // Not a call: aya-obj would silently load 0 for it.
    let source = r#"
extern int exofs_extern_counter __attribute__((section(".ksyms")));

__attribute__((section("syscall"), used))
int counter(void *ctx)
{
    return (int)(long)&exofs_extern_counter;
}

char _license[] __attribute__((section("license"), used)) = "GPL";
"#;
    match Object::load(&compile_c("kfunc_variable", source)) {
        Err(LoadError::Kfunc { name, why }) => {
            assert_eq!(name, "exofs_extern_counter");
            assert!(why.contains("other than by a call"), "{why}");
        }
        other => panic!("expected a kfunc error, got {other:?}"),
    }
}
