//! Which TCP connections the collector serves: a bound per source address, a bound on all
//! connections, and a smaller pool for connections that have not yet shown a valid token.
//!
//! Why: the listener used to take 512 connections first come, first served, and kept each for
//! as long as the peer sent a request now and then, valid token or not; 512 unauthenticated
//! connections starved every agent and reader. Now:
//!
//! - one source address holds at most [`Limits::per_address`] connections (more are closed
//!   at once), so one host cannot take every slot;
//! - a connection is *pending* until a request on it carries a valid token. Pending
//!   connections live in a pool of [`Limits::pending`]; when it (or the whole table) is full,
//!   a new connection evicts the oldest pending connection of the address holding the most
//!   pending ones. An attacker with many addresses thus competes only with itself for the
//!   pending pool, and a newcomer (a reader, an agent) is the last to be evicted;
//! - authenticated connections are never evicted; the server closes a connection after any
//!   401, so a bad token cannot keep one.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
};

use tokio::sync::Notify;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// All connections served at once.
    pub total: usize,
    /// Connections from one source address.
    pub per_address: usize,
    /// Connections that have not yet presented a valid token.
    pub pending: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            total: 1024,
            per_address: 64,
            pending: 256,
        }
    }
}

/// Why a new connection was closed without being served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("too many connections from this address")]
    PerAddress,
    #[error("too many authenticated connections")]
    Full,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    total: usize,
    per_address: HashMap<IpAddr, usize>,
    /// Pending connections by id (ids grow, so the first is the oldest).
    pending: BTreeMap<u64, (IpAddr, Arc<Notify>)>,
    pending_per_address: HashMap<IpAddr, usize>,
}

impl Table {
    fn forget_pending(&mut self, id: u64) -> Option<Arc<Notify>> {
        let (addr, notify) = self.pending.remove(&id)?;
        if let Some(n) = self.pending_per_address.get_mut(&addr) {
            *n -= 1;
            if *n == 0 {
                self.pending_per_address.remove(&addr);
            }
        }
        Some(notify)
    }

    /// The oldest pending connection of the address with the most pending connections.
    fn victim(&self) -> Option<u64> {
        let most = self.pending_per_address.values().copied().max()?;
        self.pending
            .iter()
            .find(|(_, (addr, _))| self.pending_per_address.get(addr) == Some(&most))
            .map(|(id, _)| *id)
    }
}

pub struct Admission {
    limits: Limits,
    table: Mutex<Table>,
    /// Connections closed at once (per-address bound, table full) or evicted; for `/v1/health`.
    pub refused: std::sync::atomic::AtomicU64,
    pub evicted: std::sync::atomic::AtomicU64,
}

/// One admitted connection; dropping it frees its place.
pub struct Ticket {
    id: u64,
    addr: IpAddr,
    admission: Arc<Admission>,
    /// Notified when the connection is evicted (it was still pending).
    pub evicted: Arc<Notify>,
}

impl Admission {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            table: Mutex::new(Table::default()),
            refused: Default::default(),
            evicted: Default::default(),
        })
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        // The table holds plain counts; a panic elsewhere cannot leave it inconsistent.
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Admits a new connection from `addr` as pending, evicting another pending one if full.
    pub fn admit(self: &Arc<Self>, addr: IpAddr) -> Result<Ticket, Refused> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut t = self.table();
        if t.per_address.get(&addr).copied().unwrap_or(0) >= self.limits.per_address {
            self.refused.fetch_add(1, Relaxed);
            return Err(Refused::PerAddress);
        }
        let full =
            |t: &Table| t.total >= self.limits.total || t.pending.len() >= self.limits.pending;
        while full(&t) {
            let Some(victim) = t.victim() else {
                // Every slot is held by an authenticated connection.
                self.refused.fetch_add(1, Relaxed);
                return Err(Refused::Full);
            };
            if let Some(n) = t.forget_pending(victim) {
                n.notify_one();
                self.evicted.fetch_add(1, Relaxed);
            }
            // The evicted connection frees its total slot when its task ends; until then the
            // table may hold a few more than `total` (at most the evictions in flight).
            if t.total >= self.limits.total && t.pending.len() < self.limits.pending {
                break;
            }
        }
        t.next_id += 1;
        let id = t.next_id;
        t.total += 1;
        *t.per_address.entry(addr).or_default() += 1;
        let evicted = Arc::new(Notify::new());
        t.pending.insert(id, (addr, evicted.clone()));
        *t.pending_per_address.entry(addr).or_default() += 1;
        Ok(Ticket {
            id,
            addr,
            admission: self.clone(),
            evicted,
        })
    }

    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        let t = self.table();
        (t.total, t.pending.len())
    }
}

impl Ticket {
    /// A request on this connection carried a valid token: it can no longer be evicted.
    pub fn authenticated(&self) {
        self.admission.table().forget_pending(self.id);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut t = self.admission.table();
        t.forget_pending(self.id);
        t.total = t.total.saturating_sub(1);
        if let Some(n) = t.per_address.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                t.per_address.remove(&self.addr);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn one_address_cannot_take_every_slot() {
        let a = Admission::new(Limits {
            total: 100,
            per_address: 3,
            pending: 50,
        });
        let held: Vec<Ticket> = (0..3).map(|_| a.admit(ip(1)).expect("admit")).collect();
        assert_eq!(a.admit(ip(1)).err(), Some(Refused::PerAddress));
        assert!(a.admit(ip(2)).is_ok());
        drop(held);
        assert_eq!(a.counts(), (0, 0));
        assert!(a.admit(ip(1)).is_ok());
    }

    #[tokio::test]
    async fn a_full_pending_pool_evicts_the_biggest_holder_first() {
        let a = Admission::new(Limits {
            total: 100,
            per_address: 10,
            pending: 4,
        });
        let attacker: Vec<Ticket> = (0..3).map(|_| a.admit(ip(1)).expect("admit")).collect();
        let other = a.admit(ip(2)).expect("admit");
        // Full: the newcomer evicts the attacker's oldest, not `other`.
        let reader = a.admit(ip(3)).expect("admit");
        tokio::time::timeout(
            std::time::Duration::from_secs(1),
            attacker[0].evicted.notified(),
        )
        .await
        .expect("the attacker's oldest connection is evicted");
        assert_eq!(a.evicted.load(std::sync::atomic::Ordering::Relaxed), 1);
        // Authenticated connections leave the pending pool and are never evicted.
        reader.authenticated();
        other.authenticated();
        for _ in 0..10 {
            let _ = a.admit(ip(4));
        }
        assert!(
            tokio::time::timeout(
                std::time::Duration::from_millis(50),
                reader.evicted.notified()
            )
            .await
            .is_err()
        );
    }

    #[test]
    fn a_table_of_authenticated_connections_refuses_newcomers() {
        let a = Admission::new(Limits {
            total: 2,
            per_address: 10,
            pending: 2,
        });
        let t1 = a.admit(ip(1)).expect("admit");
        let t2 = a.admit(ip(2)).expect("admit");
        t1.authenticated();
        t2.authenticated();
        assert_eq!(a.admit(ip(3)).err(), Some(Refused::Full));
        drop(t1);
        assert!(a.admit(ip(3)).is_ok());
    }
}
