//! The run's subscribers: rest-hook endpoints whose behaviour the scenario switches, a
//! websocket listener and an AMQP consumer, each on its own subscription to the run's Tasks.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_tools::common::fhir::Channel;
use baton_tools::common::lock;
use tokio_util::sync::CancellationToken;

use crate::api::Api;
use crate::campaign::{Run, broker_endpoint};
use crate::fhir::run_subscription;
use crate::listeners::{AmqpTopology, Inbox, start_amqp, start_websocket};
use crate::receiver::{Behaviour, Endpoint};
use crate::verify::Arrival;

pub struct RestHook {
    pub label: String,
    pub endpoint: Arc<Endpoint>,
    pub id: String,
}

pub struct WebSocketSubscriber {
    pub id: String,
    pub inbox: Arc<Inbox>,
}

pub struct AmqpSubscriber {
    pub id: String,
    pub topology: AmqpTopology,
    pub inbox: Arc<Inbox>,
}

/// What to subscribe.
pub struct Plan {
    /// Label, starting behaviour and `backport-timeout` of each rest-hook subscription.
    pub rest_hooks: Vec<(String, Behaviour, Option<u32>)>,
    pub websocket: bool,
    /// The broker URL (with credentials) for the AMQP subscriber.
    pub amqp: Option<String>,
}

pub struct Subscribers {
    pub rest_hooks: Vec<RestHook>,
    pub websocket: Option<WebSocketSubscriber>,
    pub amqp: Option<AmqpSubscriber>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Subscribers {
    /// Creates the subscriptions and their receivers, and waits until every one is active.
    pub async fn start(api: &Api, run: &Run, plan: Plan) -> anyhow::Result<Subscribers> {
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        let mut rest_hooks = Vec::new();
        for (label, behaviour, timeout) in plan.rest_hooks {
            let endpoint = Endpoint::start().await?;
            endpoint.set(behaviour).await?;
            let body = run_subscription(
                api.base(),
                &api.run,
                &format!("baton_fault {label}"),
                Channel::RestHook {
                    endpoint: &endpoint.url,
                    timeout,
                },
            );
            let id = api.create_subscription(&body).await?;
            rest_hooks.push(RestHook {
                label,
                endpoint,
                id,
            });
        }
        let amqp = match plan.amqp {
            Some(url) => {
                let topology = AmqpTopology::new(url.clone(), &run.id);
                topology.declare().await?;
                let wanted = Arc::new(Mutex::new(None));
                let (inbox, task) = start_amqp(
                    url.clone(),
                    topology.topology.queue.clone(),
                    wanted.clone(),
                    stop.clone(),
                );
                tasks.push(task);
                let endpoint = format!(
                    "{}?exchange={}&routing_key={}",
                    broker_endpoint(&url),
                    topology.topology.exchange,
                    topology.topology.routing_key
                );
                let body = run_subscription(
                    api.base(),
                    &api.run,
                    "baton_fault amqp",
                    Channel::Message {
                        endpoint: &endpoint,
                        max_count: None,
                    },
                );
                let id = api.create_subscription(&body).await?;
                *lock(&wanted) = Some(id.clone());
                Some(AmqpSubscriber {
                    id,
                    topology,
                    inbox,
                })
            }
            None => None,
        };
        let websocket = if plan.websocket {
            let body = run_subscription(
                api.base(),
                &api.run,
                "baton_fault websocket",
                Channel::WebSocket,
            );
            let id = api.create_subscription(&body).await?;
            let (inbox, task) = start_websocket(api.clone(), id.clone(), stop.clone());
            tasks.push(task);
            Some(WebSocketSubscriber { id, inbox })
        } else {
            None
        };
        let subscribers = Subscribers {
            rest_hooks,
            websocket,
            amqp,
            stop,
            tasks,
        };
        // Handshakes first: a subscription is in force once it is active.
        for id in subscribers.ids() {
            api.wait_active(&id, Duration::from_secs(30)).await?;
        }
        if let Some(ws) = &subscribers.websocket {
            let deadline = Instant::now() + Duration::from_secs(30);
            while ws
                .inbox
                .connections
                .load(std::sync::atomic::Ordering::Relaxed)
                == 0
            {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "the websocket listener did not bind within 30 s"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(subscribers)
    }

    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.rest_hooks.iter().map(|r| r.id.clone()).collect();
        ids.extend(self.websocket.as_ref().map(|w| w.id.clone()));
        ids.extend(self.amqp.as_ref().map(|a| a.id.clone()));
        ids
    }

    /// Events received by the subscribers that must get everything (rest-hook, AMQP).
    pub fn strict_streams(&self) -> Vec<(String, Vec<Arrival>)> {
        let mut streams: Vec<(String, Vec<Arrival>)> = self
            .rest_hooks
            .iter()
            .map(|r| (r.id.clone(), r.endpoint.arrivals()))
            .collect();
        if let Some(amqp) = &self.amqp {
            streams.push((amqp.id.clone(), amqp.inbox.arrivals()));
        }
        streams
    }

    /// Stops the listeners and removes the campaign's broker topology.
    pub async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
        if let Some(amqp) = &self.amqp {
            amqp.topology.remove().await;
        }
    }
}
