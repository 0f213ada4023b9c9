//! The kernel-binding commands: `prog load|list|unload`, `chain`, `stats`, and `index`
//! (writes an example index file to run chains on).

use crate::mount;
use exofs_abi::chain::status;
use exofs_abi::formats::Lookup;
use kernel_ext::binding::{Binding, BindingError, BindingOptions, ChainRequest, Store};
use kernel_ext::{examples, index};
use libfs::{Fs, OpenOptions};
use std::error::Error;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// Prefix naming one of the example objects built into this binary.
const EXAMPLE_PREFIX: &str = "example:";
const EXAMPLES: &[(&str, &[u8])] = &[
    ("btree", examples::BTREE),
    ("btree_c", examples::BTREE_C),
    ("hash_chain", examples::HASH_CHAIN),
    ("linked_list", examples::LINKED_LIST),
    ("sqlite_rowid", examples::SQLITE_ROWID),
];

/// What the prog and stats commands work on: an image no one has open (this process
/// opens it and its binding), or a mounted one (the daemon holds the file system and the
/// maps; this process attaches to the pinned maps).
pub(crate) enum Target {
    Image(Binding),
    Mounted(Store),
}

impl Target {
    fn store(&self) -> &Store {
        match self {
            Self::Image(binding) => binding,
            Self::Mounted(store) => store,
        }
    }
}

/// Where `path` (an image, or the mount point of a mounted one) is mounted, if it is:
/// (image, mount point).
pub(crate) fn mounted(path: &Path) -> Result<Option<(PathBuf, PathBuf)>> {
    Ok(mount::exofs_mounts()?
        .into_iter()
        .find(|(image, mountpoint)| same_file(mountpoint, path) || same_file(image, path)))
}

/// Opens `path`, an image or the mount point of a mounted one.
pub(crate) fn open_target(path: &Path, bpffs: &Path) -> Result<Target> {
    let attach = |image: &Path| {
        let uuid = Fs::peek_uuid(image)?;
        let store = Store::attach(uuid, bpffs).map_err(explain)?;
        Ok::<_, Box<dyn Error>>(Target::Mounted(store))
    };
    if let Some((image, _)) = mounted(path)? {
        return attach(&image);
    }
    match Fs::open(path, &OpenOptions::read_only()) {
        Ok(fs) => {
            let options = BindingOptions {
                pin: true,
                bpffs: bpffs.to_owned(),
                ..BindingOptions::default()
            };
            Ok(Target::Image(
                Binding::open(Arc::new(fs), &options).map_err(explain)?,
            ))
        }
        // Held by a process that is not a mount daemon (or one whose mount is gone).
        Err(libfs::Error::Busy(_)) => attach(path),
        Err(err) => Err(format!("{}: {err}", path.display()).into()),
    }
}

/// Whether two paths name the same file.
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Adds what to do to a refusal for lack of privilege.
pub(crate) fn explain(err: BindingError) -> String {
    if err.is_permission_denied() {
        format!("{err} (loading BPF and pinning need root: CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN)")
    } else {
        err.to_string()
    }
}

/// `exofs prog load IMAGE NAME OBJECT`.
pub fn load(image: &Path, bpffs: &Path, name: &str, object: &str) -> Result<()> {
    let bytes = match object.strip_prefix(EXAMPLE_PREFIX) {
        Some(example) => EXAMPLES
            .iter()
            .find(|(n, _)| *n == example)
            .map(|(_, bytes)| bytes.to_vec())
            .ok_or_else(|| {
                let names: Vec<&str> = EXAMPLES.iter().map(|(n, _)| *n).collect();
                format!("no example `{example}`; there are: {}", names.join(", "))
            })?,
        None => std::fs::read(object).map_err(|err| format!("{object}: {err}"))?,
    };
    let target = open_target(image, bpffs)?;
    let store = target.store();
    let program = store.bind(name, &bytes).map_err(explain)?;
    println!(
        "{name}: bound ({} instructions with the driver), pinned at {}",
        program.insn_count().unwrap_or(0),
        store
            .pin_dir()
            .map(|dir| dir.join("progs").join(name).display().to_string())
            .unwrap_or_default()
    );
    Ok(())
}

/// `exofs prog list IMAGE`.
pub fn list(image: &Path, bpffs: &Path) -> Result<()> {
    let target = open_target(image, bpffs)?;
    let names = target.store().program_names().map_err(explain)?;
    if names.is_empty() {
        println!("no programs loaded");
    }
    for name in names {
        println!("{name}");
    }
    Ok(())
}

/// `exofs prog unload IMAGE NAME`.
pub fn unload(image: &Path, bpffs: &Path, name: &str) -> Result<()> {
    let target = open_target(image, bpffs)?;
    target.store().unload(name).map_err(explain)?;
    println!("{name}: unloaded");
    Ok(())
}

/// `exofs chain IMAGE PATH --prog NAME --key KEY`: one lookup with the examples' scratch
/// layout (key in; found, value out). Exit 0 found or not found, 1 if the chain failed.
/// How `exofs chain` reaches the kernel through a mount (`exofs_client::Via`).
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ViaArg {
    Auto,
    Direct,
    Daemon,
}

impl From<ViaArg> for exofs_client::Via {
    fn from(via: ViaArg) -> Self {
        match via {
            ViaArg::Auto => Self::Auto,
            ViaArg::Direct => Self::Direct,
            ViaArg::Daemon => Self::Daemon,
        }
    }
}

/// What `exofs chain` runs.
#[derive(Debug, Clone)]
pub struct ChainArgs {
    pub path: PathBuf,
    pub prog: String,
    pub key: u64,
    pub start: u64,
    pub hops: Option<u32>,
    pub via: ViaArg,
}

pub fn chain(image: &Path, bpffs: &Path, args: &ChainArgs) -> Result<ExitCode> {
    let ChainArgs {
        path,
        prog,
        key,
        start,
        hops,
        ..
    } = args;
    let (path, prog, key, start, hops) = (path.as_path(), prog.as_str(), *key, *start, *hops);
    // A mounted image: through the mount, as any unprivileged application (no BPF here).
    if let Some((_, mountpoint)) = mounted(image)? {
        return chain_through_mount(&mountpoint, args);
    }
    let Target::Image(binding) = open_target(image, bpffs)? else {
        return Err(format!("{}: in use by another process", image.display()).into());
    };
    let program = binding.program(prog).map_err(explain)?;
    let ino = binding.fs().resolve(path)?.ino;
    let mut request = ChainRequest::new(ino, start, &Lookup::ask(key));
    if let Some(hops) = hops {
        request.hop_limit = hops;
    }
    let outcome = binding.run(&program, &request).map_err(explain)?;
    Ok(report_lookup(
        key,
        outcome.status,
        outcome.hops,
        &outcome.scratch,
    ))
}

/// A chain through the mount, as any unprivileged application runs it (exofs-client:
/// directly in the kernel, or through the daemon's ioctl).
fn chain_through_mount(mountpoint: &Path, args: &ChainArgs) -> Result<ExitCode> {
    let path = &args.path;
    let inside = mountpoint.join(path.strip_prefix("/").unwrap_or(path));
    let file = std::fs::File::open(&inside).map_err(|e| format!("{}: {e}", inside.display()))?;
    let ask = Lookup::ask(args.key);
    let mut chain = exofs_client::Chain::new(&args.prog, args.start, &ask);
    if let Some(hops) = args.hops {
        chain.hop_limit = hops;
    }
    chain.via = args.via.into();
    let answer = exofs_client::chain(&file, &chain)
        .map_err(|e| format!("{}: chain: {e}", inside.display()))?;
    Ok(report_lookup(
        args.key,
        answer.status,
        answer.hops,
        &answer.scratch,
    ))
}

/// Prints a lookup's answer; exit 0 found or not found, 1 if the chain did not finish.
pub(crate) fn report_lookup(key: u64, chain_status: i32, hops: u32, scratch: &[u8]) -> ExitCode {
    if chain_status != status::DONE {
        println!(
            "key {key}: {} after {hops} hops",
            status::name(chain_status)
        );
        return ExitCode::from(1);
    }
    let lookup = Lookup::from_scratch(scratch);
    if lookup.is_found() {
        println!("key {key}: value {} ({hops} hops)", lookup.value);
    } else {
        println!("key {key}: not found ({hops} hops)");
    }
    ExitCode::SUCCESS
}

/// `exofs stats IMAGE|MOUNTPOINT`.
pub fn stats(image: &Path, bpffs: &Path) -> Result<()> {
    let target = open_target(image, bpffs)?;
    let stats = target.store().stats().map_err(explain)?;
    println!("chains    {}", stats.chains);
    println!("hops      {}", stats.hops);
    println!("done      {}", stats.done);
    println!(
        "rejects   {}",
        stats.rejected + stats.denied + stats.refused
    );
    println!("  denied  {} (by the kernel policy)", stats.denied);
    println!("    no grant      {}", stats.denied_no_grant);
    println!("    too many hops {}", stats.denied_hops);
    println!("    batch too big {}", stats.denied_batch);
    println!(
        "    no handle     {} (direct chains over a file not asked for through an open handle)",
        stats.denied_no_ticket
    );
    println!(
        "  direct  {} (direct calls that named a mapping or a subject)",
        stats.direct_invalid
    );
    println!(
        "  refused {} (by the mount daemon's policy check)",
        stats.refused
    );
    println!("stale     {} (each retried)", stats.stale);
    println!(
        "hot hits  {} of {} direct hops (read from the hot-block table)",
        stats.hot_hits,
        stats.hot_hits + stats.hot_misses
    );
    println!("aborted   {}", stats.aborted);
    Ok(())
}

/// Index kinds `exofs index` writes.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Kind {
    Btree,
    Hash,
    List,
}

/// `exofs index IMAGE PATH --kind K --keys N`: an example index whose keys are
/// 1, 3, 5, ... (2N - 1) and whose values are key * 7.
pub fn write_index(
    image: &Path,
    path: &Path,
    kind: Kind,
    keys: u64,
    node_size: usize,
) -> Result<()> {
    let pairs: Vec<(u64, u64)> = (0..keys).map(|i| (2 * i + 1, (2 * i + 1) * 7)).collect();
    let (bytes, shape) = match kind {
        Kind::Btree => {
            let fanout = exofs_abi::formats::btree::capacity(node_size);
            let tree = index::build_btree(&pairs, node_size, fanout)?;
            let shape = format!("B-tree of depth {}, {node_size}-byte nodes", tree.depth);
            (tree.bytes, shape)
        }
        Kind::Hash => {
            let buckets = (keys / 4).max(1);
            (
                index::build_hash(&pairs, buckets),
                format!("hash of {buckets} buckets"),
            )
        }
        Kind::List => {
            if keys > 64 {
                return Err("a list lookup takes one hop per node: at most 64 keys".into());
            }
            (index::build_list(&pairs, 1), "linked list".to_owned())
        }
    };
    let fs = Arc::new(Fs::open(image, &OpenOptions::default())?);
    let mut file = libfs::File::create(&fs, path)?;
    std::io::Write::write_all(&mut file, &bytes)?;
    drop(file);
    fs.sync()?;
    println!(
        "{}: {shape}, {keys} keys (1, 3, 5, ...; value = key * 7), {} bytes",
        path.display(),
        bytes.len()
    );
    Ok(())
}
