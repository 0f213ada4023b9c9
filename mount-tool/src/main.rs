//! `exofs`: the command line of the exofs file system.
//!
//! Subcommands: `mkfs`, `fsck`, `bench fs|chain|mount`, small tools to look inside an
//! image (`ls`, `put`, `get`, `extents`), the kernel binding's `prog load|list|unload`,
//! `chain`, `stats` and `index`, `mount` / `umount` (FUSE), and `policy check|reload`.
//! Called as `mount.exofs`, it is mount(8)'s helper for `mount -t exofs` and fstab.

mod access;
mod bench;
mod bench_chain;
mod bench_mount;
mod bench_ooc;
mod bench_plot;
mod bench_sqlite;
mod bench_via_mount;
mod bench_walks;
mod budget;
mod chains;
mod fuse;
mod mount;
mod progs;
mod size;
mod sqlite;
mod tools;

use clap::{Parser, Subcommand};
use mount_tool::{policy, request};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "exofs",
    version,
    about = "exofs: a library file system with in-kernel chained reads"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Where bpffs is (or is to be) mounted, for the prog, chain and stats commands.
    #[arg(long, global = true, value_name = "DIR", default_value = kernel_ext::binding::DEFAULT_BPFFS)]
    bpffs: PathBuf,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Make a file system on an image file (created if missing) or a block device.
    Mkfs {
        image: PathBuf,
        /// Size of the image, e.g. 512M, 4G (image files only; devices use their size).
        #[arg(long, value_parser = size::parse_size)]
        size: Option<u64>,
        /// Number of inodes (default: one per 16 KiB).
        #[arg(long)]
        inodes: Option<u64>,
        /// Journal size in blocks (default: 1/64 of the image, 64..=16384).
        #[arg(long)]
        journal_blocks: Option<u64>,
        #[arg(long, default_value = "")]
        label: String,
    },
    /// Check a file system; exit 0 when clean, 1 with one line per problem otherwise.
    Fsck {
        image: PathBuf,
        /// Mend the safe cases (leaked blocks, link counts, dangling entries, ...).
        #[arg(long)]
        repair: bool,
    },
    /// List a directory of an image.
    Ls {
        image: PathBuf,
        #[arg(default_value = "/")]
        path: PathBuf,
    },
    /// Copy a host file into an image.
    Put {
        image: PathBuf,
        source: PathBuf,
        path: PathBuf,
    },
    /// Print a file of an image to standard output.
    Get { image: PathBuf, path: PathBuf },
    /// Print a file's extents: file block, device block, length.
    Extents { image: PathBuf, path: PathBuf },
    /// Serve an image over FUSE at MOUNTPOINT (in the background unless -f).
    Mount {
        image: PathBuf,
        mountpoint: PathBuf,
        /// Stay in the foreground and log to stderr.
        #[arg(short = 'f', long)]
        foreground: bool,
        /// Options: ro, allow_other, no_default_permissions, cache=SIZE, hot=SIZE,
        /// policy=FILE, log=FILE, bpffs=DIR (docs/MOUNT.md).
        #[arg(short = 'o', default_value = "")]
        options: String,
    },
    /// Unmount an exofs mount and wait until its daemon has checkpointed and exited.
    Umount { mountpoint: PathBuf },
    /// The allowed-extents policy.
    Policy {
        #[command(subcommand)]
        action: PolicyAction,
    },
    /// Programs bound into the kernel driver for an image.
    Prog {
        #[command(subcommand)]
        action: ProgAction,
    },
    /// Run one chained lookup in the kernel and print the value found (or "not found")
    /// and the hop count. Uses the example programs' scratch: key in; found, value out.
    /// On a mounted image (or its mount point) the chain goes through the mount's ioctl,
    /// as an unprivileged application's would.
    Chain {
        /// The image, or the mount point of a mounted one.
        image: PathBuf,
        /// The file to look in (its path inside the image).
        path: PathBuf,
        /// A program loaded with `exofs prog load`.
        #[arg(long)]
        prog: String,
        #[arg(long)]
        key: u64,
        /// Byte offset of the first hop (the examples start at 0).
        #[arg(long, default_value_t = 0)]
        start: u64,
        /// Hops at most (default: 64; through a mount, as many as your grant allows).
        #[arg(long)]
        hops: Option<u32>,
        /// Through a mount: run the chain directly in the kernel (`direct`), through the
        /// daemon's ioctl (`daemon`), or directly when possible (`auto`).
        #[arg(long, value_enum, default_value_t = progs::ViaArg::Auto)]
        via: progs::ViaArg,
    },
    /// Look a rowid up in a table of an SQLite database stored in the image, with one chain
    /// of the loaded `sqlite_rowid` program (`exofs prog load IMAGE sqlite_rowid
    /// example:sqlite_rowid`). Prints the column's value, or `not found`, and the hops.
    /// On a mounted image (or its mount point) it runs through the mount, as any user the
    /// policy grants.
    Sqlite {
        /// The image, or the mount point of a mounted one.
        image: PathBuf,
        /// The database file (its path inside the image).
        path: PathBuf,
        /// The table (a rowid table; its root page comes from the schema).
        #[arg(long)]
        table: String,
        /// The rowid (several: `--rowid 1,2,3` or the option again); a line each.
        #[arg(
            long = "rowid",
            required = true,
            allow_hyphen_values = true,
            value_delimiter = ','
        )]
        rowids: Vec<i64>,
        /// The column, from 0, in the table's declared order.
        #[arg(long, default_value_t = 0)]
        column: u16,
        /// The loaded program's name.
        #[arg(long, default_value = exofs_client::sqlite::PROGRAM)]
        prog: String,
        /// Hops at most (default: 64; through a mount, as many as your grant allows).
        #[arg(long)]
        hops: Option<u32>,
        /// Through a mount: `direct`, `daemon` or `auto` (as for `exofs chain`).
        #[arg(long, value_enum, default_value_t = progs::ViaArg::Auto)]
        via: progs::ViaArg,
        /// Batched chains, up to 32 lookups per kernel call: texts and blobs come back as
        /// their lengths only (a batched lookup has 32 bytes of scratch).
        #[arg(long)]
        batch: bool,
    },
    /// Chain statistics of an image's binding (or of a mount's): chains, hops, rejects,
    /// stale retries.
    Stats { image: PathBuf },
    /// Write an example index file (keys 1, 3, 5, ...; value = key * 7) into an image.
    Index {
        image: PathBuf,
        path: PathBuf,
        #[arg(long, value_enum, default_value = "btree")]
        kind: progs::Kind,
        #[arg(long, default_value_t = 100_000)]
        keys: u64,
        /// B-tree node size: 512 or 4096.
        #[arg(long, default_value_t = 4096)]
        node_size: usize,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        which: Box<bench::Which>,
    },
}

#[derive(Subcommand, Debug)]
enum PolicyAction {
    /// Check a policy file: exit 0 if it is valid, else 1 with FILE:LINE:COL per mistake.
    Check { file: PathBuf },
    /// Make a mount's daemon read its policy file (-o policy=FILE) again. A file with
    /// mistakes is refused (exit 1, FILE:LINE:COL per mistake) and the old policy stays.
    Reload { mountpoint: PathBuf },
}

#[derive(Subcommand, Debug)]
enum ProgAction {
    /// Link an application object's `next` into the driver, load it and pin it as NAME.
    /// OBJECT is a BPF ELF file, or example:btree, example:btree_c, example:hash_chain,
    /// example:linked_list, example:sqlite_rowid for the examples built into exofs.
    Load {
        image: PathBuf,
        name: String,
        object: String,
    },
    /// List the loaded programs.
    List { image: PathBuf },
    /// Unload a program (the last unload removes every pinned object).
    Unload { image: PathBuf, name: String },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args: Vec<String> = std::env::args().collect();
    let called = args
        .first()
        .map(|arg0| arg0.rsplit('/').next().unwrap_or(arg0));
    if called == Some("mount.exofs") {
        return match mount::helper(&args[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("mount.exofs: {e}");
                // mount(8)'s "mount failure".
                ExitCode::from(32)
            }
        };
    }
    let cli = Cli::parse();
    let bpffs = cli.bpffs.as_path();
    let result = match cli.command {
        Command::Mkfs {
            image,
            size,
            inodes,
            journal_blocks,
            label,
        } => tools::mkfs(&image, size, inodes, journal_blocks, label),
        Command::Fsck { image, repair } => return tools::fsck(&image, repair),
        Command::Ls { image, path } => tools::ls(&image, &path),
        Command::Put {
            image,
            source,
            path,
        } => tools::put(&image, &source, &path),
        Command::Get { image, path } => tools::get(&image, &path),
        Command::Extents { image, path } => tools::extents(&image, &path),
        Command::Mount {
            image,
            mountpoint,
            foreground,
            options,
        } => mount::mount(&image, &mountpoint, foreground, &options, bpffs),
        Command::Umount { mountpoint } => mount::umount(&mountpoint),
        Command::Policy {
            action: PolicyAction::Reload { mountpoint },
        } => match policy::reload(&mountpoint) {
            Ok(()) => {
                println!("{}: policy reloaded", mountpoint.display());
                Ok(())
            }
            Err(policy::ReloadError::Mistakes(mistakes)) => {
                println!("{mistakes}");
                return ExitCode::from(1);
            }
            Err(policy::ReloadError::Failed(message)) => Err(message.into()),
        },
        Command::Policy {
            action: PolicyAction::Check { file },
        } => match policy::load(&file) {
            Ok(policy) => {
                let grants: usize = policy.subjects.iter().map(|s| s.grants.len()).sum();
                println!(
                    "{}: valid, {} subjects, {grants} grants",
                    file.display(),
                    policy.subjects.len()
                );
                Ok(())
            }
            Err(mistakes) => {
                println!("{mistakes}");
                return ExitCode::from(1);
            }
        },
        Command::Prog { action } => match action {
            ProgAction::Load {
                image,
                name,
                object,
            } => progs::load(&image, bpffs, &name, &object),
            ProgAction::List { image } => progs::list(&image, bpffs),
            ProgAction::Unload { image, name } => progs::unload(&image, bpffs, &name),
        },
        Command::Chain {
            image,
            path,
            prog,
            key,
            start,
            hops,
            via,
        } => match progs::chain(
            &image,
            bpffs,
            &progs::ChainArgs {
                path,
                prog,
                key,
                start,
                hops,
                via,
            },
        ) {
            Ok(code) => return code,
            Err(e) => Err(e),
        },
        Command::Sqlite {
            image,
            path,
            table,
            rowids,
            column,
            prog,
            hops,
            via,
            batch,
        } => match sqlite::lookup(
            &image,
            bpffs,
            &sqlite::SqliteArgs {
                path,
                table,
                rowids,
                column,
                batch,
                prog,
                hops,
                via,
            },
        ) {
            Ok(code) => return code,
            Err(e) => Err(e),
        },
        Command::Stats { image } => progs::stats(&image, bpffs),
        Command::Index {
            image,
            path,
            kind,
            keys,
            node_size,
        } => progs::write_index(&image, &path, kind, keys, node_size),
        Command::Bench { which } => bench::run(*which),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("exofs: {e}");
            ExitCode::from(2)
        }
    }
}
