//! `weir soak`: kill -9 a gateway again and again under load and check that the cloud ends
//! up with exactly the results of a run without crashes.
//!
//! A cloud runs in this process; the gateway is a child `weir gateway` process, enrolled
//! with it, running a deterministic simulator (fixed start, seed, realtime pace) into a
//! `cloud` sink: 1-second RMS per sensor. The gateway is killed with SIGKILL after a random
//! 150-900 ms and restarted at once, N times. Then every expected window (computed from the
//! simulator's pure sample function) must be in the cloud once, with the same value.

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use arrow::array::{Array, AsArray};
use arrow::datatypes::{Float64Type, Int64Type};
use clap::Args;
use weir_cloud::Cloud;
use weir_cloud::fleet::DeployRequest;
use weir_connectors::simulator::{SimulatorConfig, sample_value, sensor_id};

#[derive(Debug, Args)]
pub struct SoakArgs {
    /// How many times to kill the gateway.
    #[arg(long, default_value_t = 100)]
    kills: u32,
    /// Seconds of simulated data (at realtime pace); default: long enough to outlast the
    /// kills.
    #[arg(long)]
    seconds: Option<u64>,
    #[arg(long, default_value_t = 4)]
    sensors: u32,
    #[arg(long, default_value_t = 100)]
    rate_hz: u32,
    /// How the gateway is stopped: kill (SIGKILL), term (SIGTERM, a graceful stop that
    /// commits a last checkpoint) or mixed (alternating).
    #[arg(long, value_enum, default_value = "kill")]
    signal: Stop,
    /// Print the outcome as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Stop {
    Kill,
    Term,
    Mixed,
}

/// 2026-01-01T00:00:00Z, the simulator's start of event time.
const ORIGIN_S: i64 = 1_767_225_600;

/// What a soak run found.
struct Outcome {
    checked: usize,
    lost: usize,
    duplicated: u64,
    unexpected: usize,
    wrong: usize,
    /// From each stop to the first new result of the restarted gateway, sorted.
    recoveries: Vec<Duration>,
}

impl Outcome {
    fn ok(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.unexpected == 0 && self.wrong == 0
    }

    /// The recovery time at quantile `p` (0..=1), in milliseconds.
    fn recovery_ms(&self, p: f64) -> f64 {
        self.recoveries
            .get(((self.recoveries.len() as f64 - 1.0) * p).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    }
}

pub fn soak(args: SoakArgs) -> anyhow::Result<ExitCode> {
    let outcome = run(&args)?;
    let (p50, max) = (outcome.recovery_ms(0.5), outcome.recovery_ms(1.0));
    let Outcome {
        checked,
        lost,
        duplicated,
        unexpected,
        wrong,
        ref recoveries,
    } = outcome;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "kills": args.kills, "signal": format!("{:?}", args.signal).to_lowercase(),
                "checked": checked, "lost": lost,
                "duplicated": duplicated, "unexpected": unexpected, "wrong_values": wrong,
                "ok": outcome.ok(), "recoveries_measured": recoveries.len(),
                "recovery_p50_ms": p50, "recovery_max_ms": max,
            })
        );
    } else {
        println!(
            "{} kills: {checked} windows checked, {lost} lost, {duplicated} duplicated, {unexpected} unexpected, {wrong} with other values",
            args.kills
        );
        println!(
            "stop to the first new result at the restarted gateway's sink: p50 {p50:.0} ms, max {max:.0} ms ({} restarts)",
            recoveries.len()
        );
    }
    Ok(if outcome.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `weir bench --scenario recovery`: `kills` SIGKILLs of a gateway under the soak's load, and
/// the time from each to the first new result of the restarted gateway; the results are
/// checked as in `weir soak`.
pub fn recovery_bench(kills: u32, json: bool) -> anyhow::Result<ExitCode> {
    let args = SoakArgs {
        kills,
        seconds: None,
        sensors: 4,
        rate_hz: 100,
        signal: Stop::Kill,
        json,
    };
    let outcome = run(&args)?;
    let (p50, p99, max) = (
        outcome.recovery_ms(0.5),
        outcome.recovery_ms(0.99),
        outcome.recovery_ms(1.0),
    );
    if json {
        println!(
            "{}",
            serde_json::json!({
                "scenario": "recovery", "kills": kills,
                "recoveries": outcome.recoveries.len(),
                "p50_ms": p50, "p99_ms": p99, "max_ms": max,
                "checked": outcome.checked, "correct": outcome.ok(),
            })
        );
    } else {
        println!(
            "| scenario | kills | recoveries | p50 ms | p99 ms | max ms | windows | correct |"
        );
        println!("|---|--:|--:|--:|--:|--:|--:|---|");
        println!(
            "| recovery | {kills} | {} | {p50:.0} | {p99:.0} | {max:.0} | {} | {} |",
            outcome.recoveries.len(),
            outcome.checked,
            outcome.ok()
        );
    }
    Ok(if outcome.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn run(args: &SoakArgs) -> anyhow::Result<Outcome> {
    let seconds = args
        .seconds
        .unwrap_or_else(|| u64::from(args.kills) * 9 / 10 + 15);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let dir = tempfile::tempdir()?;
    let (cloud, admin) = crate::cloud::in_process(
        &runtime,
        &dir.path().join("cloud"),
        Duration::from_millis(500),
    )?;
    let fleet = Arc::clone(cloud.fleet());
    let labels = [("site".to_owned(), "soak".to_owned())].into();
    let (_, token) = fleet.add_gateway(&admin, "soak-gw", labels)?;
    fleet.deploy(
        &admin,
        DeployRequest {
            name: None,
            sql: sql(args, seconds),
            file: "soak.sql".into(),
            selector: "site=soak".into(),
            priority: 0,
            canary: 0,
            bake: Duration::ZERO,
            max_errors: 0,
            fresh: false,
        },
    )?;
    let url = format!("http://{}", cloud.address());
    let data = dir.path().join("gateway");
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut gateway = start_gateway(&url, &data, admin_port, Some(&token))?;
    // Enrolled before the first kill, or a restart would have no credential.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !data.join("cloud-credential.json").exists() {
        if Instant::now() > deadline {
            bail!("the gateway did not enroll within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    let http = crate::http::client_builder(None)?.build()?;
    let mut recoveries = Vec::new();
    for kill in 1..=args.kills {
        std::thread::sleep(Duration::from_millis(rand::random_range(150..900)));
        let graceful = match args.signal {
            Stop::Kill => false,
            Stop::Term => true,
            Stop::Mixed => kill % 2 == 0,
        };
        if graceful {
            Command::new("kill")
                .args(["-TERM", &gateway.id().to_string()])
                .status()
                .context("sending SIGTERM")?;
        } else {
            gateway.kill().context("killing the gateway")?;
        }
        gateway.wait()?;
        let killed = Instant::now();
        gateway = start_gateway(&url, &data, admin_port, None)?;
        if let Some(recovered) = runtime.block_on(first_result(&http, admin_port)) {
            recoveries.push(recovered.duration_since(killed));
        }
        if !args.json && kill % 10 == 0 {
            eprintln!("{kill} kills, {:.0} s", started.elapsed().as_secs_f64());
        }
    }

    let expected = expected(args, seconds);
    let deadline = Instant::now() + Duration::from_secs(seconds + 60);
    let rows = loop {
        let rows = runtime.block_on(stored(&cloud))?;
        if rows.len() >= expected.len() || Instant::now() > deadline {
            break rows;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let _ = gateway.kill();
    let _ = gateway.wait();
    runtime.block_on(cloud.shutdown());

    let mut seen = BTreeMap::new();
    let mut duplicated = 0u64;
    for (key, value) in rows {
        if seen.insert(key, value).is_some() {
            duplicated += 1;
        }
    }
    let lost = expected.keys().filter(|k| !seen.contains_key(*k)).count();
    let unexpected = seen.keys().filter(|k| !expected.contains_key(*k)).count();
    let wrong = expected
        .iter()
        .filter(|(key, (rms, samples))| {
            seen.get(*key).is_some_and(|(got, got_samples)| {
                got_samples != samples || (got - rms).abs() > 1e-9 * rms.abs().max(1.0)
            })
        })
        .count();
    recoveries.sort();
    Ok(Outcome {
        checked: expected.len(),
        lost,
        duplicated,
        unexpected,
        wrong,
        recoveries,
    })
}

fn sql(args: &SoakArgs, seconds: u64) -> String {
    format!(
        "CREATE SOURCE vib (sensor TEXT NOT NULL, ts TIMESTAMP NOT NULL, v DOUBLE,
                            WATERMARK FOR ts AS ts - INTERVAL '0.1' SECOND)
         WITH (connector = 'simulator', sensors = {}, rate_hz = {}, block_size = 10,
               duration_s = {seconds}, start = '2026-01-01T00:00:00Z', realtime = true);
         CREATE SINK soak_rms WITH (connector = 'cloud');
         CREATE PIPELINE soak_rms AS INSERT INTO soak_rms
         SELECT sensor, window_start, sqrt(avg(v * v)) AS rms, count(v) AS samples
         FROM TUMBLE(vib, ts, INTERVAL '1' SECOND)
         GROUP BY sensor, window_start;",
        args.sensors, args.rate_hz
    )
}

type Windows = BTreeMap<(String, i64), (f64, i64)>;

/// (sensor, window second) -> (RMS, samples) of a run without crashes, from the simulator's
/// pure sample function. The simulator sends nothing during a dropout, so a second without
/// samples has no window.
fn expected(args: &SoakArgs, seconds: u64) -> Windows {
    let config = SimulatorConfig {
        sensors: args.sensors,
        rate_hz: args.rate_hz,
        ..SimulatorConfig::default()
    };
    let rate = u64::from(args.rate_hz);
    let mut windows = Windows::new();
    for sensor in 0..args.sensors {
        for second in 0..seconds {
            let values: Vec<f64> = (second * rate..(second + 1) * rate)
                .filter_map(|n| sample_value(&config, sensor, n))
                .collect();
            if values.is_empty() {
                continue;
            }
            let rms = (values.iter().map(|v| v * v).sum::<f64>() / values.len() as f64).sqrt();
            windows.insert(
                (sensor_id(sensor), ORIGIN_S + second as i64),
                (rms, values.len() as i64),
            );
        }
    }
    windows
}

/// Every stored window, duplicates included.
async fn stored(cloud: &Cloud) -> anyhow::Result<Vec<((String, i64), (f64, i64))>> {
    let batches = match cloud
        .results()
        .query("SELECT sensor, to_unixtime(window_start) AS w, rms, samples FROM soak_rms")
        .await
    {
        Ok(batches) => batches,
        // Nothing stored yet.
        Err(_) => return Ok(Vec::new()),
    };
    let mut rows = Vec::new();
    for batch in batches {
        // Parquet strings come back as views; compare them as plain strings.
        let sensors = arrow::compute::cast(batch.column(0), &arrow::datatypes::DataType::Utf8)?;
        let sensors = sensors.as_string::<i32>();
        let windows = batch.column(1).as_primitive::<Int64Type>();
        let rms = batch.column(2).as_primitive::<Float64Type>();
        let samples = batch.column(3).as_primitive::<Int64Type>();
        for row in 0..batch.num_rows() {
            rows.push((
                (sensors.value(row).to_owned(), windows.value(row)),
                (
                    if rms.is_null(row) {
                        f64::NAN
                    } else {
                        rms.value(row)
                    },
                    samples.value(row),
                ),
            ));
        }
    }
    Ok(rows)
}

/// When the restarted gateway's sink first receives rows (the pipeline restored its
/// checkpoint and produced again); `None` if it does not within 10 s (the run is over).
async fn first_result(http: &reqwest::Client, admin_port: u16) -> Option<Instant> {
    let url = format!("http://127.0.0.1:{admin_port}/api/pipelines");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(response) = http.get(&url).send().await
            && let Ok(body) = response.json::<serde_json::Value>().await
        {
            let producing =
                body["pipelines"].as_array().into_iter().flatten().any(|p| {
                    p["name"] == "soak_rms" && p["rows_out"].as_u64().is_some_and(|n| n > 0)
                });
            let finished = body["pipelines"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["name"] == "soak_rms" && p["state"] == "finished");
            if producing {
                return Some(Instant::now());
            }
            if finished {
                return None;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

fn start_gateway(
    url: &str,
    data: &Path,
    admin_port: u16,
    enroll: Option<&str>,
) -> anyhow::Result<Child> {
    let mut command = Command::new(std::env::current_exe()?);
    command
        .args([
            "gateway", "--broker", "none", "--name", "soak-gw", "--cloud", url,
        ])
        .arg("--admin")
        .arg(format!("127.0.0.1:{admin_port}"))
        .arg("--data")
        .arg(data)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(token) = enroll {
        command.args(["--enroll", token]);
    }
    let child = command.spawn().context("starting weir gateway")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", admin_port)).is_err() {
        if Instant::now() > deadline {
            bail!("the gateway did not start within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child)
}
