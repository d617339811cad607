//! The map behind each client table: keys and values side by side in one vector, and a hash
//! index of 4-byte positions into it.
//!
//! A `HashMap<String, Box<V>>` of a million clients had two million 32-byte slots (its load
//! factor is at most 7/8 and capacities are powers of two), a heap block per key and one per
//! value. Here a slot is a `u32` and keys of up to `KeyText::INLINE` bytes (every IPv4 address
//! and address group, short IPv6 ones, most identities) are stored in place.
//!
//! Lookups take a `&str` and hash it with foldhash (a per-process random seed keeps keys
//! chosen by clients from colliding on purpose).

use std::{fmt, hash::BuildHasher as _, marker::PhantomData};

use hashbrown::{HashTable, hash_table::Entry};
use serde::{
    Deserialize, Deserializer, Serialize, Serializer,
    de::{MapAccess, Visitor},
    ser::SerializeMap as _,
};

/// A key's text: in place up to `INLINE` bytes, else on the heap.
#[derive(Clone)]
pub struct KeyText(KeyRepr);

#[derive(Clone)]
enum KeyRepr {
    Inline {
        len: u8,
        bytes: [u8; KeyText::INLINE],
    },
    Heap(Box<str>),
}

impl KeyText {
    /// Longest key held in place: "255.255.255.255/32" is 18, "2001:db8:1:200::/56" 19.
    pub const INLINE: usize = 22;

    pub fn new(s: &str) -> Self {
        if s.len() <= Self::INLINE {
            let mut bytes = [0; Self::INLINE];
            bytes[..s.len()].copy_from_slice(s.as_bytes());
            Self(KeyRepr::Inline {
                len: s.len() as u8,
                bytes,
            })
        } else {
            Self(KeyRepr::Heap(s.into()))
        }
    }

    pub fn as_str(&self) -> &str {
        match &self.0 {
            KeyRepr::Inline { len, bytes } => {
                let b = &bytes[..usize::from(*len)];
                // SAFETY: the bytes of a `&str` (`new`), whole: valid UTF-8.
                unsafe { std::str::from_utf8_unchecked(b) }
            }
            KeyRepr::Heap(s) => s,
        }
    }
}

impl fmt::Debug for KeyText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// One entry (`ClientMap::iter` gives its key and value).
pub struct Slot<V> {
    key: KeyText,
    value: V,
}

impl<V: Clone> Clone for Slot<V> {
    fn clone(&self) -> Self {
        Self {
            key: self.key.clone(),
            value: self.value.clone(),
        }
    }
}

/// Values by `&str` key; iteration order is unspecified (as a hash map's).
pub struct ClientMap<V> {
    index: HashTable<u32>,
    slots: Vec<Slot<V>>,
    hasher: foldhash::fast::RandomState,
    /// Changes whenever an entry moves (a removal), and differs between maps: a `Handle` of
    /// another epoch is stale.
    epoch: u64,
}

/// Where a key was found: the entry's place, valid while its map's epoch stays the same
/// (entries only move when one is removed). Lets a caller that looks the same key up again
/// and again (a connection's client, every poll) skip formatting and hashing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handle {
    epoch: u64,
    at: u32,
}

/// Epochs are unique across every map of the process, so a handle never matches another map.
fn next_epoch() -> u64 {
    static EPOCHS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    EPOCHS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl<V> Default for ClientMap<V> {
    fn default() -> Self {
        Self {
            index: HashTable::new(),
            slots: Vec::new(),
            hasher: foldhash::fast::RandomState::default(),
            epoch: next_epoch(),
        }
    }
}

impl<V: Clone> Clone for ClientMap<V> {
    fn clone(&self) -> Self {
        Self {
            index: self.index.clone(),
            slots: self.slots.clone(),
            hasher: self.hasher.clone(),
            epoch: next_epoch(),
        }
    }
}

impl<V: fmt::Debug> fmt::Debug for ClientMap<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl<V> ClientMap<V> {
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    fn position(&self, key: &str) -> Option<usize> {
        let hash = self.hasher.hash_one(key);
        let slots = &self.slots;
        self.index
            .find(hash, |&i| slots[i as usize].key.as_str() == key)
            .map(|&i| i as usize)
    }

    pub fn get(&self, key: &str) -> Option<&V> {
        self.position(key).map(|i| &self.slots[i].value)
    }

    pub fn get_mut(&mut self, key: &str) -> Option<&mut V> {
        self.position(key).map(|i| &mut self.slots[i].value)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.position(key).is_some()
    }

    /// The value of `key`, inserted from `make` if missing: one probe, and the key is copied
    /// only when new.
    pub fn get_or_insert_with(&mut self, key: &str, make: impl FnOnce() -> V) -> &mut V {
        let at = self.insert_position(key, make);
        &mut self.slots[at].value
    }

    /// As `get_or_insert_with`, through `handle` when it is still valid (no key formatted,
    /// no probe), else by the key `key()` formats; `handle` is then set for the next call.
    pub fn get_or_insert_cached<K: AsRef<str>>(
        &mut self,
        handle: &mut Option<Handle>,
        key: impl FnOnce() -> K,
        make: impl FnOnce() -> V,
    ) -> &mut V {
        let at = match *handle {
            Some(h) if h.epoch == self.epoch && (h.at as usize) < self.slots.len() => h.at as usize,
            _ => {
                let at = self.insert_position(key().as_ref(), make);
                // Positions fit in u32 (`insert_position` makes sure).
                *handle = Some(Handle {
                    epoch: self.epoch,
                    at: at as u32,
                });
                at
            }
        };
        &mut self.slots[at].value
    }

    fn insert_position(&mut self, key: &str, make: impl FnOnce() -> V) -> usize {
        let hash = self.hasher.hash_one(key);
        let slots = &self.slots;
        let hasher = &self.hasher;
        match self.index.entry(
            hash,
            |&i| slots[i as usize].key.as_str() == key,
            |&i| hasher.hash_one(slots[i as usize].key.as_str()),
        ) {
            Entry::Occupied(o) => *o.get() as usize,
            Entry::Vacant(v) => {
                let at = slots.len();
                let Ok(i) = u32::try_from(at) else {
                    panic!("a client table holds at most {} entries", u32::MAX);
                };
                v.insert(i);
                self.slots.push(Slot {
                    key: KeyText::new(key),
                    value: make(),
                });
                at
            }
        }
    }

    /// Inserts or replaces the value of `key`.
    pub fn insert(&mut self, key: &str, value: V) {
        let mut value = Some(value);
        let slot = self.get_or_insert_with(key, || value.take().expect("once"));
        if let Some(v) = value {
            *slot = v;
        }
    }

    pub fn remove(&mut self, key: &str) -> Option<V> {
        self.position(key).map(|i| self.remove_at(i))
    }

    /// Removes the entry at `at` of the iteration order; the last entry takes its place.
    fn remove_at(&mut self, at: usize) -> V {
        self.epoch = next_epoch();
        let hash = self.hasher.hash_one(self.slots[at].key.as_str());
        if let Ok(o) = self.index.find_entry(hash, |&i| i as usize == at) {
            o.remove();
        }
        let last = self.slots.len() - 1;
        if at != last {
            let hash = self.hasher.hash_one(self.slots[last].key.as_str());
            if let Some(i) = self.index.find_mut(hash, |&i| i as usize == last) {
                *i = at as u32;
            }
        }
        self.slots.swap_remove(at).value
    }

    /// Removes the entries at `positions` (of the iteration order, as `iter` numbers them,
    /// each at most once).
    pub fn remove_positions(&mut self, mut positions: Vec<usize>, mut removed: impl FnMut(V)) {
        // From the last: moving the last entry into a removed place moves none still to go.
        positions.sort_unstable_by(|a, b| b.cmp(a));
        for at in positions {
            removed(self.remove_at(at));
        }
    }

    pub fn iter(&self) -> Iter<'_, V> {
        self.slots.iter().map(Slot::pair)
    }

    pub fn keys(&self) -> impl ExactSizeIterator<Item = &str> {
        self.slots.iter().map(|s| s.key.as_str())
    }

    pub fn values(&self) -> impl ExactSizeIterator<Item = &V> {
        self.slots.iter().map(|s| &s.value)
    }

    pub fn values_mut(&mut self) -> impl ExactSizeIterator<Item = &mut V> {
        self.slots.iter_mut().map(|s| &mut s.value)
    }
}

impl<V> Slot<V> {
    fn pair(&self) -> (&str, &V) {
        (self.key.as_str(), &self.value)
    }
}

pub type Iter<'a, V> =
    std::iter::Map<std::slice::Iter<'a, Slot<V>>, fn(&'a Slot<V>) -> (&'a str, &'a V)>;

impl<'a, V> IntoIterator for &'a ClientMap<V> {
    type Item = (&'a str, &'a V);
    type IntoIter = Iter<'a, V>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<V, Q: AsRef<str> + ?Sized> std::ops::Index<&Q> for ClientMap<V> {
    type Output = V;

    fn index(&self, key: &Q) -> &V {
        let key = key.as_ref();
        self.get(key)
            .unwrap_or_else(|| panic!("no client {key:?} in the table"))
    }
}

impl<V: Serialize> Serialize for ClientMap<V> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.len()))?;
        for (k, v) in self {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

/// The most a decoded table reserves before its entries arrive.
const PREALLOC_BYTES: usize = 1 << 20;

impl<'de, V: Deserialize<'de>> Deserialize<'de> for ClientMap<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MapVisitor<V>(PhantomData<V>);

        impl<'de, V: Deserialize<'de>> Visitor<'de> for MapVisitor<V> {
            type Value = ClientMap<V>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of clients")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Self::Value, A::Error> {
                let mut map = ClientMap::default();
                // A binary format states the length up front, and a hostile or corrupt file
                // may claim billions: reserve at most what ~1 MiB holds (as serde does for its
                // own collections); a real table grows past it as entries arrive.
                let most = PREALLOC_BYTES / std::mem::size_of::<Slot<V>>().max(1);
                let n = a.size_hint().unwrap_or(0).min(most);
                map.slots.reserve(n);
                map.index.reserve(n, |_| 0);
                while let Some((k, v)) = a.next_entry::<std::borrow::Cow<'de, str>, V>()? {
                    map.insert(&k, v);
                }
                Ok(map)
            }
        }

        d.deserialize_map(MapVisitor(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_inline_and_on_the_heap() {
        assert_eq!(std::mem::size_of::<KeyText>(), 24);
        for s in [
            "",
            "1.2.3.4",
            "255.255.255.255/32",
            "2001:db8:1:200::/56",
            "a22-bytes-long-key-xyz",
            "2a02:1234:5678:9abc:def0:1234:5678:9abc",
            "k-0123456789abcdef",
            "ünïcode identity ✓ that is rather long",
        ] {
            assert_eq!(KeyText::new(s).as_str(), s);
        }
    }

    /// Handles kept per key across removals (which move entries) land on the key's own entry,
    /// exactly as a lookup by key does.
    #[test]
    fn cached_handles_behave_as_lookups() {
        let mut m: ClientMap<u64> = ClientMap::default();
        let mut reference = std::collections::HashMap::new();
        let mut handles: std::collections::HashMap<String, Option<Handle>> =
            std::collections::HashMap::new();
        let mut x: u64 = 7;
        for step in 0..20_000u64 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let key = format!("10.0.{}.{}", (x >> 40) % 8, (x >> 50) % 64);
            if (x >> 33).is_multiple_of(5) {
                assert_eq!(m.remove(&key), reference.remove(&key));
            } else {
                let handle = handles.entry(key.clone()).or_default();
                *m.get_or_insert_cached(handle, || key.clone(), || 0) += step;
                *reference.entry(key.clone()).or_insert(0) += step;
            }
            assert_eq!(m.len(), reference.len());
            assert_eq!(m.get(&key), reference.get(&key));
        }
        for (k, v) in &reference {
            assert_eq!(m.get(k), Some(v));
        }
    }

    /// A handle never reaches into another map, a clone included.
    #[test]
    fn handles_belong_to_one_map() {
        let mut a: ClientMap<u64> = ClientMap::default();
        let mut b: ClientMap<u64> = ClientMap::default();
        let mut handle = None;
        *a.get_or_insert_cached(&mut handle, || "1.1.1.1", || 0) += 1;
        let from_a = handle;
        *b.get_or_insert_cached(&mut handle, || "2.2.2.2", || 0) += 5;
        assert_ne!(handle, from_a, "re-resolved in b");
        let mut c = a.clone();
        let mut h = from_a;
        *c.get_or_insert_cached(&mut h, || "3.3.3.3", || 0) += 7;
        assert_eq!(a["1.1.1.1"], 1);
        assert_eq!(b["2.2.2.2"], 5);
        assert_eq!(c["1.1.1.1"], 1);
        assert_eq!(c["3.3.3.3"], 7);
    }

    /// Against std's HashMap: inserts, lookups, removals in any order, and serde.
    #[test]
    fn behaves_as_a_map() {
        let mut m: ClientMap<u64> = ClientMap::default();
        let mut reference = std::collections::HashMap::new();
        let mut x: u64 = 99;
        for step in 0..20_000u64 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
            let key = format!("10.0.{}.{}", (x >> 40) % 8, (x >> 50) % 64);
            match (x >> 33) % 4 {
                0 => {
                    assert_eq!(m.remove(&key), reference.remove(&key));
                }
                1 => {
                    let mut positions: Vec<usize> = (0..m.len())
                        .filter(|i| (i + step as usize).is_multiple_of(7))
                        .collect();
                    positions.truncate(3);
                    let keys: Vec<String> = positions
                        .iter()
                        .map(|&i| m.iter().nth(i).expect("there").0.to_owned())
                        .collect();
                    let mut gone = Vec::new();
                    m.remove_positions(positions, |v| gone.push(v));
                    let mut expect: Vec<u64> = keys
                        .iter()
                        .map(|k| reference.remove(k).expect("was there"))
                        .collect();
                    gone.sort_unstable();
                    expect.sort_unstable();
                    assert_eq!(gone, expect);
                }
                _ => {
                    *m.get_or_insert_with(&key, || 0) += step;
                    *reference.entry(key.clone()).or_insert(0) += step;
                }
            }
            assert_eq!(m.len(), reference.len());
            assert_eq!(m.get(&key), reference.get(&key));
        }
        for (k, v) in &reference {
            assert_eq!(m[k], *v);
            assert!(m.contains_key(k));
        }
        let json = serde_json::to_string(&m).expect("json");
        let back: ClientMap<u64> = serde_json::from_str(&json).expect("load");
        let as_std: std::collections::HashMap<String, u64> =
            serde_json::from_str(&json).expect("std");
        assert_eq!(as_std, reference);
        assert_eq!(back.len(), reference.len());
        for (k, v) in &back {
            assert_eq!(reference[k], *v);
        }
    }
}
