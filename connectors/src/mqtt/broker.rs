//! The embedded MQTT broker: rumqttd on threads of its own, so a site needs nothing else.
//!
//! Sensors, `mosquitto_pub`/`mosquitto_sub` and Weir's own sources and sinks connect to it as
//! to any MQTT 3.1.1 broker. It binds to loopback unless told otherwise. rumqttd keeps
//! messages per subscription in an in-memory commit log of `segments` segments of
//! `segment_bytes` each; that bounds the broker's memory and how much backlog a persistent
//! session can hold while its subscriber is away.
//!
//! The log is full, and resident, whenever messages flow: rumqttd drops a segment only when
//! a new one would exceed the count, whether or not every subscriber has read it. So the
//! default is small, 4 x 2 MiB per subscription: about 10 s of 100 sensors' 1 kHz blocks,
//! 1 s of 1000 sensors'. Size it to the message bytes per second of a subscription times
//! the longest time a persistent subscriber may be away.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use serde::{Deserialize, Serialize};

use crate::error::{ConnectorError, Result};

/// Settings of the embedded broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedBrokerConfig {
    /// Address to listen on. Loopback by default: expose it to the plant network on purpose.
    pub listen: SocketAddr,
    /// Largest accepted message, in bytes.
    pub max_message_bytes: usize,
    /// Most simultaneous client connections.
    pub max_connections: usize,
    /// Size of one commit-log segment per subscription, in bytes.
    pub segment_bytes: usize,
    /// Segments kept per subscription; older messages are dropped beyond that.
    pub segments: usize,
    /// User name -> password; empty: no login required.
    pub users: HashMap<String, String>,
}

impl Default for EmbeddedBrokerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            max_message_bytes: 1 << 20,
            max_connections: 10_000,
            segment_bytes: 2 << 20,
            segments: 4,
            users: HashMap::new(),
        }
    }
}

impl EmbeddedBrokerConfig {
    /// Checks the settings; errors name the setting.
    pub fn validate(&self) -> Result<()> {
        let invalid = |message: &str| Err(ConnectorError::config("embedded broker", message));
        if self.max_message_bytes == 0 || self.max_message_bytes > 256 << 20 {
            return invalid("max_message_bytes must be between 1 and 268435456");
        }
        if self.segment_bytes < self.max_message_bytes {
            return invalid("segment_bytes must be at least max_message_bytes");
        }
        if self.segments == 0 || self.max_connections == 0 {
            return invalid("segments and max_connections must be at least 1");
        }
        Ok(())
    }
}

/// A running embedded broker. It stops with the process: rumqttd has no shutdown.
#[derive(Debug)]
pub struct EmbeddedBroker {
    address: SocketAddr,
}

impl EmbeddedBroker {
    /// Starts the broker and waits until it accepts connections. Fails when the address is
    /// taken or the broker does not come up within a few seconds.
    pub fn start(config: &EmbeddedBrokerConfig) -> Result<Self> {
        config.validate()?;
        let mut address = config.listen;
        // rumqttd reports a failed bind only in its log, so find out first; port 0 asks
        // for a free port, which rumqttd cannot report back either.
        {
            let probe = TcpListener::bind(address).map_err(|e| {
                ConnectorError::config(
                    "embedded broker",
                    format!("cannot listen on {address}: {e}"),
                )
            })?;
            if address.port() == 0 {
                address = probe.local_addr().map_err(|e| {
                    ConnectorError::Internal(format!("embedded broker address: {e}"))
                })?;
            }
        }
        let connections = ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: config.max_message_bytes,
            max_inflight_count: 500,
            auth: (!config.users.is_empty()).then(|| config.users.clone()),
            external_auth: None,
            dynamic_filters: true,
        };
        let server = ServerSettings {
            name: "weir-v4".into(),
            listen: address,
            tls: None,
            next_connection_delay_ms: 1,
            connections,
        };
        let rumqttd_config = Config {
            id: 0,
            router: RouterConfig {
                max_connections: config.max_connections,
                max_outgoing_packet_count: 200,
                max_segment_size: config.segment_bytes,
                max_segment_count: config.segments,
                ..RouterConfig::default()
            },
            v4: Some(HashMap::from([("1".to_owned(), server)])),
            ..Config::default()
        };
        std::thread::Builder::new()
            .name("mqtt-broker".into())
            .spawn(move || {
                let mut broker = Broker::new(rumqttd_config);
                if let Err(error) = broker.start() {
                    tracing::error!(%error, "embedded MQTT broker stopped");
                }
            })
            .map_err(|e| ConnectorError::Internal(format!("cannot start broker thread: {e}")))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_err() {
            if Instant::now() > deadline {
                return Err(ConnectorError::config(
                    "embedded broker",
                    format!("did not start listening on {address}"),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        match disable_nagle(address) {
            Ok(true) => {}
            Ok(false) => tracing::warn!(
                %address,
                "embedded MQTT broker: listening socket not found, Nagle stays on"
            ),
            Err(error) => tracing::warn!(
                %address, %error,
                "embedded MQTT broker: cannot turn Nagle off"
            ),
        }
        tracing::info!(%address, "embedded MQTT broker listening");
        Ok(Self { address })
    }

    /// Where the broker listens.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// `mqtt://host:port` for clients.
    pub fn url(&self) -> String {
        format!("mqtt://{}", self.address)
    }
}

/// Turns Nagle's algorithm off for every connection the broker accepts from now on.
///
/// rumqttd binds its listener itself and leaves Nagle on for the connections it accepts. A
/// subscriber that sends nothing back (QoS 0) delays its ACKs, so the small tail of each burst
/// the broker forwards to it waits for one: 40 ms on Linux, a stalled window of results.
/// Accepted sockets inherit `TCP_NODELAY` from their listener, so setting it once on rumqttd's
/// listening socket, found among the process's descriptors by its address, covers every
/// client. `Ok(false)` if no such socket is there.
fn disable_nagle(address: SocketAddr) -> std::io::Result<bool> {
    let listener = find_socket(|socket| {
        let listening = socket.is_listener().unwrap_or(false);
        let bound_here = socket.local_addr().ok().and_then(|a| a.as_socket()) == Some(address);
        (listening && bound_here).then(|| socket.set_tcp_nodelay(true))
    })?;
    listener.transpose().map(|set| set.is_some())
}

/// The first `probe(socket)` that is `Some`, over the process's open sockets.
#[allow(unsafe_code)]
pub(crate) fn find_socket<T>(
    mut probe: impl FnMut(&socket2::SockRef<'_>) -> Option<T>,
) -> std::io::Result<Option<T>> {
    use std::os::fd::{BorrowedFd, RawFd};
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let Ok(fd) = entry?.file_name().to_string_lossy().parse::<RawFd>() else {
            continue;
        };
        // SAFETY: the descriptor is only queried (and one option set) while borrowed. If
        // another thread closes it meanwhile the calls fail with EBADF; if the number is
        // reused, the probe checks the address before it changes anything.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        if let Some(found) = probe(&socket2::SockRef::from(&fd)) {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_the_broker_accepts_have_nagle_off() {
        let config = EmbeddedBrokerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            ..EmbeddedBrokerConfig::default()
        };
        let broker = EmbeddedBroker::start(&config).expect("broker starts");
        let client = TcpStream::connect(broker.address()).expect("client connects");
        let client_address = client.local_addr().expect("client address");
        // The broker's end of this connection: its address, with the client as the peer.
        let deadline = Instant::now() + Duration::from_secs(5);
        let nodelay = loop {
            let found = find_socket(|socket| {
                let peer = socket.peer_addr().ok().and_then(|a| a.as_socket());
                let local = socket.local_addr().ok().and_then(|a| a.as_socket());
                (peer == Some(client_address) && local == Some(broker.address()))
                    .then(|| socket.tcp_nodelay())
            })
            .expect("descriptors readable");
            if let Some(nodelay) = found {
                break nodelay.expect("TCP_NODELAY readable");
            }
            assert!(
                Instant::now() < deadline,
                "the broker never accepted the client"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(nodelay, "Nagle is on for a connection the broker accepted");
    }
}
