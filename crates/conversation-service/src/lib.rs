//! nestor's conversation catalog: which downstream hosts each conversation, and one merged,
//! paged conversation list across all of them.
//!
//! In the design's terms this is the *composite* conversation service: a *local* index
//! (in memory, persisted per conversation under `state_dir`) kept current from the *remote*
//! downstreams (their own `/api/conversations/search`), answering search, count and batch
//! reads for every downstream at once.
//!
//! * [`query`]: the catalog routes' query parameters, validated like the agent-server.
//! * [`search`]: the pure merge/sort/page logic and nestor's own page tokens.
//! * [`catalog`]: the index itself, its refresh from downstreams and its persistence.
//! * `writer`: the catalog's single coalescing disk writer (writes never wait in a search).

pub mod catalog;
pub mod query;
pub mod search;
mod store;
mod writer;

pub use catalog::{present, runtime_info, Catalog, CatalogConfig, Entry, Presented};
pub use query::{BatchQuery, QueryParams, SearchQuery, SortOrder};
pub use search::{Page, PageToken, SearchItem};
