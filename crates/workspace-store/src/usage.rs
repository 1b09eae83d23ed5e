//! Per-user usage: what all of a user's conversations store, for `[workspace_storage.user_quota]`.
//!
//! Each user's usage is a ledger of `(conversation, area) → totals`, filled once from the
//! bucket (one delimited LIST of `{prefix}/{user}/`, then each conversation's two manifests)
//! the first time it is needed, and kept current by every pull, push and purge of this nestor.
//! A push that would grow the user's total beyond a limit is refused before anything is
//! uploaded, like the per-conversation quota. While a push runs, its conversation counts with
//! the larger of its stored and its new totals (a reservation), so concurrent pushes of one
//! user's conversations cannot together slip past the limit.
//!
//! The ledger is this nestor's view: two nestors writing one user's conversations under the
//! same prefix each enforce the limit against what they last saw.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::{StreamExt, TryStreamExt};
use nestor_core::{ConversationId, UserId};

use crate::error::{QuotaKind, StoreError};
use crate::keys::{validate_segment, Area};
use crate::manifest::{Manifest, Totals};
use crate::{ConversationStorage, Inner};

type Slot = (ConversationId, Area);

#[derive(Default)]
pub(crate) struct Ledger {
    /// Filled from the bucket once.
    loaded: tokio::sync::OnceCell<()>,
    state: Mutex<LedgerState>,
}

#[derive(Default)]
struct LedgerState {
    committed: HashMap<Slot, Totals>,
    reserved: HashMap<Slot, Totals>,
}

impl LedgerState {
    fn effective(&self, slot: &Slot) -> Totals {
        let c = self.committed.get(slot).copied().unwrap_or_default();
        match self.reserved.get(slot) {
            Some(r) => Totals { files: c.files.max(r.files), bytes: c.bytes.max(r.bytes) },
            None => c,
        }
    }

    /// Everything but `except`.
    fn others(&self, except: &Slot) -> Totals {
        let slots: HashSet<&Slot> = self.committed.keys().chain(self.reserved.keys()).collect();
        slots.into_iter().filter(|s| *s != except).fold(Totals::default(), |acc, s| acc + self.effective(s))
    }

    fn committed_total(&self) -> Totals {
        self.committed.values().fold(Totals::default(), |acc, t| acc + *t)
    }
}

/// Holds a push's reservation in its user's ledger; dropped when the push ends.
pub(crate) struct Reservation {
    ledger: Arc<Ledger>,
    slot: Slot,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.ledger.state.lock().unwrap().reserved.remove(&self.slot);
    }
}

impl Inner {
    pub(crate) fn ledger(&self, user: &UserId) -> Arc<Ledger> {
        self.users.lock().unwrap().entry(user.clone()).or_default().clone()
    }

    /// Fills `user`'s ledger from the bucket (once; a failed attempt is retried next time).
    async fn load_ledger(&self, user: &UserId, ledger: &Ledger) -> Result<(), StoreError> {
        ledger
            .loaded
            .get_or_try_init(|| async {
                validate_segment("user id", user.as_str()).map_err(StoreError::InvalidId)?;
                let base = if self.cfg.prefix.is_empty() {
                    user.as_str().to_owned()
                } else {
                    format!("{}/{}", self.cfg.prefix, user.as_str())
                };
                let prefix = object_store::path::Path::parse(&base).expect("validated segments");
                let listed = self
                    .io
                    .call(crate::io::Op::List, "list", &prefix, self.io.store.list_with_delimiter(Some(&prefix)))
                    .await?;
                let convs: Vec<ConversationId> = listed
                    .common_prefixes
                    .iter()
                    .filter_map(|p| p.filename())
                    .filter_map(|name| ConversationId::parse(name).ok())
                    .collect();
                let fetched: Vec<(Slot, Totals)> = futures::stream::iter(
                    convs.into_iter().flat_map(|c| Area::ALL.into_iter().map(move |a| (c, a))),
                )
                .map(|(conv, area)| {
                    let key = object_store::path::Path::parse(format!(
                        "{base}/{}/{}/manifest.json",
                        conv.hex(),
                        area.as_str()
                    ))
                    .expect("validated key");
                    async move {
                        let t = match self.io.get_small(&key, crate::MAX_MANIFEST_BYTES).await? {
                            Some((bytes, _)) => match serde_json::from_slice::<Manifest>(&bytes) {
                                Ok(m) => m.totals(),
                                // Unreadable: counts as empty here; a pull or push of it says why.
                                Err(_) => Totals::default(),
                            },
                            None => Totals::default(),
                        };
                        Ok::<_, StoreError>(((conv, area), t))
                    }
                })
                .buffer_unordered(self.cfg.concurrency)
                .try_collect()
                .await?;
                let mut st = ledger.state.lock().unwrap();
                for (slot, t) in fetched {
                    // What this nestor pushed or pulled meanwhile is newer.
                    st.committed.entry(slot).or_insert(t);
                }
                Ok(())
            })
            .await
            .map(|_| ())
    }

    /// What `user`'s conversations store, both areas, as this nestor knows it.
    pub(crate) async fn user_usage(&self, user: &UserId) -> Result<Totals, StoreError> {
        let ledger = self.ledger(user);
        self.load_ledger(user, &ledger).await?;
        let t = ledger.state.lock().unwrap().committed_total();
        Ok(t)
    }
}

impl ConversationStorage {
    /// The per-user quota check of a push of `area` from `before` to `after`; on success the
    /// new totals are reserved in `slot` (replacing an earlier reservation of this push).
    pub(crate) async fn check_user_quota(
        &self,
        area: Area,
        before: Totals,
        after: Totals,
        slot: &mut Option<Reservation>,
    ) -> Result<(), StoreError> {
        let q = self.inner.cfg.user_quota;
        if q.max_bytes.is_none() && q.max_files.is_none() {
            return Ok(());
        }
        let ledger = self.inner.ledger(&self.user);
        self.inner.load_ledger(&self.user, &ledger).await?;
        let key = (self.conversation, area);
        let mut st = ledger.state.lock().unwrap();
        let others = st.others(&key);
        let (now, would) = (others + before, others + after);
        let over = |kind, limit: u64, would_be: u64| StoreError::UserQuotaExceeded {
            user: self.user.as_str().to_owned(),
            kind,
            limit,
            would_be,
        };
        if let Some(limit) = q.max_bytes {
            if would.bytes > limit && would.bytes > now.bytes {
                return Err(over(QuotaKind::Bytes, limit, would.bytes));
            }
        }
        if let Some(limit) = q.max_files {
            if would.files > limit && would.files > now.files {
                return Err(over(QuotaKind::Files, limit, would.files));
            }
        }
        st.reserved.insert(key, after);
        drop(st);
        if slot.is_none() {
            *slot = Some(Reservation { ledger, slot: key });
        }
        Ok(())
    }

    /// Records what `area` stores now in the user's ledger.
    pub(crate) fn ledger_commit(&self, area: Area, t: Totals) {
        let ledger = self.inner.ledger(&self.user);
        ledger.state.lock().unwrap().committed.insert((self.conversation, area), t);
    }

    /// Forgets the conversation in the user's ledger (purged).
    pub(crate) fn ledger_forget(&self) {
        let ledger = self.inner.ledger(&self.user);
        let mut st = ledger.state.lock().unwrap();
        for area in Area::ALL {
            st.committed.remove(&(self.conversation, area));
        }
    }
}
