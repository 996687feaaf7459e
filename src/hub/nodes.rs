//! Which node delivers a subscription: the live node its id hashes to.
//!
//! Every node of a cluster holds a lease named `node:<its id>` in the store, renewed at a
//! third of `cluster.lease_seconds` (`membership`), and reads the holders of the unexpired
//! ones about every second. Each subscription prefers one of those live nodes, chosen by
//! rendezvous hashing (the node whose hash with the subscription id is highest): every node
//! computes the same choice from the same list, the choices spread evenly, and when a node
//! leaves only the subscriptions that preferred it move, each to its next-highest node.
//!
//! The preference is only a routing rule: the matcher wakes a subscription's preferred node
//! rather than its own scheduler, and a node's scan takes the waiting work it is preferred
//! for. Order and exactly-once still rest on the delivery claim, so two nodes that briefly
//! disagree about the live list only make one of them wait for the other's claim.

use std::sync::RwLock;

use tokio::sync::Notify;

use crate::fhir::ids::SubscriptionId;

/// The lease name of a node's presence.
pub fn presence_lease(node: &str) -> String {
    format!("{PRESENCE_PREFIX}{node}")
}

/// What every presence lease's name starts with.
pub const PRESENCE_PREFIX: &str = "node:";

/// The live nodes as this node last read them, and this node's name.
pub struct LiveNodes {
    /// This node: always counted live by itself, so a single node (or one that cannot read
    /// the list) prefers itself for everything.
    node: String,
    /// The live nodes, sorted, this node included.
    live: RwLock<Vec<String>>,
    /// Notified when a node left the list: the subscriptions it was preferred for now prefer
    /// one of the others, which should look for their waiting work at once.
    pub departed: Notify,
}

impl LiveNodes {
    /// A view holding only `node`, until the first read of the list.
    pub fn new(node: &str) -> LiveNodes {
        LiveNodes {
            node: node.to_string(),
            live: RwLock::new(vec![node.to_string()]),
            departed: Notify::new(),
        }
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Replaces the list with what the store says is live (this node is added if missing);
    /// returns whether a node left it.
    pub fn set(&self, mut nodes: Vec<String>) -> bool {
        if !nodes.contains(&self.node) {
            nodes.push(self.node.clone());
        }
        nodes.sort_unstable();
        nodes.dedup();
        let mut live = self.live.write().unwrap_or_else(|e| e.into_inner());
        let departed = live.iter().any(|n| nodes.binary_search(n).is_err());
        *live = nodes;
        drop(live);
        if departed {
            self.departed.notify_one();
        }
        departed
    }

    /// The live nodes, sorted.
    pub fn live(&self) -> Vec<String> {
        self.live.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The node `id` prefers.
    pub fn preferred(&self, id: &SubscriptionId) -> String {
        let live = self.live.read().unwrap_or_else(|e| e.into_inner());
        preferred_node(id.as_str(), &live)
            .unwrap_or(&self.node)
            .to_string()
    }

    /// The subscriptions grouped by the node each prefers, under one read of the list.
    pub fn by_node(
        &self,
        ids: impl IntoIterator<Item = SubscriptionId>,
    ) -> std::collections::BTreeMap<String, Vec<SubscriptionId>> {
        let live = self.live.read().unwrap_or_else(|e| e.into_inner());
        let mut grouped: std::collections::BTreeMap<String, Vec<SubscriptionId>> =
            std::collections::BTreeMap::new();
        for id in ids {
            let node = preferred_node(id.as_str(), &live).unwrap_or(&self.node);
            match grouped.get_mut(node) {
                Some(list) => list.push(id),
                None => {
                    grouped.insert(node.to_string(), vec![id]);
                }
            }
        }
        grouped
    }

    /// Whether `id` prefers this node.
    pub fn delivers_here(&self, id: &SubscriptionId) -> bool {
        let live = self.live.read().unwrap_or_else(|e| e.into_inner());
        preferred_node(id.as_str(), &live).is_none_or(|n| n == self.node)
    }
}

/// The node of `nodes` that `subscription` prefers: the highest rendezvous weight, ties (which
/// a 64-bit hash makes vanishingly rare) to the smaller name. None when `nodes` is empty.
pub fn preferred_node<'a>(subscription: &str, nodes: &'a [String]) -> Option<&'a str> {
    nodes
        .iter()
        .map(|n| (weight(subscription, n), std::cmp::Reverse(n.as_str())))
        .max()
        .map(|(_, std::cmp::Reverse(n))| n)
}

/// A stable 64-bit weight of a (subscription, node) pair: FNV-1a over both, with a separator
/// byte, finished by splitmix64's mixer so that similar names give unrelated weights. Stable
/// across processes and versions (unlike `std`'s hasher, which promises neither).
fn weight(subscription: &str, node: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in subscription
        .as_bytes()
        .iter()
        .chain([0xff_u8].iter())
        .chain(node.as_bytes())
    {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    fn ids(count: usize) -> Vec<String> {
        (0..count)
            .map(|i| uuid::Uuid::from_u128(i as u128 * 7919 + 13).to_string())
            .collect()
    }

    #[test]
    fn the_choice_is_the_same_whatever_the_order_of_the_list() {
        let a = nodes(&["node-a", "node-b", "node-c"]);
        let b = nodes(&["node-c", "node-a", "node-b"]);
        for id in ids(200) {
            assert_eq!(preferred_node(&id, &a), preferred_node(&id, &b), "{id}");
        }
        assert_eq!(preferred_node("x", &[]), None);
        assert_eq!(preferred_node("x", &nodes(&["only"])), Some("only"));
    }

    #[test]
    fn three_nodes_share_the_subscriptions_about_evenly() {
        let three = nodes(&["node-0-1f2e", "node-1-9a7b", "node-2-c3d4"]);
        let ids = ids(3000);
        for node in &three {
            let share = ids
                .iter()
                .filter(|id| preferred_node(id, &three) == Some(node.as_str()))
                .count();
            assert!((800..1200).contains(&share), "{node}: {share} of 3000");
        }
    }

    #[test]
    fn a_node_leaving_moves_only_its_own_subscriptions() {
        let three = nodes(&["node-a", "node-b", "node-c"]);
        let two = nodes(&["node-a", "node-c"]);
        let mut moved = 0;
        for id in ids(3000) {
            let before = preferred_node(&id, &three).unwrap();
            let after = preferred_node(&id, &two).unwrap();
            if before == "node-b" {
                moved += 1;
                assert_ne!(after, "node-b");
            } else {
                assert_eq!(before, after, "{id} moved though its node stayed");
            }
        }
        // And both survivors take part of what moved.
        let to_a = ids(3000)
            .iter()
            .filter(|id| {
                preferred_node(id, &three) == Some("node-b")
                    && preferred_node(id, &two) == Some("node-a")
            })
            .count();
        assert!(
            moved > 800 && to_a > moved / 4 && to_a < moved * 3 / 4,
            "{to_a} of {moved}"
        );
    }

    #[test]
    fn the_view_counts_itself_live_and_says_when_a_node_left() {
        let view = LiveNodes::new("node-b");
        let id = SubscriptionId::generate();
        assert!(view.delivers_here(&id), "alone, a node prefers itself");
        assert!(!view.set(nodes(&["node-a", "node-c"])));
        assert_eq!(view.live(), nodes(&["node-a", "node-b", "node-c"]));
        assert!(!view.set(nodes(&["node-a", "node-b", "node-c"])));
        assert!(view.set(nodes(&["node-b", "node-c"])), "node-a left");
        assert_eq!(view.live(), nodes(&["node-b", "node-c"]));
        let preferred = view.preferred(&id);
        assert_eq!(
            view.delivers_here(&id),
            preferred == "node-b",
            "{preferred}"
        );
    }
}
