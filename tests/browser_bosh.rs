//! Pages that speak BOSH in a real headless Chromium: the Django attach example
//! (contrib/examples/django-attach: Strophe.js `attach()` with a prebind per page load) in two
//! tabs, and unmodified Converse.js with `authentication: 'prebind'` in two tabs, against
//! boshmux in front of each server `scripts/test` starts (Prosody, ejabberd). The checks are in
//! tests/browser/attach.test.mjs.

mod support;

use std::process::Stdio;
use std::time::Duration;

use support::daemon::{API_KEY, Daemon};
use support::{Server, both};

/// The example's Python: the venv `scripts/test` makes under target/ with Django installed.
fn python() -> std::path::PathBuf {
    let py = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/django-venv/bin/python");
    assert!(
        py.exists(),
        "{} is missing: scripts/test makes it (python3 -m venv, pip install -r requirements.txt)",
        py.display()
    );
    py
}

both!(bosh_pages_of_the_django_example_and_converse_in_chromium);
async fn bosh_pages_of_the_django_example_and_converse_in_chromium(p: Server) {
    assert!(
        std::path::Path::new("/usr/bin/chromium").exists(),
        "/usr/bin/chromium is missing: scripts/test installs Debian's chromium"
    );
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/examples/django-attach");
    assert!(
        example.join("node_modules/strophe.js").exists(),
        "contrib/examples/django-attach/node_modules is missing: scripts/test runs `npm ci` there"
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let site = format!("http://127.0.0.1:{port}");
    let origin = site.clone();
    let d = Daemon::start(&p.bosh, &p.domain, move |c| c.allowed_origins.push(origin)).await;
    let mut django = tokio::process::Command::new(python())
        .args([
            "manage.py",
            "runserver",
            "--noreload",
            &format!("127.0.0.1:{port}"),
        ])
        .current_dir(&example)
        .env("BOSHMUX_URL", d.url(""))
        .env("BOSHMUX_API_KEY", API_KEY)
        .env("XMPP_DOMAIN", &p.domain)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start the Django example");
    support::eventually(
        "the Django example listening",
        Duration::from_secs(30),
        || async {
            reqwest::get(format!("{site}/login"))
                .await
                .ok()
                .filter(|r| r.status() == 200)
                .map(|_| ())
        },
    )
    .await;
    let report = support::node::node_tests(
        "tests/browser",
        "attach.test.mjs",
        &[
            ("SITE_URL", site.clone()),
            ("DAEMON_URL", d.url("")),
            ("DAEMON_API_KEY", API_KEY.to_owned()),
            ("XMPP_DOMAIN", p.domain.clone()),
            ("USERS", "g31a,g31b,g31c".to_owned()),
            (
                "SCREENSHOT_DIR",
                concat!(env!("CARGO_MANIFEST_DIR"), "/target/screenshots").to_owned(),
            ),
        ],
    )
    .await;
    assert!(report.contains("pass 6"), "{report}");
    let _ = django.kill().await;
    d.stop().await;
}
