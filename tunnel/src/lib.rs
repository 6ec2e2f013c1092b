//! The I/O glue every Remoteler binary shares: TLS on monoio (`tls`), the certificates and
//! pins that identify clusters, nodes and users (`identity`), and the driver that runs a
//! `frame` session over a TLS connection.
//!
//! It does not decide who may do what: authorization lives in the proxy.

pub mod allocator;
pub mod control;
pub mod identity;
pub mod mux;
pub mod read_size;
pub mod tls;
