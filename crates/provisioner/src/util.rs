//! Small helpers shared by backends: stable short hashes, free ports.

/// FNV-1a 64: a stable (across builds and Rust versions) short hash for ids derived from
/// configuration, so a downstream keeps its id when the config file is reordered.
pub fn stable_hash(s: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// A TCP port on 127.0.0.1 that was free a moment ago. The caller must cope with losing a
/// race for it (the process provisioner retries with another port).
pub fn free_loopback_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(l.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable() {
        // Pinned: ids persisted by one build must be found by the next.
        assert_eq!(stable_hash("http://127.0.0.1:9101"), stable_hash("http://127.0.0.1:9101"));
        assert_eq!(stable_hash(""), 0xcbf29ce484222325);
        assert_eq!(stable_hash("a"), 0xaf63dc4c8601ec8c);
    }
}
