//! The router client that edges, connectors and the `portico` CLI share.
//!
//! It makes keys and CSRs ([`pki`]), keeps credentials and snapshots in a
//! state directory ([`state`]), talks HTTPS+JSON to the router while pinning
//! its CA ([`client`]), and enrolls and renews certificates ([`enroll`]).
//!
//! It does not listen on anything, hold tunnels or proxy requests: that is
//! the edge's and the connector's work. It speaks to the router only through
//! `portico_proto::api` types.

pub mod client;
pub mod dns;
pub mod enroll;
pub mod error;
pub mod headers;
pub mod nofile;
pub mod ops;
pub mod pki;
pub mod quic;
pub mod state;

pub use client::{RouterClient, RouterTrust};
pub use error::{chain as error_chain, ClientError, EnrollError, PkiError, StateError};
pub use state::{CreatedDirs, Credentials, Secret, StateDir};
