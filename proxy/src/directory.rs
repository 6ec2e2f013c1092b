//! The node directory: which nodes exist and how to reach each one.
//!
//! Three sources feed it: agents' tunnels (`via tunnel`), agents that register over the auth
//! listener to be dialled directly (`via direct`, online while their heartbeats are fresh), and
//! the static `[[nodes]]` of the configuration (`via direct`, always assumed reachable).
//! When a name has several, a live tunnel wins, then a fresh registration, then the static
//! entry.
//!
//! [`NodeDirectory`] is the interface the server uses; [`LocalDirectory`] is the one-core
//! implementation (a tunnel handle is an `Rc` and lives on the core that accepted it). A
//! thread-per-core proxy will put a shared *node → (core, tunnel id)* map behind the same
//! interface.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use config::{HostPort, StaticNode};
use serde::{Deserialize, Serialize};
use tunnel::mux::Tunnel;

/// A live tunnel as the directory holds it.
#[derive(Debug, Clone)]
pub struct TunnelEntry {
    /// Unique per proxy run; tells a replaced tunnel from its replacement.
    pub id: u64,
    /// The tunnel.
    pub tunnel: Tunnel,
    /// The agent's address.
    pub peer: Option<SocketAddr>,
    /// When it connected.
    pub since: SystemTime,
    /// Labels from the agent's ANNOUNCE.
    pub labels: Vec<(String, String)>,
    /// Services from the agent's ANNOUNCE.
    pub services: Vec<String>,
}

/// How to reach a node now.
#[derive(Debug, Clone)]
pub enum Route {
    /// Through the agent's tunnel.
    Tunnel(TunnelEntry),
    /// Dial its sshd at this address.
    Direct {
        /// Its sshd.
        address: HostPort,
        /// Labels from the configuration or the registration.
        labels: Vec<(String, String)>,
    },
    /// Known, but neither a tunnel nor a fresh registration is up.
    Offline {
        /// Since when.
        since: SystemTime,
        /// The labels it had when it was last seen.
        labels: Vec<(String, String)>,
    },
    /// No node of that name.
    Unknown,
}

impl Route {
    /// The node's labels, which roles match on; `None` for an unknown node.
    pub fn labels(&self) -> Option<&[(String, String)]> {
        match self {
            Route::Tunnel(entry) => Some(&entry.labels),
            Route::Direct { labels, .. } | Route::Offline { labels, .. } => Some(labels),
            Route::Unknown => None,
        }
    }
}

/// One node as `nodes ls` and the user API show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Name.
    pub name: String,
    /// `tunnel` or `direct`.
    pub via: String,
    /// Reachable now.
    pub online: bool,
    /// Labels.
    pub labels: Vec<(String, String)>,
    /// For direct nodes, the address dialled; for tunnel nodes, the agent's address.
    pub address: Option<String>,
    /// Tunnel: connected (or went offline) at; registered: last heartbeat; Unix seconds.
    pub since_unix: Option<u64>,
}

/// The directory interface (see the module documentation).
pub trait NodeDirectory {
    /// How to reach `node` now.
    fn route(&self, node: &str) -> Route;
    /// Every known node, sorted by name.
    fn list(&self) -> Vec<NodeRecord>;
    /// Records a tunnel for `node`; returns the tunnel it replaces, if any.
    fn attach_tunnel(&self, node: &str, entry: TunnelEntry) -> Option<TunnelEntry>;
    /// Updates the labels and services of `node`'s tunnel `id`.
    fn update_tunnel(
        &self,
        node: &str,
        id: u64,
        labels: Vec<(String, String)>,
        services: Vec<String>,
    );
    /// Marks `node` offline if its tunnel is still tunnel `id` (a reconnect may have replaced
    /// it); returns whether it did.
    fn detach_tunnel(&self, node: &str, id: u64) -> bool;
    /// Records a heartbeat of a directly dialled node.
    fn register_direct(
        &self,
        node: &str,
        address: HostPort,
        labels: Vec<(String, String)>,
        ttl: Duration,
    );
    /// Every live tunnel (for draining).
    fn tunnels(&self) -> Vec<Tunnel>;
    /// How many tunnels are up.
    fn tunnel_count(&self) -> usize;
    /// A new tunnel id.
    fn next_tunnel_id(&self) -> u64;
}

#[derive(Debug)]
struct Registered {
    address: HostPort,
    labels: Vec<(String, String)>,
    expires: Instant,
    last_seen: SystemTime,
}

#[derive(Debug)]
struct OfflineTunnel {
    since: SystemTime,
    labels: Vec<(String, String)>,
}

/// The one-core directory.
#[derive(Debug, Default)]
pub struct LocalDirectory {
    static_nodes: Vec<StaticNode>,
    tunnels: RefCell<HashMap<String, TunnelEntry>>,
    offline: RefCell<HashMap<String, OfflineTunnel>>,
    registered: RefCell<HashMap<String, Registered>>,
    ids: Cell<u64>,
}

impl LocalDirectory {
    /// A directory that knows the static nodes of the configuration.
    pub fn new(static_nodes: Vec<StaticNode>) -> Self {
        LocalDirectory {
            static_nodes,
            ..Default::default()
        }
    }
}

fn labels_of(node: &StaticNode) -> Vec<(String, String)> {
    node.labels
        .iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

impl NodeDirectory for LocalDirectory {
    fn route(&self, node: &str) -> Route {
        if let Some(entry) = self.tunnels.borrow().get(node) {
            if !entry.tunnel.is_ended() {
                return Route::Tunnel(entry.clone());
            }
        }
        let now = Instant::now();
        let mut offline_since = None;
        let mut offline_labels = Vec::new();
        if let Some(reg) = self.registered.borrow().get(node) {
            if reg.expires > now {
                return Route::Direct {
                    address: reg.address.clone(),
                    labels: reg.labels.clone(),
                };
            }
            offline_since = Some(reg.last_seen);
            offline_labels = reg.labels.clone();
        }
        if let Some(node) = self.static_nodes.iter().find(|n| n.name.as_str() == node) {
            return Route::Direct {
                address: node.address.clone(),
                labels: labels_of(node),
            };
        }
        if let Some(off) = self.offline.borrow().get(node) {
            if offline_since.is_none_or(|s| off.since > s) {
                offline_labels = off.labels.clone();
            }
            offline_since = Some(offline_since.map_or(off.since, |s: SystemTime| s.max(off.since)));
        }
        match offline_since {
            Some(since) => Route::Offline {
                since,
                labels: offline_labels,
            },
            None => Route::Unknown,
        }
    }

    fn list(&self) -> Vec<NodeRecord> {
        let mut out: BTreeMap<String, NodeRecord> = BTreeMap::new();
        for node in &self.static_nodes {
            out.insert(
                node.name.to_string(),
                NodeRecord {
                    name: node.name.to_string(),
                    via: "direct".into(),
                    online: true,
                    labels: labels_of(node),
                    address: Some(node.address.to_string()),
                    since_unix: None,
                },
            );
        }
        for (name, off) in self.offline.borrow().iter() {
            out.insert(
                name.clone(),
                NodeRecord {
                    name: name.clone(),
                    via: "tunnel".into(),
                    online: false,
                    labels: off.labels.clone(),
                    address: None,
                    since_unix: Some(crate::util::unix_secs(off.since)),
                },
            );
        }
        let now = Instant::now();
        for (name, reg) in self.registered.borrow().iter() {
            let online = reg.expires > now;
            if !online && out.get(name).is_some_and(|r| r.online) {
                continue;
            }
            out.insert(
                name.clone(),
                NodeRecord {
                    name: name.clone(),
                    via: "direct".into(),
                    online,
                    labels: reg.labels.clone(),
                    address: Some(reg.address.to_string()),
                    since_unix: Some(crate::util::unix_secs(reg.last_seen)),
                },
            );
        }
        for (name, entry) in self.tunnels.borrow().iter() {
            out.insert(
                name.clone(),
                NodeRecord {
                    name: name.clone(),
                    via: "tunnel".into(),
                    online: !entry.tunnel.is_ended(),
                    labels: entry.labels.clone(),
                    address: entry.peer.map(|p| p.to_string()),
                    since_unix: Some(crate::util::unix_secs(entry.since)),
                },
            );
        }
        out.into_values().collect()
    }

    fn attach_tunnel(&self, node: &str, entry: TunnelEntry) -> Option<TunnelEntry> {
        self.offline.borrow_mut().remove(node);
        self.tunnels.borrow_mut().insert(node.to_owned(), entry)
    }

    fn update_tunnel(
        &self,
        node: &str,
        id: u64,
        labels: Vec<(String, String)>,
        services: Vec<String>,
    ) {
        if let Some(entry) = self.tunnels.borrow_mut().get_mut(node) {
            if entry.id == id {
                entry.labels = labels;
                entry.services = services;
            }
        }
    }

    fn detach_tunnel(&self, node: &str, id: u64) -> bool {
        let mut tunnels = self.tunnels.borrow_mut();
        if tunnels.get(node).is_some_and(|e| e.id == id) {
            if let Some(entry) = tunnels.remove(node) {
                self.offline.borrow_mut().insert(
                    node.to_owned(),
                    OfflineTunnel {
                        since: SystemTime::now(),
                        labels: entry.labels,
                    },
                );
            }
            return true;
        }
        false
    }

    fn register_direct(
        &self,
        node: &str,
        address: HostPort,
        labels: Vec<(String, String)>,
        ttl: Duration,
    ) {
        self.registered.borrow_mut().insert(
            node.to_owned(),
            Registered {
                address,
                labels,
                expires: Instant::now() + ttl,
                last_seen: SystemTime::now(),
            },
        );
    }

    fn tunnels(&self) -> Vec<Tunnel> {
        self.tunnels
            .borrow()
            .values()
            .map(|e| e.tunnel.clone())
            .collect()
    }

    fn tunnel_count(&self) -> usize {
        self.tunnels.borrow().len()
    }

    fn next_tunnel_id(&self) -> u64 {
        let id = self.ids.get() + 1;
        self.ids.set(id);
        id
    }
}
