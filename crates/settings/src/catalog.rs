//! Static catalogs captured from agent-server 1.58.2 (decision: **embedded**, not forwarded).
//!
//! `/api/llm/providers`, `/api/llm/models[?provider=]` and `/api/llm/models/verified` come from
//! LiteLLM's model table and the SDK's verified list, both fixed by the agent-server release
//! (the image runs with `LITELLM_LOCAL_MODEL_COST_MAP`). Serving them from nestor keeps the
//! settings page working with no downstream running, costs ~250 KB, and changes only when the
//! pinned agent-server version does (re-capture then). The per-provider filter is captured
//! per provider rather than re-implemented (LiteLLM's provider extraction is intricate); an
//! unknown provider answers `{"models": []}`, like the agent-server. Captured without AWS
//! credentials, as a downstream runs: Bedrock models are listed the way such a server lists them.
//!
//! `agent-schema` / `conversation-schema` are the settings form schemas, captured the same way.

use axum::extract::Query;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use std::sync::OnceLock;

pub const PROVIDERS: &str = include_str!("../assets/llm-providers.json");
pub const VERIFIED: &str = include_str!("../assets/llm-models-verified.json");
pub const AGENT_SCHEMA: &str = include_str!("../assets/agent-schema.json");
pub const CONVERSATION_SCHEMA: &str = include_str!("../assets/conversation-schema.json");
const MODELS: &str = include_str!("../assets/llm-models.json");

fn models_table() -> &'static Value {
    static T: OnceLock<Value> = OnceLock::new();
    T.get_or_init(|| serde_json::from_str(MODELS).expect("llm-models.json"))
}

#[derive(serde::Deserialize)]
pub struct ModelsQuery {
    provider: Option<String>,
}

pub async fn models(Query(q): Query<ModelsQuery>) -> Response {
    let t = models_table();
    let models = match q.provider {
        None => t["models"].clone(),
        Some(p) => t["by_provider"].get(&p).cloned().unwrap_or(json!([])),
    };
    axum::Json(json!({ "models": models })).into_response()
}
