//! The little of the DNS wire format (RFC 1035) the proxy needs: a query's first question,
//! an NXDOMAIN reply to it, a query of its own, and the A records of an answer (with name
//! compression).

use std::net::Ipv4Addr;

pub const TYPE_A: u16 = 1;
const HEADER: usize = 12;

/// A query's first question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    /// Lowercase, no trailing dot.
    pub name: String,
    pub qtype: u16,
    /// Where the question section ends in the message.
    pub end: usize,
}

fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(o)?, *b.get(o + 1)?]))
}

/// Reads a (possibly compressed) name at `o`; returns it and the offset after it in place.
fn read_name(b: &[u8], mut o: usize) -> Option<(String, usize)> {
    let mut name = String::new();
    let mut after = None;
    for _ in 0..128 {
        let len = *b.get(o)? as usize;
        if len & 0xc0 == 0xc0 {
            let ptr = (u16_at(b, o)? & 0x3fff) as usize;
            after.get_or_insert(o + 2);
            o = ptr;
            continue;
        }
        if len == 0 {
            return Some((name, after.unwrap_or(o + 1)));
        }
        let label = b.get(o + 1..o + 1 + len)?;
        if !name.is_empty() {
            name.push('.');
        }
        name.push_str(&String::from_utf8_lossy(label).to_ascii_lowercase());
        o += 1 + len;
    }
    None // a pointer loop
}

/// The first question of a query (QR clear, at least one question).
pub fn question(msg: &[u8]) -> Option<Question> {
    if msg.len() < HEADER || msg[2] & 0x80 != 0 || u16_at(msg, 4)? == 0 {
        return None;
    }
    let (name, o) = read_name(msg, HEADER)?;
    let qtype = u16_at(msg, o)?;
    u16_at(msg, o + 2)?;
    Some(Question {
        name,
        qtype,
        end: o + 4,
    })
}

/// An NXDOMAIN answer to `query` (its id, its first question).
pub fn nxdomain(query: &[u8], q: &Question) -> Vec<u8> {
    let mut r = Vec::with_capacity(q.end);
    r.extend_from_slice(&query[..2]);
    r.push(0x80 | (query[2] & 0x79)); // QR, opcode and RD copied
    r.push(0x80 | 3); // RA, NXDOMAIN
    r.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    r.extend_from_slice(&query[HEADER..q.end]);
    r
}

/// A recursive query for `name`'s A records.
pub fn query_a(id: u16, name: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(HEADER + name.len() + 6);
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        m.push(label.len().min(63) as u8);
        m.extend_from_slice(&label.as_bytes()[..label.len().min(63)]);
    }
    m.push(0);
    m.extend_from_slice(&TYPE_A.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    m
}

pub fn id(msg: &[u8]) -> Option<u16> {
    u16_at(msg, 0)
}

pub fn set_id(msg: &mut [u8], id: u16) {
    if msg.len() >= 2 {
        msg[..2].copy_from_slice(&id.to_be_bytes());
    }
}

/// Every A record in a response's answer section, with its TTL.
pub fn answers_a(msg: &[u8]) -> Vec<(Ipv4Addr, u32)> {
    let mut out = Vec::new();
    let mut parse = || -> Option<()> {
        let qd = u16_at(msg, 4)?;
        let an = u16_at(msg, 6)?;
        let mut o = HEADER;
        for _ in 0..qd {
            o = read_name(msg, o)?.1 + 4;
        }
        for _ in 0..an {
            o = read_name(msg, o)?.1;
            let rtype = u16_at(msg, o)?;
            let ttl = u32::from_be_bytes(msg.get(o + 4..o + 8)?.try_into().ok()?);
            let len = u16_at(msg, o + 8)? as usize;
            let data = msg.get(o + 10..o + 10 + len)?;
            if rtype == TYPE_A && len == 4 {
                out.push((Ipv4Addr::new(data[0], data[1], data[2], data[3]), ttl));
            }
            o += 10 + len;
        }
        Some(())
    };
    let _ = parse();
    out
}

/// Asks `upstream` for `name`'s A records (one UDP exchange, `timeout` bounded).
pub fn resolve_a(
    upstream: std::net::SocketAddr,
    name: &str,
    timeout: std::time::Duration,
) -> std::io::Result<Vec<(Ipv4Addr, u32)>> {
    let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
    sock.connect(upstream)?;
    let id = (std::process::id() as u16) ^ (name.len() as u16).rotate_left(7);
    sock.send(&query_a(id, name))?;
    let deadline = std::time::Instant::now() + timeout;
    let mut buf = [0u8; 1500];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer from DNS server {upstream} for {name}"),
            ));
        }
        sock.set_read_timeout(Some(left))?;
        let n = match sock.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(e),
        };
        if self::id(&buf[..n]) == Some(id) {
            return Ok(answers_a(&buf[..n]));
        }
    }
}

/// A NOERROR response with `answers` (A records of the question's name) to `query`; none
/// is NODATA (the name exists, without records of that type). For tests' DNS servers.
pub fn reply_a(query: &[u8], q: &Question, answers: &[Ipv4Addr], ttl: u32) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&query[..2]);
    r.push(0x80 | (query[2] & 0x79));
    r.push(0x80);
    r.extend_from_slice(&[0, 1]);
    r.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 0]);
    r.extend_from_slice(&query[HEADER..q.end]);
    for a in answers {
        r.extend_from_slice(&[0xc0, HEADER as u8]); // the question's name
        r.extend_from_slice(&TYPE_A.to_be_bytes());
        r.extend_from_slice(&1u16.to_be_bytes());
        r.extend_from_slice(&ttl.to_be_bytes());
        r.extend_from_slice(&4u16.to_be_bytes());
        r.extend_from_slice(&a.octets());
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_question_answer_roundtrip() {
        let q = query_a(7, "Web.Test");
        let qq = question(&q).unwrap();
        assert_eq!(qq.name, "web.test");
        assert_eq!(qq.qtype, TYPE_A);
        let ips = [Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)];
        let r = reply_a(&q, &qq, &ips, 30);
        assert_eq!(id(&r), Some(7));
        assert_eq!(answers_a(&r), vec![(ips[0], 30), (ips[1], 30)]);
        let nx = nxdomain(&q, &qq);
        assert_eq!(nx[3] & 0x0f, 3);
        assert!(answers_a(&nx).is_empty());
        assert!(question(&r).is_none(), "a response is not a query");
    }

    #[test]
    fn garbage_is_rejected_not_panicking() {
        for m in [
            &[][..],
            &[0; 11],
            &[0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12],
        ] {
            assert!(question(m).is_none());
            assert!(answers_a(m).is_empty());
        }
    }
}
