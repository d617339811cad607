//! Client identity: a keyed hash of the API credential, and the client address behind trusted
//! proxies.

use std::net::IpAddr;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::{cidr::Cidr, head::ForwardedHeader};

/// Bytes of the HMAC shown in an identity (48 bits: collisions are negligible for the number
/// of API keys a deployment has, and the id stays short enough to read).
const ID_BYTES: usize = 6;

/// The per-deployment secret that turns credentials into identities. Without it, an identity
/// cannot be linked back to a key, not even by brute force over a key's known prefix.
pub struct IdentityKey {
    mac: Hmac<Sha256>,
}

impl IdentityKey {
    pub fn new(secret: &[u8]) -> Self {
        // HMAC accepts keys of any length; new_from_slice cannot fail for it.
        let mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        Self { mac }
    }

    /// A short, stable identifier for `credential`: "k-" and 12 hex digits of
    /// HMAC-SHA256(secret, credential).
    pub fn id(&self, credential: &[u8]) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut mac = self.mac.clone();
        mac.update(credential);
        let tag = mac.finalize().into_bytes();
        let mut id = String::with_capacity(2 + 2 * ID_BYTES);
        id.push_str("k-");
        for b in &tag[..ID_BYTES] {
            id.push(char::from(HEX[usize::from(b >> 4)]));
            id.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
        id
    }
}

/// The client address behind trusted proxies: the `trusted_hops`-th address from the right
/// of the forwarding list (`list`: every line of the header joined in order, see
/// `RequestHead::forwarded_list`), when the connection's peer is a trusted proxy. Each trusted
/// proxy appends the address it received from, so the entry `trusted_hops` from the right is
/// the last one a trusted proxy wrote; entries to its left are the client's to invent and are
/// never read. None when the peer is not trusted, the list is shorter, or that entry is not an
/// address.
pub fn forwarded_client(
    peer: IpAddr,
    list: Option<&str>,
    header: ForwardedHeader,
    trusted: &[Cidr],
    trusted_hops: usize,
) -> Option<IpAddr> {
    if trusted_hops == 0 || !trusted.iter().any(|c| c.contains(peer)) {
        return None;
    }
    let entry = list?.rsplit(',').nth(trusted_hops - 1)?;
    match header {
        ForwardedHeader::XForwardedFor => parse_hop(entry),
        ForwardedHeader::Forwarded => entry.split(';').find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            k.trim().eq_ignore_ascii_case("for").then(|| parse_hop(v))?
        }),
    }
}

/// One hop: "203.0.113.9", "\"[2001:db8::1]:4711\"", "10.0.0.1:8080".
fn parse_hop(s: &str) -> Option<IpAddr> {
    let s = s.trim().trim_matches('"');
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    s.rsplit_once(':')?.0.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn ids_are_stable_keyed_and_short() {
        let a = IdentityKey::new(b"secret-a");
        let b = IdentityKey::new(b"secret-b");
        assert_eq!(a.id(b"sk-1"), a.id(b"sk-1"));
        assert_ne!(a.id(b"sk-1"), a.id(b"sk-2"));
        assert_ne!(a.id(b"sk-1"), b.id(b"sk-1"), "the secret keys the hash");
        assert_eq!(a.id(b"sk-1").len(), 14);
        // RFC 4231 test case 2: HMAC-SHA256("Jefe", "what do ya want for nothing?").
        assert_eq!(
            IdentityKey::new(b"Jefe").id(b"what do ya want for nothing?"),
            "k-5bdcc146bf60"
        );
    }

    #[test]
    fn forwarded_only_through_trusted_proxies() {
        let trusted: Vec<Cidr> = vec!["127.0.0.1/32".parse().expect("cidr")];
        let proxy = ip("127.0.0.1");
        let xff = ForwardedHeader::XForwardedFor;
        // The client wrote "6.6.6.6"; the proxy appended the real address.
        assert_eq!(
            forwarded_client(proxy, Some("6.6.6.6, 127.0.0.9"), xff, &trusted, 1),
            Some(ip("127.0.0.9"))
        );
        // A client that writes a trusted address does not move the position.
        assert_eq!(
            forwarded_client(
                proxy,
                Some("6.6.6.6, 127.0.0.1, 10.1.1.1"),
                xff,
                &trusted,
                1
            ),
            Some(ip("10.1.1.1"))
        );
        // Two trusted proxies: the second entry from the right.
        assert_eq!(
            forwarded_client(proxy, Some("6.6.6.6, 10.1.1.1, 10.9.9.9"), xff, &trusted, 2),
            Some(ip("10.1.1.1"))
        );
        assert_eq!(
            forwarded_client(proxy, Some("10.9.9.9"), xff, &trusted, 2),
            None
        );
        // Not through a trusted proxy: ignored entirely.
        assert_eq!(
            forwarded_client(ip("127.0.0.50"), Some("6.6.6.6"), xff, &trusted, 1),
            None
        );
        assert_eq!(
            forwarded_client(
                proxy,
                Some("for=192.0.2.60;proto=http, for=\"[2001:db8::1]:4711\""),
                ForwardedHeader::Forwarded,
                &trusted,
                1
            ),
            Some(ip("2001:db8::1"))
        );
        assert_eq!(
            forwarded_client(proxy, Some("garbage"), xff, &trusted, 1),
            None
        );
        assert_eq!(forwarded_client(proxy, None, xff, &trusted, 1), None);
    }
}
