//! The egress policy of a sandbox, one model for the CLI, the runtime and the API.
//!
//! Semantics follow E2B's `allowOut` / `denyOut` (and Tensorlake's allow/deny internet):
//! a new outbound connection to address `d` is
//! 1. allowed if `d` is in an `allow_out` CIDR or is an address of an `allow_out` host name;
//! 2. else denied if `d` is in a `deny_out` CIDR or is an address of a `deny_out` host name;
//! 3. else allowed when `internet` is on, denied when it is off.
//!
//! So allow always wins over deny, `internet: false` equals `deny_out: ["0.0.0.0/0"]`, and
//! `--no-internet --allow-out X` is a whitelist. Host names are enforced on IP packets: their
//! addresses (resolved when the policy is applied, and from every DNS answer the sandbox gets)
//! join the sets above, so a raw-IP connection never bypasses a name rule. DNS itself follows
//! the same rules: a name that is denied, or not allowed while everything else is denied,
//! gets NXDOMAIN (so no data leaves through DNS queries either).

use serde::{Deserialize, Serialize};
use std::net::Ipv4Addr;

/// Default: internet on, no lists (E2B's `allow_internet_access` defaults to true).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkPolicy {
    pub internet: bool,
    #[serde(default)]
    pub allow_out: Vec<Dest>,
    #[serde(default)]
    pub deny_out: Vec<Dest>,
}

impl Default for NetworkPolicy {
    fn default() -> Self {
        NetworkPolicy {
            internet: true,
            allow_out: Vec::new(),
            deny_out: Vec::new(),
        }
    }
}

/// One `allow_out` / `deny_out` entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Dest {
    /// An IPv4 network (a bare address is a /32).
    Cidr(Cidr),
    /// A host name, lowercase, or a `*.suffix` wildcard (any name below `suffix`).
    Host(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        };
        u32::from(ip) & mask == u32::from(self.addr)
    }
    pub fn is_everything(&self) -> bool {
        self.prefix == 0
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{input:?}: {why}")]
pub struct DestError {
    pub input: String,
    pub why: String,
}

impl std::str::FromStr for Dest {
    type Err = DestError;
    fn from_str(s: &str) -> Result<Dest, DestError> {
        let err = |why: &str| DestError {
            input: s.to_string(),
            why: why.to_string(),
        };
        let t = s.trim();
        if t.is_empty() {
            return Err(err(
                "empty; give a CIDR (10.0.0.0/8), an address or a host name",
            ));
        }
        if t.contains(':') {
            return Err(err("IPv6 is not supported (sandboxes have IPv4 only)"));
        }
        let (a, p) = match t.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (t, None),
        };
        if let Ok(addr) = a.parse::<Ipv4Addr>() {
            let prefix = match p {
                None => 32,
                Some(p) => match p.parse::<u8>() {
                    Ok(n) if n <= 32 => n,
                    _ => return Err(err("the prefix length after / must be 0..=32")),
                },
            };
            let mask = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - prefix)
            };
            if u32::from(addr) & !mask != 0 {
                return Err(err(&format!(
                    "host bits set; did you mean {}/{prefix}?",
                    Ipv4Addr::from(u32::from(addr) & mask)
                )));
            }
            return Ok(Dest::Cidr(Cidr { addr, prefix }));
        }
        if p.is_some() || a.chars().all(|c| c.is_ascii_digit() || c == '.') {
            return Err(err("not an IPv4 address or CIDR (a.b.c.d or a.b.c.d/n)"));
        }
        let name = t.trim_end_matches('.').to_ascii_lowercase();
        let bare = name.strip_prefix("*.").unwrap_or(&name);
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        if name.len() > 253 || !bare.split('.').all(label_ok) {
            return Err(err(
                "not a host name (letters, digits, '-' in dot-separated labels; \
                 `*.example.com` for every name below example.com)",
            ));
        }
        Ok(Dest::Host(name))
    }
}

impl TryFrom<String> for Dest {
    type Error = DestError;
    fn try_from(s: String) -> Result<Dest, DestError> {
        s.parse()
    }
}

impl From<Dest> for String {
    fn from(d: Dest) -> String {
        d.to_string()
    }
}

impl std::fmt::Display for Dest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dest::Cidr(c) if c.prefix == 32 => write!(f, "{}", c.addr),
            Dest::Cidr(c) => write!(f, "{c}"),
            Dest::Host(h) => f.write_str(h),
        }
    }
}

/// Whether `pattern` (a name or `*.suffix`) covers `name` (lowercase, no trailing dot).
pub fn host_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => name
            .strip_suffix(suffix)
            .is_some_and(|head| head.ends_with('.') && head.len() > 1),
        None => pattern == name,
    }
}

impl NetworkPolicy {
    /// Everything not allowed is denied: internet off, or `0.0.0.0/0` in `deny_out`.
    pub fn denies_by_default(&self) -> bool {
        !self.internet
            || self
                .deny_out
                .iter()
                .any(|d| matches!(d, Dest::Cidr(c) if c.is_everything()))
    }

    pub fn cidrs(list: &[Dest]) -> impl Iterator<Item = &Cidr> {
        list.iter().filter_map(|d| match d {
            Dest::Cidr(c) => Some(c),
            Dest::Host(_) => None,
        })
    }

    pub fn hosts(list: &[Dest]) -> impl Iterator<Item = &str> {
        list.iter().filter_map(|d| match d {
            Dest::Host(h) => Some(h.as_str()),
            Dest::Cidr(_) => None,
        })
    }

    /// What the DNS proxy does with a query for `name`.
    pub fn name_verdict(&self, name: &str) -> NameVerdict {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if Self::hosts(&self.allow_out).any(|p| host_matches(p, &name)) {
            NameVerdict::Allowed
        } else if Self::hosts(&self.deny_out).any(|p| host_matches(p, &name))
            || self.denies_by_default()
        {
            NameVerdict::Refused
        } else {
            NameVerdict::Open
        }
    }

    /// The verdict for a new connection to `ip`, given the addresses the allowed and denied
    /// names resolve to (the nftables rules implement the same order).
    pub fn ip_allowed(
        &self,
        ip: Ipv4Addr,
        allowed_ips: &[Ipv4Addr],
        denied_ips: &[Ipv4Addr],
    ) -> bool {
        if Self::cidrs(&self.allow_out).any(|c| c.contains(ip)) || allowed_ips.contains(&ip) {
            return true;
        }
        if Self::cidrs(&self.deny_out).any(|c| c.contains(ip)) || denied_ips.contains(&ip) {
            return false;
        }
        self.internet
    }

    /// Adds entries, dropping duplicates; an entry moves from the other list.
    pub fn allow(&mut self, d: Dest) {
        self.deny_out.retain(|x| x != &d);
        if !self.allow_out.contains(&d) {
            self.allow_out.push(d);
        }
    }
    pub fn deny(&mut self, d: Dest) {
        self.allow_out.retain(|x| x != &d);
        if !self.deny_out.contains(&d) {
            self.deny_out.push(d);
        }
    }

    /// One line for humans: `internet on; allow: a, b; deny: c`.
    pub fn summary(&self) -> String {
        let list = |l: &[Dest]| {
            l.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut s = format!("internet {}", if self.internet { "on" } else { "off" });
        if !self.allow_out.is_empty() {
            s += &format!("; allow out: {}", list(&self.allow_out));
        }
        if !self.deny_out.is_empty() {
            s += &format!("; deny out: {}", list(&self.deny_out));
        }
        s
    }
}

/// The DNS proxy's answer policy for one name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameVerdict {
    /// Named in `allow_out`: resolved, and its addresses join the allowed set.
    Allowed,
    /// Named in `deny_out`, or not allowed while everything else is denied: NXDOMAIN.
    Refused,
    /// Neither: resolved; the IP rules decide the connection.
    Open,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Dest {
        s.parse().unwrap()
    }

    #[test]
    fn parses_cidrs_addresses_and_names() {
        assert_eq!(d("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert_eq!(d("1.2.3.4").to_string(), "1.2.3.4");
        assert_eq!(d("1.2.3.4/32").to_string(), "1.2.3.4");
        assert_eq!(d("Web.Test.").to_string(), "web.test");
        assert_eq!(d("*.example.com").to_string(), "*.example.com");
        for bad in [
            "",
            "10.0.0.1/8",
            "10.0.0.0/33",
            "300.1.1.1",
            "::1",
            "a..b",
            "-a.b",
            "a b",
        ] {
            assert!(bad.parse::<Dest>().is_err(), "{bad:?} parsed");
        }
        let e = "10.0.0.1/8".parse::<Dest>().unwrap_err();
        assert!(e.to_string().contains("10.0.0.0/8"), "{e}");
    }

    #[test]
    fn wildcards_match_names_below_only() {
        assert!(host_matches("*.example.com", "a.example.com"));
        assert!(host_matches("*.example.com", "a.b.example.com"));
        assert!(!host_matches("*.example.com", "example.com"));
        assert!(!host_matches("*.example.com", "badexample.com"));
        assert!(host_matches("web.test", "web.test"));
        assert!(!host_matches("web.test", "a.web.test"));
    }

    #[test]
    fn allow_wins_over_deny_and_internet_is_the_default() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let p = NetworkPolicy {
            internet: true,
            allow_out: vec![d("10.1.2.0/24")],
            deny_out: vec![d("10.0.0.0/8")],
        };
        assert!(p.ip_allowed(ip("10.1.2.3"), &[], &[]));
        assert!(!p.ip_allowed(ip("10.9.9.9"), &[], &[]));
        assert!(p.ip_allowed(ip("192.0.2.1"), &[], &[]));
        assert!(!p.ip_allowed(ip("192.0.2.1"), &[], &[ip("192.0.2.1")]));
        let off = NetworkPolicy {
            internet: false,
            allow_out: vec![d("web.test")],
            deny_out: vec![],
        };
        assert!(off.ip_allowed(ip("10.5.0.1"), &[ip("10.5.0.1")], &[]));
        assert!(!off.ip_allowed(ip("10.6.0.1"), &[ip("10.5.0.1")], &[]));
        assert_eq!(off.name_verdict("WEB.test."), NameVerdict::Allowed);
        assert_eq!(off.name_verdict("other.test"), NameVerdict::Refused);
        let deny_all = NetworkPolicy {
            internet: true,
            allow_out: vec![],
            deny_out: vec![d("0.0.0.0/0"), d("bad.test")],
        };
        assert!(deny_all.denies_by_default());
        assert_eq!(deny_all.name_verdict("x.test"), NameVerdict::Refused);
        let open = NetworkPolicy {
            deny_out: vec![d("bad.test")],
            ..NetworkPolicy::default()
        };
        assert_eq!(open.name_verdict("bad.test"), NameVerdict::Refused);
        assert_eq!(open.name_verdict("good.test"), NameVerdict::Open);
    }

    #[test]
    fn serializes_as_strings() {
        let p = NetworkPolicy {
            internet: false,
            allow_out: vec![d("web.test"), d("10.0.0.0/8")],
            deny_out: vec![],
        };
        let j = serde_json::to_string(&p).unwrap();
        assert_eq!(
            j,
            r#"{"internet":false,"allow_out":["web.test","10.0.0.0/8"],"deny_out":[]}"#
        );
        assert_eq!(serde_json::from_str::<NetworkPolicy>(&j).unwrap(), p);
        assert!(serde_json::from_str::<NetworkPolicy>(
            r#"{"internet":true,"allow_out":["1.2.3.4/40"]}"#
        )
        .is_err());
    }
}
