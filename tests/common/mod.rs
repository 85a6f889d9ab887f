//! A real `lipstream serve` process on loopback, started on ephemeral ports, killed on drop.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Server {
    child: Child,
    pub base_url: String,
    pub pid: u32,
}

impl Server {
    /// Starts the server with extra flags; waits until it prints its addresses.
    pub fn start(extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lipstream"))
            .args([
                "serve",
                "--http",
                "127.0.0.1:0",
                "--udp-port",
                "0",
                "--ice-addrs",
                "127.0.0.1",
            ])
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start lipstream serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the listening line");
        let http = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("http="))
            .unwrap_or_else(|| panic!("no http= in {line:?}"))
            .to_string();
        let pid = child.id();
        Server {
            child,
            base_url: format!("http://{http}"),
            pid,
        }
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        let mut resp = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .new_agent()
            .get(format!("{}{path}", self.base_url))
            .call()
            .expect("GET");
        let status = resp.status().as_u16();
        (status, resp.body_mut().read_to_string().expect("body"))
    }

    /// The only open session's id, from `GET /sessions` (a publisher thread owns its Location).
    pub fn only_session_id(&self) -> String {
        let (status, body) = self.get("/sessions");
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        v["sessions"][0]["id"]
            .as_str()
            .expect("a session id")
            .to_string()
    }

    /// A metric's value from /metrics (first sample whose name matches exactly).
    pub fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .find_map(|l| {
                let (n, v) = l.split_once(' ')?;
                (n == name).then(|| v.trim().parse().ok()).flatten()
            })
            .unwrap_or_else(|| panic!("metric {name} missing"))
    }

    /// Polls `cond` until it holds or `timeout` passes.
    pub fn wait_until(&self, timeout: Duration, mut cond: impl FnMut(&Server) -> bool) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if cond(self) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        cond(self)
    }

    /// Threads, open file descriptors and resident memory (KiB) of the server process.
    pub fn resources(&self) -> (usize, usize, u64) {
        let threads = std::fs::read_dir(format!("/proc/{}/task", self.pid))
            .map(|d| d.count())
            .unwrap_or(0);
        let fds = std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .map(|d| d.count())
            .unwrap_or(0);
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap_or_default();
        let rss = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        (threads, fds, rss)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real offer from str0m with the given m-sections.
pub fn offer(kinds: &[str0m::media::MediaKind]) -> String {
    let mut rtc = str0m::RtcConfig::new().build(Instant::now());
    let mut change = rtc.sdp_api();
    for kind in kinds {
        change.add_media(*kind, str0m::media::Direction::SendRecv, None, None, None);
    }
    let (offer, _) = change.apply().expect("an offer");
    offer.to_sdp_string()
}
