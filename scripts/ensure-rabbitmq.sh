#!/bin/sh
# Start the machine's RabbitMQ when it is down (CI runs as root), installing it from
# Debian's packages if it is missing. The order-events tests publish to it
# (127.0.0.1:5672, guest/guest); it is never stopped by the suite.
up() { python3 -c 'import socket; socket.create_connection(("127.0.0.1", 5672), 1).close()' 2>/dev/null; }
if up; then exit 0; fi
if ! command -v rabbitmq-server >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
fi
if command -v rabbitmq-server >/dev/null 2>&1; then
    rabbitmq-server -detached >/dev/null 2>&1 || true
    for _ in $(seq 1 60); do up && exit 0; sleep 1; done
fi
echo "RabbitMQ is not reachable on 127.0.0.1:5672; start it (rabbitmq-server -detached)" >&2
exit 1
