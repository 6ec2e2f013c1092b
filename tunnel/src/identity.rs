//! Cluster identities: CA, node, user and proxy certificates, and the `sha256:` CA pin.
