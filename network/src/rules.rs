//! nftables rule sets as text for `nft -f`: each replaces its whole table in one transaction.

use crate::policy::NetworkPolicy;
use std::fmt::Write;
use std::net::{Ipv4Addr, SocketAddrV4};

/// The table in kiln's own namespace: NAT for every sandbox uplink, sandboxes never reach
/// each other nor the host's own services (replies to what the host opened pass), nor the
/// `protected` TCP endpoints (a cluster's etcd members and nodes: code in a sandbox must not
/// reach the cluster's control plane, whatever its egress policy allows).
pub fn host_table(protected: &[SocketAddrV4]) -> String {
    let elems: Vec<String> = protected
        .iter()
        .map(|a| format!("{} . {}", a.ip(), a.port()))
        .collect();
    let elems = if elems.is_empty() {
        String::new()
    } else {
        format!("elements = {{ {} }}", elems.join(", "))
    };
    format!(
        "table inet kiln {{}}
delete table inet kiln
table inet kiln {{
  set protected {{ type ipv4_addr . inet_service; {elems} }}
  chain forward {{
    type filter hook forward priority -5; policy accept;
    iifname \"kiln*\" oifname \"kiln*\" drop
    iifname \"kiln*\" ip daddr . tcp dport @protected reject with tcp reset
  }}
  chain input {{
    type filter hook input priority -5; policy accept;
    iifname \"kiln*\" ct state established,related accept
    iifname \"kiln*\" drop
  }}
  chain postrouting {{
    type nat hook postrouting priority 100; policy accept;
    ip saddr 10.89.0.0/16 oifname != \"kiln*\" masquerade
  }}
}}
"
    )
}

/// A sandbox's router table: `guest_if` faces the guest, `up0` the host. `allowed_ips` /
/// `denied_ips` are what the policy's host names resolved to when it was applied; the DNS
/// proxy adds answers to `@allow_dns` as the guest resolves names.
pub fn router_table(
    guest_if: &str,
    policy: &NetworkPolicy,
    allowed_ips: &[Ipv4Addr],
    denied_ips: &[Ipv4Addr],
) -> String {
    let elems = |cidrs: Vec<String>| -> String {
        if cidrs.is_empty() {
            String::new()
        } else {
            format!("elements = {{ {} }}", cidrs.join(", "))
        }
    };
    let allow: Vec<String> = NetworkPolicy::cidrs(&policy.allow_out)
        .map(|c| c.to_string())
        .chain(allowed_ips.iter().map(|i| i.to_string()))
        .collect();
    let deny: Vec<String> = NetworkPolicy::cidrs(&policy.deny_out)
        .map(|c| c.to_string())
        .chain(denied_ips.iter().map(|i| i.to_string()))
        .collect();
    let (allow, deny) = (elems(allow), elems(deny));
    let mut t = String::new();
    // `add table` + `delete table` + the definition: atomic replace, also of a missing table.
    // The DNS proxy's dynamic set survives only through the rewrite of its elements, so a
    // policy change starts it afresh (answers for names no longer allowed must not linger).
    let _ = write!(
        t,
        "table inet kiln {{}}
delete table inet kiln
table inet kiln {{
  set allow {{ type ipv4_addr; flags interval; auto-merge; {allow} }}
  set deny {{ type ipv4_addr; flags interval; auto-merge; {deny} }}
  set allow_dns {{ type ipv4_addr; flags timeout; }}
  chain forward {{
    type filter hook forward priority 0; policy drop;
    iifname \"up0\" ct state established,related accept
    iifname != \"{guest_if}\" drop
    ct state established,related accept
    ip daddr @allow accept
    ip daddr @allow_dns accept
    ip daddr @deny goto refuse
    {default}
  }}
  # Denied connections fail at once (a reset, or ICMP prohibited) instead of hanging.
  chain refuse {{
    meta l4proto tcp reject with tcp reset
    reject with icmpx type admin-prohibited
  }}
  chain input {{
    type filter hook input priority 0; policy drop;
    iifname \"lo\" accept
    ct state established,related accept
    iifname \"{guest_if}\" udp dport 53 accept
    iifname \"{guest_if}\" tcp dport 53 accept
    iifname \"{guest_if}\" icmp type echo-request accept
  }}
  chain postrouting {{
    type nat hook postrouting priority 100; policy accept;
    oifname \"up0\" masquerade
  }}
}}
",
        default = if policy.internet {
            "meta nfproto ipv4 accept"
        } else {
            "goto refuse"
        },
    );
    t
}

/// Adds `ips` to the proxy's set, each for `secs` (refreshing an entry already there).
pub fn allow_dns_elements(ips: &[(Ipv4Addr, u32)]) -> String {
    let mut t = String::new();
    for (ip, secs) in ips {
        // add (no-op if present), delete, add: one transaction that resets the timeout.
        let _ = writeln!(t, "add element inet kiln allow_dns {{ {ip} }}");
        let _ = writeln!(t, "delete element inet kiln allow_dns {{ {ip} }}");
        let _ = writeln!(
            t,
            "add element inet kiln allow_dns {{ {ip} timeout {secs}s }}"
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_table_refuses_the_protected_endpoints_to_sandboxes() {
        let t = host_table(&[
            "10.0.0.10:2379".parse().unwrap(),
            "10.0.0.11:2379".parse().unwrap(),
        ]);
        assert!(
            t.contains("elements = { 10.0.0.10 . 2379, 10.0.0.11 . 2379 }"),
            "{t}"
        );
        assert!(
            t.contains("iifname \"kiln*\" ip daddr . tcp dport @protected reject"),
            "{t}"
        );
        // None on record: an empty set (nft refuses `elements = { }`).
        let t = host_table(&[]);
        assert!(
            t.contains("set protected { type ipv4_addr . inet_service;  }"),
            "{t}"
        );
    }
}
