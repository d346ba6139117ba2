use std::sync::Arc;

use arrow::array::{AsArray, RecordBatch};
use arrow::compute::filter_record_batch;
use arrow::datatypes::SchemaRef;
use datafusion::physical_expr::PhysicalExpr;

use crate::{Collector, Operator, Result};

/// Keeps the rows for which a predicate is true; NULL counts as false, as in SQL `WHERE`.
pub struct FilterOperator {
    predicate: Arc<dyn PhysicalExpr>,
    schema: SchemaRef,
}

impl FilterOperator {
    pub fn new(predicate: Arc<dyn PhysicalExpr>, schema: SchemaRef) -> Self {
        Self { predicate, schema }
    }
}

impl Operator for FilterOperator {
    fn name(&self) -> &str {
        "filter"
    }

    fn output_schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn process_batch(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let mask = self
            .predicate
            .evaluate(&batch)?
            .into_array(batch.num_rows())?;
        let mask = mask.as_boolean_opt().ok_or_else(|| {
            crate::OperatorError::plan(format!(
                "filter predicate is {}, not boolean",
                mask.data_type()
            ))
        })?;
        if mask.true_count() == batch.num_rows() {
            out.emit(batch);
        } else {
            out.emit(filter_record_batch(&batch, mask)?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use datafusion::logical_expr::Operator as BinaryOperator;
    use datafusion::physical_expr::expressions::{binary, col, lit};

    use super::*;
    use crate::testing::{batch, pretty, schema};

    #[test]
    fn keeps_true_rows_and_drops_false_and_null() {
        let input = schema("sensor:utf8, v:f64");
        let predicate = binary(
            col("v", &input).expect("col"),
            BinaryOperator::Gt,
            lit(1.0),
            &input,
        )
        .expect("expr");
        let mut filter = FilterOperator::new(predicate, Arc::clone(&input));
        let mut out = Collector::default();
        filter
            .process_batch(
                batch(
                    &input,
                    r#"{"sensor":"a","v":0.5}
                {"sensor":"b","v":2.5}
                {"sensor":"c","v":null}
                {"sensor":"d","v":3.0}"#,
                ),
                &mut out,
            )
            .expect("filter");
        filter
            .process_batch(RecordBatch::new_empty(Arc::clone(&input)), &mut out)
            .expect("empty");
        assert_eq!(
            pretty(out.batches()),
            "\
+--------+-----+
| sensor | v   |
+--------+-----+
| b      | 2.5 |
| d      | 3.0 |
+--------+-----+"
        );
        assert_eq!(out.batches().len(), 1, "an empty input batch emits nothing");
    }
}
