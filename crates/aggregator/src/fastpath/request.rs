//! Reading a client's request head and deciding whether the fast path may answer it.
//!
//! The fast path takes only what it can forward exactly as the full router would (see the
//! module docs of [`super`]); everything else is [`Parsed::HandOff`], answered by the router.
//! The decision is made on the raw head, before anything is sent anywhere, so handing off
//! is always safe: the bytes read so far are given back to the router untouched.

use nestor_core::ConversationId;

/// Longest request head the fast path reads; longer heads go to the router (which answers
/// them, or refuses them, as it always has).
pub const MAX_HEAD: usize = 16 * 1024;

/// Most header lines the fast path parses.
pub const MAX_HEADERS: usize = 64;

/// Largest request body the fast path takes (read whole before forwarding, so a request
/// can be sent again on a fresh connection when a pooled one turns out to be closed).
pub const MAX_BODY: usize = 64 * 1024;

/// The methods the fast path forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Patch,
    Delete,
}

impl Method {
    fn parse(m: &str) -> Option<Self> {
        Some(match m {
            "GET" => Self::Get,
            "HEAD" => Self::Head,
            "POST" => Self::Post,
            "PUT" => Self::Put,
            "PATCH" => Self::Patch,
            "DELETE" => Self::Delete,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Head => "HEAD",
            Self::Post => "POST",
            Self::Put => "PUT",
            Self::Patch => "PATCH",
            Self::Delete => "DELETE",
        }
    }
}

/// A request the fast path forwards.
#[derive(Debug)]
pub struct FastRequest {
    pub method: Method,
    pub conversation: ConversationId,
    /// The request target as received (path and query), sent downstream unchanged.
    pub target: String,
    /// The header lines to send downstream (`name: value\r\n` each): the client's, minus
    /// hop-by-hop headers and its credentials.
    pub headers: Vec<u8>,
    /// The `X-Session-API-Key` the client presented (empty: none).
    pub client_key: Vec<u8>,
    /// `http(s)://host` the client reached nestor at (for the leak guard).
    pub origin: Option<String>,
    /// The browser's `Origin` header (CORS is decided on it, like the router does).
    pub cors_origin: Option<String>,
    /// The path, without the query (CORS rules depend on it).
    pub path_len: usize,
    /// The client wants the connection kept open after this answer.
    pub keep_alive: bool,
    /// Bytes of the head (the body starts right after).
    pub head_len: usize,
    /// Bytes of the body (`Content-Length`; 0 without one).
    pub body_len: usize,
}

/// What the bytes read so far are.
#[derive(Debug)]
pub enum Parsed {
    /// Not a whole head yet: read more.
    Partial,
    /// Not for the fast path: the router answers it (and everything after it on this
    /// connection).
    HandOff,
    Fast(FastRequest),
}

/// Routes under `/api/conversations/{id}/` nestor answers itself or rewrites (see
/// `routes::conversations::per_conversation`): they always go to the router.
fn is_special(method: Method, rest: &str, persistence: bool) -> bool {
    use Method::*;
    matches!(
        (method, rest),
        (Delete, "")
            | (Post, "runtime/credentials")
            | (Delete, "runtime")
            | (Get, "runtime")
            | (Post, "runtime/reprovision")
            | (Post, "fork")
            | (Post, "children")
            | (Post, "secrets")
            | (Get, "vscode/url")
    ) || (persistence && method == Post && (rest == "events" || rest == "run"))
        || rest == "workspace"
        || rest.starts_with("workspace/")
}

/// The conversation id and the rest of a fast-path target, if it is one.
fn conversation_target(path: &str) -> Option<(ConversationId, &str)> {
    let tail = path.strip_prefix("/api/conversations/")?;
    let (seg, rest) = match tail.split_once('/') {
        // `/{id}/` (empty rest after a slash) is another route to the router.
        Some((_, "")) => return None,
        Some((seg, rest)) => (seg, rest),
        None => (tail, ""),
    };
    // Only the canonical dashed form: other spellings (percent-encoded, braced, …) keep
    // the router's exact validation answers.
    if seg.len() != 36 || !seg.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
        return None;
    }
    // Dot segments, empty segments and escapes: let the router see them.
    if rest.contains("//") || rest.split('/').any(|s| s == "." || s == "..") || rest.contains('%') {
        return None;
    }
    ConversationId::parse(seg).ok().map(|id| (id, rest))
}

/// What the fast path must leave to the router, from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    /// Workspace persistence is configured (agent work is checked against quotas).
    pub persistence: bool,
    /// `max_body_bytes`: larger bodies get the router's 413.
    pub max_body: u64,
}

/// Parse the head at the start of `buf` and decide.
pub fn parse(buf: &[u8], rules: Rules) -> Parsed {
    let persistence = rules.persistence;
    let max_body = (MAX_BODY as u64).min(rules.max_body) as usize;
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Parsed::Partial,
        // Too long, too many headers or malformed: the router gives the right error.
        _ => return Parsed::HandOff,
    };
    if req.version != Some(1) {
        return Parsed::HandOff;
    }
    let Some(method) = req.method.and_then(Method::parse) else { return Parsed::HandOff };
    let Some(target) = req.path else { return Parsed::HandOff };
    let (path, query) = target.split_once('?').map_or((target, None), |(p, q)| (p, Some(q)));
    // A key in the query authenticates at the router (and must not reach the downstream).
    if query.is_some_and(|q| q.contains("session_api_key") || q.contains('%')) {
        return Parsed::HandOff;
    }
    let Some((conversation, rest)) = conversation_target(path) else { return Parsed::HandOff };
    if is_special(method, rest, persistence) {
        return Parsed::HandOff;
    }

    let mut out = Vec::with_capacity(buf.len().min(2048));
    let mut client_key: Option<&[u8]> = None;
    let mut host: Option<&str> = None;
    let mut cors_origin: Option<&str> = None;
    let mut proto = "http";
    let mut body_len: Option<usize> = None;
    let mut keep_alive = true;
    for h in req.headers.iter() {
        let name = h.name;
        let value = h.value;
        if name.eq_ignore_ascii_case("x-session-api-key") {
            if client_key.replace(value).is_some() {
                return Parsed::HandOff;
            }
            continue;
        }
        if name.eq_ignore_ascii_case("connection") {
            for token in std::str::from_utf8(value).unwrap_or("?").split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if !token.eq_ignore_ascii_case("keep-alive") && !token.is_empty() {
                    // Names more hop-by-hop headers (or an upgrade): the router's job.
                    return Parsed::HandOff;
                }
            }
            continue;
        }
        if ["keep-alive", "proxy-connection", "te", "trailer", "proxy-authenticate", "proxy-authorization", "authorization"]
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n))
        {
            // Hop-by-hop (RFC 9110 §7.6.1), or the client's bearer credentials.
            continue;
        }
        // Bodies of unknown length, upgrades, 100-continue, the workspace cookie: the router
        // handles each of these.
        if ["transfer-encoding", "upgrade", "expect"].iter().any(|n| name.eq_ignore_ascii_case(n)) {
            return Parsed::HandOff;
        }
        if name.eq_ignore_ascii_case("cookie") && memchr::memmem::find(value, super::WORKSPACE_COOKIE.as_bytes()).is_some() {
            return Parsed::HandOff;
        }
        if name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(value).ok().and_then(|v| v.trim().parse::<usize>().ok());
            match (n, body_len) {
                (Some(n), None) if n <= max_body => body_len = Some(n),
                _ => return Parsed::HandOff,
            }
        } else if name.eq_ignore_ascii_case("host") {
            match std::str::from_utf8(value) {
                Ok(v) if host.is_none() => host = Some(v),
                _ => return Parsed::HandOff,
            }
        } else if name.eq_ignore_ascii_case("origin") {
            match std::str::from_utf8(value) {
                Ok(v) if cors_origin.is_none() => cors_origin = Some(v),
                _ => return Parsed::HandOff,
            }
        } else if name.eq_ignore_ascii_case("x-forwarded-proto") {
            proto = match value {
                b"https" => "https",
                _ => "http",
            };
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    // HTTP/1.1 requires Host (the router answers the error).
    let Some(host) = host else { return Parsed::HandOff };
    Parsed::Fast(FastRequest {
        method,
        conversation,
        target: target.to_owned(),
        headers: out,
        client_key: client_key.unwrap_or_default().to_vec(),
        origin: Some([proto, "://", host].concat()),
        cors_origin: cors_origin.map(str::to_owned),
        path_len: path.len(),
        keep_alive,
        head_len,
        body_len: body_len.unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0a8b12be-0792-4413-8dd9-066610cb0473";

    const RULES: Rules = Rules { persistence: false, max_body: 100 << 20 };

    fn fast(raw: &str) -> FastRequest {
        match parse(raw.as_bytes(), RULES) {
            Parsed::Fast(r) => r,
            other => panic!("expected the fast path for {raw:?}, got {other:?}"),
        }
    }

    fn hands_off(raw: &str) -> bool {
        matches!(parse(raw.as_bytes(), RULES), Parsed::HandOff)
    }

    #[test]
    fn a_plain_get_is_fast_and_loses_its_credentials() {
        let raw = format!(
            "GET /api/conversations/{ID}/events/search?limit=5 HTTP/1.1\r\nHost: n.example:8000\r\nX-Session-API-Key: ck\r\nAuthorization: Bearer ck\r\nConnection: keep-alive\r\nAccept: */*\r\n\r\n"
        );
        let r = fast(&raw);
        assert_eq!(r.method, Method::Get);
        assert_eq!(r.target, format!("/api/conversations/{ID}/events/search?limit=5"));
        assert_eq!(r.client_key, b"ck");
        assert_eq!(r.origin.as_deref(), Some("http://n.example:8000"));
        assert!(r.keep_alive);
        assert_eq!(r.head_len, raw.len());
        let headers = String::from_utf8(r.headers).unwrap();
        assert_eq!(headers, "Host: n.example:8000\r\nAccept: */*\r\n");
    }

    #[test]
    fn a_body_with_a_length_is_fast() {
        let raw = format!("POST /api/conversations/{ID}/events HTTP/1.1\r\nhost: h\r\ncontent-length: 12\r\nx-forwarded-proto: https\r\nconnection: close\r\n\r\n");
        let r = fast(&raw);
        assert_eq!(r.body_len, 12);
        assert!(!r.keep_alive);
        assert_eq!(r.origin.as_deref(), Some("https://h"));
    }

    #[test]
    fn incomplete_heads_ask_for_more() {
        assert!(matches!(parse(format!("GET /api/conversations/{ID} HTTP/1.1\r\nHost: h\r\n").as_bytes(), RULES), Parsed::Partial));
        let huge = format!("GET /api/conversations/{ID} HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD));
        assert!(hands_off(&huge));
    }

    #[test]
    fn everything_the_router_must_see_is_handed_off() {
        let h = "Host: h\r\nX-Session-API-Key: k\r\n";
        for raw in [
            "GET /api/conversations/search HTTP/1.1\r\nHost: h\r\n\r\n".to_owned(),
            format!("GET /api/conversations/{ID} HTTP/1.0\r\n{h}\r\n"),
            format!("OPTIONS /api/conversations/{ID} HTTP/1.1\r\n{h}\r\n"),
            format!("DELETE /api/conversations/{ID} HTTP/1.1\r\n{h}\r\n"),
            format!("GET /api/conversations/{ID}/runtime HTTP/1.1\r\n{h}\r\n"),
            format!("POST /api/conversations/{ID}/fork HTTP/1.1\r\n{h}\r\n"),
            format!("POST /api/conversations/{ID}/secrets HTTP/1.1\r\n{h}\r\n"),
            format!("GET /api/conversations/{ID}/vscode/url HTTP/1.1\r\n{h}\r\n"),
            format!("GET /api/conversations/{ID}/workspace/a.txt HTTP/1.1\r\n{h}\r\n"),
            format!("GET /api/conversations/{ID}/ HTTP/1.1\r\n{h}\r\n"),
            format!("GET /api/conversations/{ID}/events/../x HTTP/1.1\r\n{h}\r\n"),
            format!("GET /api/conversations/{} HTTP/1.1\r\n{h}\r\n", ID.to_uppercase().replace('-', "")),
            format!("GET /api/conversations/{ID}?session_api_key=k HTTP/1.1\r\nHost: h\r\n\r\n"),
            format!("GET /api/conversations/{ID} HTTP/1.1\r\n{h}Origin: http://x\r\nOrigin: http://y\r\n\r\n"),
            format!("GET /api/conversations/{ID} HTTP/1.1\r\n{h}Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n"),
            format!("POST /api/conversations/{ID}/events HTTP/1.1\r\n{h}Transfer-Encoding: chunked\r\n\r\n"),
            format!("POST /api/conversations/{ID}/events HTTP/1.1\r\n{h}Expect: 100-continue\r\nContent-Length: 3\r\n\r\n"),
            format!("POST /api/conversations/{ID}/events HTTP/1.1\r\n{h}Content-Length: {}\r\n\r\n", MAX_BODY + 1),
            format!("POST /api/conversations/{ID}/events HTTP/1.1\r\n{h}Content-Length: 3\r\nContent-Length: 3\r\n\r\n"),
            format!("GET /api/conversations/{ID} HTTP/1.1\r\n{h}Cookie: a=b; oh_workspace_session_key=k\r\n\r\n"),
            format!("GET /api/conversations/{ID} HTTP/1.1\r\nX-Session-API-Key: k\r\n\r\n"),
            format!("GET /api/conversations/{ID} HTTP/1.1\r\n{h}X-Session-API-Key: k2\r\n\r\n"),
            "garbage\r\n\r\n".to_owned(),
        ] {
            assert!(hands_off(&raw), "{raw:?} must go to the router");
        }
        let post_events = format!("POST /api/conversations/{ID}/events HTTP/1.1\r\n{h}Content-Length: 2\r\n\r\n");
        assert!(matches!(parse(post_events.as_bytes(), Rules { persistence: true, ..RULES }), Parsed::HandOff), "quota checks with persistence");
        assert!(matches!(parse(post_events.as_bytes(), RULES), Parsed::Fast(_)));
        assert!(matches!(parse(post_events.as_bytes(), Rules { max_body: 1, ..RULES }), Parsed::HandOff), "the router's 413");
    }

    proptest::proptest! {
        /// Any bytes: a decision, never a panic.
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let _ = parse(&bytes, RULES);
        }

        /// A fast request's forwarded headers never carry the client's credentials or a
        /// hop-by-hop header.
        #[test]
        fn forwarded_headers_are_clean(names in proptest::collection::vec("(X-Session-API-Key|Authorization|Keep-Alive|TE|Trailer|Accept|X-A|Proxy-Authorization)", 0..6)) {
            let mut raw = format!("GET /api/conversations/{ID}/events HTTP/1.1\r\nHost: h\r\n");
            let mut seen_key = false;
            for n in &names {
                if n == "X-Session-API-Key" {
                    if seen_key { continue; }
                    seen_key = true;
                }
                raw.push_str(&format!("{n}: v\r\n"));
            }
            raw.push_str("\r\n");
            if let Parsed::Fast(r) = parse(raw.as_bytes(), RULES) {
                let fwd = String::from_utf8(r.headers).unwrap().to_ascii_lowercase();
                for bad in ["x-session-api-key", "authorization", "keep-alive", "te:", "trailer"] {
                    proptest::prop_assert!(!fwd.contains(bad), "{bad} forwarded in {fwd:?}");
                }
            }
        }
    }
}
