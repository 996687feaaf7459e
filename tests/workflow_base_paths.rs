//! The FHIR API under an extra base path (`http.extra_base_paths`): the Task API reference
//! Baton follows documents its calls at `/api/fhir/Task`, and they run here verbatim — create
//! with `Content-Type: application/json` and a client-assigned id, list by owner, patient and
//! status, read, update to mark completed — with every link on the path the request used.

mod common;

use common::{TestServer, match_ids};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const CATEGORY: &str = "https://baton.dev/fhir/CodeSystem/task-category";

async fn call(
    server: &TestServer,
    method: Method,
    url: &str,
    token: &str,
    body: Option<&Value>,
) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let mut request = server.request(method, url, token);
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body.to_string());
    }
    let response = request.send().await.unwrap();
    let headers = response.headers().clone();
    let (status, value) = common::body(response).await;
    (status, headers, value)
}

#[tokio::test]
async fn the_reference_calls_run_verbatim_under_api_fhir() {
    let server =
        TestServer::start_with(|c| c.http.extra_base_paths = vec!["/api/fhir".into()]).await;
    let api = format!("{}/api/fhir", server.root);
    let alice = server.practitioner("Practitioner/alice");
    let id = "65f8901234567abcdef89012";

    // Create, with the client's id.
    let created = json!({
        "resourceType": "Task",
        "id": id,
        "status": "requested",
        "intent": "order",
        "priority": "urgent",
        "code": { "coding": [{ "system": CATEGORY, "code": "lab-follow-up", "display": "Lab follow-up" }] },
        "description": "Review potassium result and call patient",
        "for": { "reference": "Patient/pat-1" },
        "owner": { "reference": "Practitioner/alice" },
        "requester": { "reference": "Practitioner/dr-who" },
        "authoredOn": "2026-03-12T09:30:00Z",
        "restriction": { "period": { "end": "2026-03-14T17:00:00Z" } },
    });
    let (status, headers, body) = call(
        &server,
        Method::PUT,
        &format!("{api}/Task/{id}"),
        &alice,
        Some(&created),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["id"], id);
    assert_eq!(
        headers["location"].to_str().unwrap(),
        format!("{api}/Task/{id}/_history/1")
    );
    // Two more for the lists and the paging below.
    for (n, status) in [(1, "requested"), (2, "in-progress")] {
        let mut other = created.clone();
        other["id"] = json!(format!("65f8901234567abcdef8901{}", n + 2));
        other["status"] = json!(status);
        let (code, _, body) = call(
            &server,
            Method::PUT,
            &format!("{api}/Task/{}", other["id"].as_str().unwrap()),
            &alice,
            Some(&other),
        )
        .await;
        assert_eq!(code, StatusCode::CREATED, "{body}");
    }

    // List by owner, patient and status.
    let (status, _, bundle) = call(
        &server,
        Method::GET,
        &format!("{api}/Task?owner=Practitioner/alice&patient=Patient/pat-1&status=requested"),
        &alice,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{bundle}");
    assert_eq!(bundle["total"], 2, "{bundle}");
    let mut ids = match_ids(&bundle);
    ids.sort();
    assert_eq!(ids, vec![id.to_string(), "65f8901234567abcdef89013".into()]);
    for entry in bundle["entry"].as_array().unwrap() {
        let full_url = entry["fullUrl"].as_str().unwrap();
        assert!(full_url.starts_with(&format!("{api}/Task/")), "{full_url}");
    }
    assert!(
        bundle["link"][0]["url"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{api}/Task?")),
        "{bundle}"
    );

    // Paging links stay on the path, and following them works.
    let (_, _, page) = call(
        &server,
        Method::GET,
        &format!("{api}/Task?owner=Practitioner/alice&_count=2"),
        &alice,
        None,
    )
    .await;
    let next = page["link"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "next")
        .and_then(|l| l["url"].as_str())
        .expect("a next link")
        .to_string();
    assert!(next.starts_with(&format!("{api}/Task?")), "{next}");
    let (status, _, rest) = call(&server, Method::GET, &next, &alice, None).await;
    assert_eq!(status, StatusCode::OK, "{rest}");
    assert_eq!(match_ids(&page).len() + match_ids(&rest).len(), 3);

    // Read.
    let (status, headers, read) = call(
        &server,
        Method::GET,
        &format!("{api}/Task/{id}"),
        &alice,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{read}");
    assert_eq!(headers["etag"], "W/\"1\"");
    assert_eq!(read["code"]["coding"][0]["code"], "lab-follow-up");

    // Update to mark completed.
    let mut done = read.clone();
    done["status"] = json!("completed");
    let (status, headers, body) = call(
        &server,
        Method::PUT,
        &format!("{api}/Task/{id}"),
        &alice,
        Some(&done),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "completed");
    assert_eq!(headers["etag"], "W/\"2\"");

    // A transaction posted to the extra path may name its entries on that path, and its
    // answer links there.
    let new_id = "65f8901234567abcdef89019";
    let mut other = created.clone();
    other["id"] = json!(new_id);
    let bundle = json!({ "resourceType": "Bundle", "type": "transaction", "entry": [
        { "fullUrl": format!("{api}/Task/{new_id}"), "resource": other,
          "request": { "method": "PUT", "url": format!("{api}/Task/{new_id}") } },
    ]});
    let (status, _, answer) = call(&server, Method::POST, &api, &alice, Some(&bundle)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        answer["entry"][0]["fullUrl"],
        format!("{api}/Task/{new_id}"),
        "{answer}"
    );
    assert_eq!(answer["entry"][0]["response"]["status"], "201 Created");

    // The same Task under /fhir, with /fhir links; a path not configured is a 404.
    let (status, bundle) = server.get(&format!("/Task?_id={id}"), &alice).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        bundle["entry"][0]["fullUrl"],
        format!("{}/Task/{id}", server.base)
    );
    assert_eq!(bundle["entry"][0]["resource"]["status"], "completed");
    let (status, _, body) = call(
        &server,
        Method::GET,
        &format!("{}/r4/Task/{id}", server.root),
        &alice,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    // History and the CapabilityStatement answer there too.
    let (status, _, history) = call(
        &server,
        Method::GET,
        &format!("{api}/Task/{id}/_history"),
        &alice,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{history}");
    assert_eq!(history["entry"][0]["fullUrl"], format!("{api}/Task/{id}"));
    let (status, _, metadata) = call(
        &server,
        Method::GET,
        &format!("{api}/metadata"),
        &alice,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{metadata}");
    assert_eq!(metadata["resourceType"], "CapabilityStatement");
}
