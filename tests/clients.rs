//! Real FHIR clients against a real server: fhirpy (Python) and fhir-kit-client (Node) drive
//! Baton through create, read, search with totals, paging to the end, update, patch in the
//! form each client sends, delete, `_history` polling and a classic R4 subscription received
//! on a local endpoint (tests/clients/*/driver.*); and every kind of resource Baton serves is
//! validated with fhir.resources' R4B models (tests/clients/python/validate_r4.py).
//!
//! The drivers need python3 with the packages of tests/clients/python/requirements.txt and
//! node with tests/clients/node's packages (`npm ci`); `.ci/run` installs both. Without them
//! a test fails under `CI=true` and is skipped, saying why, otherwise.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::TestServer;

/// How long a driver may run; each takes a second or two.
const DRIVER_TIMEOUT: Duration = Duration::from_secs(120);

fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

/// Whether a tool is missing: under CI that fails the test, elsewhere it skips it.
fn missing(what: &str) -> bool {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{what} (CI=true: .ci/run installs it)");
    }
    eprintln!("skipped: {what}");
    true
}

async fn succeeds(program: &str, args: &[&str], dir: &Path) -> bool {
    tokio::process::Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

/// Runs a driver against a fresh server with an admin token and asserts it succeeds. The
/// server's rest-hooks may reach the driver's own local endpoint (loopback, plain http).
async fn drive(program: &str, script: &Path, dir: &Path) {
    let server = TestServer::start_hub().await;
    let child = tokio::process::Command::new(program)
        .arg(script)
        .current_dir(dir)
        .env("BATON_URL", &server.base)
        .env("BATON_TOKEN", server.admin())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("{program} did not start: {e}"));
    let output = tokio::time::timeout(DRIVER_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{} ran past {DRIVER_TIMEOUT:?}", script.display()))
        .expect("the driver's output is readable");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{} failed ({}):\n{stdout}\n{stderr}",
        script.display(),
        output.status
    );
    assert!(stdout.contains(": ok"), "{stdout}\n{stderr}");
    server.stop().await;
}

#[tokio::test]
async fn fhirpy_drives_the_task_api() {
    let dir = clients_dir().join("python");
    if !succeeds("python3", &["-c", "import fhirpy"], &dir).await
        && missing("python3 with fhirpy (pip install -r tests/clients/python/requirements.txt)")
    {
        return;
    }
    drive("python3", &dir.join("driver.py"), &dir).await;
}

#[tokio::test]
async fn fhir_kit_client_drives_the_task_api() {
    let dir = clients_dir().join("node");
    if (!succeeds("node", &["--version"], &dir).await
        || !dir
            .join("node_modules/fhir-kit-client/package.json")
            .exists())
        && missing("node with fhir-kit-client (npm ci --prefix tests/clients/node)")
    {
        return;
    }
    drive("node", &dir.join("driver.mjs"), &dir).await;
}

#[tokio::test]
async fn every_resource_baton_serves_validates_as_r4() {
    let dir = clients_dir().join("python");
    if !succeeds("python3", &["-c", "import fhir.resources.R4B"], &dir).await
        && missing(
            "python3 with fhir.resources (pip install -r tests/clients/python/requirements.txt)",
        )
    {
        return;
    }
    drive("python3", &dir.join("validate_r4.py"), &dir).await;
}
