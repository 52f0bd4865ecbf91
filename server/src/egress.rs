//! E2B's sandbox network fields (`allow_internet_access`, `network` on create, `PUT
//! /sandboxes/{id}/network`, `allowInternetAccess`/`network` in the detail) and their mapping
//! to kiln's one policy model ([`kiln_network::NetworkPolicy`]).
//!
//! E2B's rules, kept here so the API answers as E2B's does:
//! - `allow_internet_access: false` is `denyOut: ["0.0.0.0/0"]`; allow wins over deny;
//! - `denyOut` takes addresses and CIDRs only (a host name there is a 400);
//! - a host name in `allowOut` needs `0.0.0.0/0` in `denyOut` (or internet off), else 400;
//! - an update replaces the whole configuration.
//!
//! Refused with 400 because kiln does not do them: per-port rules (`1.2.3.4:443`), per-host
//! request transforms (`rules`) and an egress proxy. `dnsServers` and `httpsPorts` are
//! accepted and have no effect (sandbox DNS goes through kiln's own resolver, which applies
//! the policy). `allowPublicTraffic` and `maskRequestHost` are ingress, not egress: on
//! create, `false` gives the sandbox a traffic access token (the data plane checks it), and a
//! mask is the Host the port proxy gives requests ([`NetworkConfig::mask_request_host`]); an
//! update cannot change them (E2B's update body has no such fields).
//!
//! A create that asks nothing of egress (no `allow_internet_access`, no `allowOut`/`denyOut`)
//! gets the host's default network ([`create_policy`] is `None`).

pub use crate::control::types::NetworkConfig;
use kiln_network::{Dest, NetworkPolicy};

impl NetworkConfig {
    /// `allowPublicTraffic` (default true): false = the sandbox's ports need its traffic
    /// access token.
    pub fn public_traffic(&self) -> bool {
        self.allow_public_traffic.unwrap_or(true)
    }

    /// `maskRequestHost`, checked as E2B checks it (a host name, or address, in ASCII with an
    /// optional `:port`, where `${PORT}` stands for the sandbox port a request is for); an
    /// empty one is none.
    pub fn mask_request_host(&self) -> Result<Option<String>, String> {
        let Some(m) = self.mask_request_host.as_deref().filter(|m| !m.is_empty()) else {
            return Ok(None);
        };
        let host = match m.rsplit_once(':') {
            Some((h, _)) if !h.ends_with(']') && h.contains(':') => m,
            Some((h, _)) => h,
            None => m,
        };
        let host_ok = !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._[]:".contains(&b));
        let header_ok = m.len() <= 300 && m.bytes().all(|b| b.is_ascii_graphic());
        if host_ok && header_ok {
            Ok(Some(m.to_string()))
        } else {
            Err(format!("mask request host is not valid: {m}"))
        }
    }
}

/// The egress policy of a create, or `None` when it asks nothing of egress (the host's
/// default applies), or why it is refused.
pub fn create_policy(
    allow_internet_access: Option<bool>,
    config: Option<&NetworkConfig>,
) -> Result<Option<NetworkPolicy>, String> {
    let policy = policy_of(allow_internet_access, config)?;
    let listed = |l: &Option<Vec<String>>| l.as_ref().is_some_and(|l| !l.is_empty());
    let asked = allow_internet_access.is_some()
        || config.is_some_and(|c| listed(&c.allow_out) || listed(&c.deny_out));
    Ok(asked.then_some(policy))
}

/// The policy of `allow_internet_access` (default true) and `network`, or why it is refused.
pub fn policy_of(
    allow_internet_access: Option<bool>,
    config: Option<&NetworkConfig>,
) -> Result<NetworkPolicy, String> {
    let mut policy = NetworkPolicy {
        internet: allow_internet_access.unwrap_or(true),
        ..NetworkPolicy::default()
    };
    let Some(c) = config else {
        return Ok(policy);
    };
    if c.egress_proxy.as_ref().is_some_and(|v| !v.is_null()) {
        return Err("network.egressProxy is not supported by kiln".into());
    }
    if c.rules
        .as_ref()
        .is_some_and(|v| v.as_object().is_some_and(|m| !m.is_empty()))
    {
        return Err("network.rules (per-host request transforms) are not supported by kiln".into());
    }
    policy.allow_out = dests("allowOut", c.allow_out.as_deref().unwrap_or_default())?;
    policy.deny_out = dests("denyOut", c.deny_out.as_deref().unwrap_or_default())?;
    if let Some(h) = NetworkPolicy::hosts(&policy.deny_out).next() {
        return Err(format!(
            "denyOut takes IP addresses and CIDRs only, not host names ({h})"
        ));
    }
    if let Some(h) = NetworkPolicy::hosts(&policy.allow_out).next() {
        if !policy.denies_by_default() {
            return Err(format!(
                "a host name in allowOut ({h}) needs denyOut to hold 0.0.0.0/0 (or \
                 allow_internet_access false): everything else is allowed anyway"
            ));
        }
    }
    Ok(policy)
}

fn dests(field: &str, list: &[String]) -> Result<Vec<Dest>, String> {
    list.iter()
        .map(|s| {
            if looks_like_port_rule(s) {
                return Err(format!(
                    "{field}: {s:?}: rules with ports are not supported by kiln; give an \
                     address, a CIDR or a host name"
                ));
            }
            s.parse::<Dest>().map_err(|e| format!("{field}: {e}"))
        })
        .collect()
}

/// `1.2.3.4:443`, `10.0.0.0/8:53-443`, `example.com:443` (E2B's per-port rules).
fn looks_like_port_rule(s: &str) -> bool {
    s.rsplit_once(':')
        .is_some_and(|(_, p)| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit() || c == '-'))
}

/// `allowInternetAccess` and the `allowOut`/`denyOut` of E2B's `SandboxDetail`.
pub fn detail_fields(policy: Option<&NetworkPolicy>) -> (bool, Vec<String>, Vec<String>) {
    match policy {
        None => (false, vec![], vec!["0.0.0.0/0".into()]),
        Some(p) => {
            let list = |l: &[Dest]| l.iter().map(|d| d.to_string()).collect::<Vec<_>>();
            (p.internet, list(&p.allow_out), list(&p.deny_out))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn cfg(allow: &[&str], deny: &[&str]) -> NetworkConfig {
        let v = |l: &[&str]| Some(l.iter().map(|s| s.to_string()).collect());
        NetworkConfig {
            allow_out: v(allow),
            deny_out: v(deny),
            ..NetworkConfig::default()
        }
    }

    #[test]
    fn mask_request_hosts() {
        let mask = |m: &str| {
            NetworkConfig {
                mask_request_host: Some(m.into()),
                ..NetworkConfig::default()
            }
            .mask_request_host()
        };
        for ok in [
            "localhost",
            "app.example.com:${PORT}",
            "127.0.0.1:8080",
            "[::1]:80",
        ] {
            assert_eq!(mask(ok), Ok(Some(ok.to_string())), "{ok}");
        }
        assert_eq!(mask(""), Ok(None));
        for bad in ["bad host", "h\r\nx: y", "ünicode.example", "a/b", ":80"] {
            assert!(mask(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn e2b_validation_rules() {
        let ok = |a: &[&str], d: &[&str]| policy_of(None, Some(&cfg(a, d)));
        assert!(ok(&[], &["example.com"])
            .unwrap_err()
            .contains("not host names"));
        assert!(ok(&[], &["not a cidr"]).is_err());
        assert!(ok(&["google.com"], &[]).unwrap_err().contains("0.0.0.0/0"));
        assert!(ok(&["*.example.com"], &["10.0.0.0/8"]).is_err());
        assert!(ok(&["8.8.8.8:443"], &["0.0.0.0/0"])
            .unwrap_err()
            .contains("ports"));
        assert!(ok(&["8.8.8.8"], &[]).is_ok());
        assert!(ok(&["8.8.0.0/16"], &["10.0.0.0/8", "192.168.0.0/16"]).is_ok());
        let p = ok(&["example.com", "8.8.8.8"], &["0.0.0.0/0"]).unwrap();
        assert_eq!(p.allow_out.len(), 2);
        assert!(p.internet);
        // internet off counts as deny-all for host names.
        assert!(policy_of(Some(false), Some(&cfg(&["web.test"], &[]))).is_ok());
        assert!(!policy_of(Some(false), None).unwrap().internet);
        assert_eq!(policy_of(None, None).unwrap(), NetworkPolicy::default());
    }

    #[test]
    fn a_create_that_asks_nothing_gets_the_host_default() {
        let c = |v: Value| serde_json::from_value::<NetworkConfig>(v).unwrap();
        assert_eq!(create_policy(None, None), Ok(None));
        let public = c(json!({"allowPublicTraffic": false, "allowOut": []}));
        assert_eq!(create_policy(None, Some(&public)), Ok(None));
        assert!(!public.public_traffic());
        assert!(c(json!({})).public_traffic());
        assert!(!create_policy(Some(false), None).unwrap().unwrap().internet);
        assert!(create_policy(Some(true), None).unwrap().is_some());
        let deny = c(json!({"denyOut": ["10.0.0.0/8"]}));
        assert!(create_policy(None, Some(&deny)).unwrap().is_some());
        // Refusals still apply when nothing else is asked.
        let proxy = c(json!({"egressProxy": {"address": "p:1080"}}));
        assert!(create_policy(None, Some(&proxy)).is_err());
    }

    #[test]
    fn unsupported_fields_are_refused() {
        let c: NetworkConfig =
            serde_json::from_value(json!({"egressProxy": {"address": "p:1080"}})).unwrap();
        assert!(policy_of(None, Some(&c))
            .unwrap_err()
            .contains("egressProxy"));
        let c: NetworkConfig = serde_json::from_value(json!({"rules": {"a.com": []}})).unwrap();
        assert!(policy_of(None, Some(&c)).is_err());
        let c: NetworkConfig =
            serde_json::from_value(json!({"dnsServers": ["1.1.1.1"], "rules": {}})).unwrap();
        assert!(policy_of(None, Some(&c)).is_ok());
    }
}
