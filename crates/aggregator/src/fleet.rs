//! What nestor says about "the server": `/server_info` for a fleet of downstreams.
//!
//! Clients gate features on `/server_info`: the web frontend refuses a `version` below
//! 1.28.0, the SDK and frontends check `capabilities`. nestor therefore reports the
//! downstreams' agent-server version and only the capabilities and tools *every* known
//! downstream has (a feature one downstream lacks is not offered), plus its own version in
//! `nestor_version`. What it learned is kept in `state_dir`, so a restarted nestor whose
//! downstreams are all stopped still answers truthfully; before it has seen any downstream
//! it answers with the agent-server 1.58.2 defaults it was built against.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use nestor_core::{Downstream, DownstreamClient, DownstreamId};
use serde_json::{Map, Value};

const BUILT_IN: &str = include_str!("../assets/server_info-1.58.2.json");

pub struct Fleet {
    path: PathBuf,
    infos: RwLock<HashMap<DownstreamId, Arc<Value>>>,
}

impl Fleet {
    pub fn open(path: PathBuf) -> Self {
        let infos = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<HashMap<DownstreamId, Value>>(&b).ok())
            .map(|m| m.into_iter().map(|(k, v)| (k, Arc::new(v))).collect())
            .unwrap_or_default();
        Self { path, infos: RwLock::new(infos) }
    }

    /// Fetch and remember `ds`'s `/server_info` (best effort, bounded).
    pub async fn learn(&self, client: &DownstreamClient, ds: &Downstream) {
        let Some(ep) = ds.endpoint() else { return };
        match client.get_json::<Value>(&ep, "/server_info", Duration::from_secs(5)).await {
            Ok(info) => {
                let snapshot = {
                    let mut m = self.infos.write().unwrap();
                    m.insert(ds.id().clone(), Arc::new(info));
                    m.iter().map(|(k, v)| (k.clone(), (**v).clone())).collect::<HashMap<_, _>>()
                };
                if let Ok(bytes) = serde_json::to_vec(&snapshot) {
                    if let Err(e) = nestor_core::fs::write_atomic(&self.path, &bytes) {
                        tracing::warn!("cannot save {}: {e}", self.path.display());
                    }
                }
            }
            Err(e) => tracing::debug!(downstream = %ds.id(), "could not read /server_info: {e}"),
        }
    }

    /// Forget a downstream that is gone for good.
    pub fn forget(&self, id: &DownstreamId) {
        self.infos.write().unwrap().remove(id);
    }

    pub fn knows(&self, id: &DownstreamId) -> bool {
        self.infos.read().unwrap().contains_key(id)
    }

    /// The `/server_info` answer.
    pub fn server_info(&self, uptime: f64) -> Value {
        let infos: Vec<Arc<Value>> = self.infos.read().unwrap().values().cloned().collect();
        let base: Value = infos
            .first()
            .map(|v| (**v).clone())
            .unwrap_or_else(|| serde_json::from_str(BUILT_IN).expect("built-in server_info is JSON"));
        let mut out: Map<String, Value> = base.as_object().cloned().unwrap_or_default();
        if infos.len() > 1 {
            for key in ["capabilities", "usable_tools"] {
                let mut common: Vec<Value> = out.get(key).and_then(Value::as_array).cloned().unwrap_or_default();
                for other in &infos[1..] {
                    let theirs = other.get(key).and_then(Value::as_array).cloned().unwrap_or_default();
                    common.retain(|c| theirs.contains(c));
                }
                out.insert(key.into(), Value::Array(common));
            }
            // The oldest version in the fleet is what every conversation can rely on.
            if let Some(min) = infos.iter().filter_map(|i| i.get("version").and_then(Value::as_str)).min_by(|a, b| version_cmp(a, b)) {
                out.insert("version".into(), Value::String(min.to_owned()));
            }
        }
        out.insert("uptime".into(), Value::from(uptime));
        out.insert("idle_time".into(), Value::from(uptime));
        out.insert("nestor_version".into(), Value::String(env!("CARGO_PKG_VERSION").to_owned()));
        Value::Object(out)
    }
}

/// Compare dotted versions numerically ("1.58.2" < "1.100.0").
fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let parse = |s: &str| s.split('.').map(|p| p.parse::<u64>().unwrap_or(0)).collect::<Vec<_>>();
    parse(a).cmp(&parse(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_defaults_are_a_compatible_server() {
        let f = Fleet::open(PathBuf::from("/nonexistent/x.json"));
        let v = f.server_info(1.0);
        assert_eq!(v["version"], "1.58.2");
        assert!(v["capabilities"].as_array().unwrap().contains(&Value::String("conversation_runtime_routes_v1".into())));
        assert!(v["nestor_version"].is_string());
    }

    #[test]
    fn fleet_offers_only_common_capabilities() {
        let f = Fleet::open(PathBuf::from("/nonexistent/x.json"));
        f.infos.write().unwrap().insert(DownstreamId::new("a"), Arc::new(serde_json::json!({"version":"1.58.2","capabilities":["x","y"],"usable_tools":["t"]})));
        f.infos.write().unwrap().insert(DownstreamId::new("b"), Arc::new(serde_json::json!({"version":"1.57.0","capabilities":["y","z"],"usable_tools":["t"]})));
        let v = f.server_info(0.0);
        assert_eq!(v["capabilities"], serde_json::json!(["y"]));
        assert_eq!(v["version"], "1.57.0");
        assert!(version_cmp("1.58.2", "1.100.0").is_lt());
    }
}
