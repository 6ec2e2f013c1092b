//! TLS over monoio, owned here: cancel-safe, panic-free on network input, small when idle.
