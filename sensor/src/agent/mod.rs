//! `sensor run`: the agent's pipeline, capture -> connection table -> aggregation -> views.
//!
//! Durability: closed connections stay in the kernel map until a snapshot that accounts them
//! is on disk, and every observation is applied as a delta against what was accounted, so a
//! kill -9 at any moment loses nothing the kernel counted.

pub mod api;
pub mod identity;
pub mod metrics;
/// The state the loop owns and the API and `/metrics` read.
pub mod shared;

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use log::{info, warn};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use identity::{HeadStats, Identities, Ready, load_secret, secret_path};
use shared::{AgentState, SharedState};

use crate::{
    alerting::{alerts_path, detect_settings, hostname},
    cli::{RunArgs, effective_config},
    config::Config,
    detect::{Detector, DetectorState},
    kernel::{Capture, CaptureSettings, decode_live, decode_request},
    model::aggregate::{Aggregator, Now},
    model::conntable::{ConnTable, socket_addr},
    model::state::{self, SnapshotRef},
    service::{self, notify::Notifier, reload},
};

/// How long the agent lets ring buffer records gather after a wakeup before it drains them.
///
/// The kernel wakes the reader only when a record lands in an empty ring (adaptive
/// notification), and each wakeup costs an interrupt in the kernel program that submits the
/// record plus a round through the agent's event loop. Draining at once would empty the ring
/// after every record, so every request and every close would pay for a wakeup; waiting a
/// little lets a whole batch share one. The rings hold far more than a batch (by default
/// 2 MiB of close records, about 15 000; 4 MiB of request events, ~7 500 SDK heads), and a
/// closed connection still shows within this delay.
const RING_BATCH: Duration = Duration::from_millis(50);

/// Everything the main loop owns.
struct Pipeline {
    capture: Capture,
    state: SharedState,
    config: Config,
    boot_id: String,
    identities: Identities,
    /// Request events are accounted before the closes read with them: the kernel emits a
    /// connection's request events before its close, and exchanges must be split before the
    /// close is accounted (`drain_closed`).
    requests: AsyncFd<RingBuf<MapData>>,
    /// Close records taken from their ring, awaiting the request events (`drain_closed`);
    /// empty between drains, its room reused.
    closes: Vec<(u64, sensor_common::ConnStats)>,
    /// Which clients below the summaries' cut are still named (keyed by the identity secret).
    sample: crate::ship::Sample,
    /// An earlier agent's format 2 snapshot is in the state directory: removed once this
    /// agent's first snapshot is saved (`state::retire_legacy`).
    retire_legacy: bool,
    /// The start's read of live connections was incomplete: restored connections the kernel
    /// no longer holds are closed at the first complete poll instead.
    forget_pending: bool,
    alert_log: crate::alerting::AlertLog,
}

/// What one read of the kernel's connection maps leaves to its caller.
struct LiveRead {
    loss: Vec<(&'static str, u64)>,
    now: Now,
    /// Every live record was read (see `Capture::poll_each`).
    complete: bool,
}

/// Cookies (kernel-made, so a fast hasher is safe).
type CookieSet = HashSet<u64, foldhash::fast::RandomState>;

/// The main loop's clocks.
struct Timers {
    poll: tokio::time::Interval,
    save: tokio::time::Interval,
    detect: tokio::time::Interval,
    /// Summaries go out as each 10-second period completes; checked often so that a sped-up
    /// evaluation clock (detect.time_scale) still ships every period.
    ship: tokio::time::Interval,
    watchdog: tokio::time::Interval,
}

impl Timers {
    fn new(config: &Config, watchdog: Option<Duration>) -> Self {
        Self {
            poll: ticker(Duration::from_millis(config.capture.poll_interval_ms)),
            save: ticker(Duration::from_secs(config.state.snapshot_interval_secs)),
            detect: ticker(Duration::from_secs(config.detect.interval_secs)),
            ship: ticker(Duration::from_millis(1000 / Now::scale().min(10))),
            watchdog: ticker(watchdog.unwrap_or(Duration::from_secs(3600))),
        }
    }
}

impl Pipeline {
    /// Takes the close records, then the request events, then accounts the closes.
    ///
    /// In that order: a connection's last request event is in the request ring before its
    /// close record is in this one, so once a close is read its requests can be read too.
    /// Requests first, a request and its connection's close that both landed between the two
    /// reads left the request waiting for a close already accounted: never applied to its
    /// identity, its head held for good (under a new-connection load, thousands a minute).
    fn drain_closed(&mut self, ring: &mut RingBuf<MapData>) -> anyhow::Result<()> {
        let mut closes = std::mem::take(&mut self.closes);
        let mut pace = crate::pace::Pace::new();
        let mut close_bytes = 0usize;
        while let Some(item) = ring.next() {
            pace.step();
            close_bytes += item.len();
            match decode_live(&item) {
                Some(close) => closes.push(close),
                None => warn!("short close record ({} bytes)", item.len()),
            }
        }
        let request_bytes = self.drain_requests()?;
        // A drain that found either ring an eighth full or more: the agent is behind the
        // traffic, and yielding now would let the rings fill further (see `pace`).
        let capture = &self.config.capture;
        crate::pace::set_behind(
            close_bytes >= capture.ring_buffer_bytes as usize / 8
                || request_bytes >= capture.request_ring_bytes as usize / 8,
        );
        let now = Now::system();
        let mut s = lock(&self.state)?;
        let AgentState {
            table, agg, heads, ..
        } = &mut *s;
        for (cookie, stats) in closes.drain(..) {
            pace.step();
            // The connection's last request is complete with what arrived.
            if let Some(r) = self.identities.close(cookie) {
                apply_request(table, agg, r, now);
            }
            table.observe(cookie, &stats, agg, now);
        }
        *heads = self.identities.stats;
        // A burst (or the catch-up after a restart: a full ring) leaves no lasting room.
        if closes.capacity() > 4096 {
            closes.shrink_to(1024);
        }
        self.closes = closes;
        Ok(())
    }

    fn drain_requests(&mut self) -> anyhow::Result<usize> {
        drain_requests(&self.state, &mut self.identities, &mut self.requests)
    }

    /// Reads the whole kernel map and accounts every record (after the request events the
    /// read covers), batch by batch: a poll holds one batch of records, not the whole map
    /// (under a new-connection load it holds tens of thousands of closed records awaiting a
    /// snapshot). With `present`, collects the cookies read.
    fn read_live(&mut self, mut present: Option<&mut CookieSet>) -> anyhow::Result<LiveRead> {
        let Self {
            capture,
            state,
            identities,
            requests,
            ..
        } = self;
        let complete = capture.poll_each(|cookies, records| -> anyhow::Result<()> {
            // After the read of this batch: every request whose bytes it includes has its
            // event queued.
            drain_requests(state, identities, requests)?;
            let now = Now::system();
            let mut s = lock(state)?;
            let AgentState {
                table, agg, heads, ..
            } = &mut *s;
            let mut pace = crate::pace::Pace::new();
            for (cookie, stats) in cookies.iter().zip(records) {
                pace.step();
                if let Some(present) = present.as_deref_mut() {
                    present.insert(*cookie);
                }
                // A head whose bytes TCP has accepted (bytes_in is TCP's own count) can no
                // longer be replaced: its request is complete.
                let ready = if stats.closed != 0 {
                    identities.close(*cookie)
                } else {
                    identities.settle(*cookie, stats.bytes_in)
                };
                if let Some(r) = ready {
                    apply_request(table, agg, r, now);
                }
                table.observe(*cookie, stats, agg, now);
            }
            *heads = identities.stats;
            Ok(())
        })?;
        // Also when the map is empty: the requests of the read's moment are accounted.
        drain_requests(state, identities, requests)?;
        Ok(LiveRead {
            loss: capture.loss_counts(),
            now: Now::system(),
            complete,
        })
    }

    /// The periodic read: accounts live connections, expires closed ones past retention.
    fn poll(&mut self) -> anyhow::Result<()> {
        if self.forget_pending {
            return self.read_and_forget();
        }
        let read = self.read_live(None)?;
        let mut s = lock(&self.state)?;
        s.table.expire(Instant::now());
        s.loss = read.loss;
        Ok(())
    }

    /// At start: accounts everything the kernel counted while no agent ran, and closes the
    /// restored connections the kernel no longer holds.
    fn catch_up(&mut self, closed: &mut RingBuf<MapData>) -> anyhow::Result<()> {
        self.drain_closed(closed)?;
        self.read_and_forget()
    }

    /// A read of every record that also closes the connections the kernel no longer holds,
    /// if the read was complete (a connection missing from an incomplete one may be live);
    /// otherwise the next poll tries again.
    fn read_and_forget(&mut self) -> anyhow::Result<()> {
        let mut present = CookieSet::default();
        let read = self.read_live(Some(&mut present))?;
        let mut s = lock(&self.state)?;
        let AgentState { table, agg, .. } = &mut *s;
        self.forget_pending = !read.complete;
        if read.complete {
            table.forget_missing(&present, agg, read.now);
        }
        s.loss = read.loss;
        Ok(())
    }

    /// At stop: accounts what is left in the rings and the map.
    fn final_read(&mut self, closed: &mut RingBuf<MapData>) -> anyhow::Result<()> {
        self.drain_closed(closed)?;
        // The ring is not drained again: a close after the drain is read from the map.
        self.capture.read_closed_next();
        self.poll()
    }

    /// Ships the summaries of the periods completed since the last call.
    fn ship(&self, outputs: &crate::sinks::Outputs) -> anyhow::Result<()> {
        let summaries = {
            let mut s = lock(&self.state)?;
            due_summaries(
                &mut s,
                self.config.ship.top_clients,
                &self.sample,
                Now::system(),
            )
        };
        for summary in summaries {
            outputs.ship_summary(summary);
        }
        // After the periods completed: an early part belongs to the current one.
        self.ship_early(outputs)
    }

    /// Ships an early part of the current period, if alerts want one.
    fn ship_early(&self, outputs: &crate::sinks::Outputs) -> anyhow::Result<()> {
        use crate::model::shipped;
        let now = Now::system().secs();
        let (part, before) = {
            let mut s = lock(&self.state)?;
            let AgentState { agg, early, .. } = &mut *s;
            let part = early.take(agg, now, self.sample.takes_parts(), &self.sample);
            let period = now / crate::ship::PERIOD_SECS * crate::ship::PERIOD_SECS;
            (part, early.of(period).cloned())
        };
        let Some((part, carried)) = part else {
            return Ok(());
        };
        let dir = &self.config.state.dir;
        // Recorded before it is spooled: a restart in between then ships the period's rest,
        // not the whole period (which the collector refuses as overlapping).
        if let Err(e) = shipped::save(dir, &carried) {
            warn!("not shipping an early part of this period: {e:#}");
            return Ok(());
        }
        if outputs.ship_summary(part) {
            lock(&self.state)?.early.shipped(carried);
        } else {
            // Not spooled (counted as dropped): the rest must carry what it would have.
            let reverted = match &before {
                Some(b) => shipped::save(dir, b),
                None => shipped::remove(dir),
            };
            if let Err(e) = reverted {
                warn!("an early part was not spooled and its record stays: {e:#}");
            }
        }
        Ok(())
    }

    /// Evaluates the rules; records and publishes what changed.
    fn detect(&self, outputs: &crate::sinks::Outputs) -> anyhow::Result<()> {
        let events = {
            let mut s = lock(&self.state)?;
            let AgentState {
                agg,
                detector,
                early,
                ..
            } = &mut *s;
            let now = Now::system();
            let events = detector.evaluate(agg, now);
            // Counted as on their way to the log before the API can show what they changed.
            self.alert_log.reserve(events.len());
            if outputs.shipping() {
                // The fleet rules get these clients' period so far at the next ship tick.
                early.want(
                    now.secs(),
                    events
                        .iter()
                        .filter(|e| e.event == crate::detect::EventKind::Open)
                        .filter_map(|e| {
                            Some((
                                crate::model::keys::By::parse(&e.alert.key_kind)?,
                                e.alert.key.clone(),
                            ))
                        }),
                );
            }
            events
        };
        outputs.publish(&events);
        // Written off the loop (see `AlertLog`).
        self.alert_log.record(
            alerts_path(&self.config.detect, &self.config.state.dir),
            events,
        );
        let lost = self.alert_log.lost();
        if lost > 0 {
            lock(&self.state)?.alert_log_lost = lost;
        }
        if outputs.shipping() {
            // At once, not at the next shipping tick: the fleet rules' second. Through `ship`:
            // a period that just ended goes first (a part of the new one merged before it
            // would make the collector refuse its rest as overlapping).
            self.ship(outputs)?;
        }
        Ok(())
    }

    /// A periodic snapshot; a failure is logged and the next one tries again.
    fn save(&mut self) {
        if let Err(e) = self.snapshot() {
            warn!("cannot save state: {e:#}");
        }
    }

    /// Writes the state, then lets the kernel forget the closed connections it accounts.
    fn snapshot(&mut self) -> anyhow::Result<()> {
        let now = Now::system();
        // Encoded under the lock, straight from the live aggregates (no copy of them) into
        // the temporary file; synced and renamed outside it.
        let (written, reaped) = {
            let mut s = lock(&self.state)?;
            // Before taking the unreaped ones: their tombstones stay until they are deleted.
            s.table.expire_tombstones(now);
            let reaped = s.table.take_unreaped();
            let written = state::write_tmp(
                &self.config.state.dir,
                &SnapshotRef {
                    version: state::SNAPSHOT_VERSION,
                    boot_id: &self.boot_id,
                    instance: &self.capture.instance,
                    saved_unix_ms: now.unix_ms,
                    agg: &s.agg,
                    conns: s.table.saved(),
                    detector: &s.detector.state,
                    shipped_through: s.shipped_through,
                },
            );
            match written {
                Ok(written) => (written, reaped),
                Err(e) => {
                    s.table.restore_unreaped(reaped);
                    return Err(e);
                }
            }
        };
        if let Err(e) = state::commit(&self.config.state.dir, written) {
            // Keep the records in the kernel until a snapshot holds them.
            let mut s = lock(&self.state)?;
            s.table.restore_unreaped(reaped);
            return Err(e);
        }
        if std::mem::take(&mut self.retire_legacy) {
            state::retire_legacy(&self.config.state.dir);
        }
        let left = self.capture.delete(&reaped);
        if !left.is_empty() {
            // Still in the kernel: their tombstones must stay until they are gone.
            warn!(
                "{} closed record(s) could not be deleted; retrying",
                left.len()
            );
            lock(&self.state)?.table.restore_unreaped(left);
        }
        Ok(())
    }

    /// Switches to `next` (a SIGHUP reload; `service::reload` decided what may change live).
    fn apply_config(&mut self, next: Config, timers: &mut Timers) -> anyhow::Result<()> {
        let old = &self.config;
        if next.capture.ports != old.capture.ports {
            self.capture
                .set_ports(&next.capture.ports)
                .context("writing the watched ports")?;
            lock(&self.state)?.ports.clone_from(&next.capture.ports);
        }
        if next.connections != old.connections {
            let c = &next.connections;
            lock(&self.state)?.table.set_retention(
                Duration::from_secs(c.closed_retention_secs),
                c.closed_retention_max,
            );
        }
        if next.capture.poll_interval_ms != old.capture.poll_interval_ms {
            timers.poll = ticker(Duration::from_millis(next.capture.poll_interval_ms));
        }
        if next.state.snapshot_interval_secs != old.state.snapshot_interval_secs {
            timers.save = ticker(Duration::from_secs(next.state.snapshot_interval_secs));
        }
        if next.detect != old.detect {
            // Rules and allow-lists change; open alerts and the baseline stay.
            let settings = detect_settings(&next.detect, hostname())?;
            lock(&self.state)?.detector.settings = settings;
        }
        if next.identity != old.identity {
            self.identities.reconfigure(&next);
        }
        self.config = next;
        Ok(())
    }
}

/// Accounts the queued request events; returns the bytes read from the ring.
fn drain_requests(
    state: &SharedState,
    identities: &mut Identities,
    requests: &mut AsyncFd<RingBuf<MapData>>,
) -> anyhow::Result<usize> {
    let now = Now::system();
    let mut s = lock(state)?;
    let AgentState {
        table, agg, heads, ..
    } = &mut *s;
    let ring = requests.get_mut();
    let mut ready = Vec::new();
    let mut pace = crate::pace::Pace::new();
    let mut bytes = 0usize;
    while let Some(item) = ring.next() {
        pace.step();
        bytes += item.len();
        let Some(ev) = decode_request(&item) else {
            warn!("short request record ({} bytes)", item.len());
            continue;
        };
        let peer = socket_addr(ev.remote_addr, 0).ip();
        // Heads come in chunks, and may be replaced while TCP has not accepted them: a
        // request is applied once its head is complete (see `Identities`).
        identities.on_event(&ev, peer, &mut ready);
        drop(item);
        for r in ready.drain(..) {
            apply_request(table, agg, r, now);
        }
    }
    *heads = identities.stats;
    Ok(bytes)
}

/// A request whose head is complete: splits the connection's exchanges at its start.
fn apply_request(table: &mut ConnTable, agg: &mut Aggregator, r: Ready, now: Now) {
    table.on_request(r.cookie, r.peer, r.start, r.keys, r.ts_ns, agg, now);
}

fn ticker(period: Duration) -> tokio::time::Interval {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval
}

/// systemd's one-line STATUS=.
fn status_line(config: &Config, cgroup: &str) -> String {
    format!(
        "attached to {cgroup}, watching ports {:?}; API on {}",
        config.capture.ports,
        config.api.socket.display()
    )
}

/// The name the agent ships under: `[ship] agent_name`, else the host name.
fn ship_name(config: &Config) -> String {
    if config.ship.agent_name.is_empty() {
        hostname()
    } else {
        config.ship.agent_name.clone()
    }
}

/// Summaries of the periods completed since the last one shipped (at most the last minute:
/// older periods are no longer held at 10-second resolution).
fn due_summaries(
    s: &mut AgentState,
    top: usize,
    sample: &crate::ship::Sample,
    now: Now,
) -> Vec<crate::ship::Summary> {
    use crate::ship::PERIOD_SECS;
    let current = now.secs() / PERIOD_SECS * PERIOD_SECS;
    let first = (s.shipped_through + PERIOD_SECS).max(current.saturating_sub(5 * PERIOD_SECS));
    let mut out = Vec::new();
    let mut start = first;
    while start < current {
        out.extend(crate::ship::summarize(
            &s.agg,
            start,
            top,
            sample,
            s.early.of(start),
        ));
        start += PERIOD_SECS;
    }
    s.shipped_through = s.shipped_through.max(current.saturating_sub(PERIOD_SECS));
    out
}

fn lock(state: &SharedState) -> anyhow::Result<std::sync::MutexGuard<'_, AgentState>> {
    state
        .lock()
        .map_err(|_| anyhow::anyhow!("agent state poisoned"))
}

/// Detaches and unpins an instance this start attached (and removes the pin directory it
/// created), when the start fails after the attach (an API socket that cannot be bound, an
/// unwritable state directory, ...).
struct DetachUntilRunning(Option<(std::path::PathBuf, Option<std::path::PathBuf>)>);

impl Drop for DetachUntilRunning {
    fn drop(&mut self) {
        if let Some((dir, pin_dir)) = self.0.take() {
            warn!(
                "start failed: detaching and unpinning what this start attached ({})",
                dir.display()
            );
            crate::kernel::remove_instance(&dir);
            if let Some(pin_dir) = pin_dir {
                let _ = std::fs::remove_dir(pin_dir);
            }
        }
    }
}

impl DetachUntilRunning {
    fn new(capture: &Capture, config: &Config) -> Self {
        Self((!capture.reused).then(|| {
            (
                capture.instance_dir.clone(),
                capture
                    .created_pin_dir
                    .then(|| config.state.bpf_pin_dir.clone()),
            )
        }))
    }

    /// The agent serves: what it attached stays.
    fn disarm(&mut self) {
        self.0 = None;
    }
}

/// Binds the metrics listener, if configured.
async fn bind_metrics(config: &Config) -> anyhow::Result<Option<metrics::Server>> {
    if config.metrics.listen.is_empty() {
        return Ok(None);
    }
    let server = metrics::Server::bind(&config.metrics)
        .await
        .context("cannot start the metrics listener")?;
    Ok(Some(server))
}

/// SIEM outputs, each a task of its own behind a bounded queue (see sinks/mod.rs), and
/// shipping to the collector; a missing token file or CA file fails here.
fn start_outputs(
    config: &Config,
    hot: &Arc<crate::ship::sketch::Hot>,
) -> anyhow::Result<crate::sinks::Outputs> {
    let mut outputs = crate::sinks::Outputs::start(&config.outputs, &config.state.dir)
        .context("cannot start the outputs")?;
    if config.ship.enabled() {
        let name = ship_name(config);
        outputs
            .start_shipping(&config.ship, &name, &config.state.dir, hot.clone())
            .context("cannot start shipping to the collector")?;
    }
    Ok(outputs)
}

/// Loads and attaches the kernel programs (after discarding saved state on `--fresh`).
fn attach(config: &Config, fresh: bool) -> anyhow::Result<Capture> {
    if fresh {
        info!(
            "--fresh: discarding saved state in {}",
            config.state.dir.display()
        );
        state::remove(&config.state.dir);
    }
    Capture::attach(&CaptureSettings {
        cgroup: config.capture.cgroup.clone().into(),
        ports: config.capture.ports.clone(),
        max_connections: config.capture.max_connections,
        ring_buffer_bytes: config.capture.ring_buffer_bytes,
        request_ring_bytes: config.capture.request_ring_bytes,
        live_slots: config.capture.live_slots,
        pin_dir: config.state.bpf_pin_dir.clone(),
        fresh,
        head_bytes: config.identity.head_bytes,
        live_read: config.capture.live_read,
    })
    .context("cannot start capture")
}

/// The agent's state: saved aggregates, connections and alerts where a snapshot exists; and
/// whether an earlier agent's format 2 snapshot is there to retire.
fn restore_state(
    config: &Config,
    capture: &Capture,
    boot_id: &str,
) -> anyhow::Result<(AgentState, bool)> {
    let c = &config.clients;
    let mut agg = Aggregator::new(c.max_clients, c.group_prefix_v4, c.group_prefix_v6);
    let mut table = ConnTable::new(
        Duration::from_secs(config.connections.closed_retention_secs),
        config.connections.closed_retention_max,
    );
    let mut detector_state = DetectorState::default();
    let mut shipped_through = 0;
    let mut legacy = false;
    if let Some(loaded) = state::load(&config.state.dir) {
        legacy = loaded.legacy;
        let saved = loaded.snapshot;
        detector_state = saved.detector;
        shipped_through = saved.shipped_through;
        agg = saved.agg;
        agg.configure(c.max_clients, c.group_prefix_v4, c.group_prefix_v6);
        if saved.boot_id == boot_id {
            // Live connections the kernel no longer holds are closed after the first poll.
            table.restore(&saved.conns);
        } else {
            agg.reset_request_clocks();
            agg.close_all_connections();
        }
        info!(
            "restored per-client state saved at {} ({} addresses)",
            humantime::format_rfc3339_millis(
                SystemTime::UNIX_EPOCH + Duration::from_millis(saved.saved_unix_ms)
            ),
            agg.addresses.clients.len()
        );
    }
    if config.detect.time_scale > 1 {
        warn!(
            "clock sped up {}x for evaluation (detect.time_scale): windows and rules run fast",
            config.detect.time_scale
        );
        Now::set_scale(config.detect.time_scale);
    }
    let detector = Detector::new(detect_settings(&config.detect, hostname())?, detector_state);
    let state = AgentState {
        table,
        agg,
        max_clients: c.max_clients,
        loss: capture.loss_counts(),
        started: SystemTime::now(),
        cgroup: capture.cgroup.display().to_string(),
        ports: config.capture.ports.clone(),
        continued_from_pinned_state: capture.reused,
        live_read: capture.path.name(),
        live_read_reason: capture.path_reason.clone(),
        heads: HeadStats::default(),
        detector,
        shipped_through,
        early: crate::ship::early::EarlyParts::restore(crate::model::shipped::load(
            &config.state.dir,
        )),
        alert_log_lost: 0,
        alert_log_queued: Default::default(),
    };
    Ok((state, legacy))
}

/// The local API and, if configured, the metrics endpoint.
fn serve(
    config: &Config,
    state: &SharedState,
    sinks: crate::sinks::SinkHealth,
    metrics_server: Option<metrics::Server>,
) -> anyhow::Result<()> {
    let listener = api::bind(&config.api.socket)?;
    tokio::spawn(api::serve(listener, state.clone(), sinks));
    info!("local API on {}", config.api.socket.display());
    if let Some(server) = metrics_server {
        tokio::spawn(server.serve(state.clone()));
    }
    Ok(())
}

/// SIGINT and SIGTERM stop the agent; SIGHUP reloads its configuration.
struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }
}

/// The main loop: the rings, the timers and the signals, until SIGINT or SIGTERM.
async fn run_until_stopped(
    pipeline: &mut Pipeline,
    closed: &mut AsyncFd<RingBuf<MapData>>,
    outputs: &crate::sinks::Outputs,
    signals: &mut Signals,
    args: &RunArgs,
    notifier: &Notifier,
    cgroup: &str,
) -> anyhow::Result<()> {
    let watchdog_period = notifier.watchdog_period();
    let mut timers = Timers::new(&pipeline.config, watchdog_period);
    loop {
        tokio::select! {
            // Either ring waking the agent drains both after RING_BATCH: a request's event and
            // its connection's close record, moments apart, share one delay.
            guard = closed.readable_mut() => {
                let mut guard = guard.context("close ring buffer")?;
                tokio::time::sleep(RING_BATCH).await;
                guard.clear_ready();
                // Takes the closes, then the request events, then accounts the closes.
                pipeline.drain_closed(guard.get_inner_mut())?;
            }
            guard = pipeline.requests.readable() => {
                let mut guard = guard.context("request ring buffer")?;
                tokio::time::sleep(RING_BATCH).await;
                guard.clear_ready();
                drop(guard);
                pipeline.drain_closed(closed.get_mut())?;
            }
            _ = timers.poll.tick() => pipeline.poll()?,
            _ = timers.ship.tick(), if outputs.shipping() => pipeline.ship(outputs)?,
            _ = timers.save.tick() => pipeline.save(),
            _ = timers.detect.tick() => pipeline.detect(outputs)?,
            _ = signals.interrupt.recv() => break,
            _ = signals.terminate.recv() => break,
            _ = signals.hangup.recv() => {
                notifier.reloading();
                if let Some(next) = reload::reread(args, &pipeline.config) {
                    pipeline.apply_config(next, &mut timers)?;
                }
                notifier.ready(&status_line(&pipeline.config, cgroup));
            }
            _ = timers.watchdog.tick(), if watchdog_period.is_some() => notifier.watchdog(),
        }
    }
    Ok(())
}

/// Fixed glibc malloc thresholds for the agent, before its threads start. By default glibc
/// raises its mmap threshold to the size of each large block freed (up to 32 MiB): after the
/// first snapshot, the snapshot's and the map reads' large transient buffers came from the
/// heap, and the holes they left kept the heap's pages resident. Blocks of 128 KiB and more
/// stay mmapped (returned to the kernel when freed), free memory above 128 KiB at the heap's
/// top is returned, and one arena serves every thread (the agent's work is on one thread; its
/// idle workers' arenas held pages of their own). A few MiB of the agent's RSS under load
/// (`cargo xtask bench`), for a few more mmap calls per snapshot.
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    for (param, value) in [
        (libc::M_MMAP_THRESHOLD, 128 << 10),
        (libc::M_TRIM_THRESHOLD, 128 << 10),
        (libc::M_ARENA_MAX, 1),
    ] {
        // SAFETY: mallopt only sets allocator parameters; it returns 0 on a refused value,
        // which leaves glibc's default in place (nothing to undo).
        if unsafe { libc::mallopt(param, value) } == 0 {
            log::debug!("mallopt({param}, {value}) refused; glibc's default stays");
        }
    }
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = service::exit_on_config_error(effective_config(&args))?;
    // Before touching saved state or the kernel: a bad token file or a taken address fails fast.
    let metrics_server = bind_metrics(&config).await?;
    // The collector's hot cells: received by the shipping sink, used by the summaries.
    let hot = Arc::<crate::ship::sketch::Hot>::default();
    let outputs = start_outputs(&config, &hot)?;
    let mut capture = attach(&config, args.fresh)?;
    // Until the agent serves, a failed start detaches what this start attached; state an
    // earlier run pinned (continued here) stays for the next try.
    let mut starting = DetachUntilRunning::new(&capture, &config);
    // SAFETY (both): the RingBuf owns its map fd, which stays open and unchanged while the
    // AsyncFd owns the RingBuf.
    let mut closed = unsafe { AsyncFd::register(capture.take_closed()?) }
        .context("polling the close ring buffer")?;
    let requests = unsafe { AsyncFd::register(capture.take_requests()?) }
        .context("polling the request ring buffer")?;
    let secret = load_secret(&secret_path(&config), true)?;
    let identities = Identities::new(&secret, &config);
    if config.ship.enabled() && config.identity.secret_file.as_os_str().is_empty() {
        warn!(
            "shipping with this host's own identity secret: identities, the summaries' \
             sample and sketch cells differ from other hosts'; give every agent the same \
             [identity] secret_file"
        );
    }
    let sample = crate::ship::Sample::new(
        &secret,
        config.ship.sample_percent,
        config.ship.sample_max_clients,
        hot,
    );
    let boot_id = state::boot_id();
    let (restored, retire_legacy) = restore_state(&config, &capture, &boot_id)?;
    let state: SharedState = Arc::new(Mutex::new(restored));
    let mut pipeline = Pipeline {
        capture,
        state: state.clone(),
        config: config.clone(),
        boot_id,
        identities,
        requests,
        closes: Vec::new(),
        sample,
        retire_legacy,
        forget_pending: false,
        alert_log: crate::alerting::AlertLog::start(lock(&state)?.alert_log_queued.clone())
            .context("starting the alert log's writer")?,
    };
    pipeline.catch_up(closed.get_mut())?;
    pipeline
        .snapshot()
        .context("writing the first state snapshot")?;
    serve(&config, &state, outputs.health(), metrics_server)?;

    // systemd (Type=notify): ready once attached and listening; the watchdog is fed from the
    // loop, so a stuck loop gets the agent restarted.
    let notifier = Notifier::from_env();
    let mut signals = Signals::new()?;
    let cgroup = pipeline.capture.cgroup.display().to_string();
    starting.disarm();
    notifier.ready(&status_line(&config, &cgroup));
    info!("sensor running");
    run_until_stopped(
        &mut pipeline,
        &mut closed,
        &outputs,
        &mut signals,
        &args,
        &notifier,
        &cgroup,
    )
    .await?;
    notifier.stopping();
    info!("shutting down: saving state and detaching programs");
    pipeline.final_read(closed.get_mut())?;
    pipeline.snapshot()?;
    drop(closed);
    drop(pipeline.requests);
    pipeline.capture.detach();
    // Undelivered events stay in the outputs' spools for the next start.
    outputs.shutdown(Duration::from_secs(2)).await;
    let _ = std::fs::remove_file(&config.api.socket);
    Ok(())
}
