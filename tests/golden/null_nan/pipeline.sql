CREATE SOURCE vibration (
    sensor TEXT NOT NULL,
    ts     TIMESTAMP NOT NULL,
    v      DOUBLE,
    WATERMARK FOR ts AS ts - INTERVAL '1' SECOND
) WITH (connector = 'file', path = '${CASE}/input.csv', format = 'csv', batch_size = 3);

CREATE SINK out WITH (connector = 'file', path = '${OUT}', format = 'json');

-- NULLs are ignored by aggregates except count(*); NaN propagates through sum/avg and
-- max treats NaN as the largest value, as in DataFusion.
CREATE PIPELINE nulls AS
INSERT INTO out
SELECT sensor, window_start, count(*) AS all_rows, count(v) AS with_value,
       sum(v) AS total, max(v) AS hi, min(v) AS lo
FROM TUMBLE(vibration, ts, INTERVAL '1' SECOND)
GROUP BY sensor, window_start;
