//! The operator console at `/console`: its files are public and hold no data; driven through
//! WebDriver in headless Chromium and in headless Firefox ESR (the same test body, the browser
//! a parameter), it signs in with a token, shows a subscription turn from `active` to `error`
//! (with the error's text) when its receiver starts failing, shows the delivery ledger and a
//! live notification, and a Task board that follows changes live. Each page's screenshot is
//! saved under `target/console-screenshots/<browser>/`.

mod common;

use std::path::PathBuf;

use common::browser::{Browser, ENTER, Engine, SPACE, TAB, TabDirection};
use common::receiver::Receiver;
use common::{TestServer, assert_outcome, eventually, subscription, task};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Where one browser's screenshots go: `target/console-screenshots/<browser>/` (beside
/// `target/tmp`).
fn screenshot_dir(engine: Engine) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target directory")
        .join("console-screenshots")
        .join(engine.name())
}

#[tokio::test]
async fn the_console_is_public_static_files_that_hold_no_data() {
    let server = TestServer::start().await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let redirect = client
        .get(format!("{}/console", server.root))
        .send()
        .await
        .unwrap();
    assert_eq!(redirect.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(redirect.headers()["location"], "console/");

    let page = client
        .get(format!("{}/console/", server.root))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    let policy = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    let socket = format!("ws://{}", server.root.trim_start_matches("http://"));
    assert!(policy.contains("script-src 'self';"), "{policy}");
    assert!(
        policy.contains(&format!("connect-src 'self' {socket};")),
        "{policy}"
    );
    assert!(policy.contains("frame-ancestors 'none'"), "{policy}");
    assert_eq!(page.headers()["x-content-type-options"], "nosniff");
    let html = page.text().await.unwrap();
    assert!(html.contains("<script type=\"module\" src=\"console.js\">"));

    for (name, kind) in [
        ("console.js", "text/javascript; charset=utf-8"),
        ("fhir.js", "text/javascript; charset=utf-8"),
        ("console.css", "text/css; charset=utf-8"),
        ("vendor/uPlot.esm.js", "text/javascript; charset=utf-8"),
        ("vendor/uPlot.min.css", "text/css; charset=utf-8"),
        ("vendor/uPlot.LICENSE", "text/plain; charset=utf-8"),
    ] {
        let file = client
            .get(format!("{}/console/{name}", server.root))
            .send()
            .await
            .unwrap();
        assert_eq!(file.status(), StatusCode::OK, "{name}");
        assert_eq!(file.headers()["content-type"], kind, "{name}");
    }
    let missing = client
        .get(format!("{}/console/secrets.json", server.root))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let (_, outcome) = common::body(missing).await;
    assert_outcome(&outcome, "not-found");

    // The console's files are public; the data behind them still wants a token.
    let (status, _) = server.get("/Subscription", "not-a-token").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    server.stop().await;
}

/// The subscription row's status and last error as the console shows them.
async fn row_state(browser: &Browser, id: &str) -> Option<(String, String)> {
    let shown = browser
        .run(&format!(
            "const row = document.querySelector(\"#subscriptions tr[data-subscription='{id}']\");
             if (!row) return null;
             return [row.querySelector('.status').textContent, row.querySelector('.error-text').textContent];"
        ))
        .await;
    let cells = shown.as_array()?;
    Some((
        cells[0].as_str()?.to_string(),
        cells[1].as_str()?.to_string(),
    ))
}

/// The console's own checks of what a keyboard and a screen reader need: every form control
/// has a label, every table a caption and column headers, every chart a text label, and every
/// control can take focus.
async fn assert_accessible(browser: &Browser, page: &str) {
    let problems = browser
        .run(
            "const problems = [];
             for (const c of document.querySelectorAll('input, textarea, select')) {
               if (c.labels.length === 0) problems.push('unlabelled ' + (c.id || c.name));
             }
             // uPlot's legend is a table inside the chart, which is one role=img to assistive
             // technology (its label says what the chart shows).
             for (const t of document.querySelectorAll('table:not(.uplot table)')) {
               if (!t.caption) problems.push('no caption on table ' + t.id);
               if (t.querySelectorAll('thead th[scope=col]').length === 0) problems.push('no column headers on ' + t.id);
             }
             for (const chart of document.querySelectorAll('.uplot')) {
               if (chart.getAttribute('role') !== 'img' || !chart.getAttribute('aria-label')) problems.push('unlabelled chart');
             }
             for (const c of document.querySelectorAll('a[href], button, input, textarea')) {
               if (c.tabIndex < 0) problems.push('not focusable: ' + c.outerHTML.slice(0, 80));
             }
             return problems;",
        )
        .await;
    assert_eq!(problems, json!([]), "{page}");
}

/// Nothing on the page is wider than the window (1400 px): no column of a table is cut off
/// at the right edge. Browsers differ in where they break long words such as ids.
async fn assert_fits_the_window(browser: &Browser, page: &str) {
    let widths = browser
        .run(
            "const root = document.documentElement;
             return [root.scrollWidth, root.clientWidth];",
        )
        .await;
    assert!(
        widths[0].as_u64() <= widths[1].as_u64(),
        "{page}: the page is wider than the window (scroll width, window width): {widths}"
    );
}

/// From here on the page records its uncaught errors, unhandled promise rejections and
/// Content-Security-Policy violations (the console's pages are one document: the routes are
/// `#` fragments, so the listeners stay for the whole test).
async fn watch_for_page_problems(browser: &Browser) {
    browser
        .run(
            "window.pageProblems = [];
             window.addEventListener('error', (e) => pageProblems.push(`error: ${e.message}`));
             window.addEventListener('unhandledrejection', (e) => pageProblems.push(`unhandled rejection: ${e.reason}`));
             document.addEventListener('securitypolicyviolation', (e) => pageProblems.push(`CSP: ${e.violatedDirective} ${e.blockedURI}`));
             return null;",
        )
        .await;
}

async fn assert_no_page_problems(browser: &Browser) {
    let problems = browser.run("return window.pageProblems").await;
    assert_eq!(problems, json!([]));
}

#[tokio::test]
async fn the_console_follows_a_failing_subscription_its_ledger_and_a_task_board_live_in_chromium() {
    follow_a_failing_subscription_its_ledger_and_a_task_board_live(Engine::Chromium).await;
}

#[tokio::test]
async fn the_console_follows_a_failing_subscription_its_ledger_and_a_task_board_live_in_firefox() {
    follow_a_failing_subscription_its_ledger_and_a_task_board_live(Engine::Firefox).await;
}

async fn follow_a_failing_subscription_its_ledger_and_a_task_board_live(engine: Engine) {
    let test = "the_console_follows_a_failing_subscription_its_ledger_and_a_task_board_live";
    let Some(browser) = Browser::start(test, engine).await else {
        return;
    };
    let server = TestServer::start_with(|c| {
        c.allow_http_endpoints = true;
        c.allow_private_endpoints = true;
        c.delivery.retry_schedule_seconds = vec![1];
        c.delivery.jitter_ratio = 0.0;
        c.delivery.error_after_failures = 2;
    })
    .await;
    let shots = screenshot_dir(engine);
    let receiver = Receiver::start().await;
    let admin = server.admin();
    let mut body = subscription(
        &server.base,
        "task-changed",
        &["status=requested"],
        &receiver.url,
        "id-only",
    );
    body["reason"] = json!("lab orders to the LIS");
    let (status, created) = server.post_json("/Subscription", &admin, &body).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let sub_id = created["id"].as_str().unwrap().to_string();
    // A second rest-hook row, so that the table has more than one ledger to chart.
    let other = subscription(
        &server.base,
        "task-changed",
        &["status=completed"],
        &receiver.url,
        "id-only",
    );
    let (status, other) = server.post_json("/Subscription", &admin, &other).await;
    assert_eq!(status, StatusCode::CREATED, "{other}");
    receiver
        .wait_for("the handshakes", |r| {
            r.iter().filter(|n| n.kind() == "handshake").count() >= 2
        })
        .await;
    server.create_task(&task("requested", None)).await;
    receiver
        .wait_for("the first event", |r| {
            r.iter().any(|n| n.kind() == "event-notification")
        })
        .await;

    // Sign in, from the address an operator types.
    browser.open(&format!("{}/console", server.root)).await;
    eventually("the sign-in page", || async {
        (browser
            .run("return !!document.getElementById('token')")
            .await
            == true)
            .then_some(())
    })
    .await;
    watch_for_page_problems(&browser).await;
    assert_accessible(&browser, "sign in").await;
    browser.screenshot(&shots.join("sign-in.png")).await;
    // A wrong token is refused and the page says so.
    browser.type_into("#token", "not-a-token").await;
    browser.click("#sign-in button[type=submit]").await;
    eventually("the refusal", || async {
        let text = browser
            .run("return document.getElementById('sign-in-problem').textContent")
            .await;
        text.as_str()
            .is_some_and(|t| t.contains("Sign-in failed: 401"))
            .then_some(())
    })
    .await;
    browser
        .run("document.getElementById('token').value = ''")
        .await;
    browser.type_into("#token", &admin).await;
    // By keyboard: Enter in the field does not submit a textarea, so Tab to the button.
    browser.press("\u{E004}\u{E007}").await;

    // The subscriptions table: active, one event counted and delivered.
    let (state, _) = eventually("the subscription shown active", || async {
        row_state(&browser, &sub_id)
            .await
            .filter(|(status, _)| status == "active")
    })
    .await;
    assert_eq!(state, "active");
    let cells = browser
        .run(&format!(
            "return [...document.querySelectorAll(\"#subscriptions tr[data-subscription='{sub_id}'] td\")].map((c) => c.textContent)"
        ))
        .await;
    let cells: Vec<&str> = cells
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    let endpoint = reqwest::Url::parse(&receiver.url).unwrap();
    let host = format!("127.0.0.1:{}", endpoint.port().unwrap());
    assert_eq!(
        cells[..8],
        [
            "task-changed",
            "status=requested",
            "rest-hook",
            host.as_str(),
            "active",
            "1",
            "1",
            "0"
        ],
        "{cells:?}"
    );
    // The table reads the delivery ledgers of all its rows with one AuditEvent search per
    // refresh, not one per row: from now on, as many of them as Subscription searches (the
    // refresh's first request), or one fewer while a refresh is under way.
    browser
        .run("performance.setResourceTimingBufferSize(1000); performance.clearResourceTimings(); return null")
        .await;
    let (searches, ledgers) = eventually("three refreshes of the table", || async {
        let counts = browser
            .run(
                "const names = performance.getEntriesByType('resource').map((e) => e.name);
                 return [names.filter((n) => n.includes('/fhir/Subscription?')).length,
                         names.filter((n) => n.includes('/fhir/AuditEvent?')).length];",
            )
            .await;
        let searches = counts[0].as_u64()?;
        (searches >= 3).then_some((searches, counts[1].as_u64()?))
    })
    .await;
    assert!(
        ledgers <= searches && ledgers + 1 >= searches,
        "{ledgers} AuditEvent searches in {searches} refreshes"
    );
    // The token is in this tab's sessionStorage, never in the address.
    let href = browser.run("return location.href").await;
    assert!(!href.as_str().unwrap().contains(&admin), "{href}");
    assert_accessible(&browser, "subscriptions").await;

    // The receiver starts failing: the row turns to error and says why.
    receiver.fail_with(Some(503));
    server.create_task(&task("requested", None)).await;
    let (_, error) = eventually("the subscription shown in error", || async {
        row_state(&browser, &sub_id)
            .await
            .filter(|(status, _)| status == "error")
    })
    .await;
    assert!(error.contains("503"), "{error}");
    eventually("the sparkline", || async {
        let label = browser
            .run(&format!(
                "return document.querySelector(\"#subscriptions tr[data-subscription='{sub_id}'] .uplot\")?.getAttribute('aria-label')"
            ))
            .await;
        label
            .as_str()
            .is_some_and(|l| l.contains("failed attempts") && !l.contains(" 0 failed"))
            .then_some(())
    })
    .await;
    assert_fits_the_window(&browser, "subscriptions").await;
    // An id whose every segment starts with a digit has no place a browser breaks a line at
    // (about one UUIDv7 in five, the version and variant digits included): shown in the first
    // row for a moment, it must not push the table out of the window either.
    let link = format!("#subscriptions tr[data-subscription='{sub_id}'] a");
    browser
        .run(&format!(
            "document.querySelector({}).textContent = '01234567-0123-7123-8123-012345678901'; return null",
            json!(link)
        ))
        .await;
    assert_fits_the_window(&browser, "subscriptions, with an unbreakable id").await;
    browser
        .run(&format!(
            "document.querySelector({}).textContent = {}; return null",
            json!(link),
            json!(sub_id)
        ))
        .await;
    browser.screenshot(&shots.join("subscriptions.png")).await;

    // The subscription's page: its ledger has the handshake, the delivered event and the
    // failed attempts with their text.
    browser
        .click(&format!("tr[data-subscription='{sub_id}'] a"))
        .await;
    let ledger = eventually("the ledger rows", || async {
        let rows = browser
            .run(
                "return [...document.querySelectorAll('#ledger tbody tr')].map((r) => [...r.cells].map((c) => c.textContent))",
            )
            .await;
        let rows: Vec<Vec<String>> = serde_json::from_value(rows).ok()?;
        let failed = rows
            .iter()
            .any(|r| r[3] == "failed" && r[6].contains("HTTP 503"));
        let delivered = rows
            .iter()
            .any(|r| r[1] == "event-notification" && r[2] == "1..1" && r[3] == "delivered");
        let handshake = rows
            .iter()
            .any(|r| r[1] == "handshake" && r[3] == "delivered");
        (failed && delivered && handshake).then_some(rows)
    })
    .await;
    assert!(ledger.iter().all(|r| r[4] == "127.0.0.1"), "{ledger:?}");
    let last_error = browser
        .run("return document.getElementById('last-error').textContent")
        .await;
    assert!(last_error.as_str().unwrap().contains("503"), "{last_error}");
    assert_accessible(&browser, "subscription").await;
    assert_fits_the_window(&browser, "subscription").await;

    // The live tail: a notification about a new Task appears as it happens.
    browser.click("#tail-toggle").await;
    eventually("the tail listens", || async {
        let state = browser
            .run("return document.getElementById('tail-state').textContent")
            .await;
        assert!(
            !state.as_str().unwrap_or_default().starts_with("failed"),
            "{state}"
        );
        (state == "listening").then_some(())
    })
    .await;
    let tailed = server.create_task(&task("requested", None)).await;
    let tailed_id = tailed["id"].as_str().unwrap().to_string();
    let line = eventually("the live notification", || async {
        let line = browser
            .run(&format!(
                "return document.querySelector(\"#tail li[data-task='{tailed_id}']\")?.textContent"
            ))
            .await;
        line.as_str().map(str::to_string)
    })
    .await;
    assert!(
        line.contains(&format!("Task/{tailed_id} created")),
        "{line}"
    );
    // The ledger's newest rows and the tail in one view.
    browser
        .run("document.getElementById('ledger').scrollIntoView()")
        .await;
    browser.screenshot(&shots.join("subscription.png")).await;
    // Stopping the tail removes the console's own websocket subscription (the two rest-hook
    // ones stay).
    browser.click("#tail-toggle").await;
    eventually("the tail's subscription removed", || async {
        let (_, found) = server.get("/Subscription", &admin).await;
        (found["total"] == 2).then_some(())
    })
    .await;

    // The Task board of one owner, chosen with the keyboard, updating live.
    browser.click("#nav-board").await;
    browser
        .type_into("#board-owner", "Practitioner/board-owner\u{E007}")
        .await;
    eventually("the board is live", || async {
        let state = browser
            .run("return document.getElementById('board-state').textContent")
            .await;
        state
            .as_str()
            .is_some_and(|s| s.ends_with(": live"))
            .then_some(())
    })
    .await;
    let mut card = task("requested", Some("Practitioner/board-owner"));
    card["description"] = json!("Draw blood for the CBC");
    let card = server.create_task(&card).await;
    let card_id = card["id"].as_str().unwrap().to_string();
    let on = &browser;
    let column_of = move |id: String| async move {
        let column = on
            .run(&format!(
                "return document.querySelector(\"#board li[data-task='{id}']\")?.closest('section').dataset.status"
            ))
            .await;
        column.as_str().map(str::to_string)
    };
    eventually("the new Task on the board", || async {
        column_of(card_id.clone())
            .await
            .filter(|c| c == "requested")
    })
    .await;
    let mut started = card.clone();
    started["status"] = json!("in-progress");
    let (status, updated) = server
        .put_json(&format!("/Task/{card_id}"), &admin, &started)
        .await;
    assert_eq!(status, StatusCode::OK, "{updated}");
    eventually("the Task moved to in-progress", || async {
        column_of(card_id.clone())
            .await
            .filter(|c| c == "in-progress")
    })
    .await;
    // The board's own cards: one Task of that owner, and none of the others.
    let cards = browser
        .run("return document.querySelectorAll('#board li').length")
        .await;
    assert_eq!(cards, 1);
    assert_accessible(&browser, "board").await;
    assert_fits_the_window(&browser, "board").await;
    browser.screenshot(&shots.join("board.png")).await;

    // Leaving the board removes its websocket subscription too.
    browser.click("#nav-subscriptions").await;
    eventually("the board's subscription removed", || async {
        let (_, found) = server.get("/Subscription", &admin).await;
        (found["total"] == 2).then_some(())
    })
    .await;
    let remaining: Vec<Value> = server.get("/Subscription", &admin).await.1["entry"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(remaining[0]["resource"]["id"], json!(sub_id));
    assert_no_page_problems(&browser).await;
    browser.close().await;
    server.stop().await;
}

#[tokio::test]
async fn the_console_is_usable_with_the_keyboard_alone_in_chromium() {
    use_the_console_with_the_keyboard_alone(Engine::Chromium).await;
}

#[tokio::test]
async fn the_console_is_usable_with_the_keyboard_alone_in_firefox() {
    use_the_console_with_the_keyboard_alone(Engine::Firefox).await;
}

/// Everything an operator does in the console, with no click: sign in, skip to the content,
/// keep the focus on a table row while the table refreshes, open a subscription, start and
/// stop its live tail, and open a Task board. The order of the Tab stops is the browser's own.
async fn use_the_console_with_the_keyboard_alone(engine: Engine) {
    let test = "the_console_is_usable_with_the_keyboard_alone";
    let Some(browser) = Browser::start(test, engine).await else {
        return;
    };
    let server = TestServer::start_with(|c| {
        c.allow_http_endpoints = true;
        c.allow_private_endpoints = true;
    })
    .await;
    let receiver = Receiver::start().await;
    let admin = server.admin();
    let body = subscription(
        &server.base,
        "task-changed",
        &["status=requested"],
        &receiver.url,
        "id-only",
    );
    let (status, created) = server.post_json("/Subscription", &admin, &body).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let sub_id = created["id"].as_str().unwrap().to_string();
    let link = format!("#subscriptions tr[data-subscription='{sub_id}'] a");

    // The sign-in page puts the focus in the token field; the token is typed, Tab reaches
    // the button and Enter presses it.
    browser.open(&format!("{}/console", server.root)).await;
    eventually("the token field focused", || async {
        browser.focused("#token").await.then_some(())
    })
    .await;
    watch_for_page_problems(&browser).await;
    browser.press(&admin).await;
    browser.chord(&[TAB]).await;
    assert!(
        browser.focused("#sign-in button[type=submit]").await,
        "{}",
        browser.focus_description().await
    );
    browser.chord(&[ENTER]).await;
    eventually("the subscription row", || async {
        row_state(&browser, &sub_id).await
    })
    .await;

    // The skip link is the page's first Tab stop (backwards from the content: Sign out, the
    // two pages, then it); Enter moves the focus to the content and leaves the page as it is.
    browser.tab_to(".skip", TabDirection::Backward, 6).await;
    browser.chord(&[ENTER]).await;
    eventually("the focus on the content", || async {
        browser.focused("main").await.then_some(())
    })
    .await;
    assert_eq!(browser.run("return location.hash").await, "#/subscriptions");
    assert_eq!(
        browser
            .run("return document.querySelector('main h1').textContent")
            .await,
        "Subscriptions"
    );

    // The row's link keeps the focus while the table is read again (every 3 s).
    browser.tab_to(&link, TabDirection::Forward, 6).await;
    let updated = || async {
        browser
            .run("return document.getElementById('subscriptions-updated').textContent")
            .await
    };
    let mut shown = updated().await;
    for _ in 0..2 {
        shown = eventually("a refresh of the table", || async {
            let now = updated().await;
            (now != shown).then_some(now)
        })
        .await;
    }
    assert!(
        browser.focused(&link).await,
        "the focus left the row on a refresh: it is on {}",
        browser.focus_description().await
    );

    // Enter follows the link; on the subscription's page, Space starts the live tail and
    // Enter stops it.
    browser.chord(&[ENTER]).await;
    eventually("the subscription's page", || async {
        (browser.run("return location.hash").await == json!(format!("#/subscription/{sub_id}")))
            .then_some(())
    })
    .await;
    browser
        .tab_to("#tail-toggle", TabDirection::Forward, 10)
        .await;
    browser.chord(&[SPACE]).await;
    eventually("the tail listens", || async {
        let state = browser
            .run("return document.getElementById('tail-state').textContent")
            .await;
        (state == "listening").then_some(())
    })
    .await;
    eventually("the tail's own subscription", || async {
        let (_, found) = server.get("/Subscription", &admin).await;
        (found["total"] == 2).then_some(())
    })
    .await;
    assert!(browser.focused("#tail-toggle").await);
    browser.chord(&[ENTER]).await;
    eventually("the tail's subscription removed", || async {
        let (_, found) = server.get("/Subscription", &admin).await;
        (found["total"] == 1).then_some(())
    })
    .await;

    // Back to the navigation, and the Task board with an owner typed and Enter.
    browser
        .tab_to("#nav-board", TabDirection::Backward, 10)
        .await;
    browser.chord(&[ENTER]).await;
    browser
        .tab_to("#board-owner", TabDirection::Forward, 6)
        .await;
    browser.press("Practitioner/keyboard\u{E007}").await;
    eventually("the board is live", || async {
        let state = browser
            .run("return document.getElementById('board-state').textContent")
            .await;
        state
            .as_str()
            .is_some_and(|s| s == "Tasks owned by Practitioner/keyboard: live")
            .then_some(())
    })
    .await;
    assert_accessible(&browser, "board (keyboard)").await;
    assert_no_page_problems(&browser).await;
    browser.close().await;
    server.stop().await;
}
