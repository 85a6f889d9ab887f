//! A real browser against a real server: Debian's chromium, headless, with a fake camera and
//! microphone, publishes from the page over WHIP and must decode the returned video; a second
//! tab watches the same session over WHEP.
//!
//! Needs `chromium` and `tests/browser/node_modules` (scripts/test.sh installs both). Set
//! LIPSTREAM_SKIP_BROWSER=1 to skip it where no browser can be installed; the skip is printed.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

#[test]
fn chromium_publishes_from_the_page_and_decodes_the_returned_video() {
    if std::env::var_os("LIPSTREAM_SKIP_BROWSER").is_some() {
        eprintln!("SKIPPED: LIPSTREAM_SKIP_BROWSER is set");
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/browser");
    assert!(
        dir.join("node_modules/playwright-core").exists(),
        "run `npm ci --prefix tests/browser` (scripts/test.sh does) to install playwright-core"
    );
    let server = common::Server::start(&[]);
    let out = Command::new("node")
        .arg(dir.join("publish.mjs"))
        .arg(&server.base_url)
        .arg("100")
        .output()
        .expect("run node (install nodejs)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "browser run failed:\n{stdout}\n{stderr}"
    );
    let result: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    println!("browser: {result}");
    let decoded = result["publisher"]["framesDecoded"].as_u64().unwrap_or(0);
    assert!(decoded > 100, "the page decoded {decoded} returned frames");
    assert!(result["viewer"]["framesDecoded"].as_u64().unwrap_or(0) > 25);
    assert!(
        result["publisher"]["codec"]
            .as_str()
            .unwrap_or("")
            .contains("H264"),
        "{result}"
    );
    assert!(
        server.wait_until(Duration::from_secs(5), |s| s.metric("lipstream_sessions")
            == 0.0),
        "the page's Stop must DELETE the session"
    );
}
