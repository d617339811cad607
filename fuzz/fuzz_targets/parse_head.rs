//! Fuzzes the request-head parser and the forwarded-address resolution with hostile bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sensor_http::{Cidr, IdentityKey, forwarded_client, parse_head};

fuzz_target!(|data: &[u8]| {
    if let Ok(head) = parse_head(data) {
        let trusted: [Cidr; 1] = ["0.0.0.0/0".parse().expect("cidr")];
        let _ = forwarded_client(
            "127.0.0.1".parse().expect("ip"),
            head.x_forwarded_for,
            head.forwarded,
            &trusted,
        );
        if let Some(credential) = head.credential() {
            let _ = IdentityKey::new(b"fuzz").id(credential);
        }
        assert!(head.path.len() <= data.len());
    }
});
