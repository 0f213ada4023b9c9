//! Builds the trusted BPF driver (`bpf/driver`, its own cargo workspace) with
//! `cargo +nightly build --release` and exports the ELF's path as `EXOFS_DRIVER_ELF`, which
//! the crate embeds with `include_bytes!`.
//!
//! Incremental: this script reruns only when the driver's or the ABI's sources or manifests
//! change (rerun-if-changed), and the nested cargo, with its own target directory
//! (`bpf/driver/target`), rebuilds only what changed.
//!
//! Requires nightly with rust-src and bpf-linker (built against LLVM 22); if either is
//! missing the build fails with the command that installs it.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::{exit, Command, Stdio},
};

/// Installs what the driver build needs (kept in step with `.ci/run`).
const INSTALL_HELP: &str = "\
The BPF driver (bpf/driver) needs, once per machine:
  apt-get install -y llvm-22-dev clang-22 libzstd-dev zlib1g-dev
  rustup toolchain install nightly --profile minimal
  rustup component add rust-src --toolchain nightly
  LLVM_PREFIX=/usr/lib/llvm-22 cargo +nightly install bpf-linker --version 0.13.0 \\
      --no-default-features --features llvm-22
(.ci/run does this.)";

/// Environment variables a build script inherits from the outer cargo that would leak into
/// the nested build: they name the outer toolchain, target, flags, wrappers (clippy sets
/// RUSTC_WORKSPACE_WRAPPER), target directory and jobserver.
const CLEARED: &[&str] = &[
    "CARGO",
    "CARGO_BUILD_RUSTC",
    "CARGO_BUILD_RUSTC_WRAPPER",
    "CARGO_BUILD_RUSTC_WORKSPACE_WRAPPER",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_MAKEFLAGS",
    "CARGO_TARGET_DIR",
    "CLIPPY_ARGS",
    "CLIPPY_CONF_DIR",
    "DEBUG",
    "HOST",
    "MAKEFLAGS",
    "MFLAGS",
    "NUM_JOBS",
    "OPT_LEVEL",
    "OUT_DIR",
    "PROFILE",
    "RUSTC",
    "RUSTC_LINKER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTC_WRAPPER",
    "RUSTDOC",
    "RUSTDOCFLAGS",
    "RUSTFLAGS",
    "RUSTUP_TOOLCHAIN",
    "TARGET",
];

/// Prefixes of further per-build variables cargo sets for build scripts.
const CLEARED_PREFIXES: &[&str] = &[
    "CARGO_CFG_",
    "CARGO_FEATURE_",
    "CARGO_MANIFEST_",
    "CARGO_PKG_",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_",
    "DEP_",
];

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    exit(1);
}

fn cargo_home() -> Option<PathBuf> {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
}

/// The rustup `cargo` proxy, which understands `+nightly` (the `CARGO` variable of a build
/// script names the toolchain's own cargo, which does not).
fn cargo_proxy() -> PathBuf {
    if let Some(proxy) = cargo_home().map(|home| home.join("bin/cargo")) {
        if proxy.is_file() {
            return proxy;
        }
    }
    PathBuf::from("cargo")
}

fn find_on_path(program: &str, path: &OsString) -> bool {
    env::split_paths(path).any(|dir| dir.join(program).is_file())
}

fn nested_cargo(proxy: &Path, dir: &Path, path: &OsString) -> Command {
    let mut command = Command::new(proxy);
    command.arg("+nightly").current_dir(dir).env("PATH", path);
    for name in CLEARED {
        command.env_remove(name);
    }
    for (name, _) in env::vars_os() {
        let name = name.to_string_lossy();
        if CLEARED_PREFIXES
            .iter()
            .any(|prefix| name.starts_with(prefix))
        {
            command.env_remove(name.as_ref());
        }
    }
    command
}

/// Builds the cargo workspace in `dir` for BPF into `target_dir`; `what` names it in errors.
fn build_bpf_workspace(proxy: &Path, dir: &Path, target_dir: &Path, path: &OsString, what: &str) {
    let status = nested_cargo(proxy, dir, path)
        .args(["build", "--release"])
        .env("CARGO_TARGET_DIR", target_dir)
        // The nested cargo's stdout must not reach ours: cargo parses it for directives.
        .stdout(Stdio::from(std::io::stderr()))
        .status()
        .unwrap_or_else(|err| fail(&format!("cannot run {}: {err}", proxy.display())));
    if !status.success() {
        fail(&format!(
            "building {what} failed ({status}); run `cd {} && cargo +nightly build --release` \
             to see why. If the failure is about rust-src or the linker:\n{INSTALL_HELP}",
            dir.display()
        ));
    }
}

/// Exports the ELF at `elf` to the crate as the compile-time variable `variable`.
fn export_elf(variable: &str, elf: PathBuf) {
    if !elf.is_file() {
        fail(&format!("the BPF build produced no {}", elf.display()));
    }
    let elf = elf.canonicalize().unwrap_or(elf);
    println!("cargo:rustc-env={variable}={}", elf.display());
}

/// The clang that compiles the C examples: clang-22 (installed with LLVM 22), else clang.
fn clang(path: &OsString) -> &'static str {
    if find_on_path("clang-22", path) {
        "clang-22"
    } else if find_on_path("clang", path) {
        "clang"
    } else {
        fail(&format!("clang is not installed\n{INSTALL_HELP}"))
    }
}

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| fail("no manifest dir")));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap_or_else(|| fail("no OUT_DIR")));
    let bpf = manifest_dir.join("../bpf");
    let driver = bpf.join("driver");
    let examples = bpf.join("examples");
    for crate_dir in [&driver, &examples] {
        for watched in ["src", "Cargo.toml", "Cargo.lock", ".cargo/config.toml"] {
            println!(
                "cargo:rerun-if-changed={}",
                crate_dir.join(watched).display()
            );
        }
    }
    for watched in [
        "abi/src",
        "abi/Cargo.toml",
        "abi/include",
        "appfn/src",
        "appfn/Cargo.toml",
        "examples/c",
    ] {
        println!("cargo:rerun-if-changed={}", bpf.join(watched).display());
    }

    // bpf-linker is usually in ~/.cargo/bin; make sure rustc finds it there even if the
    // outer PATH lacks that directory.
    let mut path = env::var_os("PATH").unwrap_or_default();
    if let Some(bin) = cargo_home().map(|home| home.join("bin")) {
        let mut dirs: Vec<PathBuf> = env::split_paths(&path).collect();
        if !dirs.contains(&bin) {
            dirs.push(bin);
            path = env::join_paths(dirs).unwrap_or_else(|_| fail("cannot extend PATH"));
        }
    }
    let proxy = cargo_proxy();

    let nightly = nested_cargo(&proxy, &driver, &path)
        .arg("--version")
        .output();
    if !matches!(&nightly, Ok(output) if output.status.success()) {
        fail(&format!(
            "`cargo +nightly` does not run (is the nightly toolchain installed?)\n{INSTALL_HELP}"
        ));
    }
    if !find_on_path("bpf-linker", &path) {
        fail(&format!("bpf-linker is not installed\n{INSTALL_HELP}"));
    }

    // One target directory for both workspaces: the second build reuses core and the ABI.
    let target_dir = bpf.join("target");
    build_bpf_workspace(&proxy, &driver, &target_dir, &path, "the BPF driver");
    build_bpf_workspace(&proxy, &examples, &target_dir, &path, "the BPF examples");
    let release = target_dir.join("bpfel-unknown-none/release");
    export_elf("EXOFS_DRIVER_ELF", release.join("exofs-driver"));
    export_elf("EXOFS_EXAMPLE_BTREE_ELF", release.join("btree"));
    export_elf("EXOFS_EXAMPLE_HASH_CHAIN_ELF", release.join("hash_chain"));
    export_elf("EXOFS_EXAMPLE_LINKED_LIST_ELF", release.join("linked_list"));
    export_elf(
        "EXOFS_EXAMPLE_SQLITE_ROWID_ELF",
        release.join("sqlite_rowid"),
    );

    let c_object = out_dir.join("btree_c.o");
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".to_owned());
    let status = Command::new(clang(&path))
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror", "-I"])
        .arg(bpf.join("abi/include"))
        .arg("-I")
        .arg(format!("/usr/include/{arch}-linux-gnu"))
        .arg("-c")
        .arg(bpf.join("examples/c/btree.c"))
        .arg("-o")
        .arg(&c_object)
        .env("PATH", &path)
        .stdout(Stdio::from(std::io::stderr()))
        .status()
        .unwrap_or_else(|err| fail(&format!("cannot run clang: {err}")));
    if !status.success() {
        fail(&format!(
            "compiling bpf/examples/c/btree.c failed ({status})"
        ));
    }
    export_elf("EXOFS_EXAMPLE_BTREE_C_ELF", c_object);
}
