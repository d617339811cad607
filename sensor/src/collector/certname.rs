//! The names a client certificate was issued for: its subject's common names and its DNS
//! subject alternative names. With mutual TLS the collector binds an agent token to these:
//! a batch is accepted only if the token's agent name is one of the certificate's names, so
//! a stolen token is useless without that host's key, and one host's certificate cannot
//! carry another host's token.
//!
//! Only reads certificates rustls has already verified against `client_ca_file`; a minimal
//! DER walk (no new dependency) that returns nothing for anything it does not understand,
//! which then fails the binding (refused, never accepted by mistake).

/// One DER element: (tag, contents, rest of the input).
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |l, &b| (l << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The elements of a constructed value's contents.
fn elements(mut input: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    std::iter::from_fn(move || {
        let (tag, body, rest) = element(input)?;
        input = rest;
        Some((tag, body))
    })
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
/// 2.5.4.3 commonName.
const CN: &[u8] = &[0x55, 0x04, 0x03];
/// 2.5.29.17 subjectAltName.
const SAN: &[u8] = &[0x55, 0x1d, 0x11];
/// GeneralName dNSName, [2] IMPLICIT IA5String.
const DNS_NAME: u8 = 0x82;

/// Common names and DNS names of a DER certificate (empty if it cannot be read).
pub fn names(der: &[u8]) -> Vec<String> {
    names_of(der).unwrap_or_default()
}

fn names_of(der: &[u8]) -> Option<Vec<String>> {
    let (SEQUENCE, cert, _) = element(der)? else {
        return None;
    };
    let (SEQUENCE, tbs, _) = element(cert)? else {
        return None;
    };
    let mut fields = elements(tbs).peekable();
    // version [0] EXPLICIT is optional.
    if fields.peek().is_some_and(|(tag, _)| *tag == 0xa0) {
        fields.next();
    }
    // serialNumber, signature, issuer, validity, subject.
    let subject = fields.nth(4)?;
    if subject.0 != SEQUENCE {
        return None;
    }
    let mut out = Vec::new();
    let text = |b: &[u8]| std::str::from_utf8(b).ok().map(str::to_owned);
    for (tag, rdn) in elements(subject.1) {
        if tag != SET {
            return None;
        }
        for (_, atv) in elements(rdn) {
            let mut parts = elements(atv);
            if let (Some((OID, oid)), Some((_, value))) = (parts.next(), parts.next())
                && oid == CN
            {
                out.extend(text(value));
            }
        }
    }
    // subjectPublicKeyInfo, then optional [1], [2], and extensions [3].
    for (tag, body) in fields.skip(1) {
        if tag != 0xa3 {
            continue;
        }
        let (SEQUENCE, exts, _) = element(body)? else {
            return None;
        };
        for (_, ext) in elements(exts) {
            let mut parts = elements(ext);
            let Some((OID, oid)) = parts.next() else {
                continue;
            };
            if oid != SAN {
                continue;
            }
            // critical BOOLEAN is optional; the value is the last part, an OCTET STRING.
            let Some((0x04, value)) = parts.last() else {
                continue;
            };
            let (SEQUENCE, general_names, _) = element(value)? else {
                return None;
            };
            for (tag, name) in elements(general_names) {
                if tag == DNS_NAME {
                    out.extend(text(name));
                }
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj
    /// /CN=host-a/O=sensor -addext subjectAltName=DNS:host-a.example,DNS:alt -days 1`
    const CERT: &str = include_str!("testdata/client-host-a.pem");

    fn der(pem: &str) -> Vec<u8> {
        use rustls_pki_types::{CertificateDer, pem::PemObject as _};
        CertificateDer::from_pem_slice(pem.as_bytes())
            .expect("pem")
            .to_vec()
    }

    #[test]
    fn common_name_and_dns_names() {
        assert_eq!(names(&der(CERT)), vec!["host-a", "host-a.example", "alt"]);
    }

    #[test]
    fn garbage_has_no_names() {
        assert!(names(&[]).is_empty());
        assert!(names(&[0x30, 0x85, 0xff]).is_empty());
        let mut d = der(CERT);
        d.truncate(d.len() / 2);
        assert!(names(&d).is_empty());
    }
}
