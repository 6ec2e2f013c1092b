//! Resumption on the proxy's side: a session (an agent's tunnel or a user's connection) whose
//! connection was lost waits, detached, for its peer to come back over a new connection within
//! `resume.grace`. The task that served the session keeps owning it; the task of the peer's
//! new connection hands the connection over instead of starting a new session, so the streams
//! (users' ssh sessions) carry on.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::poll_fn;
use std::hash::Hash;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{Mutex, PoisonError};
use std::task::{Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use tunnel::mux::Tunnel;
use tunnel::tls::TlsConnection;

/// A new connection handed to the task that owns a detached session: the connection, what
/// was read from it already (the peer's HELLO), and the peer's address.
pub(super) type Transport = (TlsConnection, BytesMut, SocketAddr);

/// How long a reconnecting peer waits for its old connection to be given up (see
/// [`take_over`]): the serving task notices in its next turn, this is only a bound.
const TAKEOVER_WAIT: Duration = Duration::from_secs(2);

/// A session whose connection was lost, waiting for its peer to resume it.
pub struct Detached {
    /// The detached session.
    pub tunnel: Tunnel,
    /// Whose it is (a node's name, or a user's `name@cluster`): only a connection with the
    /// same certificate identity may resume it.
    owner: String,
    slot: RefCell<Option<Transport>>,
    /// Why it will not be resumed, once [`Detached::cancel`] or [`Detached::replace`] was
    /// called; for the disconnect record, which otherwise blames the grace period.
    cancelled: RefCell<Option<Cancelled>>,
    waker: RefCell<Option<Waker>>,
}

/// Why a detached session stopped waiting before its grace period ended.
#[derive(Debug, Clone)]
struct Cancelled {
    why: String,
    /// A new session of the same peer took its place.
    replaced: bool,
}

impl std::fmt::Debug for Detached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detached")
            .field("tunnel", &self.tunnel)
            .field("cancelled", &self.cancelled.borrow())
            .finish_non_exhaustive()
    }
}

impl Detached {
    fn new(tunnel: Tunnel, owner: String) -> Self {
        Detached {
            tunnel,
            owner,
            slot: RefCell::new(None),
            cancelled: RefCell::new(None),
            waker: RefCell::new(None),
        }
    }

    /// Whether `owner`, whose HELLO names session `id`, may resume this one.
    pub(super) fn resumable_by(&self, id: [u8; 16], owner: &str) -> bool {
        self.owner == owner && self.tunnel.is_detached() && self.tunnel.peer_id() == Some(id)
    }

    pub(super) fn hand_over(&self, transport: Transport) {
        *self.slot.borrow_mut() = Some(transport);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Stops waiting: the session will not be resumed (the node was removed, or the proxy
    /// drains); `why` ends up in the disconnect record.
    pub fn cancel(&self, why: &str) {
        self.stop_waiting(Cancelled {
            why: why.to_owned(),
            replaced: false,
        });
    }

    /// Stops waiting because a new session of the same peer replaces this one.
    pub(super) fn replace(&self, why: &str) {
        self.stop_waiting(Cancelled {
            why: why.to_owned(),
            replaced: true,
        });
    }

    fn cancelled(&self) -> Option<Cancelled> {
        self.cancelled.borrow().clone()
    }

    fn stop_waiting(&self, cancelled: Cancelled) {
        *self.cancelled.borrow_mut() = Some(cancelled);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// The new connection, or `None` once cancelled or expired (the grace period ended it).
    async fn wait(&self) -> Option<Transport> {
        let handed_over = poll_fn(|cx| {
            if let Some(t) = self.slot.borrow_mut().take() {
                return Poll::Ready(Some(t));
            }
            if self.cancelled.borrow().is_some() {
                return Poll::Ready(None);
            }
            *self.waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        });
        monoio::select! {
            next = handed_over => next,
            _ = self.tunnel.expire_while_detached() => None,
        }
    }
}

/// Waits, detached, for the peer of `tunnel` (`owner`) to come back: registered under `key` in
/// `waiting` (where the peer's next connection looks for it) until a connection is handed
/// over, the wait is cancelled, or the grace period ends the session. The error says why it
/// was not resumed, for the disconnect record; with it, whether a new session replaced it.
pub(super) async fn await_resume<K: Hash + Eq + Clone>(
    waiting: &RefCell<HashMap<K, Rc<Detached>>>,
    key: K,
    tunnel: &Tunnel,
    owner: &str,
    reason: &str,
    grace: Duration,
) -> Result<Transport, (String, bool)> {
    let detached = Rc::new(Detached::new(tunnel.clone(), owner.to_owned()));
    waiting.borrow_mut().insert(key.clone(), detached.clone());
    let next = Box::pin(detached.wait()).await;
    {
        let mut waiting = waiting.borrow_mut();
        if waiting.get(&key).is_some_and(|w| Rc::ptr_eq(w, &detached)) {
            waiting.remove(&key);
        }
    }
    next.ok_or_else(|| match detached.cancelled() {
        Some(c) => (format!("{reason}; not resumed: {}", c.why), c.replaced),
        None => (
            format!("{reason}; not resumed within resume.grace ({grace:?})"),
            false,
        ),
    })
}

/// Finds the session a reconnecting peer asks to resume: detached already (`detached`
/// looks it up), or still attached to a connection this side has not seen fail yet. A link
/// that died without FIN or RST is noticed only by the keepalives, and the peer's may fire
/// first: the peer proving it holds the session (its id, over a connection with the same
/// certificate) says the old connection is dead, so it is given up and the session detaches
/// at once instead of being lost to a new one.
pub(super) async fn take_over(
    detached: impl Fn() -> Option<Rc<Detached>>,
    attached: Option<Tunnel>,
) -> Option<Rc<Detached>> {
    if let Some(waiting) = detached() {
        return Some(waiting);
    }
    let attached = attached?;
    attached.abandon_transport();
    let found = monoio::time::timeout(TAKEOVER_WAIT, async {
        loop {
            if let Some(waiting) = detached() {
                return Some(waiting);
            }
            if attached.is_ended() {
                return None;
            }
            monoio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    found.ok().flatten()
}

/// A user's connection or a leaf cluster's tunnel as its peer names it: whose it is (the
/// certificate's kind, name and cluster) and the peer's session id. Peers choose their ids,
/// so an id alone names nothing: another peer sending the same id must not find, replace or
/// move this one's session.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct SessionKey {
    kind: tunnel::identity::IdentityKind,
    name: String,
    cluster: String,
    id: [u8; 16],
}

impl SessionKey {
    pub(super) fn new(peer: &tunnel::identity::PeerIdentity, id: [u8; 16]) -> Self {
        SessionKey {
            kind: peer.kind,
            name: peer.name.clone(),
            cluster: peer.cluster.clone(),
            id,
        }
    }
}

/// Which core serves each user connection and leaf cluster tunnel, by its [`SessionKey`]: a
/// peer that reconnects to resume lands on any core and is moved to the one that holds its
/// session.
/// Touched once when a user connection starts and once when it ends.
#[derive(Debug, Default)]
pub struct SessionHomes {
    cores: Mutex<HashMap<SessionKey, usize>>,
}

impl SessionHomes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionKey, usize>> {
        self.cores.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records that core `core` serves the session `key`.
    pub(super) fn insert(&self, key: SessionKey, core: usize) {
        self.lock().insert(key, core);
    }

    /// Forgets `key`, if core `core` still serves it.
    pub(super) fn remove(&self, key: &SessionKey, core: usize) {
        let mut cores = self.lock();
        if cores.get(key) == Some(&core) {
            cores.remove(key);
        }
    }

    /// The core serving the session `key`.
    pub(super) fn core_of(&self, key: &SessionKey) -> Option<usize> {
        self.lock().get(key).copied()
    }
}
