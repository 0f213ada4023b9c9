//! A page-cache budget for benchmarks, and the disk reads made under it.
//!
//! Layer: mount-tool's benchmarks. [`MemoryCgroup::enter`] makes a memory cgroup limited
//! to a budget (cgroup v2 `memory.max`, or v1 `memory.limit_in_bytes`, whichever the host
//! has), moves this process into it, and on drop moves it back to the cgroup it came from
//! and removes the cgroup:
//! the page cache this process fills from then on is bounded by the budget, so an index
//! many times the budget is really read from the disk. Pages charged before the move stay
//! with the parent; the cold phases drop them anyway. [`DiskReads`] reads the block
//! device's counters (/sys/dev/block/MAJOR:MINOR/stat) of the disk a file lives on.

use std::error::Error;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// Where cgroup v2 and the v1 memory controller are mounted on this kind of host.
const CGROUP2: &str = "/sys/fs/cgroup";
const CGROUP1_MEMORY: &str = "/sys/fs/cgroup/memory";

/// A memory cgroup this process is in; left and removed on drop.
#[derive(Debug)]
pub struct MemoryCgroup {
    dir: PathBuf,
    /// The cgroup this process came from (its `cgroup.procs`).
    came_from: PathBuf,
    /// This process was moved in (so it must be moved back).
    entered: bool,
}

/// This process's cgroup in the hierarchy mounted at `mount`: the path /proc/self/cgroup
/// gives for cgroup v2 (`0::PATH`) or for the v1 memory controller (`N:...memory...:PATH`).
fn current_cgroup(mount: &Path, v2: bool) -> Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup")?;
    let relative = text
        .lines()
        .find_map(|line| {
            let mut fields = line.splitn(3, ':');
            let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
            let ours = if v2 {
                controllers.is_empty()
            } else {
                controllers.split(',').any(|c| c == "memory")
            };
            ours.then_some(path)
        })
        .ok_or("/proc/self/cgroup names no memory cgroup of this process")?;
    Ok(mount.join(relative.trim_start_matches('/')))
}

impl MemoryCgroup {
    /// Makes a cgroup limited to `budget` bytes and moves this process into it.
    pub fn enter(budget: u64) -> Result<Self> {
        let name = format!("exofs-bench-{}", std::process::id());
        let v2 = Path::new(CGROUP2).join("cgroup.controllers");
        let (dir, limit_file, mount) = if std::fs::read_to_string(&v2)
            .is_ok_and(|controllers| controllers.split_whitespace().any(|c| c == "memory"))
        {
            // The memory controller must be on for the children of the root.
            std::fs::write(Path::new(CGROUP2).join("cgroup.subtree_control"), "+memory")
                .map_err(|e| format!("enabling the memory controller in {CGROUP2}: {e}"))?;
            (
                Path::new(CGROUP2).join(&name),
                "memory.max",
                PathBuf::from(CGROUP2),
            )
        } else if Path::new(CGROUP1_MEMORY)
            .join("memory.limit_in_bytes")
            .exists()
        {
            let dir = Path::new(CGROUP1_MEMORY).join(&name);
            (dir, "memory.limit_in_bytes", PathBuf::from(CGROUP1_MEMORY))
        } else {
            return Err(format!(
                "no memory cgroup controller (neither cgroup v2 at {CGROUP2} nor v1 at \
                 {CGROUP1_MEMORY})"
            )
            .into());
        };
        let v2 = mount == Path::new(CGROUP2);
        let came_from = current_cgroup(&mount, v2)?.join("cgroup.procs");
        std::fs::create_dir(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        let mut cgroup = Self {
            dir,
            came_from,
            entered: false,
        };
        let write = |file: &str, value: String| {
            std::fs::write(cgroup.dir.join(file), &value)
                .map_err(|e| format!("writing {value} to {}/{file}: {e}", cgroup.dir.display()))
        };
        write(limit_file, budget.to_string())?;
        write("cgroup.procs", std::process::id().to_string())?;
        cgroup.entered = true;
        Ok(cgroup)
    }

    /// The cgroup's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        if self.entered {
            if let Err(err) = std::fs::write(&self.came_from, std::process::id().to_string()) {
                eprintln!(
                    "exofs: moving back to {}: {err} (the process stays in {})",
                    self.came_from.display(),
                    self.dir.display()
                );
                return;
            }
        }
        // Children that were in it (a mount daemon that is still exiting) leave it by
        // exiting: wait for them a little.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match std::fs::remove_dir(&self.dir) {
                Ok(()) => return,
                Err(err)
                    if err.raw_os_error() == Some(libc::EBUSY)
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(err) => {
                    eprintln!("exofs: removing the cgroup {}: {err}", self.dir.display());
                    return;
                }
            }
        }
    }
}

/// Reads completed and bytes read by one block device so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiskCount {
    pub reads: u64,
    pub bytes: u64,
}

impl std::ops::Sub for DiskCount {
    type Output = DiskCount;
    fn sub(self, earlier: DiskCount) -> DiskCount {
        DiskCount {
            reads: self.reads.saturating_sub(earlier.reads),
            bytes: self.bytes.saturating_sub(earlier.bytes),
        }
    }
}

impl std::ops::Add for DiskCount {
    type Output = DiskCount;
    fn add(self, other: DiskCount) -> DiskCount {
        DiskCount {
            reads: self.reads + other.reads,
            bytes: self.bytes + other.bytes,
        }
    }
}

/// The read counters of the block device a file lives on.
#[derive(Debug)]
pub struct DiskReads {
    stat: PathBuf,
}

impl DiskReads {
    /// The device holding `file` (an image file: its file system's device; a block
    /// device: itself).
    pub fn of(file: &Path) -> Result<Self> {
        let meta = std::fs::metadata(file).map_err(|e| format!("{}: {e}", file.display()))?;
        let device = if meta.file_type().is_block_device() {
            meta.rdev()
        } else {
            meta.dev()
        };
        let (major, minor) = (libc::major(device), libc::minor(device));
        let stat = PathBuf::from(format!("/sys/dev/block/{major}:{minor}/stat"));
        if !stat.exists() {
            return Err(format!(
                "{} is on device {major}:{minor}, which has no block statistics",
                file.display()
            )
            .into());
        }
        Ok(Self { stat })
    }

    /// The counters now: field 1 is reads completed, field 3 sectors read (of 512 bytes,
    /// Documentation/block/stat.rst).
    pub fn now(&self) -> Result<DiskCount> {
        let text = std::fs::read_to_string(&self.stat)?;
        let fields: Vec<u64> = text
            .split_whitespace()
            .map(str::parse)
            .collect::<std::result::Result<_, _>>()?;
        match fields.as_slice() {
            [reads, _merged, sectors, ..] => Ok(DiskCount {
                reads: *reads,
                bytes: sectors * 512,
            }),
            _ => Err(format!("{}: unexpected contents", self.stat.display()).into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_counters_of_the_disk_a_file_is_on() {
        // /proc has no block device: refused with a message naming it.
        let err = DiskReads::of(Path::new("/proc/self/status")).expect_err("no device");
        assert!(err.to_string().contains("no block statistics"), "{err}");
        let later = DiskCount {
            reads: 10,
            bytes: 8192,
        };
        let earlier = DiskCount {
            reads: 4,
            bytes: 4096,
        };
        assert_eq!(
            later - earlier,
            DiskCount {
                reads: 6,
                bytes: 4096
            }
        );
    }
}
