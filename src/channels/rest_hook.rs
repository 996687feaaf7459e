//! The rest-hook channel: an HTTP POST of the notification Bundle to the subscriber's https
//! endpoint, with its `channel.header` values and, when the subscription has a secret, a
//! Standard Webhooks signature.
//!
//! Endpoint policy: https only and no loopback, private, link-local or otherwise internal
//! targets, unless the operator allows them. The address check runs inside the HTTP client's
//! DNS resolver, so it applies to the address actually connected to (no DNS-rebinding gap),
//! and literal IP hosts are checked before sending.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use super::SendError;
use super::signature::sign_notification;
use crate::delivery::retry::parse_retry_after;

/// One notification on its way to an endpoint.
pub struct Outgoing<'a> {
    pub endpoint: &'a str,
    pub content_type: &'a str,
    pub headers: &'a [(String, String)],
    pub body: Vec<u8>,
    /// Stable per notification, so receivers can drop duplicates (`webhook-id`).
    pub message_id: &'a str,
    pub secret: Option<&'a [u8]>,
    pub timeout: Duration,
}

#[derive(Clone)]
pub struct RestHook {
    client: reqwest::Client,
    allow_private: bool,
    allow_http: bool,
}

impl RestHook {
    pub fn new(allow_private: bool, allow_http: bool) -> RestHook {
        let client = reqwest::Client::builder()
            .dns_resolver(Arc::new(GuardedResolver { allow_private }))
            .connect_timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("Baton/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("the HTTP client configuration is valid");
        RestHook {
            client,
            allow_private,
            allow_http,
        }
    }

    /// Checks an endpoint at subscription time: scheme, and where its name resolves to now.
    pub async fn check_endpoint(&self, endpoint: &str) -> Result<(), String> {
        let url = reqwest::Url::parse(endpoint)
            .map_err(|e| format!("the endpoint is not a valid URL: {e}"))?;
        match url.scheme() {
            "https" => {}
            "http" if self.allow_http => {}
            other => {
                return Err(format!(
                    "endpoint scheme '{other}' is not allowed; use https"
                ));
            }
        }
        let host = url.host_str().ok_or("the endpoint has no host")?;
        let port = url.port_or_known_default().unwrap_or(443);
        if self.allow_private {
            return Ok(());
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let addresses: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((host, port))
                .await
                .map_err(|_| format!("the endpoint host '{host}' does not resolve"))?
                .collect(),
        };
        if addresses.is_empty() {
            return Err(format!("the endpoint host '{host}' does not resolve"));
        }
        if let Some(bad) = addresses.iter().find(|a| is_internal(a.ip())) {
            return Err(format!(
                "the endpoint resolves to {}, an internal address; endpoints must be public",
                bad.ip()
            ));
        }
        Ok(())
    }

    /// POSTs one notification. Success is any 2xx answer.
    pub async fn send(&self, out: Outgoing<'_>, now_secs: i64) -> Result<(), SendError> {
        let fail = |message: String| SendError {
            message,
            retry_after: None,
        };
        let url = reqwest::Url::parse(out.endpoint)
            .map_err(|_| fail("the endpoint is not a valid URL".into()))?;
        if !(url.scheme() == "https" || (url.scheme() == "http" && self.allow_http)) {
            return Err(fail(format!(
                "endpoint scheme '{}' is not allowed",
                url.scheme()
            )));
        }
        if !self.allow_private
            && let Some(host) = url.host_str()
            && let Ok(ip) = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
            && is_internal(ip)
        {
            return Err(fail("the endpoint is an internal address".into()));
        }
        let mut request = self
            .client
            .post(url)
            .timeout(out.timeout)
            .header(reqwest::header::CONTENT_TYPE, out.content_type);
        for (name, value) in out.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        if let Some(secret) = out.secret {
            let signature = sign_notification(secret, out.message_id, now_secs, &out.body);
            request = request
                .header("webhook-id", out.message_id)
                .header("webhook-timestamp", now_secs.to_string())
                .header("webhook-signature", signature);
        }
        let response = request.body(out.body).send().await.map_err(|e| {
            let message = if e.is_timeout() {
                "the endpoint did not answer within the timeout".to_string()
            } else if e.is_connect() {
                "the endpoint could not be reached".to_string()
            } else {
                "the request to the endpoint failed".to_string()
            };
            fail(message)
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, time::OffsetDateTime::now_utc()));
        Err(SendError {
            message: format!("HTTP {} from the endpoint", status.as_u16()),
            retry_after,
        })
    }
}

/// Resolves names and refuses internal addresses unless allowed.
struct GuardedResolver {
    allow_private: bool,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let allow_private = self.allow_private;
        let host = name.as_str().to_string();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| allow_private || !is_internal(a.ip()))
                .collect();
            if allowed.is_empty() {
                return Err(format!("'{host}' resolves to no public address").into());
            }
            let addrs: Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

/// Whether an address is loopback, private, link-local, shared, unspecified, multicast or
/// otherwise not a public unicast target.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || (o[0] == 192 && o[1] == 0 && o[2] == 0)
                || (o[0] == 198 && (18..20).contains(&o[1]))
                || o[0] >= 240
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] == 0x2001 && s[1] == 0x0db8)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_recognised() {
        let internal = [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "255.255.255.255",
            "::1",
            "fc00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::",
        ];
        for text in internal {
            assert!(is_internal(text.parse().unwrap()), "{text}");
        }
        for text in [
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700:4700::1111",
            "93.184.216.34",
        ] {
            assert!(!is_internal(text.parse().unwrap()), "{text}");
        }
    }

    #[tokio::test]
    async fn endpoint_policy_at_creation() {
        let strict = RestHook::new(false, false);
        assert!(
            strict
                .check_endpoint("http://example.org/hook")
                .await
                .unwrap_err()
                .contains("https")
        );
        assert!(
            strict
                .check_endpoint("https://127.0.0.1/hook")
                .await
                .unwrap_err()
                .contains("internal")
        );
        assert!(
            strict
                .check_endpoint("https://[::1]:8443/hook")
                .await
                .unwrap_err()
                .contains("internal")
        );
        assert!(
            strict
                .check_endpoint("https://localhost/hook")
                .await
                .is_err()
        );
        let open = RestHook::new(true, true);
        open.check_endpoint("http://127.0.0.1:9/hook")
            .await
            .unwrap();
    }
}
