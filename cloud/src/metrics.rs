//! `GET /metrics`: the control plane's state in the OpenMetrics text format.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::fleet::Fleet;

type Labels = Vec<(&'static str, String)>;

/// Renders gauges read from the fleet at scrape time.
pub fn render(fleet: &Fleet) -> String {
    let mut registry = Registry::default();
    let gateways = Family::<Labels, Gauge>::default();
    registry.register(
        "weir_cloud_gateways",
        "Gateways known to the cloud, by state (online, offline, revoked, not_enrolled)",
        gateways.clone(),
    );
    let pipelines = Family::<Labels, Gauge>::default();
    registry.register(
        "weir_cloud_gateway_pipelines",
        "Pipelines the gateways should run, by whether they run the desired version",
        pipelines.clone(),
    );
    let deployments = Gauge::<i64>::default();
    registry.register("weir_cloud_deployments", "Deployments", deployments.clone());
    let (mut online, mut offline, mut revoked, mut pending, mut in_sync, mut drift) =
        (0, 0, 0, 0, 0, 0);
    for gateway in fleet.status() {
        match (gateway.revoked, gateway.enrolled, gateway.online) {
            (true, _, _) => revoked += 1,
            (false, false, _) => pending += 1,
            (false, true, true) => online += 1,
            (false, true, false) => offline += 1,
        }
        for pipeline in gateway
            .pipelines
            .iter()
            .filter(|p| p.desired_version.is_some())
        {
            if pipeline.in_sync {
                in_sync += 1;
            } else {
                drift += 1;
            }
        }
    }
    for (state, count) in [
        ("online", online),
        ("offline", offline),
        ("revoked", revoked),
        ("not_enrolled", pending),
    ] {
        gateways
            .get_or_create(&vec![("state", state.to_owned())])
            .set(count);
    }
    pipelines
        .get_or_create(&vec![("sync", "in_sync".to_owned())])
        .set(in_sync);
    pipelines
        .get_or_create(&vec![("sync", "drift".to_owned())])
        .set(drift);
    deployments.set(fleet.deployments().len() as i64);
    let mut text = String::new();
    // Encoding into a String cannot fail.
    let _ = encode(&mut text, &registry);
    text
}
