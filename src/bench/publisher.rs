//! `weir bench-publisher` (hidden): the simulated sensors of the MQTT scenarios, in a process
//! of their own so that their CPU and memory are not counted as Weir's.
//!
//! The bench starts it with [`PublisherProcess::spawn`]; it connects, publishes, disconnects
//! once the broker has everything, and prints one [`PublisherReport`] as JSON on stdout.

use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use rumqttc::{AsyncClient, Event, Outgoing, Packet, QoS};
use serde::{Deserialize, Serialize};
use weir_connectors::mqtt::BrokerConfig;
use weir_connectors::simulator::{MessageShape, SensorMessages, SignalModel, sensor_id};

use super::mqtt::SENSOR_TOPIC;

/// Samples per tick and sensor: one block, 100 ms at 1 kHz.
pub const BLOCK_SAMPLES: u32 = 100;
/// The sensors' sample rate.
pub const RATE_HZ: u32 = 1000;

/// How the simulated sensors group samples into messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Shape {
    /// One JSON message per sample: `{"ts":...,"v":...}`.
    Rows,
    /// One JSON message per 100-sample block (split where a dropout cuts it).
    Blocks,
}

/// Arguments of the hidden `weir bench-publisher` command.
#[derive(Debug, Clone, clap::Args)]
pub struct PublisherArgs {
    /// Broker, `mqtt://host:port`.
    #[arg(long)]
    pub url: String,
    /// Simulated 1 kHz sensors, publishing to `plant1/<sensor>/vibration`.
    #[arg(long)]
    pub sensors: u32,
    /// Ticks to publish; one tick is 100 samples of every sensor.
    #[arg(long)]
    pub ticks: u64,
    /// Message shape.
    #[arg(long, value_enum)]
    pub shape: Shape,
    /// MQTT QoS of the publishes: 0 or 1.
    #[arg(long, default_value_t = 0)]
    pub qos: u8,
    /// One tick per 100 ms of wall-clock time (else as fast as the broker takes them).
    #[arg(long)]
    pub realtime: bool,
    /// Event time of the first sample, epoch milliseconds.
    #[arg(long)]
    pub start_ms: i64,
    /// With --realtime: wall-clock time (epoch milliseconds) of the first tick.
    #[arg(long)]
    pub first_tick_at_ms: Option<i64>,
    /// Seed of the signal model.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Inject the simulator's faults (spikes, steps, drifts, dropouts).
    #[arg(long)]
    pub faults: bool,
}

impl PublisherArgs {
    fn to_argv(&self) -> Vec<String> {
        let mut argv = vec![
            "bench-publisher".to_owned(),
            format!("--url={}", self.url),
            format!("--sensors={}", self.sensors),
            format!("--ticks={}", self.ticks),
            format!(
                "--shape={}",
                match self.shape {
                    Shape::Rows => "rows",
                    Shape::Blocks => "blocks",
                }
            ),
            format!("--qos={}", self.qos),
            format!("--start-ms={}", self.start_ms),
            format!("--seed={}", self.seed),
        ];
        if self.realtime {
            argv.push("--realtime".into());
        }
        if let Some(at) = self.first_tick_at_ms {
            argv.push(format!("--first-tick-at-ms={at}"));
        }
        if self.faults {
            argv.push("--faults".into());
        }
        argv
    }

    /// The model whose signal these arguments publish, for checking results.
    pub fn model(&self) -> SignalModel {
        SignalModel::new(self.seed, self.sensors, RATE_HZ, self.faults)
    }
}

/// What a publisher process did, printed as its last line of output.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PublisherReport {
    pub messages: u64,
    pub samples: u64,
    /// QoS 1: publishes the broker acknowledged before the publisher disconnected.
    pub acknowledged: u64,
    /// From the first tick until everything was handed to the client (QoS 0) or
    /// acknowledged by the broker (QoS 1).
    pub seconds: f64,
    /// CPU time the publisher process used in all.
    pub cpu_seconds: f64,
    /// With --realtime: wall-clock time (epoch ms) at which each tick's first message was
    /// handed to the MQTT client.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tick_sent_ms: Vec<f64>,
}

impl PublisherReport {
    pub fn messages_per_sec(&self) -> f64 {
        self.messages as f64 / self.seconds.max(1e-9)
    }
}

/// The hidden `weir bench-publisher` command.
pub fn publisher(args: PublisherArgs) -> anyhow::Result<ExitCode> {
    if args.sensors == 0 || args.qos > 1 {
        bail!("--sensors must be positive and --qos 0 or 1");
    }
    let report = crate::gateway::runtime().block_on(publish(args))?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(ExitCode::SUCCESS)
}

/// Publishes like `weir_connectors::mqtt::publisher::publish_sensors` (same messages, same
/// client settings, ticks on a tokio interval), except at the end: it waits for the broker to
/// acknowledge every QoS 1 publish and to close the connection after DISCONNECT, because
/// closing a socket with unread acknowledgements makes the kernel reset the connection and
/// drop whatever was still unsent (Mosquitto lost ~0.4% of a QoS 1 backlog that way). And it
/// fails instead of reconnecting: a benchmark's publisher must not hide a lost connection.
async fn publish(args: PublisherArgs) -> anyhow::Result<PublisherReport> {
    let shape = match args.shape {
        Shape::Rows => MessageShape::Rows,
        Shape::Blocks => MessageShape::Blocks,
    };
    let mut messages = SensorMessages::new(
        args.model(),
        RATE_HZ,
        BLOCK_SAMPLES,
        args.start_ms,
        shape,
        false,
    );
    let broker = BrokerConfig {
        url: Some(args.url.clone()),
        ..BrokerConfig::default()
    };
    let mut options =
        broker.mqtt_options(&format!("weir-bench-sensors-{}", std::process::id()), true)?;
    options.set_inflight(1000);
    let (client, mut events) = AsyncClient::new(options, 8192);
    let acknowledged = Arc::new(AtomicU64::new(0));
    let (connected_sender, connected) = tokio::sync::oneshot::channel::<()>();
    let connection = {
        let acknowledged = Arc::clone(&acknowledged);
        tokio::spawn(async move {
            let mut connected_sender = Some(connected_sender);
            let mut disconnecting = false;
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(sender) = connected_sender.take() {
                            let _ = sender.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        acknowledged.fetch_add(1, Ordering::Release);
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => disconnecting = true,
                    Ok(_) => {}
                    // After DISCONNECT the broker closes the connection: that is the end.
                    Err(_) if disconnecting => return Ok(()),
                    Err(error) => return Err(anyhow::anyhow!("connection lost: {error}")),
                }
            }
        })
    };
    tokio::time::timeout(Duration::from_secs(10), connected)
        .await
        .context("no connection to the broker within 10 s")?
        .context("the connection failed")?;
    let topics: Vec<String> = (0..args.sensors)
        .map(|i| SENSOR_TOPIC.replace("{sensor}", &sensor_id(i)))
        .collect();
    let qos = if args.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    // Each tick is encoded ahead, while waiting for it, so that its messages leave at the
    // tick as every sensor would send its own block, not after the whole plant's blocks were
    // encoded (15 ms for 1000 sensors).
    let mut samples = 0u64;
    let mut encode = |tick: u64, into: &mut Vec<(usize, Vec<u8>)>| {
        samples += messages.tick(tick, |sensor, message| {
            into.push((sensor, message.to_vec()));
        });
    };
    let mut outgoing: Vec<(usize, Vec<u8>)> = Vec::new();
    let mut next: Vec<(usize, Vec<u8>)> = Vec::new();
    if args.ticks > 0 {
        encode(0, &mut next);
    }
    if let Some(at) = args.first_tick_at_ms {
        let now = epoch_ms_now();
        if at > now {
            tokio::time::sleep(Duration::from_millis((at - now) as u64)).await;
        }
    }
    let started = Instant::now();
    let period = Duration::from_millis(u64::from(BLOCK_SAMPLES) * 1000 / u64::from(RATE_HZ));
    let clock_started = tokio::time::Instant::now();
    let mut clock = tokio::time::interval_at(clock_started, period);
    clock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sent = 0u64;
    let mut tick_sent_ms = Vec::new();
    for tick in 0..args.ticks {
        if args.realtime {
            clock.tick().await;
            tick_sent_ms.push(epoch_ms_now_f64());
        }
        std::mem::swap(&mut outgoing, &mut next);
        for (sensor, payload) in outgoing.drain(..) {
            client
                .publish(topics[sensor].as_str(), qos, false, payload)
                .await
                .context("publishing")?;
            sent += 1;
        }
        if tick + 1 < args.ticks {
            if args.realtime {
                // Half a tick later: encoding takes most of a core for 15 ms, and the bench
                // measures how soon results follow a tick, which real sensors, being other
                // devices, do not slow down. By then the tick's messages are long delivered.
                let ticks_done = u32::try_from(tick).unwrap_or(u32::MAX);
                tokio::time::sleep_until(clock_started + period * ticks_done + period / 2).await;
            }
            encode(tick + 1, &mut next);
        }
    }
    if qos == QoS::AtLeastOnce {
        let deadline = Instant::now() + Duration::from_secs(60);
        while acknowledged.load(Ordering::Acquire) < sent && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    client.disconnect().await.context("disconnecting")?;
    tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .context("the broker did not close the connection after DISCONNECT")?
        .context("the connection task")??;
    Ok(PublisherReport {
        messages: sent,
        samples,
        acknowledged: acknowledged.load(Ordering::Acquire),
        seconds,
        tick_sent_ms,
        cpu_seconds: super::procfs::cpu_time(None).map_or(0.0, |d| d.as_secs_f64()),
    })
}

/// Wall-clock time in epoch milliseconds.
pub fn epoch_ms_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Wall-clock time in epoch milliseconds, with a fraction.
pub fn epoch_ms_now_f64() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// A running publisher process; killed if dropped before it finished.
pub struct PublisherProcess {
    child: tokio::process::Child,
}

impl PublisherProcess {
    /// Starts `weir bench-publisher` from this very executable.
    pub fn spawn(args: &PublisherArgs) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find the weir executable")?;
        let child = tokio::process::Command::new(exe)
            .args(args.to_argv())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the publisher process")?;
        Ok(Self { child })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Waits for the publisher to finish and returns its report.
    pub async fn finish(self) -> anyhow::Result<PublisherReport> {
        let output = self
            .child
            .wait_with_output()
            .await
            .context("waiting for the publisher")?;
        if !output.status.success() {
            bail!("the publisher process failed: {}", output.status);
        }
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout.lines().last().unwrap_or_default();
        serde_json::from_str(line).with_context(|| format!("unreadable publisher report: {line:?}"))
    }
}
