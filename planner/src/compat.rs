//! Whether a new version of a pipeline can take over the state of the running one.
//!
//! Deploying a version the state does not fit loses open windows and detector history, so
//! the gateway and the cloud both ask this before a replacement and refuse an incompatible
//! one unless the operator asked to start fresh.

use weir_operators::build::is_stateful;
use weir_proto::plan::PipelinePlan;

/// Whether operator state of `old` can be restored into `new`: the same source, and at each
/// position either two stateless operators or two identical stateful ones. A changed filter
/// threshold or sink keeps the windows; a changed window or aggregate does not. The error
/// says what changed.
pub fn state_compatibility(old: &PipelinePlan, new: &PipelinePlan) -> Result<(), String> {
    let (Some(old_source), Some(new_source)) = (&old.source, &new.source) else {
        return Err("a version has no source".into());
    };
    if old_source.name != new_source.name || old_source.schema != new_source.schema {
        return Err("the source changed".into());
    }
    if old_source.watermark != new_source.watermark {
        return Err("the watermark rule changed".into());
    }
    if old.operators.len() != new.operators.len() {
        return Err("the operators changed".into());
    }
    for (a, b) in old.operators.iter().zip(&new.operators) {
        if (is_stateful(a) || is_stateful(b)) && a != b {
            return Err(format!("stateful operator '{}' changed", b.id));
        }
    }
    Ok(())
}

/// Whether `plan` keeps state that a fresh start would lose: open windows or the history of
/// a detector.
pub fn has_state(plan: &PipelinePlan) -> bool {
    plan.operators.iter().any(is_stateful)
}

/// Why replacing `old` by `new` would lose state, or `None` when it would not: `old` keeps
/// no state, or `new` can take it over.
pub fn state_loss(old: &PipelinePlan, new: &PipelinePlan) -> Option<String> {
    if !has_state(old) {
        return None;
    }
    state_compatibility(old, new).err()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(sql_body: &str) -> PipelinePlan {
        let sql = format!(
            "CREATE SOURCE s (sensor TEXT NOT NULL, ts TIMESTAMP NOT NULL, v DOUBLE, \
             WATERMARK FOR ts AS ts - INTERVAL '1' SECOND) WITH (connector = 'simulator');
             CREATE SINK out WITH (connector = 'stdout');
             CREATE PIPELINE p AS INSERT INTO out {sql_body};"
        );
        crate::compile(&sql)
            .unwrap_or_else(|e| panic!("does not compile:\n{}", e.render("test.sql")))
            .pipelines
            .remove(0)
    }

    const WINDOWED: &str = "SELECT sensor, window_start, max(v) AS peak \
        FROM TUMBLE(s, ts, INTERVAL '1' SECOND) WHERE v > 0 GROUP BY sensor, window_start";

    #[test]
    fn a_changed_filter_keeps_state_a_changed_window_loses_it() {
        let old = plan(WINDOWED);
        let filter = plan(&WINDOWED.replace("v > 0", "v > 5"));
        assert_eq!(state_loss(&old, &filter), None);
        let window = plan(&WINDOWED.replace("'1' SECOND", "'10' SECOND"));
        let reason = state_loss(&old, &window).expect("the window changed");
        assert!(reason.contains("changed"), "{reason}");
        let aggregate = plan(&WINDOWED.replace("max(v)", "min(v)"));
        assert!(state_loss(&old, &aggregate).is_some());
    }

    #[test]
    fn a_stateless_pipeline_has_nothing_to_lose() {
        let old = plan("SELECT sensor, v FROM s WHERE v > 0");
        assert!(!has_state(&old));
        assert_eq!(state_loss(&old, &plan(WINDOWED)), None);
        assert!(has_state(&plan(WINDOWED)));
        assert!(state_loss(&plan(WINDOWED), &old).is_some());
    }
}
