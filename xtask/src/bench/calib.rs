//! Calibration for the BPF cost figures: an empty cgroup_skb program ("return allow") attached
//! next to the sensor's, so its run time per packet is the floor every program pays on this
//! machine (dispatch plus the statistics' own clock reads) under the same traffic.
//!
//! Loaded with raw bpf(2) calls (no object file needed) and attached through BPF links held
//! only by this process: closing the link detaches it, also when the bench dies.

use std::{
    fs::File,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

use anyhow::{Context as _, bail};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_CGROUP_SKB: u32 = 8;
const BPF_CGROUP_INET_INGRESS: u32 = 0;
const BPF_CGROUP_INET_EGRESS: u32 = 1;

/// Names as bpftool shows them (at most 15 bytes).
pub const EMPTY_INGRESS: &str = "bench_empty_in";
pub const EMPTY_EGRESS: &str = "bench_empty_eg";

/// The two attached empty programs; dropping this detaches and unloads them.
pub struct EmptyPrograms {
    _links: Vec<OwnedFd>,
    _progs: Vec<OwnedFd>,
}

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<OwnedFd> {
    // SAFETY: attr is a zero-padded bpf_attr of the size passed; the kernel reads only it
    // (and the buffers it points to, which outlive the call).
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new file descriptor the kernel just returned to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn put_u32(attr: &mut [u8; 128], offset: usize, v: u32) {
    attr[offset..offset + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(attr: &mut [u8; 128], offset: usize, v: u64) {
    attr[offset..offset + 8].copy_from_slice(&v.to_ne_bytes());
}

fn load(name: &str, attach_type: u32) -> anyhow::Result<OwnedFd> {
    // r0 = 1 (allow); exit
    let insns: [u64; 2] = [
        u64::from_le_bytes([0xb7, 0x00, 0, 0, 1, 0, 0, 0]),
        u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
    ];
    let license = c"GPL";
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, BPF_PROG_TYPE_CGROUP_SKB);
    put_u32(&mut attr, 4, insns.len() as u32);
    put_u64(&mut attr, 8, insns.as_ptr() as u64);
    put_u64(&mut attr, 16, license.as_ptr() as u64);
    let bytes = name.as_bytes();
    if bytes.len() > 15 {
        bail!("program name {name} longer than 15 bytes");
    }
    attr[48..48 + bytes.len()].copy_from_slice(bytes);
    put_u32(&mut attr, 68, attach_type);
    bpf(BPF_PROG_LOAD, &mut attr).with_context(|| format!("loading the empty program {name}"))
}

impl EmptyPrograms {
    pub fn attach(cgroup: &Path) -> anyhow::Result<Self> {
        let cg = File::open(cgroup).with_context(|| format!("opening {}", cgroup.display()))?;
        let mut links = Vec::new();
        let mut progs = Vec::new();
        for (name, attach_type) in [
            (EMPTY_INGRESS, BPF_CGROUP_INET_INGRESS),
            (EMPTY_EGRESS, BPF_CGROUP_INET_EGRESS),
        ] {
            let prog = load(name, attach_type)?;
            let mut attr = [0u8; 128];
            put_u32(&mut attr, 0, prog.as_raw_fd() as u32);
            put_u32(&mut attr, 4, cg.as_raw_fd() as u32);
            put_u32(&mut attr, 8, attach_type);
            let link = bpf(BPF_LINK_CREATE, &mut attr)
                .with_context(|| format!("attaching the empty program {name}"))?;
            links.push(link);
            progs.push(prog);
        }
        Ok(Self {
            _links: links,
            _progs: progs,
        })
    }
}
