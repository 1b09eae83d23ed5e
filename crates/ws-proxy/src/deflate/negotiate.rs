//! permessage-deflate negotiation (RFC 7692 §7.1): the `Sec-WebSocket-Extensions` header.
//!
//! * Server side (the client leg): [`accept_offers`] takes the first offer nestor can honour
//!   and returns the answer to send. Malformed offers are skipped (declined), never a panic.
//! * Client side (the downstream leg): [`CLIENT_OFFER`] is what nestor offers, and
//!   [`parse_answer`] validates the server's answer (an answer nestor did not ask for fails
//!   the connect).
//!
//! nestor never uses context takeover for what it compresses (each message is compressed on
//! its own, so an idle socket holds no compressor): as a server it always answers
//! `server_no_context_takeover` (RFC 7692 §7.1.1.1 lets a server add it), as a client it
//! offers `client_no_context_takeover`.

use super::Params;

/// What nestor offers a downstream: the browsers' offer plus the promise not to use context
/// takeover for what it sends.
pub const CLIENT_OFFER: &str = "permessage-deflate; client_no_context_takeover; client_max_window_bits";

/// Why a header value is not a valid permessage-deflate offer or answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NegotiateError {
    #[error("malformed Sec-WebSocket-Extensions header: {0}")]
    Syntax(&'static str),
    #[error("extension {0:?} was not offered")]
    NotOffered(String),
    #[error("more than one extension in the answer")]
    Several,
    #[error("parameter {0:?} given twice")]
    Duplicate(String),
    #[error("unknown parameter {0:?}")]
    Unknown(String),
    #[error("bad value for {0}: {1:?} (8..=15 expected)")]
    BadBits(&'static str, String),
    #[error("{0} takes no value")]
    UnexpectedValue(&'static str),
    #[error("{0} was not offered")]
    ParamNotOffered(&'static str),
}

/// One extension of a header: its name and parameters (values unquoted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    pub name: String,
    pub params: Vec<(String, Option<String>)>,
}

fn is_tchar(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
}

/// Parse a `Sec-WebSocket-Extensions` value (RFC 6455 §9.1, quoted strings allowed as
/// values): a comma-separated list of `name *(; param[=value])`.
pub fn parse_extensions(value: &str) -> Result<Vec<Extension>, NegotiateError> {
    let mut out = Vec::new();
    let mut chars = value.chars().peekable();
    let skip_ws = |c: &mut std::iter::Peekable<std::str::Chars>| {
        while c.peek().is_some_and(|c| *c == ' ' || *c == '\t') {
            c.next();
        }
    };
    let token = |c: &mut std::iter::Peekable<std::str::Chars>| {
        let mut t = String::new();
        while let Some(&ch) = c.peek() {
            if !is_tchar(ch) {
                break;
            }
            t.push(ch);
            c.next();
        }
        t
    };
    loop {
        skip_ws(&mut chars);
        // Empty list elements are allowed (`a, , b`).
        if chars.peek() == Some(&',') {
            chars.next();
            continue;
        }
        if chars.peek().is_none() {
            break;
        }
        let name = token(&mut chars);
        if name.is_empty() {
            return Err(NegotiateError::Syntax("expected an extension name"));
        }
        let mut ext = Extension { name: name.to_ascii_lowercase(), params: Vec::new() };
        loop {
            skip_ws(&mut chars);
            match chars.next() {
                None => {
                    out.push(ext);
                    return Ok(out);
                }
                Some(',') => break,
                Some(';') => {}
                Some(_) => return Err(NegotiateError::Syntax("unexpected character")),
            }
            skip_ws(&mut chars);
            let p = token(&mut chars);
            if p.is_empty() {
                return Err(NegotiateError::Syntax("expected a parameter name"));
            }
            skip_ws(&mut chars);
            let mut value = None;
            if chars.peek() == Some(&'=') {
                chars.next();
                skip_ws(&mut chars);
                if chars.peek() == Some(&'"') {
                    chars.next();
                    let mut v = String::new();
                    loop {
                        match chars.next() {
                            None => return Err(NegotiateError::Syntax("unterminated quoted string")),
                            Some('"') => break,
                            Some('\\') => match chars.next() {
                                Some(c) => v.push(c),
                                None => return Err(NegotiateError::Syntax("unterminated quoted string")),
                            },
                            Some(c) => v.push(c),
                        }
                    }
                    value = Some(v);
                } else {
                    let v = token(&mut chars);
                    if v.is_empty() {
                        return Err(NegotiateError::Syntax("expected a parameter value"));
                    }
                    value = Some(v);
                }
            }
            ext.params.push((p.to_ascii_lowercase(), value));
        }
        out.push(ext);
    }
    Ok(out)
}

fn bits(name: &'static str, v: &str) -> Result<u8, NegotiateError> {
    // RFC 7692 §7.1.2: 1*DIGIT without leading zeros, 8..=15.
    if v.is_empty() || v.len() > 2 || v.starts_with('0') || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(NegotiateError::BadBits(name, v.to_owned()));
    }
    match v.parse::<u8>() {
        Ok(b @ 8..=15) => Ok(b),
        _ => Err(NegotiateError::BadBits(name, v.to_owned())),
    }
}

/// The parameters of one permessage-deflate offer or answer, checked for duplicates and
/// value syntax.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Raw {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    server_max_window_bits: Option<u8>,
    /// `Some(None)`: present without a value (only valid in an offer).
    client_max_window_bits: Option<Option<u8>>,
}

fn raw(ext: &Extension) -> Result<Raw, NegotiateError> {
    let mut r = Raw::default();
    let mut seen: Vec<&str> = Vec::new();
    for (k, v) in &ext.params {
        if seen.contains(&k.as_str()) {
            return Err(NegotiateError::Duplicate(k.clone()));
        }
        seen.push(k);
        match k.as_str() {
            "server_no_context_takeover" => {
                if v.is_some() {
                    return Err(NegotiateError::UnexpectedValue("server_no_context_takeover"));
                }
                r.server_no_context_takeover = true;
            }
            "client_no_context_takeover" => {
                if v.is_some() {
                    return Err(NegotiateError::UnexpectedValue("client_no_context_takeover"));
                }
                r.client_no_context_takeover = true;
            }
            "server_max_window_bits" => match v {
                Some(v) => r.server_max_window_bits = Some(bits("server_max_window_bits", v)?),
                None => return Err(NegotiateError::BadBits("server_max_window_bits", String::new())),
            },
            "client_max_window_bits" => {
                r.client_max_window_bits = Some(match v {
                    Some(v) => Some(bits("client_max_window_bits", v)?),
                    None => None,
                })
            }
            other => return Err(NegotiateError::Unknown(other.to_owned())),
        }
    }
    Ok(r)
}

/// Server side: the first permessage-deflate offer among `values` (every
/// `Sec-WebSocket-Extensions` header of the request) that nestor can honour, as the
/// parameters to run with and the answer header value. `None`: decline (no extension).
///
/// Every valid offer can be honoured: nestor compresses each message on its own, so a
/// `server_max_window_bits` below 15 is kept by compressing only messages no longer than the
/// window (the others go uncompressed, which RFC 7692 allows per message).
pub fn accept_offers<'a>(values: impl IntoIterator<Item = &'a str>) -> Option<(Params, String)> {
    for value in values {
        // A malformed header is declined whole: its list cannot be trusted.
        let Ok(exts) = parse_extensions(value) else { continue };
        for ext in exts.iter().filter(|e| e.name == "permessage-deflate") {
            let Ok(r) = raw(ext) else { continue };
            let mut answer = String::from("permessage-deflate; server_no_context_takeover");
            if r.client_no_context_takeover {
                answer.push_str("; client_no_context_takeover");
            }
            let ours = r.server_max_window_bits.unwrap_or(15);
            if let Some(b) = r.server_max_window_bits {
                answer.push_str(&format!("; server_max_window_bits={b}"));
            }
            // The client's window: what it offered, 15 if it named none (it may then answer
            // nothing and use up to 15).
            let peer = r.client_max_window_bits.flatten().unwrap_or(15);
            if let Some(Some(b)) = r.client_max_window_bits {
                answer.push_str(&format!("; client_max_window_bits={b}"));
            }
            let params = Params { our_max_window_bits: ours, peer_no_context_takeover: r.client_no_context_takeover, peer_max_window_bits: peer };
            return Some((params, answer));
        }
    }
    None
}

/// Client side: the server's answer to [`CLIENT_OFFER`]. `Ok(None)`: no extension (the
/// header is absent or empty). An answer naming something nestor did not offer, or with
/// parameters outside RFC 7692, is an error: the connect must fail.
pub fn parse_answer<'a>(values: impl IntoIterator<Item = &'a str>) -> Result<Option<Params>, NegotiateError> {
    let mut exts = Vec::new();
    for v in values {
        exts.extend(parse_extensions(v)?);
    }
    let ext = match exts.len() {
        0 => return Ok(None),
        1 => &exts[0],
        _ => return Err(NegotiateError::Several),
    };
    if ext.name != "permessage-deflate" {
        return Err(NegotiateError::NotOffered(ext.name.clone()));
    }
    let r = raw(ext)?;
    let ours = match r.client_max_window_bits {
        Some(Some(b)) => b,
        // RFC 7692 §7.1.2.2: an answer's client_max_window_bits must have a value.
        Some(None) => return Err(NegotiateError::BadBits("client_max_window_bits", String::new())),
        None => 15,
    };
    Ok(Some(Params {
        our_max_window_bits: ours,
        peer_no_context_takeover: r.server_no_context_takeover,
        peer_max_window_bits: r.server_max_window_bits.unwrap_or(15),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn browser_offer_is_accepted_without_our_context() {
        let (p, a) = accept_offers(["permessage-deflate; client_max_window_bits"]).unwrap();
        assert_eq!(a, "permessage-deflate; server_no_context_takeover");
        assert_eq!(p, Params { our_max_window_bits: 15, peer_no_context_takeover: false, peer_max_window_bits: 15 });
    }

    #[test]
    fn firefox_and_python_offers() {
        let (p, a) = accept_offers(["permessage-deflate"]).unwrap();
        assert_eq!(a, "permessage-deflate; server_no_context_takeover");
        assert_eq!(p.peer_max_window_bits, 15);
        // websockets' default client offer.
        let (p, a) = accept_offers(["permessage-deflate; client_max_window_bits"]).unwrap();
        assert_eq!(a, "permessage-deflate; server_no_context_takeover");
        assert!(!p.peer_no_context_takeover);
    }

    #[test]
    fn all_parameters() {
        let (p, a) = accept_offers([
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=10; client_max_window_bits=\"12\"",
        ])
        .unwrap();
        assert_eq!(a, "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=10; client_max_window_bits=12");
        assert_eq!(p, Params { our_max_window_bits: 10, peer_no_context_takeover: true, peer_max_window_bits: 12 });
    }

    #[test]
    fn first_honourable_offer_wins() {
        let (p, _) = accept_offers([
            "x-webkit-deflate-frame, permessage-deflate; server_max_window_bits=16, permessage-deflate; server_max_window_bits=9",
            "permessage-deflate",
        ])
        .unwrap();
        assert_eq!(p.our_max_window_bits, 9);
        // A malformed header is skipped, the next one used.
        let (p, _) = accept_offers(["permessage-deflate; a=\"", "permessage-deflate; client_no_context_takeover"]).unwrap();
        assert!(p.peer_no_context_takeover);
    }

    #[test]
    fn malformed_or_unknown_offers_are_declined() {
        for v in [
            "",
            ",",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=08",
            "permessage-deflate; client_max_window_bits=16",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; mystery",
            "permessage-deflate;",
            "permessage-deflate; =1",
            "permessage-deflate x",
            "deflate-frame",
            "permessage-deflate; client_max_window_bits=\"1",
        ] {
            assert_eq!(accept_offers([v]), None, "{v:?}");
        }
    }

    #[test]
    fn answers() {
        assert_eq!(parse_answer([]).unwrap(), None);
        assert_eq!(parse_answer([""]).unwrap(), None);
        // websockets' default server answer.
        let p = parse_answer(["permessage-deflate; server_max_window_bits=12; client_max_window_bits=12"]).unwrap().unwrap();
        assert_eq!(p, Params { our_max_window_bits: 12, peer_no_context_takeover: false, peer_max_window_bits: 12 });
        let p = parse_answer(["permessage-deflate; server_no_context_takeover; client_no_context_takeover"]).unwrap().unwrap();
        assert!(p.peer_no_context_takeover);
        assert_eq!(p.our_max_window_bits, 15);
        assert_eq!(parse_answer(["x-foo"]), Err(NegotiateError::NotOffered("x-foo".into())));
        assert_eq!(parse_answer(["permessage-deflate, permessage-deflate"]), Err(NegotiateError::Several));
        assert!(parse_answer(["permessage-deflate; client_max_window_bits"]).is_err());
        assert!(parse_answer(["permessage-deflate; server_max_window_bits=99"]).is_err());
        assert!(parse_answer(["permessage-deflate; foo"]).is_err());
        assert!(parse_answer(["permessage-deflate; \""]).is_err());
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,80}") {
            let _ = accept_offers([s.as_str()]);
            let _ = parse_answer([s.as_str()]);
        }

        #[test]
        fn never_panics_on_near_misses(parts in proptest::collection::vec(prop_oneof![
            Just("permessage-deflate"), Just(";"), Just(","), Just("="), Just("\""), Just(" "),
            Just("server_max_window_bits"), Just("client_max_window_bits"), Just("15"), Just("8"),
            Just("server_no_context_takeover"), Just("client_no_context_takeover"), Just("\\"),
        ], 0..12)) {
            let s: String = parts.concat();
            if let Some((p, answer)) = accept_offers([s.as_str()]) {
                // What we answer must be an answer we would accept ourselves as a client
                // (modulo which side is which).
                let back = parse_answer([answer.as_str()]).unwrap().unwrap();
                prop_assert_eq!(back.peer_max_window_bits, p.our_max_window_bits);
                prop_assert!(back.peer_no_context_takeover);
            }
        }
    }
}
