//! A WebDriver session on a headless browser, spoken to over the W3C WebDriver HTTP API: the
//! browser tests of `tests/oidc.rs` and `tests/console.rs` drive real pages with it. One
//! client for both engines the console is tested in: Debian's Chromium through chromedriver
//! (`chromium`, `chromium-driver`) and Debian's Firefox ESR through geckodriver
//! (`firefox-esr`; `cargo install --locked geckodriver`). What differs between them is only
//! how the driver is started and the session's capabilities.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use base64::Engine as _;
use serde_json::{Value, json};

/// The W3C WebDriver key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// How long a WebDriver element lookup waits for the element to appear (the session's
/// implicit wait): a click that changes the page's route draws the next page a moment later.
const IMPLICIT_WAIT_MS: u64 = 5_000;

/// The browsers the tests can drive, each behind its own WebDriver server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// Debian's `chromium` through `chromedriver` (package `chromium-driver`).
    Chromium,
    /// Debian's `firefox-esr` through Mozilla's geckodriver (from crates.io).
    Firefox,
}

impl Engine {
    /// A short name, for file names and messages.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Chromium => "chromium",
            Engine::Firefox => "firefox",
        }
    }

    fn driver(self) -> &'static str {
        match self {
            Engine::Chromium => "chromedriver",
            Engine::Firefox => "geckodriver",
        }
    }

    /// Where Debian installs the browser.
    fn binary(self) -> &'static str {
        match self {
            Engine::Chromium => "/usr/bin/chromium",
            Engine::Firefox => "/usr/bin/firefox-esr",
        }
    }

    fn install_hint(self) -> &'static str {
        match self {
            Engine::Chromium => "apt-get install chromium chromium-driver",
            Engine::Firefox => "apt-get install firefox-esr; cargo install --locked geckodriver",
        }
    }

    /// The driver's command line, listening on `port` of the loopback interface.
    fn driver_args(self, port: u16) -> Vec<String> {
        match self {
            Engine::Chromium => vec![format!("--port={port}")],
            // Marionette's port is any free one by default; the WebDriver BiDi port is made so
            // too (it defaults to 9222), so that several tests can each drive a Firefox at once.
            Engine::Firefox => vec![
                "--host=127.0.0.1".into(),
                format!("--port={port}"),
                "--websocket-port=0".into(),
            ],
        }
    }

    /// The new session's capabilities: headless, and element lookups that wait a little.
    fn capabilities(self) -> Value {
        let browser = match self {
            Engine::Chromium => json!({
                "goog:chromeOptions": {
                    "binary": self.binary(),
                    "args": [
                        "--headless=new", "--no-sandbox", "--disable-gpu",
                        "--disable-dev-shm-usage", "--window-size=1400,1000",
                    ],
                },
            }),
            // The window's size is set once the session is up (`/window/rect`).
            Engine::Firefox => json!({
                "moz:firefoxOptions": { "binary": self.binary(), "args": ["-headless"] },
            }),
        };
        let mut capabilities = browser;
        capabilities["timeouts"] = json!({ "implicit": IMPLICIT_WAIT_MS });
        json!({ "capabilities": { "alwaysMatch": capabilities } })
    }
}

/// WebDriver's codes of the keys the keyboard tests press.
pub const TAB: char = '\u{E004}';
pub const ENTER: char = '\u{E007}';
pub const SHIFT: char = '\u{E008}';
pub const SPACE: char = '\u{E00D}';

/// Which way `tab_to` moves the focus: Tab, or Shift+Tab.
#[derive(Clone, Copy, Debug)]
pub enum TabDirection {
    Forward,
    Backward,
}

pub struct Browser {
    http: reqwest::Client,
    session: String,
    /// The driver leads a process group of its own, which the browser's processes join.
    driver: tokio::process::Child,
    /// The driver's TMPDIR, where it makes the browser's profile: removed with the session
    /// even when a failed test never closed the browser.
    _scratch: tempfile::TempDir,
}

impl Drop for Browser {
    /// A test that fails before `close` still leaves no browser behind: the whole process
    /// group (the driver and the browser it started) is killed.
    fn drop(&mut self) {
        if let Some(pid) = self.driver.id() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
        }
    }
}

/// The driver's log (with the browser's own output): `target/browser-logs/TEST.ENGINE.log`.
fn log_path(test: &str, engine: Engine) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target directory")
        .join("browser-logs")
        .join(format!("{test}.{}.log", engine.name()))
}

impl Browser {
    /// Starts the engine's driver and a session, or None (after a note) without them and
    /// without CI. Under `CI=true` a missing browser or driver fails the test.
    pub async fn start(test: &str, engine: Engine) -> Option<Browser> {
        let found = |program: &str| {
            std::process::Command::new(program)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        };
        let missing: Vec<&str> = [engine.binary(), engine.driver()]
            .into_iter()
            .filter(|program| !found(program))
            .collect();
        if !missing.is_empty() {
            let why = format!(
                "{} not found ({})",
                missing.join(" and "),
                engine.install_hint()
            );
            if std::env::var("CI").is_ok_and(|ci| ci == "true") {
                panic!("{test}: the browser test is required when CI=true, but {why}");
            }
            eprintln!("{test}: skipped: {why}");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let scratch = tempfile::tempdir().unwrap();
        let log = log_path(test, engine);
        std::fs::create_dir_all(log.parent().unwrap()).unwrap();
        let log_file = std::fs::File::create(&log).unwrap();
        let driver = tokio::process::Command::new(engine.driver())
            .args(engine.driver_args(port))
            .env("TMPDIR", scratch.path())
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", engine.driver()));
        let http = reqwest::Client::new();
        let root = format!("http://127.0.0.1:{port}");
        super::eventually(&format!("{} is ready", engine.driver()), || async {
            let status = http.get(format!("{root}/status")).send().await.ok()?;
            let body: Value = status.json().await.ok()?;
            (body["value"]["ready"] == true).then_some(())
        })
        .await;
        let created: Value = http
            .post(format!("{root}/session"))
            .json(&engine.capabilities())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = created["value"]["sessionId"].as_str().unwrap_or_else(|| {
            panic!(
                "no {} session: {created} (the driver's log: {})",
                engine.name(),
                log.display()
            )
        });
        let browser = Browser {
            http,
            session: format!("{root}/session/{session}"),
            driver,
            _scratch: scratch,
        };
        // The same window in both engines, so that the screenshots compare.
        browser
            .command(
                reqwest::Method::POST,
                "/window/rect",
                Some(json!({ "width": 1400, "height": 1000 })),
            )
            .await;
        Some(browser)
    }

    /// A WebDriver command; its `value`, or a panic naming the command and the error.
    async fn command(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self.http.request(method, format!("{}{path}", self.session));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let answer: Value = response.json().await.unwrap();
        assert!(status.is_success(), "WebDriver {path}: {status} {answer}");
        answer["value"].clone()
    }

    pub async fn open(&self, url: &str) {
        self.command(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    /// Runs `script` in the page and returns what it returns; a script that throws fails the
    /// test with the browser's message.
    pub async fn run(&self, script: &str) -> Value {
        let response = self
            .http
            .post(format!("{}/execute/sync", self.session))
            .json(&json!({ "script": script, "args": [] }))
            .send()
            .await
            .unwrap();
        let status = response.status();
        let answer: Value = response.json().await.unwrap();
        assert!(
            status.is_success(),
            "the script failed: {status} {}\n{script}",
            answer["value"]
        );
        answer["value"].clone()
    }

    /// The first element matching the CSS selector (which must exist, or appear within the
    /// implicit wait).
    async fn element(&self, css: &str) -> String {
        let found = self
            .command(
                reqwest::Method::POST,
                "/element",
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await;
        found[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {found}"))
            .to_string()
    }

    /// Types `text` into the element, as keystrokes.
    pub async fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css).await;
        self.command(
            reqwest::Method::POST,
            &format!("/element/{id}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    pub async fn click(&self, css: &str) {
        let id = self.element(css).await;
        self.command(
            reqwest::Method::POST,
            &format!("/element/{id}/click"),
            Some(json!({})),
        )
        .await;
    }

    /// Presses keys on whatever has the focus (WebDriver key codes, e.g. `\u{E007}` Enter).
    pub async fn press(&self, keys: &str) {
        let actions: Vec<Value> = keys
            .chars()
            .flat_map(|k| {
                [
                    json!({ "type": "keyDown", "value": k.to_string() }),
                    json!({ "type": "keyUp", "value": k.to_string() }),
                ]
            })
            .collect();
        self.command(
            reqwest::Method::POST,
            "/actions",
            Some(json!({ "actions": [{ "type": "key", "id": "keyboard", "actions": actions }] })),
        )
        .await;
    }

    /// Presses `keys` together (e.g. Shift and Tab) and lets them go in reverse order.
    pub async fn chord(&self, keys: &[char]) {
        let down = keys
            .iter()
            .map(|k| json!({ "type": "keyDown", "value": k.to_string() }));
        let up = keys
            .iter()
            .rev()
            .map(|k| json!({ "type": "keyUp", "value": k.to_string() }));
        let actions: Vec<Value> = down.chain(up).collect();
        self.command(
            reqwest::Method::POST,
            "/actions",
            Some(json!({ "actions": [{ "type": "key", "id": "keyboard", "actions": actions }] })),
        )
        .await;
    }

    /// Whether the element that has the focus matches the CSS selector.
    pub async fn focused(&self, css: &str) -> bool {
        self.run(&format!(
            "return document.activeElement?.matches({}) ?? false",
            json!(css)
        ))
        .await
            == true
    }

    /// What has the focus, for messages: its tag, id and text.
    pub async fn focus_description(&self) -> String {
        self.run(
            "const e = document.activeElement;
             return e ? `${e.tagName.toLowerCase()}#${e.id} ${e.textContent.slice(0, 40)}` : 'nothing';",
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    /// Moves the focus with the keyboard alone, one Tab (or Shift+Tab) at a time, until the
    /// element matching `css` has it; fails after `most` presses.
    pub async fn tab_to(&self, css: &str, direction: TabDirection, most: usize) {
        for _ in 0..most {
            if self.focused(css).await {
                return;
            }
            match direction {
                TabDirection::Forward => self.chord(&[TAB]).await,
                TabDirection::Backward => self.chord(&[SHIFT, TAB]).await,
            }
        }
        assert!(
            self.focused(css).await,
            "{css} not reached with {most} presses of {direction:?} Tab; the focus is on {}",
            self.focus_description().await
        );
    }

    /// Saves a PNG of the whole window to `path`.
    pub async fn screenshot(&self, path: &Path) {
        let encoded = self
            .command(reqwest::Method::GET, "/screenshot", None)
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().expect("a base64 screenshot"))
            .expect("base64");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(path, png).unwrap();
    }

    /// Ends the session: the driver closes the browser and removes its profile.
    pub async fn close(self) {
        let _ = self.http.delete(&self.session).send().await;
    }
}
