//! Helpers shared by kernel-ext's integration tests: images, bindings that skip without
//! privilege, fragmented writes, C objects compiled at test time, private bpffs mounts.
#![allow(dead_code)] // each test binary uses a different subset

use kernel_ext::binding::{Binding, BindingOptions};
use kernel_ext::hot::HotWrites;
use libfs::{BlockDevice, FileDevice, FormatOptions, Fs, OpenOptions, ROOT_INO};
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

/// An image file removed on drop.
pub struct Image(pub PathBuf);

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A fresh image of `size` bytes for `test`, opened read-write.
pub fn image(test: &str, size: u64) -> (Image, Arc<Fs>) {
    let image =
        Image(std::env::temp_dir().join(format!("exofs-ke-{}-{test}.img", std::process::id())));
    let device = FileDevice::create(&image.0, size).expect("image");
    libfs::format(Arc::new(device), &FormatOptions::default()).expect("format");
    let fs = Arc::new(Fs::open(&image.0, &OpenOptions::default()).expect("open"));
    (image, fs)
}

#[path = "../../../libfs/tests/common/skip.rs"]
mod skipping;
pub use skipping::skip;

/// A binding on `fs` with `options`; None (after a SKIPPED line) without the privilege.
pub fn binding(test: &str, fs: &Arc<Fs>, options: &BindingOptions) -> Option<Binding> {
    match Binding::open(fs.clone(), options) {
        Ok(binding) => Some(binding),
        Err(err) if err.is_permission_denied() => {
            skip(
                test,
                &format!("{err} (loading BPF needs root: CAP_BPF + CAP_PERFMON)"),
            );
            None
        }
        Err(err) => panic!("opening the binding failed: {err}"),
    }
}

/// A fresh image and an unpinned binding on it.
pub fn setup(test: &str, size: u64) -> Option<(Image, Arc<Fs>, Binding)> {
    let (image, fs) = image(test, size);
    let options = BindingOptions {
        pin: false,
        ..BindingOptions::default()
    };
    let binding = binding(test, &fs, &options)?;
    Some((image, fs, binding))
}

/// A fresh image whose file system writes through a [`HotWrites`], and an unpinned
/// binding on it with a hot-block table of `hot_bytes`, served (`Binding::serve_hot`) but
/// not yet registered as the daemon.
pub fn setup_hot(test: &str, size: u64, hot_bytes: u64) -> Option<(Image, Arc<Fs>, Binding)> {
    setup_hot_over(test, size, hot_bytes, |device| device)
}

/// As [`setup_hot`], with the image's device wrapped by `wrap` under the [`HotWrites`].
pub fn setup_hot_over(
    test: &str,
    size: u64,
    hot_bytes: u64,
    wrap: impl FnOnce(Arc<dyn BlockDevice>) -> Arc<dyn BlockDevice>,
) -> Option<(Image, Arc<Fs>, Binding)> {
    let image =
        Image(std::env::temp_dir().join(format!("exofs-ke-{}-{test}.img", std::process::id())));
    let device = FileDevice::create(&image.0, size).expect("image");
    libfs::format(Arc::new(device), &FormatOptions::default()).expect("format");
    let device = FileDevice::open(&image.0, true).expect("open the image");
    let writes = Arc::new(HotWrites::new(wrap(Arc::new(device))));
    let fs = Arc::new(Fs::open_device(writes.clone(), &OpenOptions::default()).expect("open"));
    let options = BindingOptions {
        pin: false,
        hot_bytes,
        ..BindingOptions::default()
    };
    let binding = binding(test, &fs, &options)?;
    binding
        .serve_hot(&writes)
        .expect("serve the hot-block table");
    Some((image, fs, binding))
}

/// Writes `bytes` as file `name`, block by block, writing a block of another file after
/// every `every` blocks so that the file's extents are short and scattered.
pub fn write_fragmented(fs: &Fs, name: &str, bytes: &[u8], every: usize) -> u64 {
    let ino = fs
        .create(ROOT_INO, name.as_bytes(), 0o644, 0, 0)
        .expect("create")
        .ino;
    let filler = fs
        .create(ROOT_INO, format!("{name}.filler").as_bytes(), 0o644, 0, 0)
        .expect("create filler")
        .ino;
    for (index, block) in bytes.chunks(4096).enumerate() {
        fs.write_at(ino, index as u64 * 4096, block).expect("write");
        if index % every == every - 1 {
            fs.write_at(filler, index as u64 * 4096, &[0xEE; 4096])
                .expect("write filler");
        }
    }
    ino
}

/// A read closure over a libfs file (the user-space reference path).
pub fn reader(fs: &Fs, ino: u64) -> impl FnMut(u64, &mut [u8]) -> Result<usize, String> + '_ {
    move |offset, buf| fs.read_at(ino, offset, buf).map_err(|err| err.to_string())
}

/// The example programs' scratch for a lookup of `key`.
pub fn lookup_scratch(key: u64) -> [u8; 24] {
    exofs_abi::formats::Lookup::ask(key)
}

/// Compiles `source` (after an `#include "exofs.h"`) into a BPF object with clang.
pub fn compile_c(name: &str, source: &str) -> Vec<u8> {
    let dir = std::env::temp_dir().join(format!("exofs-cc-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (c, object) = (dir.join("app.c"), dir.join("app.o"));
    std::fs::write(&c, format!("#include \"exofs.h\"\n{source}")).expect("write source");
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bpf/abi/include");
    let clang = if Command::new("clang-22").arg("--version").output().is_ok() {
        "clang-22"
    } else {
        "clang"
    };
    let output = Command::new(clang)
        .args(["-O2", "-g", "-target", "bpf", "-c", "-I"])
        .arg(&include)
        .arg(format!(
            "-I/usr/include/{}-linux-gnu",
            std::env::consts::ARCH
        ))
        .arg(&c)
        .arg("-o")
        .arg(&object)
        .output()
        .expect("run clang (scripts/setup.sh installs clang-22)");
    assert!(
        output.status.success(),
        "{name} does not compile: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let bytes = std::fs::read(&object).expect("read object");
    let _ = std::fs::remove_dir_all(&dir);
    bytes
}

/// A private bpffs mount, unmounted (and its directory removed) on drop.
pub struct BpfFs {
    pub dir: PathBuf,
}

impl BpfFs {
    /// Mounts a bpffs instance at a fresh temporary directory; None (after a SKIPPED line)
    /// if that is not allowed.
    pub fn mount(test: &str) -> Option<Self> {
        let dir = std::env::temp_dir().join(format!("exofs-bpffs-{}-{test}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("bpffs dir");
        let target = CString::new(dir.as_os_str().as_encoded_bytes()).expect("path");
        let fstype = CString::new("bpf").expect("fstype");
        // SAFETY: all pointers are live NUL-terminated strings; data is null.
        let ret = unsafe {
            libc::mount(
                fstype.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if ret != 0 {
            let why = format!("cannot mount bpffs: {}", std::io::Error::last_os_error());
            skip(test, &why);
            let _ = std::fs::remove_dir(&dir);
            return None;
        }
        Some(Self { dir })
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let target = CString::new(self.dir.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: unmounts the bpffs instance this value mounted; the path is a live C string.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir(&self.dir);
    }
}
