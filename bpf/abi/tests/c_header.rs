//! include/exofs.h must describe exactly the Rust types: this test compiles a program
//! against the header that prints every size and offset, and compares them with Rust's.

use exofs_abi::chain::{self, BatchCtx, BatchLookup, ChainCtx, ChainFile, HopState};
use exofs_abi::extents::{self, ExtentChunk, ExtentEntry, ExtentKey, FileInfo, FileKey};
use exofs_abi::formats::{self, btree::BtreeHeader, hash, list, Lookup};
use exofs_abi::ioctl;
use std::collections::BTreeMap;
use std::mem::{offset_of, size_of};
use std::process::Command;

macro_rules! layout {
    ($map:ident, $c:literal, $t:ty; $($rust:ident => $cfield:literal),* $(,)?) => {
        $map.insert(format!("sizeof {}", $c), size_of::<$t>() as i64);
        $( $map.insert(format!("offsetof {}.{}", $c, $cfield), offset_of!($t, $rust) as i64); )*
    };
}

fn rust_layout() -> BTreeMap<String, i64> {
    let mut map = BTreeMap::new();
    layout!(map, "exofs_chain_file", ChainFile; ino => "ino", generation => "generation");
    layout!(map, "exofs_chain_ctx", ChainCtx;
        files => "files", file_count => "file_count", hop_limit => "hop_limit",
        start_file => "start_file", read_len => "read_len", start_offset => "start_offset",
        map_addr => "map_addr", map_len => "map_len", subject_uid => "subject_uid",
        subject_gid => "subject_gid", subject_cgroup => "subject_cgroup", status => "status", hops => "hops",
        flags => "flags", start_hop => "start_hop", missing => "missing", scratch => "scratch");
    layout!(map, "exofs_hop_state", HopState;
        hop => "hop", file => "file", offset => "offset", data_len => "data_len",
        next_count => "next_count", next_file => "next_file", next_offset => "next_offset",
        scratch => "scratch", data => "data");
    layout!(map, "exofs_file_key", FileKey; ino => "ino");
    layout!(map, "exofs_file_info", FileInfo;
        generation => "generation", size => "size", chunk_shift => "chunk_shift", flags => "flags");
    layout!(map, "exofs_extent_key", ExtentKey; ino => "ino", chunk => "chunk");
    layout!(map, "exofs_extent_entry", ExtentEntry;
        logical => "logical", physical => "physical", length => "length", flags => "flags");
    layout!(map, "exofs_extent_chunk", ExtentChunk;
        count => "count", reserved => "reserved", extents => "extents");
    layout!(map, "exofs_batch_lookup", BatchLookup;
        start_file => "start_file", status => "status", start_offset => "start_offset",
        hops => "hops", start_hop => "start_hop", missing => "missing", scratch => "scratch");
    layout!(map, "exofs_batch_ctx", BatchCtx;
        files => "files", file_count => "file_count", hop_limit => "hop_limit",
        read_len => "read_len", count => "count", map_addr => "map_addr", map_len => "map_len",
        subject_uid => "subject_uid", subject_gid => "subject_gid", subject_cgroup => "subject_cgroup", flags => "flags",
        done => "done", lookups => "lookups");
    layout!(map, "exofs_chain_ioctl", ioctl::ChainIoctl;
        program => "program", start => "start", hop_limit => "hop_limit",
        read_len => "read_len", status => "status", hops => "hops", scratch => "scratch");
    layout!(map, "exofs_ioctl_lookup", ioctl::IoctlLookup;
        start => "start", status => "status", hops => "hops", scratch => "scratch");
    layout!(map, "exofs_batch_ioctl", ioctl::BatchIoctl;
        program => "program", hop_limit => "hop_limit", read_len => "read_len",
        count => "count", done => "done", lookups => "lookups");
    layout!(map, "exofs_policy_reload", ioctl::PolicyReload; message => "message");
    layout!(map, "exofs_direct_ioctl", ioctl::DirectIoctl;
        program => "program", ino => "ino", generation => "generation",
        max_hops => "max_hops", max_batch => "max_batch", chain_pin => "chain_pin",
        batch_pin => "batch_pin");
    map.insert("EXOFS_IOC_DIRECT".into(), i64::from(ioctl::IOC_DIRECT));
    map.insert("EXOFS_PIN_PATH_SIZE".into(), ioctl::PIN_PATH_SIZE as i64);
    map.insert(
        "EXOFS_STATUS_NO_DAEMON".into(),
        i64::from(chain::status::NO_DAEMON),
    );
    map.insert(
        "EXOFS_SUBJECT_NAMED".into(),
        i64::from(chain::SUBJECT_NAMED),
    );
    map.insert("EXOFS_TABLE_ONLY".into(), i64::from(chain::TABLE_ONLY));
    // The ioctl numbers as <sys/ioctl.h> computes them (unsigned: print as long).
    map.insert("EXOFS_IOC_CHAIN".into(), i64::from(ioctl::IOC_CHAIN));
    map.insert(
        "EXOFS_IOC_CHAIN_BATCH".into(),
        i64::from(ioctl::IOC_CHAIN_BATCH),
    );
    map.insert(
        "EXOFS_IOC_POLICY_RELOAD".into(),
        i64::from(ioctl::IOC_POLICY_RELOAD),
    );
    map.insert(
        "EXOFS_PROGRAM_NAME_SIZE".into(),
        ioctl::PROGRAM_NAME_SIZE as i64,
    );
    map.insert("EXOFS_MESSAGE_SIZE".into(), ioctl::MESSAGE_SIZE as i64);
    map.insert("EXOFS_IOCTL_TYPE".into(), i64::from(ioctl::IOCTL_TYPE));
    map.insert(
        "EXOFS_STATUS_MISSING".into(),
        i64::from(chain::status::MISSING),
    );
    map.insert(
        "EXOFS_BATCH_SCRATCH_SIZE".into(),
        chain::BATCH_SCRATCH_SIZE as i64,
    );
    map.insert("EXOFS_NO_FAULT".into(), i64::from(chain::NO_FAULT));
    layout!(map, "exofs_lookup", Lookup; key => "key", found => "found", value => "value");
    layout!(map, "exofs_sqlite_lookup", formats::sqlite::Lookup;
        rowid => "rowid", column => "column", page_size => "page_size", usable => "usable",
        phase => "phase", kind => "kind", length => "length", progress => "progress",
        value => "value", bytes => "bytes");
    for (name, value) in [
        ("EXOFS_SQLITE_MAX_BYTES", formats::sqlite::MAX_BYTES as i64),
        (
            "EXOFS_SQLITE_NOT_FOUND",
            i64::from(formats::sqlite::kind::NOT_FOUND),
        ),
        ("EXOFS_SQLITE_NULL", i64::from(formats::sqlite::kind::NULL)),
        (
            "EXOFS_SQLITE_INTEGER",
            i64::from(formats::sqlite::kind::INTEGER),
        ),
        ("EXOFS_SQLITE_REAL", i64::from(formats::sqlite::kind::REAL)),
        ("EXOFS_SQLITE_TEXT", i64::from(formats::sqlite::kind::TEXT)),
        ("EXOFS_SQLITE_BLOB", i64::from(formats::sqlite::kind::BLOB)),
        (
            "EXOFS_SQLITE_ABSENT",
            i64::from(formats::sqlite::kind::ABSENT),
        ),
        (
            "EXOFS_SQLITE_LENGTH_ONLY",
            i64::from(formats::sqlite::phase::LENGTH_ONLY),
        ),
    ] {
        map.insert(name.into(), value);
    }
    layout!(map, "exofs_btree_header", BtreeHeader;
        magic => "magic", level => "level", count => "count", node_size => "node_size",
        reserved => "reserved");
    layout!(map, "exofs_hash_entry", hash::Entry; next => "next", key => "key", value => "value");
    layout!(map, "exofs_list_node", list::Node; next => "next", key => "key", value => "value");
    map.insert("EXOFS_BTREE_MAGIC".into(), i64::from(formats::btree::MAGIC));
    map.insert(
        "EXOFS_BTREE_HEADER_SIZE".into(),
        formats::btree::HEADER_SIZE as i64,
    );
    map.insert(
        "EXOFS_BTREE_ENTRY_SIZE".into(),
        formats::btree::ENTRY_SIZE as i64,
    );
    map.insert(
        "EXOFS_HASH_BUCKETS_OFFSET".into(),
        hash::BUCKETS_OFFSET as i64,
    );
    map.insert("EXOFS_HASH_END".into(), hash::END as i64);
    map.insert("EXOFS_HASH_MAGIC".into(), hash::MAGIC as i64);
    layout!(map, "exofs_hash_header", hash::Header; magic => "magic", buckets => "buckets");
    map.insert("EXOFS_LIST_END".into(), list::END as i64);
    let constants: [(&str, i64); 23] = [
        ("EXOFS_BLOCK_SIZE", chain::BLOCK_SIZE as i64),
        ("EXOFS_MAX_HOPS", i64::from(chain::MAX_HOPS)),
        ("EXOFS_MAX_FANOUT", chain::MAX_FANOUT as i64),
        ("EXOFS_SCRATCH_SIZE", chain::SCRATCH_SIZE as i64),
        ("EXOFS_MAX_CHAIN_FILES", chain::MAX_CHAIN_FILES as i64),
        ("EXOFS_MAX_BATCH", chain::MAX_BATCH as i64),
        ("EXOFS_EXTENTS_PER_CHUNK", extents::EXTENTS_PER_CHUNK as i64),
        ("EXOFS_NEXT_DONE", i64::from(chain::NEXT_DONE)),
        ("EXOFS_NEXT_CONTINUE", i64::from(chain::NEXT_CONTINUE)),
        ("EXOFS_NEXT_ABORT", i64::from(chain::NEXT_ABORT)),
        ("EXOFS_STATUS_DONE", i64::from(chain::status::DONE)),
        ("EXOFS_STATUS_ABORTED", i64::from(chain::status::ABORTED)),
        (
            "EXOFS_STATUS_HOP_LIMIT",
            i64::from(chain::status::HOP_LIMIT),
        ),
        ("EXOFS_STATUS_STALE", i64::from(chain::status::STALE)),
        (
            "EXOFS_STATUS_OUT_OF_FILE",
            i64::from(chain::status::OUT_OF_FILE),
        ),
        ("EXOFS_STATUS_HOLE", i64::from(chain::status::HOLE)),
        (
            "EXOFS_STATUS_NOT_REGISTERED",
            i64::from(chain::status::NOT_REGISTERED),
        ),
        ("EXOFS_STATUS_DENIED", i64::from(chain::status::DENIED)),
        ("EXOFS_STATUS_FAULT", i64::from(chain::status::FAULT)),
        ("EXOFS_STATUS_INVALID", i64::from(chain::status::INVALID)),
        (
            "EXOFS_EXTENT_UNWRITTEN",
            i64::from(extents::EXTENT_UNWRITTEN),
        ),
        ("sizeof exofs_chain_ctx.scratch", chain::SCRATCH_SIZE as i64),
        ("sizeof exofs_hop_state.data", chain::BLOCK_SIZE as i64),
    ];
    for (name, value) in constants {
        map.insert(name.to_string(), value);
    }
    map
}

/// The C program: one `printf` per entry Rust knows, named the same way.
fn c_program(names: &BTreeMap<String, i64>) -> String {
    let mut body = String::new();
    for name in names.keys() {
        let expression = if let Some(rest) = name.strip_prefix("offsetof ") {
            let (ty, field) = rest.split_once('.').expect("type.field");
            format!("(long)offsetof(struct {ty}, {field})")
        } else if let Some(rest) = name.strip_prefix("sizeof ") {
            match rest.split_once('.') {
                Some((ty, field)) => format!("(long)sizeof(((struct {ty} *)0)->{field})"),
                None => format!("(long)sizeof(struct {rest})"),
            }
        } else {
            format!("(long)({name})")
        };
        body.push_str(&format!(
            "    printf(\"%s=%ld\\n\", \"{name}\", {expression});\n"
        ));
    }
    format!("#include <stddef.h>\n#include <stdio.h>\n#include <sys/ioctl.h>\n#include \"exofs.h\"\nint main(void) {{\n{body}    return 0;\n}}\n")
}

#[test]
fn c_header_matches_the_rust_types() {
    let rust = rust_layout();
    let dir = std::env::temp_dir().join(format!("exofs-c-header-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let source = dir.join("layout.c");
    let binary = dir.join("layout");
    std::fs::write(&source, c_program(&rust)).expect("write C source");
    let include = concat!(env!("CARGO_MANIFEST_DIR"), "/include");
    let compiled = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Werror", "-I", include, "-o"])
        .arg(&binary)
        .arg(&source)
        .output()
        .expect("run cc (gcc or clang must be installed)");
    assert!(
        compiled.status.success(),
        "the header does not compile: {}",
        String::from_utf8_lossy(&compiled.stderr)
    );
    let output = Command::new(&binary)
        .output()
        .expect("run the layout program");
    let _ = std::fs::remove_dir_all(&dir);
    let c: BTreeMap<String, i64> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| (name.to_string(), value.parse().expect("number")))
        .collect();
    let differences: Vec<String> = rust
        .iter()
        .filter(|(name, value)| c.get(*name) != Some(value))
        .map(|(name, value)| format!("{name}: Rust {value}, C {:?}", c.get(name)))
        .collect();
    assert!(
        differences.is_empty(),
        "include/exofs.h differs from the Rust ABI:\n{}",
        differences.join("\n")
    );
    assert_eq!(c.len(), rust.len());
}
