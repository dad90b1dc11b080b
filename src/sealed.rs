//! Secrets at rest. Subscription signing secrets are stored sealed with
//! AES-256-GCM under a key derived from the gateway secret
//! (`privacy.secret_file`), so a copy of the database alone does not let
//! anyone forge notices to an agency. Only `control` (storing and loading
//! subscriptions) uses this; the sealed form never leaves the gateway.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

/// Marks a sealed value; anything else is a legacy clear-text secret.
const PREFIX: &str = "sealed:v1:";

/// Seals and opens secrets with the gateway's key.
pub struct Sealer {
    key: LessSafeKey,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

impl Sealer {
    /// The sealer keyed from the gateway secret (HMAC-SHA256 with a fixed
    /// label, so this key differs from every other key derived from it).
    pub fn new(gateway_secret: &[u8]) -> Sealer {
        let mut mac = match Hmac::<Sha256>::new_from_slice(gateway_secret) {
            Ok(m) => m,
            // HMAC takes keys of any length; this cannot happen.
            Err(_) => unreachable!("HMAC accepts any key length"),
        };
        mac.update(b"credgate/subscription-signing-secrets/v1");
        let derived = mac.finalize().into_bytes();
        let key = match UnboundKey::new(&AES_256_GCM, &derived) {
            Ok(k) => LessSafeKey::new(k),
            Err(_) => unreachable!("a SHA-256 output is a valid AES-256 key"),
        };
        Sealer { key }
    }

    /// `sealed:v1:` + base64(nonce ‖ ciphertext ‖ tag).
    pub fn seal(&self, plain: &str) -> String {
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let mut data = plain.as_bytes().to_vec();
        let sealed = self.key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce_bytes),
            Aad::from(PREFIX.as_bytes()),
            &mut data,
        );
        if sealed.is_err() {
            unreachable!("AES-GCM sealing of a short secret cannot fail");
        }
        let mut out = nonce_bytes.to_vec();
        out.extend_from_slice(&data);
        format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::STANDARD.encode(out)
        )
    }

    /// The clear text of a sealed value; a value without the prefix is a
    /// secret stored before sealing existed and is returned as it is.
    pub fn open(&self, stored: &str) -> Result<String, String> {
        let Some(b64) = stored.strip_prefix(PREFIX) else {
            return Ok(stored.to_owned());
        };
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| "sealed secret is not valid base64".to_owned())?;
        if raw.len() < NONCE_LEN {
            return Err("sealed secret is too short".into());
        }
        let (nonce, sealed) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| "sealed secret has a bad nonce".to_owned())?;
        let mut data = sealed.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(PREFIX.as_bytes()), &mut data)
            .map_err(|_| {
                "sealed secret does not open with this gateway secret (was privacy.secret_file replaced?)"
                    .to_owned()
            })?;
        String::from_utf8(plain.to_vec()).map_err(|_| "sealed secret is not UTF-8".into())
    }

    /// Seals the `signing_secret` member of a subscription document in
    /// place (already sealed values are left alone).
    pub fn seal_doc(&self, doc: &mut Value) {
        if let Some(Value::String(s)) = doc.get_mut("signing_secret") {
            if !s.starts_with(PREFIX) {
                *s = self.seal(s);
            }
        }
    }

    /// Opens the `signing_secret` member of a stored subscription document
    /// in place; returns whether it was stored in clear.
    pub fn open_doc(&self, doc: &mut Value) -> Result<bool, String> {
        match doc.get_mut("signing_secret") {
            Some(Value::String(s)) => {
                let clear = !s.starts_with(PREFIX);
                *s = self.open(s)?;
                Ok(clear)
            }
            _ => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_opens_and_refuses_another_key() {
        let a = Sealer::new(b"0123456789abcdef0123456789abcdef");
        let b = Sealer::new(b"another-secret-another-secret-xx");
        let secret = "whsec_c2VjcmV0LWZvci1maW5hbmNlLXB1c2gtcmVjZWl2ZXI=";
        let sealed = a.seal(secret);
        assert!(sealed.starts_with(PREFIX));
        assert!(!sealed.contains("c2VjcmV0"), "{sealed}");
        assert_ne!(sealed, a.seal(secret), "a fresh nonce each time");
        assert_eq!(a.open(&sealed).as_deref(), Ok(secret));
        assert!(b.open(&sealed).is_err());
        // Legacy clear text still opens.
        assert_eq!(a.open(secret).as_deref(), Ok(secret));
        let mut doc = serde_json::json!({"signing_secret": secret});
        a.seal_doc(&mut doc);
        let stored = doc.to_string();
        assert!(!stored.contains(secret));
        assert_eq!(a.open_doc(&mut doc), Ok(false));
        assert_eq!(doc["signing_secret"], secret);
    }
}
