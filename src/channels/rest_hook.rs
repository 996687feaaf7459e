//! The rest-hook channel: an HTTP POST of the notification Bundle to the subscriber's https
//! endpoint, with its `channel.header` values and, when the subscription has a secret, a
//! Standard Webhooks signature.
//!
//! Endpoint policy: https only and no loopback, private, link-local or otherwise internal
//! targets, unless the operator allows them. The address check runs inside the HTTP client's
//! DNS resolver, so it applies to the address actually connected to (no DNS-rebinding gap),
//! and literal IP hosts are checked before sending.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use time::OffsetDateTime;
use time::macros::format_description;

use super::SendError;
use super::signature::sign_notification;

/// One notification on its way to an endpoint.
pub struct Outgoing<'a> {
    /// POST for notifications; PUT and DELETE for classic R4 resource payloads.
    pub method: reqwest::Method,
    pub endpoint: &'a str,
    /// None for a request without a body (a classic R4 ping, a DELETE).
    pub content_type: Option<&'a str>,
    pub headers: &'a [(String, String)],
    pub body: Vec<u8>,
    /// Stable per notification, so receivers can drop duplicates (`webhook-id`).
    pub message_id: &'a str,
    pub secret: Option<&'a [u8]>,
    pub timeout: Duration,
    /// The W3C trace context the notification continues (`traceparent` header), unless the
    /// subscription's own `channel.header` sets one.
    pub traceparent: &'a str,
}

#[derive(Clone)]
pub struct RestHook {
    client: reqwest::Client,
    allow_private: bool,
    allow_http: bool,
}

impl RestHook {
    pub fn new(allow_private: bool, allow_http: bool) -> RestHook {
        let mut builder = reqwest::Client::builder()
            .dns_resolver(Arc::new(GuardedResolver { allow_private }))
            .connect_timeout(Duration::from_secs(10));
        if !allow_private {
            // Through a proxy (HTTPS_PROXY and the like), the resolver would check the proxy's
            // address and the proxy would connect wherever the URL says: the guard must see the
            // address actually connected to.
            builder = builder.no_proxy();
        }
        let client = builder
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
        let port = url.port_or_known_default().unwrap_or(443);
        if self.allow_private {
            return Ok(());
        }
        let host = url.host_str().ok_or("the endpoint has no host")?;
        let addresses: Vec<SocketAddr> = match literal_address(&url) {
            Some(ip) => vec![SocketAddr::new(ip, port)],
            None => tokio::net::lookup_host((host, port))
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

    /// Sends one notification (a POST, or for classic R4 resource payloads a PUT or DELETE).
    /// Success is any 2xx answer.
    pub async fn send(&self, out: Outgoing<'_>, now_secs: i64) -> Result<(), SendError> {
        let fail = |message: String| SendError {
            message,
            retry_after: None,
        };
        let url = reqwest::Url::parse(out.endpoint)
            .map_err(|_| fail("the endpoint is not a valid URL".into()))?;
        let host = url.host_str().unwrap_or_default().to_string();
        if !(url.scheme() == "https" || (url.scheme() == "http" && self.allow_http)) {
            return Err(fail(format!(
                "endpoint scheme '{}' is not allowed",
                url.scheme()
            )));
        }
        // An address written in the URL is connected to without asking the resolver, so it is
        // checked here. The URL parser has already normalised it (`2130706433`, `0x7f.1` and
        // `127.0.0.1.` are all `127.0.0.1`), and the client connects to that same form.
        if !self.allow_private
            && let Some(ip) = literal_address(&url)
            && is_internal(ip)
        {
            return Err(fail("the endpoint is an internal address".into()));
        }
        let mut request = self.client.request(out.method, url).timeout(out.timeout);
        if let Some(content_type) = out.content_type {
            request = request.header(reqwest::header::CONTENT_TYPE, content_type);
        }
        if !out
            .headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("traceparent"))
        {
            request = request.header("traceparent", out.traceparent);
        }
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
        let response = request
            .body(out.body)
            .send()
            .await
            .map_err(|e| fail(describe_send_error(&host, out.timeout, &e)))?;
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
            message: format!("HTTP {} from {host}", status.as_u16()),
            retry_after,
        })
    }
}

/// Why a POST got no answer, naming the endpoint's host, in the words an operator searches
/// for: a timeout, DNS, a refused connection, TLS, or the cause as the client reported it.
/// (`fhir::notification::error_code` reads the `subscription-error` code from this text.)
fn describe_send_error(host: &str, timeout: Duration, error: &reqwest::Error) -> String {
    // The causes only: the error itself names the whole URL, which may carry a secret.
    let chain = std::error::Error::source(error)
        .map(crate::error::error_chain)
        .unwrap_or_else(|| "no cause given".to_string());
    let lower = chain.to_ascii_lowercase();
    if error.is_timeout() {
        format!(
            "timeout: no answer from {host} within {} s",
            timeout.as_secs_f64()
        )
    } else if lower.contains("dns error") || lower.contains("no public address") {
        format!("DNS: {host} does not resolve to an address Baton may post to ({chain})")
    } else if lower.contains("connection refused") {
        format!("connection refused by {host}")
    } else if lower.contains("certificate") || lower.contains("tls") || lower.contains("ssl") {
        format!("TLS failure with {host}: {chain}")
    } else if error.is_connect() {
        format!("could not connect to {host}: {chain}")
    } else {
        format!("the request to {host} failed: {chain}")
    }
}

/// Reads a `Retry-After` header: delta-seconds, or an HTTP-date (IMF-fixdate, or the obsolete
/// asctime form that RFC 9110 still asks recipients to accept). A date in the past means "now"
/// and gives zero. Returns `None` for anything else, so a malformed header is simply ignored.
pub fn parse_retry_after(header: &str, now: OffsetDateTime) -> Option<Duration> {
    let text = header.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        // A number too large for u64 still means "a very long time"; the cap applies later.
        return Some(Duration::from_secs(text.parse().unwrap_or(u64::MAX)));
    }
    let imf_fixdate = format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    let asctime = format_description!(
        "[weekday repr:short] [month repr:short] [day padding:space] [hour]:[minute]:[second] [year]"
    );
    let at = time::PrimitiveDateTime::parse(text, imf_fixdate)
        .or_else(|_| time::PrimitiveDateTime::parse(text, asctime))
        .ok()?
        .assume_utc();
    let wait = at - now;
    Some(if wait.is_positive() {
        wait.unsigned_abs()
    } else {
        Duration::ZERO
    })
}

/// The address a URL names directly, if its host is an IPv4 or IPv6 literal. The URL parser
/// has turned every spelling of an IPv4 address into dotted decimal and put IPv6 in brackets,
/// so a host that does not parse here is a domain name, which goes through the resolver.
fn literal_address(url: &reqwest::Url) -> Option<IpAddr> {
    let host = url.host_str()?;
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
        .parse()
        .ok()
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

/// Whether an address is not a public unicast target: loopback, private, link-local, shared,
/// unspecified, multicast, documentation, benchmarking, reserved, or an IPv6 form that embeds
/// or routes to any of those. The IANA special-purpose registries are the reference; an IPv6
/// address counts as public only inside global unicast (`2000::/3`), so the many non-global
/// blocks outside it (`::/96` IPv4-compatible, `100::/64` discard, `fc00::/7` ULA,
/// `fe80::/10` link-local, `fec0::/10` site-local, `ff00::/8` multicast, `5f00::/16`
/// SRv6…) need no rule of their own. Where an IPv6 address carries an IPv4 address that it
/// reaches (IPv4-mapped `::ffff:a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`), that
/// IPv4 address decides.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_internal_v4(v4),
        IpAddr::V6(v6) => match embedded_ipv4(v6) {
            Some(v4) => is_internal_v4(v4),
            None => is_internal_v6(v6),
        },
    }
}

fn is_internal_v4(v4: Ipv4Addr) -> bool {
    let o = v4.octets();
    v4.is_unspecified()
        || o[0] == 0 // 0.0.0.0/8, "this network"
        || v4.is_private() // 10/8, 172.16/12, 192.168/16
        || v4.is_loopback() // 127/8
        || v4.is_link_local() // 169.254/16
        || (o[0] == 100 && (64..128).contains(&o[1])) // 100.64/10, carrier-grade NAT
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // 192.0.0/24, IETF protocol assignments
        || v4.is_documentation() // 192.0.2/24, 198.51.100/24, 203.0.113/24
        || (o[0] == 192 && o[1] == 88 && o[2] == 99) // 192.88.99/24, 6to4 relay anycast
        || (o[0] == 198 && (18..20).contains(&o[1])) // 198.18/15, benchmarking
        || v4.is_multicast() // 224/4
        || o[0] >= 240 // 240/4 reserved, and the broadcast address
}

/// The IPv4 address an IPv6 address delivers to, for the forms that embed one.
fn embedded_ipv4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let last32 = || Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4); // ::ffff:a.b.c.d
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(last32()); // 64:ff9b::a.b.c.d, the NAT64 well-known prefix
    }
    if s[0] == 0x2002 {
        // 2002:AABB:CCDD::/48 is the 6to4 site of a.b.c.d.
        return Some(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    None
}

fn is_internal_v6(v6: Ipv6Addr) -> bool {
    let s = v6.segments();
    let global_unicast = (s[0] & 0xe000) == 0x2000; // 2000::/3
    !global_unicast
        || (s[0] == 0x2001 && s[1] < 0x0200) // 2001::/23 IETF protocol assignments (Teredo 2001::/32, benchmarking, ORCHID)
        || (s[0] == 0x2001 && s[1] == 0x0db8) // 2001:db8::/32 documentation
        || (s[0] & 0xfff0) == 0x3ff0 // 3fff::/20 documentation
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_classified_by_where_they_lead() {
        use Class::{Internal, Public};
        #[derive(Debug, PartialEq)]
        enum Class {
            Internal,
            Public,
        }
        #[rustfmt::skip]
        let cases = [
            // IPv4.
            ("0.0.0.0", Internal, "unspecified"),
            ("0.1.2.3", Internal, "0.0.0.0/8, this network"),
            ("10.1.2.3", Internal, "private"),
            ("100.64.0.1", Internal, "carrier-grade NAT"),
            ("100.127.255.254", Internal, "carrier-grade NAT, top"),
            ("100.128.0.1", Public, "just above carrier-grade NAT"),
            ("127.0.0.1", Internal, "loopback"),
            ("127.255.255.254", Internal, "loopback, top"),
            ("169.254.169.254", Internal, "link-local (cloud metadata)"),
            ("172.16.0.1", Internal, "private"),
            ("172.31.255.255", Internal, "private, top"),
            ("172.32.0.1", Public, "just above private"),
            ("192.0.0.8", Internal, "IETF protocol assignments"),
            ("192.0.2.1", Internal, "documentation"),
            ("192.88.99.1", Internal, "6to4 relay anycast"),
            ("192.168.1.1", Internal, "private"),
            ("198.18.0.1", Internal, "benchmarking"),
            ("198.19.255.255", Internal, "benchmarking, top"),
            ("198.20.0.1", Public, "just above benchmarking"),
            ("198.51.100.7", Internal, "documentation"),
            ("203.0.113.9", Internal, "documentation"),
            ("224.0.0.1", Internal, "multicast"),
            ("240.0.0.1", Internal, "reserved"),
            ("255.255.255.255", Internal, "broadcast"),
            ("8.8.8.8", Public, "public"),
            ("93.184.216.34", Public, "public"),
            // IPv6 that embeds IPv4.
            ("::ffff:127.0.0.1", Internal, "IPv4-mapped loopback"),
            ("::ffff:10.0.0.1", Internal, "IPv4-mapped private"),
            ("::ffff:8.8.8.8", Public, "IPv4-mapped public"),
            ("::127.0.0.1", Internal, "IPv4-compatible (deprecated)"),
            ("::8.8.8.8", Internal, "IPv4-compatible is never routed"),
            ("64:ff9b::7f00:1", Internal, "NAT64 of loopback"),
            ("64:ff9b::a9fe:a9fe", Internal, "NAT64 of link-local"),
            ("64:ff9b::808:808", Public, "NAT64 of a public address"),
            ("64:ff9b:1::808:808", Internal, "local-use NAT64"),
            ("2002:7f00:1::1", Internal, "6to4 of loopback"),
            ("2002:a00:1::1", Internal, "6to4 of private"),
            ("2002:808:808::1", Public, "6to4 of a public address"),
            // IPv6.
            ("::", Internal, "unspecified"),
            ("::1", Internal, "loopback"),
            ("100::1", Internal, "discard"),
            ("2001::1", Internal, "Teredo"),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", Internal, "Teredo with addresses"),
            ("2001:2::1", Internal, "benchmarking"),
            ("2001:10::1", Internal, "ORCHID"),
            ("2001:db8::1", Internal, "documentation"),
            ("3fff::1", Internal, "documentation (RFC 9637)"),
            ("fc00::1", Internal, "unique local"),
            ("fd12:3456::1", Internal, "unique local"),
            ("fe80::1", Internal, "link-local"),
            ("febf::1", Internal, "link-local, top"),
            ("fec0::1", Internal, "site-local"),
            ("ff02::1", Internal, "multicast"),
            ("5f00::1", Internal, "SRv6, outside global unicast"),
            ("4000::1", Internal, "unassigned, outside global unicast"),
            ("2001:4860:4860::8888", Public, "public"),
            ("2606:4700:4700::1111", Public, "public"),
            ("2a00:1450:4001::1", Public, "public"),
        ];
        for (text, expected, why) in cases {
            let ip: IpAddr = text.parse().unwrap();
            let class = if is_internal(ip) { Internal } else { Public };
            assert_eq!(class, expected, "{text}: {why}");
        }
    }

    #[test]
    fn the_address_checked_is_the_address_the_url_names() {
        let cases = [
            ("https://127.0.0.1/h", Some("127.0.0.1")),
            ("https://2130706433/h", Some("127.0.0.1")),
            ("https://0x7f.1/h", Some("127.0.0.1")),
            ("https://0177.0.0.1/h", Some("127.0.0.1")),
            ("https://127.1/h", Some("127.0.0.1")),
            ("https://127.0.0.1./h", Some("127.0.0.1")),
            ("https://[::1]:8443/h", Some("::1")),
            ("https://[::ffff:7f00:1]/h", Some("::ffff:127.0.0.1")),
            (
                "https://[0:0:0:0:0:ffff:127.0.0.1]/h",
                Some("::ffff:127.0.0.1"),
            ),
            ("https://example.org/h", None),
            ("https://example.org./h", None),
            ("https://localhost/h", None),
        ];
        for (endpoint, expected) in cases {
            let url = reqwest::Url::parse(endpoint).unwrap();
            let expected: Option<IpAddr> = expected.map(|e| e.parse().unwrap());
            assert_eq!(literal_address(&url), expected, "{endpoint}");
        }
    }

    #[tokio::test]
    async fn sending_never_reaches_an_internal_literal_address() {
        let guarded = RestHook::new(false, true);
        for endpoint in [
            "http://2130706433:9/hook",
            "http://[::ffff:127.0.0.1]:9/hook",
            "http://[64:ff9b::7f00:1]:9/hook",
            "http://127.0.0.1.:9/hook",
        ] {
            let out = Outgoing {
                method: reqwest::Method::POST,
                endpoint,
                content_type: Some("application/fhir+json"),
                headers: &[],
                body: b"{}".to_vec(),
                message_id: "m",
                secret: None,
                timeout: Duration::from_secs(1),
                traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            };
            let error = guarded.send(out, 0).await.unwrap_err();
            assert_eq!(
                error.message, "the endpoint is an internal address",
                "{endpoint}"
            );
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
        for endpoint in [
            "https://2130706433/hook",
            "https://0x7f.0.0.1/hook",
            "https://127.0.0.1./hook",
            "https://[::ffff:127.0.0.1]/hook",
            "https://[64:ff9b::a9fe:a9fe]/hook",
            "https://[2002:a9fe:a9fe::1]/hook",
            "https://[2001::1]/hook",
            "https://[fec0::1]/hook",
        ] {
            let why = strict.check_endpoint(endpoint).await.unwrap_err();
            assert!(why.contains("internal"), "{endpoint}: {why}");
        }
        let open = RestHook::new(true, true);
        open.check_endpoint("http://127.0.0.1:9/hook")
            .await
            .unwrap();
    }

    #[test]
    fn retry_after_headers_parse_as_seconds_or_http_dates() {
        let secs = Duration::from_secs;
        let now = time::macros::datetime!(2025-06-01 10:00:00 UTC);
        let cases = [
            ("120", Some(secs(120))),
            (" 0 ", Some(secs(0))),
            ("18446744073709551616000", Some(secs(u64::MAX))),
            ("Sun, 01 Jun 2025 10:02:30 GMT", Some(secs(150))),
            ("Sun Jun  1 10:00:07 2025", Some(secs(7))),
            // A date in the past means the endpoint is ready now.
            ("Sat, 31 May 2025 10:00:00 GMT", Some(secs(0))),
            ("-5", None),
            ("1.5", None),
            ("", None),
            ("soon", None),
            // The weekday is redundant, so a wrong one is ignored rather than discarding the date.
            ("Mon, 01 Jun 2025 10:02:30 GMT", Some(secs(150))),
            ("Sun, 01 Jun 2025 10:02:30 +0000", None),
        ];
        for (header, expected) in cases {
            assert_eq!(parse_retry_after(header, now), expected, "{header:?}");
        }
    }
}
