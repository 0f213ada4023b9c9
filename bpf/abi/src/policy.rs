//! The `policy` map: which subjects may run chains over which registered files, and how
//! far. Filled by kernel-ext (issue 4 compiles the mount's TOML policy into it); checked
//! by the driver at the start of every chain and batch.
//!
//! Modes: without a [`MODE_KEY`] entry the map is open (a privileged application linking
//! libfs runs its own chains; it could read the device anyway). With it, every chain is
//! denied unless each of its files has a grant for the subject's uid, one of its gid, or
//! its cgroup; the grant also caps the hops and the batch size.
//!
//! A grant names a subject, a file and a program (by [`program_tag`] of its name): each
//! bound program reads its own tag from its instance of the `EXOFS_PROGRAM` map.
//!
//! The subject is the calling task's uid, gid and cgroup, except when the caller is the
//! speaker (the mount daemon: the process that ran `exofs_register`, held by the kernel as
//! a task reference, so a process that reuses a dead daemon's pid is not it) running a
//! privileged program: its chains are checked for the uid, gid and cgroup it passes in the
//! context, the FUSE caller's. Direct programs never take a subject from the context.

/// Name of the map (HashMap<PolicyKey, PolicyGrant>).
pub const MAP_POLICY: &str = "EXOFS_POLICY";

/// [`PolicyKey::kind`]: a user id.
pub const SUBJECT_UID: u32 = 1;
/// A group id.
pub const SUBJECT_GID: u32 = 2;
/// A cgroup id (`bpf_get_current_cgroup_id`, the cgroup directory's inode number).
pub const SUBJECT_CGROUP: u32 = 3;
/// The mode entry (id 0, ino 0): its presence turns enforcement on.
pub const KIND_MODE: u32 = 4;

/// Key of the policy map.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct PolicyKey {
    pub kind: u32,
    pub _pad: u32,
    pub id: u64,
    /// The file (0 for the mode entry).
    pub ino: u64,
    /// The program's [`program_tag`] (0 for the mode entry).
    pub program: u64,
}

/// The mode entry's key.
pub const MODE_KEY: PolicyKey = PolicyKey {
    kind: KIND_MODE,
    _pad: 0,
    id: 0,
    ino: 0,
    program: 0,
};

/// The tag a program is granted by: the 64-bit FNV-1a hash of its name (never 0, which
/// the mode entry uses). Program names are chosen by whoever may load programs (root), so
/// a collision is not an attacker's to make.
pub const fn program_tag(name: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let bytes = name.as_bytes();
    let mut hash = OFFSET;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(PRIME);
        i += 1;
    }
    if hash == 0 {
        1
    } else {
        hash
    }
}

/// Value of the policy map.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyGrant {
    /// Hops one chain may take at most (0: none).
    pub max_hops: u32,
    /// Lookups one batch call may carry at most.
    pub max_batch: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)] integers with explicit padding; every bit pattern is valid.
    unsafe impl aya::Pod for super::PolicyKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PolicyGrant {}
}

const _: () = assert!(core::mem::size_of::<PolicyKey>() == 32);
const _: () = assert!(core::mem::size_of::<PolicyGrant>() == 8);
