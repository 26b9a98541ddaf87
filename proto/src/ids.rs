//! Identity newtypes. A bare `String` or `u64` never means an id in a public
//! signature.
//!
//! String ids are 1 to 128 bytes of `[A-Za-z0-9._-]`, so they are safe in
//! URLs, certificate URIs, metric labels and log lines without escaping.
//! `.` and `..` are refused (they are path segments of their own in a URL
//! such as `/v1/apps/{id}`), and so is a leading `-` (a command line would
//! read the id as a flag). This module is the one place ids are checked:
//! everything else goes through the newtypes.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::limits::MAX_ID_LEN;

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    #[error("{kind} must not be empty")]
    Empty { kind: &'static str },
    #[error("{kind} is {len} bytes long, the limit is {max}")]
    TooLong {
        kind: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{kind} may only contain letters, digits, '.', '_' and '-' (found {found:?})")]
    InvalidChar { kind: &'static str, found: char },
    #[error("{kind} must not be {id:?}: it is a path segment of its own in a URL")]
    DotSegment { kind: &'static str, id: String },
    #[error("{kind} must not start with '-' (a command line would read {id:?} as a flag)")]
    LeadingDash { kind: &'static str, id: String },
}

fn validate(kind: &'static str, s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong {
            kind,
            len: s.len(),
            max: MAX_ID_LEN,
        });
    }
    if let Some(found) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(IdError::InvalidChar { kind, found });
    }
    if s == "." || s == ".." {
        return Err(IdError::DotSegment {
            kind,
            id: s.to_owned(),
        });
    }
    if s.starts_with('-') {
        return Err(IdError::LeadingDash {
            kind,
            id: s.to_owned(),
        });
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Checks `s` and wraps it.
            pub fn new(s: impl Into<String>) -> Result<Self, IdError> {
                let s = s.into();
                validate($kind, &s)?;
                Ok(Self(s))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::new(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }
    };
}

string_id!(
    /// A connector, as named in its certificate (`urn:portico:connector:<id>`).
    ConnectorId,
    "connector id"
);
string_id!(
    /// An edge, as named in its certificate (`urn:portico:edge:<id>`).
    EdgeId,
    "edge id"
);
string_id!(
    /// A connector group. `Default` always exists.
    GroupId,
    "group id"
);
string_id!(
    /// A published app.
    AppId,
    "app id"
);
string_id!(
    /// A region.
    RegionId,
    "region id"
);

impl GroupId {
    /// The group that always exists.
    pub fn default_group() -> GroupId {
        GroupId("Default".to_owned())
    }
}

impl RegionId {
    /// The region of a single-region deployment.
    pub fn default_region() -> RegionId {
        RegionId("default".to_owned())
    }
}

/// One tunnel (QUIC connection) on one edge; unique within that process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TunnelId(pub u64);

impl fmt::Display for TunnelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t{}", self.0)
    }
}

/// A request, from the edge that received it to the backend log line.
/// Shown as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u128);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl RequestId {
    /// The id as a header value (`X-Request-Id`), written straight into
    /// the buffer the value keeps.
    pub fn header_value(&self) -> http::HeaderValue {
        let mut hex = [0u8; 32];
        let mut v = self.0;
        for digit in hex.iter_mut().rev() {
            *digit = b"0123456789abcdef"[(v & 0xf) as usize];
            v >>= 4;
        }
        http::HeaderValue::from_maybe_shared(bytes::Bytes::copy_from_slice(&hex))
            .expect("hex digits are a valid header value")
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({self})")
    }
}

impl std::str::FromStr for RequestId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        u128::from_str_radix(s, 16).map(RequestId)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_validate() {
        assert!(ConnectorId::new("c-0123abcd").is_ok());
        assert_eq!(GroupId::new(""), Err(IdError::Empty { kind: "group id" }));
        assert!(matches!(
            AppId::new("a b"),
            Err(IdError::InvalidChar { found: ' ', .. })
        ));
        assert!(matches!(
            EdgeId::new("x".repeat(129)),
            Err(IdError::TooLong { len: 129, .. })
        ));
        let json = serde_json::to_string(&GroupId::default_group()).unwrap();
        assert_eq!(json, "\"Default\"");
        assert!(serde_json::from_str::<GroupId>("\"no/slash\"").is_err());
        for dots in [".", ".."] {
            assert_eq!(
                AppId::new(dots),
                Err(IdError::DotSegment {
                    kind: "app id",
                    id: dots.into()
                })
            );
        }
        assert!(matches!(
            GroupId::new("-rf"),
            Err(IdError::LeadingDash {
                kind: "group id",
                ..
            })
        ));
        assert!(serde_json::from_str::<ConnectorId>("\"-x\"").is_err());
        // Dots and dashes elsewhere are fine.
        for ok in ["...", ".x", "x.", "a-", "a--b", "_x", "a..b"] {
            assert!(AppId::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn request_id_is_32_hex_digits() {
        let id = RequestId(0xabc);
        let s = id.to_string();
        assert_eq!(s.len(), 32);
        assert_eq!(s.parse::<RequestId>().unwrap(), id);
        for id in [
            RequestId(0),
            RequestId(0xabc),
            RequestId(u128::MAX),
            RequestId(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210),
        ] {
            assert_eq!(
                id.header_value(),
                id.to_string().as_str(),
                "the header shows the id as Display does"
            );
        }
    }
}
