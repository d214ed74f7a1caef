#!/bin/sh
# Start the machine's PostgreSQL cluster when it is down (CI runs as root). The suite
# needs it: storage, executor, crash and race tests run on SQLite and on PostgreSQL.
if pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then exit 0; fi
if [ -d /etc/postgresql ] && command -v pg_ctlcluster >/dev/null 2>&1; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
    for _ in 1 2 3 4 5 6 7 8 9 10; do pg_isready -q -h 127.0.0.1 -p 5432 && exit 0; sleep 1; done
fi
echo "PostgreSQL is not reachable on 127.0.0.1:5432; set ORDER_SAGA_TEST_PG or start it" >&2
exit 1
