"""Drives a running Baton with fhirpy, as a Python integrator would; run by tests/clients.rs.

Reads BATON_URL (the FHIR base) and BATON_TOKEN (an admin bearer token) from the environment,
exits non-zero with a message on the first thing that does not behave as fhirpy expects.
"""

import json
import os
import sys
import time

import endpoint
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import ResourceNotFound


def check(condition, message):
    if not condition:
        print(f"fhirpy driver: {message}", file=sys.stderr)
        sys.exit(1)


def classic_subscription(client):
    """A classic R4 subscription (criteria a search), saved with fhirpy, received locally."""
    server, hook = endpoint.start()
    subscription = client.resource(
        "Subscription",
        status="requested",
        reason="fhirpy classic subscription",
        criteria="Task?owner=Practitioner/fhirpy-classic",
        channel={
            "type": "rest-hook",
            "endpoint": f"{hook}/fhir",
            "payload": "application/fhir+json",
        },
    )
    subscription.save()
    check(subscription["status"] == "active", f"classic subscription is {subscription['status']}")
    client.resource("Task", status="requested", intent="order",
                    owner={"reference": "Practitioner/elsewhere"}).save()
    task = client.resource("Task", status="requested", intent="order",
                           owner={"reference": "Practitioner/fhirpy-classic"})
    task.save()
    first = endpoint.wait_for(lambda request: True)
    check(first, "the classic subscription sent nothing")
    method, path, body = first
    check((method, path) == ("PUT", f"/fhir/Task/{task.id}"), f"received {method} {path}")
    check(json.loads(body)["id"] == task.id, f"received {body!r}")
    time.sleep(0.2)
    check(len(endpoint.received()) == 1, f"received {endpoint.received()}")
    server.shutdown()


def main():
    base = os.environ["BATON_URL"]
    client = SyncFHIRClient(base, authorization=f"Bearer {os.environ['BATON_TOKEN']}")

    # Create five Tasks, read one back.
    created = []
    for n in range(5):
        task = client.resource(
            "Task",
            status="requested",
            intent="order",
            description=f"fhirpy task {n}",
            owner={"reference": "Practitioner/fhirpy"},
        )
        task.save()
        check(task.id, "a created Task has no id")
        created.append(task)
    since = created[0]["meta"]["lastUpdated"]
    read = client.reference("Task", created[0].id).to_resource()
    check(read["description"] == "fhirpy task 0", f"read back {read}")

    # count() sends _count=0&_totalMethod=count and reads Bundle.total.
    tasks = client.resources("Task").search(owner="Practitioner/fhirpy")
    check(tasks.count() == 5, f"count() gave {tasks.count()}")
    check(
        tasks.search(status="completed").count() == 0,
        "count() with a filter that matches nothing",
    )

    # Paging to the end: iterating follows the next links.
    seen = [t.id for t in tasks.limit(2)]
    check(sorted(seen) == sorted(t.id for t in created), f"paging gave {seen}")
    check(len(tasks.limit(2).fetch_all()) == 5, "fetch_all() did not page to the end")

    # Update (PUT), then patch() in both of fhirpy's forms (application/json, a partial
    # resource: read as a merge patch).
    task = created[1]
    task["description"] = "updated by fhirpy"
    task.save()
    check(task["meta"]["versionId"] == "2", f"update gave {task['meta']}")
    task.patch(status="accepted")
    check(task["status"] == "accepted", f"resource patch() gave {task['status']}")
    patched = client.patch("Task", task.id, status="in-progress", note=[{"text": "patched"}])
    check(patched["status"] == "in-progress", f"client patch() gave {patched}")
    check(patched["description"] == "updated by fhirpy", "patch() lost an element")
    check(patched["meta"]["versionId"] == "4", f"patch() gave {patched['meta']}")

    # Delete: a read is then 410, which fhirpy reports as not found.
    created[2].delete()
    try:
        client.reference("Task", created[2].id).to_resource()
        check(False, "a deleted Task was still readable")
    except ResourceNotFound:
        pass

    # Polling the type-level history since the first create, following next links.
    entries = []
    page = client.execute("Task/_history", method="get", params={"_since": since, "_count": 3})
    while True:
        check(page["type"] == "history", f"history gave {page['type']}")
        entries.extend(page.get("entry", []))
        nexts = [link["url"] for link in page["link"] if link["relation"] == "next"]
        if not nexts:
            break
        page = client.execute(nexts[0], method="get")
    check(len(entries) == 5 + 3 + 1, f"history has {len(entries)} entries")
    deletes = [e for e in entries if e["request"]["method"] == "DELETE"]
    check(
        len(deletes) == 1 and deletes[0]["request"]["url"] == f"Task/{created[2].id}",
        f"history deletes: {deletes}",
    )
    check("resource" not in deletes[0], "a deletion entry carries a resource")
    stamps = [e["response"]["lastModified"] for e in entries]
    check(stamps == sorted(stamps, reverse=True), "history is not newest first")

    classic_subscription(client)
    print("fhirpy driver: ok")


if __name__ == "__main__":
    main()
