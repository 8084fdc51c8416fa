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

use tokio::sync::oneshot;

use super::SledStore;
use super::apply;
use super::durability::Durability;
use crate::audit::merkle::CompactRange;
use crate::clock::Clock;
use crate::storage::StorageError;
use crate::storage::sequencer::plan::plan;
use crate::storage::sequencer::{Committed, Failed, Queue, drain, refuse};

/// Longest the sync thread waits for more commits when far fewer are
/// waiting than recent syncs carried (see [`sync_loop`]).
const MAX_LINGER: std::time::Duration = std::time::Duration::from_micros(200);

/// How long the sync thread waits for each further batch while it lingers.
const LINGER_STEP: std::time::Duration = std::time::Duration::from_micros(50);

/// A batch written to sled and waiting for its sync: the replies to send
/// once the sync succeeds, and the Merkle tree's size after it.
type Written = (Vec<(oneshot::Sender<Result<Committed, StorageError>>, Committed)>, u64);

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
    let Queue { mut rx, head, failed } = queue;
    let (to_sync, synced_rx) = std::sync::mpsc::channel::<Written>();
    let db = store.db.clone();
    let sync_failed = failed.clone();
    let durable_tree = store.clone();
    let syncer = std::thread::Builder::new()
        .name("carevault-sync".into())
        .spawn(move || sync_loop(db, durability, synced_rx, sync_failed, durable_tree));
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
                    let _ = p.reply.send(Err(e));
                }
            }
        }
        if let Err(std::sync::mpsc::SendError((replies, _))) = to_sync.send((replies, tree.size())) {
            for (reply, _) in replies {
                let _ = reply.send(Err(StorageError::Io("sync thread unavailable".into())));
            }
        }
    }
    drop(to_sync);
    let _ = syncer.join();
}

/// The sync thread: wait for a written batch, take every other one written
/// meanwhile, make them all durable with one sync, then answer them.
///
/// If far fewer commits are waiting than recent syncs carried (requests
/// answered together tend to come back together, a little spread out), it
/// waits up to [`MAX_LINGER`] for the rest, so they share this sync instead of
/// each group paying for its own. A lone client (recent groups near 1) never waits.
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
) {
    let mut average = 1.0f64;
    while let Ok((first, mut size)) = rx.recv() {
        let mut waiting = first;
        while let Ok((more, s)) = rx.try_recv() {
            waiting.extend(more);
            size = size.max(s);
        }
        if failed.get() {
            for (reply, _) in waiting {
                let _ = reply.send(Err(StorageError::Io("storage failed earlier; restart required".into())));
            }
            continue;
        }
        if average >= 4.0 && (waiting.len() as f64) < average / 2.0 {
            let deadline = std::time::Instant::now() + MAX_LINGER;
            while std::time::Instant::now() < deadline && (waiting.len() as f64) < average {
                match rx.recv_timeout(LINGER_STEP) {
                    Ok((more, s)) => {
                        waiting.extend(more);
                        size = size.max(s);
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
        }
        average = 0.8 * average + 0.2 * waiting.len() as f64;
        let started = std::time::Instant::now();
        let synced = durability.lock().unwrap_or_else(|p| p.into_inner()).sync(&db);
        tracing::debug!(commits = waiting.len(), sync_us = started.elapsed().as_micros(), "batch synced");
        match synced {
            Ok(()) => {
                // Durable now: the tree may be signed and proved at this size.
                store.publish_tree_size(size);
                for (reply, committed) in waiting {
                    let _ = reply.send(Ok(committed));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "audit sync failed; refusing every commit until restart");
                failed.set();
                for (reply, _) in waiting {
                    let _ = reply.send(Err(StorageError::Io("sync failed".into())));
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
