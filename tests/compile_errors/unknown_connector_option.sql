CREATE SOURCE vibration (sensor TEXT, ts TIMESTAMP, v DOUBLE,
    WATERMARK FOR ts AS ts - INTERVAL '2' SECOND)
WITH (connector = 'file', path = 'input.jsonl', formt = 'json');
CREATE SINK out WITH (connector = 'stdot');
CREATE PIPELINE p AS INSERT INTO out SELECT sensor FROM vibration;
