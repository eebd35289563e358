"""A minimal publisher of one "create group" command (docs/contract.md §7), with pika.

    pip install pika
    AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f python3 examples/publish.py ORG-2001 "New Sales Division" 1000

Persistent, with publisher confirms and `mandatory`, so a message the broker cannot route
(a wrong exchange or routing key) is an error here instead of silently lost. Exit code 0
only when the broker confirmed the command.
"""
import json
import os
import sys
import uuid

import pika


def main() -> int:
    ext_id, name, parent = sys.argv[1], sys.argv[2], int(sys.argv[3])
    url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
    body = json.dumps(
        {"org_unit_ext_id": ext_id, "org_unit_name": name, "org_unit_parent_id": parent}
    )
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        message_id = str(uuid.uuid4())
        channel.basic_publish(
            exchange="provisioning",
            routing_key="group.create",
            body=body.encode("utf-8"),
            properties=pika.BasicProperties(
                content_type="application/json",
                delivery_mode=pika.DeliveryMode.Persistent,
                message_id=message_id,
            ),
            mandatory=True,
        )
    except pika.exceptions.UnroutableError:
        print("not sent: the broker could not route it (exchange or routing key?)", file=sys.stderr)
        return 1
    except pika.exceptions.NackError:
        print("not sent: the broker refused it", file=sys.stderr)
        return 1
    except pika.exceptions.ChannelClosedByBroker as e:
        print(f"not sent: the broker closed the channel ({e}); does the exchange exist?", file=sys.stderr)
        return 1
    finally:
        connection.close()
    print(f"sent {ext_id} as message {message_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
