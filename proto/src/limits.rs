//! Bounds on everything a peer can send. Decoders check these before they
//! allocate, and encoders refuse to produce frames that break them.

/// The largest payload of a `StreamHead` or `ResponseHead` frame.
pub const MAX_HEAD_LEN: usize = 64 * 1024;
/// The largest payload of any other frame (control frames, `Error`).
pub const MAX_CONTROL_LEN: usize = 4 * 1024;
/// The most header fields one head may carry.
pub const MAX_HEADERS: usize = 128;
/// The longest header name, in bytes.
pub const MAX_HEADER_NAME_LEN: usize = 256;
/// The longest header value, in bytes.
pub const MAX_HEADER_VALUE_LEN: usize = 16 * 1024;
/// The longest request target (path and query), in bytes.
pub const MAX_PATH_LEN: usize = 16 * 1024;
/// The longest authority (host and port), in bytes.
pub const MAX_AUTHORITY_LEN: usize = 1024;
/// The longest method token, in bytes.
pub const MAX_METHOD_LEN: usize = 32;
/// The longest identity string (an id, a region, a user), in bytes.
pub const MAX_ID_LEN: usize = 128;
/// The longest free-text message or reason, in bytes.
pub const MAX_MESSAGE_LEN: usize = 1024;
/// The longest authenticated-identity string carried in a `StreamHead`.
pub const MAX_IDENTITY_LEN: usize = 1024;
/// The most entries one `StreamHead` extension area may carry.
pub const MAX_HEAD_EXTENSIONS: usize = 32;
/// The longest value of one extension entry, in bytes.
pub const MAX_EXTENSION_LEN: usize = 16 * 1024;
/// The most identity claims (name and value pairs) one head may carry.
pub const MAX_CLAIMS: usize = 256;
/// The longest identity claim name, in bytes.
pub const MAX_CLAIM_NAME_LEN: usize = 128;
/// The longest identity claim value, in bytes.
pub const MAX_CLAIM_VALUE_LEN: usize = 1024;
/// The longest identity assertion in a head's extension area.
pub const MAX_ASSERTION_LEN: usize = 8 * 1024;
