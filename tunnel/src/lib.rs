//! TLS transport on monoio, the mux driver and identities
