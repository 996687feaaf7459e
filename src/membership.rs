//! A node's presence in its cluster: a lease named `node:<id>` (`hub::nodes::presence_lease`)
//! taken and renewed every third of `cluster.lease_seconds`, the same rhythm as the matcher's,
//! so a node that dies drops out of the list as soon as its matcher lease would run out. About
//! once a second the holders of the unexpired presence leases are read into the hub's
//! `LiveNodes`, which says which node each subscription's deliveries prefer; when a node left
//! the list, the delivery scan runs at once so its subscriptions' waiting work moves to the
//! nodes they prefer now. On shutdown the lease is given up, so the others need not wait for
//! it to run out.
//!
//! A store that serves one process keeps no leases: the list is then this node alone.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::error::error_chain;
use crate::hub::Hub;
use crate::hub::nodes::{PRESENCE_PREFIX, presence_lease};
use crate::store::Store;

/// How often the list of live nodes is read, at most.
const READ_EVERY: Duration = Duration::from_secs(1);

/// Keeps this node's presence lease and the hub's list of live nodes until `stop`.
pub async fn run(store: Arc<dyn Store>, hub: Arc<Hub>, lease: Duration, stop: CancellationToken) {
    let name = presence_lease(&hub.node);
    let renew_every = lease / 3;
    let mut tick = tokio::time::interval(READ_EVERY.min(renew_every));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut renewed: Option<std::time::Instant> = None;
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => break,
        }
        if renewed.is_none_or(|at| at.elapsed() >= renew_every) {
            match store.acquire_lease(&name, &hub.node, lease).await {
                Ok(_) => renewed = Some(std::time::Instant::now()),
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %error_chain(&e), "renewing this node's presence lease failed");
                    }
                    failing = true;
                    continue;
                }
            }
        }
        match store.lease_holders(PRESENCE_PREFIX).await {
            Ok(nodes) => {
                failing = false;
                let count = nodes.len();
                if hub.nodes.set(nodes) {
                    tracing::info!(
                        live = count.max(1),
                        "a node left the cluster; its deliveries move to the others"
                    );
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %error_chain(&e), "reading the live nodes failed");
                }
                failing = true;
            }
        }
    }
    let _ = store.release_lease(&name, &hub.node).await;
}
