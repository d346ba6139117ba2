//! What the multi-process tests share: free ports, child processes that die with the test,
//! a `weir cloud` with its CLI, and `weir gateway` processes enrolled with it.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const WEIR: &str = env!("CARGO_BIN_EXE_weir");

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

pub fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Kills the process if a test fails before it is stopped.
pub struct Running(pub Option<Child>);

impl Running {
    pub fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub cloud_port: u16,
    pub cloud: Running,
    pub token: String,
    pub tls: bool,
    /// Extra arguments and environment of `weir cloud`.
    pub cloud_args: Vec<String>,
    pub cloud_env: Vec<(String, String)>,
}

impl Fleet {
    pub fn new(tls: bool) -> Self {
        Self::with_cloud(tls, Vec::new(), Vec::new())
    }

    /// A fleet whose `weir cloud` runs with `args` and `env` besides the usual ones.
    pub fn with_cloud(tls: bool, args: Vec<String>, env: Vec<(String, String)>) -> Self {
        let mut fleet = Self {
            dir: tempfile::tempdir().expect("temp dir"),
            cloud_port: free_port(),
            cloud: Running(None),
            token: String::new(),
            tls,
            cloud_args: args,
            cloud_env: env,
        };
        fleet.start_cloud();
        let token_file = fleet.dir.path().join("cloud").join("admin.token");
        fleet.token = std::fs::read_to_string(&token_file).expect("first start writes admin.token");
        fleet
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.cloud_port)
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("cloud").join("tls").join("ca.pem")
    }

    pub fn start_cloud(&mut self) {
        let mut command = Command::new(WEIR);
        if self.tls {
            command.arg("cloud").arg("--tls");
        } else {
            command.arg("cloud");
        }
        let child = command
            .args(["--heartbeat", "300ms", "--listen"])
            .arg(format!("127.0.0.1:{}", self.cloud_port))
            .arg("--data")
            .arg(self.dir.path().join("cloud"))
            .args(&self.cloud_args)
            .envs(self.cloud_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("weir cloud starts");
        self.cloud = Running(Some(child));
        wait_for_port(self.cloud_port);
    }

    /// Runs the CLI against the cloud with `token`.
    pub fn cli_as(&self, token: &str, args: &[&str]) -> Output {
        let mut command = Command::new(WEIR);
        command
            .args(args)
            .env("WEIR_CLOUD", self.url())
            .env("WEIR_TOKEN", token)
            .current_dir(self.dir.path());
        if self.tls {
            command.env("WEIR_CA", self.ca());
        }
        command.output().expect("weir runs")
    }

    pub fn cli(&self, args: &[&str]) -> String {
        let output = self.cli_as(&self.token, args);
        assert!(
            output.status.success(),
            "weir {args:?} failed: {}{}",
            text(&output.stdout),
            text(&output.stderr)
        );
        text(&output.stdout)
    }

    pub fn add_gateway(&self, name: &str, labels: &[&str]) -> String {
        let mut args = vec!["cloud", "gateways", "add", name];
        for label in labels {
            args.extend(["--label", label]);
        }
        let out = self.cli(&args);
        out.lines()
            .find_map(|l| l.strip_prefix("enrollment token (one use): "))
            .unwrap_or_else(|| panic!("no token in: {out}"))
            .to_owned()
    }

    pub fn deploy(&self, name: &str, sql: &str, selector: &str) -> String {
        let file = self.dir.path().join(format!("{name}.sql"));
        std::fs::write(&file, sql).expect("write sql");
        self.cli(&[
            "deploy",
            &file.display().to_string(),
            "--selector",
            selector,
        ])
    }

    pub fn status(&self) -> Value {
        let out = self.cli(&["status", "--json"]);
        serde_json::from_str(&out).expect("status is JSON")
    }
}

pub struct Gateway {
    pub name: String,
    pub admin: u16,
    pub data: PathBuf,
    pub process: Running,
    /// Extra environment, e.g. `WEIR__CLOUD__DRAIN_RATE`.
    pub env: Vec<(String, String)>,
}

impl Gateway {
    pub fn start(fleet: &Fleet, name: &str, enroll: Option<&str>) -> Self {
        let mut gateway = Self::new(fleet, name);
        gateway.restart(&fleet.url(), enroll);
        gateway
    }

    pub fn new(fleet: &Fleet, name: &str) -> Self {
        Self {
            name: name.to_owned(),
            admin: free_port(),
            data: fleet.dir.path().join(name),
            process: Running(None),
            env: Vec::new(),
        }
    }

    pub fn restart(&mut self, cloud: &str, enroll: Option<&str>) {
        let mut command = self.command(cloud, enroll);
        self.process = Running(Some(command.spawn().expect("weir gateway starts")));
        wait_for_port(self.admin);
    }

    pub fn command(&self, cloud: &str, enroll: Option<&str>) -> Command {
        let mut command = Command::new(WEIR);
        command
            .args([
                "gateway", "--broker", "none", "--name", &self.name, "--cloud", cloud,
            ])
            .arg("--admin")
            .arg(format!("127.0.0.1:{}", self.admin))
            .arg("--data")
            .arg(&self.data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(token) = enroll {
            command.args(["--enroll", token]);
        }
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        command
    }

    /// The gateway's `/metrics` text, over a plain HTTP/1.1 request.
    pub fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let mut stream = TcpStream::connect(("127.0.0.1", self.admin)).expect("admin API");
        let request = format!(
            "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
            self.admin
        );
        stream.write_all(request.as_bytes()).expect("request");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("response");
        response
    }

    /// `weir pipelines list` against this gateway, as an operator at the site reads it.
    pub fn list_text(&self) -> String {
        let output = Command::new(WEIR)
            .args(["pipelines", "list", "--gateway"])
            .arg(format!("http://127.0.0.1:{}", self.admin))
            .output()
            .expect("weir runs");
        text(&output.stdout)
    }

    /// Pipeline name -> version, as the gateway's own admin API reports it.
    pub fn running(&self) -> Vec<(String, u64)> {
        let output = Command::new(WEIR)
            .args(["pipelines", "list", "--json", "--gateway"])
            .arg(format!("http://127.0.0.1:{}", self.admin))
            .output()
            .expect("weir runs");
        let Ok(body) = serde_json::from_slice::<Value>(&output.stdout) else {
            return Vec::new();
        };
        body["pipelines"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["state"] == "running")
            .map(|p| {
                (
                    p["name"].as_str().unwrap_or("?").to_owned(),
                    p["version"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    }
}

pub fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A server speaking the S3 API on a free loopback port, with one empty bucket: moto's
/// `moto_server` (installed by `./scripts/test.sh` from PyPI), stopped on drop.
pub struct S3Server {
    pub port: u16,
    _process: Running,
}

impl S3Server {
    pub fn start(bucket: &str) -> Self {
        let port = free_port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server (pip install 'moto[server]') runs");
        let server = Self {
            port,
            _process: Running(Some(child)),
        };
        wait_for_port(port);
        let (status, body) = server.http("PUT", &format!("/{bucket}"));
        assert_eq!(status, 200, "creating bucket {bucket}: {body}");
        server
    }

    /// The `weir cloud` environment for this server.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT", format!("http://127.0.0.1:{}", self.port)),
            ("AWS_ALLOW_HTTP", "true".to_owned()),
            ("AWS_ACCESS_KEY_ID", "weir-test".to_owned()),
            ("AWS_SECRET_ACCESS_KEY", "weir-test-secret".to_owned()),
            ("AWS_REGION", "us-east-1".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// One plain HTTP/1.1 request; (status, body).
    pub fn http(&self, method: &str, path: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("S3 server");
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .expect("request");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("response");
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = response
            .split_once("\r\n\r\n")
            .map_or(String::new(), |(_, b)| b.to_owned());
        (status, body)
    }
}
