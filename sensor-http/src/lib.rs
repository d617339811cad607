//! What the sensor learns from the head of a plaintext HTTP/1.x request: method, path, host,
//! the client behind a trusted proxy, and a keyed hash of the API credential.
//!
//! Input comes from the network and may be hostile: parsing is bounded (it never reads past
//! the buffer, allocates nothing per header, and gives up after `MAX_HEADERS`), rejects what is
//! not a well-formed head with an error instead of guessing, and never panics (fuzzed).

pub mod cidr;
pub mod head;
pub mod identity;

pub use cidr::{Cidr, CidrError};
pub use head::{HeadError, MAX_HEADERS, RequestHead, parse_head};
pub use identity::{IdentityKey, forwarded_client};
