//! Query parameters of the catalog routes, validated exactly like the agent-server
//! (FastAPI + pydantic): the last value of a repeated scalar wins, every bad parameter is
//! reported in one 422 list, with pydantic's words.

use nestor_core::error::ValidationItem;
use nestor_core::ConversationId;
use serde_json::json;

/// `ConversationExecutionStatus`.
pub const STATUSES: &[&str] =
    &["idle", "running", "paused", "waiting_for_confirmation", "finished", "error", "stuck", "deleting"];

/// `ConversationSortOrder`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SortOrder {
    CreatedAt,
    UpdatedAt,
    CreatedAtDesc,
    UpdatedAtDesc,
}

impl SortOrder {
    pub const NAMES: &'static [&'static str] = &["CREATED_AT", "UPDATED_AT", "CREATED_AT_DESC", "UPDATED_AT_DESC"];

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "CREATED_AT" => SortOrder::CreatedAt,
            "UPDATED_AT" => SortOrder::UpdatedAt,
            "CREATED_AT_DESC" => SortOrder::CreatedAtDesc,
            "UPDATED_AT_DESC" => SortOrder::UpdatedAtDesc,
            _ => return None,
        })
    }

    pub fn as_str(&self) -> &'static str {
        Self::NAMES[*self as usize]
    }

    pub fn descending(&self) -> bool {
        matches!(self, SortOrder::CreatedAtDesc | SortOrder::UpdatedAtDesc)
    }

    pub fn by_updated(&self) -> bool {
        matches!(self, SortOrder::UpdatedAt | SortOrder::UpdatedAtDesc)
    }
}

/// Decoded query string: pairs in order.
#[derive(Debug, Default, Clone)]
pub struct QueryParams(Vec<(String, String)>);

impl QueryParams {
    pub fn parse(raw: Option<&str>) -> Self {
        Self(
            raw.map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
                .unwrap_or_default(),
        )
    }

    /// The last value of `name` (FastAPI's rule for scalar parameters).
    pub fn last(&self, name: &str) -> Option<&str> {
        self.0.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// Every value of `name`, in order (list parameters).
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0.iter().filter(move |(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn pairs(&self) -> &[(String, String)] {
        &self.0
    }
}

fn loc(name: &str) -> Vec<serde_json::Value> {
    vec![json!("query"), json!(name)]
}

/// pydantic's lax boolean.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s.to_ascii_lowercase().as_str() {
        "1" | "true" | "t" | "yes" | "y" | "on" => Some(true),
        "0" | "false" | "f" | "no" | "n" | "off" => Some(false),
        _ => None,
    }
}

fn bool_param(q: &QueryParams, name: &str, default: bool, errors: &mut Vec<ValidationItem>) -> bool {
    match q.last(name) {
        None => default,
        Some(v) => parse_bool(v).unwrap_or_else(|| {
            errors.push(ValidationItem::bool_parsing(loc(name), v));
            default
        }),
    }
}

fn status_param(q: &QueryParams, errors: &mut Vec<ValidationItem>) -> Option<String> {
    let v = q.last("status")?;
    if STATUSES.contains(&v) {
        Some(v.to_owned())
    } else {
        errors.push(ValidationItem::enum_value(loc("status"), v, STATUSES));
        None
    }
}

/// `GET /api/conversations/search`.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchQuery {
    pub page_id: Option<String>,
    pub limit: usize,
    pub status: Option<String>,
    pub sort_order: SortOrder,
    pub include_skills: bool,
}

impl SearchQuery {
    pub fn parse(q: &QueryParams) -> Result<Self, Vec<ValidationItem>> {
        let mut errors = Vec::new();
        let limit = match q.last("limit") {
            None => 100,
            Some(v) => match v.trim().parse::<i64>() {
                Err(_) => {
                    errors.push(ValidationItem::int_parsing(loc("limit"), v));
                    100
                }
                Ok(n) if n <= 0 => {
                    errors.push(ValidationItem::int_bound(loc("limit"), v, "greater_than", 0));
                    100
                }
                Ok(n) if n > 100 => {
                    errors.push(ValidationItem::int_bound(loc("limit"), v, "less_than_equal", 100));
                    100
                }
                Ok(n) => n as usize,
            },
        };
        let status = status_param(q, &mut errors);
        let sort_order = match q.last("sort_order") {
            None => SortOrder::CreatedAtDesc,
            Some(v) => SortOrder::parse(v).unwrap_or_else(|| {
                errors.push(ValidationItem::enum_value(loc("sort_order"), v, SortOrder::NAMES));
                SortOrder::CreatedAtDesc
            }),
        };
        let include_skills = bool_param(q, "include_skills", false, &mut errors);
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self { page_id: q.last("page_id").map(str::to_owned), limit, status, sort_order, include_skills })
    }
}

/// `GET /api/conversations/count`.
pub fn parse_count(q: &QueryParams) -> Result<Option<String>, Vec<ValidationItem>> {
    let mut errors = Vec::new();
    let s = status_param(q, &mut errors);
    if errors.is_empty() {
        Ok(s)
    } else {
        Err(errors)
    }
}

/// `GET /api/conversations?ids=…` (at most 99 ids).
#[derive(Debug, Clone, PartialEq)]
pub struct BatchQuery {
    pub ids: Vec<ConversationId>,
    pub include_skills: bool,
}

impl BatchQuery {
    pub fn parse(q: &QueryParams) -> Result<Self, Vec<ValidationItem>> {
        let mut errors = Vec::new();
        let raw: Vec<&str> = q.all("ids").collect();
        let mut ids = Vec::new();
        if raw.is_empty() {
            errors.push(ValidationItem::missing(loc("ids"), serde_json::Value::Null));
        } else if raw.len() > 99 {
            errors.push(ValidationItem {
                kind: "too_long".into(),
                loc: loc("ids"),
                msg: format!("List should have at most 99 items after validation, not {}", raw.len()),
                input: json!(raw),
                ctx: Some(json!({"field_type": "List", "max_length": 99, "actual_length": raw.len()})),
            });
        } else {
            for (i, s) in raw.iter().enumerate() {
                match ConversationId::parse(s) {
                    Ok(id) => ids.push(id),
                    Err(e) => errors.push(ValidationItem::uuid_parsing(
                        vec![json!("query"), json!("ids"), json!(i)],
                        s,
                        &e.0,
                    )),
                }
            }
        }
        let include_skills = bool_param(q, "include_skills", false, &mut errors);
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self { ids, include_skills })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> QueryParams {
        QueryParams::parse(Some(s))
    }

    #[test]
    fn defaults() {
        let s = SearchQuery::parse(&q("")).unwrap();
        assert_eq!(s.limit, 100);
        assert_eq!(s.sort_order, SortOrder::CreatedAtDesc);
        assert!(!s.include_skills);
    }

    #[test]
    fn last_value_wins_and_bools_are_lax() {
        let s = SearchQuery::parse(&q("limit=5&limit=7&include_skills=On")).unwrap();
        assert_eq!(s.limit, 7);
        assert!(s.include_skills);
    }

    #[test]
    fn all_errors_reported_in_order() {
        let e = SearchQuery::parse(&q("limit=0&status=x&sort_order=y")).unwrap_err();
        let body = serde_json::to_string(&json!({"detail": e})).unwrap();
        // Byte-for-byte the agent-server 1.58.2 answer.
        assert_eq!(
            body,
            r#"{"detail":[{"type":"greater_than","loc":["query","limit"],"msg":"Input should be greater than 0","input":"0","ctx":{"gt":0}},{"type":"enum","loc":["query","status"],"msg":"Input should be 'idle', 'running', 'paused', 'waiting_for_confirmation', 'finished', 'error', 'stuck' or 'deleting'","input":"x","ctx":{"expected":"'idle', 'running', 'paused', 'waiting_for_confirmation', 'finished', 'error', 'stuck' or 'deleting'"}},{"type":"enum","loc":["query","sort_order"],"msg":"Input should be 'CREATED_AT', 'UPDATED_AT', 'CREATED_AT_DESC' or 'UPDATED_AT_DESC'","input":"y","ctx":{"expected":"'CREATED_AT', 'UPDATED_AT', 'CREATED_AT_DESC' or 'UPDATED_AT_DESC'"}}]}"#
        );
        let e = SearchQuery::parse(&q("limit=101")).unwrap_err();
        assert_eq!(
            serde_json::to_string(&e[0]).unwrap(),
            r#"{"type":"less_than_equal","loc":["query","limit"],"msg":"Input should be less than or equal to 100","input":"101","ctx":{"le":100}}"#
        );
    }

    #[test]
    fn batch_ids() {
        let e = BatchQuery::parse(&q("ids=00000000-0000-0000-0000-000000000001&ids=abc&ids=xyz")).unwrap_err();
        assert_eq!(
            serde_json::to_string(&json!({"detail": e})).unwrap(),
            r#"{"detail":[{"type":"uuid_parsing","loc":["query","ids",1],"msg":"Input should be a valid UUID, invalid length: found 3","input":"abc","ctx":{"error":"invalid length: found 3"}},{"type":"uuid_parsing","loc":["query","ids",2],"msg":"Input should be a valid UUID, invalid character: found `x` at 0","input":"xyz","ctx":{"error":"invalid character: found `x` at 0"}}]}"#
        );
        let e = BatchQuery::parse(&q("")).unwrap_err();
        assert_eq!(
            serde_json::to_string(&e[0]).unwrap(),
            r#"{"type":"missing","loc":["query","ids"],"msg":"Field required","input":null}"#
        );
    }

    #[test]
    fn decodes_percent_and_plus() {
        let p = q("a=x%20y+z&b=%zz&c");
        assert_eq!(p.last("a"), Some("x y z"));
        assert_eq!(p.last("b"), Some("%zz"));
        assert_eq!(p.last("c"), Some(""));
    }
}
