//! A worker process: `remoteler-loadtest worker --spec JSON`. Reads commands on stdin,
//! writes messages on stdout, one JSON object per line (see [`crate::proto`]).

use std::io::Write;

use anyhow::Context as _;

use crate::proto::{Message, WorkerSpec};
use crate::sync::Inbox;
use crate::{agents, baseline, users};

/// Writes one message to the controller; exits if the controller is gone.
pub fn emit(message: &Message) {
    let Ok(mut line) = serde_json::to_vec(message) else {
        return;
    };
    line.push(b'\n');
    let mut out = std::io::stdout().lock();
    if out.write_all(&line).and_then(|()| out.flush()).is_err() {
        std::process::exit(0);
    }
}

/// Runs a worker described by `spec` (JSON).
pub fn main(spec: &str) -> anyhow::Result<()> {
    let spec: WorkerSpec = serde_json::from_str(spec).context("worker spec")?;
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .context("monoio runtime")?;
    let inbox = Inbox::from_stdin();
    let result = rt.block_on(async move {
        match spec {
            WorkerSpec::Agents(s) => agents::run(s, inbox).await,
            WorkerSpec::Users(s) => users::run(s, inbox).await,
            WorkerSpec::Plain(s) => baseline::run(s, inbox).await,
        }
    });
    if let Err(e) = &result {
        emit(&Message::Fatal {
            error: format!("{e:#}"),
        });
    }
    // Tasks still hold connections; leaving now closes them all at once.
    std::process::exit(i32::from(result.is_err()));
}
