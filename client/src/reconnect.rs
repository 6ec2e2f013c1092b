//! Keeping a user's connection to the proxy through network changes: when the connection
//! drops (a laptop moves to another Wi-Fi, a link stalls), the session detaches, this module
//! dials the proxy again and resumes it, and the streams (a running ssh session) carry on
//! where they stopped. Past the grace period the session ends and its streams fail with the
//! reason.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use config::HostPort;
use tunnel::control::ALPN_SESSION;
use tunnel::mux::{self, DriveOutcome, Tunnel};

use crate::net;

/// Resume grace of the user's leg unless `--resume-grace` says otherwise: the proxy's default
/// `resume.grace`. The shorter of the two sides' graces is the one that counts.
pub const DEFAULT_RESUME_GRACE: Duration = Duration::from_secs(30);

/// Keepalive of the user's leg: a dead connection is noticed after interval × count, so the
/// user waits that long before the reconnect; a PING every 3 s costs nothing.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(3);
/// See [`KEEPALIVE_INTERVAL`].
pub const KEEPALIVE_COUNT: u32 = 3;

/// First wait between reconnect attempts; doubles up to [`RECONNECT_MAX_DELAY`].
const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(200);
/// Longest wait between reconnect attempts.
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(2);
/// A pause shorter than this goes unmentioned: a message in the middle of a full-screen
/// program is worse than a short freeze.
const QUIET_PAUSE: Duration = Duration::from_secs(2);

/// Where to dial again.
#[derive(Clone, Debug)]
pub struct Dial {
    /// The proxy's user address.
    pub proxy: HostPort,
    /// TLS with the user's certificate and ALPN_SESSION.
    pub tls: Arc<rustls::ClientConfig>,
}

/// Runs the session over `driver`'s connection and every later one until the session ends:
/// each time the connection is lost and the session is detached, dials again (with a growing
/// pause) and resumes it, until the grace period ends the session. Returns how the last
/// connection ended, or `None` when the grace period ran out while dialling.
pub async fn keep_connected(
    tunnel: Tunnel,
    mut driver: monoio::task::JoinHandle<DriveOutcome>,
    dial: Dial,
) -> Option<DriveOutcome> {
    loop {
        let outcome = driver.await;
        if !tunnel.is_detached() {
            return Some(outcome);
        }
        // A silent connection was noticed by the keepalive: the user has been waiting for
        // interval x count already, so say so at once.
        let (why, paused) = match outcome {
            DriveOutcome::TransportLost(Some(e)) => (e.to_string(), Duration::ZERO),
            _ if tunnel.transport_went_silent() => {
                let silence = KEEPALIVE_INTERVAL * KEEPALIVE_COUNT;
                (format!("no answer for {}s", silence.as_secs()), silence)
            }
            _ => ("the proxy closed it".to_owned(), Duration::ZERO),
        };
        let conn = redial(&tunnel, &dial, &why, paused).await?;
        tunnel.reattach().ok()?;
        let driven = tunnel.clone();
        driver = monoio::spawn(async move { mux::drive(&driven, conn, BytesMut::new()).await });
    }
}

/// Dials the proxy until a connection is up, or the grace period ended the session (`None`).
/// `paused` is how long the session had been stalled already when the loss was noticed.
async fn redial(
    tunnel: &Tunnel,
    dial: &Dial,
    why: &str,
    paused: Duration,
) -> Option<tunnel::tls::TlsConnection> {
    let lost = Instant::now()
        .checked_sub(paused)
        .unwrap_or_else(Instant::now);
    let mut told = false;
    let mut delay = RECONNECT_MIN_DELAY;
    loop {
        tunnel.tick(); // ends the session once the grace period is over
        if tunnel.is_ended() {
            if told {
                say("could not reconnect within the resume grace; the session is over");
            }
            return None;
        }
        if !told && lost.elapsed() >= QUIET_PAUSE {
            say(&format!(
                "connection to the proxy {} lost ({why}); reconnecting",
                dial.proxy
            ));
            told = true;
        }
        let attempt = monoio::select! {
            conn = net::connect(&dial.proxy, dial.tls.clone(), ALPN_SESSION) => Some(conn),
            _ = tunnel.expire_while_detached() => None,
        };
        match attempt {
            Some(Ok(conn)) => {
                if told {
                    say(&format!(
                        "reconnected after {:.1}s; resuming",
                        lost.elapsed().as_secs_f64()
                    ));
                }
                return Some(conn);
            }
            Some(Err(_)) => {
                monoio::select! {
                    _ = monoio::time::sleep(delay) => {}
                    _ = tunnel.expire_while_detached() => {}
                }
                delay = (delay * 2).min(RECONNECT_MAX_DELAY);
            }
            None => {}
        }
    }
}

/// One line on stderr, which ssh shows in the user's terminal; the terminal may be in raw
/// mode (an interactive session), where a line needs its carriage return.
fn say(text: &str) {
    let mut err = std::io::stderr().lock();
    let end = if err.is_terminal() { "\r\n" } else { "\n" };
    let _ = write!(err, "remoteler: {text}{end}");
}
