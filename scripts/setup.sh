#!/usr/bin/env bash
# Installs what building exofs needs on a fresh machine (idempotent; run as root):
# rustfmt and clippy, and for the BPF programs: LLVM 22, nightly with rust-src
# (build-std for bpfel-unknown-none) and bpf-linker built against LLVM 22 (without
# LLVM_PREFIX it picks LLVM 14 and fails to link). The tests also use gcc (the C ABI
# header and the C ioctl example), useradd (passwd: an unprivileged test user) and mount
# tools; `exofs bench mount` compares with fuse2fs and mkfs.ext4 (e2fsprogs).
# scripts/fuzz.sh needs cargo-fuzz (run with the nightly toolchain).
set -euo pipefail

log() { printf 'setup: %s\n' "$*" >&2; }

if ! command -v cargo >/dev/null 2>&1; then
    log "cargo is missing (the machine image ships rustup's stable toolchain)"
    exit 1
fi
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy

need_apt=()
for package in llvm-22-dev clang-22 libzstd-dev zlib1g-dev gcc passwd util-linux e2fsprogs fuse2fs; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' \
        || need_apt+=("$package")
done
if [ "${#need_apt[@]}" -gt 0 ]; then
    log "installing ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi
if ! rustup toolchain list | grep -q '^nightly'; then
    log "installing the nightly toolchain"
    rustup toolchain install nightly --profile minimal
fi
rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src' \
    || rustup component add rust-src --toolchain nightly
if ! command -v bpf-linker >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/bpf-linker" ]; then
    log "building bpf-linker 0.13.0 against LLVM 22 (a few minutes)"
    LLVM_PREFIX=/usr/lib/llvm-22 cargo +nightly install bpf-linker --version 0.13.0 \
        --no-default-features --features llvm-22
fi
if ! command -v cargo-fuzz >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/cargo-fuzz" ]; then
    log "installing cargo-fuzz (about a minute)"
    cargo install cargo-fuzz --locked
fi
