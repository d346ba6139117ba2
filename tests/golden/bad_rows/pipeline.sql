CREATE SOURCE vibration (
    sensor TEXT NOT NULL,
    ts     TIMESTAMP NOT NULL,
    v      DOUBLE,
    WATERMARK FOR ts AS ts - INTERVAL '1' SECOND
) WITH (connector = 'file', path = '${CASE}/input.jsonl', format = 'json', batch_size = 4);

CREATE SINK out WITH (connector = 'file', path = '${OUT}', format = 'json');

-- sqrt of a negative reading is an evaluation error in DataFusion. Only that row is rejected
-- (and dead-lettered by the engine); the rest of its batch and the pipeline carry on.
-- Malformed input lines are dead-lettered by the decoder and never reach the pipeline.
CREATE PIPELINE roots AS
INSERT INTO out
SELECT sensor, ts, sqrt(v) AS root
FROM vibration;
