//! A durable, bounded, ordered spool of records: what an output has not delivered yet.
//!
//! On disk: segment files `<first seq>.log` of JSON lines (one record each, appended and
//! synced before the record counts as spooled) and a `cursor` file holding the highest
//! sequence number that is done (delivered, refused or dropped). A restart reads the segments
//! back and resumes after the cursor, in order; a record delivered just before a crash, whose
//! cursor update did not reach the disk, is delivered again with the same id, which a
//! deduplicating receiver ignores. Segments wholly behind the cursor are deleted.
//!
//! Bound: the undelivered records' bytes never exceed `max_bytes`; appending beyond it drops
//! the oldest undelivered records, and says how many.
//!
//! Without a directory the spool lives in memory only (file outputs: the file itself is the
//! durable copy), with the same bound and counting.

use std::{
    collections::VecDeque,
    fs::{self, File, OpenOptions},
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
};

use serde::{Serialize, de::DeserializeOwned};

use super::error::SinkError;
use crate::formats::Record;

/// What a spool holds: records that carry their position in the stream.
pub trait Spooled: Serialize + DeserializeOwned + Clone + Send + 'static {
    fn seq(&self) -> u64;
    fn set_seq(&mut self, seq: u64);
}

impl Spooled for Record {
    fn seq(&self) -> u64 {
        self.seq
    }
    fn set_seq(&mut self, seq: u64) {
        self.seq = seq;
    }
}

const CURSOR: &str = "cursor";

struct Segment {
    last_seq: u64,
    path: PathBuf,
    bytes: u64,
}

pub struct Spool<T = Record> {
    dir: Option<PathBuf>,
    max_bytes: u64,
    segment_bytes: u64,
    segments: VecDeque<Segment>,
    writer: Option<File>,
    /// Undelivered records and the size of each one's line.
    pending: VecDeque<(T, u64)>,
    pending_bytes: u64,
    next_seq: u64,
    /// Highest sequence number done.
    cursor: u64,
}

fn io(what: &str, path: &Path, e: std::io::Error) -> SinkError {
    SinkError::io(format!("{what} {}", path.display()), e)
}

impl<T: Spooled> Spool<T> {
    pub fn memory(max_bytes: u64) -> Self {
        Self {
            dir: None,
            max_bytes,
            segment_bytes: u64::MAX,
            segments: VecDeque::new(),
            writer: None,
            pending: VecDeque::new(),
            pending_bytes: 0,
            next_seq: 1,
            cursor: 0,
        }
    }

    /// Opens (or creates) the spool in `dir` and loads what is still undelivered.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<Self, SinkError> {
        fs::create_dir_all(dir).map_err(|e| io("creating spool", dir, e))?;
        let cursor_path = dir.join(CURSOR);
        let cursor = match fs::read_to_string(&cursor_path) {
            Ok(s) => s.trim().parse::<u64>().unwrap_or(0),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io("reading", &cursor_path, e)),
        };
        let mut files: Vec<(u64, PathBuf)> = fs::read_dir(dir)
            .map_err(|e| io("listing spool", dir, e))?
            .filter_map(Result::ok)
            .filter_map(|e| {
                let p = e.path();
                let first = p
                    .file_name()?
                    .to_str()?
                    .strip_suffix(".log")?
                    .parse::<u64>()
                    .ok()?;
                Some((first, p))
            })
            .collect();
        files.sort();
        let mut spool = Self {
            dir: Some(dir.to_owned()),
            max_bytes,
            segment_bytes: (max_bytes / 8).clamp(4096, 4 * 1024 * 1024),
            segments: VecDeque::new(),
            writer: None,
            pending: VecDeque::new(),
            pending_bytes: 0,
            next_seq: cursor + 1,
            cursor,
        };
        for (first, path) in files {
            let file = File::open(&path).map_err(|e| io("reading", &path, e))?;
            let mut last = first;
            let mut bytes = 0;
            // Bytes, not text: a line torn inside a UTF-8 character must not stop the read.
            for line in BufReader::new(file).split(b'\n') {
                let line = line.map_err(|e| io("reading", &path, e))?;
                bytes += line.len() as u64 + 1;
                // A line cut short by a crash mid-write is skipped; it never counted as spooled.
                let Ok(rec) = serde_json::from_slice::<T>(&line) else {
                    log::warn!("spool {}: skipping an unreadable line", path.display());
                    continue;
                };
                last = last.max(rec.seq());
                spool.next_seq = spool.next_seq.max(rec.seq() + 1);
                if rec.seq() > cursor {
                    let size = line.len() as u64 + 1;
                    spool.pending_bytes += size;
                    spool.pending.push_back((rec, size));
                }
            }
            spool.segments.push_back(Segment {
                last_seq: last,
                path,
                bytes,
            });
        }
        // Appends always go to a fresh segment: the last one may end in a partial line.
        let dropped = spool.enforce_bound(0)?;
        if dropped > 0 {
            log::warn!(
                "spool {}: dropped {dropped} oldest event(s) over the {max_bytes} byte bound",
                dir.display()
            );
        }
        spool.remove_done_segments();
        Ok(spool)
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Appends `rec` with the next sequence number; returns how many oldest undelivered
    /// records were dropped to stay within the bound (`rec` itself if it alone is too big).
    pub fn append(&mut self, rec: T) -> Result<u64, SinkError> {
        let dropped = self.append_unsynced(rec)?;
        self.sync()?;
        Ok(dropped)
    }

    /// Appends `recs` in order with one sync at the end (what one publish adds): the records
    /// are durable when it returns `Ok`. On `Err`, the number of records appended before it.
    pub fn append_all(&mut self, recs: Vec<T>) -> Result<u64, (usize, SinkError)> {
        let mut dropped = 0;
        for (i, rec) in recs.into_iter().enumerate() {
            dropped += self.append_unsynced(rec).map_err(|e| (i, e))?;
        }
        // A failed sync leaves them pending in memory (delivered if the agent lives on).
        let n = self.pending.len();
        self.sync().map_err(|e| (n, e))?;
        Ok(dropped)
    }

    fn sync(&mut self) -> Result<(), SinkError> {
        let (Some(file), Some(seg)) = (self.writer.as_ref(), self.segments.back()) else {
            return Ok(());
        };
        if let Err(e) = file.sync_data() {
            let path = seg.path.clone();
            // Later appends go to a fresh segment, not after bytes of unknown fate.
            self.writer = None;
            return Err(io("syncing", &path, e));
        }
        Ok(())
    }

    fn append_unsynced(&mut self, mut rec: T) -> Result<u64, SinkError> {
        rec.set_seq(self.next_seq);
        let mut line = serde_json::to_string(&rec)
            .map_err(|e| SinkError::Protocol(format!("encoding a record: {e}")))?;
        line.push('\n');
        let size = line.len() as u64;
        if size > self.max_bytes {
            self.next_seq += 1;
            self.set_cursor_at_least(rec.seq())?;
            return Ok(1);
        }
        let dropped = self.enforce_bound(size)?;
        if self.dir.is_some() {
            self.write_line(rec.seq(), &line)?;
        }
        self.next_seq += 1;
        self.pending_bytes += size;
        self.pending.push_back((rec, size));
        Ok(dropped)
    }

    fn write_line(&mut self, seq: u64, line: &str) -> Result<(), SinkError> {
        let Some(dir) = self.dir.clone() else {
            return Ok(());
        };
        let rotate = self
            .segments
            .back()
            .is_none_or(|s| s.bytes + line.len() as u64 > self.segment_bytes)
            || self.writer.is_none();
        if rotate {
            let path = dir.join(format!("{seq:020}.log"));
            // A file of that name holds no complete record (its first would be `seq`): only
            // a line torn by a crash. Start it afresh.
            self.segments.retain(|s| s.path != path);
            let file = OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .open(&path)
                .map_err(|e| io("creating", &path, e))?;
            self.writer = Some(file);
            self.segments.push_back(Segment {
                last_seq: seq,
                path,
                bytes: 0,
            });
        }
        let (Some(file), Some(seg)) = (self.writer.as_mut(), self.segments.back_mut()) else {
            return Err(SinkError::Protocol("spool segment missing".into()));
        };
        if let Err(e) = file.write_all(line.as_bytes()) {
            // A partial line (a full disk) would merge with the next record and both would be
            // unreadable: cut it, and append to a fresh segment from now on.
            let _ = file.set_len(seg.bytes);
            let path = seg.path.clone();
            self.writer = None;
            return Err(io("appending to", &path, e));
        }
        seg.bytes += line.len() as u64;
        seg.last_seq = seq;
        Ok(())
    }

    /// Drops the oldest undelivered records until `extra` more bytes fit.
    fn enforce_bound(&mut self, extra: u64) -> Result<u64, SinkError> {
        let mut dropped = 0;
        let mut last = None;
        while self.pending_bytes + extra > self.max_bytes {
            let Some((rec, size)) = self.pending.pop_front() else {
                break;
            };
            self.pending_bytes -= size;
            last = Some(rec.seq());
            dropped += 1;
        }
        if let Some(seq) = last {
            self.set_cursor_at_least(seq)?;
            self.remove_done_segments();
        }
        Ok(dropped)
    }

    /// The oldest `n` undelivered records, in order.
    pub fn peek(&self, n: usize) -> Vec<T> {
        self.pending
            .iter()
            .take(n)
            .map(|(r, _)| r.clone())
            .collect()
    }

    /// Everything up to and including `seq` is done.
    pub fn ack(&mut self, seq: u64) -> Result<(), SinkError> {
        while self.pending.front().is_some_and(|(r, _)| r.seq() <= seq) {
            if let Some((_, size)) = self.pending.pop_front() {
                self.pending_bytes -= size;
            }
        }
        self.set_cursor_at_least(seq)?;
        self.remove_done_segments();
        Ok(())
    }

    fn set_cursor_at_least(&mut self, seq: u64) -> Result<(), SinkError> {
        if seq <= self.cursor {
            return Ok(());
        }
        self.cursor = seq;
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        let tmp = dir.join("cursor.tmp");
        let path = dir.join(CURSOR);
        let written = File::create(&tmp).and_then(|mut f| {
            f.write_all(seq.to_string().as_bytes())?;
            f.sync_data()
        });
        written
            .and_then(|()| fs::rename(&tmp, &path))
            .map_err(|e| io("writing", &path, e))
    }

    fn remove_done_segments(&mut self) {
        // Keep the segment being written to, even when done: appends continue there.
        while self.segments.len() > 1
            && self
                .segments
                .front()
                .is_some_and(|s| s.last_seq <= self.cursor)
        {
            if let Some(s) = self.segments.pop_front() {
                let _ = fs::remove_file(&s.path);
            }
        }
        if self.writer.is_none() {
            // Opened from disk: the last segment is not being written to; drop it when done.
            if let Some(s) = self.segments.front()
                && self.segments.len() == 1
                && s.last_seq <= self.cursor
            {
                let _ = fs::remove_file(&s.path);
                self.segments.clear();
            }
        }
    }

    /// Bytes of the segment files.
    #[cfg(test)]
    fn disk_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::tests::record;

    fn temp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("sensor-spool-test-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn rec(i: u32) -> Record {
        let mut r = record("address", &format!("10.0.0.{i}"));
        r.id = format!("id-{i}");
        r
    }

    fn ids(s: &Spool, n: usize) -> Vec<String> {
        s.peek(n).into_iter().map(|r| r.id).collect()
    }

    #[test]
    fn keeps_order_and_survives_restart() {
        let dir = temp("order");
        let mut s = Spool::<Record>::open(&dir, 1 << 20).expect("open");
        for i in 1..=5 {
            assert_eq!(s.append(rec(i)).expect("append"), 0);
        }
        assert_eq!(ids(&s, 2), ["id-1", "id-2"]);
        let seqs: Vec<u64> = s.peek(10).iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1, 2, 3, 4, 5]);
        s.ack(2).expect("ack");
        assert_eq!(s.len(), 3);
        drop(s);
        // Restart: the delivered ones stay delivered, the rest comes back in order.
        let mut s = Spool::<Record>::open(&dir, 1 << 20).expect("reopen");
        assert_eq!(ids(&s, 10), ["id-3", "id-4", "id-5"]);
        s.append(rec(6)).expect("append");
        let seqs: Vec<u64> = s.peek(10).iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [3, 4, 5, 6], "sequence numbers continue");
        s.ack(6).expect("ack");
        assert!(s.is_empty());
        drop(s);
        let s = Spool::<Record>::open(&dir, 1 << 20).expect("reopen");
        assert!(s.is_empty());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn bound_drops_the_oldest_and_counts() {
        let dir = temp("bound");
        let size = serde_json::to_string(&rec(1)).expect("json").len() as u64 + 1;
        // Room for three records.
        let mut s = Spool::<Record>::open(&dir, size * 3 + size / 2).expect("open");
        let mut dropped = 0;
        for i in 1..=7 {
            dropped += s.append(rec(i)).expect("append");
        }
        assert_eq!(dropped, 4);
        assert_eq!(ids(&s, 10), ["id-5", "id-6", "id-7"]);
        drop(s);
        let s = Spool::<Record>::open(&dir, size * 3 + size / 2).expect("reopen");
        assert_eq!(ids(&s, 10), ["id-5", "id-6", "id-7"], "drops are durable");
        // A smaller bound at the next start drops more, oldest first.
        drop(s);
        let s = Spool::<Record>::open(&dir, size + 1).expect("reopen smaller");
        assert_eq!(ids(&s, 10), ["id-7"]);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn done_segments_are_deleted() {
        let dir = temp("segments");
        let mut s = Spool::<Record>::open(&dir, 64 * 1024).expect("open");
        for i in 1..=40 {
            s.append(rec(i)).expect("append");
        }
        let before = s.disk_bytes();
        assert!(s.segments.len() > 1, "several segments");
        s.ack(30).expect("ack");
        assert!(s.disk_bytes() < before);
        let files = fs::read_dir(&dir).expect("dir").count();
        assert_eq!(files, s.segments.len() + 1, "segments and the cursor");
        assert_eq!(s.len(), 10);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_torn_last_line_is_skipped() {
        let dir = temp("torn");
        let mut s = Spool::<Record>::open(&dir, 1 << 20).expect("open");
        s.append(rec(1)).expect("append");
        s.append(rec(2)).expect("append");
        let seg = s.segments.back().expect("segment").path.clone();
        drop(s);
        let mut f = OpenOptions::new().append(true).open(&seg).expect("open");
        f.write_all(b"{\"id\":\"torn").expect("write");
        drop(f);
        let mut s = Spool::<Record>::open(&dir, 1 << 20).expect("reopen");
        assert_eq!(ids(&s, 10), ["id-1", "id-2"]);
        s.append(rec(3)).expect("append");
        drop(s);
        let s = Spool::<Record>::open(&dir, 1 << 20).expect("reopen");
        assert_eq!(ids(&s, 10), ["id-1", "id-2", "id-3"]);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn memory_spool_has_the_same_bound() {
        let size = serde_json::to_string(&rec(1)).expect("json").len() as u64 + 1;
        let mut s = Spool::<Record>::memory(size * 2);
        let dropped: u64 = (1..=5).map(|i| s.append(rec(i)).expect("append")).sum();
        assert_eq!(dropped, 3);
        assert_eq!(ids(&s, 10), ["id-4", "id-5"]);
        s.ack(4).expect("ack");
        assert_eq!(ids(&s, 10), ["id-5"]);
    }
}
