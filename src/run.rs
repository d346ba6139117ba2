use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use weir_connectors::DeadLetterQueue;
use weir_engine::{Engine, EngineOptions, PipelineState};

#[derive(clap::Args)]
pub struct RunArgs {
    /// SQL files whose pipelines to run, all in this one process.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Print the final summary as one JSON object per pipeline on stdout.
    #[arg(long)]
    json: bool,
    /// Append malformed input records, with the reason, as JSON lines to this file.
    #[arg(long)]
    dead_letters: Option<PathBuf>,
    /// Seconds without data after which a source advances event time by the wall clock.
    #[arg(long, default_value_t = 2.0)]
    idle_timeout: f64,
}

/// Hosts actix in a multi-threaded tokio runtime and runs every pipeline to its end.
pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let mut plans = Vec::new();
    for file in &args.files {
        let sql = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        match weir_planner::compile(&sql) {
            Ok(compiled) => plans.extend(compiled.pipelines),
            Err(error) => {
                eprintln!("{}", error.render(&file.display().to_string()));
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    if !(args.idle_timeout.is_finite() && args.idle_timeout > 0.0) {
        bail!("--idle-timeout must be a positive number of seconds");
    }
    let dead_letters = match &args.dead_letters {
        Some(path) => DeadLetterQueue::to_file(path)
            .with_context(|| format!("cannot open dead-letter file {}", path.display()))?,
        None => DeadLetterQueue::default(),
    };
    let options = EngineOptions {
        idle_timeout: Duration::from_secs_f64(args.idle_timeout),
        ..EngineOptions::default()
    };
    let system = actix_rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime can be built")
    });
    let json = args.json;
    system.block_on(async move {
        let engine = Engine::new(options);
        let mut handles = Vec::new();
        for plan in plans {
            let name = plan.name.clone();
            let handle = engine
                .start_plan(plan, dead_letters.clone())
                .with_context(|| format!("pipeline {name} cannot start"))?;
            handles.push(handle);
        }
        // Compiling and starting ran code the pipelines will not need again.
        weir_gateway::memory::release_startup_code_logged();
        let waits = futures_wait(handles.clone());
        let outcome = tokio::select! {
            states = waits => states,
            _ = tokio::signal::ctrl_c() => {
                eprintln!("stopping...");
                for handle in &handles {
                    handle.stop_and_wait().await;
                }
                futures_wait(handles.clone()).await
            }
        };
        engine.shutdown().await;
        let mut failed = false;
        for (handle, state) in handles.iter().zip(&outcome) {
            let snapshot = handle.metrics.snapshot();
            failed |= matches!(state, PipelineState::Failed(_));
            if json {
                let line = serde_json::json!({
                    "pipeline": handle.name,
                    "state": format!("{state:?}"),
                    "metrics": snapshot,
                    "dead_letters": dead_letters.count(),
                });
                println!("{line}");
            } else {
                eprintln!("pipeline {}: {state:?}", handle.name);
                for stage in &snapshot.stages {
                    eprintln!(
                        "  {:<24} rows in {:>10} out {:>10}  late {:>6}  errors {}",
                        stage.name, stage.rows_in, stage.rows_out, stage.late_rows, stage.errors
                    );
                }
                eprintln!(
                    "  latency source->sink p50 {:.2} ms p99 {:.2} ms; watermark->emit p99 {:.2} ms; restarts {}",
                    snapshot.source_to_sink.p50_ms, snapshot.source_to_sink.p99_ms,
                    snapshot.watermark_to_emit.p99_ms, snapshot.restarts
                );
            }
        }
        if dead_letters.count() > 0 && !json {
            eprintln!("dead letters: {}", dead_letters.count());
            for (reason, count) in dead_letters.counts_by_reason() {
                eprintln!("  {count:>8}  {reason}");
            }
        }
        Ok::<_, anyhow::Error>(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
    })
}

async fn futures_wait(handles: Vec<weir_engine::PipelineHandle>) -> Vec<PipelineState> {
    let mut states = Vec::with_capacity(handles.len());
    for mut handle in handles {
        states.push(handle.wait().await);
    }
    states
}
