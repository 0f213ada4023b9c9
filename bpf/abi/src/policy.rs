//! The `policy` map: which subjects may run chains over which registered files, and how
//! far. Filled by kernel-ext (issue 4 compiles the mount's TOML policy into it); checked
//! by the driver at the start of every chain and batch.
//!
//! Modes: without a [`MODE_KEY`] entry the map is open (a privileged application linking
//! libfs runs its own chains; it could read the device anyway). With it, every chain is
//! denied unless each of its files has a grant for the subject's uid, one of its gid, or
//! its cgroup; the grant also caps the hops and the batch size.
//!
//! The subject is the calling task's uid, gid and cgroup, except when the caller is the
//! registered speaker (the mount daemon, by its process id): its chains are checked for
//! the uid and gid it passes in the context, the FUSE caller's.

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
/// The speaker entry: `id` is the daemon's process id (tgid), ino 0.
pub const KIND_SPEAKER: u32 = 5;

/// Key of the policy map.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct PolicyKey {
    pub kind: u32,
    pub _pad: u32,
    pub id: u64,
    /// The file (0 for the mode and speaker entries).
    pub ino: u64,
}

/// The mode entry's key.
pub const MODE_KEY: PolicyKey = PolicyKey {
    kind: KIND_MODE,
    _pad: 0,
    id: 0,
    ino: 0,
};

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

const _: () = assert!(core::mem::size_of::<PolicyKey>() == 24);
const _: () = assert!(core::mem::size_of::<PolicyGrant>() == 8);
