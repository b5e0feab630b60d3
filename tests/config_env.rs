//! SPEC §2: an unknown `BOSHMUX_*` environment variable (a wrapper script's own `BOSHMUX_BIN`, a
//! typo) is a warning that names it and the closest setting; `serve` and `check-config` start.
//! Warnings go to stderr with the logs; stdout carries only what the command prints.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const API_KEY: &str = "0123456789abcdef0";

/// The binary with only these variables set (so the test run's own `BOSHMUX_*` stay out).
fn boshmux(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_boshmux"));
    c.args(args)
        .env_clear()
        .env("NO_COLOR", "1")
        .env("BOSHMUX_BIN", "/opt/wrapper/bin/boshmux")
        .env("BOSHMUX_LISTN", "127.0.0.1:1")
        .env("BOSHMUX_API_KEY", API_KEY);
    c
}

const BIN_WARNING: &str = "environment variable BOSHMUX_BIN is not a boshmux setting; ignored";
const TYPO_WARNING: &str = "environment variable BOSHMUX_LISTN is not a boshmux setting; ignored \
                            (did you mean BOSHMUX_LISTEN?)";

#[test]
fn check_config_warns_and_succeeds() {
    let out = boshmux(&["check-config"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains(BIN_WARNING), "{stderr}");
    assert!(stderr.contains(TYPO_WARNING), "{stderr}");
    assert!(!stdout.contains("WARN"), "{stdout}");
    assert!(stdout.contains("listen: 127.0.0.1:5380"), "{stdout}");
    assert!(!stdout.contains(API_KEY), "{stdout}");
}

#[test]
fn serve_warns_and_serves() {
    let mut child = boshmux(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--bosh-url",
        "http://127.0.0.1:9/http-bind",
        "--xmpp-domain",
        "localhost",
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let served = loop {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => {
                let serving = line.contains("serving");
                seen.push(line);
                if serving {
                    break true;
                }
            }
            Err(_) => break false, // exited (output closed) or silent
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let log = seen.join("\n");
    assert!(served, "serve did not start:\n{log}");
    assert!(log.contains(BIN_WARNING), "{log}");
    assert!(log.contains(TYPO_WARNING), "{log}");
}
