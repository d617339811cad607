//! Snapshot values packed as one MessagePack `bin` of LEB128 varints (`integer-encoding`),
//! format 4's encoding of a client's windows, a connection's record and the tombstones: the
//! writer and reader they share, and the deserializer that takes either format 4's `bin` or
//! format 3's array. Serde's walk value by value was most of a snapshot's work (state.rs).

use std::marker::PhantomData;

use integer_encoding::VarInt as _;
use serde::Deserialize;

/// The longest LEB128 varint of a 64-bit number.
const MAX_VARINT: usize = 10;

/// Appends varints to a buffer; `finish` trims the room it kept.
pub(crate) struct Packer<'a> {
    out: &'a mut Vec<u8>,
    at: usize,
}

impl<'a> Packer<'a> {
    /// Writes after what `out` holds, with room kept for `numbers` varints of two bytes, the
    /// usual size (counts, and differences of times and cookies); longer ones grow the buffer
    /// as they come. Room for the longest possible (10 bytes each) was most of the memory a
    /// snapshot took under a new-connection load: 100 000 tombstones, mostly 3 bytes each.
    pub(crate) fn new(out: &'a mut Vec<u8>, numbers: usize) -> Self {
        let at = out.len();
        out.resize(at + numbers * 2 + MAX_VARINT, 0);
        Self { out, at }
    }

    /// Raw bytes (fixed-size fields such as addresses).
    #[inline]
    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.room(b.len());
        self.out[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
    }

    #[inline]
    pub(crate) fn put(&mut self, v: u64) {
        self.room(MAX_VARINT);
        self.at += v.encode_var(&mut self.out[self.at..]);
    }

    /// Zigzag: small differences either way stay short.
    #[inline]
    pub(crate) fn put_signed(&mut self, v: i64) {
        self.room(MAX_VARINT);
        self.at += v.encode_var(&mut self.out[self.at..]);
    }

    pub(crate) fn finish(self) {
        self.out.truncate(self.at);
    }

    /// A wrong `numbers` costs a resize, never a panic.
    #[inline]
    fn room(&mut self, n: usize) {
        if self.out.len() - self.at < n {
            self.out.resize(self.at + n, 0);
        }
    }
}

/// Reads what a `Packer` wrote; every error names `what` was being read.
pub(crate) struct Unpacker<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Unpacker<'a> {
    pub(crate) fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Self { bytes, what }
    }

    /// Bytes not read yet: a bound on how many more values they can hold.
    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len()
    }

    pub(crate) fn bytes<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let (head, rest) = self
            .bytes
            .split_first_chunk::<N>()
            .ok_or_else(|| format!("{}: cut short", self.what))?;
        self.bytes = rest;
        Ok(*head)
    }

    #[inline]
    pub(crate) fn get(&mut self) -> Result<u64, String> {
        let (v, n) = u64::decode_var(self.bytes).ok_or_else(|| self.malformed())?;
        self.bytes = &self.bytes[n..];
        Ok(v)
    }

    #[inline]
    pub(crate) fn get_signed(&mut self) -> Result<i64, String> {
        let (v, n) = i64::decode_var(self.bytes).ok_or_else(|| self.malformed())?;
        self.bytes = &self.bytes[n..];
        Ok(v)
    }

    /// A number of a narrower field; one out of its range is refused.
    pub(crate) fn small<T: TryFrom<u64>>(&mut self) -> Result<T, String> {
        let v = self.get()?;
        T::try_from(v).map_err(|_| format!("{}: {v} out of range", self.what))
    }

    /// Bytes left over make the value unreadable.
    pub(crate) fn end(self, after: &str) -> Result<(), String> {
        match self.bytes.len() {
            0 => Ok(()),
            n => Err(format!("{}: {n} bytes after {after}", self.what)),
        }
    }

    fn malformed(&self) -> String {
        format!("{}: a malformed number", self.what)
    }
}

/// A snapshot value: format 4's `bin`, read by `bin`, or format 3's array, read as `S` and
/// turned into the value by `seq`.
pub(crate) fn bin_or_seq<'de, D, S, T>(
    d: D,
    what: &'static str,
    bin: fn(&[u8]) -> Result<T, String>,
    seq: fn(S) -> T,
) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    S: Deserialize<'de>,
{
    struct V<S, T> {
        what: &'static str,
        bin: fn(&[u8]) -> Result<T, String>,
        seq: fn(S) -> T,
        _s: PhantomData<S>,
    }
    impl<'de, S: Deserialize<'de>, T> serde::de::Visitor<'de> for V<S, T> {
        type Value = T;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.what)
        }
        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<T, E> {
            (self.bin)(v).map_err(E::custom)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, a: A) -> Result<T, A::Error> {
            S::deserialize(serde::de::value::SeqAccessDeserializer::new(a)).map(self.seq)
        }
    }
    d.deserialize_any(V {
        what,
        bin,
        seq,
        _s: PhantomData,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_round_trip_and_bad_bytes_are_refused() {
        let mut out = vec![7];
        // Room for one number only: the rest still fit.
        let mut p = Packer::new(&mut out, 1);
        p.bytes(&[1, 2, 3]);
        for v in [0, 1, 127, 128, u64::MAX] {
            p.put(v);
        }
        p.put_signed(-1);
        p.put_signed(i64::MIN);
        p.finish();
        assert_eq!(out[..4], [7, 1, 2, 3]);
        let mut u = Unpacker::new(&out[1..], "test");
        assert_eq!(u.bytes::<3>(), Ok([1, 2, 3]));
        for v in [0, 1, 127, 128, u64::MAX] {
            assert_eq!(u.get(), Ok(v));
        }
        assert_eq!(u.get_signed(), Ok(-1));
        assert_eq!(u.get_signed(), Ok(i64::MIN));
        assert_eq!(u.remaining(), 0);
        assert_eq!(u.end("it"), Ok(()));

        let mut cut = Unpacker::new(&[0x80], "test");
        assert_eq!(cut.get(), Err("test: a malformed number".into()));
        assert_eq!(
            Unpacker::new(&[1, 2], "test").bytes::<3>(),
            Err("test: cut short".into())
        );
        assert_eq!(
            Unpacker::new(&[0x80, 0x80, 0x04], "test").small::<u16>(),
            Err("test: 65536 out of range".into())
        );
        assert_eq!(
            Unpacker::new(&[0], "test").end("it"),
            Err("test: 1 bytes after it".into())
        );
    }
}
