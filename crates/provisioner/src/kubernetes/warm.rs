//! Warm pods: the `kubernetes` backend of the `pool` provisioner ([`crate::pool`]).
//!
//! A warm pod is an agent-server pod booted **dormant** (`OH_DEFERRED_INIT=true`) with
//! nothing of any conversation in it, waiting to be claimed by a create. It is built like a
//! conversation's pod and has the same three objects, named `<instance>-warm-<16 hex>`:
//!
//! ```text
//! Secret  session-api-key  a random boot key, never handed out (no /api/* route ever opens)
//!         secret-key       the init key (the dormant server's OH_SECRET_KEY = X-Init-API-Key)
//!         deferred-init    "true" (the pod's OH_DEFERRED_INIT comes from here)
//! PVC     its own /workspace (or an emptyDir)
//! Pod     the agent-server, dormant; OH_WEBHOOKS_* only from the Secret's optional
//!         late.* keys, written by the claim (and bound by POST /api/init at once)
//! ```
//!
//! All three carry the deployment's labels and `nestor.dev/warm=<16 hex>` instead of
//! `nestor.dev/conversation`, so the conversation bookkeeping (lists, watch, sweep) never takes
//! them for a conversation; the Secret's phase annotation is `warm`.
//!
//! ## The claim: atomic across replicas
//!
//! Replicas share the cluster and nothing else, and every replica re-adopts the instance's
//! ready warm pods when it starts ([`WarmBackend::recover_warm`]), so two replicas may try to
//! claim the same pod at once. **The Secret is the claim**, as it is a conversation's record:
//! the claim is one merge patch of the warm Secret with a `resourceVersion` precondition (the
//! version it had as a warm server; nothing else ever writes a Secret, so a stale version
//! means exactly "claimed or removed by someone else"). It relabels the Secret to the
//! conversation, sets owner, phase `provisioning` and `nestor.dev/claimed-at`, replaces both
//! keys by the conversation's and sets `deferred-init` to `"false"`. The API server accepts one
//! such patch; the loser gets 409 and the pool tries its next idle pod (or starts cold).
//! That patch is the only API write on the create path; the pool then posts `POST /api/init`.
//!
//! ## Ownership: the Secret, while the labels catch up
//!
//! The pod's and the PVC's labels are moved to the conversation **in the background** after
//! the claim (both at once, [`RELABEL_TRIES`] tries with backoff, a warning when they all
//! fail), not in the create: two more API writes there doubled nestor's part of a warm create
//! (~20 ms each on the test cluster). Until they land, pod and PVC still say `nestor.dev/warm`
//! and **the Secret is the source of truth**: a warm server whose Secret carries
//! `nestor.dev/conversation` (and `nestor.dev/claimed-at`) is that conversation's, whatever
//! its pod's labels say. Every reader follows that rule:
//!
//! * routing, in any replica: a conversation is loaded from its Secret (`recover` lists the
//!   Secrets; `find` reads the Secret by label), and its objects' name comes from there; the
//!   pod watch then routes a pod still labelled warm by that name (`claimed_names`), so a
//!   second replica or a restarted one serves the conversation before the relabel lands;
//! * the warm pool: `recover_warm` offers a pod only when its Secret still says warm, and
//!   `discard` (max age, death) deletes at the warm `resourceVersion`, so a claimed pod is
//!   never offered, counted idle or recycled; a replica that holds it as idle drops it as soon
//!   as it sees the Secret's claim (`find`/`recover`) or the relabelled pod, and a claim it
//!   tries meanwhile gets 409;
//! * delete: `release` deletes pod, Secret and PVC by the name the Secret gave, never by
//!   label; a relabel still under way then finds nothing (404) or stops;
//! * a replica that died between claim and relabel: the next sweep of any replica (at its
//!   start, then every 5 minutes) relabels the pod and PVC of every claimed Secret.
//!
//! Overlapping the Secret patch with `POST /api/init` would save the init's time too, but is
//! not done: the init rotates the server's keys, so an init posted by a replica whose patch
//! then loses the race binds the server to a conversation that does not exist (the winner's
//! own init is then refused and its create falls back); the patch first keeps a lost race
//! free of side effects.
//!
//! **A claimed conversation keeps its warm server's object names.** Pods cannot be renamed,
//! and the Secret and PVC are the pod's (its env references the Secret, its volume the PVC), so
//! they are adopted by relabelling rather than copied. The conversation is then found by label
//! (`nestor.dev/conversation=<hex>`) where a cold one is found by name (one GET by name first,
//! then one list by label), and its pod, when re-created after an idle stop, is built with
//! those names ([`retarget`]). Since the Secret holds the conversation's keys and
//! `deferred-init=false` from the claim on, a re-created pod or a restarted container boots
//! normally as that conversation's server, like a cold one. The webhook settings a dormant
//! server must not have are referenced by the warm pod from optional Secret keys
//! (`late.OH_WEBHOOKS_…`) that only the claim writes, so even a container restarted inside the
//! claimed pod (whose spec is immutable) boots with them.
//!
//! ## Sizing with replicas
//!
//! Each replica runs its own pool: `min_idle` warm pods are kept *per replica* (a replica
//! claims the pods it started or re-adopted at its start; it does not learn of another's new
//! warm pods until it restarts), and `max_size` counts this replica's warm pods plus every
//! running conversation pod of the deployment (every replica's watch sees them all).
//!
//! ## Failure and restart
//!
//! * A claim that dies between the Secret patch and `mark_active` leaves a conversation in
//!   phase `provisioning`: the sweep removes it after `provisioning_grace_secs`, counted from
//!   `claimed-at` (the Secret itself may be an hour old).
//! * [`WarmBackend::discard`] (age, death, shutdown without `keep`) deletes the Secret first,
//!   with the same `resourceVersion` precondition: if another replica claimed the pod
//!   meanwhile, the delete is refused and nothing of that conversation is touched.
//! * `recover_warm` re-adopts the ready, still-warm pods (any replica's: they are the
//!   deployment's), leaves pods still booting alone (another replica is starting them) unless
//!   they are older than `startup_timeout_secs`, and removes warm Secrets whose pod is gone.
//! * A `kubernetes` provisioner without a pool removes every warm object in its sweep (at
//!   start, then every 5 minutes): a nestor that stops using a pool cleans up after it. (So all replicas of one `instance` must agree
//!   on whether they use a pool.)
//! * [`WarmBackend::keeps_on_shutdown`] is true: pods belong to the deployment, not to a
//!   replica (see the module docs of `kubernetes`), warm ones included; the next replica, or
//!   the others, claim them.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, Pod, SecretKeySelector};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use k8s_openapi::ByteString;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use nestor_core::{Downstream, DownstreamId, DownstreamState, SessionKey, UserId};
use serde_json::{json, Value};

use super::objects::{self, Slot, CONVERSATION, KEY_SECRET, KEY_SESSION, OWNER, PHASE, PHASE_PROVISIONING};
use super::{Inner, KubeError, KubernetesProvisioner, PodView, StorageMode};
use crate::pool::{ClaimKeys, InitTemplate, WarmBackend, WarmServer};
use crate::{ProvisionError, ProvisionRequest};

/// `nestor.dev/warm=<16 hex>`: a warm server's objects (instead of `nestor.dev/conversation`).
pub const WARM: &str = "nestor.dev/warm";
/// The Secret's phase while it is a warm server's.
pub const PHASE_WARM: &str = "warm";
/// When a warm server was claimed (RFC 3339): the start of its conversation's create.
pub const CLAIMED_AT: &str = "nestor.dev/claimed-at";
/// The Secret key the pod's `OH_DEFERRED_INIT` comes from.
pub const KEY_DEFERRED: &str = "deferred-init";

/// One warm pod this replica may claim.
pub(super) struct WarmPod {
    name: String,
    ds: Arc<Downstream>,
    /// The Secret's version as a warm server's: the claim's and the discard's precondition.
    secret_rv: String,
    /// The pod as last seen.
    view: std::sync::Mutex<Option<PodView>>,
}

/// Whether these are a warm server's objects.
pub(super) fn is_warm(m: &ObjectMeta) -> bool {
    m.labels.as_ref().is_some_and(|l| l.contains_key(WARM))
}

/// When a conversation claimed from the pool was claimed (None for a cold one).
pub(super) fn claimed_at(m: &ObjectMeta) -> Option<Timestamp> {
    m.annotations.as_ref()?.get(CLAIMED_AT)?.parse().ok()
}

/// The claim a Secret records: the conversation and owner a warm server now belongs to
/// (None: not a claimed warm server's Secret, or being deleted).
pub(super) fn claim_of(s: &k8s_openapi::api::core::v1::Secret) -> Option<(Slot, UserId)> {
    let m = &s.metadata;
    if is_warm(m) || m.deletion_timestamp.is_some() {
        return None;
    }
    m.annotations.as_ref()?.get(CLAIMED_AT)?;
    let slot = Slot::from_label(m.labels.as_ref()?.get(CONVERSATION)?)?;
    let owner = m.annotations.as_ref()?.get(OWNER).map(|o| UserId::new(o.as_str())).unwrap_or_else(UserId::default_user);
    Some((slot, owner))
}

/// How often a claim's background relabel tries (then the sweep takes over), and its
/// first pause between tries (doubling, at most [`RELABEL_MAX_PAUSE`]).
const RELABEL_TRIES: u32 = 5;
const RELABEL_FIRST_PAUSE: Duration = Duration::from_millis(250);
const RELABEL_MAX_PAUSE: Duration = Duration::from_secs(4);

/// Rename the objects a pod built for one name refers to: the pod itself, its Secret
/// references and its PVC. Used for warm pods and for conversations claimed from them.
pub(super) fn retarget(p: &mut Pod, from: &str, to: &str) {
    if from == to {
        return;
    }
    if p.metadata.name.as_deref() == Some(from) {
        p.metadata.name = Some(to.to_owned());
    }
    let Some(spec) = p.spec.as_mut() else { return };
    for c in spec.containers.iter_mut().chain(spec.init_containers.iter_mut().flatten()) {
        for e in c.env.iter_mut().flatten() {
            if let Some(r) = e.value_from.as_mut().and_then(|f| f.secret_key_ref.as_mut()) {
                if r.name == from {
                    r.name = to.to_owned();
                }
            }
        }
        for e in c.env_from.iter_mut().flatten() {
            if let Some(r) = e.secret_ref.as_mut() {
                if r.name == from {
                    r.name = to.to_owned();
                }
            }
        }
    }
    for v in spec.volumes.iter_mut().flatten() {
        if let Some(c) = v.persistent_volume_claim.as_mut() {
            if c.claim_name == from {
                c.claim_name = to.to_owned();
            }
        }
        if let Some(s) = v.secret.as_mut() {
            if s.secret_name.as_deref() == Some(from) {
                s.secret_name = Some(to.to_owned());
            }
        }
    }
}

fn warm_name(instance: &str, id: &str) -> String {
    format!("{instance}-warm-{id}")
}

fn warm_id_of(ds: &Downstream) -> Option<&str> {
    ds.id().as_str().strip_prefix("kubernetes-warm-")
}

/// A warm server's labels: the deployment's, `nestor.dev/warm` instead of the conversation.
fn warm_meta(m: &mut ObjectMeta, name: &str, id: &str) {
    m.name = Some(name.to_owned());
    let l = m.labels.get_or_insert_with(Default::default);
    l.remove(CONVERSATION);
    l.insert(WARM.to_owned(), id.to_owned());
    if let Some(a) = m.annotations.as_mut() {
        a.remove(OWNER);
    }
}

/// The warm pod: a conversation's pod (same image, hardening, probe, volume), dormant, with
/// its keys and `OH_DEFERRED_INIT` from its own Secret and no late-bound environment.
pub(super) fn warm_pod(s: &super::Settings, ns: &str, name: &str, id: &str) -> Pod {
    let mut p = objects::pod(s, &Slot::Home, ns, &UserId::default_user());
    retarget(&mut p, &Slot::Home.object_name(&s.instance), name);
    warm_meta(&mut p.metadata, name, id);
    if let Some(spec) = p.spec.as_mut() {
        for c in spec.containers.iter_mut() {
            let env = c.env.get_or_insert_with(Vec::new);
            env.retain(|e| !crate::pool::is_late_bound_env(&e.name) && e.name != "OH_DEFERRED_INIT");
            if c.name == objects::CONTAINER {
                // Late-bound settings (webhooks) come from Secret keys the claim adds: absent
                // (optional) while dormant, so a warm server boots without them; present from
                // the claim on, so a container restarted inside the claimed pod has them too.
                for k in s.env.keys().filter(|k| crate::pool::is_late_bound_env(k)) {
                    env.push(EnvVar {
                        name: k.clone(),
                        value: None,
                        value_from: Some(EnvVarSource {
                            secret_key_ref: Some(SecretKeySelector { name: name.into(), key: late_key(k), optional: Some(true) }),
                            ..Default::default()
                        }),
                    });
                }
                env.push(EnvVar {
                    name: "OH_DEFERRED_INIT".into(),
                    value: None,
                    value_from: Some(EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector { name: name.into(), key: KEY_DEFERRED.into(), optional: Some(false) }),
                        ..Default::default()
                    }),
                });
            }
        }
    }
    p
}

/// The Secret key that carries the late-bound variable `var` of a claimed warm server.
fn late_key(var: &str) -> String {
    format!("late.{var}")
}

fn warm_secret(s: &super::Settings, ns: &str, name: &str, id: &str, boot: &SessionKey, init: &SessionKey) -> k8s_openapi::api::core::v1::Secret {
    let mut sec = objects::secret(s, &Slot::Home, ns, &UserId::default_user(), boot, init);
    warm_meta(&mut sec.metadata, name, id);
    sec.metadata.annotations = Some(BTreeMap::from([(PHASE.to_owned(), PHASE_WARM.to_owned())]));
    sec.data.get_or_insert_with(Default::default).insert(KEY_DEFERRED.to_owned(), ByteString(b"true".to_vec()));
    sec
}

/// The Secret data a claim writes: the conversation's keys, the end of dormancy, and the
/// late-bound settings (see [`warm_pod`]).
fn claim_data(s: &super::Settings, keys: &crate::pool::ClaimKeys) -> serde_json::Map<String, Value> {
    let mut data = serde_json::Map::new();
    data.insert(KEY_SESSION.to_owned(), json!(b64(keys.session.expose())));
    data.insert(KEY_SECRET.to_owned(), json!(b64(keys.secret.expose())));
    data.insert(KEY_DEFERRED.to_owned(), json!(b64("false")));
    for (k, v) in s.env.iter().filter(|(k, _)| crate::pool::is_late_bound_env(k)) {
        data.insert(late_key(k), json!(b64(v)));
    }
    data
}

/// The merge patch that moves a claimed warm server's pod or PVC to its conversation.
fn claimed_labels(slot: Slot, owner: &UserId) -> Value {
    json!({
        "metadata": {
            "labels": { CONVERSATION: slot.label(), WARM: null },
            "annotations": { OWNER: owner.as_str() },
        }
    })
}

fn b64(v: &str) -> Value {
    serde_json::to_value(ByteString(v.as_bytes().to_vec())).unwrap_or(Value::Null)
}

fn born_of(m: &ObjectMeta) -> SystemTime {
    m.creation_timestamp
        .as_ref()
        .and_then(|t| u64::try_from(t.0.as_second()).ok())
        .map(|s| UNIX_EPOCH + Duration::from_secs(s))
        .unwrap_or_else(SystemTime::now)
}

fn age_of(m: &ObjectMeta) -> Duration {
    born_of(m).elapsed().unwrap_or_default()
}

impl Inner {
    fn warm_selector(&self) -> String {
        format!("{},{WARM}", objects::selector(&self.s.instance))
    }

    /// A warm pod seen by the list or the watch (`None`: deleted).
    pub(super) fn observe_warm(&self, name: &str, v: Option<PodView>) {
        let Some(w) = self.warm.get(name).map(|w| w.clone()) else { return };
        *w.view.lock().unwrap() = v.clone();
        self.sync_warm(&w);
    }

    /// Warm pods missing from a re-list are gone.
    pub(super) fn relisted_warm(&self, pods: &[Pod]) {
        let present: std::collections::HashSet<&str> =
            pods.iter().filter(|p| is_warm(&p.metadata)).filter_map(|p| p.metadata.name.as_deref()).collect();
        let gone: Vec<String> = self.warm.iter().filter(|w| !present.contains(w.name.as_str())).map(|w| w.name.clone()).collect();
        for name in gone {
            if self.warm.get(&name).is_some_and(|w| w.view.lock().unwrap().is_some()) {
                self.observe_warm(&name, None);
            }
        }
    }

    /// A warm pod this replica knew is some conversation's now (another replica claimed it):
    /// it is no longer offered, counted idle or recycled here (the pool drops a failed one;
    /// `discard` then finds nothing of it to remove).
    pub(super) fn warm_taken(&self, name: &str) {
        if let Some((_, w)) = self.warm.remove(name) {
            tracing::info!(pod = %name, "warm agent-server pod claimed by another replica");
            w.ds.set_endpoint(None);
            w.ds.set_state(DownstreamState::Failed("claimed by another replica".into()));
        }
    }

    /// Finish a claim off the create path: the pod and the PVC join the conversation's labels
    /// (module docs). Bounded: [`RELABEL_TRIES`] tries with backoff, each bounded by the API
    /// timeout; after that the sweep of any replica finishes it.
    pub(super) fn spawn_relabel(self: &Arc<Self>, c: Arc<super::Conv>) {
        if self.relabel_paused.load(Ordering::SeqCst) {
            tracing::info!(pod = %c.name, "relabel of a claimed warm pod skipped (paused for a test)");
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let owner = c.ds.owner().cloned().unwrap_or_else(UserId::default_user);
            let (mut pod_done, mut pvc_done) = (false, me.s.storage != StorageMode::Pvc);
            let mut pause = RELABEL_FIRST_PAUSE;
            for attempt in 1..=RELABEL_TRIES {
                if c.released.load(Ordering::SeqCst) || me.cancel.is_cancelled() {
                    return;
                }
                let pod = async {
                    if pod_done {
                        return Ok(());
                    }
                    me.relabel_pod(&c.name, c.slot, &owner).await
                };
                let pvc = async {
                    if pvc_done {
                        return Ok(());
                    }
                    me.relabel_pvc(&c.name, c.slot, &owner).await
                };
                let (p, v) = tokio::join!(pod, pvc);
                pod_done |= p.is_ok();
                pvc_done |= v.is_ok();
                let err = match (p, v) {
                    (Ok(()), Ok(())) => {
                        tracing::debug!(pod = %c.name, took = ?started.elapsed(), "claimed warm pod relabelled");
                        return;
                    }
                    (Err(e), _) | (_, Err(e)) => e,
                };
                if attempt == RELABEL_TRIES {
                    tracing::warn!(
                        pod = %c.name,
                        conversation = %c.slot.label(),
                        "could not relabel a claimed warm pod after {attempt} tries; its Secret is the record, the sweep retries: {err}"
                    );
                    return;
                }
                tracing::info!(pod = %c.name, retry_in = ?pause, "relabelling a claimed warm pod failed: {err}");
                tokio::select! {
                    _ = me.cancel.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(RELABEL_MAX_PAUSE);
            }
        });
    }

    /// The pod `name` joins `slot`'s labels (404: gone, nothing to relabel).
    pub(super) async fn relabel_pod(&self, name: &str, slot: Slot, owner: &UserId) -> Result<(), KubeError> {
        let api = self.pods.clone();
        let (n, l) = (name.to_owned(), claimed_labels(slot, owner));
        match self.kube.call("patch", "pods", async move { api.patch(&n, &PatchParams::default(), &Patch::Merge(&l)).await }).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The PVC `name` joins `slot`'s labels (404: gone, or no PVC with `storage = "emptydir"`).
    pub(super) async fn relabel_pvc(&self, name: &str, slot: Slot, owner: &UserId) -> Result<(), KubeError> {
        if self.s.storage != StorageMode::Pvc {
            return Ok(());
        }
        let api = self.pvcs.clone();
        let (n, l) = (name.to_owned(), claimed_labels(slot, owner));
        let r = self
            .kube
            .call("patch", "persistentvolumeclaims", async move { api.patch(&n, &PatchParams::default(), &Patch::Merge(&l)).await })
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn sync_warm(&self, w: &WarmPod) {
        let view = w.view.lock().unwrap().clone();
        let (state, ep) = match view {
            // Only after it was seen: deleted.
            None => (DownstreamState::Failed("the warm agent-server pod is gone".into()), None),
            Some(v) if v.deleting => (DownstreamState::Failed("the warm agent-server pod is being deleted".into()), None),
            Some(v) if v.terminal => (
                DownstreamState::Failed(
                    format!("the warm agent-server pod ended{}", v.problem.map(|p| format!(": {p}")).unwrap_or_default()).into(),
                ),
                None,
            ),
            Some(v) => match (v.ready, self.pod_endpoint(&v, None)) {
                (true, Some(ep)) => (DownstreamState::Ready, Some(ep)),
                _ => (DownstreamState::Starting, None),
            },
        };
        w.ds.set_endpoint(ep);
        w.ds.set_state(state);
    }

    /// A conversation's Secret: by its own name, else (claimed from the warm pool) by label.
    pub(super) async fn find_secret(&self, slot: &Slot) -> Result<Option<k8s_openapi::api::core::v1::Secret>, KubeError> {
        let api = self.secrets.clone();
        let n = self.name(slot);
        if let Some(s) = self.kube.call("get", "secrets", async move { api.get_opt(&n).await }).await? {
            return Ok(Some(s));
        }
        let Slot::Conversation(_) = slot else { return Ok(None) };
        let api = self.secrets.clone();
        let lp = ListParams::default().labels(&format!("{},{CONVERSATION}={}", objects::selector(&self.s.instance), slot.label()));
        let list = self.kube.call("list", "secrets", async move { api.list(&lp).await }).await?;
        Ok(list.items.into_iter().find(|s| s.metadata.deletion_timestamp.is_none()))
    }

    /// Delete a warm server's objects: the Secret first, at its warm version (`rv`; None:
    /// unconditionally), so a server another replica claimed meanwhile is left alone.
    /// True when they are gone (or going).
    async fn delete_warm(&self, name: &str, rv: Option<&str>) -> Result<bool, KubeError> {
        let api = self.secrets.clone();
        let n = name.to_owned();
        let dp = DeleteParams {
            preconditions: rv.map(|rv| Preconditions { resource_version: Some(rv.to_owned()), uid: None }),
            ..DeleteParams::background()
        };
        match self.kube.call("delete", "secrets", async move { api.delete(&n, &dp).await }).await {
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) if e.is_conflict() => {
                tracing::info!(pod = %name, "not removing a warm agent-server pod: another replica claimed it");
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
        self.delete_pod(name, true).await?;
        self.delete_state(name).await?;
        Ok(true)
    }
}

#[async_trait]
impl WarmBackend for KubernetesProvisioner {
    async fn start_dormant(&self) -> Result<WarmServer, ProvisionError> {
        let inner = &self.0;
        inner.warm_mode.store(true, Ordering::SeqCst);
        inner.spawn_watch(None);
        let id = format!("{:016x}", rand::random::<u64>());
        let name = warm_name(&inner.s.instance, &id);
        let (boot, init_key) = (SessionKey::random(), SessionKey::random());
        let body = warm_secret(&inner.s, &inner.kube.ns, &name, &id, &boot, &init_key);
        let api = inner.secrets.clone();
        let created = inner.kube.call("create", "secrets", async move { api.create(&PostParams::default(), &body).await }).await?;
        let w = Arc::new(WarmPod {
            name: name.clone(),
            ds: Downstream::new(DownstreamId::new(format!("kubernetes-warm-{id}")), "kubernetes", None, None, None, DownstreamState::Starting),
            secret_rv: created.metadata.resource_version.unwrap_or_default(),
            view: std::sync::Mutex::new(None),
        });
        inner.warm.insert(name.clone(), w.clone());
        let made = async {
            if inner.s.storage == StorageMode::Pvc {
                let mut pvc = objects::pvc(&inner.s, &Slot::Home, &inner.kube.ns, &UserId::default_user());
                warm_meta(&mut pvc.metadata, &name, &id);
                let api = inner.pvcs.clone();
                inner.kube.call("create", "persistentvolumeclaims", async move { api.create(&PostParams::default(), &pvc).await }).await?;
            }
            let pod = warm_pod(&inner.s, &inner.kube.ns, &name, &id);
            let api = inner.pods.clone();
            inner.kube.call("create", "pods", async move { api.create(&PostParams::default(), &pod).await }).await
        }
        .await;
        match made {
            Ok(p) => {
                // Seen now, unless the watch was faster.
                if w.view.lock().unwrap().is_none() {
                    inner.observe_warm(&name, Some(PodView::of(&p)));
                }
                tracing::info!(pod = %name, "warm agent-server pod created");
                Ok(WarmServer { ds: w.ds.clone(), init_key, born: SystemTime::now() })
            }
            Err(e) => {
                inner.warm.remove(&name);
                if let Err(e2) = inner.delete_warm(&name, None).await {
                    tracing::warn!(pod = %name, "could not remove a warm agent-server pod that failed to start: {e2}");
                }
                Err(e.into())
            }
        }
    }

    async fn recover_warm(&self) -> Result<Vec<WarmServer>, ProvisionError> {
        let inner = &self.0;
        inner.warm_mode.store(true, Ordering::SeqCst);
        let api = inner.secrets.clone();
        let lp = ListParams::default().labels(&inner.warm_selector());
        let secrets = inner.kube.call("list", "secrets", async move { api.list(&lp).await }).await?;
        let api = inner.pods.clone();
        let lp = ListParams::default().labels(&inner.warm_selector());
        let pods = inner.kube.call("list", "pods", async move { api.list(&lp).await }).await?;
        let by_name: HashMap<&str, &k8s_openapi::api::core::v1::Secret> =
            secrets.items.iter().filter_map(|s| Some((s.metadata.name.as_deref()?, s))).collect();
        let mut found = Vec::new();
        let mut with_pod = std::collections::HashSet::new();
        for p in &pods.items {
            let Some(name) = p.metadata.name.as_deref() else { continue };
            with_pod.insert(name.to_owned());
            let Some(id) = p.metadata.labels.as_ref().and_then(|l| l.get(WARM)).cloned() else { continue };
            // Its Secret no longer warm: claimed (the Secret is the record; the pod's labels lag).
            let Some(secret) = by_name.get(name) else { continue };
            let Some((_, init_key)) = objects::keys_of(secret) else { continue };
            if p.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let v = PodView::of(p);
            if !v.ready {
                if v.terminal || age_of(&p.metadata) > inner.s.startup_timeout {
                    tracing::info!(pod = %name, "removing a warm agent-server pod that never became ready");
                    let _ = inner.delete_warm(name, secret.metadata.resource_version.as_deref()).await;
                }
                // Else another replica is starting it.
                continue;
            }
            let w = Arc::new(WarmPod {
                name: name.to_owned(),
                ds: Downstream::new(DownstreamId::new(format!("kubernetes-warm-{id}")), "kubernetes", None, None, None, DownstreamState::Starting),
                secret_rv: secret.metadata.resource_version.clone().unwrap_or_default(),
                view: std::sync::Mutex::new(Some(v)),
            });
            inner.sync_warm(&w);
            inner.warm.insert(name.to_owned(), w.clone());
            found.push(WarmServer { ds: w.ds.clone(), init_key, born: born_of(&p.metadata) });
        }
        for s in &secrets.items {
            let Some(name) = s.metadata.name.as_deref() else { continue };
            if !with_pod.contains(name) && age_of(&s.metadata) > inner.s.provisioning_grace {
                tracing::info!(pod = %name, "removing a warm agent-server Secret without its pod");
                let _ = inner.delete_warm(name, s.metadata.resource_version.as_deref()).await;
            }
        }
        inner.spawn_watch(None);
        Ok(found)
    }

    async fn adopt(&self, warm: &WarmServer, req: &ProvisionRequest, keys: &ClaimKeys) -> Result<Arc<Downstream>, ProvisionError> {
        let inner = &self.0;
        let name = warm_id_of(&warm.ds).map(|id| warm_name(&inner.s.instance, id)).unwrap_or_default();
        let Some(w) = inner.warm.get(&name).map(|w| w.clone()) else {
            return Err(ProvisionError::Start("the warm agent-server pod is no longer available".into()));
        };
        if w.ds.state() != DownstreamState::Ready {
            return Err(ProvisionError::Start(format!("the warm agent-server pod {name} is not ready")));
        }
        let slot = Slot::Conversation(req.conversation);
        // The claim: one patch of the Secret at its warm version (module docs).
        let patch = json!({
            "metadata": {
                "resourceVersion": w.secret_rv,
                "labels": { CONVERSATION: slot.label(), WARM: null },
                "annotations": { OWNER: req.owner.as_str(), PHASE: PHASE_PROVISIONING, CLAIMED_AT: Timestamp::now().to_string() },
            },
            "data": claim_data(&inner.s, keys),
        });
        let api = inner.secrets.clone();
        let n = name.clone();
        match inner.kube.call("patch", "secrets", async move { api.patch(&n, &PatchParams::default(), &Patch::Merge(&patch)).await }).await {
            Ok(_) => {}
            Err(e) if e.is_conflict() || e.is_not_found() => {
                inner.warm.remove(&name);
                return Err(ProvisionError::Start(format!("the warm agent-server pod {name} was claimed or removed by another replica")));
            }
            Err(e) => return Err(e.into()),
        }
        inner.warm.remove(&name);
        let view = w.view.lock().unwrap().clone();
        // Routed by name until the pod's labels follow the Secret (`claimed_names`).
        let c = inner.insert_conv(slot, keys.session.clone(), req.owner.clone(), view, name.clone());
        // Pod and PVC join the conversation in the background: the claim is done.
        inner.spawn_relabel(c.clone());
        tracing::info!(conversation = %req.conversation, pod = %name, "warm agent-server pod claimed");
        Ok(c.ds.clone())
    }

    async fn discard(&self, warm: &WarmServer) {
        let inner = &self.0;
        let name = warm_id_of(&warm.ds).map(|id| warm_name(&inner.s.instance, id)).unwrap_or_default();
        // Not in the map: claimed (by this replica or another), never ours to remove.
        let Some((_, w)) = inner.warm.remove(&name) else { return };
        w.ds.set_endpoint(None);
        w.ds.set_state(DownstreamState::Released);
        match inner.delete_warm(&name, Some(&w.secret_rv)).await {
            Ok(true) => tracing::info!(pod = %name, "warm agent-server pod removed"),
            Ok(false) => {}
            Err(e) => tracing::warn!(pod = %name, "could not remove a warm agent-server pod: {e}"),
        }
    }

    fn init_template(&self, _warm: &WarmServer) -> InitTemplate {
        let base = |k: &str| objects::BASE_ENV.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).to_owned());
        InitTemplate {
            conversations_path: base("OH_CONVERSATIONS_PATH"),
            bash_events_dir: base("OH_BASH_EVENTS_DIR"),
            withheld_env: self.0.s.env.iter().filter(|(k, _)| crate::pool::is_late_bound_env(k)).map(|(k, v)| (k.clone(), v.clone())).collect(),
        }
    }

    fn keeps_on_shutdown(&self) -> bool {
        // Pods are the deployment's, not this replica's (see `shutdown`).
        true
    }

    fn startup_timeout(&self) -> Duration {
        self.0.s.startup_timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubernetes::config::KubernetesConfig;

    fn settings() -> super::super::Settings {
        let mut env = BTreeMap::new();
        env.insert("OH_WEBHOOKS_0_BASE_URL".to_owned(), "http://n/nestor/webhooks".to_owned());
        env.insert("LLM_MODEL".to_owned(), "x".to_owned());
        KubernetesConfig { image: Some("img:1".into()), env, ..Default::default() }.validate().unwrap()
    }

    #[test]
    fn warm_pod_is_dormant_and_of_no_conversation() {
        let s = settings();
        let name = warm_name(&s.instance, "0123456789abcdef");
        let p = warm_pod(&s, "ns", &name, "0123456789abcdef");
        assert_eq!(p.metadata.name.as_deref(), Some(name.as_str()));
        let l = p.metadata.labels.as_ref().unwrap();
        assert_eq!(l.get(WARM).map(String::as_str), Some("0123456789abcdef"));
        assert!(!l.contains_key(CONVERSATION));
        assert!(is_warm(&p.metadata));
        assert!(PodView::of(&p).slot.is_none(), "never taken for a conversation's pod");
        let spec = p.spec.as_ref().unwrap();
        let env = spec.containers[0].env.as_ref().unwrap();
        // Webhooks only from the Secret's optional late keys: absent while dormant.
        let hook = env.iter().find(|e| e.name == "OH_WEBHOOKS_0_BASE_URL").expect("a late-bound reference");
        assert!(hook.value.is_none(), "never a literal in a warm pod");
        let r = hook.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
        assert_eq!((r.key.as_str(), r.optional), ("late.OH_WEBHOOKS_0_BASE_URL", Some(true)));
        assert!(!warm_secret(&s, "ns", &name, "0123456789abcdef", &SessionKey::random(), &SessionKey::random()).data.unwrap().contains_key("late.OH_WEBHOOKS_0_BASE_URL"));
        let claimed = claim_data(&s, &crate::pool::ClaimKeys::random());
        assert_eq!(claimed["late.OH_WEBHOOKS_0_BASE_URL"], json!(b64("http://n/nestor/webhooks")), "the claim delivers them");
        assert_eq!(claimed[KEY_DEFERRED], json!(b64("false")));
        assert!(env.iter().any(|e| e.name == "LLM_MODEL"));
        for e in env.iter().filter_map(|e| e.value_from.as_ref()?.secret_key_ref.as_ref()) {
            assert_eq!(e.name, name, "every key from its own Secret");
        }
        let d = env.iter().find(|e| e.name == "OH_DEFERRED_INIT").unwrap();
        assert_eq!(d.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap().key, KEY_DEFERRED);
        assert_eq!(spec.volumes.as_ref().unwrap()[0].persistent_volume_claim.as_ref().unwrap().claim_name, name);
    }

    #[test]
    fn warm_secret_holds_the_init_key_and_the_dormant_switch() {
        let s = settings();
        let (boot, init) = (SessionKey::random(), SessionKey::random());
        let sec = warm_secret(&s, "ns", "n-warm-x", "x", &boot, &init);
        assert_eq!(objects::keys_of(&sec), Some((boot, init)));
        assert_eq!(sec.data.as_ref().unwrap()[KEY_DEFERRED].0, b"true");
        assert_eq!(sec.metadata.annotations.as_ref().unwrap()[PHASE], PHASE_WARM);
        assert!(!sec.metadata.annotations.as_ref().unwrap().contains_key(OWNER));
        assert!(is_warm(&sec.metadata));
    }

    #[test]
    fn a_claimed_conversation_pod_keeps_the_warm_names() {
        let s = settings();
        let conv = nestor_core::ConversationId::new_random();
        let slot = Slot::Conversation(conv);
        let mut p = objects::pod(&s, &slot, "ns", &UserId::default_user());
        retarget(&mut p, &slot.object_name(&s.instance), "nestor-warm-1");
        assert_eq!(p.metadata.name.as_deref(), Some("nestor-warm-1"));
        let json = serde_json::to_string(&p).unwrap();
        assert!(!json.contains(&slot.object_name(&s.instance)), "no reference to the slot's own names is left");
        assert_eq!(PodView::of(&p).slot, Some(slot), "still labelled with its conversation");
    }

    #[test]
    fn the_claim_is_read_from_the_secret() {
        let s = settings();
        let (boot, init) = (SessionKey::random(), SessionKey::random());
        let mut sec = warm_secret(&s, "ns", "n-warm-x", "x", &boot, &init);
        assert!(claim_of(&sec).is_none(), "still warm");
        let conv = nestor_core::ConversationId::new_random();
        let l = sec.metadata.labels.as_mut().unwrap();
        l.remove(WARM);
        l.insert(CONVERSATION.to_owned(), Slot::Conversation(conv).label());
        let a = sec.metadata.annotations.as_mut().unwrap();
        a.insert(OWNER.to_owned(), "alice".to_owned());
        assert!(claim_of(&sec).is_none(), "a conversation's Secret that was never warm is no claim");
        sec.metadata.annotations.as_mut().unwrap().insert(CLAIMED_AT.to_owned(), Timestamp::now().to_string());
        assert_eq!(claim_of(&sec), Some((Slot::Conversation(conv), UserId::new("alice"))));
        sec.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()));
        assert!(claim_of(&sec).is_none(), "being deleted");
    }

    #[test]
    fn claimed_labels_move_pod_and_pvc_to_the_conversation() {
        let conv = nestor_core::ConversationId::new_random();
        let v = claimed_labels(Slot::Conversation(conv), &UserId::new("bob"));
        assert_eq!(v["metadata"]["labels"][CONVERSATION], Slot::Conversation(conv).label());
        assert!(v["metadata"]["labels"][WARM].is_null(), "the warm label is removed");
        assert_eq!(v["metadata"]["annotations"][OWNER], "bob");
    }

    #[test]
    fn claimed_at_reads_back() {
        let mut m = ObjectMeta::default();
        assert!(claimed_at(&m).is_none());
        let t = Timestamp::now();
        m.annotations = Some(BTreeMap::from([(CLAIMED_AT.to_owned(), t.to_string())]));
        assert_eq!(claimed_at(&m), Some(t));
    }
}
