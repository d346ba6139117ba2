//! Results through the durable uplink, with real processes, RocksDB on disk and gRPC: a
//! gateway keeps computing while its cloud is down, and after the outage the cloud holds
//! every window exactly once, current results having gone ahead of the drained backlog.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use support::{Fleet, Gateway, S3Server, text, wait_until};

const SQL: &str = "
CREATE SOURCE vib (sensor TEXT NOT NULL, ts TIMESTAMP NOT NULL, v DOUBLE,
                   WATERMARK FOR ts AS ts - INTERVAL '0.2' SECOND)
WITH (connector = 'simulator', sensors = 4, rate_hz = 200, realtime = true);
CREATE SINK vibration_rms WITH (connector = 'cloud', priority = 'bulk');
CREATE PIPELINE rms AS INSERT INTO vibration_rms
SELECT sensor, window_start, window_end, sqrt(avg(v * v)) AS rms, count(*) AS samples
FROM TUMBLE(vib, ts, INTERVAL '1' SECOND)
GROUP BY sensor, window_start, window_end;
";

/// Per sensor: (rows, distinct windows, first and last window start in seconds).
type Coverage = BTreeMap<String, (u64, u64, i64, i64)>;

fn coverage(fleet: &Fleet) -> Option<Coverage> {
    let output = fleet.cli_as(
        &fleet.token,
        &[
            "query",
            "SELECT sensor, count(*) AS n, count(DISTINCT window_start) AS d, \
             to_unixtime(min(window_start)) AS first, to_unixtime(max(window_start)) AS last \
             FROM vibration_rms GROUP BY sensor",
            "--json",
        ],
    );
    if !output.status.success() {
        return None;
    }
    let rows = text(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .map(|row| {
            let number = |key: &str| row[key].as_i64().unwrap_or(-1);
            (
                row["sensor"].as_str().unwrap_or("?").to_owned(),
                (
                    number("n") as u64,
                    number("d") as u64,
                    number("first"),
                    number("last"),
                ),
            )
        })
        .collect::<Coverage>();
    (!rows.is_empty()).then_some(rows)
}

/// The gateway's `weir_uplink_pending_batches` of `stream`, from its `/metrics` text.
fn pending_batches(metrics: &str, stream: &str) -> u64 {
    let series = format!("weir_uplink_pending_batches{{stream=\"{stream}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&series))
        .and_then(|value| value.trim().parse::<f64>().ok())
        .map_or(0, |value| value as u64)
}

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Every sensor has each second from its first window to its last exactly once.
fn complete(coverage: &Coverage) -> bool {
    coverage
        .values()
        .all(|&(n, d, first, last)| n == d && d as i64 == last - first + 1)
}

#[test]
fn an_outage_loses_nothing_and_live_results_overtake_the_backlog() {
    let mut fleet = Fleet::new(false);
    let token = fleet.add_gateway("plant1-a", &["site=plant1"]);
    let mut gateway = Gateway::new(&fleet, "plant1-a");
    // Slow enough that the backlog of the outage takes seconds to drain.
    gateway
        .env
        .push(("WEIR__CLOUD__DRAIN_RATE".into(), "1KiB".into()));
    gateway.restart(&fleet.url(), Some(&token));
    fleet.deploy("rms", SQL, "site=plant1");
    wait_until("the first results are stored in the cloud", || {
        coverage(&fleet).is_some()
    });

    // The WAN goes down: the cloud is killed, the gateway goes on computing.
    fleet.cloud.kill();
    let outage = Instant::now();
    // Down until the gateway holds 8 batches (one a second) for the cloud.
    let deadline = outage + Duration::from_secs(60);
    while pending_batches(&gateway.metrics(), "vibration_rms") < 8
        || outage.elapsed() < Duration::from_secs(8)
    {
        assert!(
            Instant::now() < deadline,
            "no backlog builds up during the outage"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let back = now_s();
    fleet.start_cloud();

    // Results of after the outage arrive while the outage's backlog is still draining.
    let mut live_before_backlog = None;
    wait_until("a window from after the outage is stored", || {
        let Some(seen) = coverage(&fleet) else {
            return false;
        };
        let live = seen.values().all(|&(_, _, _, last)| last >= back);
        if live {
            live_before_backlog = Some(!complete(&seen));
        }
        live
    });
    assert_eq!(
        live_before_backlog,
        Some(true),
        "live results should not wait for the backlog"
    );

    // Then the backlog: every second of every sensor, once, from before the outage on.
    let deadline = Instant::now() + Duration::from_secs(60);
    let seen = loop {
        let seen = coverage(&fleet).unwrap_or_default();
        if seen.len() == 4 && complete(&seen) {
            break seen;
        }
        assert!(
            Instant::now() < deadline,
            "the backlog did not drain completely: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    for (sensor, (_, windows, first, last)) in &seen {
        assert!(
            *first < back - 8 && *last >= back,
            "{sensor}: windows {first}..={last} should span the outage ending at {back}"
        );
        assert!(*windows >= 9, "{sensor}: only {windows} windows");
    }

    // Status tells, per gateway and stream, what is stored and what is left.
    wait_until("the gateway reports an empty backlog", || {
        let status = fleet.status();
        let stream = &status["gateways"][0]["streams"][0];
        stream["stream"] == "vibration_rms"
            && stream["priority"] == "bulk"
            && stream["pending"].as_u64().is_some_and(|p| p <= 2)
            && stream["last_stored_seq"].as_u64().is_some()
    });
    let metrics = gateway.metrics();
    assert!(
        metrics.contains("weir_uplink_pending_batches{stream=\"vibration_rms\"}")
            && metrics.contains("weir_pipeline_checkpoints_total{pipeline=\"rms\"}"),
        "{metrics}"
    );
    let table = fleet.cli(&["status"]);
    assert!(
        table.contains("vibration_rms") && table.contains("bulk"),
        "{table}"
    );
    drop(gateway);
}

#[test]
fn a_gateway_killed_twenty_times_still_delivers_every_window_once_with_the_same_values() {
    // `weir soak` runs the cloud, stops its gateway at random moments, with SIGKILL and
    // SIGTERM in turn, and compares what the cloud stored with the windows of a run
    // without crashes.
    let output = std::process::Command::new(support::WEIR)
        .args([
            "soak",
            "--kills",
            "20",
            "--seconds",
            "40",
            "--signal",
            "mixed",
            "--json",
        ])
        .output()
        .expect("weir soak runs");
    let outcome: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|_| {
        panic!(
            "weir soak printed no JSON: {}{}",
            text(&output.stdout),
            text(&output.stderr)
        )
    });
    assert_eq!(outcome["kills"], 20, "{outcome}");
    assert!(
        outcome["checked"].as_u64().is_some_and(|n| n >= 150),
        "{outcome}"
    );
    for count in ["lost", "duplicated", "unexpected", "wrong_values"] {
        assert_eq!(outcome[count], 0, "{count}: {outcome}");
    }
    assert!(output.status.success(), "{outcome}");
}

#[test]
fn an_outage_beyond_budget_does_what_each_overflow_policy_says() {
    let mut fleet = Fleet::new(false);
    let token = fleet.add_gateway("plant1-r", &["site=plant1"]);
    let mut gateway = Gateway::new(&fleet, "plant1-r");
    gateway.restart(&fleet.url(), Some(&token));
    // 20 s of 4 sensors at 100 Hz into streams whose budgets hold a few seconds only, one
    // per overflow policy.
    let pipeline = |name: &str| {
        format!(
            "CREATE PIPELINE {name} AS INSERT INTO {name}
             SELECT sensor, window_start, window_end, sqrt(avg(v * v)) AS rms, count(v) AS samples
             FROM TUMBLE(vib, ts, INTERVAL '1' SECOND)
             GROUP BY sensor, window_start, window_end;"
        )
    };
    let sql = format!(
        "CREATE SOURCE vib (sensor TEXT NOT NULL, ts TIMESTAMP NOT NULL, v DOUBLE,
                            WATERMARK FOR ts AS ts - INTERVAL '0.1' SECOND)
         WITH (connector = 'simulator', sensors = 4, rate_hz = 100, block_size = 10,
               duration_s = 20, faults = false, start = '2026-01-01T00:00:00Z', realtime = true);
         CREATE SINK coarse_rms WITH (connector = 'cloud', max_bytes = '6KiB',
             overflow = 'reaggregate', reaggregate_to = '1m', merge = 'rms:rms(samples), samples:sum');
         CREATE SINK latest_rms WITH (connector = 'cloud', max_bytes = '6KiB', overflow = 'drop_oldest');
         CREATE SINK earliest_rms WITH (connector = 'cloud', max_bytes = '6KiB', overflow = 'drop_newest');
         {} {} {}",
        pipeline("coarse_rms"),
        pipeline("latest_rms"),
        pipeline("earliest_rms")
    );
    let names = ["coarse_rms", "latest_rms", "earliest_rms"];
    fleet.deploy("budgets", &sql, "site=plant1");
    wait_until("the pipelines run on the gateway", || {
        gateway.running().len() == names.len()
    });
    fleet.cloud.kill();
    // The whole run happens while the cloud is away.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !gateway.running().is_empty() {
        assert!(Instant::now() < deadline, "the pipelines did not finish");
        std::thread::sleep(Duration::from_millis(200));
    }
    fleet.start_cloud();
    let totals = |stream: &str| -> Vec<Value> {
        let output = fleet.cli_as(
            &fleet.token,
            &[
                "query",
                &format!(
                    "SELECT sensor, sum(samples) AS samples, count(*) AS rows, \
                     to_unixtime(min(window_start)) - 1767225600 AS first, \
                     to_unixtime(max(window_start)) - 1767225600 AS last \
                     FROM {stream} GROUP BY sensor ORDER BY sensor"
                ),
                "--json",
            ],
        );
        text(&output.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    };
    let stream_status = |stream: &str| -> Value {
        let status = fleet.status();
        status["gateways"][0]["streams"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["stream"] == stream)
            .cloned()
            .unwrap_or_default()
    };
    let number = |row: &Value, key: &str| row[key].as_i64().unwrap_or(-1);

    // Re-aggregate: every sample is accounted for, in fewer rows than seconds.
    wait_until("every sample of the run is in the cloud, merged", || {
        let rows = totals("coarse_rms");
        rows.len() == 4 && rows.iter().all(|r| r["samples"] == 2000)
    });
    let rows = totals("coarse_rms");
    assert!(
        rows.iter().all(|r| number(r, "rows") < 20),
        "nothing was merged: {rows:?}"
    );

    // Drop oldest: the last seconds arrive, the first ones are gone.
    wait_until("the stream that drops the oldest is drained", || {
        stream_status("latest_rms")["pending"] == 0 && !totals("latest_rms").is_empty()
    });
    for row in totals("latest_rms") {
        let (kept, first, last) = (
            number(&row, "rows"),
            number(&row, "first"),
            number(&row, "last"),
        );
        assert!(kept < 20 && last == 19 && first == 20 - kept, "{row}");
        assert_eq!(number(&row, "samples"), kept * 100, "{row}");
    }

    // Drop newest: the first seconds arrive, the later ones were refused.
    wait_until("the stream that refuses the newest is drained", || {
        stream_status("earliest_rms")["pending"] == 0 && !totals("earliest_rms").is_empty()
    });
    for row in totals("earliest_rms") {
        let (kept, first, last) = (
            number(&row, "rows"),
            number(&row, "first"),
            number(&row, "last"),
        );
        assert!(kept < 20 && first == 0 && last == kept - 1, "{row}");
    }

    // Every policy's count reaches the cloud.
    wait_until("status counts the merges, drops and refusals", || {
        number(&stream_status("coarse_rms"), "merged") > 0
            && number(&stream_status("latest_rms"), "dropped_oldest") > 0
            && number(&stream_status("earliest_rms"), "refused_newest") > 0
    });
}

/// A pipeline that stores every message of Mosquitto on `port` in the cloud stream `acked`,
/// acknowledging messages only after their checkpoint.
fn acked_sql(port: u16) -> String {
    format!(
        "CREATE SOURCE m (sensor TEXT NOT NULL, ts TIMESTAMP NOT NULL, v DOUBLE)
         WITH (connector = 'mqtt', url = 'mqtt://127.0.0.1:{port}', topic = 'plant/{{sensor}}/v',
               qos = 1, clean_session = false, client_id = 'weir-ack-test', ack = 'checkpoint');
         CREATE SINK acked WITH (connector = 'cloud');
         CREATE PIPELINE acked AS INSERT INTO acked SELECT sensor, ts, v FROM m;"
    )
}

/// Publishes messages `numbers` (QoS 1, one per `pace`) with mosquitto_pub; `between` runs
/// after each message with its number.
fn publish_numbered(
    port: u16,
    numbers: std::ops::Range<i64>,
    pace: Duration,
    mut between: impl FnMut(i64),
) {
    use std::io::Write as _;
    let mut publisher = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args([
            "-t",
            "plant/s1/v",
            "-q",
            "1",
            "-l",
            "-i",
            "weir-ack-publisher",
        ])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("mosquitto_pub (mosquitto-clients) runs");
    let mut lines = publisher.stdin.take().expect("stdin");
    for n in numbers {
        writeln!(
            lines,
            r#"{{"ts": {}, "v": {n}}}"#,
            1_767_225_600_000_i64 + n * 10
        )
        .expect("publish");
        std::thread::sleep(pace);
        between(n);
    }
    drop(lines);
    let _ = publisher.wait();
}

/// The gateway's `weir_pipeline_checkpoints_total` of the `acked` pipeline.
fn acked_checkpoints(gateway: &Gateway) -> u64 {
    gateway
        .metrics()
        .lines()
        .find_map(|l| l.strip_prefix("weir_pipeline_checkpoints_total{pipeline=\"acked\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// (rows, distinct values) in the cloud's `acked` stream, once `expected` distinct values
/// are there (or a minute has passed) and everything the gateway took before is stored: two
/// more checkpoints committed, and nothing left in its uplink.
fn stored_acked(fleet: &Fleet, gateway: &Gateway, expected: u64) -> (u64, u64) {
    let stored = || -> (u64, u64) {
        let output = fleet.cli_as(
            &fleet.token,
            &[
                "query",
                "SELECT count(*) AS n, count(DISTINCT v) AS d FROM acked",
                "--json",
            ],
        );
        let row: Value = text(&output.stdout)
            .lines()
            .next()
            .and_then(|line| serde_json::from_str(line).ok())
            .unwrap_or_default();
        (
            row["n"].as_u64().unwrap_or(0),
            row["d"].as_u64().unwrap_or(0),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while stored().1 < expected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
    }
    // A duplicate would still be on its way: wait until all that was taken is stored.
    let checkpoints = acked_checkpoints(gateway);
    wait_until("the gateway has committed and uplinked all it took", || {
        acked_checkpoints(gateway) >= checkpoints + 2
            && pending_batches(&gateway.metrics(), "acked") == 0
    });
    stored()
}

#[test]
fn mqtt_messages_are_acknowledged_only_once_their_checkpoint_is_on_disk() {
    let mut broker = weir_connectors::mqtt::mosquitto::Mosquitto::start().expect("mosquitto");
    let port = broker.address().port();
    let fleet = Fleet::new(false);
    let token = fleet.add_gateway("plant1-m", &["site=plant1"]);
    let mut gateway = Gateway::new(&fleet, "plant1-m");
    gateway.restart(&fleet.url(), Some(&token));
    fleet.deploy("acked", &acked_sql(port), "site=plant1");
    wait_until("the pipeline runs on the gateway", || {
        gateway.running().iter().any(|(name, _)| name == "acked")
    });

    // 300 numbered QoS 1 messages at about 25 per second; the gateway is killed with
    // SIGKILL twice while they flow. What it had taken but not checkpointed was never
    // acknowledged, so the broker sends it again to the restarted gateway.
    publish_numbered(port, 0..300, Duration::from_millis(40), |n| {
        if n == 80 || n == 160 {
            gateway.process.kill();
            gateway.restart(&fleet.url(), None);
        }
    });
    assert_eq!(
        stored_acked(&fleet, &gateway, 300),
        (300, 300),
        "every message once in the cloud"
    );
    broker.kill();
}

#[test]
fn a_broker_restart_mid_stream_redelivers_what_was_not_checkpointed_and_it_counts_once() {
    let sessions = tempfile::tempdir().expect("tempdir");
    let port = support::free_port();
    let mut broker =
        weir_connectors::mqtt::mosquitto::Mosquitto::start_persistent(port, sessions.path())
            .expect("mosquitto");
    let fleet = Fleet::new(false);
    let token = fleet.add_gateway("plant1-b", &["site=plant1"]);
    let mut gateway = Gateway::new(&fleet, "plant1-b");
    gateway.restart(&fleet.url(), Some(&token));
    fleet.deploy("acked", &acked_sql(port), "site=plant1");
    wait_until("the pipeline runs on the gateway", || {
        gateway.running().iter().any(|(name, _)| name == "acked")
    });

    // The broker restarts right after a burst: the gateway holds messages its last
    // checkpoint does not cover yet, which the broker kept unacknowledged and sends again.
    for round in 0..3 {
        let first = round * 100;
        publish_numbered(port, first..first + 100, Duration::from_millis(10), |_| {});
        broker.stop();
        broker =
            weir_connectors::mqtt::mosquitto::Mosquitto::start_persistent(port, sessions.path())
                .expect("mosquitto again");
    }
    assert_eq!(
        stored_acked(&fleet, &gateway, 300),
        (300, 300),
        "every message once in the cloud, across three broker restarts"
    );
    let metrics = gateway.metrics();
    let redelivered = metrics
        .lines()
        .find_map(|l| l.strip_prefix("weir_mqtt_redelivered_total{connector=\"acked/m\"} "))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no redelivery counter in {metrics}"));
    assert!(
        redelivered > 0,
        "the broker sent held messages again: {metrics}"
    );
    broker.kill();
}

#[test]
fn results_in_an_s3_bucket_are_queryable_and_survive_a_cloud_restart_once_each() {
    let s3 = S3Server::start("weir-results");
    let mut fleet = Fleet::with_cloud(
        false,
        vec!["--results".into(), "s3://weir-results/site-a".into()],
        s3.env(),
    );
    let token = fleet.add_gateway("plant1-s3", &["site=plant1"]);
    let mut gateway = Gateway::new(&fleet, "plant1-s3");
    gateway.restart(&fleet.url(), Some(&token));
    fleet.deploy("rms", SQL, "site=plant1");
    wait_until("3 windows of every sensor are stored in the bucket", || {
        coverage(&fleet).is_some_and(|seen| seen.len() == 4 && seen.values().all(|c| c.1 >= 3))
    });
    // Plain Parquet files under the prefix, partitioned by stream and day.
    let (status, listing) = s3.http("GET", "/weir-results?list-type=2&prefix=site-a/");
    assert_eq!(status, 200, "{listing}");
    assert!(
        listing.contains("<Key>site-a/vibration_rms/date=") && listing.contains(".parquet</Key>"),
        "{listing}"
    );

    // The cloud restarts: it learns what it holds from the files' footers in the bucket,
    // so what the gateway sends again is recognised, and the windows go on once each.
    fleet.cloud.kill();
    wait_until("the gateway holds results for the cloud", || {
        pending_batches(&gateway.metrics(), "vibration_rms") >= 2
    });
    let before = now_s();
    fleet.start_cloud();
    let deadline = Instant::now() + Duration::from_secs(60);
    let seen = loop {
        let seen = coverage(&fleet).unwrap_or_default();
        if seen.len() == 4 && seen.values().all(|c| c.3 >= before + 2) && complete(&seen) {
            break seen;
        }
        assert!(
            Instant::now() < deadline,
            "windows after the restart: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    for (sensor, (rows, windows, _, _)) in &seen {
        assert_eq!(rows, windows, "{sensor}: every window once");
    }
    let status = fleet.status();
    let duplicates = status["gateways"][0]["streams"][0]["duplicates"].as_u64();
    assert!(duplicates.is_some(), "{status}");
    drop(gateway);
}
