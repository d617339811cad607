//! Client identity: a keyed hash of the API credential, and the client address behind trusted
//! proxies.

use std::net::IpAddr;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::cidr::Cidr;

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
        let mut mac = self.mac.clone();
        mac.update(credential);
        let tag = mac.finalize().into_bytes();
        let mut id = String::with_capacity(2 + 2 * ID_BYTES);
        id.push_str("k-");
        for b in &tag[..ID_BYTES] {
            id.push_str(&format!("{b:02x}"));
        }
        id
    }
}

/// The client address behind trusted proxies, from `X-Forwarded-For` (or `Forwarded: for=`)
/// when the connection's peer is a trusted proxy. Walks the list from the right, skipping
/// trusted proxies: the first untrusted address is the client (entries to its left may be
/// spoofed by the client and are ignored). None when the peer is not trusted or no address
/// qualifies.
pub fn forwarded_client(
    peer: IpAddr,
    x_forwarded_for: Option<&str>,
    forwarded: Option<&str>,
    trusted: &[Cidr],
) -> Option<IpAddr> {
    if !trusted.iter().any(|c| c.contains(peer)) {
        return None;
    }
    let hops: Vec<IpAddr> = match (x_forwarded_for, forwarded) {
        (Some(xff), _) => xff.split(',').filter_map(parse_hop).collect(),
        (None, Some(fwd)) => fwd
            .split(',')
            .filter_map(|element| {
                element.split(';').find_map(|pair| {
                    let (k, v) = pair.split_once('=')?;
                    k.trim().eq_ignore_ascii_case("for").then(|| parse_hop(v))?
                })
            })
            .collect(),
        (None, None) => return None,
    };
    hops.into_iter()
        .rev()
        .find(|hop| !trusted.iter().any(|c| c.contains(*hop)))
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
        // The client spoofed "6.6.6.6"; the proxy appended the real address.
        assert_eq!(
            forwarded_client(proxy, Some("6.6.6.6, 127.0.0.9"), None, &trusted),
            Some(ip("127.0.0.9"))
        );
        // Not through a trusted proxy: ignored entirely.
        assert_eq!(
            forwarded_client(ip("127.0.0.50"), Some("6.6.6.6"), None, &trusted),
            None
        );
        assert_eq!(
            forwarded_client(
                proxy,
                None,
                Some("for=192.0.2.60;proto=http, for=\"[2001:db8::1]:4711\""),
                &trusted
            ),
            Some(ip("2001:db8::1"))
        );
        assert_eq!(
            forwarded_client(proxy, Some("garbage"), None, &trusted),
            None
        );
        assert_eq!(forwarded_client(proxy, None, None, &trusted), None);
    }
}
