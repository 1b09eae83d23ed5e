//! The catalog: every conversation nestor knows, the downstream it lives on, its owner and
//! its last known `ConversationInfo`.
//!
//! It answers two questions:
//! * **where** does conversation X live ([`Catalog::route`], one hash lookup on the request
//!   path), and
//! * **what** conversations exist (search, count, batch), merged across every downstream.
//!
//! It is fed by creates and forks nestor forwards, and by refreshing from the downstreams
//! themselves ([`Catalog::refresh`]: a paged `/api/conversations/search` on each), which
//! also adopts conversations nestor did not create (present on an `existing` server at
//! start, children started by an agent). Downstreams that are stopped keep their last known
//! entries, so the list stays complete while they sleep.
//!
//! Removals leave a short-lived **tombstone** (the id and when it was removed). A listing
//! is a snapshot taken over the network: one that was already in flight when a delete
//! succeeded (or whose earlier page was read before it) still names the deleted
//! conversation, and adopting it as "new" brought it back into search and count, wrote it
//! to disk again, and kept its per-conversation downstream from being released (the
//! delete's `count_on` saw it). So a refresh does not adopt an id removed after the
//! refresh started, and [`Catalog::fetch_live`] only updates entries, never inserts. An
//! explicit [`Catalog::register`] (a create, possibly re-using the id) clears the tombstone.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use futures::StreamExt;
use nestor_core::client::ClientError;
use nestor_core::{ConversationId, Downstream, DownstreamClient, DownstreamId, DownstreamState, UserId};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::sync::Mutex;

use crate::search::{self, Page, SearchItem};
use crate::store::{Store, StoredEntry};
use crate::writer::Writer;
use crate::query::SortOrder;

/// How long a removal's tombstone is kept at least (see the module docs). It only has to
/// outlive the refreshes in flight at the removal, which are bounded by
/// [`CatalogConfig::refresh_timeout`] (plus their in-memory merge); the effective lifetime
/// is the larger of this and a few refresh timeouts.
const TOMBSTONE_TTL: Duration = Duration::from_secs(300);

/// Whether [`Catalog::upsert`] may insert an id the catalog does not hold.
#[derive(Debug, Clone, Copy)]
enum Adopt {
    /// Yes: an explicit registration (create, fork, provisioner lookup).
    Always,
    /// Unless it was removed lately (it has a tombstone): what a downstream reports on its
    /// own (a webhook), which may have been sent before the removal.
    UnlessRemoved,
    /// Unless it was removed at or after this instant: a listing requested then, which may
    /// predate the removal.
    UnlessRemovedSince(Instant),
    /// No, only update: a live read of conversations the caller found in the catalog.
    Never,
}

/// Tuning of the catalog.
#[derive(Debug, Clone)]
pub struct CatalogConfig {
    /// A downstream's list is fetched again when older than this on a search.
    pub max_staleness: Duration,
    /// Bound on one downstream's full refresh.
    pub refresh_timeout: Duration,
    /// Downstreams refreshed at once.
    pub refresh_concurrency: usize,
    /// Largest number of pages read from one downstream (100 conversations each).
    pub max_pages: usize,
}

impl Default for CatalogConfig {
    fn default() -> Self {
        Self {
            max_staleness: Duration::from_secs(1),
            refresh_timeout: Duration::from_secs(10),
            refresh_concurrency: 16,
            max_pages: 1000,
        }
    }
}

/// One conversation in the catalog.
#[derive(Debug, Clone)]
pub struct Entry {
    pub downstream: Arc<Downstream>,
    pub owner: UserId,
    pub item: SearchItem,
    /// When nestor registered it (a refresh that started earlier must not remove it).
    pub registered_at: Instant,
    /// Hash of the info's JSON text as its downstream last listed it (0: the info came from
    /// elsewhere, or was patched since). A refresh re-parses only infos whose text changed.
    pub listed_hash: u64,
}

#[derive(Default)]
struct RefreshState {
    lock: Mutex<()>,
    last_ok: std::sync::Mutex<Option<Instant>>,
}

/// A downstream's search page, as far as the catalog reads it: each item kept as its JSON
/// text until the catalog knows it changed (parsing ~3 KB infos into `Value`s, comparing and
/// copying them was ~100 µs per conversation per refresh, the tail of every search).
#[derive(Deserialize)]
struct DownstreamPage {
    items: Vec<Box<RawValue>>,
    next_page_id: Option<String>,
}

/// Only the `id` of an info (the rest is skipped without building values).
#[derive(Deserialize)]
struct IdOnly<'a> {
    #[serde(borrow)]
    id: Option<std::borrow::Cow<'a, str>>,
}

fn text_hash(s: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    // 0 means "not from a listing".
    h.finish().max(1)
}

/// The catalog.
pub struct Catalog {
    entries: DashMap<ConversationId, Entry>,
    /// Writes entries to disk, off the request path (see crate::writer).
    writer: Writer,
    client: DownstreamClient,
    cfg: CatalogConfig,
    refresh: DashMap<DownstreamId, Arc<RefreshState>>,
    /// Recently removed ids and when (see the module docs); pruned on every removal.
    tombstones: DashMap<ConversationId, Instant>,
}

/// `runtime_info` as nestor reports it: the provisioning state of the conversation's
/// downstream (the 1.58 `ConversationRuntimeInfo` shape).
pub fn runtime_info(ds: &Downstream) -> Value {
    match ds.state() {
        DownstreamState::Ready => json!({"runtime_status": "available", "can_resume": true, "runtime_error": null}),
        DownstreamState::Starting => json!({"runtime_status": "starting", "can_resume": true, "runtime_error": null}),
        DownstreamState::Stopped => json!({"runtime_status": "missing", "can_resume": true, "runtime_error": null}),
        DownstreamState::Released => json!({"runtime_status": "missing", "can_resume": false, "runtime_error": null}),
        DownstreamState::Failed(m) => json!({
            "runtime_status": "error",
            "can_resume": true,
            "runtime_error": {"code": "runtime_failed", "message": &*m},
        }),
    }
}

impl Catalog {
    /// Open the catalog persisted under `dir`, resolving downstream ids with `resolve`
    /// (entries whose downstream no longer exists are dropped from memory, not from disk).
    pub fn open(
        dir: &std::path::Path,
        client: DownstreamClient,
        cfg: CatalogConfig,
        resolve: impl Fn(&DownstreamId) -> Option<Arc<Downstream>>,
    ) -> std::io::Result<Self> {
        let store = Store::open(dir)?;
        let entries = DashMap::new();
        let mut dropped = 0;
        for s in store.load_all() {
            let Some(ds) = resolve(&s.downstream) else {
                dropped += 1;
                tracing::warn!(conversation = %s.id, downstream = %s.downstream, "catalog entry's downstream is gone; not routing it");
                continue;
            };
            ds.add_conversations(1);
            entries.insert(
                s.id,
                Entry {
                    downstream: ds,
                    owner: s.owner,
                    item: SearchItem::from_info(s.id, s.info),
                    registered_at: Instant::now(),
                    listed_hash: 0,
                },
            );
        }
        tracing::info!(conversations = entries.len(), dropped, "catalog loaded");
        Ok(Self { entries, writer: Writer::new(store), client, cfg, refresh: DashMap::new(), tombstones: DashMap::new() })
    }

    /// Where `id` lives (and whose it is).
    pub fn route(&self, id: &ConversationId) -> Option<(Arc<Downstream>, UserId)> {
        self.entries.get(id).map(|e| (e.downstream.clone(), e.owner.clone()))
    }

    /// The downstream of `id` if `allowed(owner)`: [`Catalog::route`] without copying the
    /// owner (the fast path's check, on every request).
    pub fn route_if(&self, id: &ConversationId, allowed: impl FnOnce(&UserId) -> bool) -> Option<Arc<Downstream>> {
        let e = self.entries.get(id)?;
        allowed(&e.owner).then(|| e.downstream.clone())
    }

    pub fn get(&self, id: &ConversationId) -> Option<Entry> {
        self.entries.get(id).map(|e| e.clone())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Conversations routed to `ds`.
    pub fn count_on(&self, ds: &DownstreamId) -> usize {
        self.entries.iter().filter(|e| e.downstream.id() == ds).count()
    }

    /// Record (or update) a conversation. Persisted before returning.
    /// The caller knows it exists now (a create may re-use a deleted id), so this clears a
    /// removal's tombstone.
    pub async fn register(&self, id: ConversationId, ds: &Arc<Downstream>, owner: UserId, info: Value) {
        let info = Arc::new(info);
        let stored = StoredEntry { version: 1, id, downstream: ds.id().clone(), owner: owner.clone(), info: info.clone() };
        self.tombstones.remove(&id);
        self.upsert(id, ds, owner, info, 0, Adopt::Always);
        // The writer logs a failure; the route stands in memory either way.
        let _ = self.writer.save_durable(stored).await;
    }

    /// Record what a downstream reports about a conversation on its own (a webhook): as
    /// [`Catalog::register`], except that a conversation removed lately is not brought back
    /// by a report sent before its removal. Returns whether it is held now.
    pub async fn report(&self, id: ConversationId, ds: &Arc<Downstream>, owner: UserId, info: Value) -> bool {
        let info = Arc::new(info);
        let changed = self.upsert(id, ds, owner.clone(), info.clone(), 0, Adopt::UnlessRemoved);
        if changed {
            let stored = StoredEntry { version: 1, id, downstream: ds.id().clone(), owner, info };
            // The writer logs a failure; the route stands in memory either way.
            let _ = self.writer.save_durable(stored).await;
        }
        self.entries.contains_key(&id)
    }

    /// Wait (bounded) until every queued catalog write is on disk (graceful shutdown).
    pub async fn flush(&self, within: Duration) -> bool {
        self.writer.flush(within).await
    }

    /// Insert or update in memory; returns whether anything changed.
    /// `listed_hash`: the hash of the info's text when it comes from a listing, else 0.
    /// `adopt`: whether an id the catalog does not hold may be inserted.
    fn upsert(&self, id: ConversationId, ds: &Arc<Downstream>, owner: UserId, info: Arc<Value>, listed_hash: u64, adopt: Adopt) -> bool {
        let item = SearchItem::from_info(id, info);
        match self.entries.entry(id) {
            dashmap::Entry::Occupied(mut o) => {
                let e = o.get_mut();
                let moved = e.downstream.id() != ds.id();
                if moved {
                    e.downstream.add_conversations(-1);
                    ds.add_conversations(1);
                    e.downstream = ds.clone();
                }
                let changed = moved || *e.item.info != *item.info;
                e.item = item;
                e.listed_hash = listed_hash;
                changed
            }
            dashmap::Entry::Vacant(v) => {
                // Decided while holding the entry's shard: `remove` writes the tombstone
                // before taking the entry, so either the tombstone is seen here, or the
                // removal comes after this insert and removes it.
                let allowed = match adopt {
                    Adopt::Always => true,
                    Adopt::UnlessRemoved => !self.tombstones.contains_key(&id),
                    Adopt::Never => false,
                    Adopt::UnlessRemovedSince(since) => self.tombstones.get(&id).is_none_or(|t| *t < since),
                };
                if !allowed {
                    tracing::debug!(conversation = %id, downstream = %ds.id(), ?adopt, "not re-adding a conversation removed meanwhile");
                    return false;
                }
                ds.add_conversations(1);
                v.insert(Entry { downstream: ds.clone(), owner, item, registered_at: Instant::now(), listed_hash });
                true
            }
        }
    }

    /// Forget a conversation (deleted). Returns its entry.
    /// Leaves a tombstone (even when the id was not held: a refresh may be about to add it).
    pub async fn remove(&self, id: &ConversationId) -> Option<Entry> {
        self.bury(*id);
        let (_, e) = self.entries.remove(id)?;
        e.downstream.add_conversations(-1);
        // The writer logs a failure.
        let _ = self.writer.remove_durable(*id).await;
        Some(e)
    }

    /// Record `id`'s removal now, pruning tombstones old enough that no refresh in flight
    /// can predate them (bounded by the removals of the last [`Catalog::tombstone_ttl`]).
    fn bury(&self, id: ConversationId) {
        let now = Instant::now();
        let ttl = self.tombstone_ttl();
        self.tombstones.retain(|_, t| now.saturating_duration_since(*t) < ttl);
        self.tombstones.insert(id, now);
    }

    fn tombstone_ttl(&self) -> Duration {
        TOMBSTONE_TTL.max(self.cfg.refresh_timeout.saturating_mul(4))
    }

    /// Fetch `ds`'s whole conversation list and merge it in: new conversations are adopted,
    /// changed ones updated, ones that disappeared (deleted behind nestor's back) removed.
    pub async fn refresh(&self, ds: &Arc<Downstream>) -> Result<usize, ClientError> {
        let started = Instant::now();
        let Some(ep) = ds.endpoint() else {
            return Err(ClientError::Connect("the agent-server is not running".into()));
        };
        let fetch = async {
            let mut found: Vec<Box<RawValue>> = Vec::new();
            let mut page_id: Option<String> = None;
            for _ in 0..self.cfg.max_pages {
                let mut path = String::from("/api/conversations/search?limit=100");
                if let Some(p) = &page_id {
                    path.push_str("&page_id=");
                    path.extend(form_urlencoded::byte_serialize(p.as_bytes()));
                }
                let page: DownstreamPage = self.client.get_json(&ep, &path, self.cfg.refresh_timeout).await?;
                found.extend(page.items);
                match page.next_page_id {
                    Some(p) if Some(&p) != page_id.as_ref() => page_id = Some(p),
                    _ => break,
                }
            }
            Ok::<_, ClientError>(found)
        };
        let found = tokio::time::timeout(self.cfg.refresh_timeout, fetch)
            .await
            .unwrap_or(Err(ClientError::Timeout(self.cfg.refresh_timeout)))?;

        let mut seen = HashSet::with_capacity(found.len());
        let mut changed = Vec::new();
        for raw in found {
            let text = raw.get();
            let Some(id) = serde_json::from_str::<IdOnly>(text).ok().and_then(|i| i.id).and_then(|s| ConversationId::parse(&s).ok()) else { continue };
            seen.insert(id);
            let hash = text_hash(text);
            let unchanged = self.entries.get(&id).is_some_and(|e| e.listed_hash == hash && e.downstream.id() == ds.id());
            if unchanged {
                continue;
            }
            let info: Value = match serde_json::from_str(text) {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(conversation = %id, downstream = %ds.id(), "unreadable conversation info in a listing: {e}");
                    continue;
                }
            };
            let owner = self
                .entries
                .get(&id)
                .map(|e| e.owner.clone())
                .or_else(|| ds.owner().cloned())
                .unwrap_or_else(UserId::default_user);
            let info = Arc::new(info);
            // Not re-adding one removed since this listing was requested (module docs).
            if self.upsert(id, ds, owner.clone(), info.clone(), hash, Adopt::UnlessRemovedSince(started)) {
                changed.push(StoredEntry { version: 1, id, downstream: ds.id().clone(), owner, info });
            }
        }
        let gone: Vec<ConversationId> = self
            .entries
            .iter()
            .filter(|e| e.downstream.id() == ds.id() && !seen.contains(e.key()) && e.registered_at < started)
            .map(|e| *e.key())
            .collect();
        for id in &gone {
            tracing::info!(conversation = %id, downstream = %ds.id(), "conversation vanished from its agent-server; dropping it");
            self.remove(id).await;
        }
        // Cached infos: written in the background (a lost one is listed again).
        // Only entries still held on `ds`, checked under the entry's lock: a removal since
        // either is seen here, or queues its file removal after this save (which it then
        // supersedes); saving regardless wrote a deleted conversation back to disk.
        for e in changed {
            if let Some(cur) = self.entries.get(&e.id) {
                if cur.downstream.id() == &e.downstream {
                    self.writer.save(e);
                }
            }
        }
        let state = self.refresh.entry(ds.id().clone()).or_default().clone();
        *state.last_ok.lock().unwrap() = Some(Instant::now());
        Ok(seen.len())
    }

    /// Record that the catalog knows everything `ds` holds as of now, as if it had just been
    /// listed: nestor created the downstream for one conversation and registered that
    /// conversation from the create answer, so a list would only repeat it. Without this, the
    /// first search after every create asked that new downstream, webhooks or not.
    pub fn mark_listed(&self, ds: &DownstreamId) {
        let state = self.refresh.entry(ds.clone()).or_default().clone();
        *state.last_ok.lock().unwrap() = Some(Instant::now());
    }

    /// Refresh every running downstream whose list is older than `max_staleness`.
    /// Concurrent callers share one refresh per downstream. Failures are logged, not fatal:
    /// the last known entries stand.
    pub async fn refresh_stale(&self, downstreams: Vec<Arc<Downstream>>) {
        let max_age = self.cfg.max_staleness;
        self.refresh_stale_with(downstreams, |_| max_age).await
    }

    /// [`Catalog::refresh_stale`] with a per-downstream bound on the list's age (a
    /// downstream that reports changes by webhook can be re-listed far less often).
    pub async fn refresh_stale_with(&self, downstreams: Vec<Arc<Downstream>>, max_age_for: impl Fn(&DownstreamId) -> Duration) {
        let fresh = |ds: &DownstreamId| {
            let max_age = max_age_for(ds);
            self.refresh
                .get(ds)
                .and_then(|s| *s.last_ok.lock().unwrap())
                .is_some_and(|t| t.elapsed() < max_age)
        };
        futures::stream::iter(downstreams.into_iter().filter(|d| d.state() == DownstreamState::Ready))
            .map(|ds| async move {
                if fresh(ds.id()) {
                    return;
                }
                let state = self.refresh.entry(ds.id().clone()).or_default().clone();
                let _g = state.lock.lock().await;
                if fresh(ds.id()) {
                    return; // someone refreshed it while we waited
                }
                if let Err(e) = self.refresh(&ds).await {
                    tracing::warn!(downstream = %ds.id(), "could not refresh conversation list: {e}");
                }
            })
            .buffer_unordered(self.cfg.refresh_concurrency.max(1))
            .collect::<Vec<()>>()
            .await;
    }

    /// Items visible to `owner` (None: everyone's).
    fn visible(&self, owner: Option<&UserId>) -> Vec<SearchItem> {
        self.entries
            .iter()
            .filter(|e| owner.is_none_or(|o| &e.owner == o))
            .map(|e| e.item.clone())
            .collect()
    }

    /// One page of the merged list.
    pub fn search(
        &self,
        owner: Option<&UserId>,
        status: Option<&str>,
        order: SortOrder,
        page_id: Option<&str>,
        limit: usize,
    ) -> Page {
        search::page(self.visible(owner), status, order, page_id, limit)
    }

    pub fn count(&self, owner: Option<&UserId>, status: Option<&str>) -> usize {
        self.entries
            .iter()
            .filter(|e| owner.is_none_or(|o| &e.owner == o))
            .filter(|e| status.is_none_or(|s| e.item.status.as_deref() == Some(s)))
            .count()
    }

    /// A cached info with nestor's `runtime_info` overlaid.
    pub fn presented_info(&self, id: &ConversationId) -> Option<Value> {
        let e = self.entries.get(id)?;
        Some(present(&e.item.info, &e.downstream))
    }

    /// What [`Self::presented_info`] shows, without copying the info: the shared info and
    /// the `runtime_info` that replaces its own (see [`Presented`]).
    pub fn presented(&self, id: &ConversationId) -> Option<Presented> {
        let e = self.entries.get(id)?;
        Some(Presented { info: e.item.info.clone(), runtime_info: runtime_info(&e.downstream) })
    }

    /// Fetch `ids` (all on `ds`) live from the downstream, updating the catalog's entries
    /// for them (never adding one).
    /// Returns the infos in request order (None: the downstream does not know it).
    pub async fn fetch_live(
        &self,
        ds: &Arc<Downstream>,
        ids: &[ConversationId],
        include_skills: bool,
        timeout: Duration,
    ) -> Result<Vec<Option<Value>>, ClientError> {
        let Some(ep) = ds.endpoint() else {
            return Err(ClientError::Connect("the agent-server is not running".into()));
        };
        let mut path = String::from("/api/conversations?");
        for (i, id) in ids.iter().enumerate() {
            if i > 0 {
                path.push('&');
            }
            path.push_str("ids=");
            path.push_str(&id.to_string());
        }
        if include_skills {
            path.push_str("&include_skills=true");
        }
        let infos: Vec<Option<Value>> = self.client.get_json(&ep, &path, timeout).await?;
        for (id, info) in ids.iter().zip(&infos) {
            if let Some(info) = info {
                if !include_skills {
                    // Update only: it may have been removed (deleted) while this read was in
                    // flight, and must not come back from its answer.
                    if let Some(owner) = self.entries.get(id).map(|e| e.owner.clone()) {
                        self.upsert(*id, ds, owner, Arc::new(info.clone()), 0, Adopt::Never);
                    }
                }
            }
        }
        Ok(infos.into_iter().map(|i| i.map(|v| present(&v, ds))).collect())
    }

    /// Fold a batch of events a downstream reported (webhook) into `id`'s info: state
    /// updates (`execution_status`, `stats`, …, and whole `full_state` snapshots) patch the
    /// matching fields, and `updated_at` moves to now. Persisted in the background.
    pub fn apply_events(&self, id: &ConversationId, from: &DownstreamId, events: &[Value]) {
        let updated = {
            let Some(mut e) = self.entries.get_mut(id) else { return };
            if e.downstream.id() != from {
                return; // not its downstream: ignore
            }
            let mut info = (*e.item.info).clone();
            let Some(obj) = info.as_object_mut() else { return };
            let mut changed = false;
            for ev in events {
                if ev.get("kind").and_then(Value::as_str) != Some("ConversationStateUpdateEvent") {
                    continue;
                }
                let (Some(key), Some(value)) = (ev.get("key").and_then(Value::as_str), ev.get("value")) else { continue };
                if key == "full_state" {
                    if let Some(state) = value.as_object() {
                        for (k, v) in state {
                            if obj.contains_key(k) && k != "id" && k != "agent" && k != "workspace" {
                                obj.insert(k.clone(), v.clone());
                                changed = true;
                            }
                        }
                    }
                } else if obj.contains_key(key) {
                    obj.insert(key.to_owned(), value.clone());
                    changed = true;
                }
            }
            if !changed && events.is_empty() {
                return;
            }
            let now = time::OffsetDateTime::now_utc();
            let stamp = format!(
                "{}Z",
                now.format(&time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]"))
                    .unwrap_or_default()
            );
            obj.insert("updated_at".into(), Value::String(stamp));
            let info = Arc::new(info);
            e.item = SearchItem::from_info(*id, info.clone());
            // Patched here: the next listing's text is taken whatever it is.
            e.listed_hash = 0;
            StoredEntry { version: 1, id: *id, downstream: from.clone(), owner: e.owner.clone(), info }
        };
        self.writer.save(updated);
    }

    /// Ids visible to `owner` (None: everyone's).
    pub fn visible_ids(&self, owner: Option<&UserId>) -> Vec<ConversationId> {
        self.entries.iter().filter(|e| owner.is_none_or(|o| &e.owner == o)).map(|e| *e.key()).collect()
    }

    /// The conversation's working directory (as its downstream reported it).
    pub fn working_dir(&self, id: &ConversationId) -> Option<String> {
        let e = self.entries.get(id)?;
        e.item.info.get("workspace")?.get("working_dir")?.as_str().map(str::to_owned)
    }

    /// Entries whose downstream is `ds`.
    pub fn ids_on(&self, ds: &DownstreamId) -> Vec<ConversationId> {
        self.entries.iter().filter(|e| e.downstream.id() == ds).map(|e| *e.key()).collect()
    }
}

/// A cataloged conversation as a client sees it: its info with `runtime_info` describing
/// its downstream. Serializes like [`present`]'s value (`runtime_info` last) without
/// copying the info: a search page of 100 conversations used to deep-copy each one twice.
#[derive(Debug, Clone)]
pub struct Presented {
    pub info: Arc<Value>,
    pub runtime_info: Value,
}

impl serde::Serialize for Presented {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let Some(obj) = self.info.as_object() else { return self.info.serialize(s) };
        let mut m = s.serialize_map(None)?;
        for (k, v) in obj {
            if k != "runtime_info" {
                m.serialize_entry(k, v)?;
            }
        }
        m.serialize_entry("runtime_info", &self.runtime_info)?;
        m.end()
    }
}

/// `info` with `runtime_info` describing `ds` (what nestor knows of the runtime).
pub fn present(info: &Value, ds: &Downstream) -> Value {
    let mut v = info.clone();
    if let Some(obj) = v.as_object_mut() {
        obj.insert("runtime_info".into(), runtime_info(ds));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Presented` writes what `present` builds: the info with its `runtime_info` replaced.
    #[test]
    fn presented_serializes_like_present() {
        let info = serde_json::json!({"id": "x", "title": "t", "runtime_info": {"stale": true}, "tags": {"a": "b"}});
        let runtime = serde_json::json!({"runtime_status": "available"});
        let p = Presented { info: Arc::new(info.clone()), runtime_info: runtime.clone() };
        let mut expected = info;
        expected["runtime_info"] = runtime;
        assert_eq!(serde_json::to_value(&p).unwrap(), expected);
        let not_an_object = Presented { info: Arc::new(serde_json::json!([1])), runtime_info: Value::Null };
        assert_eq!(serde_json::to_value(&not_an_object).unwrap(), serde_json::json!([1]));
    }

    use nestor_core::Endpoint;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::mpsc;

    /// Bound on every wait of these tests (generous: they only wait on each other).
    const WAIT: Duration = Duration::from_secs(10);

    /// A downstream whose answers the test releases, so a listing can be held in flight.
    /// Each request's path is reported on the first channel; it is answered (200, JSON, then
    /// the connection closed) with the next body the test sends on the second.
    async fn gated_downstream() -> (Arc<Downstream>, mpsc::Receiver<String>, mpsc::Sender<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (req_tx, req_rx) = mpsc::channel(16);
        let (ans_tx, mut ans_rx) = mpsc::channel::<String>(16);
        tokio::spawn(async move {
            // Ends when the test drops its sender or the listener fails.
            while let Ok((mut sock, _)) = listener.accept().await {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < (64 << 10) {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let line = String::from_utf8_lossy(&head).lines().next().unwrap_or_default().to_owned();
                let path = line.split(' ').nth(1).unwrap_or_default().to_owned();
                if req_tx.send(path).await.is_err() {
                    return;
                }
                let Some(body) = ans_rx.recv().await else { return };
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
                let _ = sock.shutdown().await;
            }
        });
        let ds = Downstream::new(
            DownstreamId::new("gated"),
            "test",
            None,
            None,
            Some(Endpoint::loopback(port, None)),
            DownstreamState::Ready,
        );
        (ds, req_rx, ans_tx)
    }

    async fn next_request(rx: &mut mpsc::Receiver<String>) -> String {
        tokio::time::timeout(WAIT, rx.recv()).await.expect("the catalog asked its downstream in time").expect("server running")
    }

    fn info(id: ConversationId) -> Value {
        json!({"id": id.to_string(), "title": "t", "execution_status": "idle"})
    }

    /// `catalog.refresh(ds)` in a task of its own, so the test can hold its listing in flight.
    fn spawn_refresh(catalog: &Arc<Catalog>, ds: &Arc<Downstream>) -> tokio::task::JoinHandle<Result<usize, ClientError>> {
        let (catalog, ds) = (catalog.clone(), ds.clone());
        tokio::spawn(async move { catalog.refresh(&ds).await })
    }

    fn open(dir: &std::path::Path) -> Arc<Catalog> {
        Arc::new(Catalog::open(dir, DownstreamClient::default(), CatalogConfig::default(), |_| None).unwrap())
    }

    /// A listing requested before a delete, answered after it, still names the deleted
    /// conversation: it must stay gone (route, count, the downstream's count, disk), so the
    /// delete's `count_on` lets the downstream be released. Then a create of the same id
    /// registers it again, and a later listing naming it keeps it.
    #[tokio::test]
    async fn a_listing_in_flight_does_not_bring_back_a_deleted_conversation() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = open(dir.path());
        let (ds, mut requests, answers) = gated_downstream().await;
        let x = ConversationId::new_random();
        catalog.register(x, &ds, UserId::default_user(), info(x)).await;
        assert_eq!(catalog.count_on(ds.id()), 1);

        let refresh = spawn_refresh(&catalog, &ds);
        assert!(next_request(&mut requests).await.starts_with("/api/conversations/search"));
        // The delete succeeds while the listing is in flight.
        assert!(catalog.remove(&x).await.is_some());
        assert_eq!(catalog.count_on(ds.id()), 0);
        answers.send(json!({"items": [info(x)], "next_page_id": null}).to_string()).await.unwrap();
        let listed = tokio::time::timeout(WAIT, refresh).await.unwrap().unwrap().unwrap();
        assert_eq!(listed, 1);

        assert!(catalog.route(&x).is_none(), "the deleted conversation came back");
        assert_eq!(catalog.count(None, None), 0);
        assert_eq!(catalog.count_on(ds.id()), 0);
        assert_eq!(ds.conversation_count(), 0);
        assert!(catalog.flush(WAIT).await);
        assert!(Store::open(dir.path()).unwrap().load_all().is_empty(), "written back to disk");

        // Created again with the same id: registered, and kept by a listing naming it.
        catalog.register(x, &ds, UserId::default_user(), info(x)).await;
        let refresh = spawn_refresh(&catalog, &ds);
        next_request(&mut requests).await;
        answers.send(json!({"items": [info(x)], "next_page_id": null}).to_string()).await.unwrap();
        tokio::time::timeout(WAIT, refresh).await.unwrap().unwrap().unwrap();
        assert!(catalog.route(&x).is_some());
        assert_eq!(catalog.count_on(ds.id()), 1);
        assert_eq!(ds.conversation_count(), 1);
    }

    /// The same over a multi-page listing: the deleted conversation was on a page read
    /// before the delete, while a later page (adopting a new conversation) was in flight.
    /// A listing requested after the delete adopts the id again (it really exists then).
    #[tokio::test]
    async fn a_conversation_on_an_earlier_page_stays_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = open(dir.path());
        let (ds, mut requests, answers) = gated_downstream().await;
        let (x, z) = (ConversationId::new_random(), ConversationId::new_random());
        catalog.register(x, &ds, UserId::default_user(), info(x)).await;

        let refresh = spawn_refresh(&catalog, &ds);
        next_request(&mut requests).await;
        answers.send(json!({"items": [info(x)], "next_page_id": "p2"}).to_string()).await.unwrap();
        assert!(next_request(&mut requests).await.contains("page_id=p2"));
        catalog.remove(&x).await;
        answers.send(json!({"items": [info(z)], "next_page_id": null}).to_string()).await.unwrap();
        assert_eq!(tokio::time::timeout(WAIT, refresh).await.unwrap().unwrap().unwrap(), 2);
        assert!(catalog.route(&x).is_none());
        assert!(catalog.route(&z).is_some(), "a new conversation is still adopted");
        assert_eq!(catalog.ids_on(ds.id()), vec![z]);
        assert_eq!(ds.conversation_count(), 1);
        assert!(catalog.flush(WAIT).await);
        let on_disk: Vec<_> = Store::open(dir.path()).unwrap().load_all().into_iter().map(|e| e.id).collect();
        assert_eq!(on_disk, vec![z]);

        let refresh = spawn_refresh(&catalog, &ds);
        next_request(&mut requests).await;
        answers.send(json!({"items": [info(x), info(z)], "next_page_id": null}).to_string()).await.unwrap();
        tokio::time::timeout(WAIT, refresh).await.unwrap().unwrap().unwrap();
        assert!(catalog.route(&x).is_some(), "listed after its removal: adopted");
        assert_eq!(ds.conversation_count(), 2);
    }

    /// A live read in flight when the conversation is deleted does not re-add it (and still
    /// answers what the downstream said). Also the narrower interleaving, driven step by
    /// step: `fetch_live` found the entry's owner, then the delete removed it, then its
    /// update ran (`Adopt::Never`): nothing is inserted.
    #[tokio::test]
    async fn a_live_read_in_flight_does_not_bring_back_a_deleted_conversation() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = open(dir.path());
        let (ds, mut requests, answers) = gated_downstream().await;
        let x = ConversationId::new_random();
        catalog.register(x, &ds, UserId::default_user(), info(x)).await;

        let read = tokio::spawn({
            let (catalog, ds) = (catalog.clone(), ds.clone());
            async move { catalog.fetch_live(&ds, &[x], false, WAIT).await }
        });
        assert!(next_request(&mut requests).await.starts_with("/api/conversations?ids="));
        catalog.remove(&x).await;
        answers.send(json!([info(x)]).to_string()).await.unwrap();
        let infos = tokio::time::timeout(WAIT, read).await.unwrap().unwrap().unwrap();
        assert_eq!(infos.len(), 1);
        assert_eq!(infos[0].as_ref().unwrap()["id"], x.to_string());
        assert!(catalog.route(&x).is_none(), "the deleted conversation came back");
        assert_eq!(catalog.count(None, None), 0);
        assert_eq!(ds.conversation_count(), 0);

        let y = ConversationId::new_random();
        catalog.register(y, &ds, UserId::default_user(), info(y)).await;
        let owner = catalog.get(&y).map(|e| e.owner).unwrap();
        catalog.remove(&y).await;
        assert!(!catalog.upsert(y, &ds, owner, Arc::new(info(y)), 0, Adopt::Never));
        assert!(catalog.route(&y).is_none());
        assert_eq!(ds.conversation_count(), 0);
    }

    /// A downstream's report (webhook) sent before a delete and arriving after it does not
    /// bring the conversation back; one about a conversation nestor never removed is
    /// adopted; a create of the removed id again (register) still works.
    #[tokio::test]
    async fn a_stale_report_does_not_bring_back_a_deleted_conversation() {
        let dir = tempfile::tempdir().unwrap();
        let catalog = open(dir.path());
        let (ds, _requests, _answers) = gated_downstream().await;
        let x = ConversationId::new_random();
        catalog.register(x, &ds, UserId::default_user(), info(x)).await;
        catalog.remove(&x).await;
        assert!(!catalog.report(x, &ds, UserId::default_user(), info(x)).await);
        assert!(catalog.route(&x).is_none(), "the deleted conversation came back");
        let z = ConversationId::new_random();
        assert!(catalog.report(z, &ds, UserId::default_user(), info(z)).await, "a new one is adopted");
        catalog.register(x, &ds, UserId::default_user(), info(x)).await;
        assert!(catalog.route(&x).is_some());
        assert_eq!(ds.conversation_count(), 2);
    }
}
