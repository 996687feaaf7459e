//! Admin tokens for the tools, minted from the server's HS256 secret the way `baton token
//! --role admin` does, so a tool run needs only `BATON_JWT_SECRET`. Admins are neither
//! rate-limited nor held to a subscription quota: the tools measure the server, not its limits.

use std::time::Duration;

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde_json::json;

/// Who a tool's token names and how long it lasts (past the longest run of that tool).
#[derive(Debug, Clone, Copy)]
pub struct Admin {
    /// The token's `sub`, so the server's logs say which tool called.
    pub subject: &'static str,
    pub lifetime: Duration,
}

impl Admin {
    /// An HS256 JWT with the claims Baton requires of an admin (`sub`, `exp`, `role`).
    pub fn mint(&self, secret: &str) -> anyhow::Result<String> {
        let exp = time::OffsetDateTime::now_utc().unix_timestamp()
            + i64::try_from(self.lifetime.as_secs()).context("a token lifetime in seconds")?;
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let claims = json!({ "sub": self.subject, "exp": exp, "role": "admin" });
        let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signing_input = format!("{header}.{claims}");
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())
            .context("the JWT secret cannot key HMAC-SHA256")?;
        mac.update(signing_input.as_bytes());
        let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        Ok(format!("{signing_input}.{signature}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn minted_tokens_are_signed_admin_claims() {
        let admin = Admin {
            subject: "baton-test",
            lifetime: Duration::from_secs(3600),
        };
        let token = admin.mint("secret-0123456789").unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["sub"], "baton-test");
        assert_eq!(claims["role"], "admin");
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let exp = claims["exp"].as_i64().unwrap();
        assert!((now + 3590..=now + 3610).contains(&exp), "{exp} vs {now}");
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"secret-0123456789").unwrap();
        mac.update(format!("{}.{}", parts[0], parts[1]).as_bytes());
        mac.verify_slice(&URL_SAFE_NO_PAD.decode(parts[2]).unwrap())
            .expect("signed with the secret");
    }
}
