//! Encryption at rest: Fernet tokens, byte-compatible with the agent-server's `Cipher`.
//!
//! **Why Fernet** (AES-128-CBC + HMAC-SHA256, `cryptography`'s format) rather than an AEAD
//! such as AES-256-GCM: the agent-server's clients already handle these tokens. A frontend
//! reads settings with `X-Expose-Secrets: encrypted`, keeps the `gAAAAA…` values and sends
//! them back (profile saves, `secrets_encrypted: true` creates); the server recognises them by
//! that prefix and decrypts. Using the same format and the same key derivation
//! (`Fernet(b64encode(sha256(key)))`) keeps that round trip working through nestor, lets an
//! operator give nestor the `OH_SECRET_KEY` of an existing agent-server and read its files,
//! and is built only from RustCrypto's audited primitives (`aes`, `cbc`, `hmac`, `sha2`).
//! Fernet is authenticated encryption (encrypt-then-MAC, constant-time tag check), which is
//! what "encrypted at rest" needs here.
//!
//! **Rotation**: [`Cipher`] carries previous keys like `MultiFernet`: it encrypts with the
//! current key and decrypts with the current key first, then each previous key.
//! [`Cipher::rotate`] re-encrypts a token under the current key; stores rewrite stale tokens at
//! startup ([`crate::SettingsService::open`]).

use aes::cipher::{block_padding::Pkcs7, BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Every Fernet token starts with this (version byte 0x80 + high timestamp bytes).
pub const FERNET_TOKEN_PREFIX: &str = "gAAAAA";

type HmacSha256 = Hmac<Sha256>;
type Aes128CbcEnc = cbc::Encryptor<aes::Aes128>;
type Aes128CbcDec = cbc::Decryptor<aes::Aes128>;

#[derive(Clone)]
struct FernetKey {
    signing: [u8; 16],
    encryption: [u8; 16],
}

impl FernetKey {
    /// The agent-server's derivation: `Fernet(b64encode(sha256(secret)))`.
    fn derive(secret: &str) -> Self {
        let digest = Sha256::digest(secret.as_bytes());
        // Round-trip through base64 exactly like Python does, to document the equivalence.
        let b64 = STANDARD.encode(digest);
        let raw = STANDARD.decode(b64).expect("own encoding");
        let mut signing = [0u8; 16];
        let mut encryption = [0u8; 16];
        signing.copy_from_slice(&raw[..16]);
        encryption.copy_from_slice(&raw[16..32]);
        Self { signing, encryption }
    }

    fn encrypt(&self, plaintext: &[u8]) -> String {
        let mut iv = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut iv);
        let ts = time::OffsetDateTime::now_utc().unix_timestamp().max(0) as u64;
        self.encrypt_with(plaintext, iv, ts)
    }

    fn encrypt_with(&self, plaintext: &[u8], iv: [u8; 16], ts: u64) -> String {
        let ct = Aes128CbcEnc::new(&self.encryption.into(), &iv.into()).encrypt_padded_vec_mut::<Pkcs7>(plaintext);
        let mut token = Vec::with_capacity(1 + 8 + 16 + ct.len() + 32);
        token.push(0x80);
        token.extend_from_slice(&ts.to_be_bytes());
        token.extend_from_slice(&iv);
        token.extend_from_slice(&ct);
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.signing).expect("any key length");
        mac.update(&token);
        token.extend_from_slice(&mac.finalize().into_bytes());
        URL_SAFE.encode(token)
    }

    fn decrypt(&self, token: &str) -> Option<Vec<u8>> {
        let data = decode_token(token)?;
        if data.len() < 1 + 8 + 16 + 16 + 32 || data[0] != 0x80 {
            return None;
        }
        let (body, tag) = data.split_at(data.len() - 32);
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.signing).expect("any key length");
        mac.update(body);
        mac.verify_slice(tag).ok()?;
        let iv: [u8; 16] = body[9..25].try_into().ok()?;
        let ct = &body[25..];
        if ct.len() % 16 != 0 {
            return None;
        }
        Aes128CbcDec::new(&self.encryption.into(), &iv.into()).decrypt_padded_vec_mut::<Pkcs7>(ct).ok()
    }
}

fn decode_token(token: &str) -> Option<Vec<u8>> {
    // Python's urlsafe_b64decode tolerates missing padding only when the length allows it;
    // tokens produced by Fernet are always padded. Accept both.
    let t = token.trim();
    URL_SAFE.decode(t).ok().or_else(|| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(t.trim_end_matches('=')).ok())
}

/// The secret keys from configuration: the current one and those it replaced (newest first).
#[derive(Clone)]
pub struct SecretKeys {
    pub current: String,
    pub previous: Vec<String>,
}

impl std::fmt::Debug for SecretKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKeys(current=**********, previous={})", self.previous.len())
    }
}

impl SecretKeys {
    pub fn new(current: impl Into<String>) -> Self {
        Self { current: current.into(), previous: Vec::new() }
    }

    pub fn with_previous(mut self, previous: impl IntoIterator<Item = String>) -> Self {
        self.previous = previous.into_iter().collect();
        self
    }

    /// Read the key from `path`, or create it there (43 random alphanumerics, mode 0600)
    /// when absent. For deployments that configure no key: the key file lives beside nestor's
    /// state, so this protects exported/backed-up settings files rather than a stolen disk.
    pub fn load_or_generate(path: &std::path::Path) -> std::io::Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(s) if !s.trim().is_empty() => return Ok(Self::new(s.trim().to_owned())),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let key = nestor_core::SessionKey::random();
        nestor_core::fs::write_atomic(path, key.expose().as_bytes())?;
        Ok(Self::new(key.expose().to_owned()))
    }
}

/// Encrypts with the current key; decrypts with the current key, then each previous key.
#[derive(Clone)]
pub struct Cipher {
    current: FernetKey,
    previous: Vec<FernetKey>,
}

impl std::fmt::Debug for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cipher(previous_keys={})", self.previous.len())
    }
}

impl Cipher {
    /// Blank previous keys and repeats of the current key are dropped, like the agent-server.
    pub fn new(keys: &SecretKeys) -> Self {
        let mut seen: Vec<&str> = Vec::new();
        let mut previous = Vec::new();
        for k in &keys.previous {
            if k.trim().is_empty() || *k == keys.current || seen.contains(&k.as_str()) {
                continue;
            }
            seen.push(k);
            previous.push(FernetKey::derive(k));
        }
        Self { current: FernetKey::derive(&keys.current), previous }
    }

    pub fn has_previous_keys(&self) -> bool {
        !self.previous.is_empty()
    }

    pub fn encrypt(&self, plaintext: &str) -> String {
        self.current.encrypt(plaintext.as_bytes())
    }

    /// `None` when no configured key decrypts `token` (or it is not a token).
    pub fn decrypt(&self, token: &str) -> Option<String> {
        std::iter::once(&self.current)
            .chain(self.previous.iter())
            .find_map(|k| k.decrypt(token))
            .and_then(|b| String::from_utf8(b).ok())
    }

    /// Whether `token` decrypts under the current key (not only a previous one).
    pub fn is_current(&self, token: &str) -> bool {
        self.current.decrypt(token).is_some()
    }

    /// `token` under the current key: unchanged when already current, re-encrypted when only
    /// a previous key reads it, `None` when no key does.
    pub fn rotate(&self, token: &str) -> Option<String> {
        if self.is_current(token) {
            return Some(token.to_owned());
        }
        self.decrypt(token).map(|p| self.encrypt(&p))
    }
}

/// Whether `s` looks like a Fernet token (the agent-server's test).
pub fn looks_encrypted(s: &str) -> bool {
    s.starts_with(FERNET_TOKEN_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rotation() {
        let old = Cipher::new(&SecretKeys::new("old"));
        let token = old.encrypt("hunter2");
        assert!(looks_encrypted(&token));
        assert_eq!(old.decrypt(&token).as_deref(), Some("hunter2"));
        let new = Cipher::new(&SecretKeys::new("new").with_previous(vec!["old".into()]));
        assert!(!new.is_current(&token));
        assert_eq!(new.decrypt(&token).as_deref(), Some("hunter2"));
        let rotated = new.rotate(&token).unwrap();
        assert!(new.is_current(&rotated));
        assert_eq!(Cipher::new(&SecretKeys::new("new")).decrypt(&rotated).as_deref(), Some("hunter2"));
        assert!(Cipher::new(&SecretKeys::new("other")).decrypt(&token).is_none());
    }

    #[test]
    fn tampering_is_detected() {
        let c = Cipher::new(&SecretKeys::new("k"));
        let t = c.encrypt("value");
        let mut raw = URL_SAFE.decode(&t).unwrap();
        let n = raw.len();
        raw[n - 40] ^= 1;
        assert!(c.decrypt(&URL_SAFE.encode(raw)).is_none());
        assert!(c.decrypt("not a token").is_none());
    }

    /// A token written by agent-server 1.58.2 (`OH_SECRET_KEY=testsecret`) decrypts here.
    #[test]
    fn reads_agent_server_tokens() {
        let text = include_str!("../tests/fixtures/agent_server_secrets.json");
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        let token = v["custom_secrets"]["MY_TOKEN"]["secret"].as_str().unwrap();
        let c = Cipher::new(&SecretKeys::new("testsecret"));
        assert_eq!(c.decrypt(token).as_deref(), Some("s3cret-value"));
    }
}
