//! What the sensor learns from the head of a plaintext HTTP/1.x request: method, path, host,
//! the client behind a trusted proxy, and a keyed hash of the API credential.
//!
//! Input comes from the network and may be hostile: parsing is bounded (it never reads past
//! the buffer, allocates nothing per header, and stops after `MAX_HEADERS` keeping what it saw),
//! rejects a request line that is not HTTP/1.x, skips field lines a server would ignore, and
//! never panics (fuzzed).

pub mod cidr;
pub mod head;
pub mod identity;

pub use cidr::{Cidr, CidrError};
pub use head::{
    Carrier, CarrierError, Credential, CredentialPolicy, ForwardedHeader, HeadError, HeadScan,
    MAX_CARRIERS, MAX_HEADERS, RequestHead, parse_head, parse_head_with,
};
pub use identity::{IdentityKey, forwarded_client};
