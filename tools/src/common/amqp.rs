//! A tool's own AMQP topology: a durable direct exchange and a durable queue bound to it, as
//! an integration engine would have, named after the run. The queue expires by itself if the
//! run dies before removing it.

use std::time::Duration;

use anyhow::Context;
use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

#[derive(Debug, Clone)]
pub struct Topology {
    pub exchange: String,
    pub queue: String,
    pub routing_key: String,
    /// Whether the exchange goes with its last binding (so with the expired queue).
    pub exchange_auto_delete: bool,
    /// How long the queue may stay unused before the broker removes it.
    pub queue_expires: Duration,
}

impl Topology {
    pub async fn declare(&self, channel: &Channel) -> anyhow::Result<()> {
        channel
            .exchange_declare(
                self.exchange.as_str().into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    durable: true,
                    auto_delete: self.exchange_auto_delete,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .context("declaring the exchange")?;
        let mut arguments = FieldTable::default();
        let expires = i32::try_from(self.queue_expires.as_millis()).unwrap_or(i32::MAX);
        arguments.insert("x-expires".into(), AMQPValue::LongInt(expires));
        channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await
            .context("declaring the queue")?;
        channel
            .queue_bind(
                self.queue.as_str().into(),
                self.exchange.as_str().into(),
                self.routing_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .context("binding the queue")?;
        Ok(())
    }

    /// Deletes the queue and the exchange (best effort: the run's figures are already out).
    pub async fn remove(&self, channel: &Channel) {
        let _ = channel
            .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = channel
            .exchange_delete(
                self.exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
    }
}
