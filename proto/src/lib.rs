//! Protobuf messages Weir reads and writes, generated at build time by prost.
//!
//! - [`plan`]: the Weir plan format, from `proto/weir/plan/v1/plan.proto`. The planner
//!   produces plans, the operators crate and the engine consume them. DataFusion expressions
//!   and schemas inside a plan are opaque bytes here (datafusion-proto messages) so this crate
//!   stays free of DataFusion.
//! - [`cloud`]: the gateway <-> cloud gRPC protocol (`GatewayControl`), from
//!   `proto/weir/cloud/v1/control.proto`, with tonic's client and server stubs.
//! - [`sparkplug`]: the Sparkplug B payload of industrial MQTT edge nodes, from
//!   `proto/sparkplug/sparkplug_b.proto`. The connectors crate decodes it into rows.
//!
//! This crate only holds generated types, stubs and format constants, no behaviour.

/// Generated modules, nested as the protobuf packages are so that one package can name
/// another's messages (`weir.cloud.v1` holds `weir.plan.v1` plans).
#[allow(clippy::all, clippy::pedantic)]
mod generated {
    pub mod weir {
        pub mod plan {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/weir.plan.v1.rs"));
            }
        }
        pub mod cloud {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/weir.cloud.v1.rs"));
            }
        }
        pub mod engine {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/weir.engine.v1.rs"));
            }
        }
    }
}

/// The Weir plan format, package `weir.plan.v1`.
pub use generated::weir::plan::v1 as plan;

/// The gateway <-> cloud protocol, package `weir.cloud.v1`: enrollment, the control
/// stream, signed plans.
pub use generated::weir::cloud::v1 as cloud;

/// What the gateway keeps on its own disk, package `weir.engine.v1`: pipeline checkpoints.
pub use generated::weir::engine::v1 as engine;

/// Every message and service of this crate as an encoded `FileDescriptorSet`, for gRPC
/// server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/weir_descriptor.bin"));

/// Sparkplug B (Eclipse Sparkplug 3.0) payload messages, package `org.eclipse.tahu.protobuf`.
///
/// [`Payload`](sparkplug::Payload) is what an edge node publishes under
/// `spBv1.0/{group}/{NBIRTH|NDATA|...}/{edge node}[/{device}]`; each
/// [`Metric`](sparkplug::payload::Metric) carries its `datatype` as a
/// [`DataType`](sparkplug::DataType) code (`Int8 = 1` ... `Boolean = 11`, `String = 12`,
/// `DateTime = 13`, `Text = 14`, ...), which says how to read the value in the `value` oneof:
/// signed integers travel as two's complement bits in `int_value` / `long_value`, `DateTime`
/// as epoch milliseconds in `long_value`.
#[allow(clippy::all, clippy::pedantic)]
pub mod sparkplug {
    include!(concat!(env!("OUT_DIR"), "/org.eclipse.tahu.protobuf.rs"));
}

/// The plan format this build writes and understands.
pub const PLAN_FORMAT_VERSION: u32 = 1;
