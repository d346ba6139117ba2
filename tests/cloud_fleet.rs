//! `weir cloud` and three `weir gateway` processes over real gRPC on loopback, driven with
//! the CLI the way an operator would: enrollment, deploys by label selector, relabeling,
//! gateways and the cloud going away and coming back, and every refusal with its reason.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::Value;
use support::{Fleet, Gateway, Running, WEIR, free_port, text, wait_for_port, wait_until};

/// Each pipeline reads the simulator and writes nowhere: the test is about what runs where.
fn pipeline_sql(name: &str, threshold: f64) -> String {
    format!(
        "CREATE SOURCE vib_{name} (sensor TEXT NOT NULL, ts TIMESTAMP NOT NULL, v DOUBLE)
         WITH (connector = 'simulator', sensors = 2, rate_hz = 20, realtime = true);
         CREATE SINK out_{name} WITH (connector = 'null');
         CREATE PIPELINE {name} AS INSERT INTO out_{name}
         SELECT sensor, ts, v FROM vib_{name} WHERE v > {threshold};"
    )
}

fn pipelines(list: &[(&str, u64)]) -> Vec<(String, u64)> {
    list.iter().map(|(n, v)| ((*n).to_owned(), *v)).collect()
}

fn gateway_status<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["gateways"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|g| g["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in status: {status}"))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

#[test]
fn a_fleet_follows_deployments_through_relabels_outages_and_refusals() {
    let mut fleet = Fleet::new(false);

    // Enrollment: three gateways, one token each; bad and reused tokens are refused.
    let token_a = fleet.add_gateway("plant1-a", &["site=plant1", "line=3"]);
    let token_b = fleet.add_gateway("plant1-b", &["site=plant1", "line=4"]);
    let token_c = fleet.add_gateway("plant2-c", &["site=plant2"]);
    let a = Gateway::start(&fleet, "plant1-a", Some(&token_a));
    let b = Gateway::start(&fleet, "plant1-b", Some(&token_b));
    let mut c = Gateway::start(&fleet, "plant2-c", Some(&token_c));
    for (name, token) in [("bogus", "we_not-a-token"), ("reuse", token_a.as_str())] {
        let refused = Command::new(WEIR)
            .args([
                "gateway",
                "--broker",
                "none",
                "--name",
                name,
                "--cloud",
                &fleet.url(),
            ])
            .args(["--enroll", token, "--admin"])
            .arg(format!("127.0.0.1:{}", free_port()))
            .arg("--data")
            .arg(fleet.dir.path().join(name))
            .output()
            .expect("weir runs");
        assert!(!refused.status.success(), "{name} token must be refused");
        let stderr = text(&refused.stderr);
        assert!(
            stderr.contains("the enrollment token is not valid"),
            "{stderr}"
        );
        assert!(
            !stderr.contains("plant1-a"),
            "the refusal names no gateway: {stderr}"
        );
    }
    wait_until("all three gateways are online", || {
        let status = fleet.status();
        ["plant1-a", "plant1-b", "plant2-c"]
            .iter()
            .all(|g| gateway_status(&status, g)["online"] == true)
    });

    // A deploy reaches exactly the gateways its selector matches.
    let out = fleet.deploy("rms", &pipeline_sql("rms", 0.0), "site=plant1,line!=3");
    assert!(out.contains("targets 1 gateway(s): plant1-b"), "{out}");
    wait_until("plant1-b runs rms v1", || {
        b.running() == pipelines(&[("rms", 1)])
    });
    assert!(
        a.running().is_empty(),
        "plant1-a is line 3: {:?}",
        a.running()
    );
    assert!(
        c.running().is_empty(),
        "plant2-c is another site: {:?}",
        c.running()
    );

    // Relabeling moves it: a leaves line 3 and gets it.
    fleet.cli(&["cloud", "gateways", "label", "plant1-a", "line=5"]);
    wait_until("plant1-a runs rms v1", || {
        a.running() == pipelines(&[("rms", 1)])
    });
    let site_view = a.list_text();
    assert!(site_view.contains("connected as plant1-a"), "{site_view}");

    // A gateway that is down during a deploy gets it when it returns (no --enroll needed).
    let before_v2 = fleet.dir.path().join("cloud-at-v1");
    c.process.kill();
    fleet.cli(&["cloud", "gateways", "label", "plant2-c", "site=plant1"]);
    {
        // Keep a copy of the cloud's state as it was at v1, to restore an old backup later.
        fleet.cloud.kill();
        copy_dir(&fleet.dir.path().join("cloud"), &before_v2);
        fleet.start_cloud();
    }
    let out = fleet.deploy("rms", &pipeline_sql("rms", 0.5), "site=plant1,line!=3");
    assert!(out.contains("rms v2"), "{out}");
    wait_until("a and b run v2", || {
        a.running() == pipelines(&[("rms", 2)]) && b.running() == pipelines(&[("rms", 2)])
    });
    c.restart(&fleet.url(), None);
    wait_until("plant2-c runs v2 after its return", || {
        c.running() == pipelines(&[("rms", 2)])
    });
    wait_until("status shows every gateway in sync", || {
        let status = fleet.status();
        status["gateways"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|g| {
                g["pipelines"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .all(|p| p["in_sync"] == true && p["desired_version"] == 2)
            })
    });
    let table = fleet.cli(&["status"]);
    assert!(
        table.contains("3 gateway(s), 3 online; 0 pipeline(s) not running"),
        "{table}"
    );
    wait_until("status turns the reported counters into rates", || {
        let status = fleet.status();
        gateway_status(&status, "plant1-b")["pipelines"][0]["rows_in_per_s"]
            .as_f64()
            .is_some_and(|rate| rate > 0.0)
    });

    // The cloud killed and restarted loses nothing; everyone reconnects on their own.
    fleet.cloud.kill();
    fleet.start_cloud();
    wait_until("all three reconnect to the restarted cloud", || {
        let status = fleet.status();
        ["plant1-a", "plant1-b", "plant2-c"]
            .iter()
            .all(|g| gateway_status(&status, g)["online"] == true)
    });
    let deployments = fleet.cli(&["status", "--json"]);
    assert!(deployments.contains("\"rms\": 2"), "{deployments}");

    // A gateway restarted while the cloud is down runs its last accepted plans.
    fleet.cloud.kill();
    let mut b = b;
    b.process.kill();
    b.restart(&fleet.url(), None);
    wait_until("plant1-b runs v2 from disk with no cloud", || {
        b.running() == pipelines(&[("rms", 2)])
    });
    let unreachable = format!("cloud {} · not connected: cannot connect", fleet.url());
    wait_until("the site view says the cloud cannot be reached", || {
        b.list_text().contains(&unreachable)
    });
    fleet.start_cloud();

    // A viewer may look but not deploy; the refusal names the role.
    let viewer_out = fleet.cli(&["cloud", "tokens", "add", "watcher", "--role", "viewer"]);
    let viewer = viewer_out
        .lines()
        .last()
        .expect("token line")
        .trim()
        .to_owned();
    let file = fleet.dir.path().join("rms.sql");
    let refused = fleet.cli_as(&viewer, &["deploy", &file.display().to_string()]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr)
            .contains("deploying needs the deployer role; token 'watcher' has the viewer role"),
        "{}",
        text(&refused.stderr)
    );
    assert!(
        fleet.cli_as(&viewer, &["status"]).status.success(),
        "a viewer reads status"
    );
    let bad = fleet.cli_as("wt_nope", &["status"]);
    assert!(
        text(&bad.stderr).contains("the API token is not valid"),
        "{}",
        text(&bad.stderr)
    );

    // Bad SQL comes back with line:col and changes nothing.
    let broken = fleet.dir.path().join("broken.sql");
    std::fs::write(
        &broken,
        pipeline_sql("rms", 0.5).replace("WHERE v >", "WHERE vv >"),
    )
    .expect("write");
    let refused = fleet.cli_as(&fleet.token, &["deploy", &broken.display().to_string()]);
    assert!(!refused.status.success());
    let stderr = text(&refused.stderr);
    assert!(
        stderr.contains("broken.sql:5:") && stderr.contains("vv"),
        "{stderr}"
    );

    // Rollback returns everyone to v1's plan, as a new version 3.
    let out = fleet.cli(&["rollback", "rms"]);
    assert!(out.contains("rolled back rms: rms v3"), "{out}");
    wait_until("every gateway runs v3", || {
        [&a, &b, &c]
            .iter()
            .all(|g| g.running() == pipelines(&[("rms", 3)]))
    });

    // The cloud restored from an old backup offers v1 again: gateways refuse to go back.
    fleet.cloud.kill();
    let cloud_dir = fleet.dir.path().join("cloud");
    std::fs::remove_dir_all(&cloud_dir).expect("remove");
    copy_dir(&before_v2, &cloud_dir);
    fleet.start_cloud();
    wait_until("the gateways report the older version as rejected", || {
        let status = fleet.status();
        let g = gateway_status(&status, "plant1-a");
        g["pipelines"].as_array().into_iter().flatten().any(|p| {
            p["rejected"]
                .as_str()
                .is_some_and(|r| r.contains("version 1 is older than the running version 3"))
        })
    });
    assert_eq!(
        a.running(),
        pipelines(&[("rms", 3)]),
        "the refused version changes nothing"
    );

    // A cloud that lost its signing key signs with a new one: gateways refuse what it signs.
    fleet.cloud.kill();
    std::fs::remove_file(fleet.dir.path().join("cloud").join("plan-signing.key")).expect("rm key");
    fleet.start_cloud();
    fleet.deploy("rms", &pipeline_sql("rms", 0.75), "site=plant1,line!=3");
    wait_until(
        "the gateways refuse plans signed by a key they do not know",
        || {
            let status = fleet.status();
            gateway_status(&status, "plant1-b")["pipelines"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| {
                    p["rejected"]
                        .as_str()
                        .is_some_and(|r| r.contains("does not verify with this cloud's key"))
                })
        },
    );
    assert_eq!(
        b.running(),
        pipelines(&[("rms", 3)]),
        "a foreign-signed plan changes nothing"
    );

    // The audit log tells who did what.
    let audit = fleet.cli(&["cloud", "audit"]);
    for action in [
        "gateway.add",
        "gateway.enroll",
        "gateway.label",
        "deploy",
        "token.create",
    ] {
        assert!(
            audit.contains(action),
            "{action} missing from the audit log:\n{audit}"
        );
    }
}

/// Compiles everywhere, fails on every gateway: its file is not there.
const MISSING_FILE_SQL: &str = "
CREATE SOURCE vib_rms (sensor TEXT NOT NULL, ts TIMESTAMP NOT NULL, v DOUBLE)
WITH (connector = 'file', path = '/nonexistent/weir/readings.jsonl', format = 'json');
CREATE SINK out_rms WITH (connector = 'null');
CREATE PIPELINE rms AS INSERT INTO out_rms SELECT sensor, ts, v FROM vib_rms;
";

#[test]
fn a_failing_canary_is_rolled_back_and_the_rest_never_receive_it() {
    let fleet = Fleet::new(false);
    let gateways: Vec<Gateway> = ["line1", "line2", "line3"]
        .iter()
        .map(|name| {
            let token = fleet.add_gateway(name, &["site=plant1"]);
            Gateway::start(&fleet, name, Some(&token))
        })
        .collect();
    fleet.deploy("rms", &pipeline_sql("rms", 0.0), "site=plant1");
    wait_until("every gateway runs v1", || {
        gateways
            .iter()
            .all(|g| g.running() == pipelines(&[("rms", 1)]))
    });

    // v2 cannot run: the canary gets it, fails, and goes back; the others never see it.
    let file = fleet.dir.path().join("broken.sql");
    std::fs::write(&file, MISSING_FILE_SQL).expect("write");
    let out = fleet.cli(&[
        "deploy",
        &file.display().to_string(),
        "--selector",
        "site=plant1",
        "--canary",
        "1",
        "--bake",
        "2s",
    ]);
    assert!(
        out.contains("rms v2") && out.contains("staged: canaries line1 first"),
        "{out}"
    );
    let mut others_saw_v2 = false;
    wait_until(
        "the rollout fails and the canary returns to v1's plan as v3",
        || {
            others_saw_v2 |= gateways[1..]
                .iter()
                .any(|g| g.running().iter().any(|(_, v)| *v == 2));
            gateways
                .iter()
                .all(|g| g.running() == pipelines(&[("rms", 3)]))
        },
    );
    assert!(!others_saw_v2, "only the canary may run v2");
    let table = fleet.cli(&["status"]);
    assert!(
        table.contains("deployment rms: ROLLOUT FAILED, canaries rolled back: canary line1: "),
        "{table}"
    );

    // A healthy v4 reaches the canary first, then everyone after the bake.
    let out = fleet.deploy_staged("rms", &pipeline_sql("rms", 0.25), "1s");
    assert!(out.contains("rms v4"), "{out}");
    wait_until("every gateway runs v4 after the canary baked", || {
        gateways
            .iter()
            .all(|g| g.running() == pipelines(&[("rms", 4)]))
    });
    let audit = fleet.cli(&["cloud", "audit"]);
    assert!(
        audit.contains("rollout.fail") && audit.contains("rollout.promote"),
        "{audit}"
    );
}

impl Fleet {
    fn deploy_staged(&self, name: &str, sql: &str, bake: &str) -> String {
        let file = self.dir.path().join(format!("{name}.sql"));
        std::fs::write(&file, sql).expect("write sql");
        self.cli(&[
            "deploy",
            &file.display().to_string(),
            "--selector",
            "site=plant1",
            "--canary",
            "1",
            "--bake",
            bake,
        ])
    }
}

#[test]
fn gateways_and_the_cli_reach_a_tls_cloud_through_the_ca_they_were_given() {
    let fleet = Fleet::new(true);
    assert!(
        fleet.ca().exists(),
        "the cloud made its certificate authority"
    );

    // Without the CA the CLI refuses the certificate; plain HTTP gets no answer it can use.
    let untrusted = Command::new(WEIR)
        .args(["status", "--cloud", &fleet.url(), "--token", &fleet.token])
        .output()
        .expect("weir runs");
    assert!(!untrusted.status.success());
    let stderr = text(&untrusted.stderr);
    assert!(
        stderr.contains("cannot reach the cloud") && stderr.contains("certificate"),
        "{stderr}"
    );
    let plain = fleet.cli_as(
        &fleet.token,
        &["status", "--cloud", &fleet.url().replace("https", "http")],
    );
    assert!(
        !plain.status.success(),
        "plain HTTP must not work on the TLS port"
    );

    // A gateway enrolling over https without the CA is told what to give.
    let token = fleet.add_gateway("secure-gw", &["site=plant1"]);
    let mut gateway = Gateway::new(&fleet, "secure-gw");
    let refused = gateway
        .command(&fleet.url(), Some(&token))
        .stderr(Stdio::piped())
        .output()
        .expect("weir runs");
    assert!(!refused.status.success());
    let stderr = text(&refused.stderr);
    assert!(
        stderr.contains("needs its certificate authority") && stderr.contains("--cloud-ca"),
        "{stderr}"
    );

    // With it, the gateway enrolls, keeps the CA, and runs what is deployed.
    let ca = fleet.ca().display().to_string();
    let mut command = gateway.command(&fleet.url(), Some(&token));
    command.args(["--cloud-ca", &ca]);
    gateway.process = Running(Some(command.spawn().expect("weir gateway starts")));
    wait_for_port(gateway.admin);
    fleet.deploy("rms", &pipeline_sql("rms", 0.0), "site=plant1");
    wait_until("the gateway runs rms v1 over TLS", || {
        gateway.running() == pipelines(&[("rms", 1)])
    });

    // A gateway that stops answering without closing its connection (frozen, or a network
    // that drops packets) is noticed by its missed heartbeats, and comes back by itself.
    let pid = gateway
        .process
        .0
        .as_ref()
        .expect("running")
        .id()
        .to_string();
    let signal = |name: &str| {
        let sent = Command::new("kill")
            .args([name, &pid])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "kill {name} {pid}");
    };
    signal("-STOP");
    wait_until("missed heartbeats mark the frozen gateway offline", || {
        gateway_status(&fleet.status(), "secure-gw")["online"] == false
    });
    signal("-CONT");
    wait_until("the thawed gateway reconnects", || {
        gateway_status(&fleet.status(), "secure-gw")["online"] == true
    });

    // Restarted without --cloud-ca, it uses the CA kept from its enrollment.
    gateway.process.kill();
    wait_until("the cloud sees the gateway go", || {
        gateway_status(&fleet.status(), "secure-gw")["online"] == false
    });
    gateway.restart(&fleet.url(), None);
    wait_until("the gateway is back online over TLS", || {
        gateway_status(&fleet.status(), "secure-gw")["online"] == true
    });
}

#[test]
fn a_deploy_that_would_lose_open_windows_needs_fresh_and_the_gateway_honours_it() {
    let fleet = Fleet::new(false);
    let token = fleet.add_gateway("line1", &["site=plant1"]);
    let gateway = Gateway::start(&fleet, "line1", Some(&token));
    let windowed = |seconds: u32| {
        format!(
            "CREATE SOURCE vib (sensor TEXT NOT NULL, ts TIMESTAMP NOT NULL, v DOUBLE,
                                WATERMARK FOR ts AS ts - INTERVAL '0.2' SECOND)
             WITH (connector = 'simulator', sensors = 2, rate_hz = 20, realtime = true);
             CREATE SINK out WITH (connector = 'null');
             CREATE PIPELINE peaks AS INSERT INTO out
             SELECT sensor, window_start, max(v) AS peak
             FROM TUMBLE(vib, ts, INTERVAL '{seconds}' SECOND) GROUP BY sensor, window_start;"
        )
    };
    fleet.deploy("peaks", &windowed(1), "site=plant1");
    wait_until("the gateway runs v1", || {
        gateway.running() == pipelines(&[("peaks", 1)])
    });

    let file = fleet.dir.path().join("peaks.sql");
    std::fs::write(&file, windowed(10)).expect("write sql");
    let file = file.display().to_string();
    let refused = fleet.cli_as(
        &fleet.token,
        &["deploy", &file, "--selector", "site=plant1"],
    );
    let stderr = text(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains("pipeline 'peaks': stateful operator") && stderr.contains("--fresh"),
        "{stderr}"
    );
    let status = fleet.cli(&["status", "--json"]);
    assert!(
        status.contains("\"peaks\": 1") && !status.contains("\"peaks\": 2"),
        "nothing changed: {status}"
    );
    assert_eq!(gateway.running(), pipelines(&[("peaks", 1)]));

    let out = fleet.cli(&["deploy", &file, "--selector", "site=plant1", "--fresh"]);
    assert!(
        out.contains("peaks starts fresh: stateful operator"),
        "{out}"
    );
    wait_until("the gateway accepts the fresh start and runs v2", || {
        gateway.running() == pipelines(&[("peaks", 2)])
    });
}
