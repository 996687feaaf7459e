//! The server a tool drives: its FHIR base URL, the bearer token to call it with, and
//! optionally its process (for the CPU it used). Every load subcommand flattens `Target`
//! into its flags: `--base`, `--token`, `--jwt-secret`, `--server-pid`.

use anyhow::bail;

use crate::common::token::Admin;

#[derive(clap::Args, Clone, Debug)]
pub struct Target {
    /// FHIR base URL, e.g. http://127.0.0.1:8080/fhir.
    #[arg(long)]
    pub base: String,
    /// Bearer token (an admin token: `baton token --role admin`).
    #[arg(long, env = "BATON_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Without --token, mint an admin token with this HS256 key.
    #[arg(long, env = "BATON_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// The server's process id: the run also reports the CPU (and, where measured, the
    /// memory) the server used (Linux /proc).
    #[arg(long)]
    pub server_pid: Option<u32>,
}

impl Target {
    /// The FHIR base without a trailing slash: endpoints are `{base}/Task`, `{base}/Subscription`.
    pub fn base(&self) -> &str {
        self.base.trim_end_matches('/')
    }

    /// The server root, where `/metrics`, `/readyz` and `/healthz` are.
    pub fn root(&self) -> &str {
        root_of(self.base())
    }

    /// `Bearer …`: the given token, or one minted for `admin` with the JWT secret.
    pub fn bearer(&self, admin: &Admin) -> anyhow::Result<String> {
        match (&self.token, &self.jwt_secret) {
            (Some(token), _) => Ok(format!("Bearer {token}")),
            (None, Some(secret)) => Ok(format!("Bearer {}", admin.mint(secret)?)),
            (None, None) => bail!("give --token (or BATON_TOKEN), or BATON_JWT_SECRET to mint one"),
        }
    }
}

/// The server root of a FHIR base: the base without its `/fhir` path.
pub fn root_of(base: &str) -> &str {
    base.trim_end_matches('/').trim_end_matches("/fhir")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bases_and_roots() {
        let target = |base: &str| Target {
            base: base.into(),
            token: Some("t".into()),
            jwt_secret: None,
            server_pid: None,
        };
        let cases = [
            (
                "http://127.0.0.1:8080/fhir",
                "http://127.0.0.1:8080/fhir",
                "http://127.0.0.1:8080",
            ),
            (
                "http://127.0.0.1:8080/fhir/",
                "http://127.0.0.1:8080/fhir",
                "http://127.0.0.1:8080",
            ),
            ("http://h:1/other", "http://h:1/other", "http://h:1/other"),
        ];
        for (base, expected_base, expected_root) in cases {
            let t = target(base);
            assert_eq!(
                (t.base(), t.root()),
                (expected_base, expected_root),
                "{base}"
            );
        }
        let admin = Admin {
            subject: "x",
            lifetime: std::time::Duration::from_secs(60),
        };
        assert_eq!(target("http://h/fhir").bearer(&admin).unwrap(), "Bearer t");
        let neither = Target {
            token: None,
            ..target("http://h/fhir")
        };
        assert!(neither.bearer(&admin).is_err());
    }
}
