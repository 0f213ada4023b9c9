//! Permissions through the mount, whatever its options: the same operations, run as the
//! unprivileged test user (with a supplementary group), on an exofs mount and on kernel
//! ext4, must give the same results line by line: every errno, every result, and which
//! timestamps moved. The operations cover read, write and execute on open, create and
//! directory search; chmod, chown and utimes (UTIME_NOW against UTIME_OMIT); the sticky
//! bit; rename and link across directories; setuid and setgid clearing; the xattr
//! namespaces. `tests/probe/posix_probe.c` runs them.
//!
//! Mounts: `allow_other` alone (the kernel checks, then the daemon), `allow_other,
//! no_default_permissions` (the daemon alone: this is what proves its own checks), and
//! no options at all (root's mount: the user is refused everything).
//!
//! Needs root (mount, loop-mounted ext4, the test user) and /dev/fuse.

mod common;

use common::{can_mount, test_user, text, Mounted};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A supplementary group of the test user (needs no name in /etc/group).
const GROUP: u32 = 4242;

/// Who runs a script.
#[derive(Debug, Clone, Copy)]
enum Runner {
    Root,
    /// The test user (uid, gid) with the supplementary group.
    User(u32, u32),
    /// The test user inside a user namespace of its own (`unshare -Ur`), where it holds
    /// every capability, over nothing outside.
    UserNamespace(u32, u32),
}

/// The probe, compiled into a directory the test user can reach; removed on drop.
struct Probe(PathBuf);

impl Probe {
    fn build(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("exofs-probe-{}-{name}", std::process::id()));
        fs::create_dir_all(&dir).expect("dir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
        let binary = dir.join("posix_probe");
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/probe/posix_probe.c");
        let built = Command::new("cc")
            .args(["-std=gnu11", "-Wall", "-Werror", "-O1", "-o"])
            .arg(&binary)
            .arg(source)
            .output()
            .expect("run cc (gcc or clang must be installed)");
        assert!(built.status.success(), "cc: {}", text(&built));
        Self(binary)
    }

    /// Runs `script` on `root` as `runner`.
    fn run(&self, root: &Path, runner: Runner, script: &str) -> String {
        let mut command = match runner {
            Runner::Root => Command::new(&self.0),
            Runner::User(uid, gid) | Runner::UserNamespace(uid, gid) => {
                let mut command = Command::new("setpriv");
                command
                    .arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .arg(format!("--groups={gid},{GROUP}"));
                if let Runner::UserNamespace(..) = runner {
                    command.args(["unshare", "--map-root-user"]);
                }
                command.arg(&self.0);
                command
            }
        };
        let mut child = command
            .arg(root)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the probe (setpriv is in util-linux)");
        std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), script.as_bytes())
            .expect("script");
        let out = child.wait_with_output().expect("probe");
        assert!(out.status.success(), "probe: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// Kernel ext4 on a loop device (mount -o loop frees it at umount); removed on drop.
struct Ext4 {
    image: PathBuf,
    dir: PathBuf,
}

impl Ext4 {
    fn new(name: &str) -> Self {
        let base = std::env::temp_dir().join(format!("exofs-ext4-{}-{name}", std::process::id()));
        let image = base.with_extension("img");
        let dir = base.with_extension("mnt");
        fs::create_dir_all(&dir).expect("mount point");
        let file = fs::File::create(&image).expect("image");
        file.set_len(64 << 20).expect("size");
        let made = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&image)
            .output()
            .expect("mkfs.ext4 (e2fsprogs)");
        assert!(made.status.success(), "mkfs.ext4: {}", text(&made));
        let ext4 = Self { image, dir };
        let mounted = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&ext4.image)
            .arg(&ext4.dir)
            .output()
            .expect("mount");
        assert!(mounted.status.success(), "mount ext4: {}", text(&mounted));
        ext4
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).output();
        let _ = fs::remove_dir(&self.dir);
        let _ = fs::remove_file(&self.image);
    }
}

/// The tree the user's operations run on, made by root (`U`, `G`: the user's ids, `S`:
/// the supplementary group). Modes are set by chmod: root's umask masks those of mkdir.
const SETUP: &str = "
mkdir t 755
chmod t 755
open t/secret wc
write t/secret root-only
chmod t/secret 600
open t/public wc
write t/public public
chmod t/public 644
setxattr t/public user.color blue
setxattr t/public trusted.secret hidden
setxattr t/secret user.note private
open t/shared wc
chmod t/shared 666
mkdir t/private 700
chmod t/private 700
open t/private/inner wc
mkdir t/open 777
chmod t/open 777
mkdir t/open/rootsub 755
chmod t/open/rootsub 755
mkdir t/open/rootsub2 755
chmod t/open/rootsub2 755
mkdir t/sticky 1777
chmod t/sticky 1777
open t/sticky/roots wc
chmod t/sticky/roots 666
open t/sticky/users wc
chown t/sticky/users U G
mkdir t/mine 755
chmod t/mine 755
chown t/mine U G
open t/mine/file wc
chown t/mine/file U G
open t/mine/othergroup wc
chown t/mine/othergroup U 0
open t/mine/setuid wc
chown t/mine/setuid U G
chmod t/mine/setuid 6755
open t/group_file wc
chown t/group_file 0 S
chmod t/group_file 660
mkdir t/group_dir 770
chmod t/group_dir 770
chown t/group_dir 0 S
open t/group_dir/inside wc
open t/setuid wc
chmod t/setuid 6777
open t/setuid_truncated wc
write t/setuid_truncated data
chmod t/setuid_truncated 6777
mkdir t/sgid_dir 2777
chmod t/sgid_dir 2777
chown t/sgid_dir 0 S
mkscript t/script
chmod t/script 744
mkscript t/script_all
chmod t/script_all 755
mktrue t/true711
chmod t/true711 711
";

/// What the user does; each line's result is compared with ext4's.
const AS_USER: &str = "
# The three accesses of the report: read, append and chmod of root's 0600 file.
read t/secret
append t/secret more
chmod t/secret 777
# Read, write and execute on open; directory search.
read t/public
write t/public x
open t/public rw
open t/public rt
open t/public wa
access t/public r
access t/public w
access t/public x
read t/private/inner
stat t/private/inner
list t/private
access t/private x
chdir t/private
chdir t/open
list t/open
exec t/script
exec t/script_all
exec t/true711
open t/public 3
read t/group_file
write t/group_file by-group
list t/group_dir
read t/group_dir/inside
# Create.
open t/newfile wc
mkdir t/newdir 755
symlink target t/newlink
mkfifo t/fifo 644
open t/open/made wc
stat t/open/made
open t/sgid_dir/made wc
stat t/sgid_dir/made
mkdir t/sgid_dir/sub 755
stat t/sgid_dir/sub
# Ownership: chmod, chown, utimes.
chmod t/public 777
chmod t/mine/file 640
stat t/mine/file
chmod t/mine/othergroup 2755
stat t/mine/othergroup
chown t/public U -
chown t/mine/file 0 -
chown t/mine/file U -
chown t/mine/file - S
chown t/mine/file - 12345
stat t/mine/file
utimens t/public 1000 1000
utimens t/shared 1000 1000
utimens t/shared now now
touch t/shared
touch t/public
utimens t/shared now omit
utimens t/shared omit now
utimens t/shared omit omit
utimens t/mine/file 1000 omit
truncate t/public 0
truncate t/shared 3
ftruncate t/shared 2
ftruncate_ro t/shared 1
stat t/shared
# The sticky bit.
unlink t/sticky/roots
rename t/sticky/roots t/sticky/renamed
unlink t/sticky/users
open t/sticky/mine wc
rename t/sticky/mine t/sticky/roots
rename t/sticky/mine t/sticky/fine
# Rename and link need write permission on both directories.
rename t/open/made t/made
rename t/public t/open/public
link t/open/made t/linked
link t/open/made t/open/linked
link t/public t/open/public_link
rename t/open/rootsub t/open/renamed
rename t/open/rootsub2 t/mine/rootsub2
rename t/open/linked t/mine/moved
# setuid and setgid are cleared by a write and by chown.
write t/setuid data
stat t/setuid
truncate t/setuid_truncated 1
stat t/setuid_truncated
chown t/mine/setuid - S
stat t/mine/setuid
# Extended attributes.
getxattr t/public user.color
setxattr t/public user.color red
removexattr t/public user.color
getxattr t/secret user.note
getxattr t/public trusted.secret
setxattr t/shared trusted.x y
listxattr t/public
setxattr t/shared user.x y
getxattr t/shared user.x
setxattr t/sticky user.x y
setxattr t/mine user.x y
setxattr t/shared security.x y
# Timestamps: what moved.
stamp t/mine/file
pause
chmod t/mine/file 600
changed t/mine/file
stamp t/shared
pause
write t/shared abc
changed t/shared
stamp t/shared
pause
touch t/shared
changed t/shared
stamp t/public
pause
chmod t/public 777
touch t/public
changed t/public
";

/// What root sees afterwards: the modes, owners and sizes the user's operations left.
const AFTERWARDS: &str = "
stat t/secret
stat t/public
stat t/shared
stat t/setuid
stat t/setuid_truncated
stat t/mine/file
stat t/mine/othergroup
stat t/mine/setuid
stat t/sgid_dir/made
stat t/sgid_dir/sub
list t
list t/open
list t/mine
list t/sticky
";

fn with_ids(script: &str, uid: u32, gid: u32) -> String {
    script
        .replace(" U ", &format!(" {uid} "))
        .replace(" U\n", &format!(" {uid}\n"))
        .replace(" G\n", &format!(" {gid}\n"))
        .replace(" S\n", &format!(" {GROUP}\n"))
        .replace(" S ", &format!(" {GROUP} "))
}

/// Runs the three scripts on `root`, the user's as `user`; returns what the user and
/// root saw.
fn scenario(probe: &Probe, root: &Path, user: Runner, uid: u32, gid: u32) -> (String, String) {
    let setup = probe.run(root, Runner::Root, &with_ids(SETUP, uid, gid));
    assert!(
        setup.lines().all(|line| line.ends_with(" ok")),
        "setup failed:\n{setup}"
    );
    let user = probe.run(root, user, &with_ids(AS_USER, uid, gid));
    let after = probe.run(root, Runner::Root, AFTERWARDS);
    (user, after)
}

/// Asserts the two outputs agree line by line, naming every line that differs.
fn assert_same(what: &str, exofs: &str, ext4: &str) {
    let differences: Vec<String> = exofs
        .lines()
        .zip(ext4.lines())
        .filter(|(a, b)| a != b)
        .map(|(a, b)| format!("  exofs: {a}\n  ext4:  {b}"))
        .collect();
    assert!(
        differences.is_empty() && exofs.lines().count() == ext4.lines().count(),
        "{what}: exofs and ext4 differ:\n{}",
        differences.join("\n")
    );
}

/// Results the user must get, whatever ext4 says.
const AS_THE_USER: &[(&str, &str)] = &[
    ("read t/secret", "EACCES"),
    ("append t/secret more", "EACCES"),
    ("chmod t/secret 777", "EPERM"),
    ("read t/private/inner", "EACCES"),
    ("exec t/script", "EACCES"),
    ("exec t/true711", "ok"),
    ("open t/public 3", "EACCES"),
    ("open t/newfile wc", "EACCES"),
    ("chmod t/public 777", "EPERM"),
    ("chown t/mine/file 0 -", "EPERM"),
    ("utimens t/shared now omit", "EPERM"),
    ("utimens t/shared now now", "ok"),
    ("touch t/public", "EACCES"),
    ("unlink t/sticky/roots", "EPERM"),
    ("rename t/public t/open/public", "EACCES"),
    ("rename t/open/rootsub2 t/mine/rootsub2", "EACCES"),
    ("link t/open/made t/linked", "EACCES"),
    ("getxattr t/public trusted.secret", "ENODATA"),
    ("setxattr t/shared trusted.x y", "EPERM"),
    ("setxattr t/public user.color red", "EACCES"),
    ("read t/group_file", "[] ok"),
    ("listxattr t/public", "user.color ok"),
    (
        "stat t/setuid_truncated",
        "mode=100777 uid=0 gid=0 nlink=1 size=1 ok",
    ),
];

/// Results the user must get inside a user namespace of its own, where it holds every
/// capability: over files of ours, they count for nothing.
const IN_A_NAMESPACE: &[(&str, &str)] = &[
    ("read t/secret", "EACCES"),
    ("append t/secret more", "EACCES"),
    ("chmod t/secret 777", "EPERM"),
    ("read t/private/inner", "EACCES"),
    ("list t/private", "EACCES"),
    ("open t/newfile wc", "EACCES"),
    ("mkdir t/newdir 755", "EACCES"),
    ("chmod t/public 777", "EPERM"),
    ("unlink t/sticky/roots", "EPERM"),
    ("getxattr t/public trusted.secret", "ENODATA"),
    ("listxattr t/public", "user.color ok"),
    (
        "stat t/setuid_truncated",
        "mode=100777 uid=65534 gid=65534 nlink=1 size=1 ok",
    ),
];

/// The result of the line for `operation` (its text up to the colon).
fn result_of<'a>(output: &'a str, operation: &str) -> &'a str {
    output
        .lines()
        .find_map(|line| line.strip_prefix(operation)?.strip_prefix(": "))
        .unwrap_or_else(|| panic!("no line for `{operation}` in:\n{output}"))
}

/// The user's operations on exofs mounted with `options` give what they give on ext4;
/// `in_namespace`: the user runs them inside a user namespace of its own.
fn permissions_match_ext4(options: &str, name: &str, in_namespace: bool) {
    let (uid, gid) = test_user();
    let user = if in_namespace {
        Runner::UserNamespace(uid, gid)
    } else {
        Runner::User(uid, gid)
    };
    let probe = Probe::build(name);
    let ext4 = Ext4::new(name);
    let (ext4_user, ext4_after) = scenario(&probe, &ext4.dir, user, uid, gid);
    let m = Mounted::new(name, "64M");
    m.mount_with(options);
    let (exofs_user, exofs_after) = scenario(&probe, Path::new(m.dir()), user, uid, gid);

    assert_same(
        &format!("the user's operations ({options})"),
        &exofs_user,
        &ext4_user,
    );
    assert_same(
        &format!("root's view afterwards ({options})"),
        &exofs_after,
        &ext4_after,
    );
    // The refusals the report found missing, and a sample of each rule: fixed
    // expectations, so the test cannot pass by both sides allowing everything.
    let expectations = if in_namespace {
        IN_A_NAMESPACE
    } else {
        AS_THE_USER
    };
    for (operation, expected) in expectations {
        assert_eq!(
            result_of(&exofs_user, operation),
            *expected,
            "{operation} on exofs ({options}); all:\n{exofs_user}"
        );
    }
    m.umount();
    m.fsck_clean();
}

#[test]
fn permissions_on_an_allow_other_mount_match_ext4() {
    if !can_mount("permissions_on_an_allow_other_mount_match_ext4") {
        return;
    }
    permissions_match_ext4("allow_other", "perm-other", false);
}

#[test]
fn capabilities_in_a_user_namespace_grant_nothing() {
    if !can_mount("capabilities_in_a_user_namespace_grant_nothing") {
        return;
    }
    permissions_match_ext4("allow_other", "perm-userns", true);
    permissions_match_ext4(
        "allow_other,no_default_permissions",
        "perm-userns-daemon",
        true,
    );
}

#[test]
fn the_daemon_alone_enforces_every_rule() {
    if !can_mount("the_daemon_alone_enforces_every_rule") {
        return;
    }
    let log = std::env::temp_dir().join(format!("exofs-perm-{}.log", std::process::id()));
    let options = format!("allow_other,no_default_permissions,log={}", log.display());
    permissions_match_ext4(&options, "perm-daemon", false);
    // The mount's log says what the option gives away.
    let logged = fs::read_to_string(&log).unwrap_or_default();
    let _ = fs::remove_file(&log);
    assert!(
        logged.contains("no_default_permissions: the kernel does not check permissions"),
        "the log does not say the kernel's check is off:\n{logged}"
    );
}

#[test]
fn a_mount_without_options_refuses_other_users_everything() {
    if !can_mount("a_mount_without_options_refuses_other_users_everything") {
        return;
    }
    let (uid, gid) = test_user();
    let probe = Probe::build("perm-none");
    let m = Mounted::new("perm-none", "64M");
    m.mount();
    let root = Path::new(m.dir());
    let setup = probe.run(root, Runner::Root, &with_ids(SETUP, uid, gid));
    assert!(
        setup.lines().all(|line| line.ends_with(" ok")),
        "setup:\n{setup}"
    );
    let user = probe.run(root, Runner::User(uid, gid), &with_ids(AS_USER, uid, gid));
    // `pause` touches nothing, and utimensat with both times UTIME_OMIT succeeds in the
    // kernel before it looks at the path.
    let touches_the_mount = |line: &&str| !line.starts_with("pause") && !line.contains("omit omit");
    for line in user.lines().filter(touches_the_mount) {
        assert!(line.ends_with(" EACCES"), "not refused: {line}");
    }
    for operation in [
        "read t/secret",
        "append t/secret more",
        "chmod t/secret 777",
    ] {
        assert_eq!(result_of(&user, operation), "EACCES", "{operation}");
    }
    // Nothing changed: root sees the tree as it made it.
    let after = probe.run(
        root,
        Runner::Root,
        "stat t/secret\nstat t/public\nlist t/open\n",
    );
    assert_eq!(
        after,
        "stat t/secret: mode=100600 uid=0 gid=0 nlink=1 size=9 ok\n\
         stat t/public: mode=100644 uid=0 gid=0 nlink=1 size=6 ok\n\
         list t/open: rootsub rootsub2 ok\n"
    );
    m.umount();
    m.fsck_clean();
}
