//! NATS decentralized authentication for the JetStream tests: an operator, one account with
//! JetStream, and users with permissions, as JWTs signed with their nkeys, and the users'
//! `.creds` files. What `nsc` makes in a deployment (nsc is not packaged here); the server
//! checks every signature and permission, so these are real credentials, not stand-ins.
//!
//! The JWT format (nats-io/jwt v2): `base64url(header).base64url(claims).base64url(sig)`,
//! header `{"typ":"JWT","alg":"ed25519-nkey"}`, the signature an ed25519 signature of the
//! first two parts by the issuer's nkey.

use nkeys::KeyPair;
use serde_json::{Value, json};

/// URL-safe base64 without padding (RFC 4648 §5), as JWTs use it.
fn b64url(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// A signed JWT of `kind` for `subject`, issued by `issuer`.
fn encode(issuer: &KeyPair, subject: &str, name: &str, nats: Value) -> String {
    let iat = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let claims = json!({
        // Any unique id: servers do not recompute it.
        "jti": format!("{subject}{iat}"),
        "iat": iat,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let head = b64url(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let body = b64url(claims.to_string().as_bytes());
    let signed = format!("{head}.{body}");
    let sig = issuer.sign(signed.as_bytes()).expect("sign");
    format!("{signed}.{}", b64url(&sig))
}

/// An operator, its one account (with JetStream) and the system account JetStream needs,
/// in the server's terms.
pub struct Operator {
    operator: KeyPair,
    account: KeyPair,
    system: KeyPair,
}

impl Default for Operator {
    fn default() -> Self {
        Self {
            operator: KeyPair::new_operator(),
            account: KeyPair::new_account(),
            system: KeyPair::new_account(),
        }
    }
}

impl Operator {
    /// The server configuration's trust block: the operator, and the account preloaded into
    /// a memory resolver (no account server needed).
    pub fn server_config(&self) -> String {
        let operator = encode(
            &self.operator,
            &self.operator.public_key(),
            "sensor-test",
            json!({ "type": "operator", "version": 2 }),
        );
        let account = encode(
            &self.operator,
            &self.account.public_key(),
            "SENSOR",
            json!({
                "limits": {
                    "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                    "wildcards": true, "conn": -1, "leaf": -1,
                    "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
                },
                "type": "account",
                "version": 2,
            }),
        );
        let system = encode(
            &self.operator,
            &self.system.public_key(),
            "SYS",
            json!({ "type": "account", "version": 2 }),
        );
        format!(
            "operator: \"{operator}\"\nsystem_account: {sys}\nresolver: MEMORY\n\
             resolver_preload: {{\n  {}: \"{account}\"\n  {sys}: \"{system}\"\n}}\n",
            self.account.public_key(),
            sys = self.system.public_key(),
        )
    }

    /// A user of the account allowed to publish on `publish` and subscribe to `subscribe`
    /// (subjects with wildcards), as a `.creds` file.
    pub fn user_creds(&self, name: &str, publish: &[String], subscribe: &[String]) -> String {
        let user = KeyPair::new_user();
        let jwt = encode(
            &self.account,
            &user.public_key(),
            name,
            json!({
                "pub": { "allow": publish },
                "sub": { "allow": subscribe },
                "subs": -1, "data": -1, "payload": -1,
                "type": "user",
                "version": 2,
            }),
        );
        let seed = user.seed().expect("seed");
        format!(
            "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\
             NKEYs are sensitive and should be treated as secrets.\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
             *************************************************************\n"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_as_rfc4648_section_5() {
        for (data, want) in [
            (&b""[..], ""),
            (b"f", "Zg"),
            (b"fo", "Zm8"),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg"),
            (b"fooba", "Zm9vYmE"),
            (b"foobar", "Zm9vYmFy"),
            (&[0xfb, 0xff, 0xbf], "-_-_"),
        ] {
            assert_eq!(b64url(data), want);
        }
    }

    /// The signature checks with the issuer's public key over the first two parts.
    #[test]
    fn jwts_are_signed_by_their_issuer() {
        let op = Operator::default();
        let creds = op.user_creds("u", &["a.>".into()], &[]);
        let jwt = creds.lines().nth(1).expect("jwt line");
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let signed = format!("{}.{}", parts[0], parts[1]);
        let account = KeyPair::from_public_key(&op.account.public_key()).expect("public");
        // ed25519 signatures are deterministic: the account's signature of the same input is
        // the one in the JWT.
        let sig = op.account.sign(signed.as_bytes()).expect("sign");
        assert_eq!(b64url(&sig), parts[2]);
        account.verify(signed.as_bytes(), &sig).expect("verifies");
    }
}
