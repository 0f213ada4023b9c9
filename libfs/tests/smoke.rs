//! Basic end-to-end behaviour of the API on an in-memory device.

use libfs::{format, FormatOptions, Fs, MemDevice, OpenOptions, RenameMode, SetAttr, ROOT_INO};
use std::sync::Arc;

fn fresh(size: u64) -> Arc<MemDevice> {
    let device = Arc::new(MemDevice::new(size));
    format(device.clone(), &FormatOptions::default()).expect("format");
    device
}

#[test]
fn create_write_read_reopen() {
    let device = fresh(16 << 20);
    let fs = Fs::open_device(device.clone(), &OpenOptions::default()).expect("open");
    let file = fs
        .create(ROOT_INO, b"a.txt", 0o644, 1000, 1000)
        .expect("create");
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(fs.write_at(file.ino, 10, &data).expect("write"), data.len());
    let dir = fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0).expect("mkdir");
    fs.link(file.ino, dir.ino, b"b.txt").expect("link");
    fs.close().expect("close");

    let fs = Fs::open_device(device, &OpenOptions::default()).expect("reopen");
    let attr = fs.lookup(ROOT_INO, b"a.txt").expect("lookup");
    assert_eq!(attr.size, 100_010);
    assert_eq!(attr.nlink, 2);
    let mut back = vec![0u8; 100_010];
    assert_eq!(fs.read_at(attr.ino, 0, &mut back).expect("read"), 100_010);
    assert_eq!(&back[..10], &[0u8; 10]);
    assert_eq!(&back[10..], &data[..]);
    let names: Vec<Vec<u8>> = fs
        .list_dir(ROOT_INO)
        .expect("readdir")
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names.len(), 2);
    fs.rename(dir.ino, b"b.txt", ROOT_INO, b"c.txt", RenameMode::Replace)
        .expect("rename");
    assert_eq!(fs.getattr(dir.ino).expect("dir").size, 0);
    fs.rmdir(ROOT_INO, b"d").expect("rmdir");
    fs.setattr(
        attr.ino,
        &SetAttr {
            size: Some(5000),
            ..SetAttr::default()
        },
    )
    .expect("truncate");
    fs.unlink(ROOT_INO, b"a.txt").expect("unlink");
    assert_eq!(fs.getattr(attr.ino).expect("still linked").nlink, 1);
    fs.unlink(ROOT_INO, b"c.txt").expect("unlink last");
    assert!(fs.getattr(attr.ino).is_err());
    fs.close().expect("close");
}

#[test]
fn unsynced_work_survives_only_if_committed() {
    let device = fresh(8 << 20);
    let fs = Fs::open_device(device.clone(), &OpenOptions::default()).expect("open");
    fs.create(ROOT_INO, b"kept", 0o644, 0, 0).expect("create");
    fs.sync().expect("sync");
    // Simulate a crash: copy the device without closing.
    let crashed = Arc::new(MemDevice::from_bytes(device.snapshot()));
    std::mem::forget(fs);
    let fs = Fs::open_device(crashed, &OpenOptions::default()).expect("recover");
    fs.lookup(ROOT_INO, b"kept").expect("synced file present");
}

#[test]
fn second_read_write_open_is_refused() {
    let path = std::env::temp_dir().join(format!("exofs-smoke-{}.img", std::process::id()));
    let device = libfs::FileDevice::create(&path, 8 << 20).expect("create image");
    format(Arc::new(device), &FormatOptions::default()).expect("format");
    let first = Fs::open(&path, &OpenOptions::default()).expect("first open");
    let second = Fs::open(&path, &OpenOptions::default());
    let message = second
        .expect_err("second read-write open must fail")
        .to_string();
    assert!(message.contains("already open"), "unclear error: {message}");
    assert!(
        Fs::open(&path, &OpenOptions::read_only()).is_err(),
        "read-only open while a writer holds it"
    );
    first.close().expect("close");
    Fs::open(&path, &OpenOptions::default())
        .expect("open after close")
        .close()
        .expect("close");
    std::fs::remove_file(&path).expect("remove image");
}

/// Block 0 and the journal header are the two blocks rewritten in place: a torn write of
/// either must not make the image unopenable or lose synced work.
#[test]
fn torn_superblock_or_journal_header_recovers() {
    let device = fresh(8 << 20);
    let fs = Fs::open_device(device.clone(), &OpenOptions::default()).expect("open");
    fs.create(ROOT_INO, b"synced", 0o644, 0, 0).expect("create");
    fs.sync().expect("sync");
    let image = device.snapshot();
    std::mem::forget(fs);

    // Half of block 0 lost (the open above logged a new superblock and wrote it home).
    let mut torn_super = image.clone();
    torn_super[2048..4096].fill(0);
    let fs = Fs::open_device(
        Arc::new(MemDevice::from_bytes(torn_super)),
        &OpenOptions::default(),
    )
    .expect("open with a torn superblock");
    fs.lookup(ROOT_INO, b"synced")
        .expect("synced file after torn superblock");
    fs.close().expect("close");

    // The journal header (block 1) torn.
    let mut torn_header = image;
    torn_header[4096 + 100..4096 + 200].fill(0xff);
    let torn = Arc::new(MemDevice::from_bytes(torn_header));
    let fs = Fs::open_device(torn.clone(), &OpenOptions::default())
        .expect("open with a torn journal header");
    fs.lookup(ROOT_INO, b"synced")
        .expect("synced file after torn header");
    fs.create(ROOT_INO, b"after", 0o644, 0, 0)
        .expect("create after recovery");
    fs.close().expect("close");
    let fs = Fs::open_device(torn, &OpenOptions::default()).expect("reopen");
    fs.lookup(ROOT_INO, b"after")
        .expect("work after recovery persists");
}

#[test]
fn file_handles_read_write_seek_append() {
    use std::io::{Read, Seek, SeekFrom, Write};
    let device = fresh(8 << 20);
    let fs = Arc::new(Fs::open_device(device, &OpenOptions::default()).expect("open"));
    let mut file = libfs::File::create(&fs, "/notes".as_ref()).expect("create");
    file.write_all(b"hello world").expect("write");
    assert_eq!(file.seek(SeekFrom::Start(6)).expect("seek"), 6);
    file.write_all(b"WORLD").expect("overwrite");
    assert_eq!(file.seek(SeekFrom::End(-5)).expect("seek from end"), 6);
    let mut tail = String::new();
    file.read_to_string(&mut tail).expect("read");
    assert_eq!(tail, "WORLD");
    assert!(
        file.seek(SeekFrom::Current(-100)).is_err(),
        "negative position"
    );
    file.set_append(true);
    file.seek(SeekFrom::Start(0)).expect("seek");
    file.write_all(b"!").expect("append");
    file.sync_all().expect("fsync");
    drop(file);
    let mut all = String::new();
    libfs::File::open(&fs, "/notes".as_ref())
        .expect("open")
        .read_to_string(&mut all)
        .expect("read");
    assert_eq!(all, "hello WORLD!");
    // An unlinked file stays usable through its handle, and is freed when it closes.
    let mut open = libfs::File::open(&fs, "/notes".as_ref()).expect("open");
    fs.unlink(ROOT_INO, b"notes").expect("unlink");
    let ino = open.ino();
    open.write_all(b"still here").expect("write after unlink");
    assert_eq!(fs.getattr(ino).expect("alive while open").nlink, 0);
    drop(open);
    assert!(fs.getattr(ino).is_err(), "freed on last close");
}

/// Appends from several threads at once never land on each other: every record ends up in
/// the file exactly once, whole. (Reading the size and then writing, as two calls, loses
/// records when two appenders read the same size.)
#[test]
fn concurrent_appends_never_overlap() {
    const THREADS: u8 = 4;
    const RECORDS: usize = 2000;
    const RECORD: usize = 100;
    let fs = Arc::new(Fs::open_device(fresh(16 << 20), &OpenOptions::default()).expect("open"));
    let ino = fs
        .create(ROOT_INO, b"log", 0o644, 0, 0)
        .expect("create")
        .ino;
    let start = std::sync::Barrier::new(THREADS as usize);
    std::thread::scope(|scope| {
        for writer in 0..THREADS {
            let (fs, start) = (&fs, &start);
            scope.spawn(move || {
                let record = vec![b'a' + writer; RECORD];
                start.wait();
                for _ in 0..RECORDS {
                    let (_, written) = fs.append(ino, &record).expect("append");
                    assert_eq!(written, RECORD);
                }
            });
        }
    });
    let size = fs.getattr(ino).expect("getattr").size as usize;
    assert_eq!(size, THREADS as usize * RECORDS * RECORD);
    let mut contents = vec![0u8; size];
    assert_eq!(fs.read_at(ino, 0, &mut contents).expect("read"), size);
    let mut per_writer = [0usize; THREADS as usize];
    for record in contents.chunks(RECORD) {
        assert!(
            record.iter().all(|&byte| byte == record[0]),
            "a record was torn"
        );
        per_writer[(record[0] - b'a') as usize] += 1;
    }
    assert_eq!(per_writer, [RECORDS; THREADS as usize]);
}

/// Sets its flag when dropped.
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A device whose large reads take a millisecond: a read planned under the lock then
/// reads its blocks long after, while the writer frees and reuses them.
#[derive(Debug)]
struct SlowReads(Arc<MemDevice>);

impl libfs::BlockDevice for SlowReads {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if buf.len() >= 64 << 10 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.write_at(buf, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.0.sync()
    }
    fn size(&self) -> u64 {
        self.0.size()
    }
}

/// Reads run outside the file-system lock; a read concurrent with a truncate whose blocks
/// are at once reused by another file must still never return that file's bytes (the
/// read's epoch pin holds them back).
#[test]
fn reads_outside_the_lock_never_see_reused_blocks() {
    let device = Arc::new(SlowReads(fresh(8 << 20)));
    let fs = Arc::new(Fs::open_device(device, &OpenOptions::default()).expect("open"));
    let victim = fs
        .create(ROOT_INO, b"victim", 0o644, 0, 0)
        .expect("create")
        .ino;
    fs.write_at(victim, 0, &vec![b'v'; 256 << 10])
        .expect("write victim");
    // Fill the device so that the blocks the victim frees are the only ones to reuse.
    let filler = fs
        .create(ROOT_INO, b"filler", 0o644, 0, 0)
        .expect("create")
        .ino;
    fs.checkpoint().expect("checkpoint");
    let free = fs.statfs().expect("statfs").free_blocks;
    let keep = 64 + 16;
    fs.fallocate(filler, 0, (free - keep) * 4096, Default::default())
        .expect("fill");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let reads = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| {
                let mut buf = vec![0u8; 256 << 10];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let n = fs.read_at(victim, 0, &mut buf).expect("read");
                    if let Some(bad) = buf[..n].iter().position(|&b| b != b'v' && b != 0) {
                        panic!(
                            "a read of {n} bytes returned byte {:?} at {bad}: another file's",
                            buf[bad] as char
                        );
                    }
                    reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    // The lock is not fair: give the writer its turn.
                    std::thread::sleep(std::time::Duration::from_micros(50));
                }
            });
        }
        // Stops the readers even if a step below panics (else the scope waits forever).
        let _stop = StopOnDrop(&stop);
        // Out of space while a read pins the freed blocks is the pin working.
        let tolerate = |result: libfs::Result<usize>| match result {
            Ok(_) | Err(libfs::Error::NoSpace) => {}
            Err(err) => panic!("{err}"),
        };
        for round in 0..300 {
            tolerate(fs.write_at(victim, 0, &vec![b'v'; 256 << 10]));
            std::thread::sleep(std::time::Duration::from_micros(500));
            fs.setattr(
                victim,
                &SetAttr {
                    size: Some(0),
                    ..SetAttr::default()
                },
            )
            .expect("truncate");
            // Make the freed blocks reusable and fill them with another file.
            fs.checkpoint().expect("checkpoint");
            fs.reclaim();
            let name = format!("other{round}");
            if let Ok(other) = fs.create(ROOT_INO, name.as_bytes(), 0o644, 0, 0) {
                tolerate(fs.write_at(other.ino, 0, &vec![b'X'; 256 << 10]));
                fs.unlink(ROOT_INO, name.as_bytes()).expect("unlink");
            }
        }
    });
    assert!(reads.load(std::sync::atomic::Ordering::Relaxed) > 10);
}
