//! `sensor run`: the agent's pipeline, capture -> connection table -> aggregation -> views.
//!
//! Durability: closed connections stay in the kernel map until a snapshot that accounts them
//! is on disk, and every observation is applied as a delta against what was accounted, so a
//! kill -9 at any moment loses nothing the kernel counted.

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

use crate::{
    aggregate::{Aggregator, Now},
    api::{self, AgentState, SharedState},
    capture::{Capture, CaptureSettings, decode_closed, decode_request},
    cli::RunArgs,
    config::Config,
    conntable::{ConnTable, socket_addr},
    metrics,
    state::{self, SnapshotRef},
};

/// How long the agent lets ring buffer records gather after a wakeup before it drains them.
///
/// The kernel wakes the reader only when a record lands in an empty ring (adaptive
/// notification), and each wakeup costs an interrupt in the kernel program that submits the
/// record plus a round through the agent's event loop. Draining at once would empty the ring
/// after every record, so every request and every close would pay for a wakeup; waiting a
/// little lets a whole batch share one. The rings hold far more than a batch (4 MiB of close
/// records, 2 MiB of request events: tens of thousands each), and a closed connection still
/// shows within this delay.
const RING_BATCH: Duration = Duration::from_millis(50);

/// Resolves the effective configuration: file (or embedded default), then flags.
pub fn effective_config(args: &RunArgs) -> anyhow::Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::embedded()?,
    };
    if let Some(cgroup) = &args.cgroup {
        config.capture.cgroup = cgroup.display().to_string();
    }
    if let Some(ports) = &args.ports {
        config.capture.ports.clone_from(ports);
    }
    if let Some(socket) = &args.socket {
        config.api.socket.clone_from(socket);
    }
    if let Some(ms) = args.poll_interval_ms {
        anyhow::ensure!(ms > 0, "--poll-interval-ms must be at least 1");
        config.capture.poll_interval_ms = ms;
    }
    if let Some(dir) = &args.state_dir {
        config.state.dir.clone_from(dir);
    }
    if let Some(dir) = &args.pin_dir {
        config.state.bpf_pin_dir.clone_from(dir);
    }
    Ok(config)
}

/// Everything the main loop owns.
struct Pipeline {
    capture: Capture,
    state: SharedState,
    config: Config,
    boot_id: String,
}

impl Pipeline {
    fn lock(&self) -> anyhow::Result<std::sync::MutexGuard<'_, AgentState>> {
        self.state
            .lock()
            .map_err(|_| anyhow::anyhow!("agent state poisoned"))
    }

    fn drain_closed(&self, ring: &mut RingBuf<MapData>) -> anyhow::Result<()> {
        let now = Now::system();
        let mut s = self.lock()?;
        let AgentState { table, agg, .. } = &mut *s;
        while let Some(item) = ring.next() {
            match decode_closed(&item) {
                Some(rec) => table.observe(rec.cookie, &rec.stats, agg, now),
                None => warn!("short close record ({} bytes)", item.len()),
            }
        }
        Ok(())
    }

    fn drain_requests(&self, ring: &mut RingBuf<MapData>) -> anyhow::Result<()> {
        let now = Now::system();
        let mut s = self.lock()?;
        while let Some(item) = ring.next() {
            match decode_request(&item) {
                Some(ev) => {
                    let ip = socket_addr(ev.remote_addr, 0).ip();
                    s.agg.request(ip, ev.ts_ns, now);
                }
                None => warn!("short request record ({} bytes)", item.len()),
            }
        }
        Ok(())
    }

    /// Reads the whole kernel map and accounts every record.
    fn poll(&self) -> anyhow::Result<()> {
        let records = self.capture.poll();
        let loss = self.capture.loss_counts();
        let now = Now::system();
        let mut s = self.lock()?;
        let AgentState { table, agg, .. } = &mut *s;
        for (cookie, stats) in &records {
            table.observe(*cookie, stats, agg, now);
        }
        table.expire(Instant::now());
        s.loss = loss;
        Ok(())
    }

    /// Writes the state, then lets the kernel forget the closed connections it accounts.
    fn snapshot(&mut self) -> anyhow::Result<()> {
        let now = Now::system();
        // Encoded under the lock, straight from the live aggregates (no copy of them).
        let (encoded, reaped) = {
            let mut s = self.lock()?;
            let reaped = s.table.take_unreaped();
            s.table.expire_tombstones(now);
            let encoded = state::encode(&SnapshotRef {
                version: state::SNAPSHOT_VERSION,
                boot_id: &self.boot_id,
                instance: &self.capture.instance,
                saved_unix_ms: now.unix_ms,
                agg: &s.agg,
                conns: s.table.state(),
            });
            match encoded {
                Ok(encoded) => (encoded, reaped),
                Err(e) => {
                    s.table.restore_unreaped(reaped);
                    return Err(e);
                }
            }
        };
        if let Err(e) = state::save(&self.config.state.dir, &encoded) {
            // Keep the records in the kernel until a snapshot holds them.
            let mut s = self.lock()?;
            s.table.restore_unreaped(reaped);
            return Err(e);
        }
        self.capture.delete(&reaped);
        Ok(())
    }
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = effective_config(&args)?;
    // Before touching saved state or the kernel: a bad token file or a taken address fails fast.
    let metrics_server = if config.metrics.listen.is_empty() {
        None
    } else {
        Some(
            metrics::Server::bind(&config.metrics)
                .await
                .context("cannot start the metrics listener")?,
        )
    };
    if args.fresh {
        info!(
            "--fresh: discarding saved state in {}",
            config.state.dir.display()
        );
        state::remove(&config.state.dir);
    }
    let mut capture = Capture::attach(&CaptureSettings {
        cgroup: config.capture.cgroup.clone().into(),
        ports: config.capture.ports.clone(),
        max_connections: config.capture.max_connections,
        ring_buffer_bytes: config.capture.ring_buffer_bytes,
        pin_dir: config.state.bpf_pin_dir.clone(),
        fresh: args.fresh,
    })
    .context("cannot start capture")?;
    // SAFETY (both): the RingBuf owns its map fd, which stays open and unchanged while the
    // AsyncFd owns the RingBuf.
    let mut closed = unsafe { AsyncFd::register(capture.take_closed()?) }
        .context("polling the close ring buffer")?;
    let mut requests = unsafe { AsyncFd::register(capture.take_requests()?) }
        .context("polling the request ring buffer")?;

    let boot_id = state::boot_id();
    let c = &config.clients;
    let mut agg = Aggregator::new(c.max_clients, c.group_prefix_v4, c.group_prefix_v6);
    let mut table = ConnTable::new(
        Duration::from_secs(config.connections.closed_retention_secs),
        config.connections.closed_retention_max,
    );
    if let Some(saved) = state::load(&config.state.dir) {
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
    let state: SharedState = Arc::new(Mutex::new(AgentState {
        table,
        agg,
        max_clients: c.max_clients,
        loss: capture.loss_counts(),
        started: SystemTime::now(),
        cgroup: capture.cgroup.display().to_string(),
        ports: config.capture.ports.clone(),
        continued_from_pinned_state: capture.reused,
    }));
    let mut pipeline = Pipeline {
        capture,
        state: state.clone(),
        config: config.clone(),
        boot_id,
    };
    // Catch up: everything the kernel counted while no agent ran.
    pipeline.drain_closed(closed.get_mut())?;
    pipeline.drain_requests(requests.get_mut())?;
    let records = pipeline.capture.poll();
    {
        let now = Now::system();
        let mut s = pipeline.lock()?;
        let AgentState { table, agg, .. } = &mut *s;
        for (cookie, stats) in &records {
            table.observe(*cookie, stats, agg, now);
        }
        let present: HashSet<u64> = records.iter().map(|(c, _)| *c).collect();
        table.forget_missing(&present, agg, now);
    }
    pipeline
        .snapshot()
        .context("writing the first state snapshot")?;

    let listener = api::bind(&config.api.socket)?;
    tokio::spawn(api::serve(listener, state.clone()));
    info!("local API on {}", config.api.socket.display());
    if let Some(server) = metrics_server {
        tokio::spawn(server.serve(state.clone()));
    }

    let mut poll = tokio::time::interval(Duration::from_millis(config.capture.poll_interval_ms));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut save = tokio::time::interval(Duration::from_secs(config.state.snapshot_interval_secs));
    save.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    info!("sensor running");
    loop {
        tokio::select! {
            // Either ring waking the agent drains both after RING_BATCH: a request's event and
            // its connection's close record, moments apart, share one delay.
            guard = closed.readable_mut() => {
                let mut guard = guard.context("close ring buffer")?;
                tokio::time::sleep(RING_BATCH).await;
                pipeline.drain_closed(guard.get_inner_mut())?;
                guard.clear_ready();
                pipeline.drain_requests(requests.get_mut())?;
            }
            guard = requests.readable_mut() => {
                let mut guard = guard.context("request ring buffer")?;
                tokio::time::sleep(RING_BATCH).await;
                pipeline.drain_requests(guard.get_inner_mut())?;
                guard.clear_ready();
                pipeline.drain_closed(closed.get_mut())?;
            }
            _ = poll.tick() => pipeline.poll()?,
            _ = save.tick() => {
                if let Err(e) = pipeline.snapshot() {
                    warn!("cannot save state: {e:#}");
                }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    info!("shutting down: saving state and detaching programs");
    pipeline.drain_closed(closed.get_mut())?;
    pipeline.drain_requests(requests.get_mut())?;
    pipeline.poll()?;
    pipeline.snapshot()?;
    drop((closed, requests));
    pipeline.capture.detach();
    let _ = std::fs::remove_file(&config.api.socket);
    Ok(())
}
