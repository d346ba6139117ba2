//! A Mosquitto broker started as a child process, for interoperability tests and for
//! benchmarks against a broker Weir did not write.
//!
//! Needs the `mosquitto` binary (Debian package `mosquitto`; `./scripts/test.sh` installs
//! it). The broker listens on loopback only, allows anonymous clients, and is killed when the
//! handle is dropped. It queues QoS 0 messages for absent persistent sessions too
//! (`queue_qos0_messages`), as a site broker that buffers sensor data would be set up.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{ConnectorError, Result};

/// A running Mosquitto process; killed on drop.
#[derive(Debug)]
pub struct Mosquitto {
    child: Option<Child>,
    address: SocketAddr,
    _config: tempfile_path::TempConfig,
}

/// Where the `mosquitto` binary is, if installed.
pub fn binary() -> Option<PathBuf> {
    [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

impl Mosquitto {
    /// Starts Mosquitto on a free loopback port and waits until it accepts connections.
    pub fn start() -> Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| ConnectorError::Internal(format!("no free port: {e}")))?
            .port();
        Self::start_on(port)
    }

    /// Starts Mosquitto on `port` (e.g. again after [`Self::kill`], to simulate a restart).
    pub fn start_on(port: u16) -> Result<Self> {
        Self::start_with(port, "allow_anonymous true\n")
    }

    /// Starts Mosquitto on `port` with `listener_config` lines for its listener, e.g.
    /// `password_file ...` or `certfile ...` / `keyfile ...` for TLS.
    pub fn start_with(port: u16, listener_config: &str) -> Result<Self> {
        Self::launch(port, listener_config, "persistence false\n")
    }

    /// Starts Mosquitto on `port` with its sessions and in-flight messages saved in `dir`
    /// when it stops ([`Self::stop`]) and loaded when it starts: a broker that comes back
    /// after a restart with the persistent sessions it had.
    pub fn start_persistent(port: u16, dir: &std::path::Path) -> Result<Self> {
        // Started as root, Mosquitto drops to its own user, which must be able to write here.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).map_err(|e| {
                ConnectorError::Internal(format!("cannot open {} to mosquitto: {e}", dir.display()))
            })?;
        }
        Self::launch(
            port,
            "allow_anonymous true\n",
            &format!(
                "persistence true\npersistence_location {}/\nautosave_interval 0\n",
                dir.display()
            ),
        )
    }

    fn launch(port: u16, listener_config: &str, persistence: &str) -> Result<Self> {
        let binary = binary().ok_or_else(|| {
            ConnectorError::config(
                "mosquitto",
                "the mosquitto binary is not installed (apt-get install mosquitto)",
            )
        })?;
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        let config = tempfile_path::TempConfig::write(&format!(
            "per_listener_settings true\nlistener {port} 127.0.0.1\n{listener_config}\
             {persistence}max_queued_messages 0\nmax_inflight_messages 0\nqueue_qos0_messages true\n\
             message_size_limit 0\nlog_dest none\n"
        ))?;
        let child = Command::new(binary)
            .arg("-c")
            .arg(config.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| ConnectorError::Internal(format!("cannot start mosquitto: {e}")))?;
        let mut broker = Self {
            child: Some(child),
            address,
            _config: config,
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_err() {
            if Instant::now() > deadline {
                broker.kill();
                return Err(ConnectorError::Internal(format!(
                    "mosquitto did not start listening on {address}"
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(broker)
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    pub fn url(&self) -> String {
        format!("mqtt://{}", self.address)
    }

    /// The process id, e.g. to measure the broker's own CPU.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the broker as an operator would (SIGTERM): a persistent one saves its state.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    /// Kills the broker at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}

mod tempfile_path {
    //! A config file removed on drop, without a dependency for one file.

    use std::path::{Path, PathBuf};

    use super::*;

    #[derive(Debug)]
    pub struct TempConfig(PathBuf);

    impl TempConfig {
        pub fn write(text: &str) -> Result<Self> {
            let path = std::env::temp_dir().join(format!(
                "weir-mosquitto-{}-{:08x}.conf",
                std::process::id(),
                rand::random::<u32>()
            ));
            let mut file = std::fs::File::create(&path)
                .map_err(|e| ConnectorError::io("writing", &path, e))?;
            file.write_all(text.as_bytes())
                .map_err(|e| ConnectorError::io("writing", &path, e))?;
            Ok(Self(path))
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempConfig {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}
