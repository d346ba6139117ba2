use std::sync::Arc;

use arrow::array::{RecordBatch, RecordBatchOptions};
use arrow::datatypes::SchemaRef;
use datafusion::physical_expr::PhysicalExpr;

use crate::{Collector, Operator, Result};

/// Computes one output column per expression, over the whole batch at once.
pub struct ProjectOperator {
    exprs: Vec<Arc<dyn PhysicalExpr>>,
    schema: SchemaRef,
}

impl ProjectOperator {
    pub fn new(exprs: Vec<Arc<dyn PhysicalExpr>>, schema: SchemaRef) -> Self {
        Self { exprs, schema }
    }
}

impl Operator for ProjectOperator {
    fn name(&self) -> &str {
        "project"
    }

    fn output_schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn process_batch(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<()> {
        let rows = batch.num_rows();
        if rows == 0 {
            return Ok(());
        }
        let columns = self
            .exprs
            .iter()
            .map(|expr| expr.evaluate(&batch)?.into_array(rows))
            .collect::<datafusion::error::Result<Vec<_>>>()?;
        let options = RecordBatchOptions::new().with_row_count(Some(rows));
        out.emit(RecordBatch::try_new_with_options(
            self.schema.clone(),
            columns,
            &options,
        )?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use datafusion::logical_expr::Operator as BinaryOperator;
    use datafusion::physical_expr::expressions::{binary, col};

    use super::*;
    use crate::testing::{batch, pretty, schema};

    #[test]
    fn evaluates_each_expression_over_the_whole_batch() {
        let input = schema("a:f64, b:f64");
        let sum = binary(
            col("a", &input).expect("col"),
            BinaryOperator::Plus,
            col("b", &input).expect("col"),
            &input,
        )
        .expect("expr");
        let mut project = ProjectOperator::new(
            vec![col("b", &input).expect("col"), sum],
            schema("b:f64, total:f64"),
        );
        let mut out = Collector::default();
        project
            .process_batch(
                batch(
                    &input,
                    r#"{"a":1.0,"b":2.0}
                {"a":null,"b":3.0}"#,
                ),
                &mut out,
            )
            .expect("project");
        assert_eq!(
            pretty(out.batches()),
            "\
+-----+-------+
| b   | total |
+-----+-------+
| 2.0 | 3.0   |
| 3.0 |       |
+-----+-------+"
        );
    }
}
