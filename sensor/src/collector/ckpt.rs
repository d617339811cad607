//! Checkpoint chunks in the key-value bucket `<stream>-ckpt` (see [`super::partitioned`]):
//! a checkpoint named `p<N>-<revision>-<sequence>-<ms>` is stored as the keys
//! `chunk.p<N>.<name>.<i>`, and the pointer `p<N>` says `<name> <chunks>`. The partition is a
//! subject token of its own so that one partition's chunks can be deleted by subject.
//!
//! Deleting is a stream purge by subject, which removes the messages outright: a key-value
//! delete would leave a tombstone per chunk, forever (every checkpoint's name is new).

use async_nats::jetstream::{kv, stream::Stream};

/// Why a checkpoint's chunks could not be stored or read.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("storing {key}: {error}")]
    Store { key: String, error: String },
    #[error("reading {key}: {error}")]
    Read { key: String, error: String },
    #[error("the checkpoint chunk {0} is missing")]
    Missing(String),
}

/// The bucket's chunks, as one collector session sees them.
pub(super) struct Chunks<'a> {
    pub kv: &'a kv::Store,
    /// The bucket's stream (purges go through it).
    pub stream: &'a Stream,
    pub bucket: &'a str,
    /// Bytes of a chunk (under the server's `max_payload`).
    pub size: usize,
}

/// A checkpoint pointer's value: `<name> <chunks>` (empty: no checkpoint yet).
pub(super) fn parse_pointer(pointer: &str) -> Option<(&str, usize)> {
    let (name, chunks) = pointer.split_once(' ')?;
    Some((name, chunks.parse().ok()?))
}

/// The key of a checkpoint's chunk `i`.
fn chunk_key(name: &str, i: usize) -> String {
    format!("chunk.{}.{name}.{i}", partition_token(name))
}

/// The partition token of a checkpoint's chunk keys: the name's first part, `p<N>`.
fn partition_token(name: &str) -> &str {
    name.split('-').next().unwrap_or(name)
}

impl Chunks<'_> {
    /// Stores `data` as checkpoint `name`; returns the number of chunks and the stream
    /// sequence of the first. On failure the chunks already stored are deleted.
    pub async fn write(&self, name: &str, data: &[u8]) -> Result<(usize, u64), ChunkError> {
        let mut first = 0;
        let mut chunks = 0;
        for (i, piece) in data.chunks(self.size.max(1)).enumerate() {
            let key = chunk_key(name, i);
            match self
                .kv
                .put(&key, bytes::Bytes::copy_from_slice(piece))
                .await
            {
                Ok(revision) => {
                    if i == 0 {
                        first = revision;
                    }
                }
                Err(e) => {
                    self.drop(&format!("{name} {i}")).await;
                    return Err(ChunkError::Store {
                        key,
                        error: e.to_string(),
                    });
                }
            }
            chunks = i + 1;
        }
        Ok((chunks, first))
    }

    /// The data of checkpoint `name` in `chunks` chunks.
    pub async fn read(&self, name: &str, chunks: usize) -> Result<Vec<u8>, ChunkError> {
        let mut data = Vec::new();
        for i in 0..chunks {
            let mut entry = None;
            // Checkpoints written before chunk keys named their partition: `chunk.<name>.<i>`.
            for key in [chunk_key(name, i), format!("chunk.{name}.{i}")] {
                entry = self
                    .kv
                    .entry(key.clone())
                    .await
                    .map_err(|e| ChunkError::Read {
                        key: key.clone(),
                        error: e.to_string(),
                    })?
                    .filter(|e| e.operation == kv::Operation::Put);
                if entry.is_some() {
                    break;
                }
            }
            let entry = entry.ok_or_else(|| ChunkError::Missing(chunk_key(name, i)))?;
            data.extend_from_slice(&entry.value);
        }
        Ok(data)
    }

    /// Deletes the chunks of the checkpoint `pointer` names (one the pointer never took).
    pub async fn drop(&self, pointer: &str) {
        if let Some((name, _)) = parse_pointer(pointer) {
            let subject = format!(
                "$KV.{}.chunk.{}.{name}.>",
                self.bucket,
                partition_token(name)
            );
            if let Err(e) = self.stream.purge().filter(subject).await {
                log::warn!("deleting the checkpoint `{name}`: {e}");
            }
        }
    }

    /// After partition `p`'s pointer moved to a checkpoint whose first chunk is at stream
    /// sequence `first`: deletes every older chunk of `p`, the previous checkpoint's (`old`)
    /// and any a holder left behind when it died between its chunks and its pointer update.
    /// No pointer can name those any more: the pointer update just won its revision check,
    /// so no other holder fenced it since.
    pub async fn sweep(&self, p: u32, first: u64, old: &str) {
        // Sequence 0 would purge them all; a checkpoint always has a first chunk.
        if first == 0 {
            return;
        }
        let subject = format!("$KV.{}.chunk.p{p}.>", self.bucket);
        if let Err(e) = self.stream.purge().filter(subject).sequence(first).await {
            log::warn!("deleting partition {p}'s older checkpoints: {e}");
        }
        // A checkpoint loaded from the former layout (`chunk.<name>.<i>`).
        if let Some((name, _)) = parse_pointer(old) {
            let legacy = format!("$KV.{}.chunk.{name}.>", self.bucket);
            if let Err(e) = self.stream.purge().filter(legacy).await {
                log::warn!("deleting the checkpoint `{name}`: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, time::Duration};

    use async_nats::jetstream;
    use futures_util::StreamExt as _;

    use super::*;
    use crate::collector::testnats::NatsServer;

    async fn keys(kv: &kv::Store) -> BTreeSet<String> {
        let mut keys = kv.keys().await.expect("keys");
        let mut out = BTreeSet::new();
        while let Some(k) = keys.next().await {
            out.insert(k.expect("key"));
        }
        out
    }

    /// Against a real nats-server: checkpoints round-trip in chunks; moving partition 1's
    /// pointer past a new checkpoint deletes its previous one and the chunks a holder left
    /// behind when it died before its pointer update, and nothing of partition 2; a
    /// checkpoint of the former key layout is still read and deleted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_checkpoint_sweeps_its_partitions_older_chunks() {
        let Some(server) = NatsServer::start_or_skip("sensor-ckpt") else {
            return;
        };
        let client = async_nats::connect(server.url.as_str())
            .await
            .expect("connect");
        let js = jetstream::new(client);
        let bucket = "SENSOR-ckpt";
        let stream = js
            .get_or_create_stream(crate::collector::lease::bucket_stream(
                bucket,
                "test",
                Duration::ZERO,
                1,
            ))
            .await
            .expect("bucket stream");
        let kv = js.get_key_value(bucket).await.expect("bucket");
        let chunks = Chunks {
            kv: &kv,
            stream: &stream,
            bucket,
            size: 1000,
        };
        let data = |n: usize, seed: u8| -> Vec<u8> { (0..n).map(|i| (i as u8) ^ seed).collect() };

        let (n, _) = chunks
            .write("p1-1-10-100", &data(2500, 1))
            .await
            .expect("write");
        assert_eq!(n, 3);
        let old = format!("p1-1-10-100 {n}");
        chunks
            .write("p2-1-10-100", &data(1500, 2))
            .await
            .expect("write");
        // A holder that died between its chunks and its pointer update.
        chunks
            .write("p1-2-20-200", &data(1200, 3))
            .await
            .expect("write");
        // A checkpoint of the former layout, loaded by the current holder.
        kv.put("chunk.p1-0-5-50.0", data(10, 4).into())
            .await
            .expect("put");
        assert_eq!(
            chunks.read("p1-0-5-50", 1).await.expect("legacy read"),
            data(10, 4)
        );
        assert_eq!(
            chunks.read("p1-1-10-100", 3).await.expect("read"),
            data(2500, 1)
        );

        let (n, first) = chunks
            .write("p1-3-30-300", &data(2100, 5))
            .await
            .expect("write");
        chunks.sweep(1, first, &old).await;
        chunks.sweep(1, first, "p1-0-5-50 1").await;
        let left = keys(&kv).await;
        let want: BTreeSet<String> = [
            "chunk.p1.p1-3-30-300.0",
            "chunk.p1.p1-3-30-300.1",
            "chunk.p1.p1-3-30-300.2",
            "chunk.p2.p2-1-10-100.0",
            "chunk.p2.p2-1-10-100.1",
        ]
        .map(str::to_owned)
        .into();
        assert_eq!(left, want);
        assert_eq!(
            chunks.read("p1-3-30-300", n).await.expect("read"),
            data(2100, 5)
        );
        assert!(matches!(
            chunks.read("p1-1-10-100", 3).await,
            Err(ChunkError::Missing(_))
        ));
        // A checkpoint the pointer never took goes, alone.
        chunks.drop("p2-1-10-100 2").await;
        assert_eq!(keys(&kv).await.len(), 3);
    }
}
