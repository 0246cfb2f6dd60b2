//! The few bpf(2) link commands aya 0.16 does not expose for links reopened from bpffs:
//! taking a pinned link, asking which cgroup and program it holds, swapping its program
//! atomically, and detaching it; what else is attached to a cgroup (`coexist`); and for map
//! migrations, what a map or program is and an atomic swap of two pin directories.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_PROG_QUERY: libc::c_long = 16;
/// Update only if the link still runs `old_prog_fd`: two agents never undo each other.
const BPF_F_REPLACE: u32 = 1 << 2;
pub const BPF_LINK_TYPE_CGROUP: u32 = 3;

/// Large enough for every command used here; the kernel requires unused bytes to be zero.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Attr([0; 128])
    }
    fn u32_at(mut self, off: usize, v: u32) -> Self {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64_at(mut self, off: usize, v: u64) -> Self {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<i64> {
    // SAFETY: `attr` is a zero-initialised bpf_attr of the size we pass.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut Attr, size_of::<Attr>()) };
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

fn fd_result(ret: i64) -> OwnedFd {
    // SAFETY: the kernel just returned this new descriptor to us.
    unsafe { OwnedFd::from_raw_fd(ret as i32) }
}

fn c_path(path: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt as _;
    CString::new(path.as_os_str().as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// A new cgroup link: `prog` runs for `attach_type` in `cgroup` and its descendants, next to
/// programs others attached (links are always multi-attach for cgroups).
pub fn link_create(prog: BorrowedFd<'_>, cgroup: BorrowedFd<'_>, attach_type: u32) -> io::Result<OwnedFd> {
    let mut a = Attr::new()
        .u32_at(0, prog.as_raw_fd() as u32)
        .u32_at(4, cgroup.as_raw_fd() as u32)
        .u32_at(8, attach_type);
    bpf(BPF_LINK_CREATE, &mut a).map(fd_result)
}

pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let p = c_path(path)?;
    let mut a = Attr::new().u64_at(0, p.as_ptr() as u64).u32_at(8, fd.as_raw_fd() as u32);
    bpf(BPF_OBJ_PIN, &mut a).map(drop)
}

pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let p = c_path(path)?;
    let mut a = Attr::new().u64_at(0, p.as_ptr() as u64);
    bpf(BPF_OBJ_GET, &mut a).map(fd_result)
}

pub fn prog_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut a = Attr::new().u32_at(0, id);
    bpf(BPF_PROG_GET_FD_BY_ID, &mut a).map(fd_result)
}

/// Swaps the program under `link` for `new_prog`, atomically for every socket in the cgroup.
pub fn link_update(
    link: BorrowedFd<'_>,
    new_prog: BorrowedFd<'_>,
    old_prog: BorrowedFd<'_>,
) -> io::Result<()> {
    let mut a = Attr::new()
        .u32_at(0, link.as_raw_fd() as u32)
        .u32_at(4, new_prog.as_raw_fd() as u32)
        .u32_at(8, BPF_F_REPLACE)
        .u32_at(12, old_prog.as_raw_fd() as u32);
    bpf(BPF_LINK_UPDATE, &mut a).map(drop)
}

/// Detaches the link from its cgroup now, even if another process still holds it open.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut a = Attr::new().u32_at(0, link.as_raw_fd() as u32);
    bpf(BPF_LINK_DETACH, &mut a).map(drop)
}

/// What is attached directly to `cgroup` for `attach_type` (not inherited): the cgroup's
/// attach flags for that hook (BPF_F_ALLOW_OVERRIDE 1, BPF_F_ALLOW_MULTI 2; links count as
/// multi) and the programs' ids, at most 64.
pub fn prog_query(cgroup: BorrowedFd<'_>, attach_type: u32) -> io::Result<(u32, Vec<u32>)> {
    let mut ids = [0u32; 64];
    let mut a = Attr::new()
        .u32_at(0, cgroup.as_raw_fd() as u32)
        .u32_at(4, attach_type)
        .u64_at(16, ids.as_mut_ptr() as u64)
        .u32_at(24, ids.len() as u32);
    bpf(BPF_PROG_QUERY, &mut a)?;
    let u32_at = |o: usize| u32::from_ne_bytes(a.0[o..o + 4].try_into().expect("4 bytes"));
    let count = (u32_at(24) as usize).min(ids.len());
    Ok((u32_at(12), ids[..count].to_vec()))
}

/// Fills `info` with the kernel's `bpf_{prog,map,link}_info` of `fd`.
fn info_by_fd(fd: BorrowedFd<'_>, info: &mut [u8]) -> io::Result<()> {
    let mut a = Attr::new()
        .u32_at(0, fd.as_raw_fd() as u32)
        .u32_at(4, info.len() as u32)
        .u64_at(8, info.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a).map(drop)
}

/// The parts of `struct bpf_link_info` kha checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub link_type: u32,
    pub id: u32,
    pub prog_id: u32,
    /// For cgroup links; 0 once the cgroup is gone or the link was detached.
    pub cgroup_id: u64,
    pub attach_type: u32,
}

pub fn link_info(link: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    let mut info = [0u8; 256];
    info_by_fd(link, &mut info)?;
    let u32_at = |o: usize| u32::from_ne_bytes(info[o..o + 4].try_into().expect("4 bytes"));
    Ok(LinkInfo {
        link_type: u32_at(0),
        id: u32_at(4),
        prog_id: u32_at(8),
        // The union after prog_id is 8-aligned: cgroup_id at 16, attach_type at 24.
        cgroup_id: u64::from_ne_bytes(info[16..24].try_into().expect("8 bytes")),
        attach_type: u32_at(24),
    })
}

/// The parts of `struct bpf_map_info` the layout check needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapInfo {
    pub id: u32,
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub map_flags: u32,
}

pub fn map_info(map: BorrowedFd<'_>) -> io::Result<MapInfo> {
    let mut info = [0u8; 128];
    info_by_fd(map, &mut info)?;
    let u32_at = |o: usize| u32::from_ne_bytes(info[o..o + 4].try_into().expect("4 bytes"));
    Ok(MapInfo {
        map_type: u32_at(0),
        id: u32_at(4),
        key_size: u32_at(8),
        value_size: u32_at(12),
        max_entries: u32_at(16),
        map_flags: u32_at(20),
    })
}

/// A program's id and name (`bpf_prog_info.id`, `.name`: at most 15 bytes).
pub fn prog_id_name(prog: BorrowedFd<'_>) -> io::Result<(u32, String)> {
    let mut info = [0u8; 256];
    info_by_fd(prog, &mut info)?;
    let name = &info[64..80];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    let id = u32::from_ne_bytes(info[4..8].try_into().expect("4 bytes"));
    Ok((id, String::from_utf8_lossy(&name[..end]).into_owned()))
}

/// The ids of the maps a program uses (`bpf_prog_info.map_ids`).
pub fn prog_map_ids(prog: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    let mut ids = [0u32; 64];
    let mut info = [0u8; 256];
    // nr_map_ids at 52, map_ids at 56: ask for up to 64 ids.
    info[52..56].copy_from_slice(&(ids.len() as u32).to_ne_bytes());
    info[56..64].copy_from_slice(&(ids.as_mut_ptr() as u64).to_ne_bytes());
    info_by_fd(prog, &mut info)?;
    let n = u32::from_ne_bytes(info[52..56].try_into().expect("4 bytes")) as usize;
    Ok(ids[..n.min(ids.len())].to_vec())
}

/// Swaps two directories in one step (`renameat2(RENAME_EXCHANGE)`, which bpffs supports):
/// at every instant each name holds one complete map set.
pub fn rename_exchange(a: &Path, b: &Path) -> io::Result<()> {
    const RENAME_EXCHANGE: libc::c_uint = 2;
    let (a, b) = (c_path(a)?, c_path(b)?);
    // SAFETY: two NUL-terminated paths that outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            RENAME_EXCHANGE,
        )
    };
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}
