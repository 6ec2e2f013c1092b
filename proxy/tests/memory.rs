//! Memory under a hostile window: a peer that announces a 4 GiB window in its HELLO and never
//! reads must not make the proxy pull the other leg's bytes into memory. The proxy takes no
//! more credit than its own window (`flow.window`, 1 MiB by default) and the splice stops
//! reading the other leg while a write waits for credit, so the talking side's stream stops
//! getting credit after about two windows: one queued toward the hostile peer, one unread
//! from the talking side. These tests watch the talking side's writes stall, not the proxy's
//! RSS (that figure is in docs/benchmarks.md, "Memory under a hostile window").

#![allow(clippy::unwrap_used)]

mod common;

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use frame::Role;
use tunnel::mux::{MuxStream, Tunnel};

/// The proxy's window (`flow.window` default).
const WINDOW: u64 = 1 << 20;
/// What the talking side may get credit for: a window queued toward the hostile peer, a
/// window unread from the talking side, and the chunk the splice holds between the two.
const BOUND: u64 = 2 * WINDOW + 64 * 1024;
/// Writes that have not moved for this long have stalled: three of the proxy's keepalive
/// ticks (1 s in this test's configuration), each of which flushes owed credit.
const QUIET: Duration = Duration::from_secs(3);

/// Writes 16 KiB chunks to `stream` for as long as it takes them, counting what it took.
async fn talk(stream: MuxStream, written: Rc<Cell<u64>>) {
    let chunk = Bytes::from(vec![0x5a; 16 * 1024]);
    while stream.write(chunk.clone()).await.is_ok() {
        written.set(written.get() + chunk.len() as u64);
    }
}

/// Waits until `written` passes `BOUND` or stops moving for `QUIET`; returns its value then.
async fn until_stalled(written: &Cell<u64>) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut last, mut since) = (written.get(), Instant::now());
    loop {
        monoio::time::sleep(Duration::from_millis(100)).await;
        let now = written.get();
        if now > BOUND {
            return now;
        }
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() >= QUIET && now > 0 {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "writes neither stalled nor passed {BOUND} bytes: {now}"
        );
    }
}

/// A proxy with a 1 s keepalive, user alice and an agent for node-r1 with `agent_config`.
async fn setup(proxy: &Proxy, agent_config: frame::SessionConfig) -> (Tunnel, Credential) {
    proxy.add_user("alice", "correct horse");
    let token = proxy.token(&["--ttl", "15m"]);
    let cred = join(proxy, &token, "node-r1").await.unwrap();
    let agent = agent_with(proxy, &cred, "node-r1", agent_config).await;
    let user = login(proxy, "alice", "correct horse").await.unwrap();
    (agent, user)
}

/// Opens a stream to node-r1 as a user with `config`, retrying while the directory has not
/// yet learned of the node (right after the ANNOUNCE).
async fn open_retrying(
    proxy: &Proxy,
    user: &Credential,
    config: &frame::SessionConfig,
) -> (
    Tunnel,
    MuxStream,
    monoio::task::JoinHandle<tunnel::mux::DriveOutcome>,
) {
    for _ in 0..50 {
        match open_hostile(proxy, user, "node-r1", config.clone()).await {
            Ok(opened) => return opened,
            Err(_) => monoio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    panic!("OPEN to node-r1 kept failing");
}

/// A user announcing `initial_window = u32::MAX` who never reads (so never sends WINDOW)
/// opens a stream to a node that talks fast: the node's writes stall after about two of the
/// proxy's windows, and stay stalled once the user's connection is gone and the session
/// waits, detached, for it to resume.
#[test]
fn a_hostile_users_window_does_not_pull_a_talking_node_into_the_proxy() {
    let proxy = Proxy::start(Some(""));
    block_on(async {
        let (agent, user) = setup(&proxy, dialer_config(Role::Agent)).await;
        let written = Rc::new(Cell::new(0));
        let counter = written.clone();
        monoio::spawn(async move {
            while let Some(incoming) = agent.incoming().await {
                let stream = incoming.accept().unwrap();
                monoio::spawn(talk(stream, counter.clone()));
            }
        });

        let mut hostile = dialer_config(Role::Client);
        hostile.initial_window = u32::MAX;
        let (user_tunnel, _never_read, driver) = open_retrying(&proxy, &user, &hostile).await;
        let stalled = until_stalled(&written).await;
        assert!(
            stalled <= BOUND,
            "the node wrote {stalled} bytes into a user that reads nothing (bound {BOUND})"
        );
        assert!(
            stalled > WINDOW,
            "the node never got credit back ({stalled} bytes): the splice did not run"
        );

        // The user's connection goes; its session waits, detached, for a resume.
        user_tunnel.abandon_transport();
        let _ = driver.await;
        let detached = until_stalled(&written).await;
        assert!(
            detached <= BOUND,
            "while the user was detached the node wrote {detached} bytes (bound {BOUND})"
        );
    });
}

/// The same toward a hostile agent: it announces `initial_window = u32::MAX` and never
/// reads what the user sends; the user's writes stall after about two windows.
#[test]
fn a_hostile_agents_window_does_not_pull_a_users_upload_into_the_proxy() {
    let proxy = Proxy::start(Some(""));
    block_on(async {
        let mut hostile = dialer_config(Role::Agent);
        hostile.initial_window = u32::MAX;
        let (agent, user) = setup(&proxy, hostile).await;
        let held = Rc::new(std::cell::RefCell::new(Vec::new()));
        let keep = held.clone();
        monoio::spawn(async move {
            while let Some(incoming) = agent.incoming().await {
                keep.borrow_mut().push(incoming.accept().unwrap()); // never read
            }
        });

        let (_user_tunnel, stream, _driver) =
            open_retrying(&proxy, &user, &dialer_config(Role::Client)).await;
        let written = Rc::new(Cell::new(0));
        monoio::spawn(talk(stream, written.clone()));
        let stalled = until_stalled(&written).await;
        assert!(
            stalled <= BOUND,
            "the user wrote {stalled} bytes into an agent that reads nothing (bound {BOUND})"
        );
        assert!(
            stalled > WINDOW,
            "the user never got credit back ({stalled} bytes)"
        );
        assert_eq!(held.borrow().len(), 1);
    });
}

/// The proxy's configured default and the protocol crate's default are one number.
#[test]
fn the_memory_budget_default_is_the_protocols() {
    assert_eq!(
        config::DEFAULT_MAX_BUFFERED_PER_CONNECTION,
        frame::DEFAULT_MAX_BUFFERED
    );
}
