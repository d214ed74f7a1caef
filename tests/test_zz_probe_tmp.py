from tests.test_api import *  # noqa

def test_probe(client, downstream):
    downstream.fault("shipping.schedule", "delay", count=1, seconds=0.5)
    order_id = place(client, headers={"Prefer": "respond-async"}).json()["id"]
    time.sleep(0.1)
    r = client.post(f"/orders/{order_id}/resume")
    print("RESUME", r.status_code, r.text[:300])
    final = wait_terminal(client, order_id, timeout=3)
    print("FINAL", final["status"])
    print("EFFECTS", order_effects(downstream, order_id))
    log = client.get(f"/orders/{order_id}/transitions").json()
    print([(t["scope"], t["trigger"]) for t in log])
