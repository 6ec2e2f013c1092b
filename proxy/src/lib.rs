//! `remoteler-proxy`: the proxy appliance.
//!
//! It holds agents' reverse tunnels (tunnel listener), lets agents join with a token and
//! register for direct dialling (auth listener), logs users in and routes their sessions to
//! nodes (users listener), writes the audit log, and answers the operator's CLI over an admin
//! socket. Wire formats are `frame` (multiplexed streams) and `tunnel::control` (one-line
//! JSON requests).
//!
//! The library is what tests drive: [`server::Listeners::bind`] then [`server::run`], which
//! starts one thread with its own monoio runtime per worker and returns once a
//! [`shutdown::Shutdown`] has drained them. `main.rs` only parses arguments and calls
//! [`cli::run`].
//!
//! What it does not do yet: trusted clusters, resumption of the user's leg. Who may reach
//! which node as which login is decided by [`roles::Policy`].

pub mod admin;
pub mod audit;
mod blocking;
pub mod cli;
pub mod datadir;
pub mod directory;
pub mod error;
pub mod guard;
pub mod lockout;
pub mod logging;
pub mod metrics;
pub mod revocation;
pub mod roles;
pub mod server;
pub mod shutdown;
mod splice;
pub mod sshca;
pub mod state;
pub mod state_writer;
pub mod util;

pub use error::ProxyError;
pub use server::{ListenAddrs, Listeners, run};
pub use shutdown::Shutdown;
