//! Pages checked in a real browser: Debian's Chromium, headless, with a
//! participant's client certificate in a private NSS database and a policy
//! that picks it without a dialog (see `shared/browser-testing.md`). The
//! tests read what the page says (the DOM after rendering, and the text of
//! the page printed to PDF), not only that it loaded.

use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

use serde_json::json;

use crate::support::{Env, Server};

/// The packages the browser tests need; installed once if missing (the
/// README's test command does all the set-up on a fresh machine).
const PACKAGES: [(&str, &str); 6] = [
    ("/usr/bin/chromium", "chromium"),
    // WebDriver, for the console's forms (fantoccini).
    ("/usr/bin/chromedriver", "chromium-driver"),
    // A Chinese font, so the printed page has the glyphs (and its text).
    (
        "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
        "fonts-wqy-zenhei",
    ),
    ("/usr/bin/certutil", "libnss3-tools"),
    ("/usr/bin/pk12util", "libnss3-tools"),
    ("/usr/bin/pdftotext", "poppler-utils"),
];

static INSTALL: Mutex<()> = Mutex::new(());

fn ensure_browser() {
    let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(bin, _)| !Path::new(bin).exists())
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return;
    }
    eprintln!("installing {missing:?} for the browser tests");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    // Stale package lists on a fresh machine: update once and retry.
    let status = install() || (Command::new("apt-get").arg("update").status().is_ok() && install());
    assert!(
        status,
        "the browser tests need {missing:?}: apt-get install -y {}",
        missing.join(" ")
    );
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().expect("command runs");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The one Chromium policy the tests need: pick the client certificate
/// for any `https://localhost` port without a dialog (each test's browser
/// has only its own participant's certificate). One file for every test:
/// Chromium takes a policy from one file only when several set it, so a
/// file per test would leave all but one browser waiting at a certificate
/// dialog while tests run in parallel. Written once; never removed (other
/// tests may be using it).
fn auto_select_policy() {
    static WRITTEN: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    WRITTEN.get_or_init(|| {
        let dir = Path::new("/etc/chromium/policies/managed");
        std::fs::create_dir_all(dir).expect("policy dir");
        let pattern = json!({"pattern": "https://localhost:*", "filter": {}}).to_string();
        let tmp = dir.join(".credgate-tests.json.tmp");
        std::fs::write(
            &tmp,
            json!({"AutoSelectCertificateForUrls": [pattern]}).to_string(),
        )
        .expect("policy");
        std::fs::rename(&tmp, dir.join("credgate-tests.json")).expect("policy");
    });
}

/// A headless Chromium that presents `participant`'s certificate to
/// `https://localhost:{port}` and trusts the test CA.
pub struct Browser {
    home: tempfile::TempDir,
    origin: String,
}

impl Browser {
    pub fn new(env: &Env, port: u16, participant: Option<&str>) -> Browser {
        ensure_browser();
        let home = tempfile::tempdir().expect("home");
        let db = home.path().join(".pki/nssdb");
        std::fs::create_dir_all(&db).expect("nssdb dir");
        let db_arg = format!("sql:{}", db.display());
        run(Command::new("certutil").args(["-d", &db_arg, "-N", "--empty-password"]));
        let certs = &env.pki.dir;
        run(Command::new("certutil")
            .args([
                "-d",
                &db_arg,
                "-A",
                "-n",
                "credgate-test-ca",
                "-t",
                "C,,",
                "-i",
            ])
            .arg(certs.join("ca.pem")));
        let origin = format!("https://localhost:{port}");
        if let Some(id) = participant {
            let p12 = home.path().join(format!("{id}.p12"));
            run(Command::new("openssl")
                .args(["pkcs12", "-export", "-passout", "pass:", "-in"])
                .arg(certs.join(format!("{id}.pem")))
                .arg("-inkey")
                .arg(certs.join(format!("{id}.key")))
                .arg("-out")
                .arg(&p12));
            run(Command::new("pk12util")
                .args(["-d", &db_arg, "-W", "", "-i"])
                .arg(&p12));
            auto_select_policy();
        }
        Browser { home, origin }
    }

    /// A WebDriver session (chromedriver on a free port, fantoccini) in
    /// this browser's profile: the client certificate and the CA apply.
    pub async fn webdriver(&self) -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .env("HOME", self.home.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": "/usr/bin/chromium",
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                         "--lang=zh-CN", "--window-size=1280,1000"],
            }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let client = loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match fantoccini::ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(c) => break c,
                Err(e) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "chromedriver did not start a session: {e}"
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            }
        };
        Driver {
            client,
            child,
            origin: self.origin.clone(),
        }
    }

    fn chromium(&self, args: &[String], path: &str) -> std::process::Output {
        run(Command::new("chromium")
            .env("HOME", self.home.path())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--lang=zh-CN",
            ])
            .args(args)
            .arg(format!("{}{path}", self.origin)))
    }

    /// The page's DOM as Chromium rendered it.
    pub fn dom(&self, path: &str) -> String {
        let out = self.chromium(&["--dump-dom".into()], path);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The page printed to PDF (kept as `name`.pdf beside the test's
    /// other files), and the text of that PDF.
    pub fn print(&self, path: &str, name: &str) -> String {
        let pdf = self.home.path().join(format!("{name}.pdf"));
        self.chromium(
            &[
                format!("--print-to-pdf={}", pdf.display()),
                "--no-pdf-header-footer".into(),
            ],
            path,
        );
        let out = run(Command::new("pdftotext").args(["-raw"]).arg(&pdf).arg("-"));
        // Kept for a look: target/browser/<name>.pdf.
        let keep = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser");
        if std::fs::create_dir_all(&keep).is_ok() {
            let _ = std::fs::copy(&pdf, keep.join(format!("{name}.pdf")));
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// A Chromium driven over WebDriver, on the gateway's origin.
pub struct Driver {
    /// The WebDriver session.
    pub client: fantoccini::Client,
    child: std::process::Child,
    origin: String,
}

impl Driver {
    /// Opens `path` of the gateway.
    pub async fn open(&self, path: &str) {
        self.client
            .goto(&format!("{}{path}", self.origin))
            .await
            .expect("page opens");
    }

    /// The element `css`, waiting up to 10 s for it to appear.
    pub async fn find(&self, css: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(std::time::Duration::from_secs(10))
            .for_element(fantoccini::Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css} not on the page: {e}"))
    }

    /// The text of `css` once it contains `want` (up to 10 s).
    pub async fn text_with(&self, css: &str, want: &str) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let text = match self.client.find(fantoccini::Locator::Css(css)).await {
                Ok(e) => e.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            if text.contains(want) {
                return text;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{css} never said {want:?}; it says {text:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Clicks `css` (waiting for it to appear).
    pub async fn click(&self, css: &str) {
        self.find(css)
            .await
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css}: {e}"));
    }

    /// Types `text` into `css`.
    pub async fn type_into(&self, css: &str, text: &str) {
        self.find(css)
            .await
            .send_keys(text)
            .await
            .unwrap_or_else(|e| panic!("type into {css}: {e}"));
    }

    /// Runs a script in the page.
    pub async fn run(&self, script: &str) {
        self.client
            .execute(script, vec![])
            .await
            .unwrap_or_else(|e| panic!("script {script:?}: {e}"));
    }

    /// Scrolls `css` to the top of the window.
    pub async fn scroll_to(&self, css: &str) {
        self.client
            .execute(
                "document.querySelector(arguments[0]).scrollIntoView()",
                vec![json!(css)],
            )
            .await
            .expect("scroll");
    }

    /// Saves a screenshot of the page as `target/browser/<name>.png`.
    pub async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("screenshot");
        let keep = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser");
        if std::fs::create_dir_all(&keep).is_ok() {
            let _ = std::fs::write(keep.join(format!("{name}.png")), png);
        }
    }

    /// Ends the session and chromedriver.
    pub async fn quit(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_printable_report_renders_in_chromium() {
    let env = Env::new();
    let server = Server::start(&env).await;
    let court = env.client(server.addr, "dept-court");
    let procurement = env.client(server.addr, "agency-procurement");
    let uscc = credgate::synth::uscc("91320100", 9_700);
    let mut listing = credgate::synth::record("serious_dishonesty", 9_700, "");
    listing["uscc"] = json!(uscc);
    listing["subject_name"] = json!("南京浏览器测试建设有限公司");
    listing["list_kind"] = json!("dishonest_judgment_debtor");
    let resp = court
        .post_json(
            "/v1/records",
            &json!({"item": "serious_dishonesty", "records": [listing]}),
        )
        .await;
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    let resp = procurement
        .post_json(
            "/v1/credit-reviews",
            &json!({"subject": {"uscc": uscc}, "purpose": "government_procurement"}),
        )
        .await;
    assert_eq!(resp.status, 201, "{}", String::from_utf8_lossy(&resp.body));
    let doc = resp.json();
    let id = doc["report"]["report_id"].as_str().expect("id").to_owned();
    let key_id = doc["signature"]["key_id"].as_str().expect("key").to_owned();

    // The same report, asked by a browser: HTML; by an API client: JSON.
    let port = server.addr.port();
    let browser = Browser::new(&env, port, Some("agency-procurement"));
    let path = format!("/v1/credit-reviews/{id}");
    let dom = browser.dom(&path);
    let text = browser.print(&path, "credit-review-report");
    for want in [
        "信用审查报告",
        "江苏省公共信用信息中心",
        "南京浏览器测试建设有限公司",
        uscc.as_str(),
        "审查结论：受限",
        "D 严重失信",
        "限制参加政府采购活动",
        "政府采购法",
        "严重失信主体名单",
        key_id.as_str(),
        "credgate review verify",
    ] {
        assert!(dom.contains(want), "{want:?} not in the page:\n{dom}");
        assert!(
            text.replace(char::is_whitespace, "")
                .contains(&want.replace(char::is_whitespace, "")),
            "{want:?} not in the printed page:\n{text}"
        );
    }
    let again = procurement.get(&path).await;
    assert_eq!(again.header("content-type"), Some("application/json"));
    // Asked for HTML when issued: the page at once.
    let resp = procurement
        .send(
            "POST",
            "/v1/credit-reviews",
            &[
                ("content-type", "application/json"),
                ("accept", "text/html"),
            ],
            serde_json::to_vec(
                &json!({"subject": {"uscc": uscc}, "purpose": "government_procurement"}),
            )
            .expect("json"),
        )
        .await
        .expect("request");
    assert_eq!(resp.status, 201);
    assert_eq!(
        resp.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert!(resp.header("location").is_some());
    let page = String::from_utf8_lossy(&resp.body).into_owned();
    assert!(
        page.contains("信用审查报告") && page.contains("审查结论：受限"),
        "{page}"
    );

    // Another agency's browser gets no report.
    drop(browser);
    let finance = Browser::new(&env, port, Some("agency-finance"));
    let dom = finance.dom(&path);
    assert!(dom.contains("review_not_found"), "{dom}");
    assert!(!dom.contains("南京浏览器测试建设有限公司"));
    server.stop().await;
}
