//! `weir gateway` as a separate process, driven the way an operator would: the `weir` CLI,
//! `mosquitto_pub`/`mosquitto_sub` against the embedded broker, and SIGTERM to stop it.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const WEIR: &str = env!("CARGO_BIN_EXE_weir");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn weir(args: &[&str]) -> Output {
    Command::new(WEIR).args(args).output().expect("weir runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kills the gateway if a test fails before stopping it.
struct Running(Option<Child>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

const COPY_SQL: &str = "
CREATE SOURCE readings (sensor TEXT NOT NULL, ts TIMESTAMP NOT NULL, v DOUBLE)
WITH (connector = 'mqtt', topic = 'site/{sensor}/reading', linger = '2ms');
CREATE SINK doubled WITH (connector = 'mqtt', topic = 'site/{sensor}/doubled');
CREATE PIPELINE doubler AS INSERT INTO doubled SELECT sensor, ts, v * 2 AS v2 FROM readings;
";

const BAD_SQL: &str = "CREATE SOURCE s (sensor TEXT NOT NULL, ts TIMESTAMP NOT NULL, v DOUBLE)
WITH (connector = 'mqtt', topic = 'x/{sensor}');
CREATE SINK o WITH (connector = 'mqtt', topic = 'y');
CREATE PIPELINE p AS INSERT INTO o SELECT sqrt(vv) FROM s;
";

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write");
    path.display().to_string()
}

#[test]
fn an_operator_runs_a_gateway_with_the_cli_and_mosquitto_clients() {
    assert!(
        Path::new("/usr/bin/mosquitto_pub").exists(),
        "mosquitto-clients is not installed: run ./scripts/test.sh, which installs it"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let pipelines = dir.path().join("pipelines");
    std::fs::create_dir(&pipelines).expect("dir");
    write(&pipelines, "doubler.sql", COPY_SQL);
    let (mqtt, admin) = (free_port(), free_port());
    let gateway_url = format!("http://127.0.0.1:{admin}");
    let child = Command::new(WEIR)
        .args(["gateway", "--name", "cli-test", "--admin"])
        .arg(format!("127.0.0.1:{admin}"))
        .arg("--pipelines")
        .arg(&pipelines)
        .arg("--data")
        .arg(dir.path().join("data"))
        .env(
            "WEIR__BROKER__EMBEDDED__LISTEN",
            format!("127.0.0.1:{mqtt}"),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("weir gateway starts");
    let mut running = Running(Some(child));
    wait_for_port(admin);
    wait_for_port(mqtt);

    // The pipeline from the directory runs: a sensor publishes, a client reads the result.
    let mut subscriber = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &mqtt.to_string(),
            "-t",
            "site/+/doubled",
            "-C",
            "1",
            "-W",
            "30",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub");
    // Publish until the result shows up: the subscriber and the pipeline may still be
    // subscribing, and QoS 0 messages sent before that are not delivered.
    let deadline = Instant::now() + Duration::from_secs(30);
    let output = loop {
        let published = Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &mqtt.to_string(),
                "-t",
                "site/s7/reading",
            ])
            .args(["-m", r#"{"ts":"2024-01-01T00:00:00Z","v":1.25}"#])
            .status()
            .expect("mosquitto_pub");
        assert!(published.success());
        if let Some(status) = subscriber.try_wait().expect("mosquitto_sub state") {
            assert!(status.success(), "mosquitto_sub failed");
            let mut out = String::new();
            subscriber
                .stdout
                .take()
                .expect("stdout")
                .read_to_string(&mut out)
                .expect("read");
            break out;
        }
        assert!(Instant::now() < deadline, "no result on site/+/doubled");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(
        output.trim(),
        r#"{"sensor":"s7","ts":"2024-01-01T00:00:00Z","v2":2.5}"#
    );

    // Bad SQL is refused with line and column; the running pipeline is untouched.
    let bad = write(dir.path(), "bad.sql", BAD_SQL);
    let refused = weir(&["pipelines", "add", &bad, "--gateway", &gateway_url]);
    assert!(!refused.status.success());
    let error = text(&refused.stderr);
    assert!(error.contains(&format!("{bad}:4:48: error:")), "{error}");

    let second = write(
        dir.path(),
        "tripler.sql",
        &COPY_SQL
            .replace("doubler", "tripler")
            .replace("v * 2", "v * 3")
            .replace("doubled", "tripled"),
    );
    let added = weir(&["pipelines", "add", &second, "--gateway", &gateway_url]);
    assert!(added.status.success(), "{}", text(&added.stderr));
    assert_eq!(text(&added.stdout).trim(), "deployed tripler v1 (new)");

    let listed = weir(&["pipelines", "list", "--gateway", &gateway_url]);
    assert!(listed.status.success(), "{}", text(&listed.stderr));
    let list = text(&listed.stdout);
    assert!(list.starts_with("gateway cli-test"), "{list}");
    for line in ["doubler", "tripler"] {
        assert!(
            list.lines()
                .any(|l| l.starts_with(line) && l.contains("running")),
            "{list}"
        );
    }
    let top = weir(&["top", "--once", "--gateway", &gateway_url]);
    assert!(top.status.success(), "{}", text(&top.stderr));
    assert!(
        text(&top.stdout).contains("tripler"),
        "{}",
        text(&top.stdout)
    );

    let removed = weir(&["pipelines", "rm", "tripler", "--gateway", &gateway_url]);
    assert!(removed.status.success(), "{}", text(&removed.stderr));
    let missing = weir(&["pipelines", "rm", "tripler", "--gateway", &gateway_url]);
    assert!(!missing.status.success());
    assert!(text(&missing.stderr).contains("no pipeline named 'tripler'"));

    // SIGTERM: drain and exit 0.
    let mut child = running.0.take().expect("child");
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "gateway did not stop after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read");
    assert!(status.success(), "exit {status}: {stderr}");
    assert!(stderr.contains("stopped"), "{stderr}");
}

#[test]
fn config_check_names_the_bad_key_and_prints_the_effective_settings() {
    let dir = tempfile::tempdir().expect("temp dir");
    let good = write(
        dir.path(),
        "good.toml",
        "name = \"gw\"\n[admin]\nlisten = \"127.0.0.1:9999\"\n",
    );
    let checked = weir(&["config", "check", &good, "--print"]);
    assert!(checked.status.success(), "{}", text(&checked.stderr));
    assert!(text(&checked.stdout).contains("listen = \"127.0.0.1:9999\""));
    assert!(text(&checked.stderr).contains("ok"));

    let bad = write(dir.path(), "bad.toml", "[broker]\nmod = \"embedded\"\n");
    let checked = weir(&["config", "check", &bad]);
    assert!(!checked.status.success());
    let error = text(&checked.stderr);
    assert!(error.contains("broker.mod"), "{error}");
    assert!(error.contains("unknown field"), "{error}");
    assert!(error.contains("bad.toml"), "{error}");
}
