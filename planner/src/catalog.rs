//! What the SQL planner may resolve names against: declared sources (plus the windowed views
//! that `TUMBLE`/`HOP` turn into) and every function Weir knows.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::datatypes::{DataType, FieldRef, SchemaRef};
use datafusion::common::config::ConfigOptions;
use datafusion::common::{TableReference, plan_err};
use datafusion::logical_expr::logical_plan::builder::LogicalTableSource;
use datafusion::logical_expr::planner::{ExprPlanner, TypePlanner};
use datafusion::logical_expr::{AggregateUDF, HigherOrderUDF, ScalarUDF, TableSource, WindowUDF};
use datafusion::sql::planner::ContextProvider;

pub struct Catalog {
    functions: &'static weir_operators::Functions,
    options: ConfigOptions,
    tables: HashMap<String, SchemaRef>,
}

impl Catalog {
    pub fn new() -> Self {
        let mut options = ConfigOptions::default();
        // Spans let DataFusion's errors point at the offending identifier.
        options.sql_parser.collect_spans = true;
        // TEXT columns are plain Utf8 end to end: decoders build them, sinks write them, and
        // one string type keeps every connector simple.
        options.sql_parser.map_string_types_to_utf8view = false;
        Self {
            functions: weir_operators::functions(),
            options,
            tables: HashMap::new(),
        }
    }

    pub fn add_table(&mut self, name: &str, schema: SchemaRef) {
        self.tables.insert(name.to_string(), schema);
    }

    pub fn table_names(&self) -> impl Iterator<Item = &str> {
        self.tables
            .keys()
            .map(String::as_str)
            .filter(|n| !n.starts_with("__weir"))
    }

    pub fn options(&self) -> &ConfigOptions {
        &self.options
    }
}

impl ContextProvider for Catalog {
    fn get_table_source(
        &self,
        name: TableReference,
    ) -> datafusion::error::Result<Arc<dyn TableSource>> {
        match self.tables.get(name.table()) {
            Some(schema) => Ok(Arc::new(LogicalTableSource::new(Arc::clone(schema)))),
            None => plan_err!("unknown source '{}'", name.table()),
        }
    }

    fn get_expr_planners(&self) -> &[Arc<dyn ExprPlanner>] {
        self.functions.expr_planners()
    }

    fn get_type_planner(&self) -> Option<Arc<dyn TypePlanner>> {
        None
    }

    fn get_function_meta(&self, name: &str) -> Option<Arc<ScalarUDF>> {
        self.functions.scalar(name)
    }

    fn get_higher_order_meta(&self, name: &str) -> Option<Arc<HigherOrderUDF>> {
        self.functions.higher_order(name)
    }

    fn get_aggregate_meta(&self, name: &str) -> Option<Arc<AggregateUDF>> {
        self.functions.aggregate(name)
    }

    fn get_window_meta(&self, name: &str) -> Option<Arc<WindowUDF>> {
        self.functions.window(name)
    }

    fn get_variable_type(&self, _variable_names: &[String]) -> Option<DataType> {
        None
    }

    fn get_variable_field(&self, _variable_names: &[String]) -> Option<FieldRef> {
        None
    }

    fn options(&self) -> &ConfigOptions {
        &self.options
    }

    fn udf_names(&self) -> Vec<String> {
        self.functions.scalar_names()
    }

    fn higher_order_function_names(&self) -> Vec<String> {
        self.functions.higher_order_names()
    }

    fn udaf_names(&self) -> Vec<String> {
        self.functions.aggregate_names()
    }

    fn udwf_names(&self) -> Vec<String> {
        self.functions.window_names()
    }
}
