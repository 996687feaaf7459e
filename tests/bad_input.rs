//! A table of bad requests: each gets the right 4xx, an OperationOutcome naming the problem,
//! and leaves the store exactly as it was.

mod common;

use common::{TestServer, task};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

struct Case {
    name: &'static str,
    method: Method,
    /// `{id}` is replaced by the existing Task's id.
    path: &'static str,
    content_type: &'static str,
    body: String,
    headers: Vec<(&'static str, String)>,
    status: StatusCode,
    code: &'static str,
}

fn case(
    name: &'static str,
    method: Method,
    path: &'static str,
    body: String,
    status: StatusCode,
    code: &'static str,
) -> Case {
    Case {
        name,
        method,
        path,
        content_type: "application/fhir+json",
        body,
        headers: Vec::new(),
        status,
        code,
    }
}

fn with(mutate: impl FnOnce(&mut Value)) -> String {
    let mut t = task("requested", Some("Practitioner/1"));
    mutate(&mut t);
    t.to_string()
}

#[tokio::test]
async fn bad_inputs_get_precise_errors_and_store_nothing() {
    let server = TestServer::start_with(|c| c.max_body_bytes = 4096).await;
    let admin = server.admin();
    let existing = server
        .create_task(&task("requested", Some("Practitioner/1")))
        .await;
    let id = existing["id"].as_str().unwrap().to_string();
    let existing_body = |mutate: fn(&mut Value)| {
        let mut t = existing.clone();
        mutate(&mut t);
        t.to_string()
    };
    use StatusCode as S;
    let post = Method::POST;
    let mut cases = vec![
        case(
            "malformed JSON",
            post.clone(),
            "/Task",
            "{\"resourceType\": \"Task\",".into(),
            S::BAD_REQUEST,
            "structure",
        ),
        case(
            "empty body",
            post.clone(),
            "/Task",
            String::new(),
            S::BAD_REQUEST,
            "required",
        ),
        case(
            "JSON array",
            post.clone(),
            "/Task",
            "[]".into(),
            S::BAD_REQUEST,
            "structure",
        ),
        case(
            "wrong resourceType",
            post.clone(),
            "/Task",
            with(|t| t["resourceType"] = json!("Patient")),
            S::BAD_REQUEST,
            "invalid",
        ),
        case(
            "missing status",
            post.clone(),
            "/Task",
            with(|t| {
                t.as_object_mut().unwrap().remove("status");
            }),
            S::BAD_REQUEST,
            "required",
        ),
        case(
            "missing intent",
            post.clone(),
            "/Task",
            with(|t| {
                t.as_object_mut().unwrap().remove("intent");
            }),
            S::BAD_REQUEST,
            "required",
        ),
        case(
            "unknown status code",
            post.clone(),
            "/Task",
            with(|t| t["status"] = json!("done")),
            S::BAD_REQUEST,
            "value",
        ),
        case(
            "unknown intent code",
            post.clone(),
            "/Task",
            with(|t| t["intent"] = json!("wish")),
            S::BAD_REQUEST,
            "value",
        ),
        case(
            "unknown priority code",
            post.clone(),
            "/Task",
            with(|t| t["priority"] = json!("whenever")),
            S::BAD_REQUEST,
            "value",
        ),
        case(
            "status of wrong type",
            post.clone(),
            "/Task",
            with(|t| t["status"] = json!(3)),
            S::BAD_REQUEST,
            "structure",
        ),
        case(
            "unknown top-level element",
            post.clone(),
            "/Task",
            with(|t| t["colour"] = json!("red")),
            S::BAD_REQUEST,
            "structure",
        ),
        case(
            "null value",
            post.clone(),
            "/Task",
            with(|t| t["description"] = Value::Null),
            S::BAD_REQUEST,
            "structure",
        ),
        case(
            "empty array",
            post.clone(),
            "/Task",
            with(|t| t["identifier"] = json!([])),
            S::BAD_REQUEST,
            "structure",
        ),
        case(
            "array where one value",
            post.clone(),
            "/Task",
            with(|t| t["owner"] = json!([{"reference": "Practitioner/1"}])),
            S::BAD_REQUEST,
            "structure",
        ),
        case(
            "malformed reference",
            post.clone(),
            "/Task",
            with(|t| t["requester"] = json!({"reference": "not a reference"})),
            S::BAD_REQUEST,
            "value",
        ),
        case(
            "owner of wrong type",
            post.clone(),
            "/Task",
            with(|t| t["owner"] = json!({"reference": "Observation/1"})),
            S::BAD_REQUEST,
            "value",
        ),
        case(
            "bad authoredOn",
            post.clone(),
            "/Task",
            with(|t| t["authoredOn"] = json!("yesterday")),
            S::BAD_REQUEST,
            "value",
        ),
        case(
            "period ends before it starts",
            post.clone(),
            "/Task",
            with(|t| t["executionPeriod"] = json!({"start": "2024-02-01", "end": "2024-01-01"})),
            S::BAD_REQUEST,
            "invariant",
        ),
        case(
            "identifier is a string",
            post.clone(),
            "/Task",
            with(|t| t["identifier"] = json!(["A-1"])),
            S::BAD_REQUEST,
            "structure",
        ),
        case(
            "oversized body",
            post.clone(),
            "/Task",
            with(|t| t["description"] = json!("x".repeat(5000))),
            S::PAYLOAD_TOO_LARGE,
            "too-long",
        ),
        case(
            "bad If-None-Exist",
            post.clone(),
            "/Task",
            with(|_| {}),
            S::BAD_REQUEST,
            "not-supported",
        ),
        case(
            "update with mismatched id",
            Method::PUT,
            "/Task/{id}",
            existing_body(|t| t["id"] = json!("other")),
            S::BAD_REQUEST,
            "invalid",
        ),
        case(
            "update without id",
            Method::PUT,
            "/Task/{id}",
            existing_body(|t| {
                t.as_object_mut().unwrap().remove("id");
            }),
            S::BAD_REQUEST,
            "required",
        ),
        case(
            "update with malformed If-Match",
            Method::PUT,
            "/Task/{id}",
            existing_body(|_| {}),
            S::BAD_REQUEST,
            "invalid",
        ),
        case(
            "update to draft",
            Method::PUT,
            "/Task/{id}",
            existing_body(|t| t["status"] = json!("draft")),
            S::UNPROCESSABLE_ENTITY,
            "business-rule",
        ),
        case(
            "invalid id in URL",
            Method::PUT,
            "/Task/bad%20id",
            existing_body(|_| {}),
            S::BAD_REQUEST,
            "invalid",
        ),
        case(
            "patch that is not a patch",
            Method::PATCH,
            "/Task/{id}",
            json!({"op": "replace"}).to_string(),
            S::BAD_REQUEST,
            "structure",
        ),
        case(
            "patch on a missing path",
            Method::PATCH,
            "/Task/{id}",
            json!([{"op": "replace", "path": "/note/0/text", "value": "x"}]).to_string(),
            S::UNPROCESSABLE_ENTITY,
            "processing",
        ),
        case(
            "patch producing an invalid Task",
            Method::PATCH,
            "/Task/{id}",
            json!([{"op": "replace", "path": "/status", "value": "bogus"}]).to_string(),
            S::BAD_REQUEST,
            "value",
        ),
        case(
            "patch removing the id",
            Method::PATCH,
            "/Task/{id}",
            json!([{"op": "remove", "path": "/id"}]).to_string(),
            S::UNPROCESSABLE_ENTITY,
            "processing",
        ),
        case(
            "patch of a missing Task",
            Method::PATCH,
            "/Task/nope",
            json!([]).to_string(),
            S::NOT_FOUND,
            "not-found",
        ),
        case(
            "delete of a missing Task",
            Method::DELETE,
            "/Task/nope",
            String::new(),
            S::NOT_FOUND,
            "not-found",
        ),
        case(
            "read of a missing Task",
            Method::GET,
            "/Task/nope",
            String::new(),
            S::NOT_FOUND,
            "not-found",
        ),
    ];
    // Cases that need a header or another content type.
    cases[20]
        .headers
        .push(("if-none-exist", "colour=red".into()));
    cases[23].headers.push(("if-match", "three".into()));
    cases[26].content_type = "application/json-patch+json";
    cases[27].content_type = "application/json-patch+json";
    cases[28].content_type = "application/json-patch+json";
    cases[29].content_type = "application/json-patch+json";
    cases[30].content_type = "application/json-patch+json";
    let mut xml = case(
        "XML content type",
        Method::POST,
        "/Task",
        "<Task/>".into(),
        S::UNSUPPORTED_MEDIA_TYPE,
        "not-supported",
    );
    xml.content_type = "application/fhir+xml";
    cases.push(xml);
    // application/json is a patch form (an array JSON Patch, an object a merge patch); a
    // patch in a type that is none of the patch forms is refused.
    let mut patch_as_text = case(
        "patch sent as text",
        Method::PATCH,
        "/Task/{id}",
        "[]".into(),
        S::UNSUPPORTED_MEDIA_TYPE,
        "not-supported",
    );
    patch_as_text.content_type = "text/plain";
    cases.push(patch_as_text);
    let mut merge_not_object = case(
        "merge patch that is not an object",
        Method::PATCH,
        "/Task/{id}",
        "[1, 2]".into(),
        S::BAD_REQUEST,
        "structure",
    );
    merge_not_object.content_type = "application/merge-patch+json";
    cases.push(merge_not_object);
    let mut merge_bad_status = case(
        "merge patch with a status outside the code set",
        Method::PATCH,
        "/Task/{id}",
        r#"{"status": "finished"}"#.into(),
        S::BAD_REQUEST,
        "value",
    );
    merge_bad_status.content_type = "application/json";
    cases.push(merge_bad_status);
    let mut fhirpath_function = case(
        "FHIRPath Patch with a function in its path",
        Method::PATCH,
        "/Task/{id}",
        r#"{"resourceType": "Parameters", "parameter": [{"name": "operation", "part": [
            {"name": "type", "valueCode": "delete"},
            {"name": "path", "valueString": "Task.note.first()"}]}]}"#
            .into(),
        S::BAD_REQUEST,
        "not-supported",
    );
    fhirpath_function.content_type = "application/fhir+json";
    cases.push(fhirpath_function);
    assert!(cases.len() >= 25);

    let mut failures = Vec::new();
    for case in cases {
        let path = case.path.replace("{id}", &id);
        let mut request = server.request(case.method.clone(), &path, &admin);
        if !case.body.is_empty() || case.method != Method::GET {
            request = request
                .header("content-type", case.content_type)
                .body(case.body.clone());
        }
        for (name, value) in &case.headers {
            request = request.header(*name, value);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let ok = status == case.status
            && body["resourceType"] == "OperationOutcome"
            && body["issue"][0]["code"] == case.code
            && body["issue"][0]["diagnostics"]
                .as_str()
                .is_some_and(|d| d.len() > 10);
        if !ok {
            failures.push(format!(
                "{}: expected {} {}, got {status} {body}",
                case.name, case.status, case.code
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Nothing was stored: still one Task, still at version 1.
    let (_, count) = server.get("/Task?_summary=count", &admin).await;
    assert_eq!(count["total"], 1);
    let (_, current) = server.get(&format!("/Task/{id}"), &admin).await;
    assert_eq!(current, existing);
    let (_, history) = server.get(&format!("/Task/{id}/_history"), &admin).await;
    assert_eq!(history["total"], 1);
    server.stop().await;
}
