"""Validates every kind of resource Baton serves against FHIR's R4B models (fhir.resources);
run by tests/clients.rs.

R4B (4.3) differs from R4 (4.0.1) in none of the elements Baton writes on CapabilityStatement,
Task, Subscription, Bundle, Parameters and OperationOutcome, so the R4B models stand in for R4
ones (fhir.resources ships no R4 package). SubscriptionTopic, which R4 lacks, is checked with
R4B's own SubscriptionTopic model; the topics R4 clients read, Basic resources wrapping them as
the backport IG shows, with the Basic model. The models refuse unknown elements, wrong types and wrong
cardinalities; they do not check invariants or terminology bindings.

Reads BATON_URL (the FHIR base) and BATON_TOKEN (an admin bearer token). The server must let
rest-hooks reach loopback over plain http: the notifications are received on a local endpoint
this script runs. Prints every failure, then exits non-zero if there was one.
"""

import json
import os
import sys
import urllib.error
import urllib.request

import endpoint
from fhir.resources.R4B import construct_fhir_element

BASE = os.environ["BATON_URL"].rstrip("/")
TOKEN = os.environ["BATON_TOKEN"]
FAILURES = []
CHECKED = []


def call(method, path, body=None, content_type="application/fhir+json"):
    url = path if path.startswith("http") else f"{BASE}/{path.lstrip('/')}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Authorization", f"Bearer {TOKEN}")
    request.add_header("Accept", "application/fhir+json")
    if data is not None:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as error:
        raw = error.read()
        return error.code, json.loads(raw) if raw else None


def expect(status, wanted, what, body):
    if status != wanted:
        print(f"r4 validator: {what} answered {status}, not {wanted}: {body}", file=sys.stderr)
        sys.exit(1)
    return body


def validate(what, resource):
    CHECKED.append(what)
    try:
        construct_fhir_element(resource["resourceType"], resource)
    except Exception as error:  # the models raise pydantic's errors
        FAILURES.append(f"{what}: {error}")


def wait_for(what, check):
    found = endpoint.wait_for(check)
    if found is None:
        print(f"r4 validator: timed out waiting for {what}", file=sys.stderr)
        sys.exit(1)
    return found


def notification_type(body):
    bundle = json.loads(body)
    for parameter in bundle["entry"][0]["resource"]["parameter"]:
        if parameter["name"] == "type":
            return parameter["valueCode"]
    return None


def main():
    _server, hook = endpoint.start()

    status, capability = call("GET", "metadata")
    validate("CapabilityStatement", expect(status, 200, "metadata", capability))

    status, wrapped = call("GET", "Basic?code=http://hl7.org/fhir/fhir-types%7CSubscriptionTopic")
    expect(status, 200, "Basic topic search", wrapped)
    if not wrapped.get("entry"):
        FAILURES.append("Basic?code=…|SubscriptionTopic: no topics found")
    for entry in wrapped.get("entry", []):
        validate(f"Basic (topic) {entry['resource']['id']}", entry["resource"])

    status, topics = call("GET", "SubscriptionTopic")
    validate("SubscriptionTopic search", expect(status, 200, "topic search", topics))
    for entry in topics.get("entry", []):
        validate(f"SubscriptionTopic {entry['resource']['id']}", entry["resource"])

    backport = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/"
    topic_subscription = {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "R4 validation",
        "criteria": f"{BASE}/SubscriptionTopic/task-changed",
        "channel": {
            "type": "rest-hook",
            "endpoint": f"{hook}/topic",
            "payload": "application/fhir+json",
            "_payload": {"extension": [
                {"url": backport + "backport-payload-content", "valueCode": "full-resource"},
            ]},
        },
    }
    status, created = call("POST", "Subscription", topic_subscription)
    topic_id = expect(status, 201, "topic Subscription create", created)["id"]
    validate("Subscription (topic)", created)
    classic = {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "R4 validation, classic",
        "criteria": "Task?status=requested",
        "channel": {
            "type": "rest-hook",
            "endpoint": f"{hook}/classic",
            "payload": "application/fhir+json",
        },
    }
    status, created = call("POST", "Subscription", classic)
    classic_id = expect(status, 201, "classic Subscription create", created)["id"]
    validate("Subscription (classic)", created)
    status, read = call("GET", f"Subscription/{classic_id}")
    validate("Subscription (classic) read", expect(status, 200, "Subscription read", read))

    _, _, handshake = wait_for(
        "the handshake",
        lambda r: r[1] == "/topic" and notification_type(r[2]) == "handshake",
    )
    validate("handshake Bundle", json.loads(handshake))

    task = {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "description": "validated",
        "owner": {"reference": "Practitioner/validator"},
    }
    status, created = call("POST", "Task", task)
    task_id = expect(status, 201, "Task create", created)["id"]
    validate("Task (create answer)", created)
    _, _, notification = wait_for(
        "a notification",
        lambda r: r[1] == "/topic" and notification_type(r[2]) == "event-notification",
    )
    validate("notification Bundle (full-resource)", json.loads(notification))
    _, _, put = wait_for(
        "the classic PUT",
        lambda r: r[0] == "PUT" and r[1] == f"/classic/Task/{task_id}",
    )
    validate("classic notification (Task)", json.loads(put))

    for what, path in [
        ("Task read", f"Task/{task_id}"),
        ("searchset", "Task?status=requested&_count=1"),
        ("searchset (_include, _revinclude)", "Task?_revinclude=Task:part-of&_include=Task:part-of"),
        ("history (instance)", f"Task/{task_id}/_history"),
        ("history (type)", "Task/_history?_count=5"),
        ("Subscription search", "Subscription"),
        ("$status", f"Subscription/{topic_id}/$status"),
        ("$events", f"Subscription/{topic_id}/$events"),
        ("$status (classic)", f"Subscription/{classic_id}/$status"),
        ("SubscriptionTopic read", "SubscriptionTopic/task-changed"),
        ("Basic-wrapped topics (search)", "Basic?code=http://hl7.org/fhir/fhir-types%7CSubscriptionTopic"),
        ("Basic-wrapped topic (read)", "Basic/task-changed"),
        ("history (instance, _summary=true)", f"Task/{task_id}/_history?_summary=true"),
        ("history (type, _summary=data)", "Task/_history?_count=5&_summary=data"),
        ("history (instance, _summary=count)", f"Task/{task_id}/_history?_summary=count"),
    ]:
        status, body = call("GET", path)
        validate(what, expect(status, 200, path, body))

    transaction = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:8f3a1c2e-0000-4000-8000-000000000001",
                "resource": dict(task, description="parent"),
                "request": {"method": "POST", "url": "Task"},
            },
            {
                "resource": dict(
                    task,
                    description="child",
                    partOf=[{"reference": "urn:uuid:8f3a1c2e-0000-4000-8000-000000000001"}],
                ),
                "request": {"method": "POST", "url": "Task"},
            },
        ],
    }
    status, body = call("POST", BASE, transaction)
    validate("transaction-response", expect(status, 200, "transaction", body))
    batch = dict(transaction, type="batch", entry=[transaction["entry"][0]])
    status, body = call("POST", BASE, batch)
    validate("batch-response", expect(status, 200, "batch", body))

    status, body = call("POST", "Task", {"resourceType": "Task", "status": "nonsense"})
    validate("OperationOutcome", expect(status, 400, "bad Task", body))

    for failure in FAILURES:
        print(f"r4 validator: {failure}", file=sys.stderr)
    if FAILURES:
        sys.exit(1)
    print(f"r4 validator: {len(CHECKED)} resources valid: ok")


if __name__ == "__main__":
    main()
