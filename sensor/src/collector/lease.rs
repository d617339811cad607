//! Partition leases for several collectors sharing the work (docs/fleet.md, "Several
//! collectors"): each partition is merged by the one collector holding its lease in the
//! JetStream key-value bucket `<stream>-leases`.
//!
//! - take: `create(p<N>)`, which the server grants only while the key has no live value;
//! - renew every `ttl / 5`: `update(p<N>, revision)`, refused once someone else holds it;
//! - expire: the bucket's `max_age` (the ttl) drops a lease not renewed, so a dead
//!   collector's partitions are free again within the ttl;
//! - stop early: a holder treats its lease as gone [`MARGIN`] before the server can drop it,
//!   counted from when its last successful renewal was *sent* (the server counts from when
//!   it stored it, later), so that two collectors never merge one partition at once;
//! - release (a clean stop, or rebalancing): delete with the expected revision.
//!
//! Collectors also keep a membership key `member.<instance>` alive, so that a newcomer that
//! holds nothing yet counts in everyone's share. Which partitions to take and release is a
//! pure function of the bucket's contents, [`plan`], tested on its own; [`Leases`] applies it
//! to the bucket.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use async_nats::jetstream::{self, kv};
use futures_util::StreamExt as _;

/// How long before the server may drop a lease its holder stops using it: covers the time
/// a renewal spends in flight and the difference between the NATS nodes' clocks.
pub const MARGIN: Duration = Duration::from_secs(4);
/// The lease time to live by default (the bucket's `max_age`).
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);
/// Key prefixes in the bucket.
const MEMBER: &str = "member.";
const PARTITION: &str = "p";

/// Errors talking to the lease bucket (the caller retries at its next tick).
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("lease bucket `{bucket}`: {what}: {message}")]
    Bucket {
        bucket: String,
        what: &'static str,
        message: String,
    },
    #[error("lease ttl {0:?} is too short: it must exceed {MARGIN:?} plus a renewal period")]
    Ttl(Duration),
}

/// The stream of the key-value bucket `bucket`, made as async-nats' `create_key_value` makes
/// it (history 1, direct gets), since that call cannot read nats-server 2.9's account
/// information. `max_age` zero: values never expire.
pub fn bucket_stream(
    bucket: &str,
    description: &str,
    max_age: Duration,
    replicas: usize,
) -> jetstream::stream::Config {
    jetstream::stream::Config {
        name: format!("KV_{bucket}"),
        description: Some(description.to_owned()),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age,
        storage: jetstream::stream::StorageType::File,
        num_replicas: replicas.max(1),
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    }
}

/// The key of partition `p`'s lease.
pub fn partition_key(p: u32) -> String {
    format!("{PARTITION}{p}")
}

#[cfg(test)]
fn parse_partition_key(key: &str, partitions: u32) -> Option<u32> {
    let n = key.strip_prefix(PARTITION)?;
    // `p07` is not `p7`: only the canonical spelling counts.
    let p: u32 = n.parse().ok()?;
    (p < partitions && partition_key(p) == key).then_some(p)
}

/// What is in the bucket: the live leases (partition -> owner) and the live collectors.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    pub owners: BTreeMap<u32, String>,
    pub members: BTreeSet<String>,
}

/// What one collector should do now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Free partitions to try to take (`create`; another collector may win the race).
    pub take: Vec<u32>,
    /// Partitions to give up (after their last checkpoint): it holds more than its share.
    pub release: Vec<u32>,
}

/// Each live collector's share: `ceil(partitions / live collectors)`, the collector `me`
/// counted whether the bucket shows it yet or not.
pub fn share(partitions: u32, me: &str, view: &View) -> u32 {
    let mut live: BTreeSet<&str> = view.members.iter().map(String::as_str).collect();
    live.extend(view.owners.values().map(String::as_str));
    live.insert(me);
    let n = u32::try_from(live.len()).unwrap_or(u32::MAX).max(1);
    partitions.div_ceil(n)
}

/// What `me` should take and release, given the bucket. Free partitions are tried starting
/// at an offset of the collector's own (collectors starting together then race for
/// different partitions first); those released are the highest-numbered it holds.
pub fn plan(partitions: u32, me: &str, view: &View) -> Plan {
    let share = share(partitions, me, view) as usize;
    let mine: Vec<u32> = view
        .owners
        .iter()
        .filter(|(_, o)| o.as_str() == me)
        .map(|(p, _)| *p)
        .collect();
    if mine.len() > share {
        return Plan {
            take: Vec::new(),
            release: mine[share..].to_vec(),
        };
    }
    let start = if partitions == 0 {
        0
    } else {
        crate::ship::partition::partition_of("collector", me, partitions)
    };
    let take = (0..partitions)
        .map(|i| (start + i) % partitions)
        .filter(|p| !view.owners.contains_key(p))
        .take(share - mine.len())
        .collect();
    Plan {
        take,
        release: Vec::new(),
    }
}

/// A lease this collector holds: the revision it must renew, and when its last successful
/// renewal (or the take) was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub revision: u64,
    pub sent: Instant,
}

impl Held {
    /// Whether the holder may still merge the partition at `now`: until `ttl - MARGIN`
    /// after the last renewal was sent. Past it the server may drop the lease at any
    /// moment, and another collector take it.
    pub fn valid(&self, now: Instant, ttl: Duration) -> bool {
        now.saturating_duration_since(self.sent) < ttl.saturating_sub(MARGIN)
    }
}

/// What a tick changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tick {
    /// Taken this tick: load the partition's checkpoint and start merging it.
    pub taken: Vec<u32>,
    /// Lost (a renewal refused, or not renewed in time): stop merging at once.
    pub lost: Vec<u32>,
    /// Over this collector's share: checkpoint, then [`Leases::release`].
    pub release: Vec<u32>,
}

/// What became of one renewal.
enum Renewal {
    Renewed(Held),
    /// Refused (someone else holds it) or past its validity.
    Lost,
    /// No answer in time: kept while still valid.
    Unanswered,
}

/// The leases of one collector, over the bucket.
pub struct Leases {
    kv: kv::Store,
    bucket: String,
    me: String,
    partitions: u32,
    ttl: Duration,
    held: BTreeMap<u32, Held>,
    member: Option<u64>,
    /// The members of the last listing that answered, and when.
    members_seen: (Option<Instant>, BTreeSet<String>),
}

impl Leases {
    /// How often [`Leases::tick`] should run.
    pub fn period(ttl: Duration) -> Duration {
        ttl / 5
    }

    /// Opens (or creates) the bucket `<stream>-leases` with `max_age = ttl`.
    pub async fn open(
        js: &jetstream::Context,
        stream: &str,
        replicas: usize,
        me: &str,
        partitions: u32,
        ttl: Duration,
    ) -> Result<Self, LeaseError> {
        if ttl <= MARGIN + Self::period(ttl) {
            return Err(LeaseError::Ttl(ttl));
        }
        let bucket = format!("{stream}-leases");
        let err = |what: &'static str, e: &dyn std::fmt::Display| LeaseError::Bucket {
            bucket: bucket.clone(),
            what,
            message: e.to_string(),
        };
        // The bucket's stream, made as async-nats' `create_key_value` makes it: that call
        // first asks for the account's JetStream info, whose answer from nats-server 2.9
        // (Debian bookworm's) async-nats 0.51 cannot parse.
        let stream = js
            .get_or_create_stream(bucket_stream(
                &bucket,
                "sensor collectors' partition leases",
                ttl,
                replicas,
            ))
            .await
            .map_err(|e| err("creating", &e))?;
        // The server drops a lease after the bucket's max_age, whatever the collectors
        // think: a collector believing in a longer lease would merge past it while another
        // takes the partition over.
        let max_age = stream.cached_info().config.max_age;
        if max_age != ttl {
            return Err(err(
                "checking",
                &format!(
                    "it expires leases after {max_age:?}, this collector's lease_ttl_secs is {ttl:?}: \
                     every collector of the group needs the same lease_ttl_secs (to change it, stop \
                     them all and delete the stream KV_{bucket})"
                ),
            ));
        }
        let kv = js
            .get_key_value(&bucket)
            .await
            .map_err(|e| err("opening", &e))?;
        Ok(Self {
            kv,
            bucket: bucket.clone(),
            me: me.to_owned(),
            partitions,
            ttl,
            held: BTreeMap::new(),
            member: None,
            members_seen: (None, BTreeSet::new()),
        })
    }

    fn err(&self, what: &'static str, e: &dyn std::fmt::Display) -> LeaseError {
        LeaseError::Bucket {
            bucket: self.bucket.clone(),
            what,
            message: e.to_string(),
        }
    }

    /// Whether this collector may merge partition `p` now.
    pub fn holds(&self, p: u32, now: Instant) -> bool {
        self.held.get(&p).is_some_and(|h| h.valid(now, self.ttl))
    }

    /// The partitions held now.
    pub fn held(&self) -> Vec<u32> {
        self.held.keys().copied().collect()
    }

    /// Reads the bucket: live leases and members.
    pub async fn view(&mut self) -> Result<View, LeaseError> {
        let mut view = View::default();
        // Each partition's key by direct get, which any replica answers: with a node of the
        // cluster down, free partitions are still seen (and taken over).
        let reads = (0..self.partitions).map(|p| {
            let kv = self.kv.clone();
            async move { (p, kv.entry(partition_key(p)).await) }
        });
        for (p, entry) in futures_util::future::join_all(reads).await {
            let entry = entry.map_err(|e| self.err("reading", &e))?;
            if let Some(e) = entry.filter(|e| e.operation == kv::Operation::Put) {
                view.owners
                    .insert(p, String::from_utf8_lossy(&e.value).into_owned());
            }
        }
        // The members from a listing of the keys (an ordered consumer, which a cluster
        // missing a node may not serve for a while): bounded, and the last listing stands
        // in when it does not answer. Only the shares of newcomers depend on it.
        let wait = Self::period(self.ttl) / 2;
        match tokio::time::timeout(wait, self.members()).await {
            Ok(Ok(m)) => self.members_seen = (Some(Instant::now()), m),
            Ok(Err(e)) => log::debug!("{e}"),
            Err(_) => log::debug!(
                "lease bucket `{}`: listing the members timed out",
                self.bucket
            ),
        }
        // A listing older than a lease's life may name collectors dead since: counted in
        // the shares, they would keep their share of partitions free with nobody merging
        // them. Past it, only the owners (and this collector) count until a listing answers.
        if self
            .members_seen
            .0
            .is_some_and(|at| at.elapsed() < self.ttl)
        {
            view.members.clone_from(&self.members_seen.1);
        }
        Ok(view)
    }

    async fn members(&self) -> Result<BTreeSet<String>, LeaseError> {
        let mut keys = self.kv.keys().await.map_err(|e| self.err("listing", &e))?;
        let mut members = BTreeSet::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| self.err("listing", &e))?;
            if let Some(name) = key.strip_prefix(MEMBER) {
                members.insert(name.to_owned());
            }
        }
        Ok(members)
    }

    /// Until when this collector may merge partition `p` (its last renewal's validity).
    pub fn valid_until(&self, p: u32) -> Option<Instant> {
        self.held
            .get(&p)
            .map(|h| h.sent + self.ttl.saturating_sub(MARGIN))
    }

    /// Renews what is held, keeps the membership alive, and takes free partitions up to
    /// this collector's share. Run every [`Leases::period`].
    ///
    /// Bounded: renewals go out together, each given half a period; the rest (membership,
    /// reading the bucket, taking) at most a period, and skipped for this tick past it. A
    /// server slow to answer (a node lost, a leader being elected) must not delay the next
    /// renewals past the leases' validity.
    pub async fn tick(&mut self) -> Result<Tick, LeaseError> {
        let mut tick = self.renew().await;
        self.grow_bounded(&mut tick).await;
        Ok(tick)
    }

    /// The renewals of a tick (bounded: each given half a period), their outcome in `lost`.
    pub async fn renew(&mut self) -> Tick {
        let mut tick = Tick::default();
        let value = bytes::Bytes::from(self.me.clone().into_bytes());
        let ttl = self.ttl;
        let wait = Self::period(ttl) / 2;
        let renewals = std::mem::take(&mut self.held).into_iter().map(|(p, held)| {
            let kv = self.kv.clone();
            let value = value.clone();
            async move {
                let sent = Instant::now();
                if !held.valid(sent, ttl) {
                    return (p, held, Renewal::Lost);
                }
                match tokio::time::timeout(wait, kv.update(partition_key(p), value, held.revision))
                    .await
                {
                    Ok(Ok(revision)) => (p, held, Renewal::Renewed(Held { revision, sent })),
                    Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                        (p, held, Renewal::Lost)
                    }
                    // No answer: still held until its validity ends (retried next tick).
                    _ => (p, held, Renewal::Unanswered),
                }
            }
        });
        for (p, held, renewal) in futures_util::future::join_all(renewals).await {
            match renewal {
                Renewal::Renewed(h) => {
                    self.held.insert(p, h);
                }
                Renewal::Unanswered if held.valid(Instant::now(), ttl) => {
                    self.held.insert(p, held);
                }
                Renewal::Unanswered | Renewal::Lost => tick.lost.push(p),
            }
        }
        tick
    }

    /// The rest of a tick: membership, reading the bucket, taking free partitions; at most
    /// a period. Cut short, what it did stands: a lease taken is in `held` and in
    /// `tick.taken` together (no await between), so none is held without being reported.
    pub async fn grow_bounded(&mut self, tick: &mut Tick) {
        let value = bytes::Bytes::from(self.me.clone().into_bytes());
        match tokio::time::timeout(Self::period(self.ttl), self.grow(&value, tick)).await {
            Ok(Err(e)) => log::warn!("{e}"),
            Ok(Ok(())) => {}
            Err(_) => log::warn!(
                "lease bucket `{}`: no answer within a renewal period; taking resumes next tick",
                self.bucket
            ),
        }
    }

    /// Keeps the membership alive and takes free partitions up to the share.
    async fn grow(&mut self, value: &bytes::Bytes, tick: &mut Tick) -> Result<(), LeaseError> {
        let member = format!("{MEMBER}{}", self.me);
        self.member = Some(
            self.kv
                .put(&member, value.clone())
                .await
                .map_err(|e| self.err("registering", &e))?,
        );
        let view = self.view().await?;
        let plan = plan(self.partitions, &self.me, &view);
        for p in plan.take {
            let sent = Instant::now();
            match self.kv.create(partition_key(p), value.clone()).await {
                Ok(revision) => {
                    self.held.insert(p, Held { revision, sent });
                    tick.taken.push(p);
                }
                // Another collector holds it, or won the race.
                Err(e) => log::debug!("taking partition {p}: {e}"),
            }
        }
        tick.release = plan
            .release
            .into_iter()
            .filter(|p| self.held.contains_key(p))
            .collect();
        Ok(())
    }

    /// Gives partition `p` up (after its last checkpoint): another collector may take it at
    /// once instead of waiting for the lease to expire.
    pub async fn release(&mut self, p: u32) -> Result<(), LeaseError> {
        let Some(held) = self.held.remove(&p) else {
            return Ok(());
        };
        // Bounded like a renewal: the keeper renews the other leases right after.
        match tokio::time::timeout(
            Self::period(self.ttl) / 2,
            self.kv
                .delete_expect_revision(partition_key(p), Some(held.revision)),
        )
        .await
        {
            Ok(r) => r.map_err(|e| self.err("releasing", &e)),
            Err(_) => Err(self.err("releasing", &"no answer (the lease will expire)")),
        }
    }

    /// Stops renewing partition `p` without deleting it: it expires (no checkpoint to hand
    /// over, or someone else already holds it).
    pub fn forget(&mut self, p: u32) {
        self.held.remove(&p);
    }

    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// A clean stop: every lease released and the membership removed.
    pub async fn release_all(&mut self) -> Result<(), LeaseError> {
        for p in self.held() {
            self.release(p).await?;
        }
        if self.member.take().is_some() {
            self.kv
                .delete(format!("{MEMBER}{}", self.me))
                .await
                .map_err(|e| self.err("leaving", &e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collector::testnats::NatsServer;

    fn view(owners: &[(u32, &str)], members: &[&str]) -> View {
        View {
            owners: owners.iter().map(|(p, o)| (*p, (*o).to_owned())).collect(),
            members: members.iter().map(|m| (*m).to_owned()).collect(),
        }
    }

    fn sorted(mut v: Vec<u32>) -> Vec<u32> {
        v.sort_unstable();
        v
    }

    /// Alone, a collector takes every partition; the start offset depends on its name only.
    #[test]
    fn a_lone_collector_takes_everything() {
        let p = plan(8, "c1", &View::default());
        assert_eq!(sorted(p.take.clone()), (0..8).collect::<Vec<_>>());
        assert!(p.release.is_empty());
        assert_eq!(p, plan(8, "c1", &View::default()), "deterministic");
        assert_eq!(plan(1, "c1", &View::default()).take, vec![0]);
        assert_eq!(plan(0, "c1", &View::default()), Plan::default());
    }

    /// A newcomer is counted through its membership before it holds anything: the holder
    /// of everything gives up its highest partitions down to its share, the newcomer takes
    /// the freed ones, and neither takes what the other holds.
    #[test]
    fn a_newcomer_gets_its_share() {
        let all: Vec<(u32, &str)> = (0..8).map(|p| (p, "c1")).collect();
        let both = ["c1", "c2"];
        assert_eq!(
            plan(8, "c1", &view(&all, &both)),
            Plan {
                take: Vec::new(),
                release: vec![4, 5, 6, 7],
            }
        );
        assert_eq!(plan(8, "c2", &view(&all, &both)), Plan::default());
        let half: Vec<(u32, &str)> = (0..4).map(|p| (p, "c1")).collect();
        assert_eq!(
            sorted(plan(8, "c2", &view(&half, &both)).take),
            vec![4, 5, 6, 7]
        );
        assert_eq!(plan(8, "c1", &view(&half, &both)), Plan::default());
        // Without the membership key (not registered yet) c1 does not know of c2.
        assert_eq!(plan(8, "c1", &view(&all, &["c1"])), Plan::default());
    }

    /// A dead collector's leases expire (gone from the view): the survivors take them,
    /// each up to its share, so that every partition has an owner again.
    #[test]
    fn a_dead_collectors_partitions_are_taken_over() {
        // c1 and c2 held 4 each; c2 died: its leases and membership expired.
        let left: Vec<(u32, &str)> = (0..4).map(|p| (p, "c1")).collect();
        let p = plan(8, "c1", &view(&left, &["c1"]));
        assert_eq!(sorted(p.take), vec![4, 5, 6, 7]);
        // Three collectors, one dies: the two left cover all 9 partitions between them.
        let mut owners: BTreeMap<u32, String> = (0..9)
            .map(|p| (p, ["a", "b", "c"][p as usize % 3].to_owned()))
            .collect();
        owners.retain(|_, o| o != "c");
        let mut v = View {
            owners,
            members: ["a", "b"].iter().map(|s| (*s).to_owned()).collect(),
        };
        for me in ["a", "b", "a", "b"] {
            for p in plan(9, me, &v).take {
                v.owners.entry(p).or_insert_with(|| me.to_owned());
            }
        }
        assert_eq!(v.owners.len(), 9, "{v:?}");
        for me in ["a", "b"] {
            let n = v.owners.values().filter(|o| *o == me).count();
            assert!(n <= 5, "{me} holds {n}, over ceil(9/2)");
        }
    }

    /// Shares: ceil(partitions / live collectors); owners count as live even without a
    /// membership key, and the collector itself always counts.
    #[test]
    fn shares_round_up() {
        assert_eq!(share(8, "a", &View::default()), 8);
        assert_eq!(share(8, "a", &view(&[(0, "b")], &[])), 4);
        assert_eq!(share(8, "a", &view(&[], &["b", "c"])), 3);
        assert_eq!(share(2, "a", &view(&[], &["b", "c"])), 1);
        assert_eq!(share(1, "a", &view(&[(0, "b")], &["b"])), 1);
        // Another collector holds the only partition: nothing to take.
        assert_eq!(plan(1, "a", &view(&[(0, "b")], &["b"])), Plan::default());
    }

    /// A lease stops being used MARGIN before the server may drop it, counted from when
    /// its renewal was sent.
    #[test]
    fn a_lease_ends_before_the_server_forgets_it() {
        let t0 = Instant::now();
        let h = Held {
            revision: 3,
            sent: t0,
        };
        let ttl = DEFAULT_TTL;
        assert!(h.valid(t0, ttl));
        assert!(h.valid(t0 + ttl - MARGIN - Duration::from_millis(1), ttl));
        assert!(!h.valid(t0 + ttl - MARGIN, ttl));
        assert!(!h.valid(t0 + ttl, ttl));
        // A clock read before the renewal was sent (another thread) is not "expired".
        assert!(
            Held {
                revision: 3,
                sent: t0 + Duration::from_secs(1)
            }
            .valid(t0, ttl)
        );
        assert!(Leases::period(ttl) + MARGIN < ttl);
    }

    #[test]
    fn partition_keys_round_trip() {
        assert_eq!(partition_key(7), "p7");
        assert_eq!(parse_partition_key("p7", 8), Some(7));
        assert_eq!(parse_partition_key("p8", 8), None, "out of range");
        assert_eq!(parse_partition_key("p07", 8), None, "not canonical");
        assert_eq!(parse_partition_key("member.p1", 8), None);
        assert_eq!(parse_partition_key("px", 8), None);
    }

    /// A real nats-server (skipped when none is installed, unless `SENSOR_REQUIRE_NATS` is
    /// set): two collectors split four partitions, one stops renewing (as after kill -9),
    /// the other takes its partitions once the leases expire, and never while the dead one
    /// could still have been merging them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn leases_move_to_the_survivor_against_a_real_server() {
        let Some(server) = NatsServer::start_or_skip("sensor-lease") else {
            return;
        };
        let ttl = Duration::from_secs(6);
        let connect = || async {
            let client = async_nats::connect(server.url.as_str())
                .await
                .expect("connect");
            jetstream::new(client)
        };
        let (js1, js2) = (connect().await, connect().await);
        let mut c1 = Leases::open(&js1, "SENSOR", 1, "c1", 4, ttl)
            .await
            .expect("open c1");
        let t = c1.tick().await.expect("tick");
        assert_eq!(sorted(t.taken), vec![0, 1, 2, 3], "alone: everything");
        let mut c2 = Leases::open(&js2, "SENSOR", 1, "c2", 4, ttl)
            .await
            .expect("open c2");
        assert_eq!(c2.tick().await.expect("tick"), Tick::default(), "all held");
        // c1 sees c2's membership and gives up its share's excess.
        let t = c1.tick().await.expect("tick");
        assert_eq!(t.release, vec![2, 3]);
        for p in t.release {
            c1.release(p).await.expect("release");
        }
        assert_eq!(sorted(c2.tick().await.expect("tick").taken), vec![2, 3]);
        assert_eq!(c1.held(), vec![0, 1]);
        assert_eq!(c2.held(), vec![2, 3]);
        let v = c2.view().await.expect("view");
        assert_eq!(v.owners.values().filter(|o| *o == "c1").count(), 2);
        assert_eq!(v.members.len(), 2);
        // c1 renews once more, then dies (no release).
        c1.tick().await.expect("tick");
        let died = Instant::now();
        let mut taken = Vec::new();
        while taken.len() < 2 {
            assert!(
                died.elapsed() < ttl + Duration::from_secs(8),
                "c1's partitions were not taken over: {taken:?}"
            );
            tokio::time::sleep(Leases::period(ttl)).await;
            let t = c2.tick().await.expect("tick");
            assert!(t.lost.is_empty(), "{t:?}");
            let now = Instant::now();
            for p in t.taken {
                assert!(
                    !c1.holds(p, now),
                    "p{p} taken while c1 could still merge it"
                );
                taken.push(p);
            }
        }
        assert_eq!(sorted(taken), vec![0, 1]);
        assert!(died.elapsed() >= ttl - MARGIN, "{:?}", died.elapsed());
        assert_eq!(c2.held(), vec![0, 1, 2, 3]);
        // c1 comes back with its old state: its renewals are refused, its leases lost.
        let t = c1.tick().await.expect("tick");
        assert!(t.taken.is_empty(), "{t:?}");
        assert_eq!(sorted(t.lost), vec![0, 1]);
        c1.release_all().await.expect("leave");
        c2.release_all().await.expect("leave");
        assert_eq!(c2.view().await.expect("view"), View::default());
    }
}
