//! `exofs`: the command line of the exofs file system.
//!
//! Subcommands: `mkfs`, `fsck`, `bench fs`, and small tools to look inside an image
//! (`ls`, `put`, `get`, `extents`). The mount, policy, prog, chain and stats
//! commands arrive with their issues.

mod bench;
mod size;
mod tools;

use clap::{Parser, Subcommand};
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
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
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
        Command::Bench { which } => bench::run(which),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("exofs: {e}");
            ExitCode::from(2)
        }
    }
}
