//! What `/api/conversations/{id}/runtime` can show about a conversation's persistence.

use serde::Serialize;
use time::OffsetDateTime;

use crate::keys::Area;

/// Persistence status of one conversation (both areas). Serializes to JSON with RFC 3339
/// times, ready to be embedded in a runtime response.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SyncStatus {
    pub workspace: AreaStatus,
    pub state: AreaStatus,
}

impl SyncStatus {
    pub fn area(&self, area: Area) -> &AreaStatus {
        match area {
            Area::Workspace => &self.workspace,
            Area::State => &self.state,
        }
    }

    pub(crate) fn area_mut(&mut self, area: Area) -> &mut AreaStatus {
        match area {
            Area::Workspace => &mut self.workspace,
            Area::State => &mut self.state,
        }
    }

    /// True when the last push of every area that was pushed succeeded.
    pub fn healthy(&self) -> bool {
        self.workspace.consecutive_failures == 0 && self.state.consecutive_failures == 0
    }

    /// The last push of some area was refused by a quota.
    pub fn over_quota(&self) -> bool {
        self.workspace.over_quota || self.state.over_quota
    }
}

/// Persistence status of one tree.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AreaStatus {
    /// When a push last succeeded (including "nothing to push").
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_success_at: Option<OffsetDateTime>,
    /// When a push was last started.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_attempt_at: Option<OffsetDateTime>,
    /// The last push error (kept after a later success: compare `last_error_at` with
    /// `last_success_at`, or look at `consecutive_failures`).
    pub last_error: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_error_at: Option<OffsetDateTime>,
    /// Failed push attempts since the last success (0: healthy).
    pub consecutive_failures: u32,
    /// The last push was refused by a quota (the conversation's or the user's); cleared by the
    /// next successful push.
    pub over_quota: bool,
    /// Bytes of new or changed files not yet in the stored copy, as of the last push attempt.
    pub pending_bytes: u64,
    /// Entries added, changed or removed locally and not yet stored, as of the last attempt.
    pub pending_entries: u64,
    /// The stored copy.
    pub generation: u64,
    pub stored_bytes: u64,
    pub stored_files: u64,
    /// A push is running now.
    pub pushing: bool,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_pull_at: Option<OffsetDateTime>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_for_the_runtime_endpoint() {
        let mut s = SyncStatus::default();
        s.workspace.last_success_at = Some(OffsetDateTime::UNIX_EPOCH);
        s.workspace.last_error = Some("object storage put x: connection refused".into());
        s.workspace.consecutive_failures = 2;
        s.workspace.pending_bytes = 42;
        let j = serde_json::to_value(&s).unwrap();
        assert_eq!(j["workspace"]["last_success_at"], "1970-01-01T00:00:00Z");
        assert_eq!(j["workspace"]["pending_bytes"], 42);
        assert_eq!(j["state"]["last_error"], serde_json::Value::Null);
        assert!(!s.healthy());
    }
}
