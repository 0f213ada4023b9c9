//! The image tools: mkfs, fsck, ls, put, get, extents.

use libfs::{FileDevice, FormatOptions, Fs, OpenOptions};
use std::error::Error;
use std::io::{Read, Write};
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

type Result<T> = std::result::Result<T, Box<dyn Error>>;

pub fn mkfs(
    image: &Path,
    size: Option<u64>,
    inodes: Option<u64>,
    journal_blocks: Option<u64>,
    label: String,
) -> Result<()> {
    let device = match size {
        Some(size) => FileDevice::create(image, size)?,
        None if image.exists() => FileDevice::open(image, true)?,
        None => {
            return Err(format!(
                "{} does not exist: give --size to create it",
                image.display()
            )
            .into())
        }
    };
    let options = FormatOptions {
        inodes,
        journal_blocks,
        label,
        uuid: None,
    };
    let geometry = libfs::format(Arc::new(device), &options)?;
    let fs = Fs::open(image, &OpenOptions::read_only())?;
    let uuid: String = fs.uuid().iter().map(|b| format!("{b:02x}")).collect();
    println!(
        "{}: {} blocks of 4 KiB, {} inodes, journal {} blocks, data from block {}, uuid {uuid}",
        image.display(),
        geometry.total_blocks,
        geometry.inode_count,
        geometry.journal_blocks,
        geometry.data_start
    );
    Ok(())
}

pub fn fsck(image: &Path, repair: bool) -> ExitCode {
    let run = || -> Result<libfs::fsck::Report> {
        let device: Arc<dyn libfs::BlockDevice> = Arc::new(FileDevice::open(image, repair)?);
        Ok(if repair {
            libfs::fsck::repair(device)?
        } else {
            libfs::fsck::check(device)?
        })
    };
    match run() {
        Ok(report) => {
            for note in &report.notes {
                println!("note: {note}");
            }
            for problem in &report.problems {
                println!("{problem}");
            }
            if report.is_clean() {
                println!(
                    "{}: clean, {} files, {} directories, {} blocks used",
                    image.display(),
                    report.files,
                    report.directories,
                    report.used_blocks
                );
                ExitCode::SUCCESS
            } else if repair {
                println!(
                    "{}: {} problem(s), {} repaired",
                    image.display(),
                    report.problems.len(),
                    report.repaired
                );
                let left = report.problems.iter().filter(|p| !p.repairable).count();
                if left == 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                }
            } else {
                println!("{}: {} problem(s)", image.display(), report.problems.len());
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("exofs fsck: {}: {e}", image.display());
            ExitCode::from(4)
        }
    }
}

fn kind_char(mode: u32) -> char {
    match mode & libfs::format::S_IFMT {
        libfs::format::S_IFDIR => 'd',
        libfs::format::S_IFLNK => 'l',
        libfs::format::S_IFREG => '-',
        libfs::format::S_IFIFO => 'p',
        libfs::format::S_IFSOCK => 's',
        libfs::format::S_IFCHR => 'c',
        libfs::format::S_IFBLK => 'b',
        _ => '?',
    }
}

pub fn ls(image: &Path, path: &Path) -> Result<()> {
    let fs = Fs::open(image, &OpenOptions::read_only())?;
    let dir = fs.resolve(path)?;
    let mut out = std::io::stdout().lock();
    for entry in fs.list_dir(dir.ino)? {
        let attr = fs.getattr(entry.ino)?;
        writeln!(
            out,
            "{}{:o} {:>3} {:>5} {:>5} {:>12} {}",
            kind_char(attr.mode),
            attr.mode & 0o7777,
            attr.nlink,
            attr.uid,
            attr.gid,
            attr.size,
            String::from_utf8_lossy(&entry.name)
        )?;
    }
    Ok(())
}

pub fn put(image: &Path, source: &Path, path: &Path) -> Result<()> {
    let fs = Arc::new(Fs::open(image, &OpenOptions::default())?);
    {
        let mut input =
            std::fs::File::open(source).map_err(|e| format!("{}: {e}", source.display()))?;
        let mut file = libfs::File::create(&fs, path)?;
        std::io::copy(&mut input, &mut file)?;
        file.sync_all()?;
    }
    Arc::try_unwrap(fs)
        .map_err(|_| "file system still in use")?
        .close()?;
    Ok(())
}

pub fn get(image: &Path, path: &Path) -> Result<()> {
    let fs = Arc::new(Fs::open(image, &OpenOptions::read_only())?);
    let mut file = libfs::File::open(&fs, path)?;
    let mut data = Vec::new();
    file.read_to_end(&mut data)?;
    std::io::stdout().lock().write_all(&data)?;
    Ok(())
}

pub fn extents(image: &Path, path: &Path) -> Result<()> {
    let fs = Fs::open(image, &OpenOptions::read_only())?;
    let attr = fs.resolve(path)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "# {} ino {} generation {} size {}",
        path.as_os_str().to_string_lossy(),
        attr.ino,
        attr.generation,
        attr.size
    )?;
    for extent in fs.extents(attr.ino)? {
        let flag = if extent.unwritten { " unwritten" } else { "" };
        writeln!(
            out,
            "{} {} {}{flag}",
            extent.logical, extent.physical, extent.length
        )?;
    }
    Ok(())
}
