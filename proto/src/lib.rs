//! The Weir plan format: protobuf messages generated from `proto/weir/plan/v1/plan.proto`.
//!
//! This crate only holds the generated types and the format version; the planner produces
//! plans, the operators crate and the engine consume them. DataFusion expressions and schemas
//! inside a plan are opaque bytes here (datafusion-proto messages) so this crate stays free of
//! DataFusion.

#[allow(clippy::all, clippy::pedantic)]
pub mod plan {
    include!(concat!(env!("OUT_DIR"), "/weir.plan.v1.rs"));
}

/// The plan format this build writes and understands.
pub const PLAN_FORMAT_VERSION: u32 = 1;
