//! Loader: from a BPF ELF object to loaded, runnable BPF_PROG_TYPE_SYSCALL programs.
//!
//! Layer: kernel-ext, just above [`crate::sys`]. Parses with aya-obj, creates maps and loads
//! programs with `sys`, and hands out fd-owning handles ([`SyscallProgram`], [`MapHandle`]).
//!
//! Interface: [`Object::load`] loads every program of an object's `syscall` sections (the
//! libbpf section name for BPF_PROG_TYPE_SYSCALL), with its static callees from `.text`
//! linked in, after creating the object's maps (legacy `maps`, BTF `.maps`, `.data`,
//! `.rodata`, `.bss`) and relocating the map references. [`SyscallProgram::test_run`] runs a
//! program once on the calling thread with BPF_PROG_TEST_RUN.
//!
//! Invariants:
//! - Every kernel object is an `OwnedFd` in a handle: dropping the handle closes it. A map
//!   stays alive as long as a loaded program uses it, even after its handle is dropped.
//! - Nothing is pinned unless [`SyscallProgram::pin`] / [`MapHandle::pin`] is called; map
//!   definitions that ask for pinning are loaded unpinned, with a warning.
//! - aya-obj 0.3 refuses to parse an object with a `syscall` section (it knows no such
//!   program section). The loader therefore hands aya-obj a copy of the ELF in which those
//!   sections are renamed to [`ALIAS_SECTION`] (a name aya-obj accepts; the bytes of the
//!   program are untouched) and loads exactly the programs of those sections as syscall
//!   programs. Consequence: BTF func/line info of those sections is not matched (aya-obj
//!   keys it by section name). The loader does not use the object's BTF: each program is
//!   loaded with the BTF [`crate::btf`] synthesizes for its subprograms.
//! - Programs of any other program section are refused: this loader loads syscall
//!   programs only.
//! - aya-obj trusts the object it parses and panics on malformed ones; every object passes
//!   `elf_check` first, which refuses those with a [`LoadError::Malformed`].

use std::{
    collections::{BTreeMap, HashSet},
    ffi::{CStr, CString},
    mem::{size_of, MaybeUninit},
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::Path,
};

use aya::Pod;
use aya_obj::{generated::bpf_insn, maps::PinningType};

use crate::{
    btf::FuncBtf,
    elf_check::{self, ElfObject},
    sys::{self, MapSpec, SysError},
};

/// The libbpf section name of BPF_PROG_TYPE_SYSCALL programs.
pub const SYSCALL_SECTION: &str = "syscall";

/// The name `syscall` sections are given in the copy of the ELF that aya-obj parses. It
/// must be a program section aya-obj accepts and must not start with a name aya-obj treats
/// specially (`maps`, `.text`, `.data`, `license`, ...). aya-obj then believes it parsed
/// kprobes; the loader never uses that belief.
pub const ALIAS_SECTION: &str = "kprobe/exofs.syscall";

/// `BPF_MAP_TYPE_*` values of the per-CPU maps, whose values the kernel copies out once per
/// possible CPU; [`MapHandle`]'s accessors refuse them.
const PER_CPU_MAP_TYPES: [u32; 4] = [5, 6, 10, 21];

/// `BPF_MAP_TYPE_*` values of the local-storage maps (sk, inode, task, cgroup storage),
/// which the kernel creates only with BTF for their key and value.
const LOCAL_STORAGE_MAP_TYPES: [u32; 4] = [24, 28, 29, 32];

/// Maps, by name, whose value starts with a referenced kptr to a task (the driver's
/// daemon map): the kernel accepts `bpf_kptr_xchg` on the field only if the map was
/// created with BTF saying so ([`crate::btf::task_kptr_map_btf`]).
const TASK_KPTR_MAPS: &[&str] = &[exofs_abi::chain::MAP_DAEMON];

/// Why an object could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Not a 64-bit little-endian BPF ELF object, or a malformed one.
    #[error("not a usable BPF ELF object: {0}")]
    Elf(String),
    /// The object is malformed in a way aya-obj does not check (and would panic on); see
    /// `elf_check`. Names the section and what is wrong.
    #[error("malformed BPF object: {section}: {what}")]
    Malformed {
        /// The section (or symbol table) at fault.
        section: String,
        /// What is wrong with it.
        what: String,
    },
    /// aya-obj could not parse the object.
    #[error("parsing the BPF object: {0}")]
    Parse(#[from] aya_obj::ParseError),
    /// aya-obj could not relocate a map reference or a call.
    #[error("relocating the BPF object: {0}")]
    Relocation(#[from] aya_obj::relocation::EbpfRelocationError),
    /// The object has a program outside the `syscall` sections.
    #[error("program `{name}` is not in a `{SYSCALL_SECTION}` section; only syscall programs are loaded")]
    UnsupportedProgram {
        /// The program's name.
        name: String,
    },
    /// A call to a kernel function (kfunc) that cannot be made: unknown to the running
    /// kernel, referred to other than by a call, or in an object that may not call one.
    #[error("kernel function `{name}`: {why}")]
    Kfunc {
        /// The function's name.
        name: String,
        /// Why the call cannot be made.
        why: String,
    },
    /// A bpf(2) call failed (including a verifier refusal, which carries the log).
    #[error(transparent)]
    Sys(#[from] SysError),
    /// A map was used with a key or value of the wrong size, or with an accessor that does
    /// not support its type.
    #[error("map `{map}`: {what}")]
    MapAccess {
        /// The map's name.
        map: String,
        /// What was wrong.
        what: String,
    },
}

/// A loaded object: its syscall programs and its maps, by name.
#[derive(Debug)]
pub struct Object {
    programs: BTreeMap<String, SyscallProgram>,
    maps: BTreeMap<String, MapHandle>,
}

impl Object {
    /// Parses `elf`, creates its maps, relocates and loads every program of its `syscall`
    /// sections as a sleepable BPF_PROG_TYPE_SYSCALL program.
    pub fn load(elf: &[u8]) -> Result<Self, LoadError> {
        let mut linker = Linker::parse(elf, &[(SYSCALL_SECTION, ALIAS_SECTION)], Kfuncs::Resolve)?;
        let mut created: Vec<(String, MapHandle, aya_obj::Map)> = Vec::new();
        for (name, map) in linker.take_maps() {
            let handle = MapHandle::create(&name, &map)?;
            created.push((name, handle, map));
        }
        linker.relocate(
            created
                .iter()
                .map(|(name, handle, map)| (name.as_str(), handle.fd.as_raw_fd(), map)),
        )?;
        let mut programs = BTreeMap::new();
        for name in linker.program_names() {
            let linked = linker.linked(&name)?;
            let loaded = SyscallProgram::load_insns(&name, &linked.insns, &linked.license)?;
            programs.insert(name, loaded);
        }
        let maps = created
            .into_iter()
            .map(|(name, handle, _)| (name, handle))
            .collect();
        Ok(Self { programs, maps })
    }

    /// The program called `name` (the symbol name of its function).
    pub fn program(&self, name: &str) -> Option<&SyscallProgram> {
        self.programs.get(name)
    }

    /// The map called `name` (its symbol name, or `.data` / `.rodata` / `.bss`).
    pub fn map(&self, name: &str) -> Option<&MapHandle> {
        self.maps.get(name)
    }

    /// Names of the loaded programs.
    pub fn program_names(&self) -> impl Iterator<Item = &str> {
        self.programs.keys().map(String::as_str)
    }

    /// Names of the created maps.
    pub fn map_names(&self) -> impl Iterator<Item = &str> {
        self.maps.keys().map(String::as_str)
    }
}

/// One program after linking: its callees appended, map references resolved.
#[derive(Debug, Clone)]
pub struct Linked {
    /// Instructions, host-endian `struct bpf_insn` as u64 (see [`crate::sys`]).
    pub insns: Vec<u64>,
    /// The object's license.
    pub license: CString,
}

/// An object parsed by aya-obj, whose programs can be linked and relocated against maps
/// the caller chooses (created for it, or shared with other programs).
///
/// Program sections: sections named in `aliases` are renamed for aya-obj (see
/// [`alias_sections`]); every program must come from one of them.
pub(crate) struct Linker {
    obj: aya_obj::Object,
    text_sections: HashSet<usize>,
}

/// What a [`Linker`] does with calls to kernel functions (elf_check::externs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kfuncs {
    /// Resolve them against the running kernel's BTF (the trusted driver, objects loaded
    /// by root).
    Resolve,
    /// Refuse the object (applications: their code may call no kernel function).
    Refuse,
}

impl Linker {
    /// Parses `elf`, with the program sections in `aliases` (name, alias for aya-obj),
    /// and its calls to kernel functions as `kfuncs` says.
    pub(crate) fn parse(
        elf: &[u8],
        aliases: &[(&str, &str)],
        kfuncs: Kfuncs,
    ) -> Result<Self, LoadError> {
        let (aliased, program_sections) = alias_sections(elf, aliases, kfuncs)?;
        let obj = aya_obj::Object::parse(aliased.bytes())?;
        for (name, program) in &obj.programs {
            if !program_sections.contains(&program.section_index) {
                return Err(LoadError::UnsupportedProgram { name: name.clone() });
            }
        }
        let text_sections = obj.functions.keys().map(|(section, _)| *section).collect();
        Ok(Self { obj, text_sections })
    }

    /// The object's map definitions (legacy, BTF and data sections), by name. Taken once.
    pub(crate) fn take_maps(&mut self) -> Vec<(String, aya_obj::Map)> {
        self.obj.maps.drain().collect()
    }

    /// Names of the object's programs.
    pub(crate) fn program_names(&self) -> Vec<String> {
        self.obj.programs.keys().cloned().collect()
    }

    /// Makes the function called `name` (a global function of a text section) a program of
    /// its own, so that [`Self::relocate`] links it with its callees. False if there is no
    /// such function.
    pub(crate) fn adopt_function(&mut self, name: &str) -> bool {
        let Some(key) = self
            .obj
            .functions
            .iter()
            .find(|(_, function)| function.name == name)
            .map(|(key, _)| *key)
        else {
            return false;
        };
        self.obj.programs.insert(
            name.to_owned(),
            aya_obj::Program {
                license: CString::default(),
                kernel_version: None,
                section: aya_obj::ProgramSection::KProbe,
                section_index: key.0,
                address: key.1,
            },
        );
        true
    }

    /// Resolves every map reference against `maps` (name, fd, definition) and links each
    /// program with its callees.
    pub(crate) fn relocate<'a>(
        &mut self,
        maps: impl Iterator<Item = (&'a str, std::os::fd::RawFd, &'a aya_obj::Map)>,
    ) -> Result<(), LoadError> {
        self.obj.relocate_maps(maps, &self.text_sections)?;
        self.obj.relocate_calls(&self.text_sections)?;
        Ok(())
    }

    /// The linked program `name` (after [`Self::relocate`]).
    pub(crate) fn linked(&self, name: &str) -> Result<Linked, LoadError> {
        let (function, program) = self.function(name)?;
        Ok(Linked {
            insns: function.instructions.iter().map(encode_insn).collect(),
            license: program.license.clone(),
        })
    }

    fn function(&self, name: &str) -> Result<(&aya_obj::Function, &aya_obj::Program), LoadError> {
        let program = self
            .obj
            .programs
            .get(name)
            .ok_or_else(|| LoadError::Elf(format!("no program `{name}`")))?;
        let function = self
            .obj
            .functions
            .get(&program.function_key())
            .ok_or_else(|| {
                LoadError::Elf(format!("program `{name}` has no function after linking"))
            })?;
        Ok((function, program))
    }

    /// Where, in the linked program `program`, the callee named `callee` starts: found
    /// through the object's BTF (its FUNC type) and the func_info records aya-obj carries
    /// along when it appends callees.
    pub(crate) fn callee_start(&self, program: &str, callee: &str) -> Result<u32, LoadError> {
        let (function, _) = self.function(program)?;
        let btf =
            self.obj.btf.as_ref().ok_or_else(|| {
                LoadError::Elf("the object has no BTF (build it with --btf)".into())
            })?;
        let type_id = btf
            .id_by_type_name_kind(callee, aya_obj::btf::BtfKind::Func)
            .map_err(|_| LoadError::Elf(format!("no BTF FUNC `{callee}` in the object")))?;
        function
            .func_info
            .func_info
            .iter()
            .find(|info| info.type_id == type_id)
            .map(|info| info.insn_off)
            .ok_or_else(|| LoadError::Elf(format!("`{program}` does not call `{callee}`")))
    }
}

/// A loaded, sleepable BPF_PROG_TYPE_SYSCALL program.
#[derive(Debug)]
pub struct SyscallProgram {
    name: String,
    fd: OwnedFd,
    insn_count: Option<usize>,
}

impl SyscallProgram {
    /// Loads raw instructions (host-endian `struct bpf_insn` as u64, see [`crate::sys`]) as a
    /// sleepable syscall program. A verifier refusal is a [`SysError::Verifier`] with the log.
    pub fn load_insns(name: &str, insns: &[u64], license: &CStr) -> Result<Self, SysError> {
        let func_btf = FuncBtf::for_program(name, insns);
        let btf_fd = sys::btf_load(&func_btf.btf)?;
        let fd = sys::prog_load(&sys::ProgLoad {
            prog_type: sys::BPF_PROG_TYPE_SYSCALL,
            name,
            insns,
            license,
            prog_flags: sys::BPF_F_SLEEPABLE,
            btf: Some((btf_fd.as_fd(), &func_btf.func_info)),
        })?;
        Ok(Self {
            name: name.to_owned(),
            fd,
            insn_count: Some(insns.len()),
        })
    }

    /// Opens a syscall program pinned at `path` (not checked to be a syscall program: a
    /// test run of another type fails with EINVAL or runs with that type's semantics).
    pub fn from_pin(path: &Path, name: &str) -> Result<Self, SysError> {
        Ok(Self {
            name: name.to_owned(),
            fd: sys::obj_get(path)?,
            insn_count: None,
        })
    }

    /// The program's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Instructions loaded (after linking), if this handle loaded the program.
    pub fn insn_count(&self) -> Option<usize> {
        self.insn_count
    }

    /// Runs the program once on this thread with `ctx` as its context (copied in, and
    /// written back with the program's changes). Returns the program's return value.
    pub fn test_run(&self, ctx: &mut [u8]) -> Result<u32, SysError> {
        sys::prog_test_run_syscall(self.fd.as_fd(), ctx)
    }

    /// [`Self::test_run`] with a `#[repr(C)]` context type from exofs-abi.
    pub fn test_run_pod<T: Pod>(&self, ctx: &mut T) -> Result<u32, SysError> {
        // SAFETY: `T: Pod` guarantees every byte of a `T` is initialized and that any byte
        // pattern the kernel writes back is a valid `T`; the slice covers exactly `*ctx`,
        // which is exclusively borrowed for its lifetime.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(std::ptr::from_mut(ctx).cast::<u8>(), size_of::<T>())
        };
        self.test_run(bytes)
    }

    /// Pins the program at `path` on a bpffs mount.
    pub fn pin(&self, path: &Path) -> Result<(), SysError> {
        sys::obj_pin(self.fd.as_fd(), path)
    }
}

impl AsFd for SyscallProgram {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A BPF map created by the loader (or opened from a pin), with its geometry.
#[derive(Debug)]
pub struct MapHandle {
    name: String,
    fd: OwnedFd,
    spec: MapSpec,
}

impl MapHandle {
    /// The geometry an object's map definition asks for.
    fn spec_of(map: &aya_obj::Map) -> MapSpec {
        // aya-obj already gives `.rodata` maps BPF_F_RDONLY_PROG.
        MapSpec {
            map_type: map.map_type(),
            key_size: map.key_size(),
            value_size: map.value_size(),
            max_entries: map.max_entries(),
            map_flags: map.map_flags(),
        }
    }

    /// Opens the map pinned at `path` for the object's map `name` defined by `map`; its
    /// geometry must be the definition's (the kernel's BPF_OBJ_GET_INFO_BY_FD is not
    /// consulted: a pin of another map of the same type and sizes is not told apart).
    pub(crate) fn open_pinned(
        path: &Path,
        name: &str,
        map: &aya_obj::Map,
    ) -> Result<Self, LoadError> {
        Ok(Self::from_pin(path, name, Self::spec_of(map))?)
    }

    /// Creates the map `map` of an object and writes its initial data (data sections).
    pub(crate) fn create(name: &str, map: &aya_obj::Map) -> Result<Self, LoadError> {
        Self::create_with_entries(name, map, map.max_entries())
    }

    /// As [`MapHandle::create`], with `max_entries` entries instead of the definition's.
    pub(crate) fn create_with_entries(
        name: &str,
        map: &aya_obj::Map,
        max_entries: u32,
    ) -> Result<Self, LoadError> {
        let spec = MapSpec {
            max_entries,
            ..Self::spec_of(map)
        };
        if map.pinning() != PinningType::None {
            log::warn!("map `{name}` asks to be pinned; loading it unpinned (pin explicitly)");
        }
        let btf = if LOCAL_STORAGE_MAP_TYPES.contains(&spec.map_type) {
            Some(crate::btf::map_btf(spec.value_size))
        } else if TASK_KPTR_MAPS.contains(&name) {
            Some(crate::btf::task_kptr_map_btf(spec.value_size))
        } else {
            None
        };
        let fd = if let Some((btf, key_type_id, value_type_id)) = btf {
            let btf = sys::btf_load(&btf)?;
            let map_btf = sys::MapBtf {
                btf: btf.as_fd(),
                key_type_id,
                value_type_id,
            };
            sys::map_create(&spec, name, Some(map_btf))?
        } else {
            sys::map_create(&spec, name, None)?
        };
        let handle = Self {
            name: name.to_owned(),
            fd,
            spec,
        };
        let data = map.data();
        if !data.is_empty() {
            handle.update(&0u32.to_ne_bytes(), data, sys::BPF_ANY)?;
        }
        Ok(handle)
    }

    /// Opens a map pinned at `path`; `spec` must be its geometry (it is trusted, and it
    /// sizes the buffers of every later lookup and update).
    pub fn from_pin(path: &Path, name: &str, spec: MapSpec) -> Result<Self, SysError> {
        Ok(Self {
            name: name.to_owned(),
            fd: sys::obj_get(path)?,
            spec,
        })
    }

    /// The map's name in the object.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The map's type, key and value sizes, entries and flags.
    pub fn spec(&self) -> MapSpec {
        self.spec
    }

    fn check_sizes(&self, key: usize, value: usize) -> Result<(), LoadError> {
        if PER_CPU_MAP_TYPES.contains(&self.spec.map_type) {
            return Err(self.access_error("per-CPU maps have no accessor yet".to_owned()));
        }
        if LOCAL_STORAGE_MAP_TYPES.contains(&self.spec.map_type) {
            return Err(self.access_error("local-storage maps have no accessor".to_owned()));
        }
        if key != self.spec.key_size as usize || value != self.spec.value_size as usize {
            return Err(self.access_error(format!(
                "key/value of {key}/{value} bytes, the map's are {}/{}",
                self.spec.key_size, self.spec.value_size
            )));
        }
        Ok(())
    }

    fn access_error(&self, what: String) -> LoadError {
        LoadError::MapAccess {
            map: self.name.clone(),
            what,
        }
    }

    /// Copies the value at `key` into `value`; `Ok(false)` if there is none.
    pub fn lookup(&self, key: &[u8], value: &mut [u8]) -> Result<bool, LoadError> {
        self.check_sizes(key.len(), value.len())?;
        // SAFETY: check_sizes proved the buffers have the map's key and value sizes, and
        // the map is not per-CPU, so the kernel's accesses stay inside them.
        Ok(unsafe { sys::map_lookup_elem(self.fd.as_fd(), key, value) }?)
    }

    /// Writes `value` at `key` with `flags` (`sys::BPF_ANY`, ...).
    pub fn update(&self, key: &[u8], value: &[u8], flags: u64) -> Result<(), LoadError> {
        self.check_sizes(key.len(), value.len())?;
        // SAFETY: as in `lookup`.
        Ok(unsafe { sys::map_update_elem(self.fd.as_fd(), key, value, flags) }?)
    }

    /// Every key of the map, in the kernel's order.
    pub fn keys<K: Pod>(&self) -> Result<Vec<K>, LoadError> {
        if size_of::<K>() != self.spec.key_size as usize {
            return Err(self.access_error(format!(
                "keys of {} bytes, the map's are {}",
                size_of::<K>(),
                self.spec.key_size
            )));
        }
        let mut keys: Vec<K> = Vec::new();
        loop {
            let mut next = MaybeUninit::<K>::zeroed();
            // SAFETY: a zeroed `K: Pod` is initialized, so viewing it as bytes is sound.
            let next_bytes = unsafe {
                std::slice::from_raw_parts_mut(next.as_mut_ptr().cast::<u8>(), size_of::<K>())
            };
            let previous = keys.last().map(pod_bytes);
            // SAFETY: `previous` and `next_bytes` have the map's key size (checked above).
            if !unsafe { sys::map_get_next_key(self.fd.as_fd(), previous, next_bytes) }? {
                return Ok(keys);
            }
            // SAFETY: zeroed, then overwritten with a key; every byte pattern is a `K`.
            keys.push(unsafe { next.assume_init() });
        }
    }

    /// Removes `key`; `Ok(false)` if there was none.
    pub fn delete_bytes(&self, key: &[u8]) -> Result<bool, LoadError> {
        self.check_sizes(key.len(), self.spec.value_size as usize)?;
        // SAFETY: check_sizes proved the key has the map's key size.
        Ok(unsafe { sys::map_delete_elem(self.fd.as_fd(), key) }?)
    }

    /// Typed [`Self::delete_bytes`].
    pub fn delete<K: Pod>(&self, key: &K) -> Result<bool, LoadError> {
        self.delete_bytes(pod_bytes(key))
    }

    /// The per-CPU values of element `index` of a per-CPU array of u64, summed.
    pub fn sum_percpu_u64(&self, index: u32) -> Result<u64, LoadError> {
        Ok(self
            .percpu_u64(index)?
            .chunks_exact(8)
            .map(|chunk| u64::from_ne_bytes(chunk.try_into().unwrap_or([0; 8])))
            .fold(0u64, u64::wrapping_add))
    }

    /// Adds `delta` to CPU 0's value of element `index` of a per-CPU array of u64. A
    /// read-modify-write of the whole element from user space: only for elements no
    /// program writes, by callers that serialise their own updates.
    pub fn add_percpu_u64(&self, index: u32, delta: u64) -> Result<(), LoadError> {
        let mut values = self.percpu_u64(index)?;
        let first = u64::from_ne_bytes(values[..8].try_into().unwrap_or([0; 8]));
        values[..8].copy_from_slice(&first.wrapping_add(delta).to_ne_bytes());
        // SAFETY: as in `percpu_u64`: one value per possible CPU, a u32 key.
        Ok(unsafe {
            sys::map_update_elem(
                self.fd.as_fd(),
                &index.to_ne_bytes(),
                &values,
                sys::BPF_EXIST,
            )
        }?)
    }

    /// The raw per-CPU values (8 bytes per possible CPU) of element `index`.
    fn percpu_u64(&self, index: u32) -> Result<Vec<u8>, LoadError> {
        const PERCPU_ARRAY: u32 = 6;
        if self.spec.map_type != PERCPU_ARRAY || self.spec.value_size != 8 {
            return Err(self.access_error("not a per-CPU array of u64".to_owned()));
        }
        let cpus = possible_cpus().map_err(|err| self.access_error(err))?;
        let mut values = vec![0u8; 8 * cpus];
        // SAFETY: a per-CPU array's lookup copies value_size (8, rounded to 8) bytes per
        // possible CPU: exactly `values`; the key is a u32 index, the array's key size.
        let found =
            unsafe { sys::map_lookup_elem(self.fd.as_fd(), &index.to_ne_bytes(), &mut values) }?;
        if !found {
            return Err(self.access_error(format!("no index {index}")));
        }
        Ok(values)
    }

    /// Typed [`Self::lookup`].
    pub fn get<K: Pod, V: Pod>(&self, key: &K) -> Result<Option<V>, LoadError> {
        let mut value = MaybeUninit::<V>::zeroed();
        // SAFETY: a zeroed `V: Pod` is initialized, so viewing it as bytes is sound, and
        // any bytes the kernel writes leave it a valid `V`.
        let value_bytes = unsafe {
            std::slice::from_raw_parts_mut(value.as_mut_ptr().cast::<u8>(), size_of::<V>())
        };
        if self.lookup(pod_bytes(key), value_bytes)? {
            // SAFETY: zero-initialized above and then overwritten with map bytes; every
            // byte pattern is a valid `V` (`Pod`).
            Ok(Some(unsafe { value.assume_init() }))
        } else {
            Ok(None)
        }
    }

    /// Typed [`Self::update`].
    pub fn set<K: Pod, V: Pod>(&self, key: &K, value: &V, flags: u64) -> Result<(), LoadError> {
        self.update(pod_bytes(key), pod_bytes(value), flags)
    }

    /// Pins the map at `path` on a bpffs mount.
    pub fn pin(&self, path: &Path) -> Result<(), SysError> {
        sys::obj_pin(self.fd.as_fd(), path)
    }
}

impl AsFd for MapHandle {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Number of possible CPUs (`/sys/devices/system/cpu/possible`, e.g. `0-1`): how many
/// values a per-CPU map lookup returns.
fn possible_cpus() -> Result<usize, String> {
    const PATH: &str = "/sys/devices/system/cpu/possible";
    let text = std::fs::read_to_string(PATH).map_err(|err| format!("{PATH}: {err}"))?;
    let mut highest = None;
    for range in text.trim().split(',') {
        let last = range.rsplit('-').next().unwrap_or(range);
        let last: usize = last
            .parse()
            .map_err(|_| format!("{PATH}: unexpected `{}`", text.trim()))?;
        highest = Some(highest.map_or(last, |h: usize| h.max(last)));
    }
    highest
        .map(|h| h + 1)
        .ok_or_else(|| format!("{PATH} is empty"))
}

fn pod_bytes<T: Pod>(value: &T) -> &[u8] {
    exofs_abi::bytes::of(value)
}

/// The host-endian (little-endian, see `sys`) u64 form of one instruction.
fn encode_insn(insn: &bpf_insn) -> u64 {
    u64::from(insn.code)
        | u64::from(insn.dst_reg() & 0xf) << 8
        | u64::from(insn.src_reg() & 0xf) << 12
        | u64::from(insn.off as u16) << 16
        | u64::from(insn.imm as u32) << 32
}

/// Bytes in 8-byte aligned storage: the `object` crate reads ELF headers in place and
/// refuses misaligned input, while `include_bytes!` data has no alignment.
#[derive(Debug)]
struct AlignedBytes {
    words: Vec<u64>,
    len: usize,
}

impl AlignedBytes {
    fn new(bytes: &[u8]) -> Self {
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        for (word, chunk) in words.iter_mut().zip(bytes.chunks(8)) {
            let mut buf = [0u8; 8];
            buf[..chunk.len()].copy_from_slice(chunk);
            *word = u64::from_ne_bytes(buf);
        }
        Self {
            words,
            len: bytes.len(),
        }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `words` holds at least `len` initialized bytes (it was sized with
        // div_ceil), u8 has no alignment requirement, and the slice borrows `self`.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
    }
}

/// Returns an aligned copy of `elf` in which every section named like the first of a pair
/// of `aliases` is given the second name, and the indices of those sections.
///
/// The section-name string table is copied to the end of the file with the alias appended,
/// and only section headers change (the table's offset and size, the renamed sections'
/// `sh_name`): every other offset in the file, and every other name (symbols share the
/// table in LLVM's output), stays as it was.
///
/// Calls to kernel functions are resolved in the copy, or refused, as `kfuncs` says.
fn alias_sections(
    elf: &[u8],
    aliases: &[(&str, &str)],
    kfuncs: Kfuncs,
) -> Result<(AlignedBytes, HashSet<usize>), LoadError> {
    let object = ElfObject::parse(elf)?;
    elf_check::check(&object)?;
    let calls = elf_check::externs::extern_calls(&object)?;
    if let (Some(call), Kfuncs::Refuse) = (calls.first(), kfuncs) {
        return Err(LoadError::Kfunc {
            name: call.name.clone(),
            why: "this object may call no kernel function".to_owned(),
        });
    }

    // Section index -> index of its alias in `aliases`.
    let mut renamed: BTreeMap<usize, usize> = BTreeMap::new();
    for (index, section) in object.sections.iter().enumerate() {
        if let Some(alias) = aliases
            .iter()
            .position(|(from, _)| section.name == from.as_bytes())
        {
            renamed.insert(index, alias);
        }
    }
    let sections: HashSet<usize> = renamed.keys().copied().collect();
    if renamed.is_empty() && calls.is_empty() {
        return Ok((AlignedBytes::new(elf), sections));
    }

    let mut out = elf.to_vec();
    elf_check::externs::resolve(&mut out, &calls, &crate::btf::vmlinux_func_id)?;
    let new_strtab_off = out.len();
    out.extend_from_slice(object.names);
    let mut alias_offsets = Vec::with_capacity(aliases.len());
    for (_, alias) in aliases {
        let offset = u32::try_from(out.len() - new_strtab_off)
            .map_err(|_| LoadError::Elf("section name table too large".to_owned()))?;
        let alias = CString::new(*alias).map_err(|_| LoadError::Elf("alias".to_owned()))?;
        out.extend_from_slice(alias.as_bytes_with_nul());
        alias_offsets.push(offset);
    }
    let new_strtab_size = out.len() - new_strtab_off;
    let header = |index: usize| object.header_offset(index);
    let shstrndx = object.names_index;
    out[header(shstrndx) + 24..header(shstrndx) + 32]
        .copy_from_slice(&(new_strtab_off as u64).to_le_bytes());
    out[header(shstrndx) + 32..header(shstrndx) + 40]
        .copy_from_slice(&(new_strtab_size as u64).to_le_bytes());
    for (&index, &alias) in &renamed {
        out[header(index)..header(index) + 4].copy_from_slice(&alias_offsets[alias].to_le_bytes());
    }
    Ok((AlignedBytes::new(&out), sections))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliasing_renames_only_the_syscall_section() {
        let elf = crate::DRIVER_ELF;
        let (aliased, renamed) =
            alias_sections(elf, &[(SYSCALL_SECTION, ALIAS_SECTION)], Kfuncs::Resolve)
                .expect("alias");
        assert_eq!(renamed.len(), 1);
        let obj = aya_obj::Object::parse(aliased.bytes()).expect("aya-obj parses the alias");
        assert!(obj.programs.contains_key("exofs_probe"));
        assert!(obj.maps.contains_key("EXOFS_PROBE_STATS"));
    }

    /// The reason for the alias. If this starts failing, aya-obj learned `syscall` and
    /// `alias_syscall_sections` can go.
    #[test]
    fn aya_obj_refuses_syscall_sections() {
        let elf = AlignedBytes::new(crate::DRIVER_ELF);
        let err = aya_obj::Object::parse(elf.bytes()).expect_err("aya-obj 0.3 has no syscall");
        assert!(err.to_string().contains("syscall"), "{err}");
    }

    #[test]
    fn encodes_instructions_little_endian() {
        // r0 = *(u64 *)(r10 + 8) with imm -1: code 0x79, dst 0, src 10, off 8.
        let insn = bpf_insn {
            code: 0x79,
            _bitfield_align_1: [],
            _bitfield_1: bpf_insn::new_bitfield_1(0, 10),
            off: 8,
            imm: -1,
        };
        assert_eq!(encode_insn(&insn), 0xffff_ffff_0008_a079);
    }

    #[test]
    fn refuses_non_elf() {
        assert!(matches!(
            Object::load(b"not an elf"),
            Err(LoadError::Elf(_))
        ));
    }
}
