//! Every raw bpf(2) call the agent makes itself: what aya 0.14 does not offer (a map iterator's
//! link, batch map operations, the mapping of an mmapable array) and the probes `sensor doctor`
//! runs. One chokepoint, so the attribute layouts and the unsafe code live in one place.

use std::{
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    path::Path,
};

use sensor_common::{ConnStats, LiveSlot};

// Commands and types from include/uapi/linux/bpf.h.
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_TRACE_ITER: u32 = 28;
const BPF_MAP_TYPE_HASH: u32 = 1;

/// Records per batch syscall.
pub const BATCH: usize = 4096;

/// bpf(2) with `attr` as the attribute union's member of the command.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: attr is a valid bpf_attr prefix of the size passed; the buffers it points to are
    // sized as the command expects and outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `union bpf_attr`'s `link_create` member, iterator variant.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    iter_info: u64,
    iter_info_len: u32,
    _pad: u32,
}

/// `union bpf_attr`'s `obj_pin` member.
#[repr(C)]
#[derive(Default)]
struct ObjPinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// The first fields of `union bpf_attr`'s map-create member (the rest stays zero).
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
    map_ifindex: u32,
    btf_fd: u32,
    btf_key_type_id: u32,
    btf_value_type_id: u32,
}

/// BPF_LINK_CREATE of a map iterator (aya's `Iter::attach` passes no map; a map iterator needs
/// one in `bpf_iter_link_info.map`).
pub fn iter_link_create(prog_fd: RawFd, map_fd: RawFd) -> std::io::Result<OwnedFd> {
    // union bpf_iter_link_info { struct { __u32 map_fd; } map; ... }
    let mut info = [0u32; 4];
    info[0] = map_fd as u32;
    let mut attr = LinkCreateAttr {
        prog_fd: prog_fd as u32,
        attach_type: BPF_TRACE_ITER,
        iter_info: info.as_mut_ptr() as u64,
        iter_info_len: std::mem::size_of_val(&info) as u32,
        ..Default::default()
    };
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: the kernel returned a new link fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The values of a `BPF_F_MMAPABLE` array of `LiveSlot`s, mapped read-only into the agent (aya
/// 0.14 has no mapping of array maps). Only a prefix is mapped, grown as walks fill more slots:
/// the kernel maps every page of a mapping at once (remap_vmalloc_range), and the whole array
/// would count in the agent's RSS. The kernel writes the slots while the agent reads them:
/// every read is volatile, and `slot` reports a slot rewritten during its read.
pub struct LiveSlots {
    fd: OwnedFd,
    /// Slots in the array.
    len: usize,
    /// The mapping: its first `mapped` slots, `bytes` long (none yet when `mapped` is 0).
    ptr: Option<std::ptr::NonNull<LiveSlot>>,
    mapped: usize,
    bytes: usize,
}

// SAFETY: the mapping is owned by this value and only read through `&self`.
unsafe impl Send for LiveSlots {}

impl LiveSlots {
    /// The array map `fd` of `slots` values (an array's values are laid out one after another,
    /// each rounded up to 8 bytes: a `LiveSlot` is 136); nothing mapped yet.
    pub fn new(fd: std::os::fd::BorrowedFd<'_>, slots: u32) -> std::io::Result<Self> {
        let mut this = Self {
            fd: fd.try_clone_to_owned()?,
            len: slots as usize,
            ptr: None,
            mapped: 0,
            bytes: 0,
        };
        // A first page: the kernel refuses an array without BPF_F_MMAPABLE here, at the start.
        this.reserve(1)?;
        Ok(this)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Maps at least the first `slots` slots (with a quarter more room), at most all.
    pub fn reserve(&mut self, slots: usize) -> std::io::Result<()> {
        let slots = slots.min(self.len);
        if slots <= self.mapped && self.ptr.is_some() {
            return Ok(());
        }
        // SAFETY: sysconf(3) has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .unwrap_or(4096)
            .max(1);
        let want = (slots + slots / 4).clamp(1, self.len.max(1));
        let whole = self.len.max(1) * std::mem::size_of::<LiveSlot>();
        let bytes = (want * std::mem::size_of::<LiveSlot>())
            .div_ceil(page)
            .saturating_mul(page)
            .min(whole.div_ceil(page) * page);
        // SAFETY: a new shared read-only mapping of the map's fd, no longer than the map's
        // values; the kernel checks both.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ,
                libc::MAP_SHARED,
                self.fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(ptr.cast::<LiveSlot>())
            .ok_or_else(|| std::io::Error::other("mmap returned NULL"))?;
        self.unmap();
        self.ptr = Some(ptr);
        self.bytes = bytes;
        self.mapped = (bytes / std::mem::size_of::<LiveSlot>()).min(self.len);
        Ok(())
    }

    fn unmap(&mut self) {
        if let Some(ptr) = self.ptr.take() {
            // SAFETY: the mapping this value made, unmapped once.
            unsafe { libc::munmap(ptr.as_ptr().cast(), self.bytes) };
        }
        self.mapped = 0;
    }

    /// Slot `index`'s record if the slot holds `session`'s, read whole: None if it holds
    /// another walk's record, was rewritten by another walk while it was read (the session is
    /// read again after the record), or is not mapped.
    pub fn slot(
        &self,
        index: usize,
        session: u64,
    ) -> Option<[u8; sensor_common::LIVE_RECORD_BYTES]> {
        let ptr = self.ptr?;
        if index >= self.mapped {
            return None;
        }
        // SAFETY: index < mapped, inside the mapping, which lives as long as self; LiveSlot is
        // plain data, so any bytes are a valid value.
        unsafe {
            let slot = ptr.as_ptr().add(index);
            if std::ptr::read_volatile(&raw const (*slot).session) != session {
                return None;
            }
            std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
            // Word by word: a volatile read of the byte array became a byte-by-byte copy
            // (most of the live read's instructions per connection). The record is 8-byte
            // aligned in the slot (after the u64 session).
            const WORDS: usize = sensor_common::LIVE_RECORD_BYTES / 8;
            const _: () = assert!(sensor_common::LIVE_RECORD_BYTES.is_multiple_of(8));
            let words = (&raw const (*slot).record).cast::<u64>();
            let mut record = [0u8; sensor_common::LIVE_RECORD_BYTES];
            for (i, out) in record.chunks_exact_mut(8).enumerate().take(WORDS) {
                out.copy_from_slice(&std::ptr::read_volatile(words.add(i)).to_ne_bytes());
            }
            std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
            (std::ptr::read_volatile(&raw const (*slot).session) == session).then_some(record)
        }
    }
}

impl Drop for LiveSlots {
    fn drop(&mut self) {
        self.unmap();
    }
}

/// BPF_OBJ_PIN of any BPF object fd at `path` on a bpffs.
pub fn obj_pin(fd: &OwnedFd, path: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(std::io::Error::other)?;
    let mut attr = ObjPinAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// Buffers of one batch read (`BATCH` records, ~1.4 MiB), reused by every poll: a poll walks
/// the map through them instead of collecting every record (tens of thousands of closed
/// records wait for a snapshot under a new-connection load) into one growing vector.
pub struct BatchBuf {
    pub keys: Vec<u64>,
    pub values: Vec<ConnStats>,
}

impl Default for BatchBuf {
    fn default() -> Self {
        Self {
            keys: vec![0; BATCH],
            values: vec![ConnStats::default(); BATCH],
        }
    }
}

impl BatchBuf {
    /// Empties the buffers for a new walk.
    pub fn clear(&mut self) {
        self.keys.clear();
        self.values.clear();
    }

    /// Adds a record, handing the batch to `each` when it is full.
    pub fn push<E>(
        &mut self,
        cookie: u64,
        stats: ConnStats,
        each: &mut impl FnMut(&[u64], &[ConnStats]) -> Result<(), E>,
    ) -> Result<(), E> {
        self.keys.push(cookie);
        self.values.push(stats);
        if self.keys.len() < BATCH {
            return Ok(());
        }
        each(&self.keys, &self.values)?;
        self.clear();
        Ok(())
    }

    /// Hands what is left to `each`, if anything.
    pub fn flush<E>(
        &mut self,
        each: &mut impl FnMut(&[u64], &[ConnStats]) -> Result<(), E>,
    ) -> Result<(), E> {
        if self.keys.is_empty() {
            return Ok(());
        }
        each(&self.keys, &self.values)?;
        self.clear();
        Ok(())
    }
}

/// Why a walk of the map stopped early.
pub enum WalkError<E> {
    /// The kernel refused a batch (no batch operations).
    Kernel(std::io::Error),
    /// `each` failed.
    Each(E),
}

/// Every (cookie, record) of a `u64 -> V` map, with BPF_MAP_LOOKUP_BATCH, handed to `each` one
/// batch at a time, through `keys` and `values`. ENOENT ends the walk (with the last elements
/// read). The typed map vouches for the value size the kernel writes (aya checks it when the
/// map is opened).
pub fn lookup_each<V: aya::Pod + Default, E>(
    map: &aya::maps::HashMap<aya::maps::MapData, u64, V>,
    keys: &mut Vec<u64>,
    values: &mut Vec<V>,
    each: impl FnMut(&[u64], &[V]) -> Result<(), E>,
) -> Result<(), WalkError<E>> {
    use aya::maps::IterableMap as _;
    use std::os::fd::AsFd as _;
    // SAFETY: the map's keys are u64 and its values V, as its type says.
    unsafe { lookup_raw(map.map().fd().as_fd().as_raw_fd(), keys, values, each) }
}

/// `lookup_each` on a raw fd.
///
/// SAFETY: `fd` is not a map, or a map with 8-byte keys and `size_of::<V>()`-byte values: the
/// kernel writes up to `BATCH` of each into the buffers.
unsafe fn lookup_raw<V: aya::Pod + Default, E>(
    fd: RawFd,
    keys: &mut Vec<u64>,
    values: &mut Vec<V>,
    mut each: impl FnMut(&[u64], &[V]) -> Result<(), E>,
) -> Result<(), WalkError<E>> {
    keys.resize(BATCH, 0);
    values.resize(BATCH, V::default());
    // Opaque cursors (a bucket index for hash maps); 8 bytes covers every map type.
    let mut cursor = 0u64;
    let mut next = 0u64;
    let mut first = true;
    // Bounded: each round either ends the walk or moves the cursor past at least one bucket;
    // the map has at most max_entries buckets worth of rounds.
    for _ in 0..1_000_000 {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                std::ptr::from_mut(&mut cursor) as u64
            },
            out_batch: std::ptr::from_mut(&mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        // Only a call that succeeded or ended the walk (ENOENT) reports how many elements it
        // wrote; one refused up front leaves `count` as we set it, over a buffer holding zeros
        // or an earlier batch, none of which may be taken for records.
        let last = match bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) {
            Ok(_) => false,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e) => return Err(WalkError::Kernel(e)),
        };
        let n = (attr.count as usize).min(BATCH);
        if n > 0 {
            each(&keys[..n], &values[..n]).map_err(WalkError::Each)?;
        }
        if last {
            return Ok(());
        }
        cursor = next;
        first = false;
    }
    Ok(())
}

/// Deletes `keys` with BPF_MAP_DELETE_BATCH; on failure, how many were deleted before the error.
pub fn delete_batch(fd: RawFd, keys: &[u64]) -> Result<(), (usize, std::io::Error)> {
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: fd as u32,
        ..Default::default()
    };
    bpf(BPF_MAP_DELETE_BATCH, &mut attr)
        .map(|_| ())
        .map_err(|e| (attr.count as usize, e))
}

/// Whether the kernel has batch map operations (5.6+): a lookup on an empty throwaway hash
/// map answers ENOENT where they exist and EINVAL where they do not.
pub fn probe_batch_ops() -> std::io::Result<bool> {
    let mut create = MapCreateAttr {
        map_type: BPF_MAP_TYPE_HASH,
        key_size: 8,
        value_size: 8,
        max_entries: 1,
        ..Default::default()
    };
    let fd = bpf(BPF_MAP_CREATE, &mut create)?;
    // SAFETY: the kernel returned a new map fd that nothing else owns.
    let map = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let (mut key, mut value, mut next) = (0u64, 0u64, 0u64);
    let mut attr = BatchAttr {
        out_batch: std::ptr::from_mut(&mut next) as u64,
        keys: std::ptr::from_mut(&mut key) as u64,
        values: std::ptr::from_mut(&mut value) as u64,
        count: 1,
        map_fd: map.as_raw_fd() as u32,
        ..Default::default()
    };
    match bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The attribute prefixes must match the kernel's field offsets.
    #[test]
    fn attribute_layouts() {
        assert_eq!(std::mem::size_of::<LinkCreateAttr>(), 32);
        assert_eq!(std::mem::offset_of!(LinkCreateAttr, iter_info), 16);
        assert_eq!(std::mem::size_of::<ObjPinAttr>(), 24);
        assert_eq!(std::mem::size_of::<BatchAttr>(), 56);
        assert_eq!(std::mem::offset_of!(BatchAttr, map_fd), 36);
        assert_eq!(std::mem::offset_of!(MapCreateAttr, map_name), 28);
        assert_eq!(std::mem::offset_of!(MapCreateAttr, btf_fd), 48);
    }

    /// A batch the kernel refuses hands nothing over: not the zeros of a fresh buffer, not the
    /// records an earlier walk left in a reused one.
    #[test]
    fn a_refused_batch_hands_over_no_record() {
        let not_a_map = std::fs::File::open("/dev/null").expect("/dev/null");
        let mut buf = BatchBuf::default();
        buf.keys.fill(7);
        let mut handed = 0;
        // SAFETY: not a map: the kernel refuses the batch and writes nothing.
        let walk = unsafe {
            lookup_raw(
                not_a_map.as_raw_fd(),
                &mut buf.keys,
                &mut buf.values,
                |keys, _| {
                    handed += keys.len();
                    Ok::<(), ()>(())
                },
            )
        };
        assert!(matches!(walk, Err(WalkError::Kernel(_))));
        assert_eq!(handed, 0);
    }
}
