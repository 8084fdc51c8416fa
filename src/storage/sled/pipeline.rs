//! The sled engine's commit pipeline: a sequencer thread that plans and
//! writes batches, and a sync thread that makes them durable, so writing and
//! syncing overlap (group commit).
//!
//! The sequencer thread takes everything queued, plans it (engine-neutral
//! `sequencer::plan`), writes it in the crash-recoverable order of `apply`,
//! and hands the replies to the sync thread. The sync thread takes every
//! batch written meanwhile, makes them all durable with one flush and
//! fdatasync ([`Durability`]), and only then answers. Because the sequencer
//! thread is the only writer, every precondition it checks is exact.

use std::sync::Arc;

use super::SledStore;
use super::apply;
use super::durability::Durability;
use crate::audit::merkle::CompactRange;
use crate::clock::Clock;
use crate::storage::StorageError;
use crate::storage::sequencer::plan::plan;
use crate::storage::sequencer::{Committed, Failed, InFlight, Queue, Reply, drain, refuse};

/// The group a sync aims for: at least this many commits share it when
/// they come fast enough (see [`linger`]).
const GROUP: usize = 24;

/// Longest the sync thread waits for a group to fill.
const MAX_LINGER: std::time::Duration = std::time::Duration::from_millis(3);

/// While lingering, how long without a new commit (and with none on its
/// way) means every commit that was coming is in hand.
const IDLE_GAP: std::time::Duration = std::time::Duration::from_micros(200);

/// A batch written to sled and waiting for its sync: the replies to send
/// once the sync succeeds, and the Merkle tree's size after it.
type Written = (Vec<(Reply, Committed)>, u64);

/// Starts the sequencer thread (and, from it, the sync thread) over `queue`.
pub(super) fn start(
    store: SledStore,
    clock: Arc<dyn Clock>,
    durability: SharedDurability,
    queue: Queue,
    tree: CompactRange,
) -> Result<std::thread::JoinHandle<()>, StorageError> {
    let span = tracing::info_span!("audit_sequencer");
    std::thread::Builder::new()
        .name("carevault-sequencer".into())
        .spawn(move || {
            let _enter = span.enter();
            run(store, clock, durability, queue, tree)
        })
        .map_err(StorageError::from)
}

/// The sync shared by the sync thread and checkpoint writes.
type SharedDurability = Arc<std::sync::Mutex<Durability>>;

fn run(store: SledStore, clock: Arc<dyn Clock>, durability: SharedDurability, queue: Queue, mut tree: CompactRange) {
    let Queue { mut rx, head, failed, in_flight } = queue;
    let (to_sync, synced_rx) = std::sync::mpsc::channel::<Written>();
    let db = store.db.clone();
    let sync_failed = failed.clone();
    let durable_tree = store.clone();
    let syncer = std::thread::Builder::new()
        .name("carevault-sync".into())
        .spawn(move || sync_loop(db, durability, synced_rx, sync_failed, durable_tree, in_flight));
    let syncer = match syncer {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the sync thread; failing every commit closed");
            failed.set();
            while let Some(p) = rx.blocking_recv() {
                refuse(vec![p], "sync thread unavailable");
            }
            return;
        }
    };
    let mut current = *head.lock().unwrap_or_else(|p| p.into_inner());
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        drain(&mut rx, &mut batch);
        if failed.get() {
            refuse(batch, "storage failed earlier; restart required");
            continue;
        }
        let started = std::time::Instant::now();
        // Planning and translating only read: if they fail, nothing was
        // written and the sequencer goes on with the next batch.
        let prepared = plan(&store, &batch, current, &tree, clock.now_micros())
            .and_then(|planned| apply::translate(&store, &planned.commits, &planned.nodes).map(|w| (planned, w)));
        let (planned, writes) = match prepared {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "audit batch could not be planned; nothing of it was written");
                refuse(batch, "commit failed");
                continue;
            }
        };
        let plan_us = started.elapsed().as_micros();
        let written = apply::write(&store, &writes);
        tracing::debug!(batch = batch.len(), plan_us, apply_us = started.elapsed().as_micros(), "batch applied");
        if let Err(e) = written {
            // Part of the batch may be in sled's memory. Nothing more may be
            // appended after it: every later commit fails closed until a
            // restart, whose recovery finishes or drops the batch.
            tracing::error!(error = %e, "audit commit failed; refusing every commit until restart");
            failed.set();
            refuse(batch, "commit failed");
            continue;
        }
        // The batch is in sled (in memory) whatever the sync does next, so the
        // chain continues from it.
        current = planned.head;
        tree = planned.tree;
        *head.lock().unwrap_or_else(|p| p.into_inner()) = planned.head;
        let mut replies = Vec::with_capacity(batch.len());
        for (p, result) in batch.into_iter().zip(planned.results) {
            match result {
                Ok(committed) => replies.push((p.reply, committed)),
                Err(e) => {
                    tracing::error!(error = %e, "an audit entry could not be encoded; its call failed, nothing of it was written");
                    p.reply.send(Err(e));
                }
            }
        }
        if let Err(std::sync::mpsc::SendError((replies, _))) = to_sync.send((replies, tree.size())) {
            for (reply, _) in replies {
                reply.send(Err(StorageError::Io("sync thread unavailable".into())));
            }
        }
    }
    drop(to_sync);
    let _ = syncer.join();
}

/// The sync thread: wait for a written batch, take every other one written
/// meanwhile, make them all durable with one sync, then answer them.
///
/// Before syncing it may wait for more commits to share the sync (see [`linger`]).
///
/// After a failed fdatasync the kernel may have dropped the dirty pages, so
/// nothing may be chained to what it covered: the store is marked failed and
/// every later batch is refused without a sync.
fn sync_loop(
    db: sled::Db,
    durability: SharedDurability,
    rx: std::sync::mpsc::Receiver<Written>,
    failed: Failed,
    store: SledStore,
    in_flight: InFlight,
) {
    // Commits answered per second, recently.
    let mut rate = 0.0f64;
    let mut last_sync = std::time::Instant::now();
    while let Ok((first, mut size)) = rx.recv() {
        let mut waiting = first;
        while let Ok((more, s)) = rx.try_recv() {
            waiting.extend(more);
            size = size.max(s);
        }
        if failed.get() {
            for (reply, _) in waiting {
                reply.send(Err(StorageError::Io("storage failed earlier; restart required".into())));
            }
            continue;
        }
        linger(&rx, &mut waiting, &mut size, rate, &in_flight);
        let now = std::time::Instant::now();
        let since = now.duration_since(last_sync).as_secs_f64().max(1e-6);
        last_sync = now;
        rate = 0.7 * rate + 0.3 * (waiting.len() as f64 / since);
        let started = std::time::Instant::now();
        let synced = durability.lock().unwrap_or_else(|p| p.into_inner()).sync(&db);
        tracing::debug!(commits = waiting.len(), sync_us = started.elapsed().as_micros(), "batch synced");
        match synced {
            Ok(()) => {
                // Durable now: the tree may be signed and proved at this size.
                store.publish_tree_size(size);
                for (reply, committed) in waiting {
                    reply.send(Ok(committed));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "audit sync failed; refusing every commit until restart");
                failed.set();
                for (reply, _) in waiting {
                    reply.send(Err(StorageError::Io("sync failed".into())));
                }
            }
        }
    }
    if !failed.get()
        && let Err(e) = durability.lock().unwrap_or_else(|p| p.into_inner()).sync(&db)
    {
        tracing::error!(error = %e, "final sync at shutdown failed");
    }
}

/// Waits for more written batches to join `waiting` before its sync, so
/// that a sync carries [`GROUP`] commits when they come fast enough.
///
/// At the recent `rate` (commits per second), the rest of the group would
/// take `(GROUP - waiting) / rate`: if that is within [`MAX_LINGER`], it
/// waits that long, and stops early once the group is full, or once
/// [`IDLE_GAP`] passed without a new batch while no commit is on its way
/// (every call in progress is in hand: nothing more is coming soon). A lone
/// client, whose rate is one call's round trip, never waits; neither does a
/// group that is full.
fn linger(
    rx: &std::sync::mpsc::Receiver<Written>,
    waiting: &mut Vec<(Reply, Committed)>,
    size: &mut u64,
    rate: f64,
    in_flight: &InFlight,
) {
    let Some(wait) = group_wait(waiting.len(), rate) else { return };
    let deadline = std::time::Instant::now() + wait;
    while waiting.len() < GROUP {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return;
        }
        match rx.recv_timeout(left.min(IDLE_GAP)) {
            Ok((more, s)) => {
                waiting.extend(more);
                *size = (*size).max(s);
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if in_flight.count() > waiting.len() => {}
            Err(_) => return,
        }
    }
}

/// How long the rest of a group of [`GROUP`] takes to come at `rate`
/// commits a second, when `in_hand` are waiting: `None` if the group is
/// full, nothing has come yet, or it would take longer than [`MAX_LINGER`].
fn group_wait(in_hand: usize, rate: f64) -> Option<std::time::Duration> {
    let missing = GROUP.saturating_sub(in_hand);
    if missing == 0 || !rate.is_finite() || rate <= 0.0 {
        return None;
    }
    let need = std::time::Duration::try_from_secs_f64(missing as f64 / rate).ok()?;
    (need <= MAX_LINGER).then_some(need)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sync_waits_only_for_a_group_that_fills_soon() {
        // 10k commits a second: the 14 missing of 24 take 1.4 ms.
        let wait = group_wait(10, 10_000.0).unwrap();
        assert!((wait.as_secs_f64() - 0.0014).abs() < 1e-9, "{wait:?}");
        assert_eq!(group_wait(GROUP, 10_000.0), None, "a full group syncs at once");
        assert_eq!(group_wait(GROUP + 5, 10_000.0), None);
        // A lone client at 2k calls a second would need 11.5 ms for the rest: it never waits.
        assert_eq!(group_wait(1, 2_000.0), None);
        assert_eq!(group_wait(1, 0.0), None, "no rate yet");
        assert_eq!(group_wait(1, f64::NAN), None);
        assert_eq!(group_wait(1, f64::INFINITY), None);
        assert!(group_wait(1, 23.0 / MAX_LINGER.as_secs_f64()).is_some(), "at the limit it still waits");
    }
}
