//! the tunnel wire protocol: codec and stream multiplexer, sans-IO
