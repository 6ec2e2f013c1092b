//! The node directory: which nodes exist and how to reach each one.
//!
//! Three sources feed it: agents' tunnels (`via tunnel`), agents that register over the auth
//! listener to be dialled directly (`via direct`, online while their heartbeats are fresh), and
//! the static `[[nodes]]` of the configuration (`via direct`, always assumed reachable).
//! When a name has several, a live tunnel wins, then a fresh registration, then the static
//! entry.
//!
//! Thread-per-core: every tunnel of a node lives on the node's *owner core*
//! ([`NodeDirectory::owner_core`], a hash of the name), so the sessions to it, its
//! replacement by a newer tunnel and its resumption never cross threads. The
//! [`NodeDirectory`] is the only structure the cores share: *node → (core, tunnel id,
//! inventory)* behind one mutex, taken for rare events (a tunnel comes or goes, a session
//! starts, a listing). Each core's [`CoreDirectory`] adds the tunnel handles it owns (a
//! [`Tunnel`] is an `Rc` and never leaves its core), by tunnel id and nothing else: a
//! tunnel's name, labels and services are kept once, in the shared map (tens of thousands of
//! idle tunnels, each copy a few hundred bytes).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
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
    /// Its tunnel is served by another core of this proxy (a user connection that asks for
    /// nodes of two cores; see `docs/protocol.md`).
    OtherCore {
        /// That core.
        core: usize,
        /// The node's labels.
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
            Route::Direct { labels, .. }
            | Route::Offline { labels, .. }
            | Route::OtherCore { labels, .. } => Some(labels),
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

fn labels_of(node: &StaticNode) -> Vec<(String, String)> {
    node.labels
        .iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// What every core sees of a live tunnel.
#[derive(Debug, Clone)]
struct TunnelInfo {
    core: usize,
    id: u64,
    peer: Option<SocketAddr>,
    since: SystemTime,
    labels: Vec<(String, String)>,
    services: Vec<String>,
}

impl TunnelInfo {
    fn entry(&self, tunnel: Tunnel) -> TunnelEntry {
        TunnelEntry {
            id: self.id,
            tunnel,
            peer: self.peer,
            since: self.since,
            labels: self.labels.clone(),
            services: self.services.clone(),
        }
    }
}

#[derive(Debug, Default)]
struct Entries {
    tunnels: HashMap<String, TunnelInfo>,
    offline: HashMap<String, OfflineTunnel>,
    registered: HashMap<String, Registered>,
    /// Removed nodes whose tunnel may still be closing: not listed offline when it ends.
    forgotten: std::collections::HashSet<String>,
    clusters: HashMap<String, LeafEntry>,
}

/// One cluster tunnel of a leaf, as every core sees it. A leaf proxy keeps one per core of
/// its own, each announcing the leaf nodes that core owns.
#[derive(Debug, Clone)]
struct ClusterTunnelInfo {
    core: usize,
    id: u64,
    peer: SocketAddr,
    since: SystemTime,
    nodes: Vec<frame::NodeInfo>,
    /// Last time the tunnel was seen alive (its keepalive closes it after missed pings).
    heartbeat: SystemTime,
    rtt: Option<Duration>,
}

/// A trusted leaf cluster's tunnels (root side).
#[derive(Debug, Default)]
struct LeafEntry {
    tunnels: Vec<ClusterTunnelInfo>,
    last_seen: Option<SystemTime>,
}

/// How to reach a node of a trusted leaf cluster (root side).
#[derive(Debug, Clone)]
pub enum ClusterRoute {
    /// Through this core's tunnel of the leaf.
    Tunnel(Tunnel),
    /// The tunnel that announced the node is served by another core.
    OtherCore(usize),
    /// The leaf announces the node but says it is offline.
    NodeOffline,
    /// The leaf is connected but announces no node of that name.
    NodeUnknown,
    /// No tunnel of the leaf is up (since when, if it was ever seen by this process).
    ClusterOffline(Option<SystemTime>),
}

/// One trusted leaf cluster as `clusters ls` and the user API show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRecord {
    /// The leaf's name.
    pub name: String,
    /// Whether a tunnel of it is up.
    pub online: bool,
    /// Tunnels up (one per core of the leaf proxy).
    pub tunnels: usize,
    /// Nodes announced.
    pub nodes: usize,
    /// Online: connected since (oldest tunnel); offline: last tunnel gone at; Unix seconds.
    pub since_unix: Option<u64>,
    /// The leaf's proxy address(es).
    pub peers: Vec<String>,
    /// Last time a tunnel of it was seen alive, Unix seconds.
    pub last_heartbeat_unix: Option<u64>,
    /// Round-trip time of its newest tunnel's last keepalive, milliseconds.
    pub rtt_ms: Option<u64>,
}

/// The directory every core shares (see the module documentation).
#[derive(Debug)]
pub struct NodeDirectory {
    static_nodes: Vec<StaticNode>,
    cores: usize,
    entries: Mutex<Entries>,
    ids: AtomicU64,
}

impl NodeDirectory {
    /// A directory for `cores` cores that knows the static nodes of the configuration.
    pub fn new(static_nodes: Vec<StaticNode>, cores: usize) -> Self {
        NodeDirectory {
            static_nodes,
            cores: cores.max(1),
            entries: Mutex::new(Entries::default()),
            ids: AtomicU64::new(0),
        }
    }

    /// The core that serves `node`'s tunnel and the sessions to it. Stable for the life of
    /// the process (std's `DefaultHasher::new()` has fixed keys).
    pub fn owner_core(&self, node: &str) -> usize {
        let mut hasher = std::hash::DefaultHasher::new();
        node.hash(&mut hasher);
        (hasher.finish() % self.cores as u64) as usize
    }

    /// How many cores share it.
    pub fn cores(&self) -> usize {
        self.cores
    }

    fn lock(&self) -> MutexGuard<'_, Entries> {
        // Every update leaves the maps consistent, so a panic elsewhere cannot leave them torn.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every known node, sorted by name.
    pub fn list(&self) -> Vec<NodeRecord> {
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
        let entries = self.lock();
        for (name, off) in &entries.offline {
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
        for (name, reg) in &entries.registered {
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
        for (name, info) in &entries.tunnels {
            out.insert(
                name.clone(),
                NodeRecord {
                    name: name.clone(),
                    via: "tunnel".into(),
                    online: true,
                    labels: info.labels.clone(),
                    address: info.peer.map(|p| p.to_string()),
                    since_unix: Some(crate::util::unix_secs(info.since)),
                },
            );
        }
        out.into_values().collect()
    }

    /// Records a heartbeat of a directly dialled node, unless the name belongs to another
    /// route: a static `[[nodes]]` entry, a live tunnel, or a tunnel lost within `grace` (it
    /// may still resume). Returns why not.
    pub fn register_direct(
        &self,
        node: &str,
        address: HostPort,
        labels: Vec<(String, String)>,
        ttl: Duration,
        grace: Duration,
    ) -> Result<(), String> {
        if self.static_nodes.iter().any(|n| n.name.as_str() == node) {
            return Err(format!(
                "node {node} is a static `[[nodes]]` entry of the proxy's configuration; a \
                 registration cannot replace it (remove the entry, or give this agent another name)"
            ));
        }
        let mut entries = self.lock();
        if entries.tunnels.contains_key(node) {
            return Err(format!(
                "node {node} is connected through a tunnel; a registration cannot replace it"
            ));
        }
        if let Some(off) = entries.offline.get(node) {
            let lost = SystemTime::now()
                .duration_since(off.since)
                .unwrap_or_default();
            if lost < grace {
                return Err(format!(
                    "node {node}'s tunnel was lost {}s ago and may still resume (`resume.grace` \
                     {}s); a registration cannot replace it until then",
                    lost.as_secs(),
                    grace.as_secs()
                ));
            }
        }
        entries.registered.insert(
            node.to_owned(),
            Registered {
                address,
                labels,
                expires: Instant::now() + ttl,
                last_seen: SystemTime::now(),
            },
        );
        Ok(())
    }

    /// Forgets `node`'s offline record and registration (a removed node). Its live tunnel, if
    /// any, is closed by its core and then leaves the directory as usual.
    pub fn forget(&self, node: &str) {
        let mut entries = self.lock();
        entries.offline.remove(node);
        entries.registered.remove(node);
        if entries.tunnels.contains_key(node) {
            entries.forgotten.insert(node.to_owned());
        }
    }

    /// Why `node` is taken in this proxy, if it is: a static `[[nodes]]` entry, a live tunnel,
    /// a tunnel that went offline (it may be detached, waiting to resume; `nodes rm` forgets
    /// it), or a registration for direct dialling. A join for a taken name needs the
    /// operator's consent (a `--replace` token) unless it comes with the name's own key.
    pub fn name_in_use(&self, node: &str) -> Option<String> {
        if self.static_nodes.iter().any(|n| n.name.as_str() == node) {
            return Some("it is a static node (`[[nodes]]` in the proxy configuration)".into());
        }
        let entries = self.lock();
        if let Some(info) = entries.tunnels.get(node) {
            // No addresses: the answer goes to a peer that has not joined yet.
            return Some(format!(
                "it has a live tunnel since {}",
                crate::util::rfc3339_unix(crate::util::unix_secs(info.since))
            ));
        }
        if let Some(off) = entries.offline.get(node) {
            return Some(format!(
                "its tunnel went offline at {} and may resume",
                crate::util::rfc3339_unix(crate::util::unix_secs(off.since))
            ));
        }
        if let Some(reg) = entries.registered.get(node) {
            return Some(format!(
                "it is registered for direct dialling (last heartbeat {})",
                crate::util::rfc3339_unix(crate::util::unix_secs(reg.last_seen))
            ));
        }
        None
    }

    /// How many agents' tunnels are up, on every core.
    pub fn tunnel_count(&self) -> usize {
        self.lock().tunnels.len()
    }

    /// How many tunnels the proxy holds, agents' and leaf clusters', on every core: what
    /// `limits.max_tunnels` caps.
    pub fn held_tunnel_count(&self) -> usize {
        let entries = self.lock();
        entries.tunnels.len()
            + entries
                .clusters
                .values()
                .map(|l| l.tunnels.len())
                .sum::<usize>()
    }

    /// How many tunnels leaf cluster `leaf` holds, on every core.
    pub fn cluster_tunnel_count(&self, leaf: &str) -> usize {
        self.lock()
            .clusters
            .get(leaf)
            .map_or(0, |l| l.tunnels.len())
    }

    /// Live tunnels per core.
    pub fn tunnels_per_core(&self) -> Vec<usize> {
        let mut counts = vec![0; self.cores];
        for info in self.lock().tunnels.values() {
            if let Some(c) = counts.get_mut(info.core) {
                *c += 1;
            }
        }
        counts
    }

    /// The core holding the leaf tunnel that announced `node` of cluster `leaf` (the newest
    /// such tunnel, preferring one that says the node is online).
    pub fn cluster_owner(&self, leaf: &str, node: &str) -> Option<usize> {
        let entries = self.lock();
        best_cluster_tunnel(entries.clusters.get(leaf)?, node).map(|(t, _)| t.core)
    }

    /// Every leaf cluster with a tunnel now or earlier in this run, sorted by name.
    pub fn clusters(&self) -> Vec<ClusterRecord> {
        let entries = self.lock();
        let mut out: Vec<ClusterRecord> = entries
            .clusters
            .iter()
            .map(|(name, leaf)| {
                let mut nodes: Vec<&str> = leaf
                    .tunnels
                    .iter()
                    .flat_map(|t| t.nodes.iter().map(|n| n.name.as_str()))
                    .collect();
                nodes.sort_unstable();
                nodes.dedup();
                let since = if leaf.tunnels.is_empty() {
                    leaf.last_seen
                } else {
                    leaf.tunnels.iter().map(|t| t.since).min()
                };
                ClusterRecord {
                    name: name.clone(),
                    online: !leaf.tunnels.is_empty(),
                    tunnels: leaf.tunnels.len(),
                    nodes: nodes.len(),
                    since_unix: since.map(crate::util::unix_secs),
                    peers: {
                        let mut p: Vec<String> =
                            leaf.tunnels.iter().map(|t| t.peer.to_string()).collect();
                        p.sort();
                        p.dedup();
                        p
                    },
                    last_heartbeat_unix: leaf
                        .tunnels
                        .iter()
                        .map(|t| t.heartbeat)
                        .max()
                        .or(leaf.last_seen)
                        .map(crate::util::unix_secs),
                    rtt_ms: leaf
                        .tunnels
                        .iter()
                        .max_by_key(|t| t.id)
                        .and_then(|t| t.rtt)
                        .map(|d| d.as_millis() as u64),
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The nodes leaf cluster `leaf` announces; `None` when no tunnel of it is up.
    pub fn cluster_nodes(&self, leaf: &str) -> Option<Vec<NodeRecord>> {
        let entries = self.lock();
        let entry = entries
            .clusters
            .get(leaf)
            .filter(|l| !l.tunnels.is_empty())?;
        let mut out: BTreeMap<String, NodeRecord> = BTreeMap::new();
        let mut tunnels: Vec<&ClusterTunnelInfo> = entry.tunnels.iter().collect();
        tunnels.sort_by_key(|t| t.id); // newer tunnels win
        for t in tunnels {
            for n in &t.nodes {
                out.insert(
                    n.name.clone(),
                    NodeRecord {
                        name: n.name.clone(),
                        via: if n.tunnel { "tunnel" } else { "direct" }.into(),
                        online: n.online,
                        labels: n.labels.clone(),
                        address: None,
                        since_unix: None,
                    },
                );
            }
        }
        Some(out.into_values().collect())
    }

    /// A new tunnel id, unique in the process.
    pub fn next_tunnel_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// What one leaf cluster may hold in the root's directory.
#[derive(Debug, Clone, Copy)]
pub struct LeafCaps {
    /// `limits.max_tunnels_per_cluster`.
    pub tunnels: usize,
    /// `limits.max_announced_nodes`, over all the leaf's tunnels.
    pub nodes: usize,
}

fn too_many_nodes(leaf: &str, announced: usize, more: usize, max: usize) -> String {
    format!(
        "leaf cluster {leaf} would announce {} nodes ({announced} on its other tunnels and {more} \
         on this one), more than `limits.max_announced_nodes` ({max})",
        announced + more
    )
}

fn best_cluster_tunnel<'a>(
    leaf: &'a LeafEntry,
    node: &str,
) -> Option<(&'a ClusterTunnelInfo, &'a frame::NodeInfo)> {
    leaf.tunnels
        .iter()
        .filter_map(|t| t.nodes.iter().find(|n| n.name == node).map(|n| (t, n)))
        .max_by_key(|(t, n)| (n.online, t.id))
}

/// One core's view: the shared directory plus the tunnel handles this core owns.
#[derive(Debug)]
pub struct CoreDirectory {
    shared: Arc<NodeDirectory>,
    core: usize,
    /// Agents' tunnels served by this core, by tunnel id; the rest of each entry is the
    /// shared map's [`TunnelInfo`].
    local: RefCell<HashMap<u64, Tunnel>>,
    /// Leaf clusters' tunnels served by this core, by tunnel id.
    cluster_local: RefCell<HashMap<u64, Tunnel>>,
    /// Streams each user holds through each tunnel of this core (every stream of a tunnel is
    /// opened on the tunnel's core), for `limits.max_streams_per_user_per_node`.
    stream_slots: Rc<RefCell<HashMap<SlotKey, u32>>>,
}

/// (user@cluster, node or `cluster:LEAF`): whose streams through which tunnel.
type SlotKey = (String, String);

/// One stream a user holds through a tunnel; gives its slot back when dropped.
#[derive(Debug)]
pub struct StreamSlot {
    slots: Rc<RefCell<HashMap<SlotKey, u32>>>,
    key: SlotKey,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut slots = self.slots.borrow_mut();
        if let Some(held) = slots.get_mut(&self.key) {
            *held -= 1;
            if *held == 0 {
                slots.remove(&self.key);
            }
        }
    }
}

impl std::ops::Deref for CoreDirectory {
    type Target = NodeDirectory;
    fn deref(&self) -> &NodeDirectory {
        &self.shared
    }
}

impl CoreDirectory {
    /// Core `core`'s view of `shared`.
    pub fn new(shared: Arc<NodeDirectory>, core: usize) -> Self {
        CoreDirectory {
            shared,
            core,
            local: RefCell::new(HashMap::new()),
            cluster_local: RefCell::new(HashMap::new()),
            stream_slots: Rc::new(RefCell::new(HashMap::new())),
        }
    }

    /// A stream slot of `user` through the tunnel to `target` (a node, or `cluster:LEAF`), or
    /// `None` when the user already holds `max` there: one user cannot take every stream of
    /// a tunnel from the others.
    pub fn take_stream_slot(&self, user: &str, target: &str, max: u32) -> Option<StreamSlot> {
        let key = (user.to_owned(), target.to_owned());
        let mut slots = self.stream_slots.borrow_mut();
        let held = slots.entry(key.clone()).or_insert(0);
        if *held >= max {
            return None;
        }
        *held += 1;
        Some(StreamSlot {
            slots: self.stream_slots.clone(),
            key,
        })
    }

    /// How to reach `node` of leaf cluster `leaf` from this core (root side).
    pub fn cluster_route(&self, leaf: &str, node: &str) -> ClusterRoute {
        let entries = self.shared.lock();
        let Some(entry) = entries.clusters.get(leaf) else {
            return ClusterRoute::ClusterOffline(None);
        };
        if entry.tunnels.is_empty() {
            return ClusterRoute::ClusterOffline(entry.last_seen);
        }
        let Some((tunnel, info)) = best_cluster_tunnel(entry, node) else {
            return ClusterRoute::NodeUnknown;
        };
        if !info.online {
            return ClusterRoute::NodeOffline;
        }
        if tunnel.core != self.core {
            return ClusterRoute::OtherCore(tunnel.core);
        }
        match self.cluster_local.borrow().get(&tunnel.id) {
            Some(t) if !t.is_ended() => ClusterRoute::Tunnel(t.clone()),
            _ => ClusterRoute::ClusterOffline(Some(tunnel.since)),
        }
    }

    /// Records cluster tunnel `id` of leaf `leaf`, served by this core, and what it announced,
    /// unless the leaf would then hold more tunnels or announce more nodes than `caps` allow
    /// (checked and recorded under one lock, so tunnels on several cores cannot all pass).
    pub fn attach_cluster_tunnel(
        &self,
        leaf: &str,
        id: u64,
        peer: SocketAddr,
        tunnel: &Tunnel,
        nodes: Vec<frame::NodeInfo>,
        caps: LeafCaps,
    ) -> Result<(), String> {
        let mut entries = self.shared.lock();
        let entry = entries.clusters.entry(leaf.to_owned()).or_default();
        let others = entry.tunnels.iter().filter(|t| t.id != id);
        if others.clone().count() >= caps.tunnels {
            return Err(format!(
                "leaf cluster {leaf} already holds {} tunnels (`limits.max_tunnels_per_cluster`; \
                 a leaf opens one per worker of its own)",
                caps.tunnels
            ));
        }
        let announced: usize = others.map(|t| t.nodes.len()).sum();
        if announced + nodes.len() > caps.nodes {
            return Err(too_many_nodes(leaf, announced, nodes.len(), caps.nodes));
        }
        entry.tunnels.retain(|t| t.id != id);
        entry.tunnels.push(ClusterTunnelInfo {
            core: self.core,
            id,
            peer,
            since: SystemTime::now(),
            nodes,
            heartbeat: SystemTime::now(),
            rtt: None,
        });
        drop(entries);
        self.cluster_local.borrow_mut().insert(id, tunnel.clone());
        Ok(())
    }

    /// Records that cluster tunnel `id` of `leaf` is alive, with its round-trip time.
    pub fn cluster_heartbeat(&self, leaf: &str, id: u64, rtt: Option<Duration>) {
        let mut entries = self.shared.lock();
        if let Some(t) = entries
            .clusters
            .get_mut(leaf)
            .and_then(|l| l.tunnels.iter_mut().find(|t| t.id == id))
        {
            t.heartbeat = SystemTime::now();
            t.rtt = rtt;
        }
    }

    /// Replaces what cluster tunnel `id` of `leaf` announced, unless the leaf would then
    /// announce more than `max_nodes` nodes over all its tunnels.
    pub fn update_cluster_tunnel(
        &self,
        leaf: &str,
        id: u64,
        nodes: Vec<frame::NodeInfo>,
        max_nodes: usize,
    ) -> Result<(), String> {
        let mut entries = self.shared.lock();
        let Some(entry) = entries.clusters.get_mut(leaf) else {
            return Ok(());
        };
        let announced: usize = entry
            .tunnels
            .iter()
            .filter(|t| t.id != id)
            .map(|t| t.nodes.len())
            .sum();
        if announced + nodes.len() > max_nodes {
            return Err(too_many_nodes(leaf, announced, nodes.len(), max_nodes));
        }
        if let Some(t) = entry.tunnels.iter_mut().find(|t| t.id == id) {
            t.nodes = nodes;
        }
        Ok(())
    }

    /// Forgets cluster tunnel `id` of `leaf`.
    pub fn detach_cluster_tunnel(&self, leaf: &str, id: u64) {
        self.cluster_local.borrow_mut().remove(&id);
        let mut entries = self.shared.lock();
        if let Some(l) = entries.clusters.get_mut(leaf) {
            l.tunnels.retain(|t| t.id != id);
            l.last_seen = Some(SystemTime::now());
        }
    }

    /// How to reach `node` now, from this core.
    pub fn route(&self, node: &str) -> Route {
        let entries = self.shared.lock();
        if let Some(info) = entries.tunnels.get(node) {
            if info.core != self.core {
                return Route::OtherCore {
                    core: info.core,
                    labels: info.labels.clone(),
                };
            }
            if let Some(tunnel) = self.local.borrow().get(&info.id) {
                if !tunnel.is_ended() {
                    return Route::Tunnel(info.entry(tunnel.clone()));
                }
            }
        }
        // A static node is never shadowed by a registration (which is refused for its name
        // anyway).
        if let Some(node) = self
            .shared
            .static_nodes
            .iter()
            .find(|n| n.name.as_str() == node)
        {
            return Route::Direct {
                address: node.address.clone(),
                labels: labels_of(node),
            };
        }
        let now = Instant::now();
        let mut offline_since = None;
        let mut offline_labels = Vec::new();
        if let Some(reg) = entries.registered.get(node) {
            if reg.expires > now {
                return Route::Direct {
                    address: reg.address.clone(),
                    labels: reg.labels.clone(),
                };
            }
            offline_since = Some(reg.last_seen);
            offline_labels = reg.labels.clone();
        }
        if let Some(off) = entries.offline.get(node) {
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

    /// Records a tunnel of this core for `node`; returns the tunnel it replaces, if any.
    pub fn attach_tunnel(&self, node: &str, entry: TunnelEntry) -> Option<TunnelEntry> {
        let TunnelEntry {
            id,
            tunnel,
            peer,
            since,
            labels,
            services,
        } = entry;
        let info = TunnelInfo {
            core: self.core,
            id,
            peer,
            since,
            labels,
            services,
        };
        let mut entries = self.shared.lock();
        entries.offline.remove(node);
        entries.forgotten.remove(node);
        let mut local = self.local.borrow_mut();
        let old = entries.tunnels.insert(node.to_owned(), info);
        let replaced = old.and_then(|old| {
            if old.core != self.core {
                // Cannot happen while tunnels go to their owner core; said loudly if it does.
                tracing::error!(%node, old_core = old.core, core = self.core, "a node's tunnels on two cores");
                return None;
            }
            // The same tunnel attached again (resumed): nothing is replaced.
            let tunnel = if old.id == id {
                local.get(&id).cloned()
            } else {
                local.remove(&old.id)
            }?;
            Some(old.entry(tunnel))
        });
        local.insert(id, tunnel);
        replaced
    }

    /// Updates the labels and services of `node`'s tunnel `id`.
    pub fn update_tunnel(
        &self,
        node: &str,
        id: u64,
        labels: Vec<(String, String)>,
        services: Vec<String>,
    ) {
        let mut entries = self.shared.lock();
        if let Some(info) = entries.tunnels.get_mut(node) {
            if info.id == id {
                info.labels = labels;
                info.services = services;
            }
        }
    }

    /// Marks `node` offline if its tunnel is still tunnel `id` (a reconnect may have replaced
    /// it); returns whether it did.
    pub fn detach_tunnel(&self, node: &str, id: u64) -> bool {
        self.local.borrow_mut().remove(&id);
        let mut entries = self.shared.lock();
        if entries.tunnels.get(node).is_some_and(|i| i.id == id) {
            if let Some(info) = entries.tunnels.remove(node) {
                if entries.forgotten.remove(node) {
                    return true;
                }
                entries.offline.insert(
                    node.to_owned(),
                    OfflineTunnel {
                        since: SystemTime::now(),
                        labels: info.labels,
                    },
                );
            }
            return true;
        }
        false
    }

    /// This core's live tunnels, agents' and leaf clusters' (for draining).
    pub fn tunnels(&self) -> Vec<Tunnel> {
        let mut out: Vec<Tunnel> = self.local.borrow().values().cloned().collect();
        out.extend(self.cluster_local.borrow().values().cloned());
        out
    }

    /// `node`'s tunnel, if this core holds it.
    pub fn local_tunnel(&self, node: &str) -> Option<Tunnel> {
        let id = self.shared.lock().tunnels.get(node)?.id;
        self.local.borrow().get(&id).cloned()
    }

    /// This core's tunnel with the directory id `id`, if it is still up (or detached).
    pub fn local_tunnel_by_id(&self, id: u64) -> Option<Tunnel> {
        self.local.borrow().get(&id).cloned()
    }

    /// How many tunnels this core holds.
    pub fn local_tunnel_count(&self) -> usize {
        self.local.borrow().len() + self.cluster_local.borrow().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_core_is_stable_and_spreads_nodes() {
        let dir = NodeDirectory::new(Vec::new(), 4);
        let mut per_core = [0usize; 4];
        for i in 0..4000 {
            let name = format!("node-{i}");
            let core = dir.owner_core(&name);
            assert_eq!(core, dir.owner_core(&name), "owner of {name} changed");
            per_core[core] += 1;
        }
        for (core, n) in per_core.iter().enumerate() {
            assert!(
                (800..1200).contains(n),
                "core {core} owns {n} of 4000 nodes"
            );
        }
        assert_eq!(NodeDirectory::new(Vec::new(), 1).owner_core("x"), 0);
    }

    fn leaf_node(name: &str, online: bool) -> frame::NodeInfo {
        frame::NodeInfo {
            name: name.into(),
            online,
            tunnel: false,
            labels: Vec::new(),
            services: vec!["ssh".into()],
        }
    }

    fn tunnel() -> Tunnel {
        let config = frame::SessionConfig::new(frame::Role::Proxy, false);
        Tunnel::new(frame::Session::new(config, [0; 16], Instant::now()))
    }

    fn entry(id: u64, tunnel: &Tunnel, label: &str) -> TunnelEntry {
        TunnelEntry {
            id,
            tunnel: tunnel.clone(),
            peer: Some("10.0.0.3:4000".parse().unwrap()),
            since: SystemTime::now(),
            labels: vec![("env".into(), label.into())],
            services: vec!["ssh".into()],
        }
    }

    #[test]
    fn an_agent_tunnel_is_routed_replaced_and_detached_by_id() {
        let shared = Arc::new(NodeDirectory::new(Vec::new(), 2));
        let core = shared.owner_core("node-r1");
        let (dir, other) = (
            CoreDirectory::new(shared.clone(), core),
            CoreDirectory::new(shared.clone(), 1 - core),
        );
        let (t1, t2) = (tunnel(), tunnel());
        assert!(dir.attach_tunnel("node-r1", entry(1, &t1, "a")).is_none());
        let Route::Tunnel(routed) = dir.route("node-r1") else {
            panic!("no tunnel route");
        };
        assert_eq!(routed.id, 1);
        assert_eq!(routed.labels, [("env".to_string(), "a".to_string())]);
        assert_eq!(routed.services, ["ssh"]);
        assert!(matches!(other.route("node-r1"), Route::OtherCore { .. }));
        assert!(other.local_tunnel("node-r1").is_none());

        dir.update_tunnel("node-r1", 1, vec![("env".into(), "b".into())], Vec::new());
        assert_eq!(dir.route("node-r1").labels().unwrap()[0].1, "b");

        // A newer tunnel of the node replaces the old one and hands it back (to be closed).
        let old = dir.attach_tunnel("node-r1", entry(2, &t2, "c")).unwrap();
        assert_eq!((old.id, old.labels[0].1.as_str()), (1, "b"));
        assert_eq!(dir.local_tunnel_count(), 1);
        // The old tunnel ending changes nothing; the current one ending lists the node offline.
        assert!(!dir.detach_tunnel("node-r1", 1));
        assert!(dir.local_tunnel("node-r1").is_some());
        assert!(dir.detach_tunnel("node-r1", 2));
        assert!(dir.local_tunnel("node-r1").is_none());
        assert_eq!(dir.local_tunnel_count(), 0);
        let Route::Offline { labels, .. } = dir.route("node-r1") else {
            panic!("not offline");
        };
        assert_eq!(labels[0].1, "c");
    }

    #[test]
    fn a_user_holds_at_most_its_share_of_a_tunnels_streams() {
        let dir = CoreDirectory::new(Arc::new(NodeDirectory::new(Vec::new(), 1)), 0);
        let a: Vec<StreamSlot> = (0..3)
            .map(|_| dir.take_stream_slot("alice@c", "node-a", 3).unwrap())
            .collect();
        assert!(dir.take_stream_slot("alice@c", "node-a", 3).is_none());
        // Others, and alice elsewhere, are not affected.
        let bob = dir.take_stream_slot("bob@c", "node-a", 3).unwrap();
        let other = dir.take_stream_slot("alice@c", "node-b", 3).unwrap();
        drop(a);
        assert!(dir.take_stream_slot("alice@c", "node-a", 3).is_some());
        drop((bob, other));
        assert!(dir.stream_slots.borrow().is_empty(), "slots left behind");
    }

    #[test]
    fn leaf_nodes_route_to_the_core_of_the_tunnel_that_announced_them() {
        let shared = Arc::new(NodeDirectory::new(Vec::new(), 2));
        let (core0, core1) = (
            CoreDirectory::new(shared.clone(), 0),
            CoreDirectory::new(shared.clone(), 1),
        );
        let peer: SocketAddr = "10.0.0.2:5000".parse().unwrap();
        assert!(matches!(
            core0.cluster_route("leaf", "node-a"),
            ClusterRoute::ClusterOffline(None)
        ));
        let (t0, t1) = (tunnel(), tunnel());
        let caps = LeafCaps {
            tunnels: 2,
            nodes: 3,
        };
        core0
            .attach_cluster_tunnel("leaf", 1, peer, &t0, vec![leaf_node("node-a", true)], caps)
            .unwrap();
        core1
            .attach_cluster_tunnel(
                "leaf",
                2,
                peer,
                &t1,
                vec![leaf_node("node-b", true), leaf_node("node-c", false)],
                caps,
            )
            .unwrap();
        // A third tunnel of the leaf, or a fourth node, is one too many.
        let t2 = tunnel();
        let refused = core0
            .attach_cluster_tunnel("leaf", 3, peer, &t2, Vec::new(), caps)
            .unwrap_err();
        assert!(refused.contains("max_tunnels_per_cluster"), "{refused}");
        assert_eq!(shared.held_tunnel_count(), 2);
        assert_eq!(shared.cluster_tunnel_count("leaf"), 2);
        let refused = core0
            .update_cluster_tunnel(
                "leaf",
                1,
                vec![leaf_node("node-a", true), leaf_node("node-d", true)],
                caps.nodes,
            )
            .unwrap_err();
        assert!(refused.contains("max_announced_nodes"), "{refused}");
        // The refused update changed nothing.
        assert_eq!(shared.cluster_owner("leaf", "node-d"), None);
        assert_eq!(shared.cluster_owner("leaf", "node-a"), Some(0));
        assert_eq!(shared.cluster_owner("leaf", "node-b"), Some(1));
        assert_eq!(shared.cluster_owner("leaf", "node-z"), None);
        assert_eq!(shared.cluster_owner("other", "node-a"), None);
        assert!(matches!(
            core0.cluster_route("leaf", "node-a"),
            ClusterRoute::Tunnel(_)
        ));
        assert!(matches!(
            core0.cluster_route("leaf", "node-b"),
            ClusterRoute::OtherCore(1)
        ));
        assert!(matches!(
            core1.cluster_route("leaf", "node-b"),
            ClusterRoute::Tunnel(_)
        ));
        assert!(matches!(
            core1.cluster_route("leaf", "node-c"),
            ClusterRoute::NodeOffline
        ));
        assert!(matches!(
            core1.cluster_route("leaf", "node-z"),
            ClusterRoute::NodeUnknown
        ));
        // A leaf's node-a is not this cluster's node-a.
        assert!(matches!(core0.route("node-a"), Route::Unknown));
        let names: Vec<String> = shared
            .cluster_nodes("leaf")
            .unwrap()
            .into_iter()
            .map(|n| n.name)
            .collect();
        assert_eq!(names, ["node-a", "node-b", "node-c"]);
        let [record] = shared.clusters().try_into().unwrap();
        assert_eq!((record.online, record.tunnels, record.nodes), (true, 2, 3));

        core1
            .update_cluster_tunnel("leaf", 2, vec![leaf_node("node-c", true)], caps.nodes)
            .unwrap();
        assert!(matches!(
            core1.cluster_route("leaf", "node-c"),
            ClusterRoute::Tunnel(_)
        ));
        assert!(matches!(
            core1.cluster_route("leaf", "node-b"),
            ClusterRoute::NodeUnknown
        ));

        core0.detach_cluster_tunnel("leaf", 1);
        core1.detach_cluster_tunnel("leaf", 2);
        assert!(matches!(
            core0.cluster_route("leaf", "node-a"),
            ClusterRoute::ClusterOffline(Some(_))
        ));
        assert!(shared.cluster_nodes("leaf").is_none());
        assert!(!shared.clusters()[0].online);
        assert_eq!(core0.local_tunnel_count() + core1.local_tunnel_count(), 0);
    }
}
