//! Fuzzes the request-head parser, credential selection and the forwarded-address resolution
//! with hostile bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sensor_http::{
    Cidr, Credential, CredentialPolicy, ForwardedHeader, IdentityKey, forwarded_client,
    parse_head,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(head) = parse_head(data) {
        let trusted: [Cidr; 1] = ["0.0.0.0/0".parse().expect("cidr")];
        for header in [ForwardedHeader::XForwardedFor, ForwardedHeader::Forwarded] {
            let list = head.forwarded_list(header);
            let _ = forwarded_client(
                "127.0.0.1".parse().expect("ip"),
                list.as_deref(),
                header,
                &trusted,
                1,
            );
        }
        if let Credential::One(credential) = head.credential(&CredentialPolicy::default()) {
            let _ = IdentityKey::new(b"fuzz").id(&credential);
        }
        assert!(head.path.len() <= data.len());
    }
});
