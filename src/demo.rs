//! `weir demo`: the whole gateway in one command, for a first look.
//!
//! Starts a gateway with its embedded broker, 100 simulated vibration sensors publishing
//! 1 kHz samples in 100-sample blocks over MQTT (with injected faults), and the two pipelines
//! of `examples/gateway/vibration.sql`. Results come back over MQTT, where the demo
//! subscribes like any other client and shows them as a live table.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use clap::Args;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use weir_connectors::mqtt::config::Qos;
use weir_connectors::mqtt::publisher::{PublisherConfig, PublisherStats, publish_sensors};
use weir_connectors::simulator::{MessageShape, SensorMessages, SignalModel};
use weir_gateway::{Gateway, GatewayConfig, Overrides};

const PIPELINES: &str = include_str!("../examples/gateway/vibration.sql");

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Print every result row as a JSON line instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Simulated sensors.
    #[arg(long, default_value_t = 100)]
    pub sensors: u32,
}

/// The latest results, per sensor, as they arrive on the result topics.
#[derive(Default)]
struct Board {
    rms: BTreeMap<String, Value>,
    anomalies: BTreeMap<String, (u64, Value)>,
    windows: u64,
    anomaly_count: u64,
    recent_anomalies: Vec<Value>,
}

/// A free loopback port, preferring `preferred`.
fn port(preferred: u16) -> u16 {
    if TcpListener::bind(("127.0.0.1", preferred)).is_ok() {
        return preferred;
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_or(preferred, |a| a.port())
}

pub fn demo(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let mut config = GatewayConfig::load(None, &Overrides::default())?;
    config.name = "demo".into();
    config.broker.embedded.listen = SocketAddr::from(([127, 0, 0, 1], port(1883)));
    config.admin.listen = SocketAddr::from(([127, 0, 0, 1], port(9464)));
    config.engine.idle_timeout = Duration::from_secs(2);
    // Checkpoints go to a directory of the demo's own, removed when it ends.
    let data = tempfile::tempdir()?;
    config.data_dir = data.path().to_owned();
    crate::gateway::runtime().block_on(run(config, args))
}

async fn run(config: GatewayConfig, args: DemoArgs) -> anyhow::Result<ExitCode> {
    let gateway = Gateway::start(config).await?;
    let broker_url = gateway.broker_url().unwrap_or_default().to_owned();
    let board = Arc::new(Mutex::new(Board::default()));
    let subscriber = subscribe(&broker_url, Arc::clone(&board), args.json).await?;
    gateway
        .deployments()
        .add(PIPELINES, "examples/gateway/vibration.sql", false)
        .await?;

    let start_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let model = SignalModel::new(7, args.sensors, 1000, true);
    let messages = SensorMessages::new(model, 1000, 100, start_ms, MessageShape::Blocks, false);
    let stats = Arc::new(PublisherStats::default());
    let publisher = tokio::spawn(publish_sensors(
        PublisherConfig {
            url: broker_url.clone(),
            topic: "plant1/{sensor}/vibration".into(),
            qos: Qos(0),
            realtime: true,
            ticks: None,
        },
        messages,
        1000,
        Arc::clone(&stats),
    ));

    let started = Instant::now();
    let tty = std::io::stdout().is_terminal() && !args.json;
    let mut last = (Instant::now(), 0u64, 0u64, 0u64);
    let mut frame = tokio::time::interval(Duration::from_secs(1));
    let deadline = args
        .seconds
        .map(|s| started + Duration::from_secs_f64(s.max(0.0)));
    if !args.json {
        eprintln!(
            "weir demo: embedded MQTT broker at {broker_url}, admin API at http://{} \
             (try `weir top` in another terminal). Ctrl-C to stop.",
            gateway.admin_address()
        );
    }
    let signal = weir_gateway::shutdown_signal();
    tokio::pin!(signal);
    loop {
        tokio::select! {
            _ = frame.tick() => {}
            _ = &mut signal => break,
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        if args.json {
            continue;
        }
        let now = Instant::now();
        let samples = stats.samples.load(Ordering::Relaxed);
        let sent = stats.messages.load(Ordering::Relaxed);
        let windows = board.lock().map_or(0, |b| b.windows);
        let elapsed = now.duration_since(last.0).as_secs_f64().max(1e-3);
        let rates = (
            (samples - last.1) as f64 / elapsed,
            (sent - last.2) as f64 / elapsed,
            (windows - last.3) as f64 / elapsed,
        );
        last = (now, samples, sent, windows);
        let pipelines = gateway.deployments().list();
        let mut text = render(&board, &pipelines, rates, started.elapsed(), args.sensors);
        text.push_str(&format!(
            "\nbroker {broker_url} · admin http://{admin} · watch: weir top --gateway http://{admin}\n\
             raw results: mosquitto_sub -p {port} -t 'plant1/+/rms' -t 'plant1/+/alerts' · Ctrl-C stops\n",
            admin = gateway.admin_address(),
            port = broker_url.rsplit(':').next().unwrap_or("1883"),
        ));
        let mut out = std::io::stdout().lock();
        if tty {
            // Clear the screen and draw from the top: a live table, not a scrolling log.
            let _ = write!(out, "\x1b[2J\x1b[H");
        }
        let _ = writeln!(out, "{text}");
        let _ = out.flush();
    }
    publisher.abort();
    subscriber.abort();
    let drained = gateway.shutdown().await;
    if !args.json {
        let board = board.lock().map_err(|_| anyhow::anyhow!("board lock"))?;
        eprintln!(
            "demo stopped after {:.0} s: {} samples published, {} window results, {} anomalies",
            started.elapsed().as_secs_f64(),
            stats.samples.load(Ordering::Relaxed),
            board.windows,
            board.anomaly_count
        );
    }
    Ok(if drained {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Subscribes to the result topics and keeps the board current; with `json`, prints rows.
async fn subscribe(
    url: &str,
    board: Arc<Mutex<Board>>,
    json: bool,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let address = weir_connectors::mqtt::config::BrokerAddress::parse(url)?;
    let mut options = MqttOptions::new("weir-demo-viewer", address.host, address.port);
    options.set_max_packet_size(1 << 20, 1 << 16);
    let (client, mut events) = AsyncClient::new(options, 16);
    client.subscribe("plant1/+/rms", QoS::AtMostOnce).await?;
    client.subscribe("plant1/+/alerts", QoS::AtMostOnce).await?;
    Ok(tokio::spawn(async move {
        let _client = client;
        loop {
            let event = match events.poll().await {
                Ok(event) => event,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let Event::Incoming(Packet::Publish(message)) = event else {
                continue;
            };
            let Ok(row) = serde_json::from_slice::<Value>(&message.payload) else {
                continue;
            };
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "topic": message.topic, "row": row })
                );
            }
            let sensor = row["sensor"].as_str().unwrap_or("?").to_owned();
            let Ok(mut board) = board.lock() else { return };
            if message.topic.ends_with("/rms") {
                board.windows += 1;
                board.rms.insert(sensor, row);
            } else {
                board.anomaly_count += 1;
                let entry = board.anomalies.entry(sensor).or_insert((0, Value::Null));
                entry.0 += 1;
                entry.1 = row.clone();
                board.recent_anomalies.push(row);
                let excess = board.recent_anomalies.len().saturating_sub(5);
                board.recent_anomalies.drain(..excess);
            }
        }
    }))
}

fn render(
    board: &Mutex<Board>,
    pipelines: &[weir_gateway::PipelineStatus],
    (samples_per_s, messages_per_s, windows_per_s): (f64, f64, f64),
    elapsed: Duration,
    sensors: u32,
) -> String {
    let Ok(board) = board.lock() else {
        return String::new();
    };
    let mut text = String::new();
    let p99 = pipelines
        .iter()
        .find(|p| p.name == "vibration_rms")
        .map_or(0.0, |p| p.watermark_to_emit.p99_ms);
    let states: Vec<String> = pipelines
        .iter()
        .map(|p| format!("{} {}", p.name, p.state))
        .collect();
    text.push_str(&format!(
        "Weir demo · {:.0} s · {sensors} sensors × 1 kHz over MQTT in 100-sample blocks, \
         with injected spikes, drift, steps and dropouts\n",
        elapsed.as_secs_f64()
    ));
    text.push_str(&format!(
        "in: {:>9.0} samples/s ({:.0} msg/s)   out: {:.0} windows/s   anomalies: {}   \
         p99 window close → result: {:.1} ms\n",
        samples_per_s, messages_per_s, windows_per_s, board.anomaly_count, p99
    ));
    text.push_str(&format!("pipelines: {}\n\n", states.join(", ")));
    if board.rms.is_empty() {
        text.push_str("waiting for the first 1-second windows to close (about 2 s)...\n");
        return text;
    }
    text.push_str(&format!(
        " {:<8} {:<26} {:>9} {:>9} {:>8}  {}\n",
        "SENSOR", "WINDOW", "RMS", "PEAK", "SAMPLES", "ANOMALIES"
    ));
    // Sensors with anomalies first, then by peak: the interesting ones on top.
    let mut rows: Vec<(&String, &Value)> = board.rms.iter().collect();
    rows.sort_by(|a, b| {
        let anomalies = |s: &String| board.anomalies.get(s).map_or(0, |(n, _)| *n);
        let peak = |v: &Value| v["peak"].as_f64().unwrap_or(0.0);
        anomalies(b.0)
            .cmp(&anomalies(a.0))
            .then(peak(b.1).total_cmp(&peak(a.1)))
    });
    for (sensor, row) in rows.iter().take(15) {
        let anomalies = board
            .anomalies
            .get(*sensor)
            .map_or(String::new(), |(n, last)| {
                format!("{n} (last z = {})", last["z"].as_f64().unwrap_or(0.0))
            });
        text.push_str(&format!(
            " {:<8} {:<26} {:>9.4} {:>9.4} {:>8}  {}\n",
            sensor,
            row["window_start"].as_str().unwrap_or("?"),
            row["rms"].as_f64().unwrap_or(f64::NAN),
            row["peak"].as_f64().unwrap_or(f64::NAN),
            row["samples"].as_u64().unwrap_or(0),
            anomalies
        ));
    }
    if rows.len() > 15 {
        text.push_str(&format!(" ... and {} more sensors\n", rows.len() - 15));
    }
    if !board.recent_anomalies.is_empty() {
        text.push_str("\nlatest anomalies:\n");
        for row in board.recent_anomalies.iter().rev() {
            text.push_str(&format!(
                "  {} at {}: v = {} (z = {})\n",
                row["sensor"].as_str().unwrap_or("?"),
                row["ts"].as_str().unwrap_or("?"),
                row["v"],
                row["z"]
            ));
        }
    }
    text
}
