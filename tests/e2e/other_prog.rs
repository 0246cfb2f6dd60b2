//! Another vendor's cgroup program, standing in for Cilium's or Calico's socket LB: a dozen raw
//! BPF instructions that rewrite one IPv4 address to another, loaded and attached with bpf(2)
//! through libc, so the coexistence tests depend on no compiler and choose every attach flag
//! themselves (aya only attaches through links, which are always multi).

use std::{
    ffi::CString,
    io,
    net::SocketAddrV4,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;

/// `bpf_attach_type` values of the two hooks the stand-in uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Connect4 = 10,
    Getpeername4 = 29,
}

/// `BPF_PROG_ATTACH` flags: the three ways a program can sit on a cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flags {
    /// 0: the only program of its hook here, and no descendant may attach one.
    Exclusive = 0,
    /// BPF_F_ALLOW_OVERRIDE: descendants may attach one, which then runs instead of this.
    Override = 1,
    /// BPF_F_ALLOW_MULTI: runs beside the others (what links, and so kha, always use).
    Multi = 2,
}

// Offsets in `struct bpf_sock_addr`: both fields hold network order in their low bytes.
const USER_IP4: i16 = 4;
const USER_PORT: i16 = 24;

/// One `struct bpf_insn`.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0] = code;
    b[1] = (src << 4) | dst;
    b[2..4].copy_from_slice(&off.to_ne_bytes());
    b[4..8].copy_from_slice(&imm.to_ne_bytes());
    b
}

/// How the context stores `addr`: the bytes in network order read as a native u32. As `i32`
/// because that is what an immediate is; JMP32 compares 32 bits, so no sign extension bites.
fn ip_imm(addr: &SocketAddrV4) -> i32 {
    i32::from_ne_bytes(addr.ip().octets())
}

fn port_imm(addr: &SocketAddrV4) -> i32 {
    i32::from(u16::from_ne_bytes(addr.port().to_be_bytes()))
}

/// `if (ctx->user_ip4 == from.ip && ctx->user_port == from.port) { ctx->user_ip4 = to.ip;
/// ctx->user_port = to.port; } return 1;`
pub fn rewrite_insns(from: SocketAddrV4, to: SocketAddrV4) -> Vec<u8> {
    const MOV64_X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
    const MOV64_K: u8 = 0xb7;
    const MOV32_K: u8 = 0xb4; // BPF_ALU | BPF_MOV | BPF_K
    const LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
    const STX_W: u8 = 0x63; // BPF_STX | BPF_MEM | BPF_W (BPF_ST into the context is refused)
    const JNE32_K: u8 = 0x56; // BPF_JMP32 | BPF_JNE | BPF_K
    const EXIT: u8 = 0x95;
    let prog = [
        insn(MOV64_X, 6, 1, 0, 0),
        insn(LDX_W, 2, 6, USER_IP4, 0),
        insn(JNE32_K, 2, 0, 6, ip_imm(&from)), // to `r0 = 1`
        insn(LDX_W, 2, 6, USER_PORT, 0),
        insn(JNE32_K, 2, 0, 4, port_imm(&from)),
        insn(MOV32_K, 2, 0, 0, ip_imm(&to)),
        insn(STX_W, 6, 2, USER_IP4, 0),
        insn(MOV32_K, 2, 0, 0, port_imm(&to)),
        insn(STX_W, 6, 2, USER_PORT, 0),
        insn(MOV64_K, 0, 0, 0, 1),
        insn(EXIT, 0, 0, 0, 0),
    ];
    prog.concat()
}

#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn put(&mut self, off: usize, bytes: &[u8]) -> &mut Self {
        self.0[off..off + bytes.len()].copy_from_slice(bytes);
        self
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<i64> {
    // SAFETY: a zeroed bpf_attr of the size we pass; the pointers in it outlive the call.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut Attr, size_of::<Attr>()) };
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

/// A loaded stand-in program; the kernel frees it once it is closed and detached.
pub struct Prog {
    pub fd: OwnedFd,
    pub hook: Hook,
}

impl Prog {
    /// Loads the rewrite of `from` to `to` for `hook`; panics with the verifier's log if the
    /// kernel refuses it.
    pub fn load(hook: Hook, from: SocketAddrV4, to: SocketAddrV4) -> Prog {
        let insns = rewrite_insns(from, to);
        let license = CString::new("GPL").unwrap();
        let mut log = vec![0u8; 4096];
        let mut a = Attr([0; 128]);
        a.put(0, &BPF_PROG_TYPE_CGROUP_SOCK_ADDR.to_ne_bytes())
            .put(4, &((insns.len() / 8) as u32).to_ne_bytes())
            .put(8, &(insns.as_ptr() as u64).to_ne_bytes())
            .put(16, &(license.as_ptr() as u64).to_ne_bytes())
            .put(24, &1u32.to_ne_bytes())
            .put(28, &(log.len() as u32).to_ne_bytes())
            .put(32, &(log.as_mut_ptr() as u64).to_ne_bytes())
            .put(48, b"test_other\0")
            .put(68, &(hook as u32).to_ne_bytes());
        let fd = bpf(BPF_PROG_LOAD, &mut a).unwrap_or_else(|e| {
            let log = String::from_utf8_lossy(&log);
            panic!("BPF_PROG_LOAD of the stand-in {hook:?}: {e}\n{}", log.trim_end_matches('\0'))
        });
        // SAFETY: a new descriptor the kernel just gave us.
        Prog { fd: unsafe { OwnedFd::from_raw_fd(fd as i32) }, hook }
    }

    /// The program's id, as bpftool and kha's errors name it.
    pub fn id(&self) -> u32 {
        let mut info = [0u8; 64];
        let mut a = Attr([0; 128]);
        a.put(0, &(self.fd.as_raw_fd() as u32).to_ne_bytes())
            .put(4, &(info.len() as u32).to_ne_bytes())
            .put(8, &(info.as_mut_ptr() as u64).to_ne_bytes());
        bpf(BPF_OBJ_GET_INFO_BY_FD, &mut a).expect("prog info");
        // struct bpf_prog_info: type, then id.
        u32::from_ne_bytes(info[4..8].try_into().unwrap())
    }

    /// `BPF_PROG_ATTACH` to `cgroup` with `flags`; the kernel's refusal is returned as is.
    pub fn attach(&self, cgroup: &Path, flags: Flags) -> io::Result<Attachment> {
        let cg = std::fs::File::open(cgroup)?;
        let mut a = Attr([0; 128]);
        a.put(0, &(cg.as_raw_fd() as u32).to_ne_bytes())
            .put(4, &(self.fd.as_raw_fd() as u32).to_ne_bytes())
            .put(8, &(self.hook as u32).to_ne_bytes())
            .put(12, &(flags as u32).to_ne_bytes());
        bpf(BPF_PROG_ATTACH, &mut a)?;
        let fd = self.fd.try_clone()?;
        Ok(Attachment { cgroup: cgroup.to_owned(), fd, hook: self.hook, attached: true })
    }
}

/// A stand-in attached to a cgroup the test made; detached on drop, also after a panic.
pub struct Attachment {
    cgroup: PathBuf,
    fd: OwnedFd,
    hook: Hook,
    attached: bool,
}

impl Attachment {
    /// `BPF_PROG_DETACH` now, so the test can check what is left.
    pub fn detach(mut self) -> io::Result<()> {
        self.detach_now()
    }

    fn detach_now(&mut self) -> io::Result<()> {
        self.attached = false;
        let cg = std::fs::File::open(&self.cgroup)?;
        let mut a = Attr([0; 128]);
        a.put(0, &(cg.as_raw_fd() as u32).to_ne_bytes())
            .put(4, &(self.fd.as_raw_fd() as u32).to_ne_bytes())
            .put(8, &(self.hook as u32).to_ne_bytes());
        bpf(BPF_PROG_DETACH, &mut a).map(drop)
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        if self.attached {
            let _ = self.detach_now();
        }
    }
}
