//! SSRF protection for `http(s)` media URLs: which addresses may be connected to (only
//! publicly routable unicast ones, unless allow-listed), checked on the address actually
//! connected to (a resolver that drops refused addresses) and on every redirect.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::{Host, Url};

use super::{clip, host_label, FetchError};

/// IPv4 ranges that are never fetched from unless allow-listed.
const BLOCKED_V4: &[Ipv4Net] = &[
    v4net(0, 0, 0, 0, 8),       // "this network", includes unspecified 0.0.0.0
    v4net(10, 0, 0, 0, 8),      // RFC 1918 private
    v4net(100, 64, 0, 0, 10),   // shared address space / CGNAT
    v4net(127, 0, 0, 0, 8),     // loopback
    v4net(169, 254, 0, 0, 16),  // link-local (cloud metadata lives here)
    v4net(172, 16, 0, 0, 12),   // RFC 1918 private
    v4net(192, 0, 0, 0, 24),    // IETF protocol assignments
    v4net(192, 0, 2, 0, 24),    // documentation TEST-NET-1
    v4net(192, 88, 99, 0, 24),  // deprecated 6to4 relay anycast
    v4net(192, 168, 0, 0, 16),  // RFC 1918 private
    v4net(198, 18, 0, 0, 15),   // benchmarking
    v4net(198, 51, 100, 0, 24), // documentation TEST-NET-2
    v4net(203, 0, 113, 0, 24),  // documentation TEST-NET-3
    v4net(224, 0, 0, 0, 4),     // multicast
    v4net(240, 0, 0, 0, 4),     // reserved, includes broadcast 255.255.255.255
];

/// IPv6 ranges that are never fetched from unless allow-listed. Ranges that embed an IPv4
/// address are handled separately in [`is_blocked_v6`].
const BLOCKED_V6: &[Ipv6Net] = &[
    v6net([0, 0, 0, 0, 0, 0, 0, 0], 96),          // IPv4-compatible (deprecated), incl. :: and ::1
    v6net([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48),  // local-use NAT64
    v6net([0x100, 0, 0, 0, 0, 0, 0, 0], 64),      // discard-only
    v6net([0x2001, 0, 0, 0, 0, 0, 0, 0], 32),     // Teredo (embeds an obfuscated IPv4)
    v6net([0x2001, 2, 0, 0, 0, 0, 0, 0], 48),     // benchmarking
    v6net([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32), // documentation
    v6net([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20),     // documentation (RFC 9637)
    v6net([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7),      // unique local
    v6net([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10),     // link-local
    v6net([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10),     // site-local (deprecated)
    v6net([0xff00, 0, 0, 0, 0, 0, 0, 0], 8),      // multicast
];

const fn v4net(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Ipv4Net {
    Ipv4Net::new_assert(Ipv4Addr::new(a, b, c, d), prefix)
}

const fn v6net(s: [u16; 8], prefix: u8) -> Ipv6Net {
    Ipv6Net::new_assert(Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]), prefix)
}

/// `true` if `ip` is not a publicly routable unicast address and must not be fetched from
/// (loopback, private, CGNAT, link-local, unspecified, broadcast, multicast, documentation,
/// reserved, unique-local, and IPv6 forms embedding such an IPv4 address).
pub fn is_blocked_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_blocked_v4(v4),
        IpAddr::V6(v6) => is_blocked_v6(v6),
    }
}

fn is_blocked_v4(ip: Ipv4Addr) -> bool {
    BLOCKED_V4.iter().any(|net| net.contains(&ip))
}

fn is_blocked_v6(ip: Ipv6Addr) -> bool {
    let bits = u128::from(ip);
    // Forms that carry an IPv4 address: judge them by that address.
    let embedded = |net: [u16; 8], prefix: u8, shift: u32| v6net(net, prefix).contains(&ip).then(|| Ipv4Addr::from((bits >> shift) as u32));
    let embedded_v4 = embedded([0, 0, 0, 0, 0, 0xffff, 0, 0], 96, 0) // IPv4-mapped
        .or_else(|| embedded([0, 0, 0, 0, 0xffff, 0, 0, 0], 96, 0)) // IPv4-translated (SIIT)
        .or_else(|| embedded([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96, 0)) // NAT64 well-known
        .or_else(|| embedded([0x2002, 0, 0, 0, 0, 0, 0, 0], 16, 80)); // 6to4
    if let Some(v4) = embedded_v4 {
        return is_blocked_v4(v4);
    }
    BLOCKED_V6.iter().any(|net| net.contains(&ip))
}

// ---------------------------------------------------------------------------------------------
// Allow list and target policy
// ---------------------------------------------------------------------------------------------

/// Parsed [`FetchConfig::allow_list`].
#[derive(Debug, Default)]
pub(super) struct AllowList {
    nets: Vec<IpNet>,
    hosts: Vec<String>,
}

impl AllowList {
    pub(super) fn parse(entries: &[String]) -> Result<Self, FetchError> {
        let mut list = AllowList::default();
        for raw in entries {
            let entry = raw.trim();
            let bare = entry.strip_prefix('[').and_then(|e| e.strip_suffix(']')).unwrap_or(entry);
            if let Ok(net) = bare.parse::<IpNet>() {
                list.nets.push(net);
            } else if let Ok(ip) = bare.parse::<IpAddr>() {
                list.nets.push(IpNet::from(ip));
            } else if let Some(host) = normalize_hostname(entry) {
                list.hosts.push(host);
            } else {
                return Err(FetchError::Config(format!("allow_list entry `{raw}` is not a CIDR, IP address or hostname")));
            }
        }
        Ok(list)
    }

    fn allows_ip(&self, ip: IpAddr) -> bool {
        let canonical = ip.to_canonical();
        self.nets.iter().any(|net| net.contains(&ip) || net.contains(&canonical))
    }

    fn allows_host(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.');
        self.hosts.iter().any(|h| h.eq_ignore_ascii_case(host))
    }
}

/// Lower-cases a DNS hostname and strips a trailing dot; `None` if it is not a valid name.
fn normalize_hostname(entry: &str) -> Option<String> {
    let host = entry.strip_suffix('.').unwrap_or(entry).to_ascii_lowercase();
    let valid_label = |l: &str| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    let valid = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(valid_label)
        // All-numeric dotted names are IP-like, not hostnames (e.g. a mistyped `10.0.0.1/`).
        && !host.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    valid.then_some(host)
}

/// Decides which targets may be contacted; shared by the resolver and the redirect policy.
#[derive(Debug)]
pub(super) struct TargetPolicy {
    pub(super) allow: AllowList,
}

impl TargetPolicy {
    fn ip_permitted(&self, ip: IpAddr) -> bool {
        !is_blocked_ip(ip) || self.allow.allows_ip(ip)
    }

    /// Checks the host of an `http(s)` URL that is about to be requested. IP-literal hosts are
    /// judged here because they never reach the resolver; names are judged by the resolver.
    pub(super) fn check_host(&self, url: &Url) -> Result<(), FetchError> {
        let ip = match url.host() {
            None => return Err(FetchError::InvalidUrl("URL has no host".into())),
            Some(Host::Domain(_)) => return Ok(()),
            Some(Host::Ipv4(v4)) => IpAddr::V4(v4),
            Some(Host::Ipv6(v6)) => IpAddr::V6(v6),
        };
        if self.ip_permitted(ip) {
            Ok(())
        } else {
            tracing::debug!(%ip, "refusing media fetch from non-public address");
            Err(FetchError::Blocked { host: host_label(url) })
        }
    }
}

/// DNS resolver that only hands reqwest addresses the [`TargetPolicy`] permits, so the check
/// applies to the address actually connected to (no check-then-connect race).
pub(super) struct GuardedResolver {
    pub(super) policy: Arc<TargetPolicy>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = Arc::clone(&self.policy);
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> = match tokio::net::lookup_host((host.as_str(), 0)).await {
                Ok(addrs) => addrs.collect(),
                Err(_) => return Err(FetchError::Resolve { host: clip(&host) }.into()),
            };
            if resolved.is_empty() {
                return Err(FetchError::Resolve { host: clip(&host) }.into());
            }
            let host_allowed = policy.allow.allows_host(&host);
            let permitted: Vec<SocketAddr> = resolved.into_iter().filter(|addr| host_allowed || policy.ip_permitted(addr.ip())).collect();
            if permitted.is_empty() {
                tracing::debug!(host = %host, "refusing media fetch: host resolves to non-public addresses");
                return Err(FetchError::Blocked { host: clip(&host) }.into());
            }
            Ok(Box::new(permitted.into_iter()) as Addrs)
        })
    }
}

/// Redirect policy: bounded count, http(s) only, IP-literal hosts re-checked on every hop
/// (named hosts are re-checked by [`GuardedResolver`] when connecting).
pub(super) fn redirect_policy(policy: Arc<TargetPolicy>, max_redirects: usize) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        // `previous` holds the original URL plus every URL already redirected to.
        if attempt.previous().len() > max_redirects {
            return attempt.error(FetchError::TooManyRedirects { limit: max_redirects });
        }
        let next = attempt.url();
        if !matches!(next.scheme(), "http" | "https") {
            let scheme = clip(next.scheme());
            return attempt.error(FetchError::RedirectScheme(scheme));
        }
        match policy.check_host(next) {
            Ok(()) => attempt.follow(),
            Err(err) => attempt.error(err),
        }
    })
}

/// The scheme of a redirect response's `Location` if it is neither `http` nor `https`.
pub(super) fn unfollowable_redirect_scheme(response: &reqwest::Response) -> Option<String> {
    let location = response.headers().get(reqwest::header::LOCATION)?.to_str().ok()?;
    let target = response.url().join(location).ok()?;
    (!matches!(target.scheme(), "http" | "https")).then(|| clip(target.scheme()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifier_table() {
        let cases: &[(&str, bool)] = &[
            // IPv4 blocked
            ("0.0.0.0", true),
            ("0.1.2.3", true),
            ("10.0.0.1", true),
            ("10.255.255.255", true),
            ("100.64.0.1", true),
            ("100.127.255.254", true),
            ("127.0.0.1", true),
            ("127.1.2.3", true),
            ("169.254.169.254", true),
            ("172.16.0.1", true),
            ("172.31.255.255", true),
            ("192.0.0.8", true),
            ("192.0.2.1", true),
            ("192.168.1.1", true),
            ("198.18.0.1", true),
            ("198.51.100.7", true),
            ("203.0.113.9", true),
            ("224.0.0.1", true),
            ("239.255.255.250", true),
            ("240.0.0.1", true),
            ("255.255.255.255", true),
            // IPv4 public (including neighbours of blocked ranges)
            ("1.1.1.1", false),
            ("8.8.8.8", false),
            ("9.255.255.255", false),
            ("11.0.0.0", false),
            ("100.63.255.255", false),
            ("100.128.0.0", false),
            ("126.255.255.255", false),
            ("128.0.0.1", false),
            ("172.15.255.255", false),
            ("172.32.0.0", false),
            ("192.169.0.1", false),
            ("223.255.255.255", false),
            // IPv6 blocked
            ("::", true),
            ("::1", true),
            ("::ffff:127.0.0.1", true),
            ("::ffff:10.1.2.3", true),
            ("::ffff:169.254.169.254", true),
            ("::ffff:0.0.0.0", true),
            ("::127.0.0.1", true),
            ("::8.8.8.8", true), // IPv4-compatible form is deprecated: always refused
            ("::ffff:0:192.168.0.1", true),
            ("64:ff9b::10.0.0.1", true),
            ("64:ff9b:1::1", true),
            ("100::1", true),
            ("2001::1", true),
            ("2001:db8::1", true),
            ("2002:7f00:1::1", true),  // 6to4 of 127.0.0.1
            ("2002:c0a8:101::", true), // 6to4 of 192.168.1.1
            ("3fff::1", true),
            ("fc00::1", true),
            ("fd12:3456::1", true),
            ("fe80::1", true),
            ("febf::1", true),
            ("fec0::1", true),
            ("ff02::1", true),
            // IPv6 public
            ("2606:4700:4700::1111", false),
            ("2001:4860:4860::8888", false),
            ("::ffff:8.8.8.8", false),
            ("64:ff9b::8.8.8.8", false),
            ("2002:808:808::1", false), // 6to4 of 8.8.8.8
            ("2a00:1450::1", false),
        ];
        for &(addr, blocked) in cases {
            let ip: IpAddr = addr.parse().expect("test table address parses");
            assert_eq!(is_blocked_ip(ip), blocked, "{addr}");
        }
    }

    #[test]
    fn allow_list_parsing_and_matching() {
        let list =
            AllowList::parse(&["10.0.0.0/8".into(), " 127.0.0.1 ".into(), "[::1]".into(), "fd00::/8".into(), "Images.Internal.".into()])
                .expect("valid entries");
        let ip = |s: &str| s.parse::<IpAddr>().expect("valid ip");
        assert!(list.allows_ip(ip("10.9.8.7")));
        assert!(list.allows_ip(ip("127.0.0.1")));
        assert!(!list.allows_ip(ip("127.0.0.2")));
        assert!(list.allows_ip(ip("::ffff:127.0.0.1")), "mapped form of an allowed v4");
        assert!(list.allows_ip(ip("::1")));
        assert!(list.allows_ip(ip("fd00::5")));
        assert!(!list.allows_ip(ip("192.168.0.1")));
        assert!(list.allows_host("images.internal"));
        assert!(list.allows_host("IMAGES.internal."));
        assert!(!list.allows_host("evil.images.internal"));

        for bad in ["10.0.0.0/33", "", "not a host", "1.2.3", "http://x", "a..b", "1.2.3.4/"] {
            let err = AllowList::parse(&[bad.to_string()]).expect_err(bad);
            assert!(err.is_config_error(), "{bad}: {err}");
            assert!(err.to_string().contains(&format!("`{bad}`")), "{bad}: {err}");
        }
    }
}
