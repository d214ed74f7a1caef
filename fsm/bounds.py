"""The largest number of seconds, and the largest count, that a setting (fsm.settings), a
command-line flag (order_saga.console) or a query parameter may take. Constants only, no
imports: `order-saga --help` reads them without loading pydantic or a database driver.
"""

# About 31.7 years: beyond any sensible wait, yet far inside what the waits are built from
# (datetime.timedelta: 2.7 million years; socket and thread timeouts: ~292 years) and what
# a date plus or minus it can hold (years 1 to 9999). Above it: OverflowError at start-up,
# or in every sweep of an order (ORDER_SAGA_STEP_DEADLINE=1e20 stranded it).
MAX_SECONDS = 10**9

# A SQL BIGINT (and SQLite's INTEGER): a count bound into a LIMIT or OFFSET, or compared
# with one, must fit in it.
MAX_COUNT = 2**63 - 1

# A SQL INTEGER (PostgreSQL: 4 bytes): an id of a user or a product (the API's bound too),
# a transition's seq.
MAX_ID = 2**31 - 1

# The order's columns a shipping answer fills (fsm.steps.Shipping): `expected_delivery` is
# a varchar(40) (migration 0001); the address column has no width, the cap keeps a row small.
MAX_DELIVERY_CHARS = 40
MAX_ADDRESS_CHARS = 500

# orders.amount (cents: price x quantity), a BIGINT (revision 0011; SQLite's INTEGER): a
# product whose amount would not fit is refused at the lookup (invalid_product).
MAX_AMOUNT = 2**63 - 1
