//! Golden SQL tests: each directory under `tests/golden/` holds a `pipeline.sql`, its input
//! and `expected.jsonl`. Every case runs twice:
//!
//! 1. through the real engine (actors, watermarks, file source and sink), and
//! 2. batch by batch through freshly built operators, snapshotting every operator halfway,
//!    rebuilding them from the plan and restoring, which must not change the output.
//!
//! `${CASE}` and `${OUT}` in the SQL are replaced by the case directory and the output file.
//! After an intended change, regenerate the expected files and review the diff:
//!
//! ```sh
//! WEIR_BLESS=1 cargo nextest run --test golden
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use weir_connectors::{DeadLetterQueue, SourceEvent};
use weir_engine::{Engine, EngineOptions, PipelineState};
use weir_operators::{Collector, ExprDecoder, Operator, Watermark};
use weir_proto::plan::PipelinePlan;

fn cases() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&root)
        .expect("tests/golden exists")
        .map(|e| e.expect("readable").path())
        .filter(|p| p.join("pipeline.sql").exists())
        .collect();
    cases.sort();
    assert!(!cases.is_empty(), "no golden cases found");
    cases
}

fn compile(case: &Path, out: &Path) -> PipelinePlan {
    let sql = std::fs::read_to_string(case.join("pipeline.sql")).expect("pipeline.sql");
    let sql = sql
        .replace("${CASE}", &case.display().to_string())
        .replace("${OUT}", &out.display().to_string());
    let compiled = weir_planner::compile(&sql).unwrap_or_else(|e| {
        panic!(
            "{} does not compile:\n{}",
            case.display(),
            e.render("pipeline.sql")
        )
    });
    assert_eq!(compiled.pipelines.len(), 1, "one pipeline per golden case");
    compiled.pipelines.into_iter().next().expect("one pipeline")
}

fn check(case: &Path, actual: &str, mode: &str) {
    let expected_path = case.join("expected.jsonl");
    if std::env::var_os("WEIR_BLESS").is_some() && mode == "engine" {
        std::fs::write(&expected_path, actual).expect("write expected");
        return;
    }
    let expected = std::fs::read_to_string(&expected_path).unwrap_or_else(|_| {
        panic!(
            "{} has no expected.jsonl; run with WEIR_BLESS=1",
            case.display()
        )
    });
    assert_eq!(
        actual,
        expected,
        "{} ({mode}) differs from expected.jsonl",
        case.display()
    );
}

/// Dead letters by reason, compared with `dead_letters.expected` (absent = none expected).
fn check_dead_letters(case: &Path, dead_letters: &DeadLetterQueue) {
    let mut counts = dead_letters.counts_by_reason();
    counts.sort();
    let actual: String = counts
        .iter()
        .map(|(reason, n)| format!("{n} {reason}\n"))
        .collect();
    let path = case.join("dead_letters.expected");
    if std::env::var_os("WEIR_BLESS").is_some() {
        if actual.is_empty() {
            let _ = std::fs::remove_file(&path);
        } else {
            std::fs::write(&path, &actual).expect("write dead_letters.expected");
        }
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(actual, expected, "{}: dead letters differ", case.display());
}

fn run_engine(plan: PipelinePlan, dead_letters: DeadLetterQueue) -> PipelineState {
    let system = actix_rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime")
    });
    system.block_on(async move {
        let engine = Engine::new(EngineOptions::default());
        let mut handle = engine.start_plan(plan, dead_letters).expect("plan starts");
        let state = handle.wait().await;
        engine.shutdown().await;
        state
    })
}

#[test]
fn golden_cases_through_the_engine() {
    for case in cases() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out.jsonl");
        let dead_letters = DeadLetterQueue::default();
        let state = run_engine(compile(&case, &out), dead_letters.clone());
        assert_eq!(state, PipelineState::Finished, "{}", case.display());
        let actual = std::fs::read_to_string(&out).unwrap_or_default();
        check(&case, &actual, "engine");
        check_dead_letters(&case, &dead_letters);
    }
}

/// Drives the operators of a plan by hand, with a snapshot/restore of every operator after
/// half of the input batches.
fn run_with_restore(plan: &PipelinePlan) -> Vec<arrow::array::RecordBatch> {
    let decoder = ExprDecoder::new();
    let build = || -> Vec<Box<dyn Operator>> {
        plan.operators
            .iter()
            .map(|n| weir_operators::build(n, &decoder).expect("builds"))
            .collect()
    };
    let source = plan.source.as_ref().expect("source");
    let schema = decoder.arrow_schema(&source.schema).expect("schema");
    let spec = weir_engine::connector_spec(
        source.connector.as_ref(),
        source.watermark.as_ref().map(|w| w.column.clone()),
    )
    .expect("source spec");
    let mut reader =
        weir_connectors::build_source(&spec, Arc::clone(&schema), DeadLetterQueue::default())
            .expect("source");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut batches = Vec::new();
    while let SourceEvent::Batch(batch) = runtime.block_on(reader.next_event()).expect("reads") {
        batches.push(batch);
    }
    let rule = source.watermark.as_ref();
    let column = rule.map(|r| schema.index_of(&r.column).expect("watermark column"));
    let delay = rule.map_or(0, |r| r.delay_ns);

    let mut operators = build();
    let mut output = Vec::new();
    let mut max_event = i64::MIN;
    let halfway = batches.len() / 2;
    for (i, batch) in batches.into_iter().enumerate() {
        if i == halfway {
            let states: Vec<Vec<u8>> = operators
                .iter_mut()
                .map(|o| o.snapshot().expect("snapshot"))
                .collect();
            operators = build();
            for (operator, state) in operators.iter_mut().zip(&states) {
                operator.restore(state).expect("restore");
            }
        }
        if let Some(c) = column {
            use arrow::array::AsArray;
            let times = batch
                .column(c)
                .as_primitive::<arrow::datatypes::TimestampNanosecondType>();
            if let Some(m) = arrow::compute::max(times) {
                max_event = max_event.max(m);
            }
        }
        output.extend(push(&mut operators, Input::Batch(batch)));
        if column.is_some() && max_event > i64::MIN {
            output.extend(push(
                &mut operators,
                Input::Watermark(Watermark(max_event - delay)),
            ));
        }
    }
    output.extend(push(&mut operators, Input::Watermark(Watermark::END)));
    output
}

enum Input {
    Batch(arrow::array::RecordBatch),
    Watermark(Watermark),
}

fn push(operators: &mut [Box<dyn Operator>], input: Input) -> Vec<arrow::array::RecordBatch> {
    let Some((first, rest)) = operators.split_first_mut() else {
        return match input {
            Input::Batch(b) => vec![b],
            Input::Watermark(_) => vec![],
        };
    };
    let mut collector = Collector::default();
    let watermark = match input {
        Input::Batch(batch) => {
            weir_operators::process_isolating(first.as_mut(), batch, &mut collector)
                .expect("process");
            None
        }
        Input::Watermark(w) => {
            first.on_watermark(w, &mut collector).expect("watermark");
            Some(w)
        }
    };
    let mut out = Vec::new();
    for batch in collector.take_batches() {
        out.extend(push(rest, Input::Batch(batch)));
    }
    if let Some(w) = watermark {
        out.extend(push(rest, Input::Watermark(w)));
    }
    out
}

#[test]
fn golden_cases_survive_snapshot_and_restore() {
    for case in cases() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("out.jsonl");
        let plan = compile(&case, &out);
        let batches = run_with_restore(&plan);
        let sink = plan.sink.as_ref().expect("sink");
        let decoder = ExprDecoder::new();
        let schema = decoder.arrow_schema(&sink.schema).expect("schema");
        let spec = weir_engine::connector_spec(sink.connector.as_ref(), None).expect("sink spec");
        let mut writer =
            weir_connectors::build_sink(&spec, schema, &weir_connectors::SinkContext::default())
                .expect("sink");
        for batch in &batches {
            writer.write_batch(batch).expect("write");
        }
        writer.flush().expect("flush");
        drop(writer);
        let actual = std::fs::read_to_string(&out).unwrap_or_default();
        if std::env::var_os("WEIR_BLESS").is_none() {
            check(&case, &actual, "snapshot/restore");
        }
    }
}
