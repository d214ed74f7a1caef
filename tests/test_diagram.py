"""The state diagram export (SPEC §4: `order-saga diagram`, `GET /diagram`,
`GET /orders/{id}/diagram`): every format is a valid document holding every declared state and
edge, and one order's log highlights exactly the states and edges it went through.
"""

from __future__ import annotations

import re
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlmodel import SQLModel

import fsm.models  # noqa: F401  (registers the tables)
from api import problems
from api.diagram import router
from downstream.seed import ORDINARY_USER_ID, WIDGET_ID
from fsm import diagram
from fsm.diagram import (
    CONTENT_TYPES,
    FORMATS,
    GraphvizMissing,
    UnknownFormat,
    edge_kind,
    highlighted,
    node_id,
    render,
    render_for_order,
)
from fsm.machine import (
    ORDER_MACHINE,
    STEP_MACHINE,
    Edge,
    OrderState,
    StepState,
    edges,
    next_state,
)
from fsm.models import Transition
from fsm.registry import STEP_NAMES
from fsm.store import Store
from fsm.version import MACHINE_VERSION
from fsm.wiring import open_store
from tests.support.settings import saga_settings

ROOT = Path(__file__).resolve().parent.parent
EDGES = list(edges())
ORDER_ID = uuid.UUID("00000000-0000-4000-8000-000000000001")


def log(*moves: tuple[str, str]) -> list[Transition]:
    """A transition log built by walking the real machines, so every row is a legal move."""
    at = {"order": OrderState.PENDING.value}
    at |= dict.fromkeys(STEP_NAMES, StepState.PENDING.value)
    rows = []
    for seq, (scope, trigger) in enumerate(moves, start=1):
        machine = ORDER_MACHINE if scope == "order" else STEP_MACHINE
        dest = next_state(machine, at[scope], trigger)
        rows.append(
            Transition(
                order_id=ORDER_ID,
                seq=seq,
                scope=scope,
                trigger=trigger,
                from_state=at[scope],
                to_state=dest,
                created_at=datetime.now(UTC),
            )
        )
        at[scope] = dest
    return rows


STARTED = [
    ("order", "request_product"),
    ("order", "product_found"),
    ("payment", "request"),
    ("inventory", "request"),
    ("shipping", "request"),
]
# SPEC §1 row 1: all three succeed -> completed.
COMPLETED = log(
    *STARTED,
    ("payment", "succeed"),
    ("inventory", "succeed"),
    ("shipping", "succeed"),
    ("order", "all_succeeded"),
)
# SPEC §1 row 3: payment fails -> restore inventory, cancel shipping; one park on the way.
FAILED = log(
    *STARTED,
    ("payment", "fail"),
    ("inventory", "succeed"),
    ("shipping", "succeed"),
    ("order", "some_failed"),
    ("inventory", "compensate"),
    ("shipping", "compensate"),
    ("inventory", "finish_compensation"),
    ("order", "park"),
    ("order", "retry_compensation"),
    ("shipping", "finish_compensation"),
    ("order", "compensation_done"),
)
# SPEC §1 row 2: product 404 -> rejected, nothing else called.
REJECTED = log(("order", "request_product"), ("order", "product_missing"))
# Still running: shipping's call is in flight.
RUNNING = log(*STARTED, ("payment", "succeed"), ("inventory", "expire"))
HISTORIES = {"completed": COMPLETED, "failed": FAILED, "rejected": REJECTED, "running": RUNNING}


def keys(rows: list[Transition]) -> tuple[set[tuple[str, str]], set[tuple[str, str, str, str]]]:
    states = {(r.scope, s) for r in rows for s in (r.from_state, r.to_state)}
    return states, {(r.scope, r.trigger, r.from_state, r.to_state) for r in rows}


# -- dot and mermaid parsed back -----------------------------------------------------------

DOT_EDGE = re.compile(r'^\s*"(\w+)" -> "(\w+)" \[(.*)\];$', re.MULTILINE)
DOT_NODE = re.compile(r'^\s*"(\w+)" \[(.*)\];$', re.MULTILINE)
DOT_ATTR = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def dot_edges(text: str) -> dict[tuple[str, str, str], dict[str, str]]:
    """(tail, trigger, head) -> attributes; edges clipped at the steps box name the box."""
    found = {}
    for tail, head, raw in DOT_EDGE.findall(text):
        attrs = dict(DOT_ATTR.findall(raw))
        tail = attrs.get("ltail", tail).removeprefix("cluster_")
        head = attrs.get("lhead", head).removeprefix("cluster_")
        trigger = attrs["label"].split(" (")[0]
        found[(tail, trigger, head)] = attrs
    return found


def dot_classes(text: str) -> dict[str, set[str]]:
    """state id -> its classes (nodes, and the steps box cluster)."""
    result = {
        n: set(dict(DOT_ATTR.findall(raw)).get("class", "").split())
        for n, raw in DOT_NODE.findall(text)
    }
    box = re.search(r'cluster_steps_running" \{\n\s*graph \[(.*)\];', text)
    assert box is not None
    result["steps_running"] = set(dict(DOT_ATTR.findall(box.group(1))).get("class", "").split())
    return result


def mermaid_edges(text: str) -> dict[tuple[str, str, str], str]:
    """(source, trigger, dest) -> the label's log sequence numbers ("" when not taken)."""
    found = {}
    for src, dest, label in re.findall(r"^\s*(\w+) --> (\w+): (.*)$", text, re.MULTILINE):
        trigger, _, seqs = label.partition(" (")
        found[(src, trigger, dest)] = seqs.rstrip(")")
    return found


def mermaid_classes(text: str) -> dict[str, set[str]]:
    result: dict[str, set[str]] = {}
    for ids, name in re.findall(r"^\s*class ([\w,]+) (\w+)$", text, re.MULTILINE):
        for state_id in ids.split(","):
            result.setdefault(name, set()).add(state_id)
    return result


def expected_id(edge: Edge) -> tuple[str, str, str]:
    return node_id(edge.scope, edge.source), edge.trigger, node_id(edge.scope, edge.dest)


# -- the whole machine -------------------------------------------------------------------


def test_formats_and_content_types_agree() -> None:
    assert FORMATS == ("mermaid", "dot", "svg", "png")
    assert set(CONTENT_TYPES) == set(FORMATS)


def test_state_ids_are_unique_across_machines() -> None:
    pairs = {(e.scope, s) for e in EDGES for s in (e.source, e.dest)}
    assert len({node_id(*pair) for pair in pairs}) == len(pairs)


def test_every_trigger_has_a_kind_and_the_kinds_name_real_triggers() -> None:
    declared = {e.trigger for e in EDGES}
    assert diagram.HAPPY_TRIGGERS <= declared
    assert diagram.FAILURE_TRIGGERS <= declared
    assert {edge_kind(t) for t in declared} == {"happy", "failure", "compensation"}
    assert edge_kind("some_failed") == edge_kind("compensate") == "compensation"


def test_mermaid_holds_every_declared_transition_and_nothing_else() -> None:
    text = render("mermaid").decode()
    assert text.startswith("stateDiagram-v2\n")
    assert "state steps_running {" in text
    assert text.count("\n        --\n") == len(STEP_NAMES) - 1  # one concurrent region per step
    assert text.count("{") == text.count("}")
    assert set(mermaid_edges(text)) == {expected_id(e) for e in EDGES}


def test_dot_holds_every_declared_edge_and_nothing_else() -> None:
    text = render("dot").decode()
    found = dot_edges(text)
    assert set(found) - {("start", "", "pending")} == {expected_id(e) for e in EDGES}
    for edge in EDGES:
        assert found[expected_id(edge)]["color"] == diagram._COLOR[edge_kind(edge.trigger)]


def test_svg_is_xml_naming_every_state() -> None:
    svg = render("svg")
    root = ET.fromstring(svg)
    assert root.tag.endswith("svg")
    texts = {t.text for t in root.iter() if t.tag.endswith("text")}
    names = {s for e in EDGES for s in (e.source, e.dest)} | set(STEP_NAMES)
    for name in names:
        assert any(text and re.search(rf"\b{name}\b", text) for text in texts), name


def test_png_is_a_png() -> None:
    assert render("png").startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.parametrize("fmt", ["jpeg", "", "SVG"])
def test_unknown_format(fmt: str) -> None:
    with pytest.raises(UnknownFormat, match="mermaid, dot, svg, png"):
        render(fmt)
    with pytest.raises(ValueError):
        render(fmt, COMPLETED)


@pytest.mark.parametrize("fmt", [pytest.param("svg", id="svg"), pytest.param("png", id="png")])
def test_graphviz_missing_is_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fmt: str
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no `dot` to be found
    with pytest.raises(GraphvizMissing) as caught:
        render(fmt, FAILED)
    assert "\n" not in str(caught.value)
    assert "apt-get install graphviz" in str(caught.value)
    assert render("mermaid", FAILED) and render("dot", FAILED)  # these need nothing


def test_docs_copy_is_current() -> None:
    assert (ROOT / "docs" / "diagram.mermaid").read_text() == render("mermaid").decode()


def test_readme_mermaid_block_is_current() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```mermaid\n(.*?)```", readme, re.DOTALL)
    assert block is not None, "README.md has no ```mermaid block"
    assert block.group(1) == render("mermaid").decode()


def test_readme_machine_versions_are_current() -> None:
    """Every example that prints the installed machine's version shows today's (kept so by
    scripts/sync_readme.py, like the mermaid block)."""
    readme = (ROOT / "README.md").read_text()
    spots = re.findall(
        r"(?:machine version |under machine |machine_version=\"|\"machine_version\":\")"
        r"([0-9a-f]{12})",
        readme,
    )
    assert len(spots) >= 4 and set(spots) == {MACHINE_VERSION}, "run scripts/sync_readme.py"


# -- one order highlighted -----------------------------------------------------------------


@pytest.mark.parametrize("name", HISTORIES)
def test_highlight_is_exactly_the_log(name: str) -> None:
    rows = HISTORIES[name]
    states, taken = keys(rows)
    hl = highlighted(rows)
    assert (hl.states, hl.edges) == (states, taken)
    assert hl.current <= hl.states
    assert highlighted(list(reversed(rows))) == hl  # read in seq order, whatever the order


def test_current_states() -> None:
    assert highlighted(COMPLETED).current == {("order", "completed")} | {
        (step, "succeeded") for step in STEP_NAMES
    }
    assert highlighted(FAILED).current == {
        ("order", "failed"),
        ("payment", "failed"),
        ("inventory", "compensated"),
        ("shipping", "compensated"),
    }
    assert highlighted(REJECTED).current == {("order", "rejected")}
    assert highlighted(RUNNING).current == {
        ("order", "steps_running"),
        ("payment", "succeeded"),
        ("inventory", "expired"),
        ("shipping", "requested"),
    }
    fresh = highlighted([])
    assert (fresh.states, fresh.edges, fresh.current) == (set(), set(), {("order", "pending")})


def test_rejected_lights_up_only_the_lookup() -> None:
    hl = highlighted(REJECTED)
    assert hl.states == {
        ("order", "pending"),
        ("order", "product_requested"),
        ("order", "rejected"),
    }
    assert hl.edges == {
        ("order", "request_product", "pending", "product_requested"),
        ("order", "product_missing", "product_requested", "rejected"),
    }


@pytest.mark.parametrize("name", HISTORIES)
def test_dot_marks_exactly_the_log(name: str) -> None:
    rows = HISTORIES[name]
    hl = highlighted(rows)
    text = render("dot", rows).decode()
    found = dot_edges(text)
    taken = {k: a for k, a in found.items() if "taken" in a.get("class", "")}
    assert set(taken) == {(node_id(s, f), t, node_id(s, d)) for s, t, f, d in hl.edges}
    for (_, trigger, _), attrs in taken.items():
        kind = edge_kind(trigger)
        assert attrs["class"] == f"taken {kind}" and attrs["color"] == diagram._COLOR[kind]
        assert attrs["penwidth"] == "3"
    assert text.count('class="taken') == len(hl.edges)
    classes = dot_classes(text)
    assert {n for n, c in classes.items() if "visited" in c} == {node_id(*k) for k in hl.states}
    assert {n for n, c in classes.items() if "current" in c} == {node_id(*k) for k in hl.current}


@pytest.mark.parametrize("name", HISTORIES)
def test_mermaid_marks_exactly_the_log(name: str) -> None:
    rows = HISTORIES[name]
    hl = highlighted(rows)
    text = render("mermaid", rows).decode()
    taken = {k: seqs for k, seqs in mermaid_edges(text).items() if seqs}
    want = {(node_id(r.scope, r.from_state), r.trigger, node_id(r.scope, r.to_state)) for r in rows}
    assert set(taken) == want
    for row in rows:  # each edge is labelled with the log's sequence numbers
        key = (node_id(row.scope, row.from_state), row.trigger, node_id(row.scope, row.to_state))
        assert str(row.seq) in taken[key].split(", ")
    classes = mermaid_classes(text)
    visited = classes.get("visited", set()) | classes.get("current", set())
    assert visited == {node_id(*k) for k in hl.states | hl.current}
    assert classes["current"] == {node_id(*k) for k in hl.current}
    assert not visited & classes.get("untouched", set())


def test_failure_and_compensation_edges_look_different_from_the_happy_path() -> None:
    taken = {
        k[1]: a
        for k, a in dot_edges(render("dot", FAILED).decode()).items()
        if "taken" in a.get("class", "")
    }
    colors = {t: a["color"] for t, a in taken.items()}
    assert colors["request"] == colors["succeed"] == diagram._COLOR["happy"]
    assert colors["fail"] == diagram._COLOR["failure"]
    assert colors["compensate"] == colors["park"] == diagram._COLOR["compensation"]
    assert len({colors["request"], colors["fail"], colors["compensate"]}) == 3
    assert all(
        a["class"] == "taken happy"
        for a in (
            a
            for k, a in dot_edges(render("dot", COMPLETED).decode()).items()
            if "taken" in a.get("class", "")
        )
    )


def test_highlighted_svg_is_xml_with_classes() -> None:
    root = ET.fromstring(render("svg", FAILED))
    classes = [el.get("class", "") for el in root.iter()]
    assert sum(c.startswith("edge taken") for c in classes) == len(highlighted(FAILED).edges)
    assert sum("current" in c.split() for c in classes) == len(highlighted(FAILED).current)


# -- HTTP ----------------------------------------------------------------------------------


@pytest.fixture
def http(tmp_path: Path) -> Iterator[tuple[TestClient, Store]]:
    settings = saga_settings(f"sqlite:///{tmp_path}/diagram.db")
    with open_store(settings) as store:
        SQLModel.metadata.create_all(store.engine)
        app = FastAPI()
        problems.install(app)  # as create_app: errors are problems
        app.include_router(router)
        app.state.store = store
        with TestClient(app) as client:
            yield client, store


async def failed_order(store: Store) -> uuid.UUID:
    order, _ = await store.create_order(
        user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1, owner="t"
    )
    for scope, trigger in [
        *STARTED,
        ("payment", "fail"),
        ("inventory", "succeed"),
        ("shipping", "fail"),
        ("order", "some_failed"),
    ]:
        await store.record_transition(order=order, owner="t", scope=scope, trigger=trigger)
    return order.id


@pytest.mark.parametrize("fmt", FORMATS)
def test_get_diagram_formats(http: tuple[TestClient, Store], fmt: str) -> None:
    client, _ = http
    response = client.get("/diagram", params={"format": fmt})
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPES[fmt]
    assert response.content == render(fmt)


def test_get_diagram_defaults_to_svg(http: tuple[TestClient, Store]) -> None:
    response = http[0].get("/diagram")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/svg+xml"
    ET.fromstring(response.content)


@pytest.mark.parametrize("path", ["/diagram", f"/orders/{ORDER_ID}/diagram"])
def test_unknown_format_is_422(http: tuple[TestClient, Store], path: str) -> None:
    response = http[0].get(path, params={"format": "jpeg"})
    assert response.status_code == 422
    assert "'svg'" in response.text and "format" in response.text


async def test_order_diagram_highlights_its_log(http: tuple[TestClient, Store]) -> None:
    client, store = http
    order_id = await failed_order(store)
    history = store.history(order_id)
    for fmt in FORMATS:
        response = client.get(f"/orders/{order_id}/diagram", params={"format": fmt})
        assert response.status_code == 200
        assert response.headers["content-type"] == CONTENT_TYPES[fmt]
        if fmt in ("mermaid", "dot"):
            assert response.content == render(fmt, history)
    assert render_for_order(store, order_id, "mermaid") == render("mermaid", history)
    text = client.get(f"/orders/{order_id}/diagram", params={"format": "mermaid"}).text
    assert (
        "compensating" in mermaid_classes(text)["current"]
        and "payment_failed" in mermaid_classes(text)["current"]
    )
    assert text.count(" (") == len(history)  # every logged move is labelled, nothing else


async def test_fresh_order_diagram_marks_pending(http: tuple[TestClient, Store]) -> None:
    client, store = http
    order, _ = await store.create_order(user_id=ORDINARY_USER_ID, product_id=WIDGET_ID, quantity=1)
    text = client.get(f"/orders/{order.id}/diagram", params={"format": "mermaid"}).text
    assert mermaid_classes(text)["current"] == {"pending"}


def test_unknown_order_is_404(http: tuple[TestClient, Store]) -> None:
    order_id = uuid.uuid4()
    response = http[0].get(f"/orders/{order_id}/diagram", params={"format": "mermaid"})
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert (body["code"], body["detail"]) == ("order_not_found", f"order {order_id} not found")


def test_malformed_order_id_is_422(http: tuple[TestClient, Store]) -> None:
    assert http[0].get("/orders/not-a-uuid/diagram").status_code == 422


async def test_graphviz_missing_is_503(
    http: tuple[TestClient, Store], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    client, store = http
    order_id = await failed_order(store)
    monkeypatch.setenv("PATH", str(tmp_path))
    response = client.get(f"/orders/{order_id}/diagram", params={"format": "png"})
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert (body["code"], body["detail"]) == ("graphviz_missing", str(GraphvizMissing()))
    assert client.get(f"/orders/{order_id}/diagram", params={"format": "dot"}).status_code == 200
