//! Webhook signing in the Standard Webhooks format (https://www.standardwebhooks.com).
//!
//! A rest-hook POST carries `webhook-id`, `webhook-timestamp` and `webhook-signature`; the
//! signature is an HMAC-SHA256 over `{id}.{timestamp}.{body}` with the subscription's secret.
//! Using the published format lets receivers verify with an existing library instead of code
//! written against Baton. Everything here is pure; the caller supplies the time.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The prefix that marks a Standard Webhooks secret.
const SECRET_PREFIX: &str = "whsec_";

/// The version tag of the only signature scheme Baton produces (symmetric HMAC-SHA256).
const SIGNATURE_VERSION: &str = "v1";

/// Secrets shorter than this are refused: an HMAC key much below the hash's block strength would
/// make signatures guessable.
const MIN_SECRET_BYTES: usize = 16;

/// The size of a generated secret: 192 bits, what the reference implementations generate.
const GENERATED_SECRET_BYTES: usize = 24;

/// Creates a new random signing secret, `whsec_` followed by base64 of 24 random bytes.
pub fn generate_secret() -> String {
    let key: [u8; GENERATED_SECRET_BYTES] = rand::random();
    format!("{SECRET_PREFIX}{}", STANDARD.encode(key))
}

/// Reads a `whsec_<base64>` secret into its key bytes. Returns `None` when the prefix is
/// missing, the base64 is malformed, or the key is shorter than 16 bytes, so a weak or mistyped
/// secret is rejected when the subscription is created rather than producing signatures nobody
/// can check.
pub fn parse_secret(text: &str) -> Option<Vec<u8>> {
    let encoded = text.strip_prefix(SECRET_PREFIX)?;
    let key = STANDARD.decode(encoded).ok()?;
    (key.len() >= MIN_SECRET_BYTES).then_some(key)
}

/// Computes the `webhook-signature` value for one delivery attempt: `v1,<base64 signature>`.
///
/// Each attempt is signed with its own timestamp, so a retry gets a fresh signature under the
/// same message id.
pub fn sign_notification(
    secret: &[u8],
    message_id: &str,
    timestamp_secs: i64,
    body: &[u8],
) -> String {
    let tag = mac(secret, message_id, timestamp_secs, body)
        .finalize()
        .into_bytes();
    format!("{SIGNATURE_VERSION},{}", STANDARD.encode(tag))
}

/// Checks a `webhook-signature` header, which may list several space-separated signatures (a
/// sender rotating its secret signs with both). True when any `v1` signature matches.
///
/// The comparison is constant-time. Checking that `timestamp_secs` is recent, which stops
/// replays, is the caller's job, because only the caller knows the current time.
pub fn verify(
    secret: &[u8],
    message_id: &str,
    timestamp_secs: i64,
    body: &[u8],
    header: &str,
) -> bool {
    let expected = mac(secret, message_id, timestamp_secs, body);
    header.split_whitespace().any(|candidate| {
        let Some((version, encoded)) = candidate.split_once(',') else {
            return false;
        };
        version == SIGNATURE_VERSION
            && STANDARD
                .decode(encoded)
                .is_ok_and(|tag| expected.clone().verify_slice(&tag).is_ok())
    })
}

/// The HMAC state after absorbing the signed content `{id}.{timestamp}.{body}`.
fn mac(secret: &[u8], message_id: &str, timestamp_secs: i64, body: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(message_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp_secs.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "msg_2YbWnB1uM6mVZlFq";
    const TIMESTAMP: i64 = 1_748_772_000;

    fn key() -> Vec<u8> {
        (1..=32).collect()
    }

    #[test]
    fn signatures_match_the_published_standard_webhooks_vector() {
        // The test vector of the Standard Webhooks reference libraries: a receiver using any of
        // them accepts what Baton sends only if this matches byte for byte.
        let secret = parse_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("valid secret");
        let body = br#"{"test": 2432232314}"#;
        let signature =
            sign_notification(&secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1_614_265_330, body);
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn signatures_match_an_hmac_computed_directly() {
        // The body includes bytes that are not UTF-8, to show it is signed as bytes.
        let body: &[u8] = b"{\"resourceType\":\"Bundle\"}\xff\x00";
        let mut content = format!("{ID}.{TIMESTAMP}.").into_bytes();
        content.extend_from_slice(body);
        let mut direct = HmacSha256::new_from_slice(&key()).unwrap();
        direct.update(&content);
        let expected = format!("v1,{}", STANDARD.encode(direct.finalize().into_bytes()));
        assert_eq!(sign_notification(&key(), ID, TIMESTAMP, body), expected);
    }

    #[test]
    fn generated_secrets_parse_and_round_trip() {
        let text = generate_secret();
        assert!(text.starts_with("whsec_"), "{text}");
        let secret = parse_secret(&text).expect("a generated secret parses");
        assert_eq!(secret.len(), 24);
        assert_ne!(generate_secret(), text, "secrets are random");
        let header = sign_notification(&secret, ID, TIMESTAMP, b"{}");
        assert!(verify(&secret, ID, TIMESTAMP, b"{}", &header));
    }

    #[test]
    fn secrets_must_be_prefixed_base64_of_at_least_16_bytes() {
        let sixteen = STANDARD.encode([7u8; 16]);
        let fifteen = STANDARD.encode([7u8; 15]);
        let cases = [
            (format!("whsec_{sixteen}"), Some(vec![7u8; 16])),
            (format!("whsec_{fifteen}"), None),
            (sixteen.clone(), None),
            (format!("WHSEC_{sixteen}"), None),
            (format!("whsec_ {sixteen}"), None),
            (format!("whsec_{sixteen}\n"), None),
            ("whsec_not*base64!".to_string(), None),
            ("whsec_".to_string(), None),
            (String::new(), None),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_secret(&text), expected, "{text:?}");
        }
    }

    #[test]
    fn verification_accepts_only_a_matching_v1_signature() {
        let good = sign_notification(&key(), ID, TIMESTAMP, b"body");
        let other_key = sign_notification(&[9u8; 32], ID, TIMESTAMP, b"body");
        let encoded = good.strip_prefix("v1,").unwrap();
        let cases = [
            (good.clone(), ID, TIMESTAMP, &b"body"[..], true),
            // Several signatures, as during a secret rotation: one match is enough.
            (format!("{other_key} {good}"), ID, TIMESTAMP, b"body", true),
            (
                format!("v1,bm9wZQ==  {good} "),
                ID,
                TIMESTAMP,
                b"body",
                true,
            ),
            (other_key.clone(), ID, TIMESTAMP, b"body", false),
            (good.clone(), ID, TIMESTAMP, b"bodY", false),
            (good.clone(), "msg_other", TIMESTAMP, b"body", false),
            (good.clone(), ID, TIMESTAMP + 1, b"body", false),
            // The right bytes under another scheme's tag are not a v1 signature.
            (format!("v1a,{encoded}"), ID, TIMESTAMP, b"body", false),
            (encoded.to_string(), ID, TIMESTAMP, b"body", false),
            (
                good[..good.len() - 4].to_string(),
                ID,
                TIMESTAMP,
                b"body",
                false,
            ),
            ("v1,***".to_string(), ID, TIMESTAMP, b"body", false),
            (String::new(), ID, TIMESTAMP, b"body", false),
        ];
        for (header, id, timestamp, body, expected) in cases {
            assert_eq!(
                verify(&key(), id, timestamp, body, &header),
                expected,
                "{header:?} {id} {timestamp} {body:?}"
            );
        }
    }
}
