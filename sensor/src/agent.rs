//! `sensor run`: the agent's main loop (capture -> connection table -> local API).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use log::{info, warn};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use crate::{
    api::{self, AgentState, SharedState},
    capture::{Capture, CaptureSettings, decode_closed},
    cli::RunArgs,
    config::Config,
    conntable::ConnTable,
};

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
    Ok(config)
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = effective_config(&args)?;
    let mut capture = Capture::attach(&CaptureSettings {
        cgroup: config.capture.cgroup.clone().into(),
        ports: config.capture.ports.clone(),
        max_connections: config.capture.max_connections,
        ring_buffer_bytes: config.capture.ring_buffer_bytes,
    })
    .context("cannot start capture")?;
    let closed = capture.take_closed()?;
    // SAFETY: the RingBuf owns its map fd, which stays open and unchanged while the AsyncFd
    // owns the RingBuf.
    let mut closed = unsafe { AsyncFd::register(closed) }.context("polling the ring buffer")?;

    let state: SharedState = Arc::new(Mutex::new(AgentState {
        table: ConnTable::new(
            Duration::from_secs(config.connections.closed_retention_secs),
            config.connections.closed_retention_max,
        ),
        loss: capture.loss_counts(),
        started: SystemTime::now(),
        cgroup: capture.cgroup.display().to_string(),
        ports: config.capture.ports.clone(),
    }));
    let listener = api::bind(&config.api.socket)?;
    tokio::spawn(api::serve(listener, state.clone()));
    info!("local API on {}", config.api.socket.display());

    let mut poll = tokio::time::interval(Duration::from_millis(config.capture.poll_interval_ms));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    info!("sensor running");
    loop {
        tokio::select! {
            guard = closed.readable_mut() => {
                let mut guard = guard.context("ring buffer")?;
                let ring = guard.get_inner_mut();
                let now = Instant::now();
                let mut table = lock(&state)?;
                while let Some(item) = ring.next() {
                    match decode_closed(&item) {
                        Some(rec) => table.table.close(rec.cookie, rec.stats, now),
                        None => warn!("short ring buffer record ({} bytes)", item.len()),
                    }
                }
                drop(table);
                guard.clear_ready();
            }
            _ = poll.tick() => {
                let (live, reaped) = capture.poll();
                let loss = capture.loss_counts();
                let now = Instant::now();
                let mut s = lock(&state)?;
                for (cookie, stats) in reaped {
                    s.table.close(cookie, stats, now);
                }
                s.table.set_live(live);
                s.table.expire(now);
                s.loss = loss;
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
    }
    info!("shutting down: detaching programs");
    drop(capture);
    let _ = std::fs::remove_file(&config.api.socket);
    Ok(())
}

fn lock(state: &SharedState) -> anyhow::Result<std::sync::MutexGuard<'_, AgentState>> {
    state
        .lock()
        .map_err(|_| anyhow::anyhow!("agent state poisoned"))
}
