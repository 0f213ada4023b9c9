//! Permission checks of the mount daemon: may this caller do this to that inode?
//!
//! Layer: mount-tool, called by `fuse.rs` before each libfs operation, on attributes
//! libfs returned. Pure decisions on a caller's [`Credentials`] and inode [`Attr`]s, so
//! they are unit-tested without root (the tests at the end of this file); the rules are
//! Linux's own, as ext4 applies them: `generic_permission` and `may_delete` of
//! fs/namei.c, `setattr_prepare` and the setuid/setgid rules of fs/attr.c and
//! fs/inode.c, and `xattr_permission` of fs/xattr.c.
//!
//! Why the daemon checks at all: a FUSE mount without `default_permissions` forwards
//! every request unchecked, and a mount with `allow_other` lets every user send them. The
//! daemon mounts with `default_permissions` unless told otherwise (so the kernel checks
//! first, on cached attributes), and decides every request again here, whatever the mount
//! options: a mount option can add a check, never remove this one.
//!
//! The caller: FUSE tells the daemon the caller's fsuid, fsgid and thread id. Its
//! supplementary groups and effective capabilities are read from /proc/TID/status, only
//! when a decision needs them (the owner's own access never reads /proc). The thread is
//! blocked in the system call that sent the request, so the id names that thread; if
//! /proc cannot be read, or names other ids (the request came from another pid
//! namespace, pid 0), the caller has no capabilities (uid 0 included) and unknown
//! supplementary groups, so a file's group class gets no more than its other class: the
//! failure refuses, it never grants. Capabilities count only for a
//! caller in the daemon's own user namespace: any user can make a namespace of its own
//! (`unshare -Ur`) and hold every capability there, over nothing of ours. (Linux would
//! honour such capabilities over inodes whose ids that namespace maps; the daemon does
//! not, a refusal on the safe side.)

use fuser::Errno;
use libfs::Attr;
use std::cell::OnceCell;

/// Access wanted (the kernel's MAY_EXEC, MAY_WRITE, MAY_READ; R_OK/W_OK/X_OK too).
pub const MAY_EXEC: u32 = 1;
pub const MAY_WRITE: u32 = 2;
pub const MAY_READ: u32 = 4;

/// The capabilities these rules consult (bit numbers of linux/capability.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability {
    Chown = 0,
    DacOverride = 1,
    DacReadSearch = 2,
    Fowner = 3,
    Fsetid = 4,
    SysAdmin = 21,
    Setfcap = 31,
}

/// What /proc adds to the request header's uid and gid.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcCredentials {
    pub groups: Vec<u32>,
    /// CapEff, a bit per capability.
    pub capabilities: u64,
    /// The groups were read (false: /proc could not tell, so they are unknown).
    pub known: bool,
}

/// A caller: the ids of the request header, and (read lazily) its groups and capabilities.
#[derive(Debug)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    pid: u32,
    extra: OnceCell<ProcCredentials>,
}

impl Credentials {
    /// The caller of a request; groups and capabilities come from /proc/PID/status when
    /// first needed.
    pub fn of_request(uid: u32, gid: u32, pid: u32) -> Self {
        Self {
            uid,
            gid,
            pid,
            extra: OnceCell::new(),
        }
    }

    /// A caller whose groups and capabilities are known.
    #[cfg(test)]
    pub fn with(uid: u32, gid: u32, extra: ProcCredentials) -> Self {
        Self {
            uid,
            gid,
            pid: 0,
            extra: OnceCell::from(extra),
        }
    }

    /// The caller's supplementary groups (from /proc; none if it cannot be read there).
    pub fn groups(&self) -> &[u32] {
        &self.extra().groups
    }

    fn extra(&self) -> &ProcCredentials {
        self.extra
            .get_or_init(|| read_proc(self.pid, self.uid, self.gid).unwrap_or_default())
    }

    pub fn capable(&self, capability: Capability) -> bool {
        self.extra().capabilities & (1 << capability as u32) != 0
    }

    /// Whether `gid` is the caller's group or one of its supplementary groups.
    pub fn in_group(&self, gid: u32) -> bool {
        gid == self.gid || self.extra().groups.contains(&gid)
    }

    /// Whether the supplementary groups are known (read from /proc).
    fn groups_known(&self) -> bool {
        self.extra().known
    }

    fn in_group_or_capable(&self, gid: u32) -> bool {
        self.in_group(gid) || self.capable(Capability::Fsetid)
    }
}

/// The groups and effective capabilities of thread `pid`, if /proc/PID/status names the
/// same fsuid and fsgid as the request. Its capabilities only if it is in this daemon's
/// user namespace (CapEff counts in the thread's own).
fn read_proc(pid: u32, uid: u32, gid: u32) -> Option<ProcCredentials> {
    if pid == 0 {
        return None;
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mut found = parse_status(&status, uid, gid)?;
    let namespace = |path: &str| std::fs::read_link(path).ok();
    let ours = namespace("/proc/self/ns/user");
    if ours.is_none() || namespace(&format!("/proc/{pid}/ns/user")) != ours {
        found.capabilities = 0;
    }
    Some(found)
}

/// Parses /proc/PID/status: `Uid:` and `Gid:` (real, effective, saved, fs), `Groups:`
/// and `CapEff:` (hexadecimal).
fn parse_status(status: &str, uid: u32, gid: u32) -> Option<ProcCredentials> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
    };
    let fs_id = |name: &str| field(name)?.split_whitespace().nth(3)?.parse::<u32>().ok();
    if fs_id("Uid")? != uid || fs_id("Gid")? != gid {
        return None;
    }
    let groups = field("Groups")?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<Vec<u32>, _>>()
        .ok()?;
    let capabilities = u64::from_str_radix(field("CapEff")?.trim(), 16).ok()?;
    Some(ProcCredentials {
        groups,
        capabilities,
        known: true,
    })
}

const S_IFMT: u32 = libc::S_IFMT;
const S_ISUID: u32 = libc::S_ISUID;
const S_ISGID: u32 = libc::S_ISGID;
const S_ISVTX: u32 = libc::S_ISVTX;
const S_IXGRP: u32 = libc::S_IXGRP;
const S_IXUGO: u32 = 0o111;

fn is_dir(attr: &Attr) -> bool {
    attr.mode & S_IFMT == libc::S_IFDIR
}

fn is_regular(attr: &Attr) -> bool {
    attr.mode & S_IFMT == libc::S_IFREG
}

/// `generic_permission`: `mask` (MAY_*) on `attr` for `who`; EACCES if refused.
pub fn permission(who: &Credentials, attr: &Attr, mask: u32) -> Result<(), Errno> {
    let mask = mask & (MAY_READ | MAY_WRITE | MAY_EXEC);
    let granted = if who.uid == attr.uid {
        attr.mode >> 6
    } else if who.in_group(attr.gid) {
        attr.mode >> 3
    } else if !who.groups_known() {
        // The caller may be in the file's group: grant what both classes allow.
        (attr.mode >> 3) & attr.mode
    } else {
        attr.mode
    } & 7;
    if mask & !granted == 0 {
        return Ok(());
    }
    if is_dir(attr) {
        if mask & MAY_WRITE == 0 && who.capable(Capability::DacReadSearch) {
            return Ok(());
        }
        if who.capable(Capability::DacOverride) {
            return Ok(());
        }
        return Err(Errno::EACCES);
    }
    // Read and write are always overridable; execute when some execute bit is set.
    if (mask & MAY_EXEC == 0 || attr.mode & S_IXUGO != 0) && who.capable(Capability::DacOverride) {
        return Ok(());
    }
    if mask == MAY_READ && who.capable(Capability::DacReadSearch) {
        return Ok(());
    }
    Err(Errno::EACCES)
}

/// `inode_owner_or_capable`.
pub fn owner_or_capable(who: &Credentials, attr: &Attr) -> bool {
    who.uid == attr.uid || who.capable(Capability::Fowner)
}

/// `may_create`: adding an entry to directory `dir`.
pub fn may_create(who: &Credentials, dir: &Attr) -> Result<(), Errno> {
    permission(who, dir, MAY_WRITE | MAY_EXEC)
}

/// `may_delete`: removing `victim`'s entry from directory `dir` (unlink, rmdir, and both
/// ends of a rename). In a sticky directory only the owner of the entry or of the
/// directory (or CAP_FOWNER) may.
pub fn may_delete(who: &Credentials, dir: &Attr, victim: &Attr) -> Result<(), Errno> {
    permission(who, dir, MAY_WRITE | MAY_EXEC)?;
    let sticky = dir.mode & S_ISVTX != 0;
    if sticky && who.uid != victim.uid && who.uid != dir.uid && !who.capable(Capability::Fowner) {
        return Err(Errno::EPERM);
    }
    Ok(())
}

/// `may_linkat`: with fs.protected_hardlinks on, a user links only files it owns, or
/// regular files it may read and write that are not setuid (nor setgid and group
/// executable). The kernel's own check asks the file system's permission, which is this
/// daemon's when the kernel does not check: so it is made here too.
pub fn may_link(who: &Credentials, source: &Attr, protected: bool) -> Result<(), Errno> {
    if !protected || owner_or_capable(who, source) {
        return Ok(());
    }
    let setuid_like =
        source.mode & S_ISUID != 0 || source.mode & (S_ISGID | S_IXGRP) == (S_ISGID | S_IXGRP);
    if is_regular(source) && !setuid_like && permission(who, source, MAY_READ | MAY_WRITE).is_ok() {
        return Ok(());
    }
    Err(Errno::EPERM)
}

/// Whether fs.protected_hardlinks is on (it is unless /proc says 0).
pub fn hardlinks_protected() -> bool {
    std::fs::read_to_string("/proc/sys/fs/protected_hardlinks").map_or(true, |v| v.trim() != "0")
}

/// The access an open(2) with `flags` asks for (as the kernel sends them: O_TRUNC and
/// O_CREAT removed). The open an execve makes (`__FMODE_EXEC`) asks for execute only;
/// access mode 3 asks for read and write, as the kernel's ACC_MODE has it.
pub fn open_mask(flags: i32) -> u32 {
    /// The kernel's `__FMODE_EXEC`, set in the flags of the open an execve makes.
    const FMODE_EXEC: i32 = 0x20;
    if flags & FMODE_EXEC != 0 {
        return MAY_EXEC;
    }
    match flags & libc::O_ACCMODE {
        libc::O_RDONLY => MAY_READ,
        libc::O_WRONLY => MAY_WRITE,
        _ => MAY_READ | MAY_WRITE,
    }
}

/// `may_open`: what `permission` decides, plus: a directory is never opened for writing.
pub fn may_open(who: &Credentials, attr: &Attr, flags: i32) -> Result<(), Errno> {
    let mask = open_mask(flags);
    if is_dir(attr) && mask & MAY_WRITE != 0 {
        return Err(Errno::EISDIR);
    }
    if mask & MAY_EXEC != 0 && !is_regular(attr) {
        return Err(Errno::EACCES);
    }
    permission(who, attr, mask)
}

/// The mode and group of a new inode in `dir` (`inode_init_owner`): a setgid directory
/// gives its group, and to a new directory its setgid bit; a new group-executable setgid
/// file of a group the caller is not in loses the setgid bit.
pub fn new_inode_owner(who: &Credentials, dir: &Attr, mode: u32) -> (u32, u32) {
    let (mut mode, gid) = if dir.mode & S_ISGID != 0 {
        let mode = if mode & S_IFMT == libc::S_IFDIR {
            mode | S_ISGID
        } else {
            mode
        };
        (mode, dir.gid)
    } else {
        (mode, who.gid)
    };
    if mode & S_IFMT != libc::S_IFDIR
        && mode & (S_ISGID | S_IXGRP) == (S_ISGID | S_IXGRP)
        && !who.in_group_or_capable(gid)
    {
        mode &= !S_ISGID;
    }
    (mode, gid)
}

/// Times a setattr sets: `Now` is UTIME_NOW, `At` an explicit time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeChange {
    Now,
    At,
}

/// A setattr request, as the checks see it.
#[derive(Debug, Clone, Copy, Default)]
pub struct SetattrRequest {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeChange>,
    pub mtime: Option<TimeChange>,
    /// Made through a descriptor opened for writing (ftruncate).
    pub writable_handle: bool,
}

/// Decides a setattr (`setattr_prepare`, `chown_ok`, `chgrp_ok`, the utimes rules) and
/// returns the mode to store: the requested one, or the current one, less the setuid
/// and setgid bits that the change clears. `None` when the mode stays as it is.
pub fn check_setattr(
    who: &Credentials,
    attr: &Attr,
    request: &SetattrRequest,
) -> Result<Option<u32>, Errno> {
    if let Some(uid) = request.uid {
        let unchanged_by_owner = who.uid == attr.uid && uid == attr.uid;
        if !unchanged_by_owner && !who.capable(Capability::Chown) {
            return Err(Errno::EPERM);
        }
    }
    if let Some(gid) = request.gid {
        let owner_to_own_group = who.uid == attr.uid && (gid == attr.gid || who.in_group(gid));
        if !owner_to_own_group && !who.capable(Capability::Chown) {
            return Err(Errno::EPERM);
        }
    }
    if request.size.is_some() && !request.writable_handle {
        if is_dir(attr) {
            return Err(Errno::EISDIR);
        }
        permission(who, attr, MAY_WRITE)?;
    }
    // A truncate sets the times it needs itself; only utimes(2) and friends are checked.
    if request.size.is_none() && (request.atime.is_some() || request.mtime.is_some()) {
        let touch =
            request.atime == Some(TimeChange::Now) && request.mtime == Some(TimeChange::Now);
        if !owner_or_capable(who, attr) {
            if !touch {
                return Err(Errno::EPERM);
            }
            permission(who, attr, MAY_WRITE)?;
        }
    }
    let mut mode = None;
    if let Some(requested) = request.mode {
        if !owner_or_capable(who, attr) {
            return Err(Errno::EPERM);
        }
        let mut requested = requested & 0o7777;
        if !who.in_group_or_capable(request.gid.unwrap_or(attr.gid)) {
            requested &= !S_ISGID;
        }
        mode = Some(requested);
    }
    let chown = request.uid.is_some() || request.gid.is_some();
    let clear = if chown && !is_dir(attr) {
        S_ISUID | should_drop_sgid(who, attr)
    } else if request.size.is_some() {
        should_drop_suidgid(who, attr)
    } else {
        0
    };
    let current = mode.unwrap_or(attr.mode & 0o7777);
    if current & clear != 0 {
        mode = Some(current & !clear);
    }
    Ok(mode)
}

/// `setattr_should_drop_sgid`: the setgid bit goes when the file is group-executable, or
/// when the caller is neither in its group nor holds CAP_FSETID.
fn should_drop_sgid(who: &Credentials, attr: &Attr) -> u32 {
    if attr.mode & S_ISGID == 0 {
        return 0;
    }
    if attr.mode & S_IXGRP != 0 || !who.in_group_or_capable(attr.gid) {
        return S_ISGID;
    }
    0
}

/// `setattr_should_drop_suidgid`: the bits a write or truncate by `who` clears from a
/// regular file.
pub fn should_drop_suidgid(who: &Credentials, attr: &Attr) -> u32 {
    if !is_regular(attr) || attr.mode & (S_ISUID | S_ISGID) == 0 {
        return 0;
    }
    let clear = (attr.mode & S_ISUID) | should_drop_sgid(who, attr);
    if clear != 0 && !who.capable(Capability::Fsetid) {
        clear
    } else {
        0
    }
}

/// The mode left after a write by `who` that the kernel marked FUSE_WRITE_KILL_SUIDGID
/// (it has decided that the writer lacks CAP_FSETID): setuid goes, and setgid as
/// `setattr_should_drop_sgid` says.
pub fn mode_after_killing_write(who: &Credentials, attr: &Attr) -> Option<u32> {
    let clear = (attr.mode & S_ISUID) | should_drop_sgid(who, attr);
    (clear != 0).then_some(attr.mode & 0o7777 & !clear)
}

/// An extended attribute's namespace.
fn namespace(name: &[u8]) -> &[u8] {
    name.iter()
        .position(|&b| b == b'.')
        .map_or(name, |dot| &name[..=dot])
}

/// What is done to an extended attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XattrAccess {
    Read,
    Set,
    Remove,
}

/// `xattr_permission` and the capability module's rules: `access` to extended attribute
/// `name` of `attr`. Refusals are EPERM for changes and ENODATA for reads where Linux
/// hides the attribute rather than refusing.
pub fn xattr_permission(
    who: &Credentials,
    attr: &Attr,
    name: &[u8],
    access: XattrAccess,
) -> Result<(), Errno> {
    let write = access != XattrAccess::Read;
    let hidden = if write { Errno::EPERM } else { Errno::NO_XATTR };
    if name == b"security.capability" && write {
        // Setting file capabilities takes CAP_SETFCAP. Removing them is also what the
        // kernel does in the caller's name when anyone writes or truncates the file, or
        // its owner changes its group: whoever may write it, or owns it, may remove them
        // (it could by writing, or by a chmod and a write, anyway).
        let may_remove = access == XattrAccess::Remove
            && (owner_or_capable(who, attr) || permission(who, attr, MAY_WRITE).is_ok());
        return if may_remove || who.capable(Capability::Setfcap) {
            Ok(())
        } else {
            Err(Errno::EPERM)
        };
    }
    match namespace(name) {
        b"trusted." => {
            if who.capable(Capability::SysAdmin) {
                Ok(())
            } else {
                Err(hidden)
            }
        }
        // Decided by the security module: commoncap lets only CAP_SYS_ADMIN set them.
        b"security." => {
            if write && !who.capable(Capability::SysAdmin) {
                Err(Errno::EPERM)
            } else {
                Ok(())
            }
        }
        b"user." => {
            if !is_regular(attr) && !is_dir(attr) {
                return Err(hidden);
            }
            if write && is_dir(attr) && attr.mode & S_ISVTX != 0 && !owner_or_capable(who, attr) {
                return Err(Errno::EPERM);
            }
            permission(who, attr, if write { MAY_WRITE } else { MAY_READ })
        }
        // system.* and unknown namespaces: libfs refuses the names it does not serve.
        _ => {
            if write && !owner_or_capable(who, attr) {
                Err(Errno::EPERM)
            } else {
                Ok(())
            }
        }
    }
}

/// Whether listxattr shows `name` to `who`: trusted.* only to CAP_SYS_ADMIN.
pub fn xattr_listed(who: &Credentials, name: &[u8]) -> bool {
    namespace(name) != b"trusted." || who.capable(Capability::SysAdmin)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(mode: u32, uid: u32, gid: u32) -> Attr {
        Attr {
            ino: 2,
            mode,
            uid,
            gid,
            nlink: 1,
            size: 0,
            blocks: 0,
            atime_ns: 0,
            mtime_ns: 0,
            ctime_ns: 0,
            crtime_ns: 0,
            rdev: 0,
            generation: 1,
        }
    }

    fn file(mode: u32, uid: u32, gid: u32) -> Attr {
        attr(libc::S_IFREG | mode, uid, gid)
    }

    fn dir(mode: u32, uid: u32, gid: u32) -> Attr {
        attr(libc::S_IFDIR | mode, uid, gid)
    }

    fn user(uid: u32, gid: u32, groups: &[u32]) -> Credentials {
        Credentials::with(
            uid,
            gid,
            ProcCredentials {
                groups: groups.to_vec(),
                capabilities: 0,
                known: true,
            },
        )
    }

    fn root() -> Credentials {
        Credentials::with(
            0,
            0,
            ProcCredentials {
                groups: vec![0],
                capabilities: 0x1ff_ffff_ffff,
                known: true,
            },
        )
    }

    #[test]
    fn mode_bits_by_owner_group_and_others() {
        let secret = file(0o640, 0, 50);
        assert_eq!(
            permission(&user(1000, 100, &[]), &secret, MAY_READ),
            Err(Errno::EACCES)
        );
        assert_eq!(permission(&user(1000, 50, &[]), &secret, MAY_READ), Ok(()));
        assert_eq!(
            permission(&user(1000, 100, &[50]), &secret, MAY_READ),
            Ok(())
        );
        assert_eq!(
            permission(&user(1000, 100, &[50]), &secret, MAY_WRITE),
            Err(Errno::EACCES)
        );
        // The owner class decides alone: an owner without bits is refused even when
        // others have them.
        let odd = file(0o077, 1000, 50);
        assert_eq!(
            permission(&user(1000, 50, &[]), &odd, MAY_READ),
            Err(Errno::EACCES)
        );
        assert_eq!(permission(&user(1001, 50, &[]), &odd, MAY_READ), Ok(()));
    }

    #[test]
    fn capabilities_override_as_linux_does() {
        let none = file(0o000, 1000, 1000);
        assert_eq!(permission(&root(), &none, MAY_READ | MAY_WRITE), Ok(()));
        // Execute needs some execute bit even for root.
        assert_eq!(permission(&root(), &none, MAY_EXEC), Err(Errno::EACCES));
        assert_eq!(permission(&root(), &file(0o100, 1, 1), MAY_EXEC), Ok(()));
        assert_eq!(
            permission(&root(), &dir(0o000, 1, 1), MAY_EXEC | MAY_WRITE),
            Ok(())
        );
        // uid 0 without capabilities is an ordinary user.
        let powerless = Credentials::with(0, 0, ProcCredentials::default());
        assert_eq!(permission(&powerless, &none, MAY_READ), Err(Errno::EACCES));
        let reader = Credentials::with(
            5,
            5,
            ProcCredentials {
                groups: vec![],
                capabilities: 1 << Capability::DacReadSearch as u32,
                known: true,
            },
        );
        assert_eq!(permission(&reader, &none, MAY_READ), Ok(()));
        assert_eq!(permission(&reader, &none, MAY_WRITE), Err(Errno::EACCES));
        assert_eq!(permission(&reader, &dir(0o000, 1, 1), MAY_EXEC), Ok(()));
    }

    #[test]
    fn sticky_directories_protect_other_users_entries() {
        let tmp = dir(0o1777, 0, 0);
        let theirs = file(0o666, 2000, 2000);
        let mine = file(0o600, 1000, 1000);
        let me = user(1000, 1000, &[]);
        assert_eq!(may_delete(&me, &tmp, &theirs), Err(Errno::EPERM));
        assert_eq!(may_delete(&me, &tmp, &mine), Ok(()));
        assert_eq!(may_delete(&root(), &tmp, &theirs), Ok(()));
        let my_tmp = dir(0o1777, 1000, 1000);
        assert_eq!(may_delete(&me, &my_tmp, &theirs), Ok(()));
        assert_eq!(
            may_delete(&me, &dir(0o755, 0, 0), &mine),
            Err(Errno::EACCES)
        );
    }

    #[test]
    fn ownership_rules_of_setattr() {
        let me = user(1000, 1000, &[60]);
        let mine = file(0o644, 1000, 1000);
        let theirs = file(0o666, 0, 0);
        let chmod = |mode| SetattrRequest {
            mode: Some(mode),
            ..Default::default()
        };
        assert_eq!(
            check_setattr(&me, &theirs, &chmod(0o777)),
            Err(Errno::EPERM)
        );
        assert_eq!(check_setattr(&me, &mine, &chmod(0o600)), Ok(Some(0o600)));
        // chmod g+s on a file of a group one is not in drops the setgid bit silently.
        let foreign_group = file(0o644, 1000, 70);
        assert_eq!(
            check_setattr(&me, &foreign_group, &chmod(0o2755)),
            Ok(Some(0o755))
        );
        let uid = |uid| SetattrRequest {
            uid: Some(uid),
            ..Default::default()
        };
        let gid = |gid| SetattrRequest {
            gid: Some(gid),
            ..Default::default()
        };
        assert_eq!(check_setattr(&me, &mine, &uid(2000)), Err(Errno::EPERM));
        assert_eq!(check_setattr(&me, &mine, &uid(1000)), Ok(None));
        assert_eq!(check_setattr(&me, &mine, &gid(60)), Ok(None));
        assert_eq!(check_setattr(&me, &mine, &gid(61)), Err(Errno::EPERM));
        assert_eq!(check_setattr(&me, &theirs, &gid(1000)), Err(Errno::EPERM));
        assert_eq!(check_setattr(&root(), &mine, &uid(5)), Ok(None));
    }

    #[test]
    fn utime_now_needs_write_and_explicit_times_need_ownership() {
        let me = user(1000, 1000, &[]);
        let writable = file(0o666, 0, 0);
        let readonly = file(0o644, 0, 0);
        let times = |atime, mtime| SetattrRequest {
            atime,
            mtime,
            ..Default::default()
        };
        let now = Some(TimeChange::Now);
        let at = Some(TimeChange::At);
        assert_eq!(check_setattr(&me, &writable, &times(now, now)), Ok(None));
        assert_eq!(
            check_setattr(&me, &readonly, &times(now, now)),
            Err(Errno::EACCES)
        );
        // UTIME_NOW with UTIME_OMIT is an explicit change: owner only.
        assert_eq!(
            check_setattr(&me, &writable, &times(now, None)),
            Err(Errno::EPERM)
        );
        assert_eq!(
            check_setattr(&me, &writable, &times(at, at)),
            Err(Errno::EPERM)
        );
        assert_eq!(
            check_setattr(&me, &file(0o444, 1000, 1000), &times(at, None)),
            Ok(None)
        );
        // A truncate's own time update is part of the truncate.
        let truncate = SetattrRequest {
            size: Some(0),
            mtime: now,
            ..Default::default()
        };
        assert_eq!(check_setattr(&me, &writable, &truncate), Ok(None));
        assert_eq!(check_setattr(&me, &readonly, &truncate), Err(Errno::EACCES));
        let ftruncate = SetattrRequest {
            writable_handle: true,
            ..truncate
        };
        assert_eq!(check_setattr(&me, &readonly, &ftruncate), Ok(None));
    }

    #[test]
    fn setuid_and_setgid_bits_are_cleared() {
        let me = user(1000, 1000, &[]);
        let setuid = file(0o4755, 1000, 1000);
        let chown = SetattrRequest {
            gid: Some(1000),
            ..Default::default()
        };
        assert_eq!(check_setattr(&me, &setuid, &chown), Ok(Some(0o755)));
        assert_eq!(check_setattr(&root(), &setuid, &chown), Ok(Some(0o755)));
        let setgid_exec = file(0o2775, 1000, 1000);
        assert_eq!(check_setattr(&me, &setgid_exec, &chown), Ok(Some(0o775)));
        // setgid without group execute is kept by a member of the group.
        let setgid_lock = file(0o2664, 1000, 1000);
        assert_eq!(check_setattr(&me, &setgid_lock, &chown), Ok(None));
        let truncate = SetattrRequest {
            size: Some(0),
            ..Default::default()
        };
        let shared = file(0o6777, 0, 0);
        assert_eq!(check_setattr(&me, &shared, &truncate), Ok(Some(0o777)));
        assert_eq!(check_setattr(&root(), &shared, &truncate), Ok(None));
        assert_eq!(should_drop_suidgid(&me, &shared), S_ISUID | S_ISGID);
        assert_eq!(mode_after_killing_write(&me, &shared), Some(0o777));
        // setgid without group execute: kept for a member of the group, dropped for
        // anyone else.
        assert_eq!(mode_after_killing_write(&me, &file(0o2664, 0, 1000)), None);
        assert_eq!(
            mode_after_killing_write(&me, &file(0o2664, 0, 0)),
            Some(0o664)
        );
        // Directories keep their bits on chown.
        let setgid_dir = dir(0o2775, 1000, 1000);
        assert_eq!(check_setattr(&me, &setgid_dir, &chown), Ok(None));
    }

    #[test]
    fn new_inodes_in_setgid_directories() {
        let me = user(1000, 1000, &[]);
        let shared = dir(0o2777, 0, 70);
        assert_eq!(
            new_inode_owner(&me, &shared, libc::S_IFDIR | 0o755),
            (libc::S_IFDIR | 0o2755, 70)
        );
        assert_eq!(
            new_inode_owner(&me, &shared, libc::S_IFREG | 0o2755),
            (libc::S_IFREG | 0o755, 70)
        );
        let plain = dir(0o777, 0, 70);
        assert_eq!(
            new_inode_owner(&me, &plain, libc::S_IFREG | 0o2755),
            (libc::S_IFREG | 0o2755, 1000)
        );
    }

    #[test]
    fn xattr_namespaces() {
        let me = user(1000, 1000, &[]);
        let readable = file(0o644, 0, 0);
        assert_eq!(
            xattr_permission(&me, &readable, b"trusted.x", XattrAccess::Read),
            Err(Errno::NO_XATTR)
        );
        assert_eq!(
            xattr_permission(&me, &readable, b"trusted.x", XattrAccess::Set),
            Err(Errno::EPERM)
        );
        assert_eq!(
            xattr_permission(&root(), &readable, b"trusted.x", XattrAccess::Set),
            Ok(())
        );
        assert_eq!(
            xattr_permission(&me, &readable, b"user.x", XattrAccess::Read),
            Ok(())
        );
        assert_eq!(
            xattr_permission(&me, &readable, b"user.x", XattrAccess::Set),
            Err(Errno::EACCES)
        );
        assert_eq!(
            xattr_permission(&me, &file(0o600, 0, 0), b"user.x", XattrAccess::Read),
            Err(Errno::EACCES)
        );
        assert_eq!(
            xattr_permission(&me, &dir(0o1777, 0, 0), b"user.x", XattrAccess::Set),
            Err(Errno::EPERM)
        );
        let link = attr(libc::S_IFLNK | 0o777, 1000, 1000);
        assert_eq!(
            xattr_permission(&me, &link, b"user.x", XattrAccess::Set),
            Err(Errno::EPERM)
        );
        assert_eq!(
            xattr_permission(&me, &readable, b"security.x", XattrAccess::Set),
            Err(Errno::EPERM)
        );
        assert!(!xattr_listed(&me, b"trusted.x"));
        assert!(xattr_listed(&root(), b"trusted.x"));
        assert!(xattr_listed(&me, b"user.x"));
    }

    #[test]
    fn proc_status_is_believed_only_for_the_same_ids() {
        let status = "Name:\tsh\nUid:\t1000\t1000\t1000\t1000\nGid:\t100\t100\t100\t100\n\
                      Groups:\t100 27 44 \nCapEff:\t0000000000000001\n";
        let parsed = parse_status(status, 1000, 100).expect("parsed");
        assert_eq!(parsed.groups, vec![100, 27, 44]);
        assert_eq!(parsed.capabilities, 1);
        assert_eq!(parse_status(status, 0, 100), None, "another fsuid");
        assert_eq!(parse_status(status, 1000, 0), None, "another fsgid");
        // Unreadable: no capabilities, uid 0 included, and unknown groups: a file's group
        // class gets no more than its other class.
        let stranger = Credentials::of_request(1000, 100, 0);
        assert!(!stranger.in_group(27));
        assert!(!stranger.capable(Capability::DacOverride));
        assert!(!Credentials::of_request(0, 0, 0).capable(Capability::DacOverride));
        let shut_out = file(0o604, 0, 27);
        assert_eq!(
            permission(&stranger, &shut_out, MAY_READ),
            Err(Errno::EACCES)
        );
        let open_to_all = file(0o644, 0, 27);
        assert_eq!(permission(&stranger, &open_to_all, MAY_READ), Ok(()));
        // Its own group still counts (the request names it).
        assert_eq!(
            permission(&stranger, &file(0o640, 0, 100), MAY_READ),
            Ok(())
        );
    }

    #[test]
    fn file_capabilities_are_set_with_setfcap_and_removed_by_writers() {
        let me = user(1000, 1000, &[]);
        let caps = b"security.capability";
        let writable = file(0o666, 0, 0);
        let readable = file(0o644, 0, 0);
        let set = XattrAccess::Set;
        let remove = XattrAccess::Remove;
        assert_eq!(
            xattr_permission(&me, &writable, caps, set),
            Err(Errno::EPERM)
        );
        assert_eq!(xattr_permission(&me, &writable, caps, remove), Ok(()));
        assert_eq!(
            xattr_permission(&me, &readable, caps, remove),
            Err(Errno::EPERM)
        );
        // The owner may remove them (the kernel does, in its name, when it changes the
        // group of a file it cannot write).
        let mine = file(0o555, 1000, 1000);
        assert_eq!(xattr_permission(&me, &mine, caps, remove), Ok(()));
        assert_eq!(xattr_permission(&root(), &readable, caps, set), Ok(()));
    }

    #[test]
    fn execve_needs_execute_alone_and_access_mode_3_needs_both() {
        let me = user(1000, 1000, &[]);
        let exec = libc::O_RDONLY | 0x20;
        assert_eq!(may_open(&me, &file(0o711, 0, 0), exec), Ok(()));
        assert_eq!(may_open(&me, &file(0o644, 0, 0), exec), Err(Errno::EACCES));
        assert_eq!(may_open(&me, &file(0o644, 0, 0), 3), Err(Errno::EACCES));
        assert_eq!(may_open(&me, &file(0o666, 0, 0), 3), Ok(()));
    }

    #[test]
    fn capabilities_of_another_user_namespace_count_for_nothing() {
        // This test runs in the daemon's namespace: its own capabilities are believed.
        // SAFETY: getpid/getuid/getgid have no preconditions.
        let (pid, uid, gid) = unsafe { (libc::getpid(), libc::getuid(), libc::getgid()) };
        let me = Credentials::of_request(uid, gid, pid as u32);
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        let cap_eff = parse_status(&status, uid, gid)
            .expect("parsed")
            .capabilities;
        assert_eq!(me.capable(Capability::DacOverride), cap_eff & 2 != 0);
    }

    #[test]
    fn protected_hardlinks() {
        let me = user(1000, 1000, &[]);
        let readable = file(0o644, 0, 0);
        assert_eq!(may_link(&me, &readable, true), Err(Errno::EPERM));
        assert_eq!(may_link(&me, &readable, false), Ok(()));
        assert_eq!(may_link(&me, &file(0o666, 0, 0), true), Ok(()));
        assert_eq!(may_link(&me, &file(0o4666, 0, 0), true), Err(Errno::EPERM));
        assert_eq!(may_link(&me, &file(0o600, 1000, 1000), true), Ok(()));
    }

    #[test]
    fn opening_asks_for_what_the_flags_say() {
        let me = user(1000, 1000, &[]);
        let readable = file(0o644, 0, 0);
        assert_eq!(may_open(&me, &readable, libc::O_RDONLY), Ok(()));
        assert_eq!(may_open(&me, &readable, libc::O_WRONLY), Err(Errno::EACCES));
        assert_eq!(
            may_open(&me, &readable, libc::O_RDWR | libc::O_APPEND),
            Err(Errno::EACCES)
        );
        assert_eq!(
            may_open(&me, &readable, libc::O_RDONLY | 0x20),
            Err(Errno::EACCES)
        );
        assert_eq!(
            may_open(&me, &file(0o755, 0, 0), libc::O_RDONLY | 0x20),
            Ok(())
        );
        assert_eq!(
            may_open(&me, &dir(0o777, 0, 0), libc::O_RDWR),
            Err(Errno::EISDIR)
        );
    }
}
