//! Property tests: hostile bytes never crash or confuse the head parser. Bounded: the test
//! command runs them with a fixed number of cases.

use proptest::prelude::*;
use sensor_http::{
    Carrier, Cidr, Credential, CredentialPolicy, ForwardedHeader, HeadScan, forwarded_client,
    parse_head, parse_head_with,
};

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 4000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = parse_head(&bytes);
    }

    #[test]
    fn well_formed_heads_parse_and_hide_the_key(
        method in "(GET|POST|PUT|DELETE)",
        path in "/[a-z0-9/_.-]{0,40}",
        key in "sk-[A-Za-z0-9_]{16,48}",
        filler in proptest::collection::vec(("[A-Za-z][A-Za-z0-9-]{0,15}", "[ -~]{0,30}"), 0..10),
        cut in 0usize..700,
    ) {
        let mut raw = format!("{method} {path} HTTP/1.1\r\n");
        for (name, value) in &filler {
            let lower = name.to_ascii_lowercase();
            if lower != "authorization" && !lower.contains("api-key") {
                raw.push_str(&format!("{name}: {}\r\n", value.trim()));
            }
        }
        raw.push_str(&format!("Authorization: Bearer {key}\r\n\r\n"));
        let policy = CredentialPolicy::default();
        let head = parse_head(raw.as_bytes()).expect("well-formed head parses");
        prop_assert_eq!(head.method, method.as_str());
        prop_assert_eq!(head.path, path.as_str());
        prop_assert_eq!(head.credential(&policy), Credential::One(key.as_bytes().into()));
        let shown = format!("{:?} {:?}", head, head.credential(&policy));
        prop_assert!(!shown.contains(&key));
        // Any prefix either parses (maybe truncated) or is an error; never a panic, and a
        // truncated head never yields a partial credential.
        let cut = cut.min(raw.len());
        if let Ok(h) = parse_head(&raw.as_bytes()[..cut])
            && let Credential::One(c) = h.credential(&policy)
        {
            prop_assert_eq!(c.as_ref(), key.as_bytes());
        }
    }

    #[test]
    fn forwarded_headers_never_panic(xff in "[ -~]{0,80}", fwd in "[ -~]{0,80}", hops in 0usize..4) {
        let trusted: Vec<Cidr> = vec!["127.0.0.0/8".parse().expect("cidr")];
        let peer = "127.0.0.1".parse().expect("ip");
        let _ = forwarded_client(peer, Some(&xff), ForwardedHeader::XForwardedFor, &trusted, hops);
        let _ = forwarded_client(peer, Some(&fwd), ForwardedHeader::Forwarded, &trusted, hops);
    }

    #[test]
    fn hostile_heads_never_panic_in_any_accessor(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
        prefix in "(GET / HTTP/1.1\r\n)?",
    ) {
        let mut raw = prefix.into_bytes();
        raw.extend_from_slice(&bytes);
        if let Ok(h) = parse_head(&raw) {
            let _ = h.credential(&CredentialPolicy::default());
            let _ = h.forwarded_list(ForwardedHeader::XForwardedFor);
            let _ = h.fields().count();
        }
    }

    /// The agent's one-pass scan sees exactly what the per-accessor walks see, on hostile
    /// heads with repeated, conflicting and folded credential and forwarding lines.
    #[test]
    fn one_pass_scan_equals_the_accessors(
        lines in proptest::collection::vec(
            ("(Authorization|authorization|X-Api-Key|api-key|X-Forwarded-For|Forwarded|Host|[A-Za-z-]{1,8})",
             "(Bearer |Basic |)[ -~]{0,24}"),
            0..12),
        query in "(\\?key=[a-z%0-9]{0,8}(&key=[a-z0-9]{0,4})?)?",
        junk in proptest::collection::vec(any::<u8>(), 0..40),
        ordered in any::<bool>(),
        cut in 0usize..400,
    ) {
        let mut raw = format!("GET /v1/chat{query} HTTP/1.1\r\n").into_bytes();
        for (name, value) in &lines {
            raw.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        raw.extend_from_slice(&junk);
        raw.extend_from_slice(b"\r\n\r\n");
        let raw = &raw[..cut.min(raw.len())];
        let carriers: Vec<Carrier> = ["authorization", "basic", "x-api-key", "api-key", "query:key"]
            .iter()
            .map(|c| c.parse().expect("carrier"))
            .collect();
        let policy = CredentialPolicy { carriers, ordered };
        for header in [ForwardedHeader::XForwardedFor, ForwardedHeader::Forwarded] {
            let mut scan = HeadScan::new(&policy, header);
            let one = parse_head_with(raw, |n, v| scan.field(n, v));
            prop_assert_eq!(one.is_ok(), parse_head(raw).is_ok());
            if let Ok(head) = one {
                let (credential, list) = scan.finish(&head);
                prop_assert_eq!(credential, head.credential(&policy));
                prop_assert_eq!(list, head.forwarded_list(header));
            }
        }
    }
}
