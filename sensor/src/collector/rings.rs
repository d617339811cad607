//! Rings across partitions (docs/fleet.md, "Fleet rules, rings, sketches"). In a collector
//! group a ring's members are spread over partitions by their keys, so no partition sees
//! enough of them. The ring rule therefore runs in two steps: every holder reports its
//! partitions' ring candidates (keys already past the harvesting criteria, with their
//! counters: few, and small) over the view subjects, and the holder of partition 0 links the
//! union into rings, driving the ring alerts in partition 0's detector state (checkpointed
//! with it, so they move with its lease).
//!
//! A round is all or nothing: a partition that does not answer (a failover under way) or
//! moves while being paged through makes the round incomplete (counted), and nothing is
//! opened or resolved on a partial view.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use log::{debug, warn};

use super::{
    alerts,
    partitioned::{GatherError, Status, VIEW_TIMEOUT, ValidUntil, ViewAnswer, ViewRequest, ask},
    shared::Shared,
};
use crate::{detect::RingCandidate, formats::Record, model::aggregate::Now};

/// The view request's name for a page of ring candidates.
pub(super) const WHAT: &str = "ring-candidates";

/// Candidates a holder reports per partition and round: the heaviest (by output tokens over
/// 10 minutes), the rest counted as cut. A bound on the exchange, the gatherer's memory and
/// the linking, whatever agents report: a candidate is 0.5 to 1 KiB of JSON, so at most
/// about 20 MiB a partition, in pages of half the server's `max_payload`.
pub(super) const MAX_PARTITION_CANDIDATES: usize = 20_000;

/// Pages one partition may take in a round: enough for `MAX_PARTITION_CANDIDATES` of the
/// largest candidates in pages of 256 KiB (a server's `max_payload` of 512 KiB).
const MAX_PAGES: usize = 96;

/// Rounds of the ring rule at this collector (while it holds partition 0).
#[derive(Debug, Default)]
pub struct RingCounters {
    /// Rounds that heard every partition and ran the rule.
    pub rounds: AtomicU64,
    /// Rounds left because a partition did not answer in full.
    pub incomplete: AtomicU64,
    /// Candidates in the last complete round.
    pub candidates: AtomicU64,
    /// Candidates holders left out of rounds (over `MAX_PARTITION_CANDIDATES`, the lightest):
    /// rounds with any are judged, but resolve nothing.
    pub cut: AtomicU64,
}

/// A holder's candidates of one round, kept while the gatherer pages through them (so the
/// pages are of one list).
#[derive(Default)]
pub(super) struct Pages {
    round: u64,
    list: Vec<RingCandidate>,
    /// Candidates of the harvest left out (over `MAX_PARTITION_CANDIDATES`).
    cut: u64,
}

impl Pages {
    /// Page `r.page` of round `r.round`: page 0 harvests the partition afresh (`harvest`),
    /// later pages come from that harvest, at most `budget` bytes of candidates each.
    pub(super) fn answer(
        &mut self,
        r: &ViewRequest,
        budget: usize,
        harvest: impl FnOnce() -> anyhow::Result<Vec<RingCandidate>>,
    ) -> ViewAnswer {
        let mut answer = ViewAnswer::default();
        if r.page == 0 {
            match harvest() {
                Ok(mut list) => {
                    let mut cut = 0;
                    if list.len() > MAX_PARTITION_CANDIDATES {
                        list.sort_by(|a, b| b.tokens_10m.total_cmp(&a.tokens_10m));
                        cut = (list.len() - MAX_PARTITION_CANDIDATES) as u64;
                        list.truncate(MAX_PARTITION_CANDIDATES);
                    }
                    *self = Self {
                        round: r.round,
                        list,
                        cut,
                    }
                }
                Err(e) => return ViewAnswer::error(format!("{e:#}")),
            }
        } else if self.round != r.round || r.page > self.list.len() {
            // The partition moved (or this holder restarted) since page 0.
            return ViewAnswer::error(format!(
                "round {} is not paged here: start it again",
                r.round
            ));
        }
        let mut used = 0;
        let mut end = r.page;
        for c in &self.list[r.page..] {
            let size = serde_json::to_vec(c).map_or(0, |v| v.len() + 1);
            if end > r.page && used + size > budget {
                break;
            }
            used += size;
            end += 1;
        }
        answer.candidates = self.list[r.page..end].to_vec();
        answer.next_page = (end < self.list.len()).then_some(end);
        answer.cut = self.cut;
        if answer.next_page.is_none() {
            // Served in full: not kept until the next round.
            self.list = Vec::new();
        }
        answer
    }
}

/// Every partition's candidates for one round and how many holders cut, or why not; each
/// page asked for `within` (`VIEW_TIMEOUT`).
pub(super) async fn gather(
    client: &async_nats::Client,
    prefix: &str,
    partitions: u32,
    round: u64,
    within: Duration,
) -> Result<(Vec<RingCandidate>, u64), GatherError> {
    let asks = (0..partitions).map(|p| async move {
        let mut list = Vec::new();
        let mut page = 0;
        for _ in 0..MAX_PAGES {
            let request = ViewRequest {
                what: WHAT.into(),
                query: String::new(),
                round,
                page,
            };
            let body = serde_json::to_vec(&request)
                .map_err(|e| GatherError::Unreadable(p, e.to_string()))?;
            let answer = ask(client, prefix, p, body, within).await?;
            list.extend(answer.candidates);
            if list.len() > MAX_PARTITION_CANDIDATES {
                return Err(GatherError::Unreadable(
                    p,
                    format!("more than {MAX_PARTITION_CANDIDATES} ring candidates"),
                ));
            }
            match answer.next_page {
                Some(next) if next > page => page = next,
                Some(_) => {
                    return Err(GatherError::Unreadable(
                        p,
                        "a page that does not advance".into(),
                    ));
                }
                None => return Ok((list, answer.cut)),
            }
        }
        Err(GatherError::Unreadable(
            p,
            format!("more ring candidates than {MAX_PAGES} pages"),
        ))
    });
    let lists = futures_util::future::try_join_all(asks).await?;
    let cut = lists.iter().map(|(_, c)| c).sum();
    Ok((lists.into_iter().flat_map(|(l, _)| l).collect(), cut))
}

/// What a round needs besides the group's status.
pub(super) struct Round {
    pub status: Arc<Status>,
    /// Partition 0's state: the ring alerts live in its detector.
    pub p0: Arc<Shared>,
    pub valid: Arc<ValidUntil>,
    pub every: Duration,
    pub alerts_path: PathBuf,
    pub front: Arc<Shared>,
}

/// Runs a round every `every` while partition 0 is held (the task is stopped with it).
pub(super) async fn run(r: Round) {
    let mut tick = tokio::time::interval(r.every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let counters = r.status.rings.clone();
    let mut warned = false;
    loop {
        tick.tick().await;
        let round = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let gathered = match r.status.asker() {
            Ok((client, prefix)) => {
                gather(&client, prefix, r.status.count, round, VIEW_TIMEOUT).await
            }
            Err(e) => Err(e),
        };
        let (candidates, cut) = match gathered {
            Ok(c) => c,
            Err(e) => {
                counters.incomplete.fetch_add(1, Ordering::Relaxed);
                // Expected during a failover: said once per spell.
                if !warned {
                    warn!(
                        "ring rule: round left incomplete ({e}); rings are judged again once every partition answers"
                    );
                    warned = true;
                } else {
                    debug!("ring rule: round left incomplete ({e})");
                }
                continue;
            }
        };
        warned = false;
        counters.cut.fetch_add(cut, Ordering::Relaxed);
        let Ok(context) = r.p0.with_fleet(|f| f.detector.ring_context(Now::system())) else {
            continue;
        };
        let n = candidates.len() as u64;
        // Linking costs up to `MAX_LINK_WORK` steps: on a blocking thread, with no lock held,
        // so partition 0 keeps merging and answering meanwhile.
        let found = match context {
            Some((cfg, started)) => tokio::task::spawn_blocking(move || {
                crate::detect::link_rings(&candidates, &cfg, started)
            })
            .await
            .ok(),
            None => None,
        };
        let valid = r.valid.clone();
        let events = r.p0.with_fleet(|f| {
            // Partition 0's state changes only while its lease is ours.
            if !valid.valid(0) {
                return None;
            }
            let events = f.detector.apply_rings(found, cut == 0, Now::system());
            let records: Vec<Record> = events.iter().map(Record::new).collect();
            f.forward(&records, alerts::Source::Fleet);
            Some(events)
        });
        let Ok(Some(events)) = events else {
            continue;
        };
        counters.rounds.fetch_add(1, Ordering::Relaxed);
        counters.candidates.store(n, Ordering::Relaxed);
        if !events.is_empty() {
            let lost = crate::alerting::record_alerts(&r.alerts_path, &events);
            r.front.count_alert_log_lost(lost);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use futures_util::StreamExt as _;

    use super::*;
    use crate::{
        collector::{partitioned::view_subject, testnats::NatsServer},
        detect::{Detector, EventKind, Evidence},
    };

    const T0: u64 = 1_800_000_000_000;
    /// Page timeout in the tests: they run beside hundreds of others on two CPUs.
    const SLOW: Duration = Duration::from_secs(20);
    const MINUTE: u64 = 60_000;

    fn at(ms: u64) -> Now {
        Now { unix_ms: ms }
    }

    fn candidate(
        key: String,
        first_seen_ms: u64,
        cell: (i64, i64),
        tokens_10m: f64,
    ) -> RingCandidate {
        let mut evidence = Evidence::default();
        evidence.windows[1].requests = 20.0;
        evidence.windows[1].bytes_out = tokens_10m * 4.0;
        evidence.requests_total = 100.0;
        RingCandidate {
            source: Some(format!("10.7.{}.9", key.len()).parse().expect("ip")),
            key,
            kind: "identity".into(),
            first_seen_ms,
            cell,
            group: None,
            tokens_10m,
            persistent: false,
            evidence: Some(evidence),
        }
    }

    /// Partition `p` of 4: three members of one ring (12 in all, started 5 s apart after the
    /// cold start, alike in shape, 12 000 tokens each over 10 minutes: 14 400 a minute
    /// together) and `filler` unrelated keys (started an hour apart from one another).
    fn partition(p: u64, filler: u64) -> Vec<RingCandidate> {
        let mut list: Vec<RingCandidate> = (0..3)
            .map(|i| {
                let g = i * 4 + p;
                candidate(
                    format!("k-ring-{g:02}"),
                    T0 + 10 * MINUTE + g * 5000,
                    (40, 50),
                    12_000.0,
                )
            })
            .collect();
        for i in 0..filler {
            let n = (p * filler + i) as i64;
            list.push(candidate(
                format!("k-other-{p}-{i:05}"),
                T0 + 20 * MINUTE + (n as u64) * 60 * MINUTE,
                (n, 3 * n),
                500.0,
            ));
        }
        list
    }

    fn request(round: u64, page: usize) -> ViewRequest {
        ViewRequest {
            what: WHAT.into(),
            query: String::new(),
            round,
            page,
        }
    }

    /// Pages cover the list once, in order, within the budget; a round the holder did not
    /// start (the partition moved between pages) is refused, never answered from another
    /// list.
    #[test]
    fn pages_cover_the_list_once_and_refuse_a_round_started_elsewhere() {
        let list = partition(1, 300);
        let mut pages = Pages::default();
        let (mut got, mut page, mut n) = (Vec::new(), 0, 0);
        loop {
            let a = pages.answer(&request(7, page), 4096, || Ok(list.clone()));
            assert!(a.error.is_empty(), "{}", a.error);
            let size: usize = a
                .candidates
                .iter()
                .map(|c| serde_json::to_vec(c).expect("json").len() + 1)
                .sum();
            assert!(
                size <= 4096 || a.candidates.len() == 1,
                "page of {size} bytes"
            );
            got.extend(a.candidates);
            n += 1;
            match a.next_page {
                Some(next) => page = next,
                None => break,
            }
        }
        assert_eq!(got, list);
        assert!(n > 10, "{n} pages");
        let refused = pages.answer(&request(8, 5), 4096, || Ok(list.clone()));
        assert!(
            refused.error.contains("not paged here"),
            "{}",
            refused.error
        );
        assert!(refused.candidates.is_empty());
        let failed = pages.answer(&request(9, 0), 4096, || anyhow::bail!("state poisoned"));
        assert!(failed.error.contains("state poisoned"), "{}", failed.error);
    }

    /// A holder reports at most `MAX_PARTITION_CANDIDATES` a round, the heaviest, and says
    /// how many it left out; its pages then hold nothing more.
    #[test]
    fn a_holder_reports_its_heaviest_candidates_and_counts_the_rest() {
        let n = MAX_PARTITION_CANDIDATES + 5;
        let list: Vec<RingCandidate> = (0..n)
            .map(|i| candidate(format!("k-{i:06}"), T0, (0, 0), i as f64))
            .collect();
        let mut pages = Pages::default();
        let (mut got, mut page) = (Vec::new(), 0);
        loop {
            let a = pages.answer(&request(1, page), 1 << 20, || Ok(list.clone()));
            assert!(a.error.is_empty(), "{}", a.error);
            assert_eq!(a.cut, 5);
            got.extend(a.candidates);
            match a.next_page {
                Some(next) => page = next,
                None => break,
            }
        }
        assert_eq!(got.len(), MAX_PARTITION_CANDIDATES);
        let lightest = got.iter().map(|c| c.tokens_10m).fold(f64::MAX, f64::min);
        assert_eq!(lightest, 5.0, "the five lightest are the ones left out");
        // Served in full: nothing kept, a late page is refused.
        assert!(pages.list.is_empty());
        assert!(
            !pages
                .answer(&request(1, 1), 1 << 20, || Ok(Vec::new()))
                .error
                .is_empty()
        );
    }

    /// Responders on the view subjects of `prefix`, as partition holders run them (each with
    /// its own pages, or — `forgetful` — a fresh one per request, as a holder that changed
    /// between pages is).
    fn serve(
        client: &async_nats::Client,
        prefix: &str,
        lists: Vec<Vec<RingCandidate>>,
        forgetful: bool,
    ) {
        for (p, list) in lists.into_iter().enumerate() {
            let client = client.clone();
            let subject = view_subject(prefix, p as u32);
            tokio::spawn(async move {
                let mut sub = client.subscribe(subject).await.expect("subscribe");
                let mut pages = Pages::default();
                while let Some(msg) = sub.next().await {
                    let Some(reply) = msg.reply else { continue };
                    let r: ViewRequest = serde_json::from_slice(&msg.payload).expect("request");
                    if forgetful {
                        pages = Pages::default();
                    }
                    let answer = pages.answer(&r, 64 * 1024, || Ok(list.clone()));
                    let body = serde_json::to_vec(&answer).expect("json");
                    client.publish(reply, body.into()).await.expect("reply");
                }
            });
        }
    }

    /// Against a real nats-server: four partitions' holders each hold three members of a
    /// ring (below `ring_min_members`) among 2 000 other candidates; partition 0's holder
    /// gathers every page of every partition and finds the ring whole, once. A partition
    /// without a holder, or one whose holder changes between pages, leaves the round
    /// incomplete instead of judging a part.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_ring_spread_over_partitions_is_found_through_nats() {
        let Some(server) = NatsServer::start_or_skip("sensor-rings") else {
            return;
        };
        let client = async_nats::connect(server.url.as_str())
            .await
            .expect("connect");
        let lists: Vec<Vec<RingCandidate>> = (0..4).map(|p| partition(p, 2000)).collect();
        serve(&client, "fleet", lists.clone(), false);
        serve(&client, "moving", lists.clone(), true);
        client.flush().await.expect("flush");

        let (gathered, cut) = gather(&client, "fleet", 4, 1, SLOW).await.expect("gather");
        assert_eq!(cut, 0);
        assert_eq!(gathered.len(), 4 * 2003);
        let keys: BTreeSet<&str> = gathered.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(keys.len(), gathered.len(), "a candidate gathered twice");
        let want: BTreeSet<&str> = lists.iter().flatten().map(|c| c.key.as_str()).collect();
        assert_eq!(keys, want);

        let mut d = Detector::without_rules();
        d.settings.resolve_after_ms = 60_000;
        assert!(
            d.evaluate_rings(&[], at(T0)).is_empty(),
            "the detector starts"
        );
        let events = d.evaluate_rings(&gathered, at(T0 + 25 * MINUTE));
        assert_eq!(events.len(), 1, "{events:#?}");
        assert_eq!(events[0].event, EventKind::Open);
        let alert = &events[0].alert;
        let ring = alert
            .explain
            .as_ref()
            .and_then(|e| e.ring.as_ref())
            .expect("ring");
        assert_eq!(ring.member_count, 12);
        assert!(
            ring.members.iter().all(|m| m.starts_with("k-ring-")),
            "{ring:?}"
        );
        assert_eq!(ring.tokens_per_minute, 14_400.0);
        assert_eq!(
            alert.evidence.requests_total, 1200.0,
            "the members' counters summed"
        );
        assert_eq!(alert.evidence.distinct_addresses, 1.0);
        // Each partition alone holds no ring.
        for list in &lists {
            let mut alone = Detector::without_rules();
            alone.evaluate_rings(&[], at(T0));
            assert!(alone.evaluate_rings(list, at(T0 + 25 * MINUTE)).is_empty());
        }

        match gather(&client, "fleet", 5, 2, SLOW).await {
            Err(GatherError::Unanswered(4, _)) => {}
            other => panic!("a partition without a holder: {other:?}"),
        }
        match gather(&client, "moving", 4, 3, SLOW).await {
            Err(GatherError::Unreadable(_, e)) if e.contains("not paged here") => {}
            other => panic!("a holder that changed between pages: {other:?}"),
        }
    }
}
