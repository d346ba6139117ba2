CREATE SOURCE vibration (
    sensor TEXT NOT NULL,
    ts     TIMESTAMP NOT NULL,
    v      DOUBLE,
    WATERMARK FOR ts AS ts - INTERVAL '1' SECOND
) WITH (connector = 'file', path = '${CASE}/input.jsonl', format = 'json', batch_size = 3);

CREATE SINK out WITH (connector = 'file', path = '${OUT}', format = 'json');

-- NULL readings are skipped by every aggregate but count(*). A NaN (made here from negative
-- readings) propagates through sum (sum_is_nan) while max returns the largest reading that is
-- not NaN (max_is_nan stays false): DataFusion's semantics, kept as they are. JSON has no NaN,
-- so a sink writes NaN as null; isnan makes it visible.
CREATE PIPELINE nulls AS
INSERT INTO out
SELECT sensor, window_start, count(*) AS all_rows, count(v) AS with_value,
       sum(v) AS total, min(v) AS lo,
       isnan(sum(CASE WHEN v < 0 THEN CAST('NaN' AS DOUBLE) ELSE v END)) AS sum_is_nan,
       isnan(max(CASE WHEN v < 0 THEN CAST('NaN' AS DOUBLE) ELSE v END)) AS max_is_nan
FROM TUMBLE(vibration, ts, INTERVAL '1' SECOND)
GROUP BY sensor, window_start;
