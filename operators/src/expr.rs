//! The bridge between plan bytes and DataFusion: schemas and expressions are encoded with
//! datafusion-proto by the planner and decoded here into physical expressions.
//!
//! Both directions live in this one module so the planner and the gateway agree on the codec
//! and on the set of functions a plan may call ([`crate::functions`]: DataFusion's plus Weir's
//! detectors).

use std::sync::Arc;

use datafusion::common::{DFSchema, TableReference, not_impl_err};
use datafusion::datasource::TableProvider;
use datafusion::error::Result as DfResult;
use datafusion::execution::TaskContext;
use datafusion::execution::registry::FunctionRegistry;
use datafusion::logical_expr::execution_props::ExecutionProps;
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::{
    AggregateUDF, Expr, Extension, HigherOrderUDF, LogicalPlan, ScalarUDF, WindowUDF,
};
use datafusion::physical_expr::{PhysicalExpr, create_physical_expr};
use datafusion_proto::logical_plan::LogicalExtensionCodec;
use datafusion_proto::logical_plan::from_proto::parse_expr;
use datafusion_proto::logical_plan::to_proto::serialize_expr;
use datafusion_proto::protobuf;
use prost::Message;

use crate::error::{OperatorError, Result};
use crate::functions::functions;

/// Plans name functions, and nothing else DataFusion can encode: functions are resolved
/// through [`crate::functions`], which makes only those a plan calls.
#[derive(Debug, Clone, Copy, Default)]
struct FunctionCodec;

impl LogicalExtensionCodec for FunctionCodec {
    fn try_decode(
        &self,
        _buf: &[u8],
        _inputs: &[LogicalPlan],
        _ctx: &TaskContext,
    ) -> DfResult<Extension> {
        not_impl_err!("Weir plans hold no extension nodes")
    }

    fn try_encode(&self, _node: &Extension, _buf: &mut Vec<u8>) -> DfResult<()> {
        not_impl_err!("Weir plans hold no extension nodes")
    }

    fn try_decode_table_provider(
        &self,
        _buf: &[u8],
        _table_ref: &TableReference,
        _schema: arrow::datatypes::SchemaRef,
        _ctx: &TaskContext,
    ) -> DfResult<Arc<dyn TableProvider>> {
        not_impl_err!("Weir plans hold no tables")
    }

    fn try_encode_table_provider(
        &self,
        _table_ref: &TableReference,
        _node: Arc<dyn TableProvider>,
        _buf: &mut Vec<u8>,
    ) -> DfResult<()> {
        not_impl_err!("Weir plans hold no tables")
    }

    fn try_decode_udf(&self, name: &str, _buf: &[u8]) -> DfResult<Arc<ScalarUDF>> {
        functions().udf(name)
    }

    fn try_decode_higher_order_function(
        &self,
        name: &str,
        _buf: &[u8],
    ) -> DfResult<Arc<HigherOrderUDF>> {
        functions().higher_order_function(name)
    }

    fn try_decode_udaf(&self, name: &str, _buf: &[u8]) -> DfResult<Arc<AggregateUDF>> {
        functions().udaf(name)
    }

    fn try_decode_udwf(&self, name: &str, _buf: &[u8]) -> DfResult<Arc<WindowUDF>> {
        functions().udwf(name)
    }
}

/// Decodes plan bytes into DataFusion values for one pipeline.
pub struct ExprDecoder {
    /// Holds no functions: datafusion-proto asks [`FunctionCodec`] for each one it does not
    /// find here.
    task_ctx: Arc<TaskContext>,
    props: ExecutionProps,
}

impl Default for ExprDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ExprDecoder {
    pub fn new() -> Self {
        Self {
            task_ctx: Arc::new(TaskContext::default()),
            props: ExecutionProps::new(),
        }
    }

    pub fn schema(&self, bytes: &[u8]) -> Result<Arc<DFSchema>> {
        let message = protobuf::DfSchema::decode(bytes)
            .map_err(|e| OperatorError::plan(format!("malformed schema: {e}")))?;
        let schema = DFSchema::try_from(&message)
            .map_err(|e| OperatorError::plan(format!("invalid schema: {e}")))?;
        Ok(Arc::new(schema))
    }

    /// The plain Arrow schema (no qualifiers) of encoded DataFusion schema bytes.
    pub fn arrow_schema(&self, bytes: &[u8]) -> Result<arrow::datatypes::SchemaRef> {
        Ok(Arc::new(self.schema(bytes)?.as_arrow().clone()))
    }

    pub fn expr(&self, bytes: &[u8]) -> Result<Expr> {
        let message = protobuf::LogicalExprNode::decode(bytes)
            .map_err(|e| OperatorError::plan(format!("malformed expression: {e}")))?;
        parse_expr(&message, &self.task_ctx, &FunctionCodec)
            .map_err(|e| OperatorError::plan(format!("invalid expression: {e}")))
    }

    /// Decodes an expression and lowers it to a physical expression over `schema`.
    pub fn physical(&self, bytes: &[u8], schema: &DFSchema) -> Result<Arc<dyn PhysicalExpr>> {
        let expr = self.expr(bytes)?;
        self.lower(&expr, schema)
    }

    pub fn lower(&self, expr: &Expr, schema: &DFSchema) -> Result<Arc<dyn PhysicalExpr>> {
        Ok(create_physical_expr(
            expr,
            schema,
            &self.props,
            &PhysicalPlanningContext::default(),
        )?)
    }

    pub fn props(&self) -> &ExecutionProps {
        &self.props
    }
}

pub fn encode_schema(schema: &DFSchema) -> Result<Vec<u8>> {
    let message = protobuf::DfSchema::try_from(schema)
        .map_err(|e| OperatorError::plan(format!("cannot encode schema: {e}")))?;
    Ok(message.encode_to_vec())
}

pub fn encode_expr(expr: &Expr) -> Result<Vec<u8>> {
    let message = serialize_expr(expr, &FunctionCodec)
        .map_err(|e| OperatorError::plan(format!("cannot encode expression {expr}: {e}")))?;
    Ok(message.encode_to_vec())
}
