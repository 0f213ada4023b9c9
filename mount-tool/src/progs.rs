//! The kernel-binding commands: `prog load|list|unload`, `chain`, `stats`, and `index`
//! (writes an example index file to run chains on).

use exofs_abi::chain::status;
use exofs_abi::formats::Lookup;
use kernel_ext::binding::{Binding, BindingError, BindingOptions, ChainRequest};
use kernel_ext::{examples, index};
use libfs::{Fs, OpenOptions};
use std::error::Error;
use std::path::Path;
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
];

fn open_binding(image: &Path, bpffs: &Path, writable: bool) -> Result<Binding> {
    let options = if writable {
        OpenOptions::default()
    } else {
        OpenOptions::read_only()
    };
    let fs = Arc::new(Fs::open(image, &options)?);
    let options = BindingOptions {
        pin: true,
        bpffs: bpffs.to_owned(),
    };
    Binding::open(fs, &options).map_err(|err| explain(err).into())
}

/// Adds what to do to a refusal for lack of privilege.
fn explain(err: BindingError) -> String {
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
    let binding = open_binding(image, bpffs, false)?;
    let program = binding.bind(name, &bytes).map_err(explain)?;
    println!(
        "{name}: bound ({} instructions with the driver), pinned at {}",
        program.insn_count().unwrap_or(0),
        binding
            .pin_dir()
            .map(|dir| dir.join("progs").join(name).display().to_string())
            .unwrap_or_default()
    );
    Ok(())
}

/// `exofs prog list IMAGE`.
pub fn list(image: &Path, bpffs: &Path) -> Result<()> {
    let binding = open_binding(image, bpffs, false)?;
    let names = binding.program_names().map_err(explain)?;
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
    let binding = open_binding(image, bpffs, false)?;
    binding.unload(name).map_err(explain)?;
    println!("{name}: unloaded");
    Ok(())
}

/// `exofs chain IMAGE PATH --prog NAME --key KEY`: one lookup with the examples' scratch
/// layout (key in; found, value out). Exit 0 found or not found, 1 if the chain failed.
pub fn chain(
    image: &Path,
    bpffs: &Path,
    path: &Path,
    prog: &str,
    key: u64,
    start: u64,
) -> Result<ExitCode> {
    let binding = open_binding(image, bpffs, false)?;
    let program = binding.program(prog).map_err(explain)?;
    let ino = binding.fs().resolve(path)?.ino;
    let lookup = Lookup {
        key,
        found: 0,
        value: 0,
    };
    let mut scratch = [0u8; 24];
    scratch[..8].copy_from_slice(&lookup.key.to_le_bytes());
    let outcome = binding
        .run(&program, &ChainRequest::new(ino, start, &scratch))
        .map_err(explain)?;
    let word = |i: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&outcome.scratch[i * 8..i * 8 + 8]);
        u64::from_le_bytes(bytes)
    };
    if outcome.status != status::DONE {
        println!(
            "key {key}: {} after {} hops",
            status::name(outcome.status),
            outcome.hops
        );
        return Ok(ExitCode::from(1));
    }
    if word(1) == 1 {
        println!("key {key}: value {} ({} hops)", word(2), outcome.hops);
    } else {
        println!("key {key}: not found ({} hops)", outcome.hops);
    }
    Ok(ExitCode::SUCCESS)
}

/// `exofs stats IMAGE`.
pub fn stats(image: &Path, bpffs: &Path) -> Result<()> {
    let binding = open_binding(image, bpffs, false)?;
    let stats = binding.stats().map_err(explain)?;
    println!("chains    {}", stats.chains);
    println!("hops      {}", stats.hops);
    println!("done      {}", stats.done);
    println!("rejects   {}", stats.rejected + stats.denied);
    println!("  denied  {}", stats.denied);
    println!("stale     {} (each retried)", stats.stale);
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
