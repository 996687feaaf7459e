"""A RabbitMQ consumer for Baton's `message` channel, as an integration engine would run one.

It declares what Baton publishes to (a durable topic exchange, `baton.tasks` by default), a
durable queue bound to it with a routing key, and prints each notification: its headers and
the event numbers it carries. Run it before creating the subscription, so that the handshake
has a queue to land in (Baton publishes `mandatory`: an unroutable message is a failed
delivery, retried until a queue is bound).

    pip install pika
    python3 examples/amqp_consumer.py --exchange baton.tasks --routing-key lab
"""

import argparse
import json

import pika


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/%2f")
    parser.add_argument("--exchange", default="baton.tasks")
    parser.add_argument("--routing-key", default="lab")
    parser.add_argument("--queue", default="baton.lab")
    parser.add_argument(
        "--count", type=int, default=0, help="stop after this many messages (0: never)"
    )
    args = parser.parse_args()

    connection = pika.BlockingConnection(pika.URLParameters(args.url))
    channel = connection.channel()
    channel.exchange_declare(exchange=args.exchange, exchange_type="topic", durable=True)
    channel.queue_declare(queue=args.queue, durable=True)
    channel.queue_bind(queue=args.queue, exchange=args.exchange, routing_key=args.routing_key)
    print(f"waiting on queue {args.queue} (exchange {args.exchange}, key {args.routing_key})", flush=True)

    received = 0
    for method, properties, body in channel.consume(args.queue):
        headers = properties.headers or {}
        bundle = json.loads(body)
        status = bundle["entry"][0]["resource"]
        events = [
            part["valueString"]
            for parameter in status["parameter"]
            if parameter["name"] == "notification-event"
            for part in parameter["part"]
            if part["name"] == "event-number"
        ]
        print(
            f"{headers.get('notification-type')} subscription={headers.get('subscription-id')} "
            f"events={events} message_id={properties.message_id}",
            flush=True,
        )
        channel.basic_ack(method.delivery_tag)
        received += 1
        if args.count and received >= args.count:
            break
    channel.cancel()
    connection.close()


if __name__ == "__main__":
    main()
