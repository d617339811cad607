//! Ports for the servers tests and the bench start.
//!
//! Binding port 0 and releasing it hands out an *ephemeral* port: until the server binds it,
//! any outgoing connection of a parallel test may take it as its source port ("Address already
//! in use"). So ports come from outside `net.ipv4.ip_local_port_range`, where the kernel never
//! picks source ports. Test binaries run as several processes at once: each starts at a random
//! point, holds an advisory lock on every port it hands out (a file per port, released when the
//! process exits) so no two processes hand out the same one, and checks by binding that nothing
//! else listens there.

use std::{
    fs::File,
    hash::{BuildHasher as _, Hasher as _},
    io,
    net::TcpListener,
    os::fd::AsRawFd as _,
    path::PathBuf,
    sync::Mutex,
};

/// Lowest port handed out: below are well-known and registered services.
const LOWEST: u16 = 10_000;

struct Allocator {
    candidates: Vec<u16>,
    next: usize,
    /// Locks on the ports handed out, held for the life of the process.
    held: Vec<File>,
}

static ALLOCATOR: Mutex<Option<Allocator>> = Mutex::new(None);

/// The kernel's ephemeral range (`net.ipv4.ip_local_port_range`), Linux's default if unreadable.
pub fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|v| v.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32_768, 60_999))
}

/// Ports outside the ephemeral range (and above `LOWEST` where that leaves any).
fn candidates((lo, hi): (u16, u16)) -> Vec<u16> {
    let outside = |p: &u16| *p < lo || *p > hi;
    let high: Vec<u16> = (LOWEST..=u16::MAX).filter(outside).collect();
    if high.is_empty() {
        (1024..=u16::MAX).filter(outside).collect()
    } else {
        high
    }
}

fn lock_dir() -> PathBuf {
    std::env::temp_dir().join("sensor-test-ports")
}

/// An exclusive lock on `port` among the processes using this allocator, if free.
fn lock(port: u16) -> io::Result<Option<File>> {
    let file = File::create(lock_dir().join(port.to_string()))?;
    // SAFETY: flock(2) on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Some(file));
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(None)
    } else {
        Err(e)
    }
}

/// Nothing listens on `port` on loopback, in either family.
fn bindable(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok() && TcpListener::bind(("::1", port)).is_ok()
}

/// A port outside the ephemeral range that no other user of this allocator holds and nothing
/// listens on; it stays reserved for this process.
pub fn free_port() -> io::Result<u16> {
    let mut guard = ALLOCATOR
        .lock()
        .map_err(|_| io::Error::other("port allocator poisoned"))?;
    let alloc = match &mut *guard {
        Some(a) => a,
        None => {
            std::fs::create_dir_all(lock_dir())?;
            let candidates = candidates(ephemeral_range());
            if candidates.is_empty() {
                return Err(io::Error::other("the ephemeral range covers every port"));
            }
            // A random start: parallel processes rarely contend for the same locks.
            let random = std::hash::RandomState::new().build_hasher().finish();
            let next = (random % candidates.len() as u64) as usize;
            guard.insert(Allocator {
                candidates,
                next,
                held: Vec::new(),
            })
        }
    };
    for _ in 0..alloc.candidates.len() {
        let port = alloc.candidates[alloc.next];
        alloc.next = (alloc.next + 1) % alloc.candidates.len();
        let Some(file) = lock(port)? else { continue };
        if bindable(port) {
            alloc.held.push(file);
            return Ok(port);
        }
    }
    Err(io::Error::other(
        "every port outside the ephemeral range is taken",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_outside_the_ephemeral_range_distinct_and_bindable() {
        let (lo, hi) = ephemeral_range();
        let ports: Vec<u16> = (0..50).map(|_| free_port().expect("port")).collect();
        for p in &ports {
            assert!(*p < lo || *p > hi, "{p} in {lo}-{hi}");
            assert!(bindable(*p), "{p}");
        }
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len());
    }

    #[test]
    fn a_port_held_by_another_process_is_skipped() {
        let port = free_port().expect("port");
        // A second open file description of the same lock file stands in for another process.
        assert!(lock(port).expect("lock").is_none());
    }

    #[test]
    fn candidates_avoid_the_range() {
        let c = candidates((32_768, 60_999));
        assert_eq!(c.first(), Some(&LOWEST));
        assert!(c.iter().all(|p| *p < 32_768 || *p > 60_999));
        assert!(c.contains(&61_000) && c.contains(&u16::MAX));
        assert!(candidates((1024, 65_535)).is_empty());
    }
}
