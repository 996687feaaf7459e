//! Every Task search parameter and modifier over HTTP, paging to the last page, sorting,
//! `_summary=count`, `_total` and `_revinclude=Task:part-of(:iterate)`.

mod common;

use std::collections::BTreeSet;

use common::{TestServer, assert_outcome, match_ids};
use reqwest::StatusCode;
use serde_json::{Value, json};

struct Fixture {
    server: TestServer,
    admin: String,
    /// Task ids by the label used in the expectations.
    ids: std::collections::HashMap<&'static str, String>,
}

async fn fixture() -> Fixture {
    let server = TestServer::start().await;
    let admin = server.admin();
    let roles = "http://terminology.hl7.org/CodeSystem/task-performer-type";
    let tasks: Vec<(&'static str, Value)> = vec![
        (
            "lab1",
            json!({
                "resourceType": "Task", "status": "requested", "intent": "order", "priority": "stat",
                "owner": { "reference": "Practitioner/alice" },
                "performerType": [{ "coding": [{ "system": roles, "code": "performer" }] }],
                "for": { "reference": "Patient/p1" },
                "requester": { "reference": "Practitioner/placer" },
                "code": { "coding": [{ "system": "http://loinc.org", "code": "1975-2" }] },
                "businessStatus": { "coding": [{ "system": "http://example.org/bs", "code": "specimen-received" }] },
                "identifier": [{ "system": "http://lab.example/orders", "value": "L-1" }],
                "authoredOn": "2024-03-01T08:00:00Z",
                "lastModified": "2024-03-02T09:30:00Z",
                "executionPeriod": { "start": "2024-03-01T10:00:00Z", "end": "2024-03-01T12:00:00Z" },
                "basedOn": [{ "reference": "ServiceRequest/sr1" }],
                "focus": { "reference": "ServiceRequest/sr1" },
            }),
        ),
        (
            "lab2",
            json!({
                "resourceType": "Task", "status": "completed", "intent": "order", "priority": "routine",
                "owner": { "reference": "Practitioner/alice" },
                "for": { "reference": "Patient/p2" },
                "code": { "coding": [{ "system": "http://loinc.org", "code": "2345-7" }] },
                "authoredOn": "2024-04-15",
                "executionPeriod": { "start": "2024-04-16T00:00:00Z" },
            }),
        ),
        (
            "queue",
            json!({
                "resourceType": "Task", "status": "requested", "intent": "order", "priority": "urgent",
                "performerType": [{ "coding": [{ "system": roles, "code": "performer" }] }],
                "for": { "reference": "Group/ward-7" },
                "authoredOn": "2024-05-01T00:00:00+02:00",
                "extension": [
                    { "url": "https://baton.dev/fhir/StructureDefinition/task-focus", "valueReference": { "reference": "MedicationRequest/m1" } },
                    { "url": "https://baton.dev/fhir/StructureDefinition/task-focus", "valueReference": { "reference": "MedicationRequest/m2" } }
                ],
            }),
        ),
        (
            "rad",
            json!({
                "resourceType": "Task", "status": "in-progress", "intent": "plan", "priority": "asap",
                "owner": { "reference": "Organization/radiology" },
                "requester": { "reference": "Practitioner/placer" },
                "for": { "reference": "Patient/p1" },
                "identifier": [{ "value": "no-system" }],
            }),
        ),
    ];
    let mut ids = std::collections::HashMap::new();
    for (label, t) in tasks {
        let created = server.create_task(&t).await;
        ids.insert(label, created["id"].as_str().unwrap().to_string());
    }
    // A coordination task with a sub-task tree: parent <- child <- grandchild.
    let parent = server
        .create_task(&json!({"resourceType": "Task", "status": "requested", "intent": "plan"}))
        .await;
    let parent_id = parent["id"].as_str().unwrap().to_string();
    let child = server
        .create_task(
            &json!({"resourceType": "Task", "status": "requested", "intent": "order",
        "partOf": [{ "reference": format!("Task/{parent_id}") }]}),
        )
        .await;
    let child_id = child["id"].as_str().unwrap().to_string();
    let grandchild = server
        .create_task(
            &json!({"resourceType": "Task", "status": "requested", "intent": "order",
        "partOf": [{ "reference": format!("{}/Task/{child_id}", server.base) }]}),
        )
        .await;
    ids.insert("parent", parent_id);
    ids.insert("child", child_id);
    ids.insert("grandchild", grandchild["id"].as_str().unwrap().to_string());
    Fixture { server, admin, ids }
}

#[tokio::test]
async fn every_parameter_and_modifier() {
    let f = fixture().await;
    let all = [
        "lab1",
        "lab2",
        "queue",
        "rad",
        "parent",
        "child",
        "grandchild",
    ];
    let cases: Vec<(String, Vec<&str>)> = vec![
        (format!("_id={}", f.ids["lab1"]), vec!["lab1"]),
        (
            format!("_id={},{}", f.ids["lab1"], f.ids["rad"]),
            vec!["lab1", "rad"],
        ),
        (
            "status=requested".into(),
            vec!["lab1", "queue", "parent", "child", "grandchild"],
        ),
        ("status=completed,in-progress".into(), vec!["lab2", "rad"]),
        ("status:not=requested".into(), vec!["lab2", "rad"]),
        (
            "status:not=requested&status:not=completed".into(),
            vec!["rad"],
        ),
        (
            "status=http://hl7.org/fhir/task-status|completed".into(),
            vec!["lab2"],
        ),
        ("business-status=specimen-received".into(), vec!["lab1"]),
        (
            "business-status=http://example.org/bs|specimen-received".into(),
            vec!["lab1"],
        ),
        ("owner=Practitioner/alice".into(), vec!["lab1", "lab2"]),
        ("owner=alice".into(), vec!["lab1", "lab2"]),
        (
            format!("owner={}/Practitioner/alice", f.server.base),
            vec!["lab1", "lab2"],
        ),
        (
            "owner:missing=true".into(),
            vec!["queue", "parent", "child", "grandchild"],
        ),
        ("owner:missing=false".into(), vec!["lab1", "lab2", "rad"]),
        (
            "owner:missing=true&performer=performer".into(),
            vec!["queue"],
        ),
        (
            "performer=http://terminology.hl7.org/CodeSystem/task-performer-type|performer".into(),
            vec!["lab1", "queue"],
        ),
        ("performer=http://other|performer".into(), vec![]),
        ("patient=Patient/p1".into(), vec!["lab1", "rad"]),
        ("patient=p2".into(), vec!["lab2"]),
        ("subject=Group/ward-7".into(), vec!["queue"]),
        ("focus=ServiceRequest/sr1".into(), vec!["lab1"]),
        ("focus=MedicationRequest/m2".into(), vec!["queue"]),
        (format!("part-of=Task/{}", f.ids["parent"]), vec!["child"]),
        (format!("part-of={}", f.ids["child"]), vec!["grandchild"]),
        ("based-on=ServiceRequest/sr1".into(), vec!["lab1"]),
        ("requester=Practitioner/placer".into(), vec!["lab1", "rad"]),
        ("code=1975-2".into(), vec!["lab1"]),
        ("code=http://loinc.org|".into(), vec!["lab1", "lab2"]),
        ("code:not=1975-2&code:missing=false".into(), vec!["lab2"]),
        ("priority=stat,asap".into(), vec!["lab1", "rad"]),
        ("intent=plan".into(), vec!["rad", "parent"]),
        (
            "identifier=http://lab.example/orders|L-1".into(),
            vec!["lab1"],
        ),
        ("identifier=L-1".into(), vec!["lab1"]),
        ("identifier=|no-system".into(), vec!["rad"]),
        ("authored-on=2024-03".into(), vec!["lab1"]),
        ("authored-on=ge2024-04-01".into(), vec!["lab2", "queue"]),
        ("authored-on=lt2024-04-15".into(), vec!["lab1"]),
        (
            "authored-on=gt2024-04-15&authored-on=le2024-05-01".into(),
            vec!["queue"],
        ),
        ("authored-on=2024-04-30T22:00:00Z".into(), vec!["queue"]),
        (
            "authored-on:missing=true".into(),
            vec!["rad", "parent", "child", "grandchild"],
        ),
        ("modified=2024-03-02".into(), vec!["lab1"]),
        ("period=2024-03-01".into(), vec!["lab1"]),
        ("period=ge2025-01-01".into(), vec!["lab2"]),
        ("period=sa2024-03-01T12:00:00Z".into(), vec!["lab2"]),
        ("period=eb2024-04-16".into(), vec!["lab1"]),
        ("_lastUpdated=gt2020-01-01".into(), all.to_vec()),
        ("_lastUpdated=lt2020-01-01".into(), vec![]),
        (
            "status=requested&owner=Practitioner/alice&code=1975-2&priority=stat".into(),
            vec!["lab1"],
        ),
    ];
    for (query, expected) in cases {
        let got: BTreeSet<String> = f
            .server
            .search_ids(&query, &f.admin)
            .await
            .into_iter()
            .collect();
        let want: BTreeSet<String> = expected.iter().map(|l| f.ids[l].clone()).collect();
        assert_eq!(got, want, "query {query}");
    }
    // POST _search answers the same as GET.
    let r = f
        .server
        .request(reqwest::Method::POST, "/Task/_search", &f.admin)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("status=completed")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let bundle: Value = r.json().await.unwrap();
    assert_eq!(match_ids(&bundle), vec![f.ids["lab2"].clone()]);
    f.server.stop().await;
}

#[tokio::test]
async fn sorting_totals_and_revinclude() {
    let f = fixture().await;
    let ids = f.server.search_ids("_sort=-priority", &f.admin).await;
    let label = |id: &String| {
        f.ids
            .iter()
            .find(|(_, v)| *v == id)
            .map(|(k, _)| *k)
            .unwrap()
    };
    let order: Vec<&str> = ids.iter().map(label).collect();
    assert_eq!(
        &order[..3],
        ["lab1", "rad", "queue"],
        "stat, asap, urgent first"
    );
    let order: Vec<&str> = f
        .server
        .search_ids("_sort=authored-on&authored-on:missing=false", &f.admin)
        .await
        .iter()
        .map(label)
        .collect();
    assert_eq!(order, ["lab1", "lab2", "queue"]);
    // Newest first; Tasks written in the same millisecond share a lastUpdated and are then
    // ordered by id, so the check is on the order of (lastUpdated, id), not on which Task the
    // fixture happened to write last.
    let (_, newest_first) = f.server.get("/Task?_sort=-_lastUpdated", &f.admin).await;
    let keys: Vec<(String, String)> = newest_first["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let r = &e["resource"];
            (
                r["meta"]["lastUpdated"].as_str().unwrap().to_string(),
                r["id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(keys.len(), f.ids.len(), "{newest_first}");
    for pair in keys.windows(2) {
        let ((newer, a), (older, b)) = (&pair[0], &pair[1]);
        assert!(
            newer > older || (newer == older && a < b),
            "not newest first with ties by id: {keys:?}"
        );
    }
    let newest = &keys[0].0;
    let grandchild = &f.ids["grandchild"];
    assert!(
        keys.iter().any(|(at, id)| at == newest && id == grandchild),
        "the last Task written is among the newest: {keys:?}"
    );

    let (_, count) = f
        .server
        .get("/Task?status=requested&_summary=count", &f.admin)
        .await;
    assert_eq!(count["total"], 5);
    assert!(count.get("entry").is_none());
    let (_, no_total) = f.server.get("/Task?_total=none", &f.admin).await;
    assert!(no_total.get("total").is_none());

    let (_, tree) = f
        .server
        .get(
            &format!(
                "/Task?_id={}&_revinclude:iterate=Task:part-of",
                f.ids["parent"]
            ),
            &f.admin,
        )
        .await;
    let included: BTreeSet<String> = tree["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["search"]["mode"] == "include")
        .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        included,
        BTreeSet::from([f.ids["child"].clone(), f.ids["grandchild"].clone()])
    );
    let (_, one_level) = f
        .server
        .get(
            &format!("/Task?_id={}&_revinclude=Task:part-of", f.ids["parent"]),
            &f.admin,
        )
        .await;
    assert_eq!(
        one_level["entry"].as_array().unwrap().len(),
        2,
        "match + direct child"
    );
    f.server.stop().await;
}

#[tokio::test]
async fn paging_reaches_the_last_page() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let mut created = BTreeSet::new();
    for i in 0..23 {
        let t = json!({"resourceType": "Task", "status": "requested", "intent": "order",
            "identifier": [{ "system": "http://paging", "value": format!("{i}") }]});
        created.insert(
            server.create_task(&t).await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let (_, mut page) = server
        .get(
            "/Task?identifier=http://paging|&_count=5&_sort=_lastUpdated",
            &admin,
        )
        .await;
    assert_eq!(page["total"], 23);
    let last = page["link"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "last")
        .unwrap()["url"]
        .as_str()
        .unwrap()
        .to_string();
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        pages += 1;
        seen.extend(match_ids(&page));
        let next = page["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
            .map(|l| l["url"].as_str().unwrap().to_string());
        match next {
            Some(url) => page = server.get(&url, &admin).await.1,
            None => break,
        }
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(pages, 5);
    assert_eq!(seen.len(), 23, "no duplicates or gaps across pages");
    assert_eq!(seen.iter().cloned().collect::<BTreeSet<_>>(), created);
    let (_, last_page) = server.get(&last, &admin).await;
    assert_eq!(match_ids(&last_page).len(), 3);
    server.stop().await;
}

#[tokio::test]
async fn bad_search_parameters_are_explained() {
    let server = TestServer::start().await;
    let admin = server.admin();
    // Bad values and unsupported modifiers of known parameters are refused whatever the
    // handling: ignoring them would widen the result.
    for query in [
        "status:exact=requested",
        "authored-on=yesterday",
        "authored-on=xx2024-01-01",
        "_count=many",
        "_sort=description",
        "_summary=maybe",
        "_summary=true&_elements=status",
        "_elements=note.text",
        "_revinclude=Task:owner",
        "owner:missing=maybe",
    ] {
        for prefer in ["handling=lenient", "handling=strict"] {
            let r = server
                .request(reqwest::Method::GET, &format!("/Task?{query}"), &admin)
                .header("prefer", prefer)
                .send()
                .await
                .unwrap();
            let (status, outcome) = common::body(r).await;
            assert_eq!(
                status,
                StatusCode::BAD_REQUEST,
                "{query} {prefer}: {outcome}"
            );
            assert_eq!(outcome["resourceType"], "OperationOutcome", "{query}");
        }
    }
    // Strict handling refuses an unknown parameter, naming it.
    let r = server
        .request(reqwest::Method::GET, "/Task?colour=red", &admin)
        .header("prefer", "handling=strict")
        .send()
        .await
        .unwrap();
    let (status, outcome) = common::body(r).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_outcome(&outcome, "not-supported");
    assert!(outcome.to_string().contains("colour"), "{outcome}");
    server.stop().await;
}

#[tokio::test]
async fn unknown_parameters_are_ignored_by_default_and_left_out_of_self() {
    let f = fixture().await;
    let (server, admin) = (&f.server, &f.admin);
    let strict_ids = server.search_ids("status=completed", admin).await;
    assert_eq!(strict_ids, vec![f.ids["lab2"].clone()]);
    for prefer in [None, Some("handling=lenient")] {
        let mut request = server.request(
            reqwest::Method::GET,
            "/Task?colour=red&status=completed&_totalMethod=count&_elements=id",
            admin,
        );
        if let Some(prefer) = prefer {
            request = request.header("prefer", prefer);
        }
        let (status, bundle) = common::body(request.send().await.unwrap()).await;
        assert_eq!(status, StatusCode::OK, "{prefer:?}: {bundle}");
        assert_eq!(match_ids(&bundle), strict_ids, "{prefer:?}");
        let self_link = bundle["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "self")
            .unwrap()["url"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(self_link.contains("status=completed"), "{self_link}");
        assert!(!self_link.contains("colour"), "{self_link}");
        assert!(!self_link.contains("_totalMethod"), "{self_link}");
    }
    // fhirpy's count(): `_count=0` with `_totalMethod=count`, read from `total`.
    let (status, bundle) = server
        .get("/Task?status=requested&_totalMethod=count&_count=0", admin)
        .await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    assert_eq!(bundle["total"], 5);
    assert!(bundle.get("entry").is_none(), "{bundle}");
    for total in ["none", "estimate", "accurate"] {
        let (status, bundle) = server
            .get(&format!("/Task?status=requested&_total={total}"), admin)
            .await;
        assert_eq!(status, StatusCode::OK, "{bundle}");
        if total == "none" {
            assert!(bundle.get("total").is_none(), "{bundle}");
        } else {
            assert_eq!(bundle["total"], 5, "{total}");
        }
    }
    f.server.stop().await;
}

#[tokio::test]
async fn summary_and_elements_subset_reads_and_searches() {
    let f = fixture().await;
    let (server, admin) = (&f.server, &f.admin);
    let lab1 = &f.ids["lab1"];
    let subsetted = |resource: &Value| {
        resource["meta"]["tag"].as_array().is_some_and(|tags| {
            tags.iter().any(|t| {
                t["system"] == "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
                    && t["code"] == "SUBSETTED"
            })
        })
    };
    let keys = |resource: &Value| {
        let mut keys: Vec<String> = resource.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        keys
    };
    let (_, whole) = server.get(&format!("/Task/{lab1}"), admin).await;
    assert!(!subsetted(&whole), "{whole}");
    for (query, present, absent) in [
        (
            "_elements=owner,priority",
            vec!["owner", "priority", "status", "intent", "id"],
            vec!["code", "for"],
        ),
        (
            "_summary=true",
            vec!["owner", "code", "for", "status"],
            vec!["priority", "performerType"],
        ),
        (
            "_summary=data",
            vec!["owner", "priority", "performerType"],
            vec!["text"],
        ),
        (
            "_summary=text",
            vec!["status", "intent", "id"],
            vec!["owner", "code"],
        ),
    ] {
        // The same subset on a read and on a search's matches.
        let (status, read) = server.get(&format!("/Task/{lab1}?{query}"), admin).await;
        assert_eq!(status, StatusCode::OK, "{query}: {read}");
        let (status, bundle) = server
            .get(&format!("/Task?_id={lab1}&{query}"), admin)
            .await;
        assert_eq!(status, StatusCode::OK, "{query}: {bundle}");
        let found = &bundle["entry"][0]["resource"];
        assert_eq!(keys(&read), keys(found), "{query}");
        for resource in [&read, found] {
            assert!(subsetted(resource), "{query}: {resource}");
            for element in &present {
                assert!(
                    resource.get(*element).is_some(),
                    "{query}: {element} in {resource}"
                );
            }
            for element in &absent {
                assert!(
                    resource.get(*element).is_none(),
                    "{query}: no {element} in {resource}"
                );
            }
        }
        let self_link = bundle["link"][0]["url"].as_str().unwrap();
        assert!(
            self_link.contains(query.split('=').next().unwrap()),
            "{self_link}"
        );
    }
    let (status, read) = server
        .get(&format!("/Task/{lab1}?_summary=false"), admin)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(read, whole);
    for query in [
        "_summary=maybe",
        "_summary=true&_elements=owner",
        "_elements=owner.reference",
    ] {
        let (status, outcome) = server.get(&format!("/Task/{lab1}?{query}"), admin).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {outcome}");
    }
    f.server.stop().await;
}

#[tokio::test]
async fn includes_add_the_parent_and_based_on_tasks_under_the_read_rule() {
    let server = TestServer::start().await;
    let admin = server.admin();
    let alice = server.practitioner("Practitioner/alice");
    let id_of = |t: &Value| t["id"].as_str().unwrap().to_string();
    // Parent owned by alice, a plan owned by bob; the child is alice's, part of the first
    // and based on the second (and on a ServiceRequest, which is not followed).
    let parent = id_of(
        &server
            .create_task(&common::task("requested", Some("Practitioner/alice")))
            .await,
    );
    let plan = id_of(
        &server
            .create_task(&common::task("requested", Some("Practitioner/bob")))
            .await,
    );
    let mut child = common::task("requested", Some("Practitioner/alice"));
    child["partOf"] = json!([{ "reference": format!("Task/{parent}") }]);
    child["basedOn"] = json!([
        { "reference": format!("{}/Task/{plan}", server.base) },
        { "reference": "ServiceRequest/sr1" },
    ]);
    let child = id_of(&server.create_task(&child).await);
    let included = |bundle: &Value| -> BTreeSet<String> {
        bundle["entry"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["search"]["mode"] == "include")
            .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
            .collect()
    };
    let (status, bundle) = server
        .get(&format!("/Task?_id={child}&_include=Task:part-of"), &admin)
        .await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    assert_eq!(match_ids(&bundle), vec![child.clone()]);
    assert_eq!(included(&bundle), BTreeSet::from([parent.clone()]));
    let (_, bundle) = server
        .get(
            &format!("/Task?_id={child}&_include=Task:part-of&_include=Task:based-on"),
            &admin,
        )
        .await;
    assert_eq!(
        included(&bundle),
        BTreeSet::from([parent.clone(), plan.clone()])
    );
    assert!(
        bundle["link"][0]["url"]
            .as_str()
            .unwrap()
            .contains("_include=Task%3Abased-on"),
        "{bundle}"
    );
    // Alice may not read bob's plan: it is left out, as a search would leave it out.
    let (_, bundle) = server
        .get(
            &format!("/Task?_id={child}&_include=Task:part-of&_include=Task:based-on"),
            &alice,
        )
        .await;
    assert_eq!(included(&bundle), BTreeSet::from([parent.clone()]));
    // A Task already matched is not repeated as an include.
    let url = format!("/Task?_id={child},{parent}&_include=Task:part-of");
    let (_, bundle) = server.get(&url, &admin).await;
    assert_eq!(bundle["entry"].as_array().unwrap().len(), 2, "{bundle}");
    assert!(included(&bundle).is_empty());
    server.stop().await;
}

#[tokio::test]
async fn iterated_includes_follow_the_chain_up_within_the_limits_and_the_read_rule() {
    let server = TestServer::start_with(|c| {
        c.search.max_include_depth = 3;
        c.search.max_included = 4;
    })
    .await;
    let admin = server.admin();
    let alice = server.practitioner("Practitioner/alice");
    let id_of = |t: &Value| t["id"].as_str().unwrap().to_string();
    // A chain t0 <- t1 <- … <- t5 by partOf, all alice's but t1 (bob's); t5 is also based on
    // a plan, itself part of a programme.
    let programme = id_of(&server.create_task(&common::task("requested", None)).await);
    let mut plan = common::task("requested", None);
    plan["partOf"] = json!([{ "reference": format!("Task/{programme}") }]);
    let plan = id_of(&server.create_task(&plan).await);
    let mut chain: Vec<String> = Vec::new();
    for i in 0..6 {
        let owner = if i == 1 {
            "Practitioner/bob"
        } else {
            "Practitioner/alice"
        };
        let mut t = common::task("requested", Some(owner));
        if let Some(previous) = chain.last() {
            t["partOf"] = json!([{ "reference": format!("Task/{previous}") }]);
        }
        if i == 5 {
            t["basedOn"] = json!([{ "reference": format!("Task/{plan}") }]);
        }
        chain.push(id_of(&server.create_task(&t).await));
    }
    let search = |query: String, token: String| {
        let server = &server;
        async move {
            let (status, bundle) = server.get(&format!("/Task?{query}"), &token).await;
            assert_eq!(status, StatusCode::OK, "{query}: {bundle}");
            let entries = bundle["entry"].as_array().cloned().unwrap_or_default();
            let included: Vec<String> = entries
                .iter()
                .filter(|e| e["search"]["mode"] == "include")
                .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
                .collect();
            let warning = entries
                .iter()
                .find(|e| e["search"]["mode"] == "outcome")
                .map(|e| e["resource"]["issue"][0]["diagnostics"].to_string());
            (bundle, included, warning)
        }
    };
    let t = |i: usize| chain[i].clone();

    // One step without :iterate; the whole chain within the depth with it, and no warning.
    let (_, included, warning) =
        search(format!("_id={}&_include=Task:part-of", t(3)), admin.clone()).await;
    assert_eq!((included, warning), (vec![t(2)], None));
    let (bundle, included, warning) = search(
        format!("_id={}&_include:iterate=Task:part-of", t(3)),
        admin.clone(),
    )
    .await;
    assert_eq!((included, warning), (vec![t(2), t(1), t(0)], None));
    assert!(
        bundle["link"][0]["url"]
            .as_str()
            .unwrap()
            .contains("_include%3Aiterate=Task%3Apart-of"),
        "{bundle}"
    );
    // Deeper than search.max_include_depth: three levels, and a warning saying so.
    let (_, included, warning) = search(
        format!("_id={}&_include:iterate=Task:part-of", t(4)),
        admin.clone(),
    )
    .await;
    assert_eq!(included, [t(3), t(2), t(1)]);
    assert!(
        warning.unwrap().contains("search.max_include_depth"),
        "a capped chain says so"
    );
    // Two iterated includes fan out; search.max_included caps them, and says so.
    let (_, included, warning) = search(
        format!(
            "_id={}&_include:iterate=Task:part-of&_include:iterate=Task:based-on",
            t(5)
        ),
        admin.clone(),
    )
    .await;
    // (Each level's Tasks come in the store's order.)
    assert_eq!(
        included.iter().cloned().collect::<BTreeSet<String>>(),
        BTreeSet::from([t(4), plan.clone(), t(3), programme.clone()])
    );
    assert_eq!(
        included[2..].iter().cloned().collect::<BTreeSet<String>>(),
        BTreeSet::from([t(3), programme.clone()])
    );
    assert!(warning.unwrap().contains("search.max_included"));
    // The read rule holds at every level: bob's t1 ends alice's chain (t0 is not reached).
    let (_, included, _) = search(
        format!("_id={}&_include:iterate=Task:part-of", t(3)),
        alice.clone(),
    )
    .await;
    assert_eq!(included, [t(2)]);
    server.stop().await;
}
