//! The shim: the bpf(2) commands aya 0.16 does not offer, on aya-obj's generated `bpf_attr`
//! and info structs (no byte offsets, no magic numbers). Everything else goes through aya:
//! attaching (`attach`, `take_link`), pinning (`FdLink::pin`), and map info
//! (`MapInfo::from_pin`). What is here, and the aya change that would retire each item, is
//! written up in docs/aya-upstream.md:
//! - a link's cgroup id and attach type (aya's `LinkInfo` has ids and the link type only);
//! - `BPF_LINK_UPDATE` with `BPF_F_REPLACE` on a link reopened from its pin (aya's
//!   `attach_to_link` takes a link of its own, updates without `BPF_F_REPLACE`, and cannot
//!   roll back to the program it replaced);
//! - `BPF_LINK_DETACH`, which ends a link that other processes still hold open;
//! - a program by id (`BPF_PROG_GET_FD_BY_ID`; aya's `ProgramInfo` has no `from_id`), its
//!   name and its map ids;
//! - `BPF_PROG_QUERY` on a cgroup for the cgroup_sock_addr, sock_ops and cgroup_sock hooks
//!   (aya has `query` for cgroup_device and lirc only);
//! - `BPF_OBJ_GET` as a bare fd, for the above.
//!
//! And one that is not bpf(2): `renameat2(RENAME_EXCHANGE)` for the map migration.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

use aya_obj::generated::{
    BPF_F_REPLACE, bpf_attach_type, bpf_attr, bpf_cmd, bpf_link_info, bpf_link_type, bpf_prog_info,
};

pub const BPF_LINK_TYPE_CGROUP: u32 = bpf_link_type::BPF_LINK_TYPE_CGROUP as u32;

/// The kernel's number for `t`, as link info and `BPF_PROG_QUERY` carry it.
pub const fn attach_type(t: bpf_attach_type) -> u32 {
    t as u32
}

fn zeroed<T>() -> T {
    // SAFETY: only instantiated with the kernel's plain-data bpf structs and unions, for
    // which all-zero bytes are valid (and what the kernel wants in unused fields).
    unsafe { std::mem::zeroed() }
}

fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<i64> {
    // SAFETY: `attr` is a zero-initialised bpf_attr of the size we pass, filled for `cmd`.
    let ret = unsafe {
        libc::syscall(libc::SYS_bpf, cmd as libc::c_long, attr as *mut bpf_attr, size_of::<bpf_attr>())
    };
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

fn fd_u32(fd: BorrowedFd<'_>) -> u32 {
    fd.as_raw_fd() as u32
}

pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let p = c_path(path)?;
    let mut a: bpf_attr = zeroed();
    a.__bindgen_anon_4.pathname = p.as_ptr() as u64;
    bpf(bpf_cmd::BPF_OBJ_GET, &mut a).map(fd_result)
}

pub fn prog_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut a: bpf_attr = zeroed();
    a.__bindgen_anon_6.__bindgen_anon_1.prog_id = id;
    bpf(bpf_cmd::BPF_PROG_GET_FD_BY_ID, &mut a).map(fd_result)
}

/// Swaps the program under `link` for `new_prog`, atomically for every socket in the cgroup,
/// and only if it still runs `old_prog` (`BPF_F_REPLACE`): two agents never undo each other.
pub fn link_update(
    link: BorrowedFd<'_>,
    new_prog: BorrowedFd<'_>,
    old_prog: BorrowedFd<'_>,
) -> io::Result<()> {
    let mut a: bpf_attr = zeroed();
    a.link_update.link_fd = fd_u32(link);
    a.link_update.__bindgen_anon_1.new_prog_fd = fd_u32(new_prog);
    a.link_update.flags = BPF_F_REPLACE;
    a.link_update.__bindgen_anon_2.old_prog_fd = fd_u32(old_prog);
    bpf(bpf_cmd::BPF_LINK_UPDATE, &mut a).map(drop)
}

/// Detaches the link from its cgroup now, even if another process still holds it open.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut a: bpf_attr = zeroed();
    a.link_detach.link_fd = fd_u32(link);
    bpf(bpf_cmd::BPF_LINK_DETACH, &mut a).map(drop)
}

/// What is attached directly to `cgroup` for `attach_type` (not inherited): the cgroup's
/// attach flags for that hook (BPF_F_ALLOW_OVERRIDE 1, BPF_F_ALLOW_MULTI 2; links count as
/// multi) and the programs' ids, at most 64.
pub fn prog_query(cgroup: BorrowedFd<'_>, attach_type: u32) -> io::Result<(u32, Vec<u32>)> {
    let mut ids = [0u32; 64];
    let mut a: bpf_attr = zeroed();
    a.query.__bindgen_anon_1.target_fd = fd_u32(cgroup);
    a.query.attach_type = attach_type;
    a.query.prog_ids = ids.as_mut_ptr() as u64;
    a.query.__bindgen_anon_2.prog_cnt = ids.len() as u32;
    bpf(bpf_cmd::BPF_PROG_QUERY, &mut a)?;
    // SAFETY: the kernel wrote the query's fields; prog_cnt is the union's only member read.
    let (flags, count) = unsafe { (a.query.attach_flags, a.query.__bindgen_anon_2.prog_cnt as usize) };
    Ok((flags, ids[..count.min(ids.len())].to_vec()))
}

/// Fills `info` with the kernel's `bpf_{prog,link}_info` of `fd`.
fn info_by_fd<T>(fd: BorrowedFd<'_>, info: &mut T) -> io::Result<()> {
    let mut a: bpf_attr = zeroed();
    a.info.bpf_fd = fd_u32(fd);
    a.info.info_len = size_of::<T>() as u32;
    a.info.info = info as *mut T as u64;
    bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut a).map(drop)
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
    let mut info: bpf_link_info = zeroed();
    info_by_fd(link, &mut info)?;
    // SAFETY: read as a cgroup link's; callers check `link_type` before trusting the two.
    let cgroup = unsafe { info.__bindgen_anon_1.cgroup };
    Ok(LinkInfo {
        link_type: info.type_,
        id: info.id,
        prog_id: info.prog_id,
        cgroup_id: cgroup.cgroup_id,
        attach_type: cgroup.attach_type,
    })
}

/// A program's id and name (`bpf_prog_info.id`, `.name`: at most 15 bytes).
pub fn prog_id_name(prog: BorrowedFd<'_>) -> io::Result<(u32, String)> {
    let mut info: bpf_prog_info = zeroed();
    info_by_fd(prog, &mut info)?;
    let name: Vec<u8> = info.name.iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
    Ok((info.id, String::from_utf8_lossy(&name).into_owned()))
}

/// The ids of the maps a program uses (`bpf_prog_info.map_ids`).
pub fn prog_map_ids(prog: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    let mut ids = [0u32; 64];
    let mut info: bpf_prog_info = zeroed();
    info.nr_map_ids = ids.len() as u32;
    info.map_ids = ids.as_mut_ptr() as u64;
    info_by_fd(prog, &mut info)?;
    Ok(ids[..(info.nr_map_ids as usize).min(ids.len())].to_vec())
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
