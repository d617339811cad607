//! Several collectors sharing one fleet (`[nats] partitions` > 1; docs/fleet.md, "Several
//! collectors"): the records are partitioned by client key, each partition is merged by the
//! one collector holding its lease ([`super::lease`]), and any collector answers the fleet
//! view by asking each partition's holder.
//!
//! A held partition is a state of its own ([`Shared::partition`]) fed by its own stream
//! `<stream>-p<N>` through the durable consumer `<consumer>-p<N>`, exactly as the single
//! stream is ([`super::nats`]: strictly in stream order, resuming after the sequence the
//! state covers). Its fleet rules run on it; partition 0 also carries every agent's sketch
//! and publishes the hot cells.
//!
//! Checkpoints. The state of a partition lives in NATS, not on a collector's disk, so that
//! whoever takes the lease next continues exactly: every `snapshot_interval_secs` (and before
//! a partition is released) its snapshot (gzip JSON) is written in chunks under an immutable
//! name into the key-value bucket `<stream>-ckpt`, then the key `p<N>` there is pointed at it
//! with the revision this holder last wrote (fencing: a new holder rewrites the key when it
//! takes the lease, so a former holder that stalled past its lease can never point it back
//! to an older state). Chunks in a key-value bucket rather than JetStream's object store:
//! both are chunked messages, but key-value reads are direct gets that any replica answers,
//! while the object store reads through a consumer, which nats-server 2.9 could not create
//! for a while after losing a node (seen in the failover test). A new holder loads the
//! checkpoint and resumes the stream right after the sequence it covers: what the former
//! holder merged since is merged again, into a state that lacks it.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use async_nats::jetstream::{self, kv};
use futures_util::StreamExt as _;
use log::{info, warn};
use serde::{Deserialize, Serialize};

use super::{
    alerts::{self, AlertStream},
    ckpt,
    config::CollectorConfig,
    lease::Leases,
    nats::{Ended, HotPublisher, Source, TIMEOUT},
    rings,
    shared::{SNAPSHOT_VERSION, Shared, Snapshot},
};
use crate::{
    detect::{Alert, Detector, DetectorState, RingCandidate, Rings},
    formats::Record,
    model::{
        aggregate::Now,
        report::{ClientRow, Query, client_rows, sort_and_limit},
    },
    ship::partition::partition_stream,
};

/// How long a partition's holder may take to answer a view request.
pub const VIEW_TIMEOUT: Duration = Duration::from_secs(2);

/// What this collector holds, for health, metrics and the fleet view.
pub struct Status {
    pub count: u32,
    pub instance: String,
    prefix: String,
    /// The states of the partitions held now.
    parts: Mutex<BTreeMap<u32, Arc<Shared>>>,
    /// The NATS connection of the current session (view requests go through it).
    client: Mutex<Option<async_nats::Client>>,
    pub taken: AtomicU64,
    pub lost: AtomicU64,
    pub released: AtomicU64,
    pub checkpoints: AtomicU64,
    pub checkpoint_failures: AtomicU64,
    /// The alert forwarder's counters (while this collector holds partition 0).
    pub forwarder: Arc<alerts::ForwardCounters>,
    /// The ring rule's rounds over every partition (while this collector holds partition 0).
    pub rings: Arc<rings::RingCounters>,
    stop: tokio::sync::watch::Sender<bool>,
    stopped: tokio::sync::watch::Sender<bool>,
}

/// Why the fleet view could not be gathered.
#[derive(Debug, thiserror::Error)]
pub enum GatherError {
    #[error("not connected to NATS")]
    NotConnected,
    #[error("partition {0} did not answer (a failover may be under way): {1}")]
    Unanswered(u32, String),
    #[error("partition {0} answered something unreadable: {1}")]
    Unreadable(u32, String),
}

/// A view request to a partition's holder.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct ViewRequest {
    /// `clients`, `alerts` or `ring-candidates`.
    pub what: String,
    /// The `/v1/clients` query string.
    #[serde(default)]
    pub query: String,
    /// Ring candidates: the round and the page (the index of its first candidate).
    #[serde(default)]
    pub round: u64,
    #[serde(default)]
    pub page: usize,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct ViewAnswer {
    #[serde(default)]
    pub rows: Vec<ClientRow>,
    #[serde(default)]
    pub alerts: Vec<Alert>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<RingCandidate>,
    /// Ring candidates: where the next page starts, if there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_page: Option<usize>,
    /// Ring candidates the holder left out of the round (the lightest, over its bound).
    #[serde(default)]
    pub cut: u64,
    #[serde(default)]
    pub error: String,
}

impl ViewAnswer {
    pub(super) fn error(error: String) -> Self {
        Self {
            error,
            ..Self::default()
        }
    }
}

impl Status {
    pub fn held(&self) -> Vec<u32> {
        self.parts
            .lock()
            .map(|p| p.keys().copied().collect())
            .unwrap_or_default()
    }

    /// The partitions' states held now (for health and metrics).
    pub(super) fn states(&self) -> Vec<(u32, Arc<Shared>)> {
        self.parts
            .lock()
            .map(|p| p.iter().map(|(k, v)| (*k, v.clone())).collect())
            .unwrap_or_default()
    }

    pub fn health(&self) -> serde_json::Value {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "count": self.count,
            "instance": self.instance,
            "held": self.held(),
            "taken": n(&self.taken),
            "lost": n(&self.lost),
            "released": n(&self.released),
            "checkpoints": n(&self.checkpoints),
            "checkpoint_failures": n(&self.checkpoint_failures),
            "alerts_forwarded": n(&self.forwarder.forwarded),
            "alerts_unreadable": n(&self.forwarder.unreadable),
            "alerts_missing": n(&self.forwarder.missing),
            "ring_rounds": n(&self.rings.rounds),
            "ring_rounds_incomplete": n(&self.rings.incomplete),
            "ring_candidates": n(&self.rings.candidates),
            "ring_candidates_cut": n(&self.rings.cut),
        })
    }

    /// Stops merging: checkpoints and releases what is held (a clean stop), within a bound.
    pub async fn stop(&self) {
        let mut stopped = self.stopped.subscribe();
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), stopped.wait_for(|s| *s)).await;
    }

    async fn ask_all(&self, request: &ViewRequest) -> Result<Vec<ViewAnswer>, GatherError> {
        let (client, prefix) = self.asker()?;
        let body =
            serde_json::to_vec(request).map_err(|e| GatherError::Unreadable(0, e.to_string()))?;
        let asks = (0..self.count).map(|p| ask(&client, prefix, p, body.clone(), VIEW_TIMEOUT));
        futures_util::future::try_join_all(asks).await
    }

    /// The connection view requests go through, and the subjects' prefix.
    pub(super) fn asker(&self) -> Result<(async_nats::Client, &str), GatherError> {
        let client = self
            .client
            .lock()
            .ok()
            .and_then(|c| c.clone())
            .ok_or(GatherError::NotConnected)?;
        Ok((client, &self.prefix))
    }

    /// `/v1/clients` over the whole fleet: each partition's top for `q` (keys are disjoint
    /// across partitions, so the top of their union is the fleet's top).
    pub async fn clients(&self, q: &Query, query: &str) -> Result<Vec<ClientRow>, GatherError> {
        let answers = self
            .ask_all(&ViewRequest {
                what: "clients".into(),
                query: query.to_owned(),
                round: 0,
                page: 0,
            })
            .await?;
        let mut rows: Vec<ClientRow> = answers.into_iter().flat_map(|a| a.rows).collect();
        sort_and_limit(&mut rows, q);
        Ok(rows)
    }

    /// `/v1/alerts` over the whole fleet: open first, newest first, as one collector lists them.
    pub async fn alerts(&self) -> Result<Vec<Alert>, GatherError> {
        let answers = self
            .ask_all(&ViewRequest {
                what: "alerts".into(),
                query: String::new(),
                round: 0,
                page: 0,
            })
            .await?;
        let mut v: Vec<Alert> = answers.into_iter().flat_map(|a| a.alerts).collect();
        v.sort_by(|a, b| {
            b.is_open()
                .cmp(&a.is_open())
                .then(b.last_seen_ms.cmp(&a.last_seen_ms))
        });
        Ok(v)
    }
}

/// One view request to partition `p`'s holder; an answer that is an error is one.
pub(super) async fn ask(
    client: &async_nats::Client,
    prefix: &str,
    p: u32,
    body: Vec<u8>,
    within: Duration,
) -> Result<ViewAnswer, GatherError> {
    let subject = view_subject(prefix, p);
    let answer = tokio::time::timeout(within, client.request(subject, body.into()))
        .await
        .map_err(|_| GatherError::Unanswered(p, "timed out".into()))?
        .map_err(|e| GatherError::Unanswered(p, e.to_string()))?;
    let answer: ViewAnswer = serde_json::from_slice(&answer.payload)
        .map_err(|e| GatherError::Unreadable(p, e.to_string()))?;
    if !answer.error.is_empty() {
        return Err(GatherError::Unreadable(p, answer.error));
    }
    Ok(answer)
}

/// Where partition `p`'s holder answers view requests.
pub fn view_subject(prefix: &str, p: u32) -> String {
    format!("{prefix}-view.p{p}")
}

/// A partition held: its state and the tasks that feed and serve it.
struct Part {
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _hot: Option<HotPublisher>,
    /// The revision of `ckpt.p<N>` this holder wrote last, and the object it names.
    ckpt_revision: u64,
    object: String,
}

impl Drop for Part {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The collector's side of the group: leases, the partitions held, their checkpoints.
pub struct Group {
    source: Arc<Source>,
    config: CollectorConfig,
    front: Arc<Shared>,
    status: Arc<Status>,
    instance: String,
}

/// What a session talks to.
struct Stores {
    client: async_nats::Client,
    streams: Vec<jetstream::stream::Stream>,
    /// Checkpoint pointers `p<N>`, the checkpoints' chunks, the forwarder's position.
    ckpt: kv::Store,
    /// The bucket's stream (old checkpoints are purged from it, tombstones and all).
    ckpt_stream: jetstream::stream::Stream,
    ckpt_bucket: String,
    /// Bytes of a checkpoint chunk (under the server's `max_payload`).
    chunk: usize,
    /// `<stream>-alerts`, and this collector's publisher into it.
    alerts: jetstream::stream::Stream,
    publisher: Arc<AlertStream>,
}

impl Stores {
    fn chunks(&self) -> ckpt::Chunks<'_> {
        ckpt::Chunks {
            kv: &self.ckpt,
            stream: &self.ckpt_stream,
            bucket: &self.ckpt_bucket,
            size: self.chunk,
        }
    }
}

impl Group {
    pub fn new(
        source: Source,
        config: &CollectorConfig,
        front: Arc<Shared>,
    ) -> anyhow::Result<Self> {
        let c = &config.nats;
        let instance = if c.instance.is_empty() {
            crate::alerting::hostname()
        } else {
            c.instance.clone()
        };
        anyhow::ensure!(
            crate::net::nats::valid_name(&instance),
            "[nats] instance: the host name `{instance}` is not a valid instance name (letters, digits, - and _): set `instance`"
        );
        let (stop, _) = tokio::sync::watch::channel(false);
        let (stopped, _) = tokio::sync::watch::channel(false);
        let status = Arc::new(Status {
            count: c.partitions,
            instance: instance.clone(),
            prefix: c.subject_prefix.clone(),
            parts: Mutex::default(),
            client: Mutex::default(),
            taken: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            released: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            checkpoint_failures: AtomicU64::new(0),
            forwarder: Arc::default(),
            rings: Arc::default(),
            stop,
            stopped,
        });
        Ok(Self {
            source: Arc::new(source),
            config: config.clone(),
            front,
            status,
            instance,
        })
    }

    pub fn status(&self) -> Arc<Status> {
        self.status.clone()
    }

    /// Runs until stopped; connection and server errors are retried with a growing delay
    /// (what was held is dropped at once: its leases cannot be renewed meanwhile).
    pub async fn run(self) {
        let mut delay = Duration::from_millis(500);
        let mut stop = self.status.stop.subscribe();
        loop {
            match self.session(&mut delay).await {
                Ok(()) => break,
                Err(e) => warn!("collector group `{}`: {e:#}; retrying", self.instance),
            }
            self.set_parts(&BTreeMap::new());
            if let Ok(mut c) = self.status.client.lock() {
                *c = None;
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                () = stopped(&mut stop) => break,
            }
            delay = (delay * 2).min(Duration::from_secs(10));
        }
        let _ = self.status.stopped.send(true);
    }

    fn set_parts(&self, parts: &BTreeMap<u32, Part>) {
        if let Ok(mut p) = self.status.parts.lock() {
            *p = parts.iter().map(|(k, v)| (*k, v.shared.clone())).collect();
        }
    }

    async fn stores(&self) -> anyhow::Result<Stores> {
        let c = &self.config.nats;
        let client = self.source.endpoint.connect(TIMEOUT).await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(TIMEOUT)
            .build(client.clone());
        let mut streams = Vec::new();
        for p in 0..c.partitions {
            let name = partition_stream(&c.stream, c.partitions, p);
            streams.push(
                self.source
                    .stream_named(&js, &name, format!("{}.p{p}.>", c.subject_prefix))
                    .await?,
            );
        }
        let replicas = c.replicas.max(1);
        // Made as async-nats makes them, directly: its `create_key_value` cannot read
        // nats-server 2.9's account information (see `lease`). No max_age: a checkpoint
        // pointer must outlive its holder.
        let ckpt_bucket = format!("{}-ckpt", c.stream);
        let ckpt_stream = js
            .get_or_create_stream(super::lease::bucket_stream(
                &ckpt_bucket,
                "sensor collectors' checkpoint pointers",
                Duration::ZERO,
                replicas,
            ))
            .await
            .with_context(|| format!("creating the bucket `{ckpt_bucket}`"))?;
        let ckpt = js
            .get_key_value(&ckpt_bucket)
            .await
            .with_context(|| format!("opening the bucket `{ckpt_bucket}`"))?;
        // A chunk and its headers within one message.
        let chunk = client
            .server_info()
            .max_payload
            .saturating_sub(4096)
            .max(4096);
        let alerts_stream = alerts::stream_name(&c.stream);
        let alerts = js
            .get_or_create_stream(jetstream::stream::Config {
                name: alerts_stream.clone(),
                description: Some("sensor collectors' alert events, once per id".into()),
                subjects: vec![format!("{}-alerts.>", c.subject_prefix)],
                storage: jetstream::stream::StorageType::File,
                num_replicas: replicas,
                max_age: Duration::from_secs(c.max_age_secs),
                duplicate_window: alerts::DUPLICATE_WINDOW,
                ..Default::default()
            })
            .await
            .with_context(|| format!("creating the stream `{alerts_stream}`"))?;
        let publisher = AlertStream::start(js.clone(), alerts_stream);
        Ok(Stores {
            client,
            streams,
            ckpt,
            ckpt_stream,
            ckpt_bucket,
            chunk,
            alerts,
            publisher,
        })
    }

    /// One connection: the leases are kept by a task of their own (never delayed by a
    /// checkpoint or a slow server); this loop starts, checkpoints, evaluates and hands over
    /// the partitions it reports. Ok when stopped.
    async fn session(&self, delay: &mut Duration) -> anyhow::Result<()> {
        let c = &self.config.nats;
        let stores = self.stores().await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(TIMEOUT)
            .build(stores.client.clone());
        let ttl = Duration::from_secs(c.lease_ttl_secs);
        let leases = Leases::open(
            &js,
            &c.stream,
            c.replicas,
            &self.instance,
            c.partitions,
            ttl,
        )
        .await
        .context("opening the lease bucket")?;
        if let Ok(mut client) = self.status.client.lock() {
            *client = Some(stores.client.clone());
        }
        info!(
            "collector `{}` sharing {} partitions of `{}` at {}",
            self.instance,
            c.partitions,
            c.stream,
            self.source.target()
        );
        *delay = Duration::from_millis(500);
        let valid = Arc::new(ValidUntil::default());
        let (keeper, mut ticks) = Keeper::start(leases, ttl, valid.clone());
        let mut parts: BTreeMap<u32, Part> = BTreeMap::new();
        let mut check = tokio::time::interval(Duration::from_millis(250));
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut save = tokio::time::interval(Duration::from_secs(
            self.config.state.snapshot_interval_secs,
        ));
        save.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut detect =
            tokio::time::interval(Duration::from_secs(self.config.detect.interval_secs));
        detect.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let alerts_path = crate::alerting::alerts_path(&self.config.detect, &self.config.state.dir);
        let mut stop = self.status.stop.subscribe();
        loop {
            tokio::select! {
                () = stopped(&mut stop) => {
                    for (p, part) in std::mem::take(&mut parts) {
                        self.hand_over(&stores, &keeper, p, part).await;
                    }
                    self.set_parts(&parts);
                    keeper.leave().await;
                    return Ok(());
                }
                t = ticks.recv() => {
                    let Some(t) = t else {
                        anyhow::bail!("the lease keeper stopped");
                    };
                    for p in t.lost {
                        if parts.remove(&p).is_some() {
                            self.status.lost.fetch_add(1, Ordering::Relaxed);
                            warn!("lost the lease of partition {p}: stopped merging it");
                        }
                    }
                    for p in t.taken {
                        match self.take(&stores, p, &valid).await {
                            Ok(part) => {
                                parts.insert(p, part);
                                self.status.taken.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                warn!("cannot start partition {p}: {e:#}; giving it up");
                                keeper.release(p).await;
                            }
                        }
                    }
                    for p in t.release {
                        if let Some(part) = parts.remove(&p) {
                            self.hand_over(&stores, &keeper, p, part).await;
                        }
                    }
                    self.set_parts(&parts);
                }
                _ = check.tick() => {
                    // Past its validity a lease is not ours, whatever the keeper hears.
                    let gone: Vec<u32> = parts.keys().copied().filter(|p| !valid.valid(*p)).collect();
                    for p in &gone {
                        parts.remove(p);
                        // The keeper must not renew (and so hold) a lease nobody merges.
                        keeper.forget(*p).await;
                        self.status.lost.fetch_add(1, Ordering::Relaxed);
                        warn!("the lease of partition {p} could not be renewed in time: stopped merging it");
                    }
                    if !gone.is_empty() {
                        self.set_parts(&parts);
                    }
                }
                _ = save.tick() => {
                    let mut fenced = Vec::new();
                    for (p, part) in &mut parts {
                        match self.checkpoint(&stores, *p, part).await {
                            Ok(()) => {}
                            Err(Checkpoint::Fenced) => fenced.push(*p),
                            Err(Checkpoint::Failed(e)) => {
                                self.status.checkpoint_failures.fetch_add(1, Ordering::Relaxed);
                                warn!("checkpoint of partition {p}: {e:#}");
                            }
                        }
                    }
                    for p in fenced {
                        parts.remove(&p);
                        keeper.forget(p).await;
                        self.status.lost.fetch_add(1, Ordering::Relaxed);
                        warn!("partition {p} was taken over (its checkpoint pointer moved): stopped merging it");
                    }
                    self.set_parts(&parts);
                }
                _ = detect.tick() => {
                    for (p, part) in &parts {
                        // Rings span partitions: partition 0's holder runs them (`rings`).
                        let rings = if *p == 0 { Rings::Gathered } else { Rings::Elsewhere };
                        let events = part.shared.with_fleet(|f| {
                            let events = f.state.evaluate(&mut f.detector, Now::system(), rings);
                            let records: Vec<Record> = events.iter().map(Record::new).collect();
                            f.forward(&records, alerts::Source::Fleet);
                            events
                        });
                        if let Ok(events) = events {
                            let lost = crate::alerting::record_alerts(&alerts_path, &events);
                            self.front.count_alert_log_lost(lost);
                        }
                    }
                }
            }
        }
    }

    /// Stops merging `p`, checkpoints it and releases its lease (rebalancing, or a clean
    /// stop). Without a checkpoint the lease is left to expire (no longer renewed): the next
    /// holder then starts from the last good one, which the stream's replay brings up to
    /// date anyway.
    async fn hand_over(&self, stores: &Stores, keeper: &Keeper, p: u32, mut part: Part) {
        for t in &part.tasks {
            t.abort();
        }
        match self.checkpoint(stores, p, &mut part).await {
            Ok(()) => {
                if keeper.release(p).await {
                    self.status.released.fetch_add(1, Ordering::Relaxed);
                    info!("released partition {p}");
                }
            }
            Err(Checkpoint::Fenced) => keeper.forget(p).await,
            Err(Checkpoint::Failed(e)) => {
                self.status
                    .checkpoint_failures
                    .fetch_add(1, Ordering::Relaxed);
                warn!("last checkpoint of partition {p}: {e:#}; its lease is left to expire");
                keeper.forget(p).await;
            }
        }
    }

    /// Takes over partition `p` (its lease just won): fences the checkpoint pointer, loads
    /// the checkpoint, starts its consumer, its view responder (and for partition 0 the hot
    /// cells' publisher).
    async fn take(&self, stores: &Stores, p: u32, valid: &Arc<ValidUntil>) -> anyhow::Result<Part> {
        let key = format!("p{p}");
        let entry = stores
            .ckpt
            .entry(key.clone())
            .await
            .with_context(|| format!("reading the checkpoint pointer {key}"))?;
        let (object, ckpt_revision) = match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let name = String::from_utf8_lossy(&e.value).into_owned();
                // Rewritten as it is: from now on a former holder's pointer update fails.
                let revision = stores
                    .ckpt
                    .update(&key, e.value.clone(), e.revision)
                    .await
                    .with_context(|| format!("fencing the checkpoint pointer {key}"))?;
                (name, revision)
            }
            _ => {
                let revision = stores
                    .ckpt
                    .create(&key, bytes::Bytes::new())
                    .await
                    .with_context(|| format!("creating the checkpoint pointer {key}"))?;
                (String::new(), revision)
            }
        };
        let (mut state, detector_state) = if object.is_empty() {
            Default::default()
        } else {
            self.load(stores, &object).await?
        };
        let cc = &self.config.clients;
        state
            .agg
            .configure(cc.max_clients, cc.group_prefix_v4, cc.group_prefix_v6);
        state.sketch = crate::ship::sketch::FleetSketch::new(self.config.sketch.clone());
        let seq = state.nats_seq;
        let detector = Detector::new(
            crate::alerting::detect_settings(
                &self.config.detect,
                // The same at every holder: a successor's events carry the same ids.
                format!("fleet@{}-p{p}", self.config.nats.stream),
            )?,
            detector_state,
        );
        let journal = self
            .config
            .state
            .dir
            .join(format!("p{p}"))
            .join(super::JOURNAL);
        let shared = Arc::new(self.front.partition(
            state,
            detector,
            journal,
            (
                stores.publisher.clone(),
                alerts::subject(&self.config.nats.subject_prefix, p),
            ),
        )?);
        // Everything fallible before the tasks start: a failed take leaves none running.
        let outputs = self.front.with_fleet(|f| f.outputs.clone())?;
        let mut stream = stores.streams[p as usize].clone();
        let end = stream
            .info()
            .await
            .with_context(|| format!("reading the state of partition {p}'s stream"))?
            .state
            .last_sequence;
        info!(
            "took partition {p}: checkpoint `{}` at stream sequence {seq}, stream at {end}",
            if object.is_empty() { "(none)" } else { &object }
        );
        let consume = tokio::spawn(consume(
            self.source.clone(),
            stores.streams[p as usize].clone(),
            p,
            shared.clone(),
            valid.clone(),
        ));
        let view = tokio::spawn(serve_view(
            stores.client.clone(),
            view_subject(&self.config.nats.subject_prefix, p),
            shared.clone(),
            Serving {
                p,
                caught_up_at: end,
                valid: valid.clone(),
                max_payload: stores.client.server_info().max_payload,
            },
        ));
        let mut tasks = vec![consume, view];
        // Partition 0's holder publishes the hot sketch cells and forwards the alerts.
        let hot = (p == 0).then(|| {
            HotPublisher::start(
                stores.client.clone(),
                &self.config.nats.subject_prefix,
                &shared,
            )
        });
        if p == 0 {
            tasks.push(tokio::spawn(rings::run(rings::Round {
                status: self.status.clone(),
                p0: shared.clone(),
                valid: valid.clone(),
                every: Duration::from_secs(self.config.detect.interval_secs),
                alerts_path: crate::alerting::alerts_path(
                    &self.config.detect,
                    &self.config.state.dir,
                ),
                front: self.front.clone(),
            })));
            tasks.push(tokio::spawn(alerts::forward(
                stores.alerts.clone(),
                format!("{}-alerts", self.config.nats.consumer),
                stores.ckpt.clone(),
                outputs,
                self.status.forwarder.clone(),
            )));
        }
        Ok(Part {
            shared,
            tasks,
            _hot: hot,
            ckpt_revision,
            object,
        })
    }

    async fn load(
        &self,
        stores: &Stores,
        pointer: &str,
    ) -> anyhow::Result<(super::fleet::FleetState, DetectorState)> {
        let (name, chunks) = ckpt::parse_pointer(pointer)
            .with_context(|| format!("the checkpoint pointer `{pointer}` is unreadable"))?;
        let gz = stores.chunks().read(name, chunks).await?;
        let mut json = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut json)
            .with_context(|| format!("decompressing the checkpoint `{name}`"))?;
        let s: Snapshot = serde_json::from_slice(&json)
            .with_context(|| format!("decoding the checkpoint `{name}`"))?;
        anyhow::ensure!(
            s.version == SNAPSHOT_VERSION,
            "the checkpoint `{name}` has format {} (this collector reads {SNAPSHOT_VERSION})",
            s.version
        );
        Ok((s.fleet, s.detector))
    }

    /// Writes the partition's checkpoint and points `ckpt.p<N>` at it (fenced by revision).
    async fn checkpoint(&self, stores: &Stores, p: u32, part: &mut Part) -> Result<(), Checkpoint> {
        let fail = |e: anyhow::Error| Checkpoint::Failed(e);
        let (json, seq, queued) = part.shared.checkpoint().map_err(fail)?;
        // Every alert event merged before the snapshot must be in the alerts stream first:
        // a successor starts from this state and would never publish them.
        if !stores
            .publisher
            .acked_through(queued, Duration::from_secs(10))
            .await
        {
            return Err(fail(anyhow::anyhow!(
                "the alerts stream has not acknowledged the partition's alert events"
            )));
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&json)
            .and_then(|()| gz.flush())
            .map_err(|e| fail(e.into()))?;
        let gz = gz.finish().map_err(|e| fail(e.into()))?;
        let name = format!(
            "p{p}-{}-{seq}-{}",
            part.ckpt_revision,
            Now::system().unix_ms
        );
        let (chunks, first) = stores
            .chunks()
            .write(&name, &gz)
            .await
            .map_err(|e| fail(e.into()))?;
        let pointer = format!("{name} {chunks}");
        let key = format!("p{p}");
        match stores
            .ckpt
            .update(
                &key,
                bytes::Bytes::from(pointer.clone().into_bytes()),
                part.ckpt_revision,
            )
            .await
        {
            Ok(revision) => {
                part.ckpt_revision = revision;
                let old = std::mem::replace(&mut part.object, pointer);
                stores.chunks().sweep(p, first, &old).await;
                self.status.checkpoints.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                stores.chunks().drop(&pointer).await;
                Err(Checkpoint::Fenced)
            }
            Err(e) => {
                // No answer is not a no: the server may have moved the pointer. Read it
                // back before purging what it may now name.
                match stores.ckpt.entry(key.clone()).await {
                    Ok(Some(entry)) if entry.value.as_ref() == pointer.as_bytes() => {
                        part.ckpt_revision = entry.revision;
                        let old = std::mem::replace(&mut part.object, pointer);
                        stores.chunks().sweep(p, first, &old).await;
                        self.status.checkpoints.fetch_add(1, Ordering::Relaxed);
                        Ok(())
                    }
                    Ok(_) => {
                        stores.chunks().drop(&pointer).await;
                        Err(fail(anyhow::anyhow!("pointing {key} at `{name}`: {e}")))
                    }
                    // Unknown either way: keep the chunks (a later checkpoint's pointer
                    // moves past them, and its sweep deletes them).
                    Err(e2) => Err(fail(anyhow::anyhow!(
                        "pointing {key} at `{name}`: {e}; reading it back: {e2}"
                    ))),
                }
            }
        }
    }
}

/// Until when this collector may merge each partition it holds: moved on by every renewal,
/// read by the partition's consumer before each merge.
#[derive(Default)]
pub(super) struct ValidUntil(Mutex<BTreeMap<u32, Instant>>);

impl ValidUntil {
    pub fn valid(&self, p: u32) -> bool {
        self.0
            .lock()
            .is_ok_and(|m| m.get(&p).is_some_and(|u| Instant::now() < *u))
    }

    fn set(&self, leases: &Leases, partitions: u32) {
        if let Ok(mut m) = self.0.lock() {
            m.clear();
            for p in 0..partitions {
                if let Some(u) = leases.valid_until(p) {
                    m.insert(p, u);
                }
            }
        }
    }
}

enum Command {
    /// Delete the lease (after its last checkpoint): answered whether it was released.
    Release(u32, tokio::sync::oneshot::Sender<bool>),
    /// Stop renewing it, and let it expire (no good checkpoint, or fenced).
    Forget(u32, tokio::sync::oneshot::Sender<bool>),
    /// Release everything and leave the group.
    Leave(tokio::sync::oneshot::Sender<bool>),
}

/// The task that keeps the leases: renews them every period whatever else is going on.
struct Keeper {
    commands: tokio::sync::mpsc::Sender<Command>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Keeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Keeper {
    fn start(
        mut leases: Leases,
        ttl: Duration,
        valid: Arc<ValidUntil>,
    ) -> (
        Self,
        tokio::sync::mpsc::UnboundedReceiver<super::lease::Tick>,
    ) {
        let (commands, mut rx) = tokio::sync::mpsc::channel::<Command>(16);
        // Unbounded: the keeper never waits for the session loop (which may be busy with a
        // checkpoint); ticks are a few per period at most.
        let (ticks_tx, ticks) = tokio::sync::mpsc::unbounded_channel();
        let partitions = leases.partitions();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Leases::period(ttl));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        // Validity published right after the renewals, before the slower rest.
                        let mut t = leases.renew().await;
                        valid.set(&leases, partitions);
                        leases.grow_bounded(&mut t).await;
                        valid.set(&leases, partitions);
                        if ticks_tx.send(t).is_err() {
                            return;
                        }
                    }
                    command = rx.recv() => {
                        match command {
                            Some(Command::Release(p, done)) => {
                                let r = leases.release(p).await;
                                if let Err(e) = &r {
                                    warn!("releasing partition {p}: {e}");
                                }
                                valid.set(&leases, partitions);
                                let _ = done.send(r.is_ok());
                            }
                            Some(Command::Forget(p, done)) => {
                                leases.forget(p);
                                valid.set(&leases, partitions);
                                let _ = done.send(true);
                            }
                            Some(Command::Leave(done)) => {
                                let r = leases.release_all().await;
                                if let Err(e) = &r {
                                    warn!("leaving the collector group: {e}");
                                }
                                valid.set(&leases, partitions);
                                let _ = done.send(r.is_ok());
                                return;
                            }
                            None => return,
                        }
                    }
                }
            }
        });
        (Self { commands, task }, ticks)
    }

    async fn ask(
        &self,
        command: impl FnOnce(tokio::sync::oneshot::Sender<bool>) -> Command,
    ) -> bool {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.commands.send(command(tx)).await.is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    async fn release(&self, p: u32) -> bool {
        self.ask(|tx| Command::Release(p, tx)).await
    }

    async fn forget(&self, p: u32) {
        self.ask(|tx| Command::Forget(p, tx)).await;
    }

    async fn leave(&self) {
        self.ask(Command::Leave).await;
    }
}

/// Resolves once the stop flag is set (the watch's guard is not kept: it is not `Send`).
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Why a checkpoint was not written.
enum Checkpoint {
    /// Another collector took the partition over: stop merging it.
    Fenced,
    Failed(anyhow::Error),
}

/// Feeds a partition's state from its stream, from the sequence the state covers on.
async fn consume(
    source: Arc<Source>,
    stream: jetstream::stream::Stream,
    p: u32,
    shared: Arc<Shared>,
    valid: Arc<ValidUntil>,
) {
    // Checked before every merge: a holder whose lease may have lapsed merges nothing more
    // (another collector may be taking the partition over).
    let may_merge = move || valid.valid(p);
    let c = &source.config;
    let name = format!("{}-p{p}", c.consumer);
    let filter = format!("{}.p{p}.>", c.subject_prefix);
    let mut delay = Duration::from_millis(500);
    loop {
        // A lapsed holder must not recreate the durable consumer its successor reads with.
        if !may_merge() {
            return;
        }
        let run = async {
            let checkpoint = shared.nats_seq()?;
            let consumer = source
                .consumer_named(&stream, &name, filter.clone(), checkpoint)
                .await?;
            source
                .consume(&consumer, &shared, checkpoint, &may_merge)
                .await
        };
        match run.await {
            Ok(Ended::OutOfOrder { expected, got }) => {
                shared.counters.nats_resets.fetch_add(1, Ordering::Relaxed);
                warn!(
                    "partition {p}: JetStream delivered sequence {got} before {expected}: resuming at {expected}"
                );
                delay = Duration::from_millis(500);
            }
            Err(e) => {
                warn!("partition {p}: consumer `{name}`: {e:#}; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// Answers view requests for one partition held.
/// When a holder's answers are the partition's: caught up with what the stream held when
/// it took the partition (before, the state lacks what the former holder merged after its
/// last checkpoint), and while its lease is valid.
struct Serving {
    p: u32,
    caught_up_at: u64,
    valid: Arc<ValidUntil>,
    max_payload: usize,
}

/// Alerts one partition's answer lists at most (open first, newest first).
const VIEW_ALERTS: usize = 1000;

async fn serve_view(
    client: async_nats::Client,
    subject: String,
    shared: Arc<Shared>,
    serving: Serving,
) {
    let mut sub = match client.subscribe(subject.clone()).await {
        Ok(s) => s,
        Err(e) => {
            warn!("cannot answer view requests on {subject}: {e}");
            return;
        }
    };
    let mut pages = rings::Pages::default();
    // Candidates fill half a message: the rest is the envelope and headroom.
    let budget = serving.max_payload / 2;
    while let Some(msg) = sub.next().await {
        let Some(reply) = msg.reply else { continue };
        let merged = shared.nats_seq().unwrap_or(0);
        let answer = if !serving.valid.valid(serving.p) {
            ViewAnswer::error("this collector's lease of the partition lapsed".into())
        } else if merged < serving.caught_up_at {
            ViewAnswer::error(format!(
                "catching up after a takeover (stream sequence {merged} of {})",
                serving.caught_up_at
            ))
        } else {
            match serde_json::from_slice::<ViewRequest>(&msg.payload) {
                Ok(r) if r.what == rings::WHAT => pages.answer(&r, budget, || {
                    let now = Now::system();
                    shared.with_fleet(|f| {
                        f.state.refresh_open(now);
                        f.detector.ring_candidates(&f.state.agg, now)
                    })
                }),
                Ok(r) => view(&shared, &r),
                Err(e) => ViewAnswer::error(format!("unreadable request: {e}")),
            }
        };
        let mut body = serde_json::to_vec(&answer).unwrap_or_default();
        if body.len() + 1024 > serving.max_payload {
            // Said, not dropped: the asker would take silence for a failover.
            body = serde_json::to_vec(&ViewAnswer::error(format!(
                "partition {}'s answer is {} bytes, over the NATS max_payload: ask with a limit",
                serving.p,
                body.len()
            )))
            .unwrap_or_default();
        }
        if let Err(e) = client.publish(reply, body.into()).await {
            log::debug!("answering a view request on {subject}: {e}");
        }
    }
}

fn view(shared: &Shared, r: &ViewRequest) -> ViewAnswer {
    let mut answer = ViewAnswer::default();
    let now = Now::system();
    let result = match r.what.as_str() {
        "clients" => match Query::parse(&r.query) {
            Ok(q) => shared.with_fleet(|f| {
                f.state.refresh_open(now);
                answer.rows = client_rows(&f.state.agg, &q, now);
            }),
            Err(e) => {
                answer.error = e.to_string();
                return answer;
            }
        },
        "alerts" => shared.with_fleet(|f| {
            let mut alerts = f.state.alerts(&f.detector);
            alerts.truncate(VIEW_ALERTS);
            answer.alerts = alerts.into_iter().cloned().collect();
        }),
        other => {
            answer.error = format!("unknown view `{other}`");
            return answer;
        }
    };
    if let Err(e) = result {
        answer.error = format!("{e:#}");
    }
    answer
}
