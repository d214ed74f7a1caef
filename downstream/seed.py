"""The reference services' deterministic seed data, as literal tables (SPEC §4 "Seed data").

Pure data, no I/O: `store.py` loads these rows into a fresh store and on `POST /_reset`.

How to produce each row of the design table (SPEC §1) on demand:

| design row                       | user_id | product_id | quantity |
|----------------------------------|---------|------------|----------|
| all succeed -> completed         | 1       | 1          | 1        |
| product 404 -> rejected          | any     | 999        | any      |
| payment failed (402)             | 2       | 1          | 1        |
| inventory failed (409)           | 1       | 3          | 1        |
| shipping failed (422, > 10 units)| 1       | 1          | 11       |
| payment + inventory failed       | 2       | 3          | 1        |
| all three failed                 | 2       | 3          | 11       |

Product 4 has exactly one unit: the first order for it succeeds, the next gets 409.
User 999 does not exist: deduct answers 404, shipping answers 422 "no address for user 999".
"""

from typing import Final, NamedTuple


class SeedUser(NamedTuple):
    id: int
    name: str
    balance: int  # cents
    address: str


class SeedProduct(NamedTuple):
    id: int
    category: str
    description: str
    price: int  # cents
    stock: int


USERS: Final[tuple[SeedUser, ...]] = (
    # id, name, balance (cents), shipping address
    SeedUser(1, "Alice", 100_000, "1 Main St, Springfield"),  # ordinary buyer ($1,000.00)
    SeedUser(2, "Bob", 500, "2 Elm St, Shelbyville"),  # poor: every product costs more -> 402
    SeedUser(3, "Carol", 1_000_000_000, "3 Oak Ave, Capital City"),  # rich: benchmarks, bulk
)

PRODUCTS: Final[tuple[SeedProduct, ...]] = (
    # id, category, description, price (cents), stock (units)
    SeedProduct(1, "gadgets", "Widget", 1999, 1_000_000),
    SeedProduct(2, "gadgets", "Gizmo", 4999, 1_000_000),
    SeedProduct(3, "collectibles", "Limited edition print (sold out)", 2500, 0),  # always 409
    SeedProduct(4, "collectibles", "Last one in stock", 1000, 1),  # first order wins
)

# Named roles, so tests and demos say what they mean instead of repeating magic numbers.
ORDINARY_USER_ID: Final = 1
POOR_USER_ID: Final = 2
RICH_USER_ID: Final = 3
MISSING_USER_ID: Final = 999

WIDGET_ID: Final = 1
GIZMO_ID: Final = 2
SOLD_OUT_PRODUCT_ID: Final = 3
LAST_ONE_PRODUCT_ID: Final = 4
MISSING_PRODUCT_ID: Final = 999

MAX_UNITS_PER_SHIPMENT: Final = 10  # shipping answers 422 above this
DELIVERY_DAYS: Final = 3  # expected_delivery = today (UTC) + this many days
