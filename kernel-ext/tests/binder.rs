//! The binder refuses application objects that could step outside the data the driver
//! hands them, and says which instruction and why; the kernel verifier's refusals come
//! back with its log. Objects are compiled from small C sources with clang at test time.

mod common;

use common::compile_c;
use kernel_ext::binder::{self, BindError};
use kernel_ext::binding::{Binding, BindingError};
use kernel_ext::{examples, SysError};

fn refusal(name: &str, source: &str) -> String {
    match binder::extract(&compile_c(name, source)) {
        Err(err) => err.to_string(),
        Ok(insns) => panic!("{name}: {} instructions accepted", insns.len()),
    }
}

#[test]
fn forbidden_helpers_are_named_with_their_instruction() {
    let message = refusal(
        "helper",
        "static long (*bpf_probe_read_kernel)(void *dst, __u32 size, const void *src) = (void *)113;
         int next(struct exofs_hop_state *s) {
             __u64 v = 0;
             bpf_probe_read_kernel(&v, 8, (void *)s->offset);
             return v ? EXOFS_NEXT_DONE : EXOFS_NEXT_ABORT;
         }",
    );
    assert!(message.contains("instruction "), "{message}");
    assert!(message.contains("opcode 0x85"), "{message}");
    assert!(
        message.contains("helper 113 (bpf_probe_read_kernel)"),
        "{message}"
    );
    assert!(message.contains("may call only bpf_loop"), "{message}");
}

#[test]
fn maps_and_global_data_are_refused() {
    let message = refusal(
        "map",
        "struct { int (*type)[2]; int (*max_entries)[1]; __u32 *key; __u64 *value; }
             counts __attribute__((section(\".maps\"), used));
         static void *(*lookup)(void *map, const void *key) = (void *)1;
         int next(struct exofs_hop_state *s) {
             __u32 k = 0;
             __u64 *v = lookup(&counts, &k);
             if (v) *v += 1;
             return EXOFS_NEXT_DONE;
         }",
    );
    assert!(message.contains("`counts`"), "{message}");
    assert!(message.contains("map or global data"), "{message}");
    let message = refusal(
        "global",
        "__u64 calls;
         int next(struct exofs_hop_state *s) { calls++; return EXOFS_NEXT_DONE; }",
    );
    assert!(message.contains(".bss"), "{message}");
}

#[test]
fn a_missing_next_is_named() {
    let message = refusal(
        "nonext",
        "int walk(struct exofs_hop_state *s) { return EXOFS_NEXT_DONE; }",
    );
    assert!(message.contains("no function `next`"), "{message}");
    let garbage = binder::extract(b"\x7fELF not really").expect_err("garbage");
    assert!(matches!(garbage, BindError::Object(_)), "{garbage}");
}

#[test]
fn plain_c_and_rust_objects_pass_the_allowlist() {
    binder::extract(examples::BTREE).expect("Rust B-tree");
    binder::extract(examples::BTREE_C).expect("C B-tree");
    binder::extract(examples::HASH_CHAIN).expect("hash chain");
    binder::extract(examples::LINKED_LIST).expect("linked list");
    let bpf_loop = compile_c(
        "bpfloop",
        "static long (*bpf_loop)(__u32 n, void *fn, void *ctx, __u64 flags) = (void *)181;
         static long add(__u64 i, void *ctx) { *(__u64 *)ctx += i; return 0; }
         int next(struct exofs_hop_state *s) {
             __u64 sum = 0;
             bpf_loop(8, add, &sum, 0);
             *(__u64 *)s->scratch = sum;
             return EXOFS_NEXT_DONE;
         }",
    );
    binder::extract(&bpf_loop).expect("bpf_loop with a callback of its own");
}

fn binding(test: &str) -> Option<(common::Image, Binding)> {
    let (image, _, binding) = common::setup(test, 16 << 20)?;
    Some((image, binding))
}

fn verifier_refusal(binding: &Binding, name: &str, source: &str) -> String {
    match binding.bind(name, &compile_c(name, source)) {
        Err(BindingError::Sys(err @ SysError::Verifier { .. })) => {
            let log = err.verifier_log().unwrap_or_default().to_owned();
            assert!(
                !log.is_empty(),
                "{name}: the refusal carries the verifier log"
            );
            format!("{err}")
        }
        Err(other) => panic!("{name}: expected a verifier refusal, got {other}"),
        Ok(_) => panic!("{name}: the verifier accepted it"),
    }
}

#[test]
fn reads_outside_the_hop_state_are_refused_by_the_verifier() {
    let Some((_image, binding)) = binding("outside") else {
        return;
    };
    let message = verifier_refusal(
        &binding,
        "outside",
        "int next(struct exofs_hop_state *s) {
             __u64 i = *(__u64 *)s->scratch & 0x1fff; /* up to 8 KiB into a 4 KiB block */
             *(__u64 *)s->scratch = s->data[i];
             return EXOFS_NEXT_DONE;
         }",
    );
    assert!(message.contains("--- verifier log ---"), "{message}");
    assert!(message.contains("invalid access to map value"), "{message}");
}

#[test]
fn loops_without_a_bound_are_refused_by_the_verifier() {
    let Some((_image, binding)) = binding("loop") else {
        return;
    };
    let message = verifier_refusal(
        &binding,
        "spin",
        "int next(struct exofs_hop_state *s) {
             volatile __u32 *hop = &s->hop;
             while (*hop != 12345)
                 ;
             return EXOFS_NEXT_DONE;
         }",
    );
    assert!(
        message.contains("infinite loop") || message.contains("too large"),
        "{message}"
    );
}
