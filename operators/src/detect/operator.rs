use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, AsArray, BooleanArray, Float64Builder, RecordBatch, RecordBatchOptions,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Float64Type, Schema, SchemaRef};
use arrow::row::{RowConverter, Rows, SortField};
use datafusion::physical_expr::PhysicalExpr;
use serde::{Deserialize, Serialize};

use super::KeyedDetector;
use crate::error::{OperatorError, Result};
use crate::{Collector, Operator};

/// Runs a [`KeyedDetector`] over batches: maps each row's PARTITION BY key to a dense index,
/// feeds the value column, and appends the detector's output column.
pub struct DetectorOperator {
    name: String,
    partition_by: Vec<Arc<dyn PhysicalExpr>>,
    value: Arc<dyn PhysicalExpr>,
    detector: Box<dyn KeyedDetector>,
    converter: RowConverter,
    /// Encoded keys in index order, and the index of each.
    keys: Rows,
    index: HashMap<Box<[u8]>, usize>,
    schema: SchemaRef,
    row_keys: Vec<usize>,
}

impl DetectorOperator {
    pub fn try_new(
        name: impl Into<String>,
        input_schema: &Schema,
        partition_by: Vec<Arc<dyn PhysicalExpr>>,
        value: Arc<dyn PhysicalExpr>,
        detector: Box<dyn KeyedDetector>,
        schema: SchemaRef,
    ) -> Result<Self> {
        let mut fields = partition_by
            .iter()
            .map(|e| Ok(SortField::new(e.data_type(input_schema)?)))
            .collect::<Result<Vec<_>>>()?;
        // Without PARTITION BY every row shares one constant key.
        if fields.is_empty() {
            fields.push(SortField::new(DataType::Boolean));
        }
        let converter = RowConverter::new(fields)?;
        Ok(Self {
            name: name.into(),
            partition_by,
            value,
            detector,
            keys: converter.empty_rows(64, 1024),
            converter,
            index: HashMap::new(),
            schema,
            row_keys: Vec::new(),
        })
    }
}

#[derive(Serialize, Deserialize)]
struct DetectorSnapshot {
    /// Arrow row-format encodings of the keys, in index order.
    keys: Vec<Vec<u8>>,
    detector: Vec<u8>,
}

impl Operator for DetectorOperator {
    fn name(&self) -> &str {
        &self.name
    }

    fn output_schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn process_batch(&mut self, batch: RecordBatch, out: &mut Collector) -> Result<()> {
        let rows = batch.num_rows();
        if rows == 0 {
            return Ok(());
        }
        // Evaluate first: a failing expression must leave the key table untouched.
        let values = self.value.evaluate(&batch)?.into_array(rows)?;
        let values = cast(&values, &DataType::Float64)?;
        let key_columns = if self.partition_by.is_empty() {
            vec![Arc::new(BooleanArray::new_null(rows)) as ArrayRef]
        } else {
            self.partition_by
                .iter()
                .map(|e| e.evaluate(&batch)?.into_array(rows))
                .collect::<datafusion::error::Result<Vec<_>>>()?
        };
        let encoded = self.converter.convert_columns(&key_columns)?;
        self.row_keys.clear();
        for row in 0..rows {
            let key = encoded.row(row);
            let index = match self.index.get(key.as_ref()) {
                Some(&index) => index,
                None => {
                    let index = self.keys.num_rows();
                    self.keys.push(key);
                    self.index.insert(key.as_ref().into(), index);
                    index
                }
            };
            self.row_keys.push(index);
        }
        let mut output = Float64Builder::with_capacity(rows);
        self.detector.process(
            &self.row_keys,
            values.as_primitive::<Float64Type>(),
            &mut output,
        );
        let mut columns = batch.columns().to_vec();
        columns.push(Arc::new(output.finish()));
        let options = RecordBatchOptions::new().with_row_count(Some(rows));
        out.emit(RecordBatch::try_new_with_options(
            Arc::clone(&self.schema),
            columns,
            &options,
        )?);
        Ok(())
    }

    fn snapshot(&mut self) -> Result<Vec<u8>> {
        let snapshot = DetectorSnapshot {
            keys: (0..self.keys.num_rows())
                .map(|i| self.keys.row(i).as_ref().to_vec())
                .collect(),
            detector: self.detector.snapshot(),
        };
        serde_json::to_vec(&snapshot)
            .map_err(|e| OperatorError::Restore(format!("cannot encode detector state: {e}")))
    }

    fn restore(&mut self, state: &[u8]) -> Result<()> {
        let snapshot: DetectorSnapshot = serde_json::from_slice(state)
            .map_err(|e| OperatorError::Restore(format!("bad detector state: {e}")))?;
        let parser = self.converter.parser();
        let mut keys = self.converter.empty_rows(snapshot.keys.len(), 1024);
        let mut index = HashMap::with_capacity(snapshot.keys.len());
        for (i, key) in snapshot.keys.iter().enumerate() {
            keys.push(parser.parse(key));
            index.insert(key.clone().into_boxed_slice(), i);
        }
        self.detector.restore(&snapshot.detector)?;
        self.keys = keys;
        self.index = index;
        Ok(())
    }
}
